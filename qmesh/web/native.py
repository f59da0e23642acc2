"""HTTP served by the HTTP engine (``_core.HttpEngine``).

For: :class:`NativeHttpServer`, a :class:`~qmesh.web.http.Router` served
with HTTP/1.1 parsed and written in Rust, and :func:`serve_http`, a
listener for it. Python accepts each connection (and refuses it over
``max_connections`` with a quick 503), then the engine owns it: it reads
and checks each request (limits, framing, timeouts; a bad one is answered
and the connection closed there), and hands it whole to Python, which runs
:func:`~qmesh.web.http.handle_request` and gives the answer back to the
engine. A handler may instead have the engine relay an upstream's answer
(:meth:`~qmesh.web.exchange.NativeExchange.proxy`): the LLM path, where the
bytes of a completion or its server-sent events never pass through Python.

One task reads the engine's reports; each request gets its own task, so a
slow handler holds up only its own connection. TLS (``tls``, a
:class:`~qmesh.web.tls.GateTls`) is the engine's too (rustls, HTTP/1.1 by
ALPN).

Not for: routing or handlers (:mod:`qmesh.web.http`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Final

import trio

from qmesh import _core
from qmesh.background import make_way
from qmesh.boundary import peer_boundary
from qmesh.config import HttpConfig
from qmesh.fastsocket import accept, open_listeners
from qmesh.web.exchange import ClientGone, NativeExchange, encode_headers
from qmesh.web.fastpath import FastRoutes
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
from qmesh.web.tls import GateTls

__all__ = ["NativeHttpServer", "serve_http"]

log = logging.getLogger(__name__)

_INTERNAL_ERROR: Final = HttpError(500, "internal error", kind="server_error")
BACKLOG_WAIT_S: Final = 1.0
"""The longest the engine's reports wait for the books at a time (a write
that hangs holds requests no longer)."""
BOOKS_TURN_S: Final = 0.0005
"""How long an inline engine's round gives the ledger's writer the core
while the books are behind: some 80 rows' writing at about 6 µs a row,
short beside a request's own time in a saturated Gate (1.2 ms at 64
connections)."""


def host_of(peer: str) -> str:
    """``host`` of a ``host:port`` peer: failed authentications are counted
    per address, whatever the port."""
    return peer.rpartition(":")[0] or peer


class NativeHttpServer:
    """One HTTP engine serving ``router``: :meth:`run` reads its reports;
    :meth:`adopt` gives it a connection.

    The engine runs inline by default: on the event loop's thread, polled
    when its descriptor is readable, so a request's way through crosses no
    thread, and the engine relays only as fast as Python books.
    ``limits.engine_threads`` puts it on the engine threads instead, where
    answers being relayed keep flowing while the event loop is busy, but the
    relaying runs ahead of the booking, which then comes in batches of
    hundreds (``bench/gateway.py``, 64 connections, the Gate on one core, in
    one session on one machine: inline 26,700–29,400 req/s, p50 1.7–2.2 ms,
    p99 4.6–4.9 ms; on the engine threads 31,500 req/s, p50 1.0 ms, p99
    14 ms).
    """

    def __init__(
        self,
        router: Router,
        limits: HttpConfig | None = None,
        *,
        source_of: Callable[[str], str] = host_of,
    ) -> None:
        """``source_of`` maps a connection's peer (as given to :meth:`adopt`)
        to what its failed authentications are counted against."""
        self.router = router
        self.source_of = source_of
        self.limits = limits if limits is not None else router.limits
        self.engine = _core.HttpEngine(
            max_header_bytes=self.limits.max_header_bytes,
            max_body_bytes=self.limits.max_body_bytes,
            idle_timeout=self.limits.idle_timeout_s,
            request_timeout=self.limits.request_timeout_s,
            inline=not self.limits.engine_threads,
        )
        self.fast = FastRoutes(self.engine, lambda: router.observe_many)
        self._exchanges: dict[int, NativeExchange] = {}

    @property
    def connections(self) -> int:
        return self.engine.stats()[0]

    def adopt(self, fd: int, peer: str, tls: _core.TlsServerConfig | None = None) -> None:
        """Serve the connected socket ``fd`` (the engine owns it from now
        on); ``peer`` names the other end in logs and requests."""
        self.engine.adopt(fd, peer, tls=tls)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; then every connection is closed."""
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                await self._dispatch(nursery)
        finally:
            self.engine.close()

    async def _dispatch(self, nursery: trio.Nursery) -> None:
        fd = self.engine.poll_fd
        backlog = self.router.backlog
        while True:
            # Readable with work, and when an inline engine's timeouts are
            # due: no timeout here (a cancel scope per round costs more than
            # the rest of the round's Python).
            await trio.lowlevel.wait_readable(fd)
            if not self.limits.engine_threads:
                # While an inline engine's rounds bring events, the next is
                # polled after a checkpoint, not after a wait for the
                # descriptor: under load that wait (trio's I/O bookkeeping
                # and an epoll_ctl to re-arm) took a tenth of this thread.
                busy_since = time.monotonic()
                while self._round(nursery):
                    make_way(time.monotonic() - busy_since)
                    behind = backlog()
                    if behind is None:
                        await trio.lowlevel.checkpoint()
                        continue
                    # The books are behind: the fast path relays and books
                    # faster than a niced writer's share of a saturated
                    # core writes. An inline engine relays only when
                    # polled, so a long wait would hold the answers in
                    # flight too: the writer gets the core for a moment
                    # after each round instead, and the Gate serves what
                    # it can book, where refusing requests once the ledger
                    # is full (503) would be the alternative.
                    with trio.move_on_after(BOOKS_TURN_S):
                        await behind
                continue
            behind = backlog()
            if behind is not None:
                # The engine goes on relaying the answers in flight, and
                # holds new requests once its reports reach their bound.
                with trio.move_on_after(BACKLOG_WAIT_S):
                    await behind
            self._round(nursery)

    def _round(self, nursery: trio.Nursery) -> bool:
        """Poll the engine and act on its events; whether there were any."""
        engine, exchanges = self.engine, self._exchanges
        events = engine.poll()
        for event in events:
            if isinstance(event, _core.HttpRequest):
                exchange = NativeExchange(engine, event.exchange, self.fast)
                exchanges[event.exchange] = exchange
                nursery.start_soon(self._serve_request, exchange, event)
                continue
            if isinstance(event, _core.HttpFastBatch):
                with peer_boundary("booking fast-path requests (route %d)", log, event.route):
                    self.fast.done_many(event)
                continue
            if isinstance(event, _core.HttpFastDone):
                self._fast_done(event, nursery)
                continue
            if isinstance(event, _core.HttpRouteReleased):
                self.fast.released(event.route)
                continue
            target = exchanges.get(event.exchange)
            if target is None:
                continue
            if isinstance(event, _core.HttpProxied):
                target.deliver(event)
            else:
                target.notice(event.kind)
        return bool(events)

    def _fast_done(self, event: _core.HttpFastDone, nursery: trio.Nursery) -> None:
        """Book a request whose answer broke off on the fast path; one that
        waits for its closing words gets them in a task of its own."""
        closing = None
        with peer_boundary("booking a fast-path request (route %d)", log, event.route):
            closing = self.fast.done(event)
        if closing is not None:
            nursery.start_soon(self._finish_fast, event.exchange, event.route, closing)
        elif event.outcome.open:
            NativeExchange(self.engine, event.exchange).abort()  # nothing else would end it

    async def _finish_fast(self, exchange_id: int, route: int, words: bytes) -> None:
        """The closing words of a fast-path answer that broke off, then its end."""
        with peer_boundary("closing a fast-path answer (route %d)", log, route):
            exchange = NativeExchange(self.engine, exchange_id, self.fast)
            self._exchanges[exchange_id] = exchange  # for its "drained" notices
            try:
                await exchange.write(words, self.limits.request_timeout_s)
                exchange.finish()
            except ClientGone:
                pass
            finally:
                self._exchanges.pop(exchange_id, None)

    async def _serve_request(self, exchange: NativeExchange, event: _core.HttpRequest) -> None:
        request = _request(event, exchange, self.source_of(event.peer))
        try:
            with peer_boundary("http request from %s", log, request.client):
                if event.failed_route is not None and event.failed is not None:
                    # Its attempt on the fast path, told to the route's owner
                    # inside this request's boundary, not the dispatcher's.
                    exchange.earlier_hops = self.fast.failed(event.failed_route, event.failed)
                response = await handle_request(self.router, request)
                await _answer(exchange, response, self.limits)
        finally:
            self._exchanges.pop(exchange.id, None)
            exchange.abort()  # an answer left unfinished ends its connection (else a no-op)
            request.scope.close()


async def serve_http(
    router: Router,
    host: str,
    port: int,
    *,
    limits: HttpConfig | None = None,
    tls: GateTls | None = None,
    purpose: str = "HTTP",
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``router`` on ``host:port``; ``task_status.started`` gets the
    bound port (``purpose`` names it if it cannot bind). ``limits`` default
    to the router's. With ``tls``, every connection is TLS."""
    server = NativeHttpServer(router, limits)
    listeners = await open_listeners(host, port, purpose=purpose)
    bound: int = listeners[0].socket.getsockname()[1]
    log.info("http listening on %s:%d", host, bound)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        connections = ConnectionCounts()
        for listener in listeners:
            nursery.start_soon(_accept_forever, server, listener, connections, tls)
        task_status.started(bound)


async def _accept_forever(
    server: NativeHttpServer,
    listener: trio.SocketListener,
    connections: ConnectionCounts,
    tls: GateTls | None,
) -> None:
    limits = server.limits
    refuse_tls = None if tls is None else tls.context
    native_tls = None if tls is None else tls.native
    async with listener, trio.open_nursery() as refusals:
        while True:
            stream = await accept(listener, what="http")
            if server.connections >= limits.max_connections:
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
                refusals.start_soon(refuse_connection, stream, limits, connections, refuse_tls)
                continue
            connections.overloaded = False
            try:
                host, peer_port = stream.socket.getpeername()[:2]
                peer = f"{host}:{peer_port}"
            except OSError:
                peer = "?"
            try:
                server.adopt(stream.socket.detach(), peer, native_tls)
            except OSError as exc:  # the engine is closed, or the socket broke
                log.info("http connection from %s not served: %s", peer, exc)


def _request(event: _core.HttpRequest, exchange: NativeExchange, source: str) -> Request:
    headers: dict[str, str] = {}
    for key, value in event.headers:
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    path, query = split_target(event.target)
    return Request(
        method=event.method,
        path=path,
        query=query,
        headers=headers,
        body=event.body,
        client=event.peer,
        source=source,
        native=exchange,
    )


async def _answer(exchange: NativeExchange, response: Response, limits: HttpConfig) -> None:
    producer = response.stream
    try:
        if response.relayed:
            return
        try:
            headers = encode_headers(response.headers)
            if not 100 <= response.status <= 999 or not isinstance(response.body, bytes):
                raise ValueError(f"status {response.status!r} cannot be sent")
        except (ValueError, TypeError, UnicodeEncodeError):
            log.exception("a response (status %r) cannot be encoded", response.status)
            response = _INTERNAL_ERROR.response()
            headers = encode_headers(response.headers)
            producer = None
        try:
            if producer is None:
                exchange.respond(response.status, headers, response.body)
            else:
                exchange.start(response.status, headers)
                await exchange.write_all(producer, limits.request_timeout_s)
                exchange.finish()
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
