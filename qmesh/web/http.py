"""A small HTTP/1.1 server on h11 and Trio, for the Gate's APIs.

h11 is the sans-IO protocol core; this module is the thin Trio loop around
it plus routing. Keep-alive, request size limits, idle and header timeouts,
and streamed responses (SSE) are handled here so handlers only map a
:class:`Request` to a :class:`Response`.

Not for: TLS termination or HTTP/2 (put a proxy in front), nor anything that
needs per-request imports — the router is built once at start-up.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import parse_qs, urlsplit

import attrs
import h11
import trio

from qmesh.fastsocket import FastSocketStream

log = logging.getLogger(__name__)

MAX_BODY = 16 * 1024 * 1024
MAX_HEADER = 64 * 1024
IDLE_TIMEOUT_S = 75.0  # between requests on a kept-alive connection
REQUEST_TIMEOUT_S = 30.0  # to receive one whole request once it started
RECEIVE_SIZE = 65536


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
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.code = code
        self.param = param  # the request field at fault, as OpenAI's errors name it

    def response(self) -> Response:
        error = {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}
        return Response.json({"error": error}, status=self.status)


@attrs.frozen
class Request:
    method: str
    path: str
    query: Mapping[str, list[str]]
    headers: Mapping[str, str]  # lower-case names; repeated headers joined with ", "
    body: bytes
    path_params: Mapping[str, str] = attrs.field(factory=dict)
    client: str = ""

    def json(self) -> Any:
        """The body as JSON, or a 400 that says why not."""
        try:
            return json.loads(self.body)
        except (ValueError, UnicodeDecodeError) as exc:
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


Handler = Callable[[Request], Awaitable[Response]]


class Router:
    """Method + path → handler. Paths are exact, or have ``{name}`` segments."""

    def __init__(self) -> None:
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


async def serve_http(
    router: Router,
    host: str,
    port: int,
    *,
    max_body: int = MAX_BODY,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``router`` on ``host:port``; ``task_status.started`` gets the bound port."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound: int = listeners[0].socket.getsockname()[1]
    log.info("http listening on %s:%d", host, bound)
    task_status.started(bound)

    async def serve_one(stream: trio.SocketStream) -> None:
        try:
            client = "{}:{}".format(*stream.socket.getpeername()[:2])
        except OSError:
            client = "?"
        await serve_stream(router, FastSocketStream(stream), client=client, max_body=max_body)

    await trio.serve_listeners(serve_one, listeners)


async def serve_stream(
    router: Router, stream: trio.abc.Stream, *, client: str, max_body: int = MAX_BODY
) -> None:
    """Serve HTTP/1.1 on one already-open byte stream (a TCP connection, or
    a tunnel stream carrying an edge's connection) until it ends; closes it."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER)
    try:
        while True:
            with trio.move_on_after(IDLE_TIMEOUT_S) as idle:
                event = await _next_event(conn, stream)
            if idle.cancelled_caught or event is None:
                return
            if not isinstance(event, h11.Request):
                return
            try:
                with trio.fail_after(REQUEST_TIMEOUT_S):
                    request = await _read_request(conn, stream, event, max_body, client)
            except trio.TooSlowError:
                await _send_error(conn, stream, HttpError(408, "request took too long"))
                return
            except HttpError as error:
                await _send_error(conn, stream, error)
                return
            response = await _handle(router, request)
            await _send_response(conn, stream, response)
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return
    except h11.RemoteProtocolError as exc:
        await _send_error(conn, stream, HttpError(exc.error_status_hint, f"bad request: {exc}"))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    except Exception:
        # A streamed response's generator failed after the head was sent:
        # all we can do is cut the connection (the client sees a truncated
        # chunked body, not a clean end), and keep serving everyone else.
        log.exception("response to %s failed while streaming", client)
    finally:
        await trio.aclose_forcefully(stream)


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
    conn: h11.Connection, stream: trio.abc.Stream, head: h11.Request, max_body: int, client: str
) -> Request:
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
    raw_target = head.target.decode("latin-1")
    if "?" in raw_target or "#" in raw_target or not raw_target.startswith("/"):
        target = urlsplit(raw_target)
        path, query = target.path or "/", parse_qs(target.query)
    else:  # the common case, without the cost of urlsplit and parse_qs
        path, query = raw_target, {}
    return Request(
        method=head.method.decode("ascii"),
        path=path,
        query=query,
        headers=headers,
        body=bytes(body),
        client=client,
    )


async def _handle(router: Router, request: Request) -> Response:
    observe = router.observe
    started = time.perf_counter() if observe is not None else 0.0
    handler: Handler | None = None
    try:
        handler, params = router.resolve(request.method, request.path)
        response = await handler(attrs.evolve(request, path_params=params) if params else request)
    except HttpError as error:
        response = error.response()
    except Exception:
        log.exception("handler for %s %s failed", request.method, request.path)
        response = HttpError(500, "internal error", kind="server_error").response()
    if observe is not None:
        observe(
            request.method, router.route_of(handler), response.status, time.perf_counter() - started
        )
    return response


async def _send(conn: h11.Connection, stream: trio.abc.Stream, event: h11.Event) -> None:
    data = conn.send(event)
    if data:
        await stream.send_all(data)


async def _send_response(
    conn: h11.Connection, stream: trio.abc.Stream, response: Response, *, close: bool = False
) -> None:
    headers = [(k.encode(), v.encode()) for k, v in response.headers]
    headers.append((b"server", b"qmesh"))
    if close:
        headers.append((b"connection", b"close"))
    if response.stream is None:
        headers.append((b"content-length", str(len(response.body)).encode()))
        # Head, body and end in one write: one syscall per response, not three.
        data = conn.send(h11.Response(status_code=response.status, headers=headers)) or b""
        if response.body:
            data += conn.send(h11.Data(data=response.body)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        await stream.send_all(data)
        return
    else:
        headers.append((b"transfer-encoding", b"chunked"))
        await _send(conn, stream, h11.Response(status_code=response.status, headers=headers))
        try:
            async for chunk in response.stream:
                if chunk:
                    await _send(conn, stream, h11.Data(data=chunk))
        finally:
            # A client that hangs up mid-stream must stop the producer now
            # (a generation on a daemon, say), not when the GC finds it.
            aclose = getattr(response.stream, "aclose", None)
            if aclose is not None:
                await aclose()
    await _send(conn, stream, h11.EndOfMessage())


async def _send_error(conn: h11.Connection, stream: trio.abc.Stream, error: HttpError) -> None:
    """Answer an error if the protocol state still allows a response, then give up."""
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    try:
        await _send_response(conn, stream, error.response(), close=True)
    except (h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass
