"""The Gate's HTTP API in Python: requests, responses, routing, and the
boundary around each handler.

Handlers map a :class:`Request` to a :class:`Response` (whole, or a stream
of server-sent events); :class:`Router` finds them by method and path;
:func:`handle_request` runs one. The bytes on the wire are the HTTP
engine's (:mod:`qmesh.web.native`, ``_core.HttpEngine``): it parses and
bounds requests, and writes answers, keep-alive and limits included
(:class:`qmesh.config.HttpConfig`).

It is a boundary: another party's bytes arrive here. Whatever goes wrong
while serving one request — a handler that raises any exception at all
(``RecursionError``, ``KeyError``, an exception group, even ``SystemExit``),
a response that cannot be encoded, a streamed answer that fails half-way —
is answered (500) if the answer has not started, logged with its reason, and
ends at most that connection: never the server, never another connection.
:func:`handle_request` turns a failed handler into a 500 so that the
connection can carry on; :func:`qmesh.boundary.peer_boundary` around each
request does the rest. Only cancellation (the server shutting down),
``KeyboardInterrupt`` and ``GeneratorExit`` pass through.

Not for: HTTP/2, nor anything that needs per-request imports — the router
is built once at start-up.
"""

from __future__ import annotations

import json
import logging
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qs, urlsplit

import attrs
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


def _never_behind() -> None:
    """A router's books before any are kept (the admin API alone, tests)."""
    return None


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
        self.observe_many: Callable[[str, str, int, Sequence[float]], None] | None = None
        """As :attr:`observe`, for requests answered alike: the seconds of each."""
        self.backlog: Callable[[], Awaitable[None] | None] = _never_behind
        """Asked before the HTTP engine's server takes more of its engine's
        reports: what to await while the books of the requests answered are
        behind (new requests then wait in the engine; an inline engine waits
        a moment a round), else None."""

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


def _raw_response(response: Response) -> bytes:
    """A complete response with ``Connection: close``: the answer to a
    connection refused before the engine takes it."""
    reason = HTTPStatus(response.status).phrase
    lines = [f"HTTP/1.1 {response.status} {reason}"]
    lines += [f"{name}: {value}" for name, value in response.headers]
    lines += ["server: qmesh", f"content-length: {len(response.body)}", "connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + response.body
