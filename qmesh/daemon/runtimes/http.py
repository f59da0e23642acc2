"""A small HTTP/1.1 client on h11 and Trio: how the runtime adapters talk to model servers.

For: :func:`request`, an async context manager that sends one request (JSON
body or none) and hands back a :class:`ClientResponse` whose body can be
read whole (:meth:`~ClientResponse.read`, :meth:`~ClientResponse.json`) or
as it arrives (:meth:`~ClientResponse.iter_bytes`,
:meth:`~ClientResponse.iter_lines`, :func:`iter_sse`) — what streaming
token by token from llama.cpp's server, Ollama or vLLM needs. Errors are
:class:`HttpClientError` (could not talk to the server) and its subclass
:class:`HttpStatusError` (it answered with an error status).

One connection per request, closed at the end: the peers are model servers
on loopback or a LAN, where a connect costs far less than a generation, and
no pool means no stale-connection retries to get wrong.

Not for: TLS (put the server on loopback or behind a proxy), redirects,
cookies, HTTP/2 — or serving HTTP (:mod:`qmesh.web.http`).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any, Final
from urllib.parse import urlsplit

import h11
import trio

from qmesh.fastsocket import connect_tcp

__all__ = ["ClientResponse", "HttpClientError", "HttpStatusError", "iter_sse", "request"]

RECEIVE_SIZE: Final = 65536
MAX_ERROR_BODY: Final = 64 * 1024


class HttpClientError(Exception):
    """The exchange failed: cannot connect, timed out, the server closed the
    connection early or broke HTTP."""


class HttpStatusError(HttpClientError):
    """The server answered with a status of 400 or more (``status``, ``body``)."""

    def __init__(self, method: str, url: str, status: int, body: bytes) -> None:
        text = body[:500].decode("utf-8", errors="replace")
        super().__init__(f"{method} {url}: HTTP {status}: {text}")
        self.status = status
        self.body = body


class ClientResponse:
    """The status and headers of a response, and its body as a stream."""

    def __init__(
        self,
        conn: h11.Connection,
        stream: trio.SocketStream,
        head: h11.Response,
        read_timeout: float,
        where: str,
    ) -> None:
        self._conn = conn
        self._stream = stream
        self._read_timeout = read_timeout
        self._where = where
        self.status: int = head.status_code
        self.headers: dict[str, str] = {
            k.decode("latin-1").lower(): v.decode("latin-1") for k, v in head.headers
        }
        self._done = False

    async def iter_bytes(self) -> AsyncIterator[bytes]:
        """The body's chunks as they arrive (each read waits at most ``read_timeout``)."""
        while not self._done:
            event = await _next_event(self._conn, self._stream, self._read_timeout, self._where)
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self._done = True
            else:
                raise HttpClientError(f"{self._where}: unexpected {type(event).__name__}")

    async def read(self, limit: int | None = None) -> bytes:
        body = bytearray()
        async for chunk in self.iter_bytes():
            body += chunk
            if limit is not None and len(body) > limit:
                break
        return bytes(body)

    async def json(self) -> Any:
        body = await self.read()
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise HttpClientError(f"{self._where}: response is not JSON: {exc}") from None

    async def iter_lines(self) -> AsyncIterator[bytes]:
        """The body split at ``\\n`` (without it; ``\\r`` stripped), as lines complete."""
        buffer = bytearray()
        async for chunk in self.iter_bytes():
            buffer += chunk
            while (end := buffer.find(b"\n")) >= 0:
                line = bytes(buffer[:end]).rstrip(b"\r")
                del buffer[: end + 1]
                yield line
        if buffer:
            yield bytes(buffer).rstrip(b"\r")


async def iter_sse(response: ClientResponse) -> AsyncIterator[str]:
    """The ``data`` of each server-sent event (multi-line data joined by ``\\n``)."""
    data: list[str] = []
    async for line in response.iter_lines():
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        if line.startswith(b":"):
            continue  # a comment (keep-alive ping)
        field, _, value = line.decode("utf-8", errors="replace").partition(":")
        if field == "data":
            data.append(value[1:] if value.startswith(" ") else value)
    if data:
        yield "\n".join(data)


async def _next_event(
    conn: h11.Connection, stream: trio.SocketStream, wait_s: float, where: str
) -> h11.Event:
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise HttpClientError(f"{where}: bad HTTP from the server: {exc}") from None
        if event is h11.NEED_DATA:
            try:
                with trio.fail_after(wait_s):
                    data = await stream.receive_some(RECEIVE_SIZE)
            except trio.TooSlowError:
                raise HttpClientError(f"{where}: no data for {wait_s:g}s") from None
            except (trio.BrokenResourceError, OSError) as exc:
                raise HttpClientError(f"{where}: connection failed: {exc}") from None
            conn.receive_data(data)
            continue
        if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            raise HttpClientError(f"{where}: the server closed the connection early")
        assert isinstance(event, h11.Event)
        return event


@asynccontextmanager
async def request(
    method: str,
    url: str,
    *,
    json_body: Any = None,
    headers: Mapping[str, str] | None = None,
    connect_timeout: float = 10.0,
    read_timeout: float = 60.0,
    raise_for_status: bool = True,
) -> AsyncIterator[ClientResponse]:
    """Send one request to ``url`` (``http://host:port/path?query``).

    ``read_timeout`` bounds each wait for bytes, not the whole exchange, so a
    long stream of tokens is fine while a silent server is not. With
    ``raise_for_status`` a status ≥ 400 raises :class:`HttpStatusError` with
    (up to 64 KiB of) the body.
    """
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise HttpClientError(f"{url}: only http://host:port/… URLs are supported")
    host, port = parts.hostname, parts.port or 80
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    where = f"{method} {url}"
    body = b"" if json_body is None else json.dumps(json_body).encode()
    host_header = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    head = [("host", host_header), ("user-agent", "qmesh"), ("accept", "*/*")]
    if json_body is not None:
        head.append(("content-type", "application/json"))
    head.append(("content-length", str(len(body))))
    head.append(("connection", "close"))
    head += list((headers or {}).items())
    try:
        with trio.fail_after(connect_timeout):
            stream = await connect_tcp(host, port)
    except trio.TooSlowError:
        raise HttpClientError(f"{where}: connect timed out after {connect_timeout:g}s") from None
    except OSError as exc:
        raise HttpClientError(f"{where}: cannot connect: {exc}") from None
    try:
        conn = h11.Connection(h11.CLIENT)
        try:
            data = conn.send(h11.Request(method=method, target=target, headers=head))
            data += conn.send(h11.Data(data=body)) or b"" if body else b""
            data += conn.send(h11.EndOfMessage()) or b""
            await stream.send_all(data)
        except (trio.BrokenResourceError, OSError) as exc:
            raise HttpClientError(f"{where}: sending failed: {exc}") from None
        event = await _next_event(conn, stream, read_timeout, where)
        while isinstance(event, h11.InformationalResponse):
            event = await _next_event(conn, stream, read_timeout, where)
        if not isinstance(event, h11.Response):
            raise HttpClientError(f"{where}: expected a response, got {type(event).__name__}")
        response = ClientResponse(conn, stream, event, read_timeout, where)
        if raise_for_status and response.status >= 400:
            error_body = await response.read(limit=MAX_ERROR_BODY)
            raise HttpStatusError(method, url, response.status, error_body)
        yield response
    finally:
        await trio.aclose_forcefully(stream)
