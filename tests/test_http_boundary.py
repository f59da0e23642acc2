"""The HTTP server as a boundary (qmesh.web.http): whatever one peer's
request makes a handler do ends at most that request or connection, with a
logged reason; limits on connections, header and body sizes and times hold.
Real sockets on loopback, and real (short) timeouts."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import ssl
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import trio
import trio.lowlevel
import trio.testing
from httpkit import exchange, read_to_end, start, status_of

from qmesh.config import ConfigError, HttpConfig, load_config
from qmesh.web.http import Request, Response, Router
from qmesh.web.native import serve_http


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()


def body_of(response: bytes) -> bytes:
    return response.split(b"\r\n\r\n", 1)[1]


def recurse(depth: int = 0) -> int:
    return recurse(depth + 1) + 1


def raiser(make: Callable[[], BaseException]) -> Callable[[Request], object]:
    async def handler(request: Request) -> Response:
        raise make()

    return handler


# Each of these, raised (or returned) by a handler, ended today's server or
# left the client without an answer. KeyboardInterrupt and trio.Cancelled
# are deliberately absent: they are not a peer's doing and must pass.
FAILURES: dict[str, Callable[[Request], object]] = {
    "key-error": raiser(lambda: KeyError("missing")),
    "assertion": raiser(lambda: AssertionError("impossible")),
    "exception-group": raiser(lambda: ExceptionGroup("many", [ValueError("a"), OSError("b")])),
    "system-exit": raiser(lambda: SystemExit(3)),
    "asyncio-cancelled": raiser(lambda: asyncio.CancelledError()),  # a BaseException
    "base-group": raiser(lambda: BaseExceptionGroup("mixed", [SystemExit(1), KeyError("k")])),
}


def make_router() -> Router:
    router = Router()

    async def ok(request: Request) -> Response:
        return Response.json({"ok": True})

    async def recursion(request: Request) -> Response:
        return Response.json({"depth": recurse()})

    async def not_a_response(request: Request) -> Response:
        return "oops"  # type: ignore[return-value]

    async def bad_header(request: Request) -> Response:
        return Response(200, b"x", (("x-bad", "line\r\nbreak"),))

    async def echo(request: Request) -> Response:
        return Response.json({"got": request.json()})

    async def broken_stream(request: Request) -> Response:
        async def events() -> AsyncIterator[bytes]:
            yield b"data: first\n\n"
            await trio.lowlevel.checkpoint()
            raise KeyError("half-way")

        return Response.event_stream(events())

    router.add("GET", "/ok", ok)
    router.add("GET", "/recursion", recursion)
    router.add("GET", "/not-a-response", not_a_response)
    router.add("GET", "/bad-header", bad_header)
    router.add("POST", "/echo", echo)
    router.add("GET", "/broken-stream", broken_stream)
    for name, handler in FAILURES.items():
        router.add("GET", f"/raise/{name}", handler)  # type: ignore[arg-type]
    return router


async def test_a_handler_that_raises_anything_gets_a_500_and_the_server_serves_on(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    port = await start(nursery, make_router())
    # A kept-alive connection opened before the failures is served after them.
    bystander = await trio.open_tcp_stream("127.0.0.1", port)
    paths = [f"/raise/{name}" for name in FAILURES]
    paths += ["/recursion", "/not-a-response", "/bad-header"]
    with caplog.at_level(logging.ERROR, logger="qmesh.web.http"):
        for path in paths:
            answer = await exchange(port, get(path))
            assert status_of(answer) == 500, (path, answer)
            error = json.loads(body_of(answer))["error"]
            assert error == {
                "message": "internal error",
                "type": "server_error",
                "param": None,
                "code": None,
            }
            # Another client is served: the server is still there.
            assert status_of(await exchange(port, get("/ok"))) == 200, path
    # Each failure is logged with its reason (and the details stay in the log).
    logged = caplog.text
    reasons = ["KeyError", "AssertionError", "ExceptionGroup", "SystemExit", "CancelledError"]
    reasons += ["RecursionError", "TypeError", "a response header cannot be sent: 'x-bad'"]
    for reason in reasons:
        assert reason in logged, reason
    async with bystander:
        await bystander.send_all(get("/ok"))
        assert status_of(await read_to_end(bystander)) == 200


async def test_a_stream_that_fails_half_way_ends_only_its_own_connection(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    port = await start(nursery, make_router())
    with caplog.at_level(logging.ERROR, logger="qmesh.web.http"):
        answer = await exchange(port, get("/broken-stream"))
    assert status_of(answer) == 200 and b"data: first" in answer
    assert not answer.endswith(b"0\r\n\r\n")  # cut, not a clean end of the chunked body
    assert "KeyError" in caplog.text
    assert status_of(await exchange(port, get("/ok"))) == 200


async def test_a_stream_that_fails_half_way_to_an_http_1_0_client_is_reset(
    nursery: trio.Nursery,
) -> None:
    """An HTTP/1.0 client's streamed answer ends with the connection: cut
    short, it ends with a reset, or the client would take it as whole."""
    port = await start(nursery, make_router())
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"GET /broken-stream HTTP/1.0\r\n\r\n")
        received = b""
        with trio.fail_after(10), pytest.raises(trio.BrokenResourceError):
            while data := await stream.receive_some(65536):
                received += data
    assert status_of(received) == 200 and received.endswith(b"data: first\n\n")


async def test_deeply_nested_json_is_a_400_not_a_crash(nursery: trio.Nursery) -> None:
    port = await start(nursery, make_router())
    limit = sys.getrecursionlimit()
    for body in (b"[" * 16_000, b"[" * (limit * 2) + b"]" * (limit * 2), b'{"a":' * 5_000):
        head = f"POST /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {len(body)}"
        answer = await exchange(port, head.encode() + b"\r\n\r\n" + body)
        assert status_of(answer) == 400, answer[:200]
        assert "nested too deep" in json.loads(body_of(answer))["error"]["message"]
    fine = b'{"a": [[1, {"b": 2}]]}'
    head = f"POST /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {len(fine)}"
    answer = await exchange(port, head.encode() + b"\r\n\r\n" + fine)
    assert json.loads(body_of(answer)) == {"got": {"a": [[1, {"b": 2}]]}}


async def test_head_requests_are_answered_without_a_body(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    router = make_router()

    async def page(request: Request) -> Response:
        return Response.text("hello")

    router.add("HEAD", "/page", page)
    router.add("HEAD", "/events", router.resolve("GET", "/broken-stream")[0])
    port = await start(nursery, router)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        # Three on one connection: a body sent by mistake would desync them.
        raw = b"HEAD /page HTTP/1.1\r\nHost: x\r\n\r\n"
        raw += b"HEAD /ok HTTP/1.1\r\nHost: x\r\n\r\n"  # GET only: 405
        raw += b"HEAD /events HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        with caplog.at_level(logging.ERROR, logger="qmesh.web.http"):
            await stream.send_all(raw)
            answers = await read_to_end(stream)
    heads = answers.split(b"\r\n\r\n")
    assert [status_of(head) for head in heads[:3]] == [200, 405, 200]
    assert b"content-length: 5" in heads[0].lower() and heads[3] == b""
    assert not caplog.records


async def test_connections_beyond_the_limit_get_a_quick_503(nursery: trio.Nursery) -> None:
    port = await start(nursery, make_router(), HttpConfig(max_connections=2))
    held = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(2)]
    # Served, not just queued: each answers a request and stays open.
    for stream in held:
        await stream.send_all(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
        with trio.fail_after(10):
            assert b" 200 " in await stream.receive_some(65536)
    for _ in range(3):
        refused = await exchange(port, get("/ok"))
        assert status_of(refused) == 503, refused
        assert b"retry-after: 1" in refused.lower()
        error = json.loads(body_of(refused))["error"]
        assert "max_connections = 2" in error["message"] and error["code"] == "overloaded"
    await held[0].aclose()
    # Once the server has seen that connection end, a new one is served.
    with trio.fail_after(10):
        while status_of(answer := await exchange(port, get("/ok"))) == 503:  # noqa: ASYNC110
            await trio.sleep(0.01)
    assert status_of(answer) == 200
    await held[1].aclose()


async def test_a_tls_listener_refuses_over_tls(nursery: trio.Nursery, tmp_path: Path) -> None:
    from qmesh.web.tls import load_or_create

    server_tls = load_or_create(tmp_path)
    router, limits = make_router(), HttpConfig(max_connections=1)
    port: int = await nursery.start(
        functools.partial(serve_http, limits=limits, tls=server_tls), router, "127.0.0.1", 0
    )
    client_tls = ssl.create_default_context(cafile=str(server_tls.cert_file))

    async def connect() -> trio.SSLStream[trio.SocketStream]:
        return await trio.open_ssl_over_tcp_stream(
            "127.0.0.1", port, ssl_context=client_tls, https_compatible=True
        )

    held = await connect()
    async with held:
        await held.send_all(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
        with trio.fail_after(10):
            assert b" 200 " in await held.receive_some(65536)
        refused = await connect()
        async with refused:
            await refused.send_all(get("/ok"))
            answer = await read_to_end(refused)
        assert status_of(answer) == 503 and b"max_connections = 1" in answer


async def test_header_and_body_limits_are_configurable(nursery: trio.Nursery) -> None:
    port = await start(
        nursery, make_router(), HttpConfig(max_header_bytes=2048, max_body_bytes=1024)
    )
    big_header = b"GET /ok HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 4096 + b"\r\n\r\n"
    assert status_of(await exchange(port, big_header)) == 431
    body = b"[" + b"1," * 600 + b"1]"
    head = f"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    assert status_of(await exchange(port, head + body)) == 413
    assert status_of(await exchange(port, get("/ok"))) == 200


async def test_a_head_sent_a_byte_at_a_time_is_read_whole(nursery: trio.Nursery) -> None:
    """A head is parsed again only once a line ends past what was parsed:
    one that arrives a byte at a time is still read, and its limit held."""
    port = await start(nursery, make_router(), HttpConfig(max_header_bytes=2048))

    async def trickle(request: bytes) -> bytes:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            for i in range(len(request)):
                await stream.send_all(request[i : i + 1])
            return await read_to_end(stream)

    with trio.fail_after(30):
        assert status_of(await trickle(get("/ok"))) == 200
        long_line = b"GET /ok HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 4096
        assert status_of(await trickle(long_line)) == 431


# The engine keeps real time (Trio's fake clock cannot reach it): the
# timeouts below are short, and only their lower bound is exact.


async def test_a_request_that_trickles_in_gets_a_408(nursery: trio.Nursery) -> None:
    limits = HttpConfig(request_timeout_s=0.5, idle_timeout_s=1000.0)
    port = await start(nursery, make_router(), limits)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        started = trio.current_time()
        await stream.send_all(b"GET /ok HTTP/1.1\r\nHo")  # and nothing more
        answer = await read_to_end(stream)
    assert status_of(answer) == 408
    # The request timeout, not the (much longer) idle one, bounded it.
    assert 0.5 <= trio.current_time() - started < 10


async def test_an_idle_connection_is_closed_quietly(nursery: trio.Nursery) -> None:
    port = await start(nursery, make_router(), HttpConfig(idle_timeout_s=0.5))
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        started = trio.current_time()  # before the idle time can begin
        await stream.send_all(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")  # kept alive
        first = await stream.receive_some(65536)
        assert b" 200 " in first
        assert await read_to_end(stream) == b""  # closed, without an answer
    assert 0.5 <= trio.current_time() - started < 10


def test_the_limits_are_read_from_gate_http(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        "[gate.http]\nmax_connections = 100\nmax_body_bytes = 4096\nrequest_timeout_s = 5\n"
        "auth_failures_per_s = 2.5\nmax_requests_per_app = 8\nengine_threads = true\n"
    )
    http = load_config(path, env={"QMESH_GATE__HTTP__HASH_THREADS": "4"}).gate.http
    assert (http.max_connections, http.max_body_bytes, http.request_timeout_s) == (100, 4096, 5.0)
    assert (http.auth_failures_per_s, http.max_requests_per_app, http.hash_threads) == (2.5, 8, 4)
    assert http.engine_threads  # once accepted and then ignored
    assert http.max_header_bytes == HttpConfig().max_header_bytes  # the default
    assert load_config(None, env={}).gate.http == HttpConfig()
    path.write_text("[gate.http]\nmax_conections = 10\n")
    with pytest.raises(ConfigError, match="did you mean 'max_connections'"):
        load_config(path, env={})
    path.write_text("[gate.http]\nmax_connections = 0\n")
    with pytest.raises(ConfigError, match=r"gate\.http\.max_connections"):
        load_config(path, env={})
