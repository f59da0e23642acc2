"""The Gate's HTTP server (h11 under Trio) over real sockets."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.lowlevel
from httpkit import exchange, start, status_of

from qmesh.config import HttpConfig
from qmesh.operator_roles import Right
from qmesh.state import StateStore
from qmesh.web.auth import AppAuthenticator
from qmesh.web.http import HttpError, Request, Response, Router


def body_of(response: bytes) -> bytes:
    return response.split(b"\r\n\r\n", 1)[1]


def make_router() -> Router:
    router = Router()

    async def echo(request: Request) -> Response:
        return Response.json({"got": request.json(), "id": request.path_params.get("id")})

    async def boom(request: Request) -> Response:
        raise RuntimeError("bug")

    async def teapot(request: Request) -> Response:
        raise HttpError(418, "short and stout", code="teapot")

    async def events(request: Request) -> Response:
        async def gen() -> AsyncIterator[bytes]:
            for i in range(3):
                yield f"data: {i}\n\n".encode()
                await trio.lowlevel.checkpoint()

        return Response.event_stream(gen())

    router.add("POST", "/echo", echo)
    router.add("POST", "/items/{id}", echo)
    router.add("GET", "/boom", boom)
    router.add("GET", "/teapot", teapot)
    router.add("GET", "/events", events)
    return router


async def test_keep_alive_serves_many_requests_on_one_connection(nursery: trio.Nursery) -> None:
    port = await start(nursery, make_router())
    body = b'{"a": 1}'
    one = b"POST /items/42 HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    last = one.replace(b"Host: x", b"Host: x\r\nConnection: close")
    raw = await exchange(port, one * 3 + last)
    assert raw.count(b"HTTP/1.1 200") == 4
    assert raw.count(b'{"got":{"a":1},"id":"42"}') == 4


async def test_errors_are_openai_style_json(nursery: trio.Nursery) -> None:
    port = await start(nursery, make_router())
    close = b"Host: x\r\nConnection: close\r\n"
    cases = {
        b"GET /nope HTTP/1.1\r\n" + close + b"\r\n": 404,
        b"GET /echo HTTP/1.1\r\n" + close + b"\r\n": 405,
        b"POST /echo HTTP/1.1\r\n" + close + b"Content-Length: 3\r\n\r\n{x}": 400,
        b"GET /teapot HTTP/1.1\r\n" + close + b"\r\n": 418,
        b"GET /boom HTTP/1.1\r\n" + close + b"\r\n": 500,
    }
    for raw, status in cases.items():
        response = await exchange(port, raw)
        assert status_of(response) == status, response
        error = json.loads(body_of(response))["error"]
        assert error["message"] and error["type"]
    assert b"bug" not in await exchange(port, b"GET /boom HTTP/1.1\r\n" + close + b"\r\n")


async def test_oversized_and_malformed_requests_do_not_hurt_the_server(
    nursery: trio.Nursery,
) -> None:
    port = await start(nursery, make_router(), HttpConfig(max_body_bytes=1000))
    big = await exchange(port, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n")
    assert status_of(big) == 413
    garbage = await exchange(port, b"\x16\x03\x01\x02\x00 not http at all\r\n\r\n")
    assert status_of(garbage) == 400
    fine = await exchange(
        port, b"POST /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 2\r\n\r\n[]"
    )
    assert status_of(fine) == 200


async def test_event_stream_is_chunked(nursery: trio.Nursery) -> None:
    port = await start(nursery, make_router())
    raw = await exchange(port, b"GET /events HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert b"transfer-encoding: chunked" in raw.lower()
    assert all(f"data: {i}".encode() in raw for i in range(3))


async def test_app_authenticator(tmp_path: Path) -> None:
    store = StateStore.open(tmp_path / "state.db")
    key = store.add_app("admin")
    other = store.add_app("demo")
    auth = AppAuthenticator(store)

    def request(token: str | None) -> Request:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        return Request("GET", "/", {}, headers, b"")

    assert await auth.require(request(f"admin:{key}"), Right.OPERATE) == "admin"
    assert await auth.require(request(f"demo:{other}")) == "demo"
    for bad in (None, "admin", f"admin:{other}", f"demo:{key}", ":x"):
        with pytest.raises(HttpError) as info:
            await auth.require(request(bad))
        assert info.value.status == 401
    with pytest.raises(HttpError) as info:
        await auth.require(request(f"demo:{other}"), Right.OPERATE)
    assert info.value.status == 403
    store.close()
