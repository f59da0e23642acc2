"""The MiniGate's Postgres listener (default ``127.0.0.1:11438``, and the
Unix-domain socket ``.s.PGSQL.PORT`` in ``minigate.pg_unix_socket_dir`` when
that is set): the near end of the ghost wire.

For: the startup phase of each client connection, which has to be answered
locally because it happens before any message is typed: SSLRequest (TLS
with ``minigate.pg_tls_cert``/``pg_tls_key`` when configured, else ``N``;
rustls in the Rust core, and the relay engine carries the TLS session on),
GSSENCRequest (``N``, then the client's next packet), direct TLS (a TLS
ClientHello first, PostgreSQL 17's ``sslnegotiation=direct``, ALPN
``postgresql``), CancelRequest (a ``pg-cancel`` tunnel stream to the Gate)
and the StartupMessage, whose parameters open a ``pg`` tunnel stream. From
then on the listener only relays bytes: authentication (SCRAM-SHA-256 with
the app id and app key), policy and the real login all happen at the Gate,
so this edge never holds a verifier, a policy or a real credential.

When the session with the Gate is lost (its Gate died and no other could
take the session over), a client gets what PostgreSQL itself sends when it
shuts down: a FATAL ErrorResponse, SQLSTATE 08006, then the end of the
connection. The relay engine writes it (``TapSpec(farewell=...)``), and only
where a message may begin: it follows the framing of what it wrote to the
client, and a client left inside a cut message just sees the connection end.

Not for: reading the messages after the startup (the Gate does, with the
same Rust parser), or connecting anywhere but the Gate.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Final

import trio

from qmesh import _core
from qmesh.boundary import guarded
from qmesh.config import parse_hostport
from qmesh.fastsocket import FastSocketStream, open_listeners, serve_listeners, unix_listener
from qmesh.pg.dsn import unix_socket_path
from qmesh.pg.server_tls import ALPN
from qmesh.tls import TlsStream
from qmesh.tunnel.client import TunnelClient
from qmesh.tunnel.errors import TunnelError
from qmesh.tunnel.frames import ResetCode
from qmesh.tunnel.stream import TunnelStream

__all__ = ["serve_pg", "tls_config"]

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S: Final = 30.0
"""A client must finish its startup packets within this (PostgreSQL: authentication_timeout)."""
CANCEL_TIMEOUT_S: Final = 10.0
_TLS_RECORD_HANDSHAKE: Final = 0x16


class StartupRefused(Exception):
    """The client's startup packets are unacceptable; ``sqlstate`` and
    ``message`` go back to it in a FATAL ErrorResponse."""

    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message


def tls_config(cert: Path, key: Path) -> _core.TlsServerConfig:
    """The TLS server configuration for ``pg_listen`` (TLS 1.2 and 1.3;
    ALPN ``postgresql``). Raises OSError (``_core.TlsError`` is one) when the
    files cannot be used (checked at start-up)."""
    return _core.TlsServerConfig(cert.read_bytes(), key.read_bytes(), alpn=[ALPN])


async def _read_packet(stream: trio.abc.Stream, buffer: bytearray) -> _core.PgStartup:
    """The next startup packet; what follows it stays in ``buffer``."""
    while True:
        packet = _core.parse_startup(buffer)
        if packet is not None:
            del buffer[: packet.length]
            return packet
        data = await stream.receive_some(_core.PG_MAX_STARTUP_PACKET)
        if not data:
            raise EOFError("the client closed the connection during the startup")
        buffer += data


def _fatal(sqlstate: str, message: str) -> bytes:
    return _core.encode_error_response(
        [("S", "FATAL"), ("V", "FATAL"), ("C", sqlstate), ("M", message)]
    )


_GATE_LOST: Final = _fatal("08006", "qmesh: the connection to the gate was lost; connect again")


class _ServerToClient:
    """The engine writes the lost-Gate error between two server messages
    if the session is lost, and reports nothing."""

    spec: Final = _core.TapSpec(farewell=_GATE_LOST)

    def on_records(self, records: list[_core.TapRecord]) -> bytes | None:
        return None


async def serve_pg(
    client: TunnelClient,
    listen: str,
    *,
    tls: _core.TlsServerConfig | None = None,
    unix_socket_dir: Path | None = None,
    unix_socket_mode: int = 0o777,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on ``listen`` ("host:port") and carry each Postgres client
    connection to the Gate. ``task_status.started`` gets the bound port.

    With ``unix_socket_dir``, also on the Unix-domain socket
    ``.s.PGSQL.PORT`` there (PORT: the bound port), with permissions
    ``unix_socket_mode``, as PostgreSQL and PgBouncer do: a client on the
    same host connects with ``host=DIR port=PORT`` and skips the TCP stack
    both ways, which at thousands of short statements a second is a
    large share of what a round trip costs. Its sessions are served
    exactly as the TCP port's."""
    host, port = parse_hostport(listen)
    listeners = await open_listeners(host, port, purpose="the MiniGate's Postgres")
    bound: int = listeners[0].socket.getsockname()[1]
    log.info("postgres listener on %s:%d%s", host, bound, " (TLS available)" if tls else "")

    async def handle(local: trio.SocketStream) -> None:
        try:
            await _handle(client, local, tls)
        finally:
            await trio.aclose_forcefully(local)

    with contextlib.ExitStack() as unix:
        if unix_socket_dir is not None:
            path = unix_socket_path(unix_socket_dir, bound)
            listeners.append(
                unix.enter_context(
                    unix_listener(path, mode=unix_socket_mode, purpose="the MiniGate's Postgres")
                )
            )
            log.info("postgres listener on %s", path)
        task_status.started(bound)
        await serve_listeners(
            guarded(handle, "Postgres client connection", log),
            listeners,
            what="postgres listener",
        )


async def _handle(
    client: TunnelClient, local: trio.SocketStream, tls: _core.TlsServerConfig | None
) -> None:
    stream: trio.abc.Stream = local
    buffer = bytearray()
    encrypted = False
    try:
        with trio.fail_after(STARTUP_TIMEOUT_S):
            first = await local.receive_some(_core.PG_MAX_STARTUP_PACKET)
            if not first:
                return
            buffer += first
            if buffer[0] == _TLS_RECORD_HANDSHAKE:
                if tls is None:
                    return  # a TLS ClientHello where no TLS is configured: just hang up
                stream = await _start_tls(local, tls, direct=True, prefix=bytes(buffer))
                buffer.clear()
                encrypted = True
            while True:
                packet = await _read_packet(stream, buffer)
                if packet.kind == "startup":
                    break
                if packet.kind == "cancel":
                    await _cancel(client, packet)
                    return
                if buffer:
                    # Bytes pipelined behind SSLRequest/GSSENCRequest would
                    # have been sent in clear before the answer: refuse them
                    # (the injection PostgreSQL fixed as CVE-2021-23214).
                    raise StartupRefused("08P01", "unexpected data after an encryption request")
                if packet.kind == "ssl" and tls is not None and not encrypted:
                    await stream.send_all(b"S")
                    stream = await _start_tls(local, tls, direct=False)
                    encrypted = True
                elif packet.kind in ("ssl", "gssenc") and not encrypted:
                    await stream.send_all(b"N")
                else:
                    raise StartupRefused("08P01", "an encryption request inside TLS")
    except StartupRefused as exc:
        log.info("refused a postgres client: %s", exc.message)
        await _send_quietly(stream, _fatal(exc.sqlstate, exc.message))
        return
    except _core.PgWireError as exc:
        log.info("refused a postgres client's startup packet: %s", exc)
        await _send_quietly(stream, _fatal("08P01", f"invalid startup packet: {exc}"))
        return
    except (trio.TooSlowError, EOFError) as exc:
        log.debug("postgres client gave up during the startup: %s", exc or "timeout")
        return
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        log.debug("postgres client connection failed during the startup: %s", exc)
        return
    params = packet.params
    names = dict(params)
    if not names.get("user"):
        await _send_quietly(
            stream, _fatal("28000", "no PostgreSQL user name specified in startup packet")
        )
        return
    request = {
        "service": "pg",
        "version": packet.version,
        "params": [list(p) for p in params],
        "tls": encrypted,
    }
    try:
        # Before the first session with the Gate exists, open_stream waits
        # for it; a client should get an error, not a hang.
        with trio.fail_after(STARTUP_TIMEOUT_S):
            tunnel = await client.open_stream(request)
    except trio.TooSlowError:
        await _send_quietly(stream, _fatal("08006", "qmesh: the gate is not reachable"))
        return
    except ValueError:
        await _send_quietly(stream, _fatal("08P01", "startup packet too large to forward"))
        return
    except TunnelError as exc:
        log.warning("cannot open a pg stream to the gate: %s", exc)
        await _send_quietly(stream, _fatal("08006", "qmesh: the gate is not reachable"))
        return
    log.debug("pg session for app %r, database %r", names["user"], names.get("database"))
    if buffer:
        await tunnel.send_all(bytes(buffer))
    await _relay(stream, tunnel)


async def _relay(stream: trio.abc.Stream, tunnel: TunnelStream) -> None:
    """Relay the session both ways in the engine (TLS included) until it
    ends; a lost Gate session ends with the FATAL 08006 that the module
    docstring describes."""
    try:
        if isinstance(stream, TlsStream):
            # What the client sent behind its startup packet, decrypted
            # already, goes first.
            if pipelined := stream.take_buffered():
                await tunnel.send_all(pipelined)
            outcome = await tunnel.relay_native(
                stream.transport, tap=_ServerToClient(), tls=stream.tls
            )
        else:
            assert isinstance(stream, trio.SocketStream | FastSocketStream)
            outcome = await tunnel.relay_native(stream, tap=_ServerToClient())
        failure = tunnel.failure
        if failure is not None and failure.code == ResetCode.SESSION_LOST:
            log.info("a postgres session ended with the gate session: %s", failure.reason)
        elif outcome.failed:
            log.debug("postgres relay ended: %s %s", outcome.ending, outcome.detail)
    finally:
        await trio.aclose_forcefully(stream)
        await trio.aclose_forcefully(tunnel)


async def _start_tls(
    local: trio.SocketStream, config: _core.TlsServerConfig, *, direct: bool, prefix: bytes = b""
) -> TlsStream:
    """The TLS handshake with the client; ``prefix``: what was already read
    of it (direct TLS). Raises OSError (``_core.TlsError`` is one) or
    ``trio.BrokenResourceError`` when it fails."""
    stream = TlsStream(local, _core.TlsSession.server(config))
    stream.feed(prefix)
    await stream.handshake()
    if direct and stream.tls.alpn_protocol != ALPN:
        # PostgreSQL requires the ALPN for direct TLS, so a TLS client of
        # another protocol cannot be confused for a Postgres one.
        raise StartupRefused("08P01", "direct TLS without the 'postgresql' ALPN protocol")
    return stream


async def _cancel(client: TunnelClient, packet: _core.PgStartup) -> None:
    """Carry a CancelRequest to the Gate and wait until it has acted on it
    (libpq waits for the server to close the connection)."""
    try:
        with trio.move_on_after(CANCEL_TIMEOUT_S):
            tunnel = await client.open_stream(
                {"service": "pg-cancel", "pid": packet.pid, "secret": packet.secret.hex()}
            )
            try:
                await tunnel.send_eof()
                while await tunnel.receive_some():
                    pass
            finally:
                await tunnel.aclose()
    except (TunnelError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        log.info("cancel request not delivered: %s", exc)


async def _send_quietly(stream: trio.abc.Stream, data: bytes) -> None:
    with trio.move_on_after(5):
        try:
            await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
