"""The HTTP engine on the engine threads never runs ahead of its
bookkeeping: past ``max_fast_reports`` reports waiting for Python, whole
requests wait in the engine until Python takes the reports (over real
sockets, with a real upstream)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

import pytest
import trio
from llmkit import FakeProvider, start_provider
from tunnelkit import until

from qmesh import _core

pytestmark = pytest.mark.trio

PATH = "/v1/chat/completions"
BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
REQUEST = (
    b"POST " + PATH.encode() + b" HTTP/1.1\r\nhost: gate\r\nauthorization: Bearer k\r\n"
    b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(BODY), BODY)
)


class Stats:
    def __init__(self, engine: _core.HttpEngine) -> None:
        self.engine = engine

    @property
    def clients(self) -> int:
        return self.engine.stats()[0]

    @property
    def requests(self) -> int:
        return self.engine.stats()[3]

    @property
    def fast(self) -> int:
        return self.engine.stats()[6]


@pytest.fixture
async def engine_and_provider(
    nursery: trio.Nursery,
) -> AsyncIterator[tuple[_core.HttpEngine, FakeProvider]]:
    provider = await start_provider(nursery, "acme")
    engine = _core.HttpEngine(
        max_header_bytes=65_536, max_body_bytes=1 << 20, idle_timeout=30.0,
        request_timeout=30.0, max_fast_reports=2,
    )  # fmt: skip
    engine.route(
        b"Bearer k", PATH, "m", False, route=1, app="a", host="127.0.0.1", port=provider.port,
        request_head=b"POST " + PATH.encode() + b" HTTP/1.1\r\nhost: 127.0.0.1\r\n"
        b"content-type: application/json\r\n",
        upstream_model="m", headers=b"", first_byte_timeout=10.0, chunk_timeout=10.0,
        max_body=10_000, max_tokens=1_000, max_in_flight=100, ttl=60.0,
    )  # fmt: skip
    try:
        yield engine, provider
    finally:
        engine.close()


async def connect(engine: _core.HttpEngine, listener: trio.socket.SocketType) -> trio.SocketStream:
    client = await trio.open_tcp_stream(*listener.getsockname())
    accepted, peer = await listener.accept()
    engine.adopt(accepted.detach(), f"{peer[0]}:{peer[1]}")
    return client


async def read_answer(stream: trio.SocketStream) -> tuple[int, bytes]:
    """One whole answer on a kept-alive connection: its status and body."""
    data = b""
    with trio.fail_after(10):
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some(65_536)
        head, _, body = data.partition(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")[1:]
            if line.lower().startswith(b"content-length:")
        )
        while len(body) < length:
            body += await stream.receive_some(65_536)
    return int(head.split(b" ", 2)[1]), body


async def test_requests_wait_while_the_reports_wait_for_python(
    engine_and_provider: tuple[_core.HttpEngine, FakeProvider],
) -> None:
    engine, provider = engine_and_provider
    stats = Stats(engine)
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen()
    first, second, third = [await connect(engine, listener) for _ in range(3)]
    answered = []
    for client in (first, second):
        await client.send_all(REQUEST)
        status, body = await read_answer(client)
        assert status == 200 and b"answer from acme" in body
        answered.append(len(body))
    # Two reports wait for Python, as many as allowed: the third request is
    # read, then held (the engine counts it read and relays nothing).
    await third.send_all(REQUEST)
    await until(lambda: stats.requests == 3)
    assert stats.fast == 2
    before = time.monotonic()
    reports = engine.take()
    # Both in one batch, as Python books them: each with when it was read,
    # its body's size and the answer's usage.
    assert [type(r) for r in reports] == [_core.HttpFastBatch]
    batch = reports[0]
    assert isinstance(batch, _core.HttpFastBatch) and batch.route == 1
    assert [request[1:] for request in batch.requests] == [
        (len(BODY), provider.prompt_tokens, provider.completion_tokens, size) for size in answered
    ]
    assert all(0 < request[0] < before for request in batch.requests)
    # Taken: the held request goes on.
    status, body = await read_answer(third)
    assert status == 200 and b"answer from acme" in body
    assert stats.fast == 3 and provider.requests == 3

    # Held requests go on in order, all of them, once the reports are taken.
    await first.send_all(REQUEST)
    await read_answer(first)  # two reports wait again
    for client in (second, third):
        await client.send_all(REQUEST)
    await until(lambda: stats.requests == 6)
    assert stats.fast == 4
    batches = [r for r in engine.take() if isinstance(r, _core.HttpFastBatch)]
    assert [len(batch.requests) for batch in batches] == [2]
    for client in (second, third):
        status, _ = await read_answer(client)
        assert status == 200
    assert stats.fast == 6 and provider.requests == 6
