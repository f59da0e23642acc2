"""The HTTP engine (``_core.HttpEngine``) over real sockets: what it reads
from hostile clients, and how it relays an upstream's answer on the LLM path
(pass-through of server-sent events, failover before the end of an answer,
a kept-alive upstream connection that the server closed)."""

from __future__ import annotations

import functools
import json
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.lowlevel
from httpkit import dechunked, exchange, read_to_end, start, status_of
from llmkit import GateApi, flushed_rows, paid_model, provider_config, start_api, start_provider
from testca import make_ca_and_server
from tunnelkit import until

from qmesh import _core
from qmesh.config import HttpConfig, ProviderConfig
from qmesh.llm import executor as executor_module
from qmesh.web import native as native_module
from qmesh.web.http import Request, Response, Router
from qmesh.web.native import serve_http

Script = Callable[[trio.SocketStream, bytes], Awaitable[bool]]
"""An upstream's answer to one request (its head and body as received):
True to keep the connection for another."""


class RawUpstream:
    """An upstream that answers each request as a script says, byte by byte."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.requests: list[bytes] = []
        self.port = 0

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        buffer = b""
        async with stream:
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(buffer) < length:
                    buffer += await stream.receive_some(65536)
                request, buffer = head + b"\r\n\r\n" + buffer[:length], buffer[length:]
                self.requests.append(request)
                if not await self.script(stream, request):
                    return


def completion(text: str, prompt_tokens: int = 5, completion_tokens: int = 3) -> bytes:
    body = {
        "id": "chatcmpl-raw",
        "object": "chat.completion",
        "created": 0,
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
    }  # fmt: skip
    data = json.dumps(body).encode()
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
    return head % len(data) + data


def chat_request(api: GateApi, model: str, *, stream: bool = False, content: str = "hi") -> bytes:
    body = json.dumps(
        {"model": model, "stream": stream, "messages": [{"role": "user", "content": content}]}
    ).encode()
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gate\r\n"
        b"Authorization: Bearer %s\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (api.tokens["app-a"].encode(), len(body), body)
    )


# -- reading requests --------------------------------------------------------------


def echo_router() -> Router:
    router = Router()

    async def echo(request: Request) -> Response:
        return Response(200, request.body, (("content-type", "application/octet-stream"),))

    router.add("POST", "/echo", echo)
    router.add("GET", "/ok", echo)
    return router


async def test_chunked_bodies_and_pipelined_requests_are_read_whole(
    nursery: trio.Nursery,
) -> None:
    port = await start(nursery, echo_router())
    chunked = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunked += b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nTrailer: t\r\n\r\n"
    plain = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc"
    raw = await exchange(port, chunked + plain)
    assert raw.count(b"HTTP/1.1 200 OK") == 2
    assert raw.index(b"hello world") < raw.index(b"\r\n\r\nabc")
    assert raw.endswith(b"abc")


def held_router(entered: trio.Event, release: trio.Event) -> Router:
    """``GET /held``: answered once ``release`` is set; ``POST /echo``."""
    router = echo_router()

    async def held(request: Request) -> Response:
        entered.set()
        await release.wait()
        return Response(200, b"held", (("content-type", "text/plain"),))

    router.add("GET", "/held", held)
    return router


@pytest.mark.parametrize("threads", [False, True], ids=["inline", "engine-threads"])
async def test_a_request_sent_while_another_is_answered_waits_its_turn(
    nursery: trio.Nursery, threads: bool
) -> None:
    entered, release = trio.Event(), trio.Event()
    port = await start(nursery, held_router(entered, release), HttpConfig(engine_threads=threads))
    body = bytes(range(256)) * 1200  # more than the engine reads ahead
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"GET /held HTTP/1.1\r\nHost: x\r\n\r\n")
        with trio.fail_after(10):
            await entered.wait()
        next_request = b"POST /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        next_request += b"Content-Length: %d\r\n\r\n" % len(body)
        async with trio.open_nursery() as sending:
            sending.start_soon(stream.send_all, next_request + body)
            release.set()
            raw = await read_to_end(stream)
    first, _, second = raw.partition(b"held")
    assert status_of(first) == 200 and status_of(second) == 200
    assert second.endswith(b"\r\n\r\n" + body)


@pytest.mark.parametrize("threads", [False, True], ids=["inline", "engine-threads"])
async def test_a_client_that_half_closes_after_its_request_gets_the_whole_answer(
    nursery: trio.Nursery, threads: bool
) -> None:
    big = bytes(range(256)) * 16384  # 4 MiB: most of it still queued when the answer is done
    router = Router()

    async def answer(request: Request) -> Response:
        return Response(200, big, (("content-type", "application/octet-stream"),))

    router.add("GET", "/big", answer)
    port = await start(nursery, router, HttpConfig(engine_threads=threads))
    sock = trio.socket.socket()
    # A small window: the engine cannot write the answer before it sees the end.
    sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 16384)
    await sock.connect(("127.0.0.1", port))
    stream = trio.SocketStream(sock)
    async with stream:
        await stream.send_all(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        await stream.send_eof()
        raw = await read_to_end(stream)
    assert status_of(raw) == 200
    assert raw.partition(b"\r\n\r\n")[2] == big


HOSTILE = {
    "chunked size not hexadecimal": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n",
        400,
    ),
    "chunk data not ended by CRLF": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhello\r\n",
        400,
    ),
    "length and chunked at once": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "two different lengths": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        400,
    ),
    "another coding": (b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    "a TLS ClientHello on the plain port": (
        bytes.fromhex("160301020001000200030300") + bytes(range(64)) + b"\r\n\r\n",
        400,
    ),
    "a chunk size over 16 hex digits": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"f" * 17
        + b"\r\n",
        400,
    ),
    "a body over the limit, chunked": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"800\r\n"
        + b"a" * 2048
        + b"\r\n",
        413,
    ),
    "a head over the limit": (b"GET /ok HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 5000, 431),
}


@pytest.mark.parametrize("threads", [False, True], ids=["inline", "engine-threads"])
@pytest.mark.parametrize("name", list(HOSTILE))
async def test_hostile_input_ends_only_its_own_connection(
    nursery: trio.Nursery, name: str, threads: bool
) -> None:
    limits = HttpConfig(max_header_bytes=4096, max_body_bytes=1024, engine_threads=threads)
    port = await start(nursery, echo_router(), limits)
    bystander = await trio.open_tcp_stream("127.0.0.1", port)
    raw, status = HOSTILE[name]
    answer = await exchange(port, raw)  # read until the server closes
    assert status_of(answer) == status, answer
    error = json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
    assert error["message"] and error["type"]
    assert b"connection: close" in answer.lower()
    async with bystander:
        await bystander.send_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                                 b"Connection: close\r\n\r\nok")  # fmt: skip
        served = await read_to_end(bystander)
    assert status_of(served) == 200 and served.endswith(b"ok")


async def test_expect_continue_gets_the_go_ahead(nursery: trio.Nursery) -> None:
    port = await start(nursery, echo_router())
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
                              b"Expect: 100-continue\r\nConnection: close\r\n\r\n")  # fmt: skip
        with trio.fail_after(10):
            interim = await stream.receive_some(65536)
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        await stream.send_all(b"body")
        rest = interim[len(b"HTTP/1.1 100 Continue\r\n\r\n") :] + await read_to_end(stream)
    assert status_of(rest) == 200 and rest.endswith(b"body")


async def test_an_http_1_0_client_gets_no_go_ahead_and_no_chunks(nursery: trio.Nursery) -> None:
    """HTTP/1.0 knows neither 100 Continue nor chunked answers: a streamed
    answer to such a client ends with the connection instead."""
    router = echo_router()

    async def events(request: Request) -> Response:
        async def pieces() -> AsyncIterator[bytes]:
            for piece in (b"data: one\n\n", b"data: two\n\n"):
                yield piece
                await trio.lowlevel.checkpoint()

        return Response.event_stream(pieces())

    router.add("GET", "/events", events)
    port = await start(nursery, router)
    with trio.fail_after(10):
        echoed = await exchange(
            port,
            b"POST /echo HTTP/1.0\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\nbody",
        )
        streamed = await exchange(port, b"GET /events HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    assert status_of(echoed) == 200 and echoed.endswith(b"\r\n\r\nbody")
    assert b"100 Continue" not in echoed
    head, _, body = streamed.partition(b"\r\n\r\n")
    assert status_of(streamed) == 200
    assert b"transfer-encoding" not in head.lower() and b"connection: close" in head.lower()
    assert body == b"data: one\n\ndata: two\n\n"


# -- relaying upstream answers -----------------------------------------------------------


async def test_server_sent_events_pass_through_as_they_come(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    release = trio.Event()

    async def script(stream: trio.SocketStream, request: bytes) -> bool:
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        first = b'data: {"choices":[{"delta":{"content":"first"}}]}\n\n'
        await stream.send_all(b"%x\r\n%s\r\n" % (len(first), first))
        await release.wait()  # the client must have the first event before this
        usage = b'data: {"choices":[],"usage":{"prompt_tokens":11,"completion_tokens":22}}\n\n'
        done = b"data: [DONE]\n\n"
        for event in (usage, done):
            await stream.send_all(b"%x\r\n%s\r\n" % (len(event), event))
        await stream.send_all(b"0\r\n\r\n")
        return True

    upstream = RawUpstream(script)
    await nursery.start(upstream.serve)
    api = await start_api(
        nursery, tmp_path, providers=[provider_config("raw", upstream.port, [paid_model("m")])]
    )
    client = await trio.open_tcp_stream("127.0.0.1", api.port)
    async with client:
        await client.send_all(chat_request(api, "m", stream=True))
        received = b""
        with trio.fail_after(10):
            while b"first" not in received:
                received += await client.receive_some(65536)
        assert b"[DONE]" not in received
        release.set()
        with trio.fail_after(10):
            while not received.endswith(b"0\r\n\r\n"):
                received += await client.receive_some(65536)
    assert status_of(received) == 200
    assert b"text/event-stream" in received and b"data: [DONE]" in received
    assert api.service.executor.relayed == 1
    row = (await flushed_rows(api, 1))[-1]
    assert (row["outcome"], row["tokens_in"], row["tokens_out"]) == ("ok", 11, 22)
    # The Gate asked the upstream for usage in the stream.
    sent = json.loads(upstream.requests[0].split(b"\r\n\r\n", 1)[1])
    assert sent["stream_options"] == {"include_usage": True}


async def test_an_upstream_held_back_by_a_slow_client_is_not_blamed(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While its client does not read, the engine stops reading the upstream:
    the upstream's silence then is the client's doing, and must not end the
    answer as the upstream's failure (which would cool the provider down for
    every app)."""
    monkeypatch.setattr(executor_module, "CHUNK_TIMEOUT_S", 0.3)
    event = b"data: " + json.dumps({"choices": [{"delta": {"content": "x" * 1000}}]}).encode()
    events = 6000  # some 6 MB: more than the sockets between hold

    async def script(stream: trio.SocketStream, request: bytes) -> bool:
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        chunk = b"%x\r\n%s\n\n\r\n" % (len(event) + 2, event)
        for _ in range(events):
            await stream.send_all(chunk)
        done = b"data: [DONE]\n\n"
        await stream.send_all(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
        return True

    engines: list[_core.HttpEngine] = []
    serve = native_module.NativeHttpServer.__init__

    def serving(server: native_module.NativeHttpServer, *args: Any, **kwargs: Any) -> None:
        serve(server, *args, **kwargs)
        engines.append(server.engine)

    monkeypatch.setattr(native_module.NativeHttpServer, "__init__", serving)
    upstream = RawUpstream(script)
    await nursery.start(upstream.serve)
    api = await start_api(
        nursery, tmp_path, providers=[provider_config("raw", upstream.port, [paid_model("m")])]
    )
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect(("127.0.0.1", api.port))
    client = trio.SocketStream(sock)
    async with client:
        await client.send_all(chat_request(api, "m", stream=True))
        # Not reading, while the upstream's chunk timeout passes three times.
        (engine,) = engines
        await until(lambda: engine.stats()[7] >= 3, timeout_s=30)
        received = b""
        with trio.fail_after(30):
            while not received.endswith(b"0\r\n\r\n"):
                received += await client.receive_some(1 << 20)
    body = dechunked(received)
    assert body.endswith(b"data: [DONE]\n\n") and body.count(b"x" * 1000) == events
    row = (await flushed_rows(api, 1))[-1]
    assert row["outcome"] == "ok", row


BROKEN_ANSWERS: dict[str, Callable[[], bytes]] = {
    # The body ends 20 bytes early, then the connection.
    "cut short": lambda: completion("never whole")[:-20],
    "a garbage head": lambda: b"HTTP/1.1 2OO OK\r\n\x00\x01\r\n\r\n{}",
    "broken chunked framing": lambda: (
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n"
    ),
}


@pytest.mark.parametrize("kind", list(BROKEN_ANSWERS))
async def test_a_broken_answer_moves_to_the_next_candidate(
    nursery: trio.Nursery, tmp_path: Path, kind: str
) -> None:
    async def broken_answer(stream: trio.SocketStream, request: bytes) -> bool:
        await stream.send_all(BROKEN_ANSWERS[kind]())
        return False  # and close

    broken = RawUpstream(broken_answer)
    await nursery.start(broken.serve)
    first = provider_config("broken", broken.port, [paid_model("m-broken", quality=5)])
    api, _ = await answered_by_the_next(nursery, tmp_path, first)
    assert broken.requests
    assert api.service.executor.relayed == 1


async def answered_by_the_next(
    nursery: trio.Nursery, tmp_path: Path, first: ProviderConfig
) -> tuple[GateApi, str]:
    """A Gate whose best candidate is ``first``, then a good provider: a
    request answered by the good one after ``first`` failed; the Gate, and
    the ledger's account of the hops."""
    good = await start_provider(nursery, "good")
    api = await start_api(
        nursery,
        tmp_path,
        providers=[first, provider_config("good", good.port, [paid_model("m-good", quality=4)])],
    )
    answer = await exchange(
        api.port,
        chat_request(api, "qg://task=chat;prefer=quality").replace(
            b"Host: gate\r\n", b"Host: gate\r\nConnection: close\r\n"
        ),
    )
    assert status_of(answer) == 200, answer
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["choices"][0]["message"]["content"] == (
        "answer from good"
    )
    assert good.requests == 1
    hops = str((await flushed_rows(api, 1))[-1]["hops"])
    assert [h["outcome"] for h in json.loads(hops)] == ["failed", "ok"]
    return api, hops


async def test_a_tls_answer_cut_without_close_notify_is_not_taken_as_whole(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An https upstream's answer delimited by the connection's end, which
    then ends without TLS's close_notify: anyone on the path could have cut
    it there, so it is a broken answer, not a whole one."""
    ca, cert, key = make_ca_and_server(tmp_path / "upstream-tls", "upstream")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    async def cut(transport: trio.SocketStream) -> None:
        stream = trio.SSLStream(transport, context, server_side=True)
        received = b""
        while b"\r\n\r\n" not in received:
            received += await stream.receive_some(65536)
        answer = completion("cut anywhere")
        head, _, body = answer.partition(b"\r\n\r\n")
        delimited_by_the_end = head.replace(b"content-length", b"x-length")
        await stream.send_all(delimited_by_the_end + b"\r\n\r\n" + body)
        await transport.aclose()  # the TCP connection, without close_notify

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    nursery.start_soon(trio.serve_listeners, cut, listeners)
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))  # the roots the Gate trusts
    first = provider_config("cut", port, [paid_model("m-cut", quality=5)])
    first = attrs.evolve(first, base_url=f"https://127.0.0.1:{port}/v1")
    _, hops = await answered_by_the_next(nursery, tmp_path, first)
    assert "close_notify" in hops


async def test_a_kept_alive_upstream_connection_the_server_closed_is_replaced(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    async def one_per_connection(stream: trio.SocketStream, request: bytes) -> bool:
        await stream.send_all(completion("fresh"))
        return False  # closes without saying so (no "connection: close")

    upstream = RawUpstream(one_per_connection)
    await nursery.start(upstream.serve)
    api = await start_api(
        nursery, tmp_path, providers=[provider_config("raw", upstream.port, [paid_model("m")])]
    )
    client = await trio.open_tcp_stream("127.0.0.1", api.port)
    async with client:
        for _ in range(3):
            await client.send_all(chat_request(api, "m"))
            received = b""
            with trio.fail_after(10):
                while b"fresh" not in received:
                    received += await client.receive_some(65536)
            assert status_of(received) == 200
    assert len(upstream.requests) == 3 and upstream.connections == 3
    rows = await flushed_rows(api, 3)
    assert [r["outcome"] for r in rows] == ["ok"] * 3
    assert api.service.executor.relayed == 3


async def test_an_upstream_that_answered_before_reading_the_whole_request_is_not_reused(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """A backend may answer before it has read all of a large request (a body
    it refuses early) and keep the connection: the rest of the body would be
    read as the next request on it, another client's perhaps."""
    answered = trio.Event()
    heads: list[bytes] = []

    async def answer_at_the_head(stream: trio.SocketStream) -> None:
        async with stream:
            buffer = b""
            while b"\r\n\r\n" not in buffer:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buffer += data
            heads.append(buffer.partition(b"\r\n")[0])
            await stream.send_all(completion("early"))
            # Read on only once the Gate had the answer: until then the
            # body's rest cannot have gone out.
            await answered.wait()
            while await stream.receive_some(65536):
                pass

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    # A small window: most of a large body stays unsent while unread.
    listeners[0].socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    port = listeners[0].socket.getsockname()[1]
    nursery.start_soon(trio.serve_listeners, answer_at_the_head, listeners)
    api = await start_api(
        nursery,
        tmp_path,
        providers=[provider_config("raw", port, [paid_model("m", context=4_000_000)])],
    )
    large = chat_request(api, "m", content="x" * (8 << 20))
    client = await trio.open_tcp_stream("127.0.0.1", api.port)
    async with client:
        for request in (large, chat_request(api, "m")):
            await client.send_all(request)
            received = b""
            with trio.move_on_after(10):
                while b"\r\n\r\n" not in received:
                    received += await client.receive_some(65536)
            assert status_of(received) == 200, (received[:300], heads)
            answered.set()
    assert heads == [b"POST /v1/chat/completions HTTP/1.1"] * 2, "a connection was reused"
    assert api.service.executor.relayed == 2


@pytest.mark.parametrize("threads", [False, True], ids=["inline", "engine-threads"])
async def test_tls_is_served_by_the_engine(
    nursery: trio.Nursery, tmp_path: Path, threads: bool
) -> None:
    from qmesh.web.tls import load_or_create

    server_tls = load_or_create(tmp_path)
    limits = HttpConfig(engine_threads=threads)
    port: int = await nursery.start(
        functools.partial(serve_http, tls=server_tls, limits=limits), echo_router(), "127.0.0.1", 0
    )
    client_tls = ssl.create_default_context(cafile=str(server_tls.cert_file))
    big = bytes(range(256)) * 4096  # 1 MiB, each way
    secure = await trio.open_ssl_over_tcp_stream(
        "127.0.0.1", port, ssl_context=client_tls, https_compatible=True
    )
    async with secure:
        await secure.do_handshake()
        assert secure.version() == "TLSv1.3"
        for last in (False, False, True):
            close = b"Connection: close\r\n" if last else b""
            head = b"POST /echo HTTP/1.1\r\nHost: x\r\n%sContent-Length: %d\r\n\r\n"
            await secure.send_all(head % (close, len(big)) + big)
            received = b""
            with trio.fail_after(20):
                while not received.endswith(big):
                    data = await secure.receive_some(1 << 20)
                    assert data, received[:200]
                    received += data
            assert status_of(received) == 200
        with trio.fail_after(10):
            assert await secure.receive_some(65536) == b""  # close_notify, then the end
    # Garbage where a handshake belongs ends that connection only.
    assert await exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") == b""
    again = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=client_tls)
    async with again:
        await again.send_all(b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert status_of(await read_to_end(again)) == 200
