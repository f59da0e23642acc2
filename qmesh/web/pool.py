"""An HTTP/1.1 client on h11 and Trio with pooled keep-alive connections.

For: the Gate's calls to upstream OpenAI-compatible and Anthropic-style
providers, where every request pays for a connection unless it is reused:
one pool per (scheme, host, port), idle connections reused (most recent
first), responses read whole (:meth:`HttpPool.request`) or as a byte
stream (:meth:`HttpPool.stream`, for SSE relayed as it comes). Bodies are
bytes in and bytes out: it never parses JSON, so a body the Gate only
forwards is never decoded.

Errors are :class:`PoolError` subclasses that say whether the request may
have reached the server (:attr:`PoolError.sent`): a connection that fails
before the request was written can be retried anywhere; a pooled
connection that the server closed while it sat idle is retried once,
transparently, on a fresh connection (nothing came back on it, so the
server never processed the request).

Not for: redirects, cookies or HTTP/2; nor talking to a daemon's local
model server (:mod:`qmesh.daemon.runtimes.http`, one connection per
request, is simpler where a connect costs nothing next to a generation).
"""

from __future__ import annotations

import logging
import ssl
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Final
from urllib.parse import urlsplit

import attrs
import h11
import trio

from qmesh import _core
from qmesh.fastsocket import FastSocketStream, connect_tcp

__all__ = [
    "ConnectFailed",
    "ConnectionBroken",
    "HttpPool",
    "PoolError",
    "ResponseTimeout",
    "StreamedResponse",
    "Upstream",
    "parse_url",
    "system_trust",
]

log = logging.getLogger(__name__)

RECEIVE_SIZE: Final = 65536
MAX_RESPONSE: Final = 64 * 1024 * 1024
MAX_IDLE_PER_HOST: Final = 64
IDLE_EXPIRY_S: Final = 30.0
"""Idle connections older than this are dropped, not reused: servers close
idle keep-alive connections after 5-75 s, and a reuse racing that close
costs a retry."""


class PoolError(Exception):
    """An upstream request failed. ``sent`` is False when the server cannot
    have started processing it (safe to send elsewhere)."""

    sent = True


class ConnectFailed(PoolError):
    """No connection could be made (refused, unreachable, timed out, TLS)."""

    sent = False


class ConnectionBroken(PoolError):
    """The connection failed or closed while sending, or before the response
    was complete. ``responded`` says whether a response head had arrived."""

    def __init__(self, message: str, *, responded: bool = False) -> None:
        super().__init__(message)
        self.responded = responded


class ResponseTimeout(PoolError):
    """The server did not answer in time."""


@attrs.frozen
class Upstream:
    """Where a base URL's requests go: scheme, host, port and path prefix."""

    scheme: str
    host: str
    port: int
    path: str
    """The URL's path without a trailing ``/`` (``/v1``), prefixed to each request."""

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.scheme, self.host, self.port)

    @property
    def host_header(self) -> bytes:
        default = 443 if self.scheme == "https" else 80
        text = self.host if self.port == default else f"{self.host}:{self.port}"
        return text.encode("ascii")


def parse_url(url: str) -> Upstream:
    """``http(s)://host[:port][/prefix]`` → :class:`Upstream`; ValueError if not."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http:// or https:// URL, got {url!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return Upstream(parts.scheme, parts.hostname, port, parts.path.rstrip("/"))


@attrs.define
class _Connection:
    stream: trio.abc.Stream
    h11: h11.Connection
    idle_since: float = 0.0


async def _next_event(conn: _Connection, *, responded: bool) -> h11.Event:
    while True:
        try:
            event = conn.h11.next_event()
        except h11.RemoteProtocolError as exc:
            raise ConnectionBroken(f"bad response: {exc}", responded=responded) from None
        if event is h11.NEED_DATA:
            try:
                data = await conn.stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise ConnectionBroken(f"connection lost: {exc}", responded=responded) from None
            conn.h11.receive_data(bytes(data))
            continue
        if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            raise ConnectionBroken("connection closed by the server", responded=responded)
        assert isinstance(event, h11.Event)
        return event


@attrs.define
class StreamedResponse:
    """A response whose body is read as it arrives (``async for chunk in r``)."""

    status: int
    headers: Sequence[tuple[bytes, bytes]]
    _conn: _Connection
    done: bool = False

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while not self.done:
            event = await _next_event(self._conn, responded=True)
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self.done = True

    async def read(self, limit: int = MAX_RESPONSE) -> bytes:
        body = bytearray()
        async for chunk in self:
            body += chunk
            if len(body) > limit:
                raise ConnectionBroken(f"response body over {limit} bytes", responded=True)
        return bytes(body)


class HttpPool:
    """Pooled keep-alive HTTP/1.1 connections per upstream. One per Gate."""

    def __init__(
        self, *, connect_timeout_s: float = 10.0, max_idle_per_host: int = MAX_IDLE_PER_HOST
    ) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.max_idle_per_host = max_idle_per_host
        self._idle: dict[tuple[str, str, int], deque[_Connection]] = {}
        self._ssl: ssl.SSLContext | None = None
        self.connections_opened = 0

    async def aclose(self) -> None:
        for pool in self._idle.values():
            while pool:
                await trio.aclose_forcefully(pool.pop().stream)
        self._idle.clear()

    async def _connect(self, upstream: Upstream) -> _Connection:
        try:
            with trio.fail_after(self.connect_timeout_s):
                tcp = await connect_tcp(upstream.host, upstream.port)
                stream: trio.abc.Stream = FastSocketStream(tcp)
                if upstream.scheme == "https":
                    if self._ssl is None:
                        self._ssl = ssl.create_default_context()
                    tls = trio.SSLStream(stream, self._ssl, server_hostname=upstream.host)
                    await tls.do_handshake()
                    stream = tls
        except trio.TooSlowError:
            raise ConnectFailed(
                f"connecting to {upstream.host}:{upstream.port} timed out"
            ) from None
        except (OSError, trio.BrokenResourceError) as exc:
            raise ConnectFailed(
                f"cannot connect to {upstream.host}:{upstream.port}: {exc}"
            ) from None
        self.connections_opened += 1
        return _Connection(stream, h11.Connection(h11.CLIENT))

    def _checkout(self, upstream: Upstream) -> _Connection | None:
        pool = self._idle.get(upstream.key)
        now = trio.current_time()
        while pool:
            conn = pool.pop()  # the most recently used is the least likely to be stale
            if now - conn.idle_since < IDLE_EXPIRY_S:
                return conn
            _close_now(conn)
        return None

    def _checkin(self, upstream: Upstream, conn: _Connection) -> None:
        if conn.h11.our_state is h11.DONE and conn.h11.their_state is h11.DONE:
            conn.h11.start_next_cycle()
            pool = self._idle.setdefault(upstream.key, deque())
            if len(pool) < self.max_idle_per_host:
                conn.idle_since = trio.current_time()
                pool.append(conn)
                return
        _close_now(conn)

    async def _send(
        self,
        conn: _Connection,
        upstream: Upstream,
        method: bytes,
        target: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes,
    ) -> h11.Response:
        head = [
            (b"host", upstream.host_header),
            (b"content-length", str(len(body)).encode()),
            *headers,
        ]
        data = conn.h11.send(h11.Request(method=method, target=target, headers=head)) or b""
        if body:
            data += conn.h11.send(h11.Data(data=body)) or b""
        data += conn.h11.send(h11.EndOfMessage()) or b""
        try:
            await conn.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise ConnectionBroken(f"sending failed: {exc}") from None
        while True:
            event = await _next_event(conn, responded=False)
            if isinstance(event, h11.Response):
                return event
            if not isinstance(event, h11.InformationalResponse):
                raise ConnectionBroken(f"unexpected {type(event).__name__} before the response")

    async def _open(
        self,
        upstream: Upstream,
        method: bytes,
        target: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes,
    ) -> tuple[_Connection, h11.Response]:
        conn = self._checkout(upstream)
        if conn is not None:
            try:
                return conn, await self._send(conn, upstream, method, target, headers, body)
            except ConnectionBroken as exc:
                # Closed by the server while idle: it never saw this request
                # (no response byte came back), so a fresh connection is the
                # standard retry.
                _close_now(conn)
                if exc.responded:
                    raise
            except BaseException:
                _close_now(conn)  # cancelled half-way: the connection is unusable
                raise
        conn = await self._connect(upstream)
        try:
            return conn, await self._send(conn, upstream, method, target, headers, body)
        except BaseException:
            _close_now(conn)
            raise

    async def request(
        self,
        method: str,
        upstream: Upstream,
        path: str,
        *,
        headers: Mapping[str, str] | Sequence[tuple[bytes, bytes]] = (),
        body: bytes = b"",
        timeout_s: float = 600.0,
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """``(status, headers, body)``; the connection goes back to the pool.

        The per-request path of the Gate's proxying: written out rather than
        built on :meth:`stream` (a context manager and a second cancel scope
        per request cost more than the rest of this method)."""
        encoded = _encode_headers(headers)
        target = (upstream.path + path).encode("ascii")
        conn: _Connection | None = None
        with trio.move_on_after(timeout_s):
            conn, head = await self._open(upstream, method.encode(), target, encoded, body)
            response = StreamedResponse(head.status_code, head.headers, conn)
            try:
                data = await response.read()
            except BaseException:
                _close_now(conn)
                raise
            self._checkin(upstream, conn)
            return response.status, list(response.headers), data
        if conn is not None:
            _close_now(conn)
        raise ResponseTimeout(f"no complete response within {timeout_s:g} s")

    @asynccontextmanager
    async def stream(
        self,
        method: str,
        upstream: Upstream,
        path: str,
        *,
        headers: Mapping[str, str] | Sequence[tuple[bytes, bytes]] = (),
        body: bytes = b"",
        timeout_s: float | None = None,
    ) -> AsyncIterator[StreamedResponse]:
        """Send the request; yield the response once its head arrived
        (within ``timeout_s`` when given). The body is read by iterating; a
        response read to its end returns its connection to the pool, any
        other is closed."""
        encoded = _encode_headers(headers)
        target = (upstream.path + path).encode("ascii")
        if timeout_s is None:
            conn, head = await self._open(upstream, method.encode(), target, encoded, body)
        else:
            with trio.move_on_after(timeout_s) as scope:
                conn, head = await self._open(upstream, method.encode(), target, encoded, body)
            if scope.cancelled_caught:
                raise ResponseTimeout(f"no response within {timeout_s:g} s")
        response = StreamedResponse(head.status_code, head.headers, conn)
        try:
            yield response
        except BaseException:
            _close_now(conn)
            raise
        if response.done:
            self._checkin(upstream, conn)
        else:
            _close_now(conn)


def _encode_headers(
    headers: Mapping[str, str] | Sequence[tuple[bytes, bytes]],
) -> Sequence[tuple[bytes, bytes]]:
    if isinstance(headers, Mapping):
        return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    return headers


def _close_now(conn: _Connection) -> None:
    """Close without waiting: a plain socket closes synchronously; a TLS
    stream's close_notify is skipped (the peer sees an EOF, which is fine
    for a connection we are abandoning)."""
    stream = conn.stream
    if isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    if isinstance(stream, trio.SocketStream | FastSocketStream):
        stream.socket.close()


_TRUST: dict[str, _core.TlsClientConfig] = {}


def system_trust() -> _core.TlsClientConfig | None:
    """The roots this pool trusts (``ssl.create_default_context()``'s CA
    file, ``SSL_CERT_FILE`` honoured), for the HTTP engine's TLS towards
    upstreams; None when there is no CA file to load (the pool serves
    those upstreams then). Loaded once per file."""
    cafile = ssl.get_default_verify_paths().cafile
    if not cafile:
        return None
    trust = _TRUST.get(cafile)
    if trust is None:
        try:
            with open(cafile, "rb") as file:
                trust = _core.TlsClientConfig(file.read(), alpn=[b"http/1.1"])
        except (OSError, _core.TlsError) as exc:
            log.warning("the HTTP engine cannot load the CA file %s (%s): https upstreams "
                        "are served by the pooled client", cafile, exc)  # fmt: skip
            return None
        _TRUST[cafile] = trust
    return trust
