"""A small HTTP/1.1 server on h11 and Trio, for the Gate's APIs.

h11 is the sans-IO protocol core; this module is the thin Trio loop around
it plus routing. Keep-alive, limits (connections, header and body sizes,
idle, request and write timeouts: :class:`qmesh.config.HttpConfig`) and
streamed responses (SSE) are handled here so handlers only map a
:class:`Request` to a :class:`Response`.

It is a boundary: another party's bytes arrive here. Whatever goes wrong
while serving one connection — a malformed request, a handler that raises
any exception at all (``RecursionError``, ``KeyError``, an exception group,
even ``SystemExit``), a response that cannot be encoded, a streamed answer
that fails half-way — is answered (500) if the answer has not started, logged
with its reason, and ends at most that connection: never the server, never
another connection. The one place that enforces it is :func:`qmesh.boundary.peer_boundary`,
around each connection; :func:`handle_request` turns a failed handler into a 500
first so that the connection can carry on. Only cancellation (the server
shutting down), ``KeyboardInterrupt`` and ``GeneratorExit`` pass through.

Not for: TLS termination or HTTP/2 (put a proxy in front), nor anything that
needs per-request imports — the router is built once at start-up.
"""

from __future__ import annotations

import json
import logging
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qs, urlsplit

import attrs
import h11
import trio

from qmesh import peerjson
from qmesh.boundary import peer_boundary, split_failure
from qmesh.config import HttpConfig

if TYPE_CHECKING:
    from qmesh.web.exchange import NativeExchange

__all__ = [
    "ConnectionCounts",
    "Handler",
    "HttpError",
    "Request",
    "RequestScope",
    "Response",
    "Router",
    "handle_request",
    "refuse_connection",
    "serve_stream",
    "split_target",
]

log = logging.getLogger(__name__)

RECEIVE_SIZE: Final = 65536
# Over the connection limit a new connection gets a 503 and is closed; the
# answer may wait this long for a client that does not read it …
_REFUSE_TIMEOUT_S: Final = 1.0
# … and at most this many such answers are in flight: beyond them a new
# connection is closed without one, so a flood costs an accept and a close.
MAX_REFUSING: Final = 64
# What a refused client sent is read (and dropped) before the close, up to
# this much: closing a socket with unread input resets the connection, and
# the reset can destroy the 503 before the client reads it.
_REFUSE_DRAIN_BYTES: Final = 65536


class HttpError(Exception):
    """Raised by handlers to answer with an error; the body is OpenAI-style JSON
    (``{"error": {"message", "type", "code"}}``) so API clients can show it."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.code = code
        self.param = param  # the request field at fault, as OpenAI's errors name it
        self.headers = headers  # e.g. Retry-After on a 429

    def response(self) -> Response:
        error = {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}
        return Response.json({"error": error}, status=self.status, headers=self.headers)


class RequestScope:
    """What lasts as long as one request, its answer included (a streamed
    answer until its last chunk, or until the client hangs up): callbacks
    run when it is over, whatever happened. For per-request accounting such
    as the per-app limit of concurrent requests."""

    def __init__(self) -> None:
        self._callbacks: list[Callable[[], None]] = []
        self._claims: set[object] = set()

    def claim(self, key: object) -> bool:
        """True the first time ``key`` is claimed in this request: lets a
        check that a handler may run twice count the request once."""
        if key in self._claims:
            return False
        self._claims.add(key)
        return True

    def on_close(self, callback: Callable[[], None]) -> None:
        self._callbacks.append(callback)

    def close(self) -> None:
        """Run the callbacks, newest first; one that fails is logged and
        does not stop the others."""
        callbacks, self._callbacks = self._callbacks, []
        for callback in reversed(callbacks):
            try:
                callback()
            except Exception:
                log.exception("a request's close callback failed")


@attrs.frozen
class Request:
    method: str
    path: str
    query: Mapping[str, list[str]]
    headers: Mapping[str, str]  # lower-case names; repeated headers joined with ", "
    body: bytes
    path_params: Mapping[str, str] = attrs.field(factory=dict)
    client: str = ""
    source: str = ""
    """Who to hold to account for failed authentications: the peer's address
    without its port (an edge's name through the tunnel)."""
    scope: RequestScope = attrs.field(factory=RequestScope, eq=False, repr=False)
    native: NativeExchange | None = attrs.field(default=None, eq=False, repr=False)
    """Set when the request came through the HTTP engine: a handler may
    then have the engine relay an upstream's answer itself."""

    def json(self, *, max_depth: int = peerjson.DEFAULT_MAX_DEPTH) -> Any:
        """The body as JSON, or a 400 that says why not. Nesting is bounded
        (a deep one would crash the parser); the size was bounded by the
        server (``max_body_bytes``) before the handler ran."""
        try:
            return peerjson.loads(self.body, max_bytes=len(self.body), max_depth=max_depth)
        except peerjson.PeerJsonError as exc:
            raise HttpError(400, f"request body is not valid JSON: {exc}") from None

    def bearer_token(self) -> str | None:
        value = self.headers.get("authorization", "")
        scheme, _, token = value.partition(" ")
        return token.strip() or None if scheme.lower() == "bearer" else None


@attrs.frozen
class Response:
    status: int = 200
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    stream: AsyncIterator[bytes] | None = None  # sent chunked after headers when set
    relayed: bool = False
    """The answer was written by the HTTP engine (an upstream's, relayed):
    nothing is left to send."""

    @classmethod
    def json(
        cls, data: Any, *, status: int = 200, headers: tuple[tuple[str, str], ...] = ()
    ) -> Response:
        body = json.dumps(data, separators=(",", ":")).encode()
        return cls(status, body, (("content-type", "application/json"), *headers))

    @classmethod
    def text(
        cls, text: str, *, status: int = 200, content_type: str = "text/plain; charset=utf-8"
    ) -> Response:
        return cls(status, text.encode(), (("content-type", content_type),))

    @classmethod
    def event_stream(cls, events: AsyncIterator[bytes]) -> Response:
        """Server-sent events: ``events`` yields already-formatted ``data: …\\n\\n`` chunks."""
        headers = (("content-type", "text/event-stream"), ("cache-control", "no-cache"))
        return cls(200, b"", headers, events)

    @classmethod
    def already_relayed(cls, status: int = 200) -> Response:
        return cls(status, relayed=True)


Handler = Callable[[Request], Awaitable[Response]]

_INTERNAL_ERROR: Final = HttpError(500, "internal error", kind="server_error")


class Router:
    """Method + path → handler. Paths are exact, or have ``{name}`` segments.

    ``limits`` travel with the router: every server of these routes (the
    Gate's listener, the ``llm`` tunnel service) applies the same ones.
    """

    def __init__(self, limits: HttpConfig | None = None) -> None:
        self.limits = limits if limits is not None else HttpConfig()
        self._exact: dict[tuple[str, str], Handler] = {}
        self._patterns: list[tuple[str, tuple[str, ...], Handler]] = []
        self._routes: dict[Handler, str] = {}
        self.observe: Callable[[str, str, int, float], None] | None = None
        """Told of every answered request: method, route (the path as added,
        ``{name}`` segments and all, so per-route figures stay few; ``-``
        when nothing matched), status and seconds until the response was
        ready (for a stream: until its head). For metrics: keep it cheap."""

    def route_of(self, handler: Handler | None) -> str:
        return "-" if handler is None else self._routes.get(handler, "-")

    def add(self, method: str, path: str, handler: Handler) -> None:
        self._routes.setdefault(handler, path)
        if "{" in path:
            self._patterns.append((method, tuple(path.strip("/").split("/")), handler))
        else:
            self._exact[(method, path)] = handler

    def resolve(self, method: str, path: str) -> tuple[Handler, dict[str, str]]:
        handler = self._exact.get((method, path))
        if handler is not None:
            return handler, {}
        parts = path.strip("/").split("/")
        path_known = any(p == path for _, p in self._exact)
        for route_method, pattern, candidate in self._patterns:
            params = _match(pattern, parts)
            if params is None:
                continue
            if route_method == method:
                return candidate, params
            path_known = True
        if path_known:
            raise HttpError(405, f"method {method} not allowed on {path}")
        raise HttpError(404, f"no route for {path}", code="not_found")


def _match(pattern: tuple[str, ...], parts: list[str]) -> dict[str, str] | None:
    if len(pattern) != len(parts):
        return None
    params: dict[str, str] = {}
    for expected, actual in zip(pattern, parts, strict=True):
        if expected.startswith("{") and expected.endswith("}"):
            if not actual:
                return None
            params[expected[1:-1]] = actual
        elif expected != actual:
            return None
    return params


# -- serving ---------------------------------------------------------------------


@attrs.define
class ConnectionCounts:
    """A listener's connections: served, being refused, and whether the
    limit was reported."""

    active: int = 0
    refusing: int = 0
    overloaded: bool = False  # the limit was hit since the last warning


async def refuse_connection(
    stream: trio.SocketStream,
    limits: HttpConfig,
    connections: ConnectionCounts,
    tls: ssl.SSLContext | None,
) -> None:
    """Answer 503 and close. On a TLS listener the answer goes over TLS (a
    plain one would read as a broken handshake); the handshake counts against
    the same second, and at most MAX_REFUSING of these run at once."""
    try:
        with peer_boundary("refused http connection", log):
            error = HttpError(
                503,
                "the gate has too many open HTTP connections "
                f"(gate.http.max_connections = {limits.max_connections}); retry shortly",
                kind="server_error",
                code="overloaded",
                headers=(("retry-after", "1"),),
            )
            transport: trio.abc.Stream = stream
            try:
                with trio.move_on_after(_REFUSE_TIMEOUT_S):
                    if tls is not None:
                        secure = trio.SSLStream(
                            stream, tls, server_side=True, https_compatible=True
                        )
                        transport = secure
                        await secure.do_handshake()
                    await transport.send_all(_raw_response(error.response()))
                    if isinstance(transport, trio.abc.HalfCloseableStream):
                        await transport.send_eof()
                    drained = 0
                    while drained < _REFUSE_DRAIN_BYTES:
                        data = await transport.receive_some(RECEIVE_SIZE)
                        if not data:
                            break
                        drained += len(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            finally:
                await trio.aclose_forcefully(transport)
    finally:
        connections.refusing -= 1


async def serve_stream(
    router: Router,
    stream: trio.abc.Stream,
    *,
    client: str,
    source: str | None = None,
    limits: HttpConfig | None = None,
) -> None:
    """Serve HTTP/1.1 on one already-open byte stream (a TCP connection, or
    a tunnel stream carrying an edge's connection) until it ends; closes it.
    Never raises for anything the peer or a handler did (see the module's
    docstring). ``source`` (default: ``client``) is what failed
    authentications are counted against; ``limits`` default to the router's."""
    what = f"http connection from {client}"
    try:
        with peer_boundary(what, log):
            await _serve_connection(
                router,
                stream,
                client,
                client if source is None else source,
                limits if limits is not None else router.limits,
            )
    finally:
        # Closed after the reason is logged, so the log never lags the close.
        with peer_boundary(f"closing the {what}", log):
            await trio.aclose_forcefully(stream)


class _Unsendable(Exception):
    """A handler's response cannot be encoded (a bug in the handler)."""


class _ClientTooSlow(Exception):
    """A write to the client waited longer than ``request_timeout_s``."""


async def _serve_connection(
    router: Router, stream: trio.abc.Stream, client: str, source: str, limits: HttpConfig
) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)
    write_timeout = limits.request_timeout_s
    head_only = False  # the answer to a HEAD request has no body
    try:
        while True:
            head_only = False
            if not await _wait_for_request(conn, stream, limits.idle_timeout_s):
                return
            try:
                # From the request's first byte to the end of its body.
                with trio.fail_after(limits.request_timeout_s):
                    event = await _next_event(conn, stream)
                    if not isinstance(event, h11.Request):
                        return
                    head_only = event.method == b"HEAD"
                    request = await _read_request(conn, stream, event, limits, client, source)
            except trio.TooSlowError:
                timeout = HttpError(408, "request took too long")
                await _send_error(conn, stream, timeout, limits, head_only)
                return
            except HttpError as error:
                await _send_error(conn, stream, error, limits, head_only)
                return
            try:
                response = await handle_request(router, request)
                await _send_response(conn, stream, response, write_timeout, head_only=head_only)
            finally:
                request.scope.close()
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return
    except h11.RemoteProtocolError as exc:
        bad = HttpError(exc.error_status_hint, f"bad request: {exc}")
        await _send_error(conn, stream, bad, limits, head_only)
    except _Unsendable:
        # Nothing of the answer was written: a plain 500, then close (h11's
        # state is spoilt by the failed encoding, so it is written by hand).
        with trio.move_on_after(write_timeout):
            await stream.send_all(_raw_response(_INTERNAL_ERROR.response(), head_only=head_only))
    except _ClientTooSlow:
        log.info("http client %s stopped reading its answer; closed the connection", client)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the peer went away


async def _wait_for_request(conn: h11.Connection, stream: trio.abc.Stream, idle: float) -> bool:
    """Wait up to ``idle`` seconds for the first bytes of the next request;
    False when they did not come (the connection should close quietly)."""
    buffered, closed = conn.trailing_data
    if buffered or closed:
        return True  # a pipelined request, or the peer's EOF, is already here
    with trio.move_on_after(idle):
        data = await stream.receive_some(RECEIVE_SIZE)
        conn.receive_data(bytes(data))  # b"" tells h11 about EOF; bytes(b) is no copy
        return True
    return False


async def _next_event(conn: h11.Connection, stream: trio.abc.Stream) -> h11.Event | None:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(RECEIVE_SIZE)
            conn.receive_data(bytes(data))  # b"" tells h11 about EOF; bytes(b) is no copy
            continue
        if event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
            return None
        assert isinstance(event, h11.Event)
        return event


async def _read_request(
    conn: h11.Connection,
    stream: trio.abc.Stream,
    head: h11.Request,
    limits: HttpConfig,
    client: str,
    source: str,
) -> Request:
    # h11 bounds a head that is still arriving; one that came whole in a
    # single read is measured here, so the limit does not depend on timing.
    size = len(head.method) + len(head.target) + sum(len(n) + len(v) + 4 for n, v in head.headers)
    if size > limits.max_header_bytes:
        raise HttpError(431, f"request head over {limits.max_header_bytes} bytes")
    max_body = limits.max_body_bytes
    headers: dict[str, str] = {}
    for name, value in head.headers:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_body:
        raise HttpError(413, f"request body over {max_body} bytes")
    body = bytearray()
    while True:
        event = await _next_event(conn, stream)
        if event is None:
            raise HttpError(400, "connection closed inside the request")
        if isinstance(event, h11.Data):
            body += event.data
            if len(body) > max_body:
                raise HttpError(413, f"request body over {max_body} bytes")
        elif isinstance(event, h11.EndOfMessage):
            break
    path, query = split_target(head.target.decode("latin-1"))
    return Request(
        method=head.method.decode("ascii"),
        path=path,
        query=query,
        headers=headers,
        body=bytes(body),
        client=client,
        source=source,
    )


def split_target(raw_target: str) -> tuple[str, dict[str, list[str]]]:
    """A request target's path and query."""
    if "?" in raw_target or "#" in raw_target or not raw_target.startswith("/"):
        target = urlsplit(raw_target)
        return target.path or "/", parse_qs(target.query)
    return raw_target, {}  # the common case, without the cost of urlsplit and parse_qs


async def handle_request(router: Router, request: Request) -> Response:
    """The handler's response; a 500 for anything it raised but an HttpError."""
    observe = router.observe
    started = time.perf_counter() if observe is not None else 0.0
    handler: Handler | None = None
    try:
        handler, params = router.resolve(request.method, request.path)
        response = await handler(attrs.evolve(request, path_params=params) if params else request)
        if not isinstance(response, Response):
            raise TypeError(f"the handler returned {type(response).__name__}, not a Response")
    except HttpError as error:
        response = error.response()
    except BaseException as exc:
        passed, caught = split_failure(exc)
        if passed is exc:
            raise
        log.error("handler for %s %s (from %s) failed: %s", request.method, request.path,
                  request.client, type(caught).__name__, exc_info=caught)  # fmt: skip
        if passed is not None:
            raise passed from None
        response = _INTERNAL_ERROR.response()
    if observe is not None:
        observe(
            request.method, router.route_of(handler), response.status, time.perf_counter() - started
        )
    return response


async def _write(stream: trio.abc.Stream, data: bytes, limit_s: float) -> None:
    # move_on_after, not fail_after: a TooSlowError from here would look
    # like one from a response's producer, which is another matter.
    with trio.move_on_after(limit_s) as scope:
        await stream.send_all(data)
    if scope.cancelled_caught:
        raise _ClientTooSlow


def _encode(conn: h11.Connection, response: Response, close: bool, head_only: bool) -> bytes:
    """The response's head (and, unless streamed, its body and end) as bytes;
    for a HEAD request, the head and end only (its headers still say what
    the body would be). Raises _Unsendable, before anything is written, for
    a malformed one."""
    try:
        headers = [(k.encode(), v.encode()) for k, v in response.headers]
        headers.append((b"server", b"qmesh"))
        if close:
            headers.append((b"connection", b"close"))
        if response.stream is not None:
            headers.append((b"transfer-encoding", b"chunked"))
            data = conn.send(h11.Response(status_code=response.status, headers=headers)) or b""
            return data + (conn.send(h11.EndOfMessage()) or b"") if head_only else data
        headers.append((b"content-length", str(len(response.body)).encode()))
        # Head, body and end in one write: one syscall per response, not three.
        data = conn.send(h11.Response(status_code=response.status, headers=headers)) or b""
        if response.body and not head_only:
            data += conn.send(h11.Data(data=response.body)) or b""
        return data + (conn.send(h11.EndOfMessage()) or b"")
    except Exception:
        log.exception("a response (status %r) cannot be encoded", response.status)
        raise _Unsendable from None


async def _send_response(
    conn: h11.Connection,
    stream: trio.abc.Stream,
    response: Response,
    write_timeout: float,
    *,
    close: bool = False,
    head_only: bool = False,
) -> None:
    producer = response.stream
    try:
        await _write(stream, _encode(conn, response, close, head_only), write_timeout)
        if producer is None or head_only:
            return
        async for chunk in producer:
            if chunk:
                await _write(stream, conn.send(h11.Data(data=chunk)) or b"", write_timeout)
        await _write(stream, conn.send(h11.EndOfMessage()) or b"", write_timeout)
    finally:
        # A client that hangs up mid-stream must stop the producer now
        # (a generation on a daemon, say), not when the GC finds it.
        aclose = getattr(producer, "aclose", None)
        if aclose is not None:
            await aclose()


async def _send_error(
    conn: h11.Connection,
    stream: trio.abc.Stream,
    error: HttpError,
    limits: HttpConfig,
    head_only: bool,
) -> None:
    """Answer an error if the protocol state still allows a response, then give up."""
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    try:
        await _send_response(
            conn,
            stream,
            error.response(),
            limits.request_timeout_s,
            close=True,
            head_only=head_only,
        )
    except (_ClientTooSlow, trio.BrokenResourceError, trio.ClosedResourceError):
        pass


def _raw_response(response: Response, *, head_only: bool = False) -> bytes:
    """A complete response with ``Connection: close``, encoded without h11:
    for answers outside a request cycle (a refused connection) or after h11
    gave up on one (a handler's response that could not be encoded)."""
    reason = HTTPStatus(response.status).phrase
    lines = [f"HTTP/1.1 {response.status} {reason}"]
    lines += [f"{name}: {value}" for name, value in response.headers]
    lines += ["server: qmesh", f"content-length: {len(response.body)}", "connection: close"]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + response.body
