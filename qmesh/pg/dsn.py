"""Parse the DSN an operator hands to ``qmesh secrets set``.

For: the two forms libpq accepts, a ``postgresql://`` (or ``postgres://``)
URI and ``key=value`` pairs, reduced to the parts the vault keeps: host,
port, database, user, password, ``sslmode`` and ``sslrootcert``. Errors
(:class:`~qmesh.pg.errors.DsnError`) name the bad part by its key or its
position and never repeat a value from the DSN, because the text around a
typo is often the password.

Not for: connecting, or every libpq option. Options the vault does not keep
(``connect_timeout``, ``sslcert``, several hosts, ...) are refused by name
rather than dropped, so a stored secret always means what the operator
wrote.

A host that starts with ``/`` is, as for libpq, the directory of the
server's Unix-domain socket (``.s.PGSQL.PORT`` in it): a Gate on the
database's own host reaches it without the TCP stack, as PgBouncer usually
does. libpq uses no TLS on a socket whatever ``sslmode`` says; here an
``sslmode`` or ``channel_binding`` that demands TLS with a socket is
refused, not ignored.

Where libpq would guess, this parser is stricter: a key given twice is an
error (libpq keeps the last), the user and password are required (libpq
falls back to the OS user and ``~/.pgpass`` of whoever runs it, which on a
Gate is the wrong person). It is more lenient in one place: the password in
a URI may contain unencoded ``/``, ``?``, ``#`` and ``@``, because the user
information ends at the *last* ``@``.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import urllib.parse
from pathlib import Path
from typing import Final, TypedDict

from qmesh.fastsocket import UNIX_PATH_MAX
from qmesh.pg.errors import DsnError

__all__ = [
    "DEFAULT_PORT",
    "SSLMODES",
    "DsnFields",
    "is_socket_directory",
    "parse_dsn",
    "unix_socket_path",
]

DEFAULT_PORT: Final = 5432
SSLMODES: Final = ("disable", "prefer", "require", "verify-ca", "verify-full")
DEFAULT_SSLMODE: Final = "prefer"  # libpq's default
CHANNEL_BINDINGS: Final = ("disable", "prefer", "require")
DEFAULT_CHANNEL_BINDING: Final = "prefer"  # libpq's default
_URI_SCHEMES: Final = ("postgresql://", "postgres://")
_SUPPORTED: Final = (
    "host", "port", "dbname", "user", "password", "sslmode", "sslrootcert", "channel_binding",
)  # fmt: skip
# libpq keywords (PostgreSQL 17) the vault does not keep: named in the error
# so the operator knows the key is real and simply unsupported here.
_UNSUPPORTED: Final = frozenset(
    {
        "hostaddr", "passfile", "connect_timeout", "client_encoding",
        "options", "application_name", "fallback_application_name", "keepalives",
        "keepalives_idle", "keepalives_interval", "keepalives_count", "tcp_user_timeout",
        "replication", "gssencmode", "requiressl", "sslcompression", "sslcert", "sslkey",
        "sslpassword", "sslcrl", "sslcrldir", "sslsni", "requirepeer",
        "ssl_min_protocol_version", "ssl_max_protocol_version", "krbsrvname", "gsslib",
        "gssdelegation", "service", "target_session_attrs", "load_balance_hosts",
        "sslnegotiation", "sslcertmode", "require_auth",
    }
)  # fmt: skip
_HOSTNAME_RE: Final = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]{0,252})")
_PORT_RE: Final = re.compile(r"[0-9]{1,5}")
_KEY_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PERCENT_RE: Final = re.compile(r"%(?![0-9A-Fa-f]{2})")


class DsnFields(TypedDict):
    """What a DSN reduces to; the keyword arguments of ``DatabaseSecret`` less the alias."""

    host: str
    port: int
    dbname: str
    user: str
    password: str
    sslmode: str
    sslrootcert: str | None
    channel_binding: str


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _unknown_key(key: str, where: str) -> DsnError:
    """The error for a key that is not one of ours.

    A libpq keyword or a near miss of one of ours (``pasword``) is shown: it
    is a key name. Anything else is described only by position, because an
    unquoted password with a space in it (``password=abc def=x``) turns the
    rest of the password into a "key".
    """
    if key in _UNSUPPORTED:
        return DsnError(
            f"{where}: {key!r} is a libpq option the vault does not keep; remove it "
            f"(the vault keeps {', '.join(_SUPPORTED)})"
        )
    close = difflib.get_close_matches(key.lower(), _SUPPORTED, n=1, cutoff=0.75)
    if close and _KEY_RE.fullmatch(key):
        return DsnError(f"{where}: unknown key {key!r}; did you mean {close[0]!r}?")
    return DsnError(
        f"{where}: unknown key (not shown, in case it is part of a password; quote values "
        f"that contain spaces, 'like this'); expected one of {', '.join(_SUPPORTED)}"
    )


def _add(fields: dict[str, str], key: str, value: str, where: str) -> None:
    if key not in _SUPPORTED:
        raise _unknown_key(key, where)
    if key in fields:
        raise DsnError(f"{where}: {key} is given twice")
    fields[key] = value


# -- key=value ---------------------------------------------------------------------------


def _parse_pairs(text: str) -> dict[str, str]:
    """libpq's ``key=value`` grammar: spaces around ``=`` allowed; a value is a
    single-quoted string or runs to the next space; ``\\`` escapes the next
    character either way."""
    fields: dict[str, str] = {}
    pos, n, index = 0, len(text), 0
    while True:
        while pos < n and text[pos].isspace():
            pos += 1
        if pos >= n:
            return fields
        index += 1
        where = f"the {_ordinal(index)} key=value pair"
        start = pos
        while pos < n and text[pos] != "=" and not text[pos].isspace():
            pos += 1
        key = text[start:pos]
        while pos < n and text[pos].isspace():
            pos += 1
        if pos >= n or text[pos] != "=":
            raise DsnError(
                f"{where}: expected key=value, found a word without '=' (not shown); "
                "quote values that contain spaces, 'like this'"
            )
        if not key:
            raise DsnError(f"{where}: '=' without a key before it")
        pos += 1
        while pos < n and text[pos].isspace():
            pos += 1
        value: list[str] = []
        if pos < n and text[pos] == "'":
            pos += 1
            while True:
                if pos >= n:
                    raise DsnError(f"{where} ({_shown(key)}): the quoted value has no closing '")
                ch = text[pos]
                if ch == "\\" and pos + 1 < n:
                    value.append(text[pos + 1])
                    pos += 2
                elif ch == "'":
                    pos += 1
                    break
                else:
                    value.append(ch)
                    pos += 1
            if pos < n and not text[pos].isspace():
                raise DsnError(f"{where} ({_shown(key)}): expected a space after the closing '")
        else:
            while pos < n and not text[pos].isspace():
                if text[pos] == "\\" and pos + 1 < n:
                    pos += 1
                value.append(text[pos])
                pos += 1
        _add(fields, key, "".join(value), where)


def _shown(key: str) -> str:
    """A key for an error message, if it is safe to show (see :func:`_unknown_key`)."""
    return key if key in _SUPPORTED or key in _UNSUPPORTED else "its key"


# -- URI ---------------------------------------------------------------------------------


def _decode(part: str, what: str) -> str:
    if _PERCENT_RE.search(part):
        raise DsnError(f"{what}: '%' must be followed by two hex digits (percent-encoding)")
    try:
        return urllib.parse.unquote_to_bytes(part).decode("utf-8")
    except UnicodeDecodeError:
        raise DsnError(f"{what}: percent-encoded bytes are not UTF-8") from None


def _parse_uri(text: str, scheme: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    rest = text[len(scheme) :]
    # The user information ends at the last '@': a password may then contain
    # '@', '/', '?' or '#' unencoded (libpq would need them percent-encoded).
    at = rest.rfind("@")
    if at >= 0:
        userinfo, rest = rest[:at], rest[at + 1 :]
        user, sep, password = userinfo.partition(":")
        if user:
            _add(fields, "user", _decode(user, "user"), "the URI")
        if sep:
            _add(fields, "password", _decode(password, "password"), "the URI")
    if "#" in rest:
        raise DsnError("the URI: a '#fragment' after the host has no meaning in a DSN")
    rest, _, query = rest.partition("?")
    hostport, slash, path = rest.partition("/")
    if slash and path:
        _add(fields, "dbname", _decode(path, "dbname (the URI path)"), "the URI")
    if "," in hostport:
        raise DsnError("host: several hosts are not supported; give one host")
    if hostport.startswith("["):
        end = hostport.find("]")
        if end < 0:
            raise DsnError("host: missing ']' after an IPv6 address")
        host, after = hostport[1:end], hostport[end + 1 :]
        if after and not after.startswith(":"):
            raise DsnError("host: expected ':port' after ']'")
        port = after[1:] if after else ""
        if not host:
            raise DsnError("host: empty IPv6 address in brackets")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise DsnError("host: only IPv6 addresses go inside [brackets]") from None
        fields["host"] = host
        if after:
            fields["port"] = port
    else:
        host, sep, port = hostport.partition(":")
        if host:
            fields["host"] = _decode(host, "host")
        if sep:
            fields["port"] = port
    if query:
        for i, item in enumerate(query.split("&"), start=1):
            where = f"URI query parameter {i}"
            key, sep, value = item.partition("=")
            if not sep:
                raise DsnError(f"{where}: expected key=value (not shown)")
            _add(fields, _decode(key, where), _decode(value, f"{where} ({_shown(key)})"), where)
    return fields


# -- checking ----------------------------------------------------------------------------


def _check_host(host: str) -> str:
    if "," in host:
        raise DsnError("host: several hosts are not supported; give one host")
    if is_socket_directory(host):
        return host
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _HOSTNAME_RE.fullmatch(host):
            raise DsnError("host: expected a host name or an IP address") from None
    return host


def _check_port(text: str) -> int:
    if not _PORT_RE.fullmatch(text) or not 1 <= int(text) <= 65535:
        raise DsnError("port: expected a number from 1 to 65535")
    return int(text)


def unix_socket_path(directory: str | Path, port: int) -> Path:
    """The socket file of a server listening on ``port`` in ``directory``:
    ``.s.PGSQL.PORT``, the name libpq and every driver look for."""
    return Path(directory) / f".s.PGSQL.{port}"


def is_socket_directory(host: str) -> bool:
    """Whether a DSN's ``host`` names a Unix-domain socket's directory
    (libpq: it starts with ``/``) rather than a TCP host."""
    return host.startswith("/")


def parse_dsn(text: str) -> DsnFields:
    """Parse a DSN in either form; raise :class:`DsnError` naming the bad part.

    Leading and trailing white space is ignored (a file or a pipe usually
    ends with a newline). A relative ``sslrootcert`` is made absolute from
    the current directory, so the stored secret does not depend on where the
    Gate is started.
    """
    text = text.strip()
    if not text:
        raise DsnError("the DSN is empty")
    scheme = next((s for s in _URI_SCHEMES if text.lower().startswith(s)), None)
    if scheme is not None:
        fields = _parse_uri(text, scheme)
    elif "://" in text.split("=", 1)[0]:
        raise DsnError("the URI scheme must be postgresql:// or postgres://")
    else:
        fields = _parse_pairs(text)
    if not fields.get("host"):
        raise DsnError("host is missing")
    if not fields.get("user"):
        raise DsnError("user is missing")
    if "password" not in fields:
        raise DsnError("password is missing")
    if not fields["password"]:
        raise DsnError("password is empty")
    sslmode = fields.get("sslmode", DEFAULT_SSLMODE)
    if sslmode not in SSLMODES:
        raise DsnError(f"sslmode: expected one of {', '.join(SSLMODES)}")
    channel_binding = fields.get("channel_binding", DEFAULT_CHANNEL_BINDING)
    if channel_binding not in CHANNEL_BINDINGS:
        raise DsnError(f"channel_binding: expected one of {', '.join(CHANNEL_BINDINGS)}")
    if channel_binding == "require" and sslmode == "disable":
        raise DsnError("channel_binding=require needs TLS: sslmode=disable cannot give it")
    if is_socket_directory(fields["host"]):
        if sslmode not in ("disable", "prefer"):
            raise DsnError(
                f"sslmode={sslmode}: no TLS is used on a Unix-domain socket (the host is a "
                "directory); give sslmode=disable or prefer, or a TCP host"
            )
        if channel_binding == "require":
            raise DsnError(
                "channel_binding=require needs TLS, which a Unix-domain socket (the host is a "
                "directory) does not use"
            )
    sslrootcert: str | None = None
    if fields.get("sslrootcert"):
        sslrootcert = str(Path(fields["sslrootcert"]).expanduser().absolute())
    dbname = fields.get("dbname") or fields["user"]
    if "\x00" in "".join(fields.values()):
        raise DsnError("the DSN contains a NUL character")
    host = _check_host(fields["host"])
    port = _check_port(fields["port"]) if "port" in fields else DEFAULT_PORT
    socket_path = unix_socket_path(host, port) if is_socket_directory(host) else None
    if socket_path is not None and len(os.fsencode(socket_path)) > UNIX_PATH_MAX:
        raise DsnError(
            f"host: the socket's path (the directory and .s.PGSQL.{port}) is longer than "
            f"{UNIX_PATH_MAX} bytes, the most a Unix-domain socket's can be"
        )
    return DsnFields(
        host=host,
        port=port,
        dbname=dbname,
        user=fields["user"],
        password=fields["password"],
        sslmode=sslmode,
        sslrootcert=sslrootcert,
        channel_binding=channel_binding,
    )
