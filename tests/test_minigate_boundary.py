"""The MiniGate's listeners as a boundary: an unexpected failure while
serving one local connection ends that connection only, and the listener
keeps serving the next one."""

from __future__ import annotations

from typing import Any, cast

import pytest
import trio

from qmesh.forward.edge import serve_forward
from qmesh.llm.edge import serve_llm
from qmesh.pg.edge import serve_pg
from qmesh.tunnel import TunnelClient, TunnelError


class FailingClient:
    """Stands in for the edge's tunnel client: the first call fails with an
    exception type no handler expects, later ones as the tunnel would when the
    Gate is away."""

    def __init__(self, error: BaseException) -> None:
        self.error = error
        self.calls = 0

    async def open_stream(self, request: dict[str, Any]) -> Any:
        self.calls += 1
        raise self.error if self.calls == 1 else TunnelError("gate unreachable")


async def _read_all(port: int, send: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        if send:
            await stream.send_all(send)
        answer = bytearray()
        try:
            while data := await stream.receive_some(65536):
                answer += data
        except trio.BrokenResourceError:
            pass
        return bytes(answer)


UNEXPECTED = [RecursionError("deep"), KeyError("k"), ExceptionGroup("g", [ValueError("v")])]


@pytest.mark.parametrize("error", UNEXPECTED, ids=lambda e: type(e).__name__)
async def test_the_llm_listener_survives_an_unexpected_error(
    nursery: trio.Nursery, error: BaseException
) -> None:
    client = FailingClient(error)
    port = await nursery.start(serve_llm, cast(TunnelClient, client), "127.0.0.1:0")
    with trio.fail_after(10):
        assert await _read_all(port, b"GET /v1/models HTTP/1.1\r\n\r\n") == b""
        second = await _read_all(port, b"GET /v1/models HTTP/1.1\r\n\r\n")
    assert second.startswith(b"HTTP/1.1 503") and b"no_gate" in second
    assert client.calls == 2


@pytest.mark.parametrize("error", UNEXPECTED, ids=lambda e: type(e).__name__)
async def test_the_forward_listener_survives_an_unexpected_error(
    nursery: trio.Nursery, error: BaseException
) -> None:
    client = FailingClient(error)
    port = await nursery.start(
        serve_forward, cast(TunnelClient, client), "127.0.0.1:0", "127.0.0.1:9"
    )
    with trio.fail_after(10):
        assert await _read_all(port, b"x") == b""
        assert await _read_all(port, b"x") == b""
    assert client.calls == 2


@pytest.mark.parametrize("error", UNEXPECTED, ids=lambda e: type(e).__name__)
async def test_the_postgres_listener_survives_an_unexpected_error(
    nursery: trio.Nursery, error: BaseException
) -> None:
    client = FailingClient(error)
    port = await nursery.start(serve_pg, cast(TunnelClient, client), "127.0.0.1:0")
    # A CancelRequest opens a tunnel stream at once (no authentication).
    cancel = (16).to_bytes(4, "big") + (80877102).to_bytes(4, "big") + bytes(8)
    with trio.fail_after(10):
        assert await _read_all(port, cancel) == b""
        assert await _read_all(port, cancel) == b""
    assert client.calls == 2
