"""The address grammar of the configuration, used by the whole package.

For: ``host:port`` (:func:`parse_hostport`, :func:`format_hostport`), byte
sizes (:func:`parse_size`), and the grammar of the Gate's ``forward_allow``
rules (:func:`parse_forward_rule`, :func:`forward_allowed`). Pure functions
that raise ValueError, so the roles use them at run time too: an edge's
forward target and a DSN's host go through the same grammar as the file.

Not for: resolving names or connecting (:mod:`qmesh.forward.service`
resolves a name and checks what it resolved to), or blaming a key and line
for a bad value (:class:`qmesh.config.reader.Reader` turns the ValueError
into a :class:`~qmesh.config.errors.ConfigError`).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from typing import Final, TypeAlias

import attrs

__all__ = [
    "HOSTNAME_RE",
    "ForwardRule",
    "IPAddress",
    "IPNetwork",
    "format_hostport",
    "forward_address",
    "forward_allowed",
    "normalize_forward_name",
    "parse_forward_rule",
    "parse_hostport",
    "parse_size",
]

HOSTNAME_RE: Final = re.compile(r"[A-Za-z0-9_.-]+")
"""The characters a host name may have (``[gate.discovery] hosts`` too)."""
_PORT_RE: Final = re.compile(r"[0-9]{1,5}")


# --------------------------------------------------------------------------
# host:port


def parse_hostport(text: str) -> tuple[str, int]:
    """Split ``"host:port"`` (or ``"[v6addr]:port"``) into ``(host, port)``.

    The port must be 0..65535 (0 asks the OS for an ephemeral port). IPv6
    addresses need brackets; they are returned without them. Raises
    ValueError saying what is wrong.
    """
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError("missing ']' after an IPv6 address")
        host = text[1:end]
        if text[end + 1 : end + 2] != ":":
            raise ValueError("missing ':port' after ']'")
        port_text = text[end + 2 :]
        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            raise ValueError("only IPv6 addresses go inside [brackets]") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError("missing ':port'")
        if not host:
            raise ValueError("missing host")
        if ":" in host:
            raise ValueError("an IPv6 address needs brackets: [addr]:port")
        if not HOSTNAME_RE.fullmatch(host):
            raise ValueError("host has characters not allowed in a host name")
    if not _PORT_RE.fullmatch(port_text):
        raise ValueError("port must be a number from 0 to 65535")
    port = int(port_text)
    if port > 65535:
        raise ValueError("port must be a number from 0 to 65535")
    return host, port


def format_hostport(host: str, port: int) -> str:
    """The inverse of :func:`parse_hostport`: brackets around IPv6 hosts."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


_SIZE_RE: Final = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([KMGT]i?B?|B)?", re.IGNORECASE)
_SIZE_UNITS: Final = {"": 1, "b": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4}


def parse_size(text: str) -> int:
    """A byte count: ``"2048"``, ``"512MiB"``, ``"8GB"``, ``"1.5G"``.

    ``KiB``/``MiB``/``GiB``/``TiB`` are powers of 1024; ``KB``/``MB``/``GB``/
    ``TB`` and the bare letters are powers of 1000, as disk and memory
    vendors write them. Raises ValueError saying what is wrong.
    """
    match = _SIZE_RE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f'expected a size like "8GiB" or "512MB", got {text!r}')
    number, unit = match.group(1), (match.group(2) or "").lower()
    base = 1024 if unit.endswith("ib") else 1
    scale = _SIZE_UNITS[unit[:1] if unit not in ("", "b") else unit]
    if base == 1024:
        scale = 1024 ** {"k": 1, "m": 2, "g": 3, "t": 4}[unit[0]]
    return int(float(number) * scale)


# --------------------------------------------------------------------------
# forward_allow rules
#
# An edge names a forward target ("host:port"); the Gate connects only where
# a rule admits it. A rule is an IP address, a CIDR block or an exact host
# name, with a port: never a glob. Globs were matched against the text the
# edge sent, so "10.0.0.*:6379" admitted "10.0.0.1.evil.example:6379", a name
# that resolves wherever its owner likes. Rules here are about *addresses*:
# the Gate resolves a name itself and checks what it resolved to (see
# qmesh.forward.service), so what the text looks like never decides.

IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address

_RULE_GLOB_CHARS: Final = frozenset("*?")
# IPv4-mapped IPv6 addresses (::ffff:a.b.c.d) are IPv4 on the wire: rules and
# targets are compared in their IPv4 form.
_V4_MAPPED: Final = ipaddress.IPv6Network("::ffff:0:0/96")
_RULE_EXAMPLES: Final = (
    'write an IP address ("10.0.0.5:6379"), a CIDR block ("10.0.0.0/24:6379", '
    '"[fd00::/8]:5432") or an exact host name ("db.internal:5432")'
)


@attrs.frozen
class ForwardRule:
    """One parsed ``forward_allow`` rule: exactly one of ``network`` (an IP
    address is a block of one) and ``name`` is set."""

    text: str
    """The rule as the operator wrote it (for messages)."""
    port: int | None
    """1..65535, or None for ``*`` (any port)."""
    network: IPNetwork | None = None
    name: str | None = None
    """Lower case, without a trailing dot."""

    def admits_port(self, port: int) -> bool:
        return 0 < port <= 65535 and (self.port is None or self.port == port)

    def admits(self, host: str, port: int) -> bool:
        """Whether this rule alone admits ``host:port``. ``host`` is an IP
        address (admitted by a network rule containing it) or a host name
        (admitted by the name rule spelling it, case-insensitively); a name is
        never compared with a network rule, nor an address with a name rule."""
        if not self.admits_port(port):
            return False
        address = forward_address(host)
        if address is not None:
            return self.network is not None and address in self.network
        return self.name is not None and self.name == normalize_forward_name(host)


def forward_address(host: str) -> IPAddress | None:
    """``host`` as an IP address to check against rules, or None for a name.

    A zone (``fe80::1%eth0``) is dropped for the comparison and an
    IPv4-mapped IPv6 address becomes its IPv4 address. Only canonical
    literals count: ``127.1`` or ``2130706433`` are names here (getaddrinfo
    would read them as IPv4, which is why names are resolved and checked by
    address rather than trusted).
    """
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def normalize_forward_name(host: str) -> str:
    """A host name as rules compare it: lower case, no trailing dot."""
    return host.lower().removesuffix(".")


def _check_rule_name(name: str) -> None:
    labels = name.removesuffix(".").split(".")
    if not HOSTNAME_RE.fullmatch(name) or any(not label for label in labels):
        raise ValueError("not an IP address, a CIDR block or a host name")
    if labels[-1].isdigit() or labels[-1].lower().startswith("0x"):
        # "10.0.0" or "0x7f.1" are not names: getaddrinfo reads them as IPv4.
        raise ValueError("looks like an incomplete IP address, which is not a host name")


def parse_forward_rule(text: str) -> ForwardRule:
    """Parse one ``forward_allow`` rule; ValueError saying what is wrong.

    Grammar (``PORT`` is 1..65535, or ``*`` for any port)::

        10.0.0.5:PORT           one IPv4 address
        10.0.0.0/24:PORT        an IPv4 CIDR block (no host bits set)
        [fd00::5]:PORT          one IPv6 address, in brackets
        [fd00::/8]:PORT         an IPv6 CIDR block, in brackets
        db.internal:PORT        exactly this host name (case-insensitive)

    Wildcards (``*``, ``?``) in the host are refused, with a message saying
    what to write instead.
    """
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise ValueError('expected "[IPv6 address or block]:port"')
        host, port_text = text[1:end], text[end + 2 :]
        bracketed = True
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError('missing ":port" (a number, or "*" for any port)')
        bracketed = False
    if not host:
        raise ValueError("missing host")
    if _RULE_GLOB_CHARS & set(host):
        raise ValueError(f"wildcards are not allowed; {_RULE_EXAMPLES}")
    if port_text == "*":
        port = None
    elif _PORT_RE.fullmatch(port_text) and 1 <= int(port_text) <= 65535:
        port = int(port_text)
    else:
        raise ValueError('port must be a number from 1 to 65535, or "*" for any port')
    if ":" in host and not bracketed:
        raise ValueError('an IPv6 address or block needs brackets: "[fd00::/8]:5432"')
    if "%" in host:
        raise ValueError("an IPv6 zone (%…) cannot be part of a rule")
    if bracketed or "/" in host or forward_address(host) is not None:
        try:
            network = ipaddress.ip_network(host, strict=True)
        except ValueError as exc:
            raise ValueError(f"not an IP address or CIDR block ({exc})") from None
        if bracketed != (network.version == 6):
            raise ValueError("only IPv6 addresses and blocks go inside [brackets]")
        if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_V4_MAPPED):
            raise ValueError("write an IPv4-mapped address or block in its IPv4 form")
        return ForwardRule(text, port, network=network)
    _check_rule_name(host)
    return ForwardRule(text, port, name=normalize_forward_name(host))


def forward_allowed(rules: Iterable[str | ForwardRule], host: str, port: int) -> bool:
    """Whether one of ``rules`` admits ``host:port`` as given, without
    resolving anything: an IP address by a network rule containing it, a host
    name by a name rule spelling it. (The Gate also admits a name whose
    resolved addresses network rules admit: qmesh.forward.service.) Rules given
    as text are parsed; ValueError if one is malformed."""
    return any(
        (rule if isinstance(rule, ForwardRule) else parse_forward_rule(rule)).admits(host, port)
        for rule in rules
    )
