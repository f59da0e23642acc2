"""The Gate's login to the real PostgreSQL server, and the errors that end a session.

For: connecting to the server of a vault alias, TLS as its sslmode says
(libpq's meanings), the startup parameters that carry the app's policy, and
answering the server's authentication (SCRAM-SHA-256 with or without channel
binding, MD5, and a cleartext password over TLS only). Also the error family
of a Postgres session at the Gate (:class:`PgSessionError`), which every
module of the session raises and which becomes the client's ErrorResponse.

Not for: the app's own login (:mod:`qmesh.pg.service`), the relay after
login (:mod:`qmesh.pg.relay`).

Secrets: the real password reaches only the SCRAM/MD5 computations and the
cleartext answer over TLS; a server error text is scrubbed of it before it
is passed on.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Sequence
from typing import Final

import attrs
import trio

from qmesh import _core
from qmesh.fastsocket import connect_tcp
from qmesh.pg.dsn import is_socket_directory, unix_socket_path
from qmesh.pg.policy import AppPolicy
from qmesh.pg.scram import (
    MECHANISM,
    MECHANISM_PLUS,
    ScramClient,
    ScramError,
    md5_password,
    tls_server_end_point,
)
from qmesh.pg.server_tls import start_tls
from qmesh.pg.vault import DatabaseSecret
from qmesh.tls import TlsStream

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S: Final = 10.0
AUTH_MAX_MESSAGE: Final = 64 * 1024
"""Cap on a message during login (SASL, ParameterStatus, errors)."""
RECEIVE_SIZE: Final = 64 * 1024

# Authentication request codes.
AUTH_OK: Final = 0
AUTH_CLEARTEXT: Final = 3
AUTH_MD5: Final = 5
AUTH_SASL: Final = 10
AUTH_SASL_CONTINUE: Final = 11
AUTH_SASL_FINAL: Final = 12

_R, _K, _Z, _N, _V = (ord(c) for c in "RKZNv")
_ERROR = ord("E")
_PSTATUS = ord("S")
_AUTH_RESPONSE = ord("p")


class PgSessionError(Exception):
    """Ends one Postgres session: the client gets an ErrorResponse with
    ``sqlstate`` and ``message`` (which never contain a secret), then the
    stream closes. Raised for the client's own faults (bad key, alias not
    allowed, protocol violations)."""

    def __init__(self, sqlstate: str, message: str, *, severity: str = "FATAL") -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message
        self.severity = severity


class UpstreamFailed(PgSessionError):
    """The real server could not be reached, refused TLS, refused the Gate's
    credentials or broke the protocol. The message names the alias, never
    the server's address or the credentials."""


class UpstreamAuthRejected(Exception):
    """The real server answered 28P01 to the Gate's login (internal: retried)."""


class ClientGone(Exception):
    """The client closed the stream during the login (e.g. psql going back
    to ask its user for a password): not an error worth a warning."""


class MessageReader:
    """Whole messages from a stream, for the login phases; remembers the
    bytes after the last message it returned (see :meth:`leftover`)."""

    def __init__(self, stream: trio.abc.ReceiveStream, *, frontend: bool, what: str) -> None:
        tags = _core.PG_FRONTEND_TAGS if frontend else _core.PG_BACKEND_TAGS
        self._scanner = _core.PgScanner(frontend=frontend, full=tags, max_message=AUTH_MAX_MESSAGE)
        self._stream = stream
        self._what = what
        self._pending = bytearray()
        self._ready: deque[tuple[int, bytes]] = deque()

    async def next(self) -> tuple[int, bytes]:
        while not self._ready:
            data = await self._stream.receive_some(RECEIVE_SIZE)
            if not data:
                raise ClientGone(f"{self._what} closed the connection")
            self._pending += data
            self._ready.extend(self._scanner.feed(data))
        tag, raw = self._ready.popleft()
        del self._pending[: len(raw)]
        return tag, raw

    def leftover(self) -> bytes:
        """Bytes received after the last message :meth:`next` returned."""
        return bytes(self._pending)


def error_response(exc: PgSessionError) -> bytes:
    return _core.encode_error_response(
        [("S", exc.severity), ("V", exc.severity), ("C", exc.sqlstate), ("M", exc.message)]
    )


def upstream_params(
    secret: DatabaseSecret, client: Sequence[tuple[str, str]], policy: AppPolicy
) -> list[tuple[str, str]]:
    """The startup parameters for the real server: the vault's user and
    database, the client's other settings, then qmesh's limits. Direct
    parameters are applied after ``options``, and the last of a name wins,
    so a client's ``options=-c default_transaction_read_only=off`` cannot
    undo them."""
    dropped = {"user", "database", "replication"}
    if policy.read_only:
        dropped |= {"default_transaction_read_only", "transaction_read_only"}
    if policy.statement_timeout_ms is not None:
        dropped.add("statement_timeout")
    out = [("user", secret.user), ("database", secret.dbname)]
    out += [(n, v) for n, v in client if n not in dropped and not n.startswith("_pq_.")]
    if policy.read_only:
        out.append(("default_transaction_read_only", "on"))
    if policy.statement_timeout_ms is not None:
        out.append(("statement_timeout", str(policy.statement_timeout_ms)))
    return out


def _scrub(text: str, secret: DatabaseSecret) -> str:
    if secret.password:
        text = text.replace(secret.password, "[REDACTED]")
    return text


async def connect_server(host: str, port: int) -> trio.SocketStream:
    """A connection to the server at ``host`` (a TCP host, or the directory
    of its Unix-domain socket) and ``port``. Raises OSError."""
    if is_socket_directory(host):
        return await trio.open_unix_socket(os.fsencode(unix_socket_path(host, port)))
    return await connect_tcp(host, port)


def asks_for_tls(sslmode: str, host: str) -> bool:
    """Whether a connection to ``host`` asks the server for TLS (SSLRequest):
    unless ``sslmode`` is ``disable``, and never on a Unix-domain socket
    (as libpq)."""
    return sslmode != "disable" and not is_socket_directory(host)


async def negotiate_tls(
    tcp: trio.SocketStream, sslmode: str, sslrootcert: str | None, host: str, alias: str
) -> trio.abc.Stream:
    """SSLRequest, then TLS if the server says 'S' (in the Rust core, see
    :mod:`qmesh.pg.server_tls`). Returns the stream to use."""
    await tcp.send_all(_core.PG_SSL_REQUEST)
    # Exactly one byte: anything the server sends after 'S' before the TLS
    # handshake would be unauthenticated (CVE-2021-23222), so it is never read here.
    answer = await tcp.receive_some(1)
    if answer == b"S":
        try:
            return await start_tls(tcp, sslmode, sslrootcert, host)
        except (OSError, trio.BrokenResourceError) as exc:  # _core.TlsError is an OSError
            log.warning("TLS to the server of alias %r failed: %s", alias, exc)
            raise UpstreamFailed(
                "08001", f"qmesh: TLS to the server of database alias {alias!r} failed"
            ) from None
    if answer == b"N" and sslmode in ("disable", "prefer"):
        return tcp
    if answer == b"N":
        raise UpstreamFailed(
            "08001",
            f"qmesh: the server of database alias {alias!r} does not accept TLS, "
            f"which its sslmode ({sslmode}) requires",
        )
    raise UpstreamFailed(
        "08001", f"qmesh: the server of database alias {alias!r} answered SSLRequest oddly"
    )


@attrs.define
class Upstream:
    stream: trio.abc.Stream
    statuses: list[bytes]
    notices: list[bytes]
    ready: bytes
    key: tuple[int, bytes] | None
    leftover: bytes


async def open_upstream(
    secret: DatabaseSecret, params: list[tuple[str, str]], alias: str
) -> Upstream:
    """Connect and log in to the real server; raise UpstreamFailed or
    UpstreamAuthRejected (28P01)."""
    try:
        with trio.fail_after(CONNECT_TIMEOUT_S):
            tcp = await connect_server(secret.host, secret.port)
    except (OSError, trio.TooSlowError) as exc:
        log.warning("cannot connect to the server of alias %r: %s", alias, exc or "timeout")
        raise UpstreamFailed(
            "08001", f"qmesh: the gate cannot reach the server of database alias {alias!r}"
        ) from None
    stream: trio.abc.Stream = tcp
    try:
        if asks_for_tls(secret.sslmode, secret.host):
            stream = await negotiate_tls(
                tcp, secret.sslmode, secret.sslrootcert, secret.host, alias
            )
        tls = isinstance(stream, TlsStream)
        binding = _channel_binding(stream) if isinstance(stream, TlsStream) else None
        await stream.send_all(_core.encode_startup(params))
        reader = MessageReader(stream, frontend=False, what="the database server")
        scram: ScramClient | None = None
        scram_done = authenticated = False
        statuses: list[bytes] = []
        notices: list[bytes] = []
        key: tuple[int, bytes] | None = None
        while True:
            tag, raw = await reader.next()
            body = raw[5:]
            if tag == _R:
                code, data = _core.parse_authentication(body)
                if code == AUTH_OK:
                    if scram is not None and not scram_done:
                        raise UpstreamFailed(
                            "08001",
                            f"qmesh: the server of database alias {alias!r} skipped the end "
                            "of SCRAM authentication",
                        )
                    if secret.channel_binding == "require" and not (scram and scram.bound):
                        raise UpstreamFailed(
                            "08001",
                            f"qmesh: database alias {alias!r} requires channel binding, but the "
                            "server let the gate in without it",
                        )
                    authenticated = True
                    continue
                answer = _answer_auth(code, data, body, secret, binding, tls, alias, scram)
                if code == AUTH_SASL:
                    scram = answer[1]
                elif code == AUTH_SASL_FINAL:
                    scram_done = True
                if answer[0]:
                    await stream.send_all(answer[0])
            elif tag == _ERROR:
                fields = _core.parse_error_fields(body)
                sqlstate = fields.get("C", "08001")
                if sqlstate == "28P01":
                    raise UpstreamAuthRejected()
                message = _scrub(fields.get("M", ""), secret)
                log.warning(
                    "the server of alias %r refused the login: %s %s", alias, sqlstate, message
                )
                raise UpstreamFailed(
                    sqlstate, f"qmesh: database alias {alias!r}: the server said: {message}"
                )
            elif tag == _PSTATUS:
                statuses.append(raw)
            elif tag == _K:
                key = _core.parse_backend_key_data(body)
            elif tag == _N:
                notices.append(raw)
            elif tag == _Z:
                if not authenticated:
                    raise UpstreamFailed(
                        "08001", f"qmesh: the server of database alias {alias!r} broke the protocol"
                    )
                return Upstream(stream, statuses, notices, raw, key, reader.leftover())
            elif tag == _V:
                continue  # NegotiateProtocolVersion: we asked for plain 3.0
            else:
                raise UpstreamFailed(
                    "08001", f"qmesh: the server of database alias {alias!r} broke the protocol"
                )
    except ClientGone:
        await trio.aclose_forcefully(stream)
        raise UpstreamFailed(
            "08001", f"qmesh: the server of database alias {alias!r} closed the connection"
        ) from None
    except _core.PgWireError as exc:
        await trio.aclose_forcefully(stream)
        log.warning("protocol error from the server of alias %r: %s", alias, exc)
        raise UpstreamFailed(
            "08001", f"qmesh: the server of database alias {alias!r} broke the protocol"
        ) from None
    except ScramError as exc:
        await trio.aclose_forcefully(stream)
        log.warning("SCRAM with the server of alias %r failed: %s", alias, exc)
        raise UpstreamFailed(
            "08001", f"qmesh: SCRAM authentication with the server of alias {alias!r} failed"
        ) from None
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        await trio.aclose_forcefully(stream)
        log.warning("connection to the server of alias %r failed: %s", alias, exc)
        raise UpstreamFailed(
            "08001", f"qmesh: the connection to the server of database alias {alias!r} failed"
        ) from None
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise


def _channel_binding(stream: TlsStream) -> bytes | None:
    """The TLS connection's ``tls-server-end-point`` data; None when the
    server's certificate cannot give it."""
    certificate = stream.tls.peer_certificate
    if not certificate:
        return None
    try:
        return tls_server_end_point(certificate)
    except ValueError:
        return None


def _answer_auth(
    code: int,
    data: bytes,
    body: bytes,
    secret: DatabaseSecret,
    binding: bytes | None,
    tls: bool,
    alias: str,
    scram: ScramClient | None,
) -> tuple[bytes, ScramClient | None]:
    """The Gate's answer to one authentication request of the real server.

    ``binding``: the TLS channel's binding data, when there is one.
    """
    require_binding = secret.channel_binding == "require"
    if code == AUTH_SASL:
        mechanisms = _core.parse_sasl_mechanisms(body)
        use_binding = secret.channel_binding != "disable" and binding is not None
        if use_binding and MECHANISM_PLUS in mechanisms:
            client = ScramClient(secret.password, channel_binding=binding)
        elif require_binding:
            raise UpstreamFailed(
                "08001",
                f"qmesh: database alias {alias!r} requires channel binding, which the server "
                "does not offer over this connection",
            )
        elif MECHANISM in mechanisms:
            # "y": we could bind, the server did not offer it (a server that
            # did would see the downgrade); "n": there is no channel.
            client = ScramClient(secret.password, binding_supported=use_binding)
        else:
            raise UpstreamFailed(
                "08001", f"qmesh: the server of alias {alias!r} offers no SCRAM-SHA-256"
            )
        initial = _core.encode_sasl_initial_response(client.mechanism, client.client_first())
        return initial, client
    if require_binding and code in (AUTH_MD5, AUTH_CLEARTEXT):
        raise UpstreamFailed(
            "08001",
            f"qmesh: database alias {alias!r} requires channel binding, but the server asks "
            "for a password without SCRAM",
        )
    if code == AUTH_SASL_CONTINUE and scram is not None:
        return _core.encode_message(_AUTH_RESPONSE, scram.client_final(data)), scram
    if code == AUTH_SASL_FINAL and scram is not None:
        scram.verify_server_final(data)
        return b"", scram
    if code == AUTH_MD5 and len(data) == 4:
        answer = md5_password(secret.user, secret.password, data)
        return _core.encode_message(_AUTH_RESPONSE, answer + b"\0"), None
    if code == AUTH_CLEARTEXT:
        if not tls:
            raise UpstreamFailed(
                "08001",
                f"qmesh: the server of alias {alias!r} asks for a cleartext password over an "
                "unencrypted connection; the gate does not send it (use TLS or SCRAM)",
            )
        password = secret.password.encode("utf-8") + b"\0"
        return _core.encode_message(_AUTH_RESPONSE, password), None
    raise UpstreamFailed(
        "08001", f"qmesh: the server of alias {alias!r} asks for an authentication qmesh lacks"
    )
