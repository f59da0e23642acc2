"""The Gate's plain-HTTP listener on the HTTP engine (``_core.HttpEngine``).

For: serving a :class:`~qmesh.web.http.Router` with HTTP/1.1 parsed and
written in Rust. Python accepts each connection (and refuses it over
``max_connections``, as :func:`qmesh.web.http.serve_http` does), then the
engine owns it: it reads and checks each request (limits, framing,
timeouts; a bad one is answered and the connection closed there), and
hands it whole to :func:`_serve_request`, which runs the same
:func:`~qmesh.web.http.handle_request` as the h11 server and gives the
answer back to the engine. A handler may instead have the engine relay an
upstream's answer (:meth:`NativeExchange.proxy`): the LLM path, where the
bytes of a completion or its server-sent events never pass through Python.

One task reads the engine's reports (:func:`_dispatch`); each request gets
its own task, so a slow handler holds up only its own connection.

Not for: TLS listeners or tunnel streams (:func:`qmesh.web.http.serve_stream`
on h11 serves those).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Final

import trio

from qmesh import _core
from qmesh.boundary import peer_boundary
from qmesh.config import HttpConfig
from qmesh.fastsocket import accept
from qmesh.web.http import (
    MAX_REFUSING,
    ConnectionCounts,
    HttpError,
    Request,
    Response,
    Router,
    handle_request,
    refuse_connection,
    split_target,
)

__all__ = ["NativeExchange", "ProxyTarget", "serve_native"]

log = logging.getLogger(__name__)

HIGH_WATER: Final = 256 * 1024
"""Bytes of a produced answer waiting for the client above which the
producer waits (the engine's own mark)."""
_INTERNAL_ERROR: Final = HttpError(500, "internal error", kind="server_error")


class ClientGone(Exception):
    """The client's connection ended before its answer did."""


def encode_headers(headers: tuple[tuple[str, str], ...]) -> bytes:
    """``name: value`` lines; ValueError for a name or value that would
    split the head (a handler's bug, answered 500 before anything is sent)."""
    lines = []
    for name, value in headers:
        if not name or any(c in name for c in ":\r\n ") or "\r" in value or "\n" in value:
            raise ValueError(f"a response header cannot be sent: {name!r}")
        lines.append(f"{name}: {value}\r\n")
    return "".join(lines).encode("latin-1")


class ProxyTarget:
    """Where and what the engine sends for a relayed request."""

    __slots__ = ("host", "port", "request")

    def __init__(self, host: str, port: int, request: bytes) -> None:
        self.host = host  # an IP address
        self.port = port
        self.request = request  # a whole HTTP/1.1 request


class NativeExchange:
    """One request's answer through the engine."""

    __slots__ = ("_drained", "_engine", "_outcome", "_proxied", "gone", "id")

    def __init__(self, engine: _core.HttpEngine, exchange: int) -> None:
        self._engine = engine
        self.id = exchange
        self.gone = False
        self._proxied: trio.Event | None = None
        self._outcome: _core.HttpProxied | None = None
        self._drained: trio.Event | None = None

    async def proxy(
        self,
        target: ProxyTarget,
        headers: bytes,
        *,
        first_byte_timeout_s: float,
        chunk_timeout_s: float,
    ) -> _core.HttpProxied:
        """Have the engine send ``target.request`` and relay a 200 answer to
        the client (``headers`` added to its head); what came of it."""
        ready = self._proxied = trio.Event()
        self._outcome = None
        sent = self._engine.proxy(
            self.id, target.host, target.port, target.request, headers,
            first_byte_timeout_s, chunk_timeout_s,
        )  # fmt: skip
        if not sent:
            raise ClientGone
        await ready.wait()
        outcome = self._outcome
        assert outcome is not None
        return outcome

    def respond(self, response: Response) -> None:
        if not self._engine.respond(
            self.id, response.status, encode_headers(response.headers), response.body
        ):
            raise ClientGone

    async def stream(self, response: Response, write_timeout_s: float) -> None:
        """A chunked answer from ``response.stream``; a client that stops
        reading for ``write_timeout_s`` loses its connection."""
        if not self._engine.start(self.id, response.status, encode_headers(response.headers)):
            raise ClientGone
        if response.stream is not None:
            await self.write_all(response.stream, write_timeout_s)
        self.finish()

    async def write_all(self, chunks: AsyncIterator[bytes], write_timeout_s: float) -> None:
        """Each chunk, with back-pressure."""
        async for chunk in chunks:
            await self.write(chunk, write_timeout_s)

    async def write(self, chunk: bytes, write_timeout_s: float) -> None:
        if not chunk:
            return
        waiting = self._engine.write(self.id, chunk)
        if waiting is None:
            raise ClientGone
        if waiting >= HIGH_WATER:
            drained = self._drained = trio.Event()
            with trio.move_on_after(write_timeout_s):
                await drained.wait()
            self._drained = None
            if not drained.is_set():
                self.abort()
                raise ClientGone
            if self.gone:
                raise ClientGone

    def finish(self) -> None:
        if not self._engine.finish(self.id):
            raise ClientGone

    def abort(self) -> None:
        """End the client's connection now, whatever was written."""
        self._engine.abort(self.id)

    # -- reports from the dispatcher --------------------------------------------

    def _deliver(self, outcome: _core.HttpProxied) -> None:
        self._outcome = outcome
        if self._proxied is not None:
            self._proxied.set()

    def _notice(self, kind: str) -> None:
        if kind == "gone":
            self.gone = True
        if self._drained is not None:
            self._drained.set()


async def serve_native(
    router: Router,
    listeners: list[trio.SocketListener],
    limits: HttpConfig,
    *,
    port: int,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``router`` on ``listeners`` (already bound to ``port``)."""
    engine = _core.HttpEngine(
        max_header_bytes=limits.max_header_bytes,
        max_body_bytes=limits.max_body_bytes,
        idle_timeout=limits.idle_timeout_s,
        request_timeout=limits.request_timeout_s,
    )
    exchanges: dict[int, NativeExchange] = {}
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_dispatch, engine, router, limits, exchanges, nursery)
            connections = ConnectionCounts()
            for listener in listeners:
                nursery.start_soon(_accept_forever, engine, listener, limits, connections)
            task_status.started(port)
    finally:
        engine.close()


async def _accept_forever(
    engine: _core.HttpEngine,
    listener: trio.SocketListener,
    limits: HttpConfig,
    connections: ConnectionCounts,
) -> None:
    async with listener, trio.open_nursery() as refusals:
        while True:
            stream = await accept(listener, what="http")
            if engine.stats()[0] >= limits.max_connections:
                if not connections.overloaded:
                    connections.overloaded = True
                    log.warning(
                        "http: %d connections open (gate.http.max_connections); "
                        "refusing new ones with 503",
                        limits.max_connections,
                    )
                if connections.refusing >= MAX_REFUSING:
                    stream.socket.close()
                    continue
                connections.refusing += 1
                refusals.start_soon(refuse_connection, stream, limits, connections, None)
                continue
            connections.overloaded = False
            try:
                host, peer_port = stream.socket.getpeername()[:2]
                peer = f"{host}:{peer_port}"
            except OSError:
                peer = "?"
            try:
                engine.adopt(stream.socket.detach(), peer)
            except OSError as exc:  # the engine is closed, or the socket broke
                log.info("http connection from %s not served: %s", peer, exc)


async def _dispatch(
    engine: _core.HttpEngine,
    router: Router,
    limits: HttpConfig,
    exchanges: dict[int, NativeExchange],
    nursery: trio.Nursery,
) -> None:
    fd = engine.notify_fd
    while True:
        await trio.lowlevel.wait_readable(fd)
        for event in engine.take():
            if isinstance(event, _core.HttpRequest):
                exchange = NativeExchange(engine, event.exchange)
                exchanges[event.exchange] = exchange
                nursery.start_soon(_serve_request, router, limits, exchange, event, exchanges)
                continue
            target = exchanges.get(event.exchange)
            if target is None:
                continue
            if isinstance(event, _core.HttpProxied):
                target._deliver(event)
            else:
                target._notice(event.kind)


def _request(event: _core.HttpRequest, exchange: NativeExchange) -> Request:
    headers: dict[str, str] = {}
    for key, value in event.headers:
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    path, query = split_target(event.target)
    host = event.peer.rpartition(":")[0] or event.peer
    return Request(
        method=event.method,
        path=path,
        query=query,
        headers=headers,
        body=event.body,
        client=event.peer,
        source=host,
        native=exchange,
    )


async def _serve_request(
    router: Router,
    limits: HttpConfig,
    exchange: NativeExchange,
    event: _core.HttpRequest,
    exchanges: dict[int, NativeExchange],
) -> None:
    request = _request(event, exchange)
    try:
        with peer_boundary(f"http request from {request.client}", log):
            response = await handle_request(router, request)
            await _answer(exchange, response, limits)
    finally:
        exchanges.pop(exchange.id, None)
        request.scope.close()


async def _answer(exchange: NativeExchange, response: Response, limits: HttpConfig) -> None:
    producer = response.stream
    try:
        if response.relayed:
            return
        try:
            encode_headers(response.headers)
            if not 100 <= response.status <= 999 or not isinstance(response.body, bytes):
                raise ValueError(f"status {response.status!r} cannot be sent")
        except (ValueError, TypeError, UnicodeEncodeError):
            log.exception("a response (status %r) cannot be encoded", response.status)
            response = _INTERNAL_ERROR.response()
            producer = None
        try:
            if producer is None:
                exchange.respond(response)
            else:
                await exchange.stream(response, limits.request_timeout_s)
        except ClientGone:
            pass
    except BaseException:
        # A producer that failed half-way: its connection ends, nothing else.
        exchange.abort()
        raise
    finally:
        aclose = getattr(producer, "aclose", None)
        if aclose is not None:
            await aclose()

