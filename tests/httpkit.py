"""Building blocks for HTTP server tests: a server on a free port, raw
exchanges over real sockets, and reading an answer."""

from __future__ import annotations

import trio

from qmesh.config import HttpConfig
from qmesh.web.http import Router
from qmesh.web.native import serve_http


async def start(nursery: trio.Nursery, router: Router, limits: HttpConfig | None = None) -> int:
    port: int = await nursery.start(lambda task_status: serve_http(
        router, "127.0.0.1", 0, limits=limits, task_status=task_status))  # fmt: skip
    return port


async def read_to_end(stream: trio.abc.ReceiveStream) -> bytes:
    received = bytearray()
    with trio.fail_after(10):
        try:
            while data := await stream.receive_some(65536):
                received += data
        except trio.BrokenResourceError:
            pass  # a reset after the answer: what came before still counts
    return bytes(received)


async def exchange(port: int, raw: bytes) -> bytes:
    """Send raw bytes, read until the server closes."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(raw)
        return await read_to_end(stream)


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def dechunked(response: bytes) -> bytes:
    """The body of a whole response in chunked transfer coding."""
    body = response.split(b"\r\n\r\n", 1)[1]
    data = b""
    while True:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return data
        data, body = data + body[:size], body[size + 2 :]
