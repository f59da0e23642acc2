"""qmesh configuration: one TOML file plus ``QMESH_*`` environment overrides.

For: reading ``config.toml`` with :mod:`tomllib`, applying environment
overrides, validating every value and turning the result into frozen attrs
classes that the roles read. An error names the file and line (or the
environment variable), the dotted key and what was expected, so an operator
can fix it without reading code. Also the ``host:port`` grammar shared by the
whole package (:func:`parse_hostport`, :func:`format_hostport`) and the
grammar of the Gate's ``forward_allow`` rules (:func:`parse_forward_rule`,
:func:`forward_allowed`).

Not for: secrets (they live in the Gate's vault, never in this file), command
line parsing (:mod:`qmesh.cli` applies its flags on top of a loaded
:class:`Config`), or watching the file for changes.

Environment overrides: ``QMESH_<SECTION>__<KEY>=value``. A double underscore
separates levels and names are lower-cased, so ``QMESH_GATE__TUNNEL_LISTEN``
sets ``gate.tunnel_listen`` and ``QMESH_DATA_DIR`` sets the top-level
``data_dir``. The value is read as a TOML value when it parses as one (``2``,
``2.5``, ``true``, ``["a:1", "b:*"]``) and as a plain string otherwise; a
string setting keeps the variable's exact text (``QMESH_GATE__NAME=123`` is
the name ``"123"``). ``QMESH_`` variables without a double underscore that do
not name a top-level key are left alone: test suites and scripts use that
prefix for their own settings.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import math
import os
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Final, TypeAlias

import attrs

__all__ = [
    "BudgetConfig",
    "Config",
    "ConfigError",
    "DaemonConfig",
    "DaemonRuntimeConfig",
    "DiscoveryConfig",
    "ForwardConfig",
    "ForwardRule",
    "GateAppConfig",
    "GateConfig",
    "HttpConfig",
    "LogConfig",
    "MemoryConfig",
    "MiniGateConfig",
    "ProviderConfig",
    "ProviderModelConfig",
    "RoutingConfig",
    "TunnelConfig",
    "format_hostport",
    "forward_address",
    "forward_allowed",
    "load_config",
    "normalize_forward_name",
    "parse_forward_rule",
    "parse_hostport",
    "parse_size",
]

KeyPath: TypeAlias = tuple[str | int, ...]
"""A position in the config tree: table keys, and indexes into arrays of tables."""

LOG_LEVELS: Final = ("debug", "info", "warning", "error")
LOG_FORMATS: Final = ("text", "json")
AUDIT_MODES: Final = ("text", "hash", "off")
"""Values of ``gate.apps.APP.audit_statements``."""
ENV_PREFIX: Final = "QMESH_"

# Hosts that accept connections on every interface, and names for this machine.
# with_port_offset uses them to decide whether a `gate` address is this Gate.
_WILDCARD_HOSTS: Final = frozenset({"0.0.0.0", "::", "*", ""})
_LOOPBACK_HOSTS: Final = frozenset({"localhost", "127.0.0.1", "::1"})

_HOSTNAME_RE: Final = re.compile(r"[A-Za-z0-9_.-]+")
_PORT_RE: Final = re.compile(r"[0-9]{1,5}")
_BARE_KEY_RE: Final = re.compile(r"[A-Za-z0-9_-]+")
_GATE_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# An app id, as qmesh.state.check_name accepts it (not imported: this module
# depends on nothing else in qmesh).
_APP_ID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


class ConfigError(Exception):
    """The operator's configuration is wrong.

    Raised for a missing or unreadable file, a TOML syntax error, an unknown
    key, a value of the wrong type or out of range, or a bad environment
    override. ``str(err)`` is the whole message, e.g.
    ``config.toml:12: gate.tunnel_listen: expected "host:port", got "11439"``.
    The parts are kept as attributes for callers that want them: ``origin``
    (the file as given, or ``environment variable NAME``), ``line`` (when
    known), ``key`` (the dotted key) and ``problem``.
    """

    def __init__(
        self,
        problem: str,
        *,
        key: str | None = None,
        origin: str | None = None,
        line: int | None = None,
    ) -> None:
        self.problem = problem
        self.key = key
        self.origin = origin
        self.line = line
        parts: list[str] = []
        if origin is not None:
            parts.append(origin if line is None else f"{origin}:{line}")
        if key is not None:
            parts.append(key)
        parts.append(problem)
        super().__init__(": ".join(parts))


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
        if not _HOSTNAME_RE.fullmatch(host):
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
    if not _HOSTNAME_RE.fullmatch(name) or any(not label for label in labels):
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


# --------------------------------------------------------------------------
# The configuration classes


@attrs.frozen
class LogConfig:
    """``[log]``: how the ``qmesh`` loggers write."""

    level: str = "info"
    """One of debug, info, warning, error."""
    format: str = "text"
    """``text`` (human-readable lines) or ``json`` (one object per line)."""


@attrs.frozen
class TunnelConfig:
    """``[tunnel]``: the MiniGate/Daemon ⇄ Gate tunnel, the same on both ends."""

    compression_level: int = 3
    """zstd level, 1..19."""
    max_frame_payload: int = 1_048_576
    """Largest plaintext payload in one frame, 1 KiB..16 MiB."""
    stream_window: int = 1_048_576
    """Per-stream flow-control window in bytes (at least 64 KiB)."""
    chunk_size: int = 65_536
    """Bytes read from a local socket per frame, 1 KiB..max_frame_payload."""
    heartbeat_interval_s: float = 5.0
    dead_after_s: float = 15.0
    """Silence after which a connection is declared dead (> heartbeat interval)."""
    resume_grace_s: float = 60.0
    """How long the Gate keeps a dropped session's state for a resume."""
    reconnect_initial_s: float = 0.05
    reconnect_max_s: float = 5.0
    handshake_timeout_s: float = 10.0
    """A connection that has not finished its handshake by then is closed."""
    max_handshakes_in_flight: int = 256
    """Unauthenticated connections the Gate handshakes at once; more are closed
    at once (a stranger's flood costs a socket accept each, nothing more)."""
    max_sessions_per_identity: int = 8
    """Live and detached sessions one enrolled key may hold at the Gate."""
    max_streams_per_session: int = 4096
    """Streams the peer may have open in one session; more OPENs are refused."""


@attrs.frozen
class GateAppConfig:
    """One ``[gate.apps.APP_ID]`` table: what that application may do through
    the Gate's Postgres path. An app without a table may use no database."""

    databases: tuple[str, ...] = ()
    """:mod:`fnmatch` patterns of the database aliases it may open (case-sensitive)."""
    read_only: bool = False
    statement_timeout_ms: int | None = None
    max_sessions: int | None = None
    """Concurrent sessions of this app through this Gate."""
    audit_statements: str = "text"
    """``text``, ``hash`` (SHA-256 of the statement only) or ``off``."""


def _frozen_apps(value: Mapping[str, GateAppConfig]) -> Mapping[str, GateAppConfig]:
    # A read-only view: the config is frozen all the way down.
    return MappingProxyType(dict(value))


def _frozen_rules(value: Mapping[str, Sequence[str]]) -> Mapping[str, tuple[str, ...]]:
    return MappingProxyType({edge: tuple(rules) for edge, rules in value.items()})


@attrs.frozen
class ProviderModelConfig:
    """One ``[[gate.providers.models]]``: a model a provider serves, as the
    router sees it."""

    id: str
    """The model id clients name (and ``/v1/models`` lists)."""
    upstream: str | None = None
    """The provider's own name for it (default: ``id``)."""
    tasks: tuple[str, ...] = ("chat", "creative_writing", "code", "translate", "summarize")
    price_in: float = 0.0
    """USD per 1M input tokens."""
    price_out: float = 0.0
    """USD per 1M output tokens."""
    latency_ms: float = 1000.0
    """Expected latency of one request until measured."""
    context: int = 8192
    quality: int = 3
    """Quality tier 1-5 (daemons' size classes map to the same scale)."""
    family: str | None = None
    size_class: str | None = None
    """``xs``, ``s``, ``m``, ``l`` or ``xl``."""


@attrs.frozen
class ProviderConfig:
    """One ``[[gate.providers]]``: a remote model API the Gate may route to."""

    name: str
    base_url: str
    """``http(s)://host[:port]/prefix``; OpenAI-style requests go to ``BASE/chat/completions``."""
    kind: str = "openai"
    """``openai`` (any OpenAI-compatible server) or ``anthropic`` (``/v1/messages``)."""
    api_key: str | None = None
    """``store:NAME`` (``qmesh providers set-key NAME``), ``env:VAR``, or none."""
    private: bool = False
    """True for an endpoint under the operator's control (``privacy=private`` allows it)."""
    models: tuple[ProviderModelConfig, ...] = ()


@attrs.frozen
class BudgetConfig:
    """One ``[[gate.budgets]]``: a spend limit for an app or a team of apps."""

    name: str
    limit_usd: float
    period: str = "month"
    """``day`` or ``month`` (UTC)."""
    mode: str = "hard"
    """``hard``: paid providers blocked at 100 %; ``soft``: only warned."""
    apps: tuple[str, ...] = ()
    """The apps it pays for; an app's first budget in file order is its own."""


def _frozen_groups(value: Mapping[str, tuple[str, ...]]) -> Mapping[str, tuple[str, ...]]:
    return MappingProxyType(dict(value))


@attrs.frozen
class RoutingConfig:
    """``[gate.routing]``: how the qg:// router behaves."""

    extra_tasks: tuple[str, ...] = ()
    """Task names accepted in DSNs beyond the built-in ones."""
    cooldown_s: float = 30.0
    """How long a node or provider that failed is passed over."""
    max_hops: int = 4
    """Candidates tried for one request before giving up."""
    electricity_usd_per_kwh: float = 0.15
    gate_cpu_watts: float = 15.0
    """Power charged for the Gate's own skills (one core busy)."""
    local_rate_usd_per_1m: float | None = None
    """A flat rate for daemon work instead of power × time."""
    equivalences: Mapping[str, tuple[str, ...]] = attrs.field(
        factory=dict, converter=_frozen_groups, hash=False
    )
    """Group name → model ids that may stand in for each other."""


MEMORY_EXTRACTORS: Final = ("rules", "llm")


@attrs.frozen
class MemoryConfig:
    """``[gate.memory]``: how the graph memory uses the mesh's models (see docs/memory.md)."""

    extractor: str = "rules"
    """Default for ``POST /v1/memory/documents``: ``rules``, or ``llm`` (rules plus
    the triples a model proposes through ``extract_dsn``, each checked against its sentence)."""
    extract_dsn: str = "qg://task=extract;prefer=quality"
    compose_dsn: str = "qg://task=chat;prefer=quality"
    """Where ``"compose": "llm"`` answers are composed."""
    max_document_bytes: int = 512 * 1024
    """Largest document ``POST /v1/memory/documents`` accepts, in bytes of
    UTF-8 text (413 beyond). Ingest time grows in proportion to it, and so
    does the one write transaction that stores a document (about 1.5 s per
    512 KiB of short sentences on a 2-core box), which the Gate's other
    writers wait behind."""
    threads: int = 2
    """Worker threads the memory's blocking work (ingest, queries) may use at
    once: a pool of its own, so documents never starve tunnel handshakes."""


@attrs.frozen
class DiscoveryConfig:
    """``[gate.discovery]``: what the Gate scans for services (see docs/inventory.md).

    Only what is listed here is ever probed: every ``targets`` address,
    and every address of ``networks`` and every name in ``hosts`` on each
    of ``ports``. Nothing listed: no scanning.
    """

    targets: tuple[str, ...] = ()
    """``host:port`` addresses; each is recorded even when nothing answers there."""
    networks: tuple[str, ...] = ()
    """CIDR blocks (``10.0.0.0/28``); addresses that answer on ``ports`` are recorded."""
    hosts: tuple[str, ...] = ()
    """Host names or addresses; those that answer on ``ports`` are recorded."""
    ports: tuple[int, ...] = ()
    """Ports scanned on ``networks`` and ``hosts`` (required with either)."""
    interval_s: float = 30.0
    """From the end of one scan to the start of the next."""
    concurrency: int = 32
    """Targets probed at once."""
    connect_timeout_s: float = 1.0
    probe_timeout_s: float = 2.0
    """One request and its answer."""
    target_timeout_s: float = 10.0
    """Every probe of one target together: a slow host costs at most this."""
    gone_after_misses: int = 3
    """Scans in a row that miss a service before it is gone (one miss: stale)."""
    max_targets: int = 4096
    """Refuse a configuration that expands to more addresses × ports than this."""

    @property
    def enabled(self) -> bool:
        return bool(self.targets or self.networks or self.hosts)


@attrs.frozen
class HttpConfig:
    """``[gate.http]``: limits of the Gate's HTTP API — its own listener and
    the ``llm`` tunnel service, which serves the same routes — and of the
    app-key checks behind it (see docs/http.md). The defaults are safe for a
    Gate on the open network; each bounds what one peer can make it spend."""

    max_connections: int = 512
    """Open connections on the HTTP listener; beyond it a new one is answered
    503 and closed at once."""
    max_header_bytes: int = 65_536
    """Request line and headers of one request (431 beyond)."""
    max_body_bytes: int = 16 * 1024 * 1024
    """Body of one request (413 beyond)."""
    idle_timeout_s: float = 75.0
    """A kept-alive connection waiting for its next request is closed after this."""
    request_timeout_s: float = 30.0
    """From a request's first byte to the end of its body (408 beyond); also
    the longest one write of the answer may wait for a client that does not read."""
    max_requests_per_app: int = 64
    """Requests of one app in progress at once (streamed answers until their
    end); beyond it 429."""
    auth_failures_per_s: float = 10.0
    """Failed app-key checks allowed per source address, on average …"""
    auth_failure_burst: int = 20
    """… and in a burst; beyond them 429, without running PBKDF2."""
    hash_threads: int = 2
    """Threads that may run PBKDF2 for app keys at once (their own pool, so
    that key checks never starve tunnel handshakes or vault reads)."""
    tls: str = "auto"
    """``auto``: TLS unless the listener is on a loopback address; ``on``;
    ``off`` (TLS ends at a proxy in front). See :mod:`qmesh.web.tls`."""
    tls_cert: Path | None = None
    """PEM certificate chain; with ``tls_key``. Unset: one is generated in
    the data directory at first start, and its fingerprint is the pin."""
    tls_key: Path | None = None


@attrs.frozen
class GateConfig:
    """``[gate]``: the central Gate."""

    name: str = "gate"
    tunnel_listen: str = "127.0.0.1:11439"
    http_listen: str = "127.0.0.1:11480"
    forward_allow: tuple[str, ...] = ()
    """Targets every edge may ask the Gate to forward to: IP, CIDR or exact
    host name rules with a port (see :func:`parse_forward_rule`)."""
    forward_allow_edges: Mapping[str, tuple[str, ...]] = attrs.field(
        factory=dict, converter=_frozen_rules, hash=False
    )
    """From ``[gate.forward_allow_edges]``: more rules for one edge, by its
    identity name; that edge may use these and ``forward_allow``."""
    master_key_file: Path | None = None
    """The vault's master key; None: ``DATA_DIR/master.key`` (see :mod:`qmesh.pg.masterkey`)."""
    apps: Mapping[str, GateAppConfig] = attrs.field(
        factory=dict, converter=_frozen_apps, hash=False
    )
    """From the ``[gate.apps.APP_ID]`` tables, by app id: see :mod:`qmesh.pg.policy`."""
    routing: RoutingConfig = RoutingConfig()
    providers: tuple[ProviderConfig, ...] = ()
    """From the ``[[gate.providers]]`` tables: see ``docs/qg.md``."""
    budgets: tuple[BudgetConfig, ...] = ()
    """From the ``[[gate.budgets]]`` tables: see :mod:`qmesh.finops.budgets`."""
    daemon_stale_after_missed: int = 3
    """Heartbeats a daemon may miss before the inventory calls it stale."""
    daemon_gone_after_missed: int = 12
    """… and gone (more than ``daemon_stale_after_missed``)."""
    discovery: DiscoveryConfig = DiscoveryConfig()
    """From ``[gate.discovery]``: see :class:`DiscoveryConfig`."""
    memory: MemoryConfig = MemoryConfig()
    """From ``[gate.memory]``: see :class:`MemoryConfig`."""
    http: HttpConfig = HttpConfig()
    """From ``[gate.http]``: see :class:`HttpConfig`."""


@attrs.frozen
class ForwardConfig:
    """One ``[[minigate.forward]]``: listen locally, relay to ``target`` through the Gate."""

    listen: str
    target: str


@attrs.frozen
class MiniGateConfig:
    """``[minigate]``: the edge sidecar."""

    gate: str = "127.0.0.1:11439"
    """The Gate's tunnel address to dial."""
    credential_file: Path | None = None
    forwards: tuple[ForwardConfig, ...] = ()
    """From the ``[[minigate.forward]]`` tables."""
    pg_listen: str = "127.0.0.1:11438"
    llm_listen: str = "127.0.0.1:11435"
    pg_tls_cert: Path | None = None
    """PEM certificate (chain) for TLS on ``pg_listen``; without it SSLRequest gets 'N'."""
    pg_tls_key: Path | None = None
    """PEM private key of ``pg_tls_cert`` (both or neither)."""


@attrs.frozen
class DaemonRuntimeConfig:
    """One ``[[daemon.runtime]]``: a model server the daemon drives over HTTP."""

    kind: str
    """``ollama`` (its native API) or ``openai`` (any OpenAI-compatible server)."""
    url: str
    """``http://host:port`` of the server."""
    name: str = ""
    """How the inventory names it; default ``KIND@host:port``."""
    keep_alive: str = "10m"
    """Ollama only: how long a model stays loaded after use (Ollama's syntax)."""
    api_key_env: str | None = None
    """OpenAI only: the environment variable holding a bearer key, if it needs one."""


@attrs.frozen
class DaemonConfig:
    """``[daemon]``: a compute node (see docs/daemon.md)."""

    gate: str = "127.0.0.1:11439"
    credential_file: Path | None = None
    health_listen: str = "127.0.0.1:11450"
    heartbeat_interval_s: float = 5.0
    """Telemetry heartbeats to the Gate; the Gate counts missed ones."""
    model_dirs: tuple[Path, ...] = ()
    """Directories searched (recursively) for ``*.gguf`` files for llama.cpp."""
    rescan_interval_s: float = 30.0
    memory_budget: int | None = None
    """Bytes llama.cpp models may hold together ("8GiB" in the file); None:
    90 % of the model memory (VRAM, or RAM on CPU-only nodes) free at start."""
    queue_limit: int = 4
    """Requests that may wait per model before the daemon answers busy."""
    parallel: int = 1
    """Generations at once per model."""
    context_length: int = 4096
    """llama.cpp ``n_ctx`` (capped at each model's own)."""
    threads: int | None = None
    """llama.cpp threads (generation and prompt batches); None:
    llama-cpp-python's defaults (half the CPUs; all of them for batches)."""
    gpu_layers: int | None = None
    """llama.cpp layers on the GPU; None: the quantization planner's split; -1: all."""
    load_timeout_s: float = 120.0
    llama_cpp: bool = True
    """Serve the GGUF files of ``model_dirs`` with llama.cpp."""
    runtimes: tuple[DaemonRuntimeConfig, ...] = ()
    """From the ``[[daemon.runtime]]`` tables."""


def _default_data_dir() -> Path:
    return Path.home() / ".qmesh"


@attrs.frozen
class Config:
    """The whole configuration. Every section is optional in the file."""

    data_dir: Path = attrs.field(factory=_default_data_dir)
    log: LogConfig = LogConfig()
    tunnel: TunnelConfig = TunnelConfig()
    gate: GateConfig = GateConfig()
    minigate: MiniGateConfig = MiniGateConfig()
    daemon: DaemonConfig = DaemonConfig()

    @property
    def state_db_path(self) -> Path:
        """The Gate's SQLite state store."""
        return self.data_dir / "state.db"

    def with_port_offset(self, offset: int) -> Config:
        """A copy with every listen port moved by ``offset``.

        ``minigate.gate`` and ``daemon.gate`` move too when they point at this
        Gate's tunnel listener: the same port, and the same host, a loopback
        name for a loopback listener, or any host when the Gate listens on
        every interface. That is how ``qmesh up --port-offset`` runs a second
        local mesh beside the first. Port 0 (ephemeral) stays 0; forward
        targets never move. Raises ConfigError when a port would leave 1..65535.
        """
        if offset == 0:
            return self
        tunnel_host, tunnel_port = parse_hostport(self.gate.tunnel_listen)

        def shift(address: str, key: str) -> str:
            host, port = parse_hostport(address)
            if port == 0:
                return address
            moved = port + offset
            if not 1 <= moved <= 65535:
                raise ConfigError(
                    f"port {port} moved by {offset} is {moved}, outside 1..65535", key=key
                )
            return format_hostport(host, moved)

        def shift_gate(address: str, key: str) -> str:
            host, port = parse_hostport(address)
            if port != 0 and port == tunnel_port and _same_host(host, tunnel_host):
                return shift(address, key)
            return address

        gate = attrs.evolve(
            self.gate,
            tunnel_listen=shift(self.gate.tunnel_listen, "gate.tunnel_listen"),
            http_listen=shift(self.gate.http_listen, "gate.http_listen"),
        )
        minigate = attrs.evolve(
            self.minigate,
            gate=shift_gate(self.minigate.gate, "minigate.gate"),
            pg_listen=shift(self.minigate.pg_listen, "minigate.pg_listen"),
            llm_listen=shift(self.minigate.llm_listen, "minigate.llm_listen"),
            forwards=tuple(
                attrs.evolve(f, listen=shift(f.listen, f"minigate.forward[{i}].listen"))
                for i, f in enumerate(self.minigate.forwards)
            ),
        )
        daemon = attrs.evolve(
            self.daemon,
            gate=shift_gate(self.daemon.gate, "daemon.gate"),
            health_listen=shift(self.daemon.health_listen, "daemon.health_listen"),
        )
        return attrs.evolve(self, gate=gate, minigate=minigate, daemon=daemon)

    def ephemeral(self) -> Config:
        """A copy with every listen port set to 0, hosts kept.

        The ``gate`` addresses that edges dial are left alone: the Gate's real
        port is only known once it has bound, so whoever starts the roles must
        pass it on (tests do this to run in parallel).
        """

        def zero(address: str) -> str:
            return format_hostport(parse_hostport(address)[0], 0)

        return attrs.evolve(
            self,
            gate=attrs.evolve(
                self.gate,
                tunnel_listen=zero(self.gate.tunnel_listen),
                http_listen=zero(self.gate.http_listen),
            ),
            minigate=attrs.evolve(
                self.minigate,
                pg_listen=zero(self.minigate.pg_listen),
                llm_listen=zero(self.minigate.llm_listen),
                forwards=tuple(
                    attrs.evolve(f, listen=zero(f.listen)) for f in self.minigate.forwards
                ),
            ),
            daemon=attrs.evolve(self.daemon, health_listen=zero(self.daemon.health_listen)),
        )


def _same_host(host: str, listener: str) -> bool:
    host, listener = host.lower(), listener.lower()
    if host == listener or listener in _WILDCARD_HOSTS:
        return True
    return host in _LOOPBACK_HOSTS and listener in _LOOPBACK_HOSTS


# --------------------------------------------------------------------------
# Finding the line of a key
#
# tomllib returns plain dicts with no positions, so a second, much smaller
# scanner walks the text: it follows [table] and [[array]] headers and `key =`
# lines (dotted and quoted keys too), and skips the insides of strings and
# multi-line arrays so that text in a value is never taken for a key. It only
# runs on text tomllib has accepted, so it need not report errors; keys inside
# inline tables are not recorded, and a lookup falls back to the nearest
# enclosing key or header it did record, which for an inline table is the
# right line anyway.


@attrs.define
class _ValueState:
    """Where the scan is inside a value that may continue on the next line."""

    string: str | None = None  # the open multi-line string delimiter
    depth: int = 0  # open [ and { brackets

    @property
    def open(self) -> bool:
        return self.string is not None or self.depth > 0


def _scan_value(line: str, pos: int, state: _ValueState) -> None:
    """Advance ``state`` over ``line[pos:]``, which is (part of) a value."""
    n = len(line)
    while pos < n:
        if state.string is not None:
            delim = state.string
            if delim == '"""' and line[pos] == "\\":
                pos += 2
            elif line.startswith(delim, pos):
                pos += 3
                # A closing delimiter may be followed by up to two more quotes
                # that belong to the string's content.
                while pos < n and line[pos] == delim[0]:
                    pos += 1
                state.string = None
            else:
                pos += 1
            continue
        ch = line[pos]
        if ch == "#":
            return
        if ch in "\"'":
            if line.startswith(ch * 3, pos):
                state.string = ch * 3
                pos += 3
            else:
                pos = _skip_string(line, pos)
            continue
        if ch in "[{":
            state.depth += 1
        elif ch in "]}":
            state.depth = max(0, state.depth - 1)
        pos += 1


def _skip_string(line: str, pos: int) -> int:
    """Index after the one-line string that starts at ``line[pos]``."""
    quote = line[pos]
    pos += 1
    while pos < len(line):
        if quote == '"' and line[pos] == "\\":
            pos += 2
            continue
        if line[pos] == quote:
            return pos + 1
        pos += 1
    return pos


def _parse_key(line: str, pos: int) -> tuple[list[str], int] | None:
    """A (possibly dotted, possibly quoted) key at ``line[pos:]``: its parts and the end."""
    parts: list[str] = []
    n = len(line)
    while True:
        while pos < n and line[pos] in " \t":
            pos += 1
        if pos >= n:
            return None
        if line[pos] in "\"'":
            end = _skip_string(line, pos)
            try:
                # tomllib decodes the escapes, so quoted keys compare like tomllib's.
                parts.append(tomllib.loads(f"k = {line[pos:end]}")["k"])
            except tomllib.TOMLDecodeError:
                return None
            pos = end
        else:
            match = _BARE_KEY_RE.match(line, pos)
            if match is None:
                return None
            parts.append(match.group())
            pos = match.end()
        while pos < n and line[pos] in " \t":
            pos += 1
        if pos < n and line[pos] == ".":
            pos += 1
            continue
        return parts, pos


def _resolve(parts: Sequence[str], arrays: Mapping[KeyPath, int]) -> KeyPath:
    """A header's key path, with the current index after each array of tables."""
    out: list[str | int] = []
    for part in parts:
        out.append(part)
        count = arrays.get(tuple(out))
        if count:
            out.append(count - 1)
    return tuple(out)


def _key_lines(text: str) -> dict[KeyPath, int]:
    """The line (1-based) where each key path is first written."""
    lines: dict[KeyPath, int] = {}
    arrays: dict[KeyPath, int] = {}
    table: KeyPath = ()
    state = _ValueState()

    def record(path: KeyPath, lineno: int) -> None:
        for i in range(1, len(path) + 1):
            lines.setdefault(path[:i], lineno)

    for lineno, line in enumerate(text.splitlines(), start=1):
        if state.open:
            _scan_value(line, 0, state)
            continue
        stripped = line.lstrip()
        pos = len(line) - len(stripped)
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.startswith("[["):
            parsed = _parse_key(line, pos + 2)
            if parsed is None:
                continue
            prefix = _resolve(parsed[0][:-1], arrays)
            base = (*prefix, parsed[0][-1])
            index = arrays.get(base, 0)
            arrays[base] = index + 1
            table = (*base, index)
            record(table, lineno)
            lines[table] = lineno
        elif stripped.startswith("["):
            parsed = _parse_key(line, pos + 1)
            if parsed is None:
                continue
            table = _resolve(parsed[0], arrays)
            record(table, lineno)
        else:
            parsed = _parse_key(line, pos)
            if parsed is None:
                continue
            keys, end = parsed
            while end < len(line) and line[end] in " \t":
                end += 1
            if end >= len(line) or line[end] != "=":
                continue
            record((*table, *keys), lineno)
            _scan_value(line, end + 1, state)
    return lines


def _dotted(path: KeyPath) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            shown = part if _BARE_KEY_RE.fullmatch(part) else json.dumps(part)
            out = f"{out}.{shown}" if out else shown
    return out


# --------------------------------------------------------------------------
# Environment overrides


def _parse_env_value(raw: str) -> object:
    try:
        parsed = tomllib.loads(f"v = {raw}")
    except tomllib.TOMLDecodeError:
        return raw
    # A value with a newline could smuggle in more keys; then it is just text.
    return parsed["v"] if parsed.keys() == {"v"} else raw


_TOP_LEVEL_KEYS: Final = ("data_dir", "log", "tunnel", "gate", "minigate", "daemon")


def _env_overrides(env: Mapping[str, str]) -> list[tuple[KeyPath, str, str]]:
    """``(path, variable, raw value)`` for each ``QMESH_*`` variable that is config."""
    found: list[tuple[KeyPath, str, str]] = []
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX) :]
        if "__" in rest:
            parts = tuple(part.lower() for part in rest.split("__"))
            if not all(parts):
                raise ConfigError(
                    "malformed name: levels are separated by exactly two underscores",
                    origin=f"environment variable {name}",
                )
        elif rest.lower() in _TOP_LEVEL_KEYS:
            parts = (rest.lower(),)
        else:
            continue
        found.append((parts, name, env[name]))
    return found


# --------------------------------------------------------------------------
# Validation


def _describe(value: object) -> str:
    """A short rendering of a bad value for an error message."""
    if isinstance(value, str):
        shown = json.dumps(value)
        return shown if len(shown) <= 60 else shown[:56] + '..."'
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"float {value}"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"


@attrs.define
class _Reader:
    """Reads typed values out of the merged tree, raising ConfigError with locations."""

    origin: str | None
    base_dir: Path
    home: Path
    lines: dict[KeyPath, int]
    env_vars: dict[KeyPath, str] = attrs.field(factory=dict)
    env_raw: dict[KeyPath, str] = attrs.field(factory=dict)

    def from_env(self, path: KeyPath) -> str | None:
        for i in range(len(path), 0, -1):
            var = self.env_vars.get(path[:i])
            if var is not None:
                return var
        return None

    def error(self, path: KeyPath, problem: str) -> ConfigError:
        key = _dotted(path) if path else None
        var = self.from_env(path)
        if var is not None:
            return ConfigError(problem, key=key, origin=f"environment variable {var}")
        line = None
        for i in range(len(path), 0, -1):
            line = self.lines.get(path[:i])
            if line is not None:
                break
        return ConfigError(problem, key=key, origin=self.origin, line=line)

    def table(self, parent: Mapping[str, object], path: KeyPath) -> Mapping[str, object]:
        value = parent.get(str(path[-1]), {}) if path else parent
        if not isinstance(value, dict):
            raise self.error(path, f"expected a table, got {_describe(value)}")
        return value

    def check_keys(
        self, table: Mapping[str, object], path: KeyPath, allowed: Sequence[str]
    ) -> None:
        for key in table:
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise self.error((*path, key), f"unknown key{hint}")

    def string(
        self,
        table: Mapping[str, object],
        path: KeyPath,
        key: str,
        default: str,
        *,
        choices: Sequence[str] = (),
    ) -> str:
        if key not in table:
            return default
        where = (*path, key)
        value = table[key]
        if not isinstance(value, str) and where in self.env_raw:
            value = self.env_raw[where]
        if not isinstance(value, str):
            raise self.error(where, f"expected a string, got {_describe(value)}")
        if choices and value not in choices:
            listed = ", ".join(json.dumps(c) for c in choices)
            raise self.error(where, f"expected one of {listed}, got {_describe(value)}")
        return value

    def address(self, table: Mapping[str, object], path: KeyPath, key: str, default: str) -> str:
        if key not in table:
            return default
        value = self.string(table, path, key, default)
        self.check_address(value, (*path, key))
        return value

    def check_address(self, value: str, where: KeyPath) -> None:
        try:
            parse_hostport(value)
        except ValueError as exc:
            detail = "" if ":" not in value else f" ({exc})"
            raise self.error(
                where, f'expected "host:port", got {_describe(value)}{detail}'
            ) from None

    def integer(
        self,
        table: Mapping[str, object],
        path: KeyPath,
        key: str,
        default: int,
        *,
        lo: int,
        hi: int | None = None,
    ) -> int:
        if key not in table:
            return default
        value = table[key]
        where = (*path, key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(where, f"expected an integer, got {_describe(value)}")
        if value < lo or (hi is not None and value > hi):
            wanted = f"from {lo} to {hi}" if hi is not None else f"of at least {lo}"
            raise self.error(where, f"expected an integer {wanted}, got {value}")
        return value

    def number(
        self,
        table: Mapping[str, object],
        path: KeyPath,
        key: str,
        default: float,
        *,
        positive: bool,
    ) -> float:
        if key not in table:
            return default
        value = table[key]
        where = (*path, key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(where, f"expected a number of seconds, got {_describe(value)}")
        if not math.isfinite(value):
            raise self.error(where, f"expected a finite number, got {value}")
        if positive and value <= 0:
            raise self.error(where, f"expected a number greater than 0, got {value}")
        if value < 0:
            raise self.error(where, f"expected a number of at least 0, got {value}")
        return float(value)

    def boolean(self, table: Mapping[str, object], path: KeyPath, key: str, default: bool) -> bool:
        if key not in table:
            return default
        value = table[key]
        if not isinstance(value, bool):
            raise self.error((*path, key), f"expected true or false, got {_describe(value)}")
        return value

    def path(self, table: Mapping[str, object], path: KeyPath, key: str) -> Path | None:
        if key not in table:
            return None
        where = (*path, key)
        text = self.string(table, path, key, "")
        if not text:
            raise self.error(where, "expected a path, got an empty string")
        return self.resolve_path(text, where)

    def resolve_path(self, text: str, where: KeyPath) -> Path:
        """``~`` expanded; a relative path is taken from the config file's
        directory when written there, from the working directory when it came
        from the environment, so the meaning does not depend on where qmesh
        was started from."""
        if text == "~" or text.startswith("~/"):
            result = self.home / text[2:]
        else:
            result = Path(os.path.expanduser(text))
        if not result.is_absolute():
            base = Path.cwd() if self.from_env(where) is not None else self.base_dir
            result = base / result
        return result


def _field_names(cls: type[attrs.AttrsInstance]) -> list[str]:
    """The keys a table read into ``cls`` may hold: its attribute names."""
    return [f.name for f in attrs.fields(cls)]


def _read_log(r: _Reader, root: Mapping[str, object]) -> LogConfig:
    path: KeyPath = ("log",)
    t = r.table(root, path)
    r.check_keys(t, path, ("level", "format"))
    d = LogConfig()
    return LogConfig(
        level=r.string(t, path, "level", d.level, choices=LOG_LEVELS),
        format=r.string(t, path, "format", d.format, choices=LOG_FORMATS),
    )


def _read_tunnel(r: _Reader, root: Mapping[str, object]) -> TunnelConfig:
    path: KeyPath = ("tunnel",)
    t = r.table(root, path)
    r.check_keys(t, path, _field_names(TunnelConfig))
    d = TunnelConfig()
    max_frame_payload = r.integer(
        t, path, "max_frame_payload", d.max_frame_payload, lo=1024, hi=16_777_216
    )
    # A small max_frame_payload with no chunk_size written shrinks the default
    # chunk to fit rather than failing on a value the operator never wrote.
    default_chunk = min(d.chunk_size, max_frame_payload)
    chunk_size = r.integer(t, path, "chunk_size", default_chunk, lo=1024)
    if chunk_size > max_frame_payload:
        raise r.error(
            (*path, "chunk_size"),
            f"must not exceed tunnel.max_frame_payload ({max_frame_payload}), got {chunk_size}",
        )
    heartbeat = r.number(t, path, "heartbeat_interval_s", d.heartbeat_interval_s, positive=True)
    dead_after = r.number(t, path, "dead_after_s", d.dead_after_s, positive=True)
    if dead_after <= heartbeat:
        # Blame the key the operator wrote; dead_after_s when both are written.
        blamed = "dead_after_s" if "dead_after_s" in t else "heartbeat_interval_s"
        raise r.error(
            (*path, blamed),
            f"tunnel.dead_after_s ({dead_after}) must be greater than "
            f"tunnel.heartbeat_interval_s ({heartbeat})",
        )
    initial = r.number(t, path, "reconnect_initial_s", d.reconnect_initial_s, positive=True)
    maximum = r.number(t, path, "reconnect_max_s", d.reconnect_max_s, positive=True)
    if maximum < initial:
        blamed = "reconnect_max_s" if "reconnect_max_s" in t else "reconnect_initial_s"
        raise r.error(
            (*path, blamed),
            f"tunnel.reconnect_max_s ({maximum}) must be at least "
            f"tunnel.reconnect_initial_s ({initial})",
        )
    return TunnelConfig(
        compression_level=r.integer(t, path, "compression_level", d.compression_level, lo=1, hi=19),
        max_frame_payload=max_frame_payload,
        stream_window=r.integer(t, path, "stream_window", d.stream_window, lo=65_536),
        chunk_size=chunk_size,
        heartbeat_interval_s=heartbeat,
        dead_after_s=dead_after,
        resume_grace_s=r.number(t, path, "resume_grace_s", d.resume_grace_s, positive=False),
        reconnect_initial_s=initial,
        reconnect_max_s=maximum,
        handshake_timeout_s=r.number(
            t, path, "handshake_timeout_s", d.handshake_timeout_s, positive=True
        ),
        max_handshakes_in_flight=r.integer(
            t, path, "max_handshakes_in_flight", d.max_handshakes_in_flight, lo=1
        ),
        max_sessions_per_identity=r.integer(
            t, path, "max_sessions_per_identity", d.max_sessions_per_identity, lo=1
        ),
        max_streams_per_session=r.integer(
            t, path, "max_streams_per_session", d.max_streams_per_session, lo=1
        ),
    )


def _read_gate(r: _Reader, root: Mapping[str, object]) -> GateConfig:
    path: KeyPath = ("gate",)
    t = r.table(root, path)
    r.check_keys(t, path, _field_names(GateConfig))
    d = GateConfig()
    name = r.string(t, path, "name", d.name)
    if not _GATE_NAME_RE.fullmatch(name):
        raise r.error(
            (*path, "name"),
            "expected 1-64 letters, digits, '.', '_' or '-' starting with a letter or "
            f"digit, got {_describe(name)}",
        )
    return GateConfig(
        name=name,
        tunnel_listen=r.address(t, path, "tunnel_listen", d.tunnel_listen),
        http_listen=r.address(t, path, "http_listen", d.http_listen),
        forward_allow=_read_forward_rules(r, t, (*path, "forward_allow")),
        forward_allow_edges=_read_forward_allow_edges(r, t, path),
        master_key_file=r.path(t, path, "master_key_file"),
        apps=_read_gate_apps(r, t, path),
        routing=_read_routing(r, t, path),
        providers=_read_providers(r, t, path),
        budgets=_read_budgets(r, t, path),
        discovery=_read_discovery(r, t, path),
        memory=_read_memory(r, t, path),
        http=_read_http(r, t, path),
        **_read_daemon_thresholds(r, t, path),
    )


def _read_forward_rules(r: _Reader, t: Mapping[str, object], where: KeyPath) -> tuple[str, ...]:
    """An array of forward_allow rules at ``where``, each checked now, so that
    a glob or a typo stops the Gate at start rather than refusing at run time."""
    key = str(where[-1])
    if key not in t:
        return ()
    value = t[key]
    if not isinstance(value, list):
        raise r.error(where, f'expected an array of "host:port" rules, got {_describe(value)}')
    rules: list[str] = []
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise r.error((*where, i), f"expected a string, got {_describe(item)}")
        try:
            parse_forward_rule(item)
        except ValueError as exc:
            raise r.error((*where, i), f"bad forward rule {_describe(item)}: {exc}") from None
        rules.append(item)
    return tuple(rules)


def _read_forward_allow_edges(
    r: _Reader, gate: Mapping[str, object], gate_path: KeyPath
) -> dict[str, tuple[str, ...]]:
    path: KeyPath = (*gate_path, "forward_allow_edges")
    t = r.table(gate, path)
    edges: dict[str, tuple[str, ...]] = {}
    for edge in t:
        if not _APP_ID_RE.fullmatch(edge):
            raise r.error(
                (*path, edge),
                "an edge's identity name must be 1-63 letters, digits, '.', '_' or '-' "
                "starting with a letter or digit",
            )
        edges[edge] = _read_forward_rules(r, t, (*path, edge))
    return edges


def _read_daemon_thresholds(r: _Reader, t: Mapping[str, object], path: KeyPath) -> dict[str, int]:
    d = GateConfig()
    stale = r.integer(t, path, "daemon_stale_after_missed", d.daemon_stale_after_missed, lo=1)
    gone = r.integer(t, path, "daemon_gone_after_missed", d.daemon_gone_after_missed, lo=2)
    if gone <= stale:
        blamed = "daemon_gone_after_missed"
        if blamed not in t:
            blamed = "daemon_stale_after_missed"
        raise r.error(
            (*path, blamed),
            f"must be more than gate.daemon_stale_after_missed ({stale}), "
            f"got gone after {gone} and stale after {stale}",
        )
    return {"daemon_stale_after_missed": stale, "daemon_gone_after_missed": gone}


def _read_gate_apps(
    r: _Reader, gate: Mapping[str, object], gate_path: KeyPath
) -> dict[str, GateAppConfig]:
    path: KeyPath = (*gate_path, "apps")
    t = r.table(gate, path)
    apps: dict[str, GateAppConfig] = {}
    for app_id in t:
        where: KeyPath = (*path, app_id)
        if not _APP_ID_RE.fullmatch(app_id):
            raise r.error(
                where,
                "an app id must be 1-63 letters, digits, '.', '_' or '-' starting with a "
                "letter or digit",
            )
        table = r.table(t, where)
        r.check_keys(table, where, _field_names(GateAppConfig))
        d = GateAppConfig()
        patterns: list[str] = []
        if "databases" in table:
            value = table["databases"]
            dbs: KeyPath = (*where, "databases")
            if not isinstance(value, list):
                raise r.error(
                    dbs,
                    f'expected an array of alias patterns like ["app*"], got {_describe(value)}',
                )
            for i, item in enumerate(value):
                if not isinstance(item, str) or not item or any(c.isspace() for c in item):
                    raise r.error(
                        (*dbs, i),
                        f"expected an alias pattern without spaces, got {_describe(item)}",
                    )
                patterns.append(item)
        timeout = max_sessions = None
        if "statement_timeout_ms" in table:
            timeout = r.integer(table, where, "statement_timeout_ms", 0, lo=1, hi=2_147_483_647)
        if "max_sessions" in table:
            max_sessions = r.integer(table, where, "max_sessions", 0, lo=1, hi=1_000_000)
        apps[app_id] = GateAppConfig(
            databases=tuple(patterns),
            read_only=r.boolean(table, where, "read_only", d.read_only),
            statement_timeout_ms=timeout,
            max_sessions=max_sessions,
            audit_statements=r.string(
                table, where, "audit_statements", d.audit_statements, choices=AUDIT_MODES
            ),
        )
    return apps


def _read_discovery(r: _Reader, gate: Mapping[str, object], gate_path: KeyPath) -> DiscoveryConfig:
    path: KeyPath = (*gate_path, "discovery")
    t = r.table(gate, path)
    r.check_keys(t, path, _field_names(DiscoveryConfig))
    d = DiscoveryConfig()

    def array(key: str) -> list[object]:
        value = t.get(key, [])
        if not isinstance(value, list):
            raise r.error((*path, key), f"expected an array, got {_describe(value)}")
        return value

    targets: list[str] = []
    for i, item in enumerate(array("targets")):
        where: KeyPath = (*path, "targets", i)
        if not isinstance(item, str):
            raise r.error(where, f'expected "host:port", got {_describe(item)}')
        r.check_address(item, where)
        if parse_hostport(item)[1] == 0:
            raise r.error(where, "port 0 cannot be scanned")
        targets.append(item)
    networks: list[str] = []
    addresses = 0
    for i, item in enumerate(array("networks")):
        where = (*path, "networks", i)
        try:
            # strict: "10.0.0.5/24" (host bits set) is more likely a typo than a wish.
            network = ipaddress.ip_network(item, strict=True) if isinstance(item, str) else None
        except ValueError as exc:
            raise r.error(where, f'expected a CIDR block like "10.0.0.0/28" ({exc})') from None
        if network is None:
            raise r.error(where, f'expected a CIDR block like "10.0.0.0/28", got {_describe(item)}')
        networks.append(str(network))
        addresses += network.num_addresses
    hosts: list[str] = []
    for i, item in enumerate(array("hosts")):
        where = (*path, "hosts", i)
        text = item[1:-1] if isinstance(item, str) and item.startswith("[") else item
        if (
            not isinstance(text, str)
            or not text
            or not (_HOSTNAME_RE.fullmatch(text) or _is_ip(text))
        ):
            raise r.error(where, f"expected a host name or address, got {_describe(item)}")
        hosts.append(text)
    ports: list[int] = []
    for i, item in enumerate(array("ports")):
        where = (*path, "ports", i)
        if isinstance(item, bool) or not isinstance(item, int) or not 1 <= item <= 65535:
            raise r.error(where, f"expected a port from 1 to 65535, got {_describe(item)}")
        if item not in ports:
            ports.append(item)
    if (networks or hosts) and not ports:
        blamed = "networks" if networks else "hosts"
        raise r.error(
            (*path, blamed), "needs gate.discovery.ports: the ports to scan on these addresses"
        )
    max_targets = r.integer(t, path, "max_targets", d.max_targets, lo=1, hi=1_000_000)
    total = len(targets) + (addresses + len(hosts)) * len(ports)
    if total > max_targets:
        raise r.error(
            (*path, "networks" if networks else "targets"),
            f"expands to {total} addresses × ports, more than gate.discovery.max_targets "
            f"({max_targets}); narrow the networks or raise max_targets",
        )
    return DiscoveryConfig(
        targets=tuple(targets),
        networks=tuple(networks),
        hosts=tuple(hosts),
        ports=tuple(ports),
        interval_s=r.number(t, path, "interval_s", d.interval_s, positive=True),
        concurrency=r.integer(t, path, "concurrency", d.concurrency, lo=1, hi=4096),
        connect_timeout_s=r.number(
            t, path, "connect_timeout_s", d.connect_timeout_s, positive=True
        ),
        probe_timeout_s=r.number(t, path, "probe_timeout_s", d.probe_timeout_s, positive=True),
        target_timeout_s=r.number(t, path, "target_timeout_s", d.target_timeout_s, positive=True),
        gone_after_misses=r.integer(
            t, path, "gone_after_misses", d.gone_after_misses, lo=2, hi=1_000_000
        ),
        max_targets=max_targets,
    )


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return False
    return True


# -- the qg:// router's sections (providers, budgets, routing) ----------------

_PROVIDER_KINDS: Final = ("openai", "anthropic")
_SIZE_CLASSES: Final = ("xs", "s", "m", "l", "xl")
_BUDGET_PERIODS: Final = ("day", "month")
_BUDGET_MODES: Final = ("hard", "soft")
_MODEL_ID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}")
_TASK_NAME_RE: Final = re.compile(r"[a-z][a-z0-9_]{0,63}")


def _tables(r: _Reader, t: Mapping[str, object], path: KeyPath, key: str) -> list[KeyPath]:
    """Paths of the ``[[…key]]`` array of tables in ``t`` (checked to be one)."""
    if key not in t:
        return []
    where: KeyPath = (*path, key)
    value = t[key]
    if not isinstance(value, list):
        raise r.error(where, f"expected [[{_dotted(where)}]] tables, got {_describe(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise r.error((*where, i), f"expected a table, got {_describe(item)}")
    return [(*where, i) for i in range(len(value))]


def _item(t: Mapping[str, object], where: KeyPath) -> Mapping[str, object]:
    value = t[str(where[-2])]
    assert isinstance(value, list)
    item = value[int(where[-1])]
    assert isinstance(item, dict)
    return item


def _strings(
    t: Mapping[str, object],
    path: KeyPath,
    key: str,
    default: tuple[str, ...],
    pattern: re.Pattern[str],
    what: str,
    *,
    r: _Reader,
) -> tuple[str, ...]:
    if key not in t:
        return default
    where: KeyPath = (*path, key)
    value = t[key]
    if not isinstance(value, list):
        raise r.error(where, f"expected an array of {what}s, got {_describe(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, str) or not pattern.fullmatch(item):
            raise r.error((*where, i), f"expected a {what}, got {_describe(item)}")
    return tuple(str(v) for v in value)


def _required(r: _Reader, t: Mapping[str, object], path: KeyPath, key: str, hint: str) -> None:
    if key not in t:
        raise r.error(path, f"missing key {key!r} ({hint})")


def _read_memory(r: _Reader, gate: Mapping[str, object], gate_path: KeyPath) -> MemoryConfig:
    path: KeyPath = (*gate_path, "memory")
    t = r.table(gate, path)
    r.check_keys(t, path, _field_names(MemoryConfig))
    d = MemoryConfig()
    dsns: dict[str, str] = {}
    for key in ("extract_dsn", "compose_dsn"):
        value = r.string(t, path, key, getattr(d, key))
        if not value.startswith("qg://"):
            raise r.error((*path, key), f"expected a qg:// DSN, got {_describe(value)}")
        dsns[key] = value
    return MemoryConfig(
        extractor=r.string(t, path, "extractor", d.extractor, choices=MEMORY_EXTRACTORS),
        max_document_bytes=r.integer(
            t, path, "max_document_bytes", d.max_document_bytes, lo=1024, hi=64 * 1024 * 1024
        ),
        threads=r.integer(t, path, "threads", d.threads, lo=1, hi=64),
        **dsns,
    )


def _read_http(r: _Reader, gate: Mapping[str, object], gate_path: KeyPath) -> HttpConfig:
    path: KeyPath = (*gate_path, "http")
    t = r.table(gate, path)
    r.check_keys(t, path, _field_names(HttpConfig))
    d = HttpConfig()
    tls_cert, tls_key = r.path(t, path, "tls_cert"), r.path(t, path, "tls_key")
    if (tls_cert is None) != (tls_key is None):
        blamed = "tls_key" if tls_key is None else "tls_cert"
        raise r.error((*path, blamed), "tls_cert and tls_key go together: set both or neither")
    return HttpConfig(
        max_connections=r.integer(t, path, "max_connections", d.max_connections, lo=1),
        max_header_bytes=r.integer(
            t, path, "max_header_bytes", d.max_header_bytes, lo=1024, hi=16 * 1024 * 1024
        ),
        max_body_bytes=r.integer(t, path, "max_body_bytes", d.max_body_bytes, lo=1024),
        idle_timeout_s=r.number(t, path, "idle_timeout_s", d.idle_timeout_s, positive=True),
        request_timeout_s=r.number(
            t, path, "request_timeout_s", d.request_timeout_s, positive=True
        ),
        max_requests_per_app=r.integer(
            t, path, "max_requests_per_app", d.max_requests_per_app, lo=1
        ),
        auth_failures_per_s=r.number(
            t, path, "auth_failures_per_s", d.auth_failures_per_s, positive=True
        ),
        auth_failure_burst=r.integer(t, path, "auth_failure_burst", d.auth_failure_burst, lo=1),
        hash_threads=r.integer(t, path, "hash_threads", d.hash_threads, lo=1, hi=256),
        tls=r.string(t, path, "tls", d.tls, choices=("auto", "on", "off")),
        tls_cert=tls_cert,
        tls_key=tls_key,
    )


def _read_routing(r: _Reader, gate: Mapping[str, object], gate_path: KeyPath) -> RoutingConfig:
    path: KeyPath = (*gate_path, "routing")
    t = r.table(gate, path)
    r.check_keys(t, path, _field_names(RoutingConfig))
    d = RoutingConfig()
    groups: dict[str, tuple[str, ...]] = {}
    table = r.table(t, (*path, "equivalences"))
    for name in table:
        groups[name] = _strings(
            table, (*path, "equivalences"), name, (), _MODEL_ID_RE, "model id", r=r
        )
    local_rate = None
    if "local_rate_usd_per_1m" in t:
        local_rate = r.number(t, path, "local_rate_usd_per_1m", 0.0, positive=False)
    return RoutingConfig(
        extra_tasks=_strings(t, path, "extra_tasks", (), _TASK_NAME_RE, "task name", r=r),
        cooldown_s=r.number(t, path, "cooldown_s", d.cooldown_s, positive=False),
        max_hops=r.integer(t, path, "max_hops", d.max_hops, lo=1, hi=64),
        electricity_usd_per_kwh=r.number(
            t, path, "electricity_usd_per_kwh", d.electricity_usd_per_kwh, positive=False
        ),
        gate_cpu_watts=r.number(t, path, "gate_cpu_watts", d.gate_cpu_watts, positive=False),
        local_rate_usd_per_1m=local_rate,
        equivalences=groups,
    )


def _unique_name(
    r: _Reader,
    t: Mapping[str, object],
    where: KeyPath,
    names: set[str],
    pattern: re.Pattern[str],
    rule: str,
    what: str,
) -> str:
    """Read ``name`` from ``t``: it must match ``pattern`` and not be in ``names``
    (which it then joins). ``rule`` says what the pattern wants, ``what`` the noun."""
    name = r.string(t, where, "name", "")
    if not pattern.fullmatch(name) or name in names:
        problem = "is used twice" if name in names else rule
        raise r.error((*where, "name"), f"{what} name {_describe(name)} {problem}")
    names.add(name)
    return name


def _read_providers(
    r: _Reader, gate: Mapping[str, object], gate_path: KeyPath
) -> tuple[ProviderConfig, ...]:
    providers: list[ProviderConfig] = []
    names: set[str] = set()
    for where in _tables(r, gate, gate_path, "providers"):
        t = _item(gate, where)
        r.check_keys(t, where, _field_names(ProviderConfig))
        _required(r, t, where, "name", "a short name for the provider")
        _required(r, t, where, "base_url", 'e.g. "https://api.example.com/v1"')
        name = _unique_name(
            r, t, where, names, _GATE_NAME_RE, "must be 1-64 letters, digits, . _ -", "provider"
        )
        base_url = r.string(t, where, "base_url", "")
        if not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", base_url):
            raise r.error(
                (*where, "base_url"), f"expected an http(s):// URL, got {_describe(base_url)}"
            )
        api_key = None
        if "api_key" in t:
            api_key = r.string(t, where, "api_key", "")
            if not re.fullmatch(r"(store|env):[A-Za-z0-9_.-]+", api_key):
                # Never echo the value: it may be the key itself, pasted by mistake.
                raise r.error(
                    (*where, "api_key"),
                    'expected "store:NAME" or "env:VARIABLE" (never the key itself)',
                )
        models: list[ProviderModelConfig] = []
        for mwhere in _tables(r, t, where, "models"):
            m = _item(t, mwhere)
            r.check_keys(m, mwhere, _field_names(ProviderModelConfig))
            _required(r, m, mwhere, "id", "the model id clients name")
            d = ProviderModelConfig(id="")
            model_id = r.string(m, mwhere, "id", "")
            if not _MODEL_ID_RE.fullmatch(model_id):
                raise r.error((*mwhere, "id"), f"expected a model id, got {_describe(model_id)}")
            size_class = None
            if "size_class" in m:
                size_class = r.string(m, mwhere, "size_class", "", choices=_SIZE_CLASSES)
            models.append(
                ProviderModelConfig(
                    id=model_id,
                    upstream=r.string(m, mwhere, "upstream", model_id) if "upstream" in m else None,
                    tasks=_strings(m, mwhere, "tasks", d.tasks, _TASK_NAME_RE, "task name", r=r),
                    price_in=r.number(m, mwhere, "price_in", 0.0, positive=False),
                    price_out=r.number(m, mwhere, "price_out", 0.0, positive=False),
                    latency_ms=r.number(m, mwhere, "latency_ms", d.latency_ms, positive=True),
                    context=r.integer(m, mwhere, "context", d.context, lo=1),
                    quality=r.integer(m, mwhere, "quality", d.quality, lo=0, hi=5),
                    family=r.string(m, mwhere, "family", "") or None,
                    size_class=size_class,
                )
            )
        providers.append(
            ProviderConfig(
                name=name,
                base_url=base_url,
                kind=r.string(t, where, "kind", "openai", choices=_PROVIDER_KINDS),
                api_key=api_key,
                private=r.boolean(t, where, "private", False),
                models=tuple(models),
            )
        )
    return tuple(providers)


def _read_budgets(
    r: _Reader, gate: Mapping[str, object], gate_path: KeyPath
) -> tuple[BudgetConfig, ...]:
    budgets: list[BudgetConfig] = []
    names: set[str] = set()
    for where in _tables(r, gate, gate_path, "budgets"):
        t = _item(gate, where)
        r.check_keys(t, where, _field_names(BudgetConfig))
        _required(r, t, where, "name", "e.g. team-a")
        _required(r, t, where, "limit_usd", "the most it may spend per period")
        name = _unique_name(
            r, t, where, names, _APP_ID_RE, "must be 1-63 letters, digits, . _ -", "budget"
        )
        budgets.append(
            BudgetConfig(
                name=name,
                limit_usd=r.number(t, where, "limit_usd", 0.0, positive=False),
                period=r.string(t, where, "period", "month", choices=_BUDGET_PERIODS),
                mode=r.string(t, where, "mode", "hard", choices=_BUDGET_MODES),
                apps=_strings(t, where, "apps", (), _APP_ID_RE, "app id", r=r),
            )
        )
    return tuple(budgets)


def _read_forwards(r: _Reader, t: Mapping[str, object], path: KeyPath) -> tuple[ForwardConfig, ...]:
    if "forward" not in t:
        return ()
    where: KeyPath = (*path, "forward")
    value = t["forward"]
    if not isinstance(value, list):
        raise r.error(where, f"expected [[minigate.forward]] tables, got {_describe(value)}")
    forwards: list[ForwardConfig] = []
    for i, item in enumerate(value):
        item_path: KeyPath = (*where, i)
        if not isinstance(item, dict):
            raise r.error(item_path, f"expected a table, got {_describe(item)}")
        r.check_keys(item, item_path, ("listen", "target"))
        for required in ("listen", "target"):
            if required not in item:
                raise r.error(item_path, f'missing key {required!r} ("host:port")')
        forwards.append(
            ForwardConfig(
                listen=r.address(item, item_path, "listen", ""),
                target=r.address(item, item_path, "target", ""),
            )
        )
    return tuple(forwards)


def _read_minigate(r: _Reader, root: Mapping[str, object]) -> MiniGateConfig:
    path: KeyPath = ("minigate",)
    t = r.table(root, path)
    r.check_keys(
        t,
        path,
        (
            "gate", "credential_file", "forward", "pg_listen", "llm_listen",
            "pg_tls_cert", "pg_tls_key",
        ),
    )  # fmt: skip
    d = MiniGateConfig()
    result = MiniGateConfig(
        gate=r.address(t, path, "gate", d.gate),
        credential_file=r.path(t, path, "credential_file"),
        forwards=_read_forwards(r, t, path),
        pg_listen=r.address(t, path, "pg_listen", d.pg_listen),
        llm_listen=r.address(t, path, "llm_listen", d.llm_listen),
        pg_tls_cert=r.path(t, path, "pg_tls_cert"),
        pg_tls_key=r.path(t, path, "pg_tls_key"),
    )
    if (result.pg_tls_cert is None) != (result.pg_tls_key is None):
        given, missing = ("pg_tls_cert", "pg_tls_key")
        if result.pg_tls_cert is None:
            given, missing = missing, given
        raise r.error((*path, given), f"needs minigate.{missing} too (both or neither)")
    # Two MiniGate listeners on one fixed address would fail at bind time
    # with a less helpful message; port 0 never collides.
    seen: dict[tuple[str, int], str] = {}
    named: list[tuple[KeyPath, str]] = [
        ((*path, "pg_listen"), result.pg_listen),
        ((*path, "llm_listen"), result.llm_listen),
    ]
    named += [((*path, "forward", i, "listen"), f.listen) for i, f in enumerate(result.forwards)]
    for where, address in named:
        host, port = parse_hostport(address)
        if port == 0:
            continue
        other = seen.get((host.lower(), port))
        if other is not None:
            raise r.error(where, f"{address} is already used by {other}")
        seen[(host.lower(), port)] = _dotted(where)
    return result


_DAEMON_RUNTIME_KINDS: Final = ("ollama", "openai")
_ENV_NAME_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _read_daemon_runtimes(
    r: _Reader, t: Mapping[str, object], path: KeyPath
) -> tuple[DaemonRuntimeConfig, ...]:
    runtimes: list[DaemonRuntimeConfig] = []
    names: set[str] = set()
    for where in _tables(r, t, path, "runtime"):
        item = _item(t, where)
        r.check_keys(item, where, _field_names(DaemonRuntimeConfig))
        _required(r, item, where, "kind", "ollama or openai")
        _required(r, item, where, "url", 'e.g. "http://127.0.0.1:11434"')
        kind = r.string(item, where, "kind", "", choices=_DAEMON_RUNTIME_KINDS)
        url = r.string(item, where, "url", "").rstrip("/")
        match = re.fullmatch(r"http://([^\s/?#]+)(/[^\s?#]*)?", url)
        if match is None:
            raise r.error(
                (*where, "url"), f"expected an http://host:port URL, got {_describe(url)}"
            )
        name = r.string(item, where, "name", f"{kind}@{match.group(1)}")
        if not name or name in names or name == "llama.cpp":
            raise r.error(
                (*where, "name"), f"runtime name {_describe(name)} is empty or used twice"
            )
        names.add(name)
        api_key_env = None
        if "api_key_env" in item:
            api_key_env = r.string(item, where, "api_key_env", "")
            if not _ENV_NAME_RE.fullmatch(api_key_env):
                raise r.error((*where, "api_key_env"), "expected an environment variable name")
        runtimes.append(
            DaemonRuntimeConfig(
                kind=kind,
                url=url,
                name=name,
                keep_alive=r.string(item, where, "keep_alive", "10m"),
                api_key_env=api_key_env,
            )
        )
    return tuple(runtimes)


def _read_daemon(r: _Reader, root: Mapping[str, object]) -> DaemonConfig:
    path: KeyPath = ("daemon",)
    t = r.table(root, path)
    allowed = [n for n in _field_names(DaemonConfig) if n != "runtimes"]
    r.check_keys(t, path, [*allowed, "runtime"])
    d = DaemonConfig()
    model_dirs: list[Path] = []
    if "model_dirs" in t:
        where: KeyPath = (*path, "model_dirs")
        value = t["model_dirs"]
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise r.error(where, f"expected an array of directories, got {_describe(value)}")
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item:
                raise r.error((*where, i), f"expected a directory, got {_describe(item)}")
            model_dirs.append(r.resolve_path(item, (*where, i)))
    budget = None
    if "memory_budget" in t:
        where = (*path, "memory_budget")
        value = t["memory_budget"]
        if isinstance(value, str):
            try:
                value = parse_size(value)
            except ValueError as exc:
                raise r.error(where, str(exc)) from None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise r.error(where, f'expected a size like "8GiB" or bytes, got {_describe(value)}')
        budget = value
    threads = gpu_layers = None
    if "threads" in t:
        threads = r.integer(t, path, "threads", 0, lo=1, hi=1024)
    if "gpu_layers" in t:
        gpu_layers = r.integer(t, path, "gpu_layers", 0, lo=-1, hi=100_000)
    return DaemonConfig(
        gate=r.address(t, path, "gate", d.gate),
        credential_file=r.path(t, path, "credential_file"),
        health_listen=r.address(t, path, "health_listen", d.health_listen),
        heartbeat_interval_s=r.number(
            t, path, "heartbeat_interval_s", d.heartbeat_interval_s, positive=True
        ),
        model_dirs=tuple(model_dirs),
        rescan_interval_s=r.number(
            t, path, "rescan_interval_s", d.rescan_interval_s, positive=True
        ),
        memory_budget=budget,
        queue_limit=r.integer(t, path, "queue_limit", d.queue_limit, lo=1, hi=100_000),
        parallel=r.integer(t, path, "parallel", d.parallel, lo=1, hi=1024),
        context_length=r.integer(t, path, "context_length", d.context_length, lo=64, hi=10_000_000),
        threads=threads,
        gpu_layers=gpu_layers,
        load_timeout_s=r.number(t, path, "load_timeout_s", d.load_timeout_s, positive=True),
        llama_cpp=r.boolean(t, path, "llama_cpp", d.llama_cpp),
        runtimes=_read_daemon_runtimes(r, t, path),
    )


def _read_config(r: _Reader, root: Mapping[str, object]) -> Config:
    r.check_keys(root, (), _TOP_LEVEL_KEYS)
    data_dir = r.home / ".qmesh"
    if "data_dir" in root:
        data_dir = r.path(root, (), "data_dir") or data_dir
    return Config(
        data_dir=data_dir,
        log=_read_log(r, root),
        tunnel=_read_tunnel(r, root),
        gate=_read_gate(r, root),
        minigate=_read_minigate(r, root),
        daemon=_read_daemon(r, root),
    )


def _toml_error(exc: tomllib.TOMLDecodeError, text: str, origin: str) -> ConfigError:
    message = str(exc)
    # Python 3.11's tomllib has the position only in the message text.
    match = re.search(r"\(at line (\d+), column \d+\)$", message)
    if match:
        line: int | None = int(match.group(1))
    elif message.endswith("(at end of document)"):
        line = text.count("\n") + (0 if text.endswith("\n") else 1)
    else:
        line = None
    return ConfigError(f"invalid TOML: {message}", origin=origin, line=line)


def load_config(path: Path | None, env: Mapping[str, str] | None = None) -> Config:
    """Read ``path`` (None: defaults only), apply ``QMESH_*`` overrides from
    ``env`` (default :data:`os.environ`), validate, and return the Config.

    ``~`` in paths is the ``HOME`` of ``env`` when it has one. Raises
    :class:`ConfigError`.
    """
    if env is None:
        env = os.environ
    home = Path(env["HOME"]) if env.get("HOME") else Path.home()
    data: dict[str, object] = {}
    lines: dict[KeyPath, int] = {}
    origin: str | None = None
    base_dir = Path.cwd()
    if path is not None:
        origin = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError("no such file", origin=origin) from None
        except UnicodeDecodeError:
            raise ConfigError("not UTF-8 text (TOML files must be UTF-8)", origin=origin) from None
        except OSError as exc:
            raise ConfigError(f"cannot read: {exc.strerror or exc}", origin=origin) from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise _toml_error(exc, text, origin) from None
        lines = _key_lines(text)
        base_dir = path.absolute().parent

    reader = _Reader(origin=origin, base_dir=base_dir, home=home, lines=lines)
    for key_path, var, raw in _env_overrides(env):
        parent: dict[str, object] = data
        for i, part in enumerate(key_path[:-1]):
            if str(part) not in parent:
                # A table that only this variable brought in: its errors are the variable's.
                reader.env_vars.setdefault(key_path[: i + 1], var)
            child = parent.setdefault(str(part), {})
            if not isinstance(child, dict):
                # The file's own value is wrong; report that, not the override.
                raise reader.error(key_path[: i + 1], f"expected a table, got {_describe(child)}")
            parent = child
        parent[str(key_path[-1])] = _parse_env_value(raw)
        reader.env_vars[key_path] = var
        reader.env_raw[key_path] = raw
    return _read_config(reader, data)
