"""App keys on the Gate's HTTP API bite at once (qmesh.web.auth): rotation
without overlap, the end of an overlap and ``qmesh apps disable`` reach the
auth cache through the StateWatcher; failed checks are rate-limited per
source and hashed in threads of their own; requests per app are bounded.

Real sockets and real ``qmesh`` subprocesses for the trust-changing
commands, as an operator runs them; waits are on conditions with generous
deadlines, never on guessed times.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import attrs
import pytest
import trio

from qmesh.config import HttpConfig
from qmesh.state import StateStore
from qmesh.state.watch import StateWatcher
from qmesh.web import auth as auth_module
from qmesh.web.auth import AppAuthenticator
from qmesh.web.http import HttpError, Request, Response, Router
from qmesh.web.native import serve_http

REPO = Path(__file__).resolve().parent.parent
DEADLINE_S = 20.0  # generous: the event must happen, how fast is for bench/


@attrs.define
class Api:
    data_dir: Path
    store: StateStore
    auth: AppAuthenticator
    watcher: StateWatcher
    port: int
    release: trio.Event
    refreshes: int = 0

    async def call(self, token: str | None, path: str = "/whoami") -> tuple[int, bytes]:
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        raw = f"GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n".encode()
        stream = await trio.open_tcp_stream("127.0.0.1", self.port)
        async with stream:
            await stream.send_all(raw)
            received = bytearray()
            with trio.fail_after(DEADLINE_S):
                while data := await stream.receive_some(65536):
                    received += data
        return int(received.split(b" ", 2)[1]), bytes(received)

    async def status(self, token: str | None, path: str = "/whoami") -> int:
        return (await self.call(token, path))[0]

    async def refreshed(self) -> None:
        """Wait until the watcher has seen a change and every subscriber ran."""
        seen = self.refreshes
        await until(lambda: self.refreshes > seen)


async def until(condition: Callable[[], bool]) -> None:
    with trio.fail_after(DEADLINE_S):
        while not condition():  # noqa: ASYNC110 - a condition, polled with a deadline
            await trio.sleep(0.01)


async def until_status(api: Api, token: str, wanted: int) -> None:
    """Poll until ``token`` gets ``wanted`` (the event must happen)."""
    with trio.fail_after(DEADLINE_S):
        while await api.status(token) != wanted:  # noqa: ASYNC110 - polled, with a deadline
            await trio.sleep(0.01)


async def start_api(
    nursery: trio.Nursery,
    tmp_path: Path,
    limits: HttpConfig | None = None,
    wall_clock: Callable[[], float] | None = None,
    watch: bool = True,
) -> Api:
    data_dir = tmp_path / "data"
    store = StateStore.open(data_dir / "state.db")
    watcher = StateWatcher(store, interval_s=0.02)
    if wall_clock is None:
        auth = AppAuthenticator(store, limits)
    else:
        auth = AppAuthenticator(store, limits, wall_clock=wall_clock)
    api = Api(data_dir, store, auth, watcher, 0, trio.Event())
    watcher.subscribe("app keys (http)", auth.refresh)

    async def count() -> None:
        api.refreshes += 1

    watcher.subscribe("test", count)  # after auth.refresh: it has finished when this runs
    router = Router()

    async def whoami(request: Request) -> Response:
        return Response.json({"app": await auth.require(request)})

    async def hold(request: Request) -> Response:
        app = await auth.require(request)
        await api.release.wait()
        return Response.json({"app": app})

    async def stream(request: Request) -> Response:
        await auth.require(request)

        async def events() -> AsyncIterator[bytes]:
            yield b"data: one\n\n"
            await api.release.wait()
            yield b"data: two\n\n"

        return Response.event_stream(events())

    router.add("GET", "/whoami", whoami)
    router.add("GET", "/hold", hold)
    router.add("GET", "/stream", stream)
    if watch:
        await nursery.start(watcher.run)
    api.port = await nursery.start(
        lambda task_status: serve_http(router, "127.0.0.1", 0, task_status=task_status)
    )
    return api


async def qmesh(data_dir: Path, *args: str) -> str:
    """``qmesh --data-dir DATA ARGS`` as its own process; its stdout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QMESH_")}
    env["PYTHONPATH"] = str(REPO)
    env["HOME"] = str(data_dir.parent / "home")
    result = await trio.run_process(
        [sys.executable, "-m", "qmesh", "--data-dir", str(data_dir), *args],
        capture_stdout=True,
        capture_stderr=True,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


async def test_rotate_key_without_overlap_refuses_the_cached_old_key_at_once(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    api = await start_api(nursery, tmp_path)
    old = "shop:" + api.store.add_app("shop")
    assert await api.status(old) == 200  # checked once (PBKDF2) …
    hashes = api.auth.hashes
    assert await api.status(old) == 200  # … then served from the cache
    assert api.auth.hashes == hashes
    new = "shop:" + (await qmesh(api.data_dir, "apps", "rotate-key", "shop", "--overlap", "0"))
    new = new.strip()
    await until_status(api, old, 401)
    assert await api.status(new) == 200


async def test_a_change_costs_no_pbkdf2_for_keys_that_stay_valid(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    api = await start_api(nursery, tmp_path)
    tokens = [f"{app}:{api.store.add_app(app)}" for app in ("shop", "blog")]
    for token in tokens:
        assert await api.status(token) == 200
    hashes = api.auth.hashes
    with StateStore.open(api.data_dir / "state.db") as other:  # another process's writes
        other.add_app("third")
        other.rotate_app_key("blog", 3600)  # blog's old key stays valid for an hour
    await api.refreshed()
    for token in tokens:
        assert await api.status(token) == 200
    assert api.auth.hashes == hashes


async def test_the_cache_honours_the_end_of_an_overlap_without_any_change(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    offset = 0.0

    def clock() -> float:
        import time

        return time.time() + offset

    # No watcher: the one refresh is called below, where the watcher would
    # call it, so that nothing else can tell the cache anything.
    api = await start_api(nursery, tmp_path, wall_clock=clock, watch=False)
    old = "shop:" + api.store.add_app("shop")
    assert await api.status(old) == 200
    with StateStore.open(api.data_dir / "state.db") as other:
        new_key, _ = other.rotate_app_key("shop", 600)
    new = f"shop:{new_key}"
    await api.auth.refresh()  # the rotation, as the watcher reports it
    hashes = api.auth.hashes
    assert await api.status(old) == 200  # inside the overlap, from the cache
    assert api.auth.hashes == hashes
    offset = 601.0  # the overlap is over; nothing in the state store changes
    assert await api.status(old) == 401
    assert await api.status(new) == 200


async def test_apps_disable_refuses_the_keys_and_enable_restores_them(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    api = await start_api(nursery, tmp_path)
    key = api.store.add_app("shop")
    token = f"shop:{key}"
    api.store.add_app("blog")
    assert await api.status(token) == 200
    said = await qmesh(api.data_dir, "apps", "disable", "shop")
    assert "disabled app 'shop'" in said
    await until_status(api, token, 403)
    _, answer = await api.call(token)
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["code"] == "app_disabled"
    listed = {
        a["app_id"]: a for a in json.loads(await qmesh(api.data_dir, "apps", "list", "--json"))
    }
    assert listed["shop"]["disabled"] and not listed["blog"]["disabled"]
    table = await qmesh(api.data_dir, "apps", "list")
    assert any(line.split()[:2] == ["shop", "disabled"] for line in table.splitlines())
    assert "already disabled" in await qmesh(api.data_dir, "apps", "disable", "shop")
    await qmesh(api.data_dir, "apps", "enable", "shop")
    await until_status(api, token, 200)
    assert not api.store.list_apps()[1].disabled


async def test_failed_checks_are_rate_limited_per_source_without_pbkdf2(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    limits = HttpConfig(auth_failures_per_s=0.001, auth_failure_burst=3)
    api = await start_api(nursery, tmp_path, limits)
    good = "shop:" + api.store.add_app("shop")
    assert await api.status(good) == 200  # cached before the flood
    hashes = api.auth.hashes
    for _ in range(3):
        assert await api.status("shop:wrong") == 401
    assert api.auth.hashes == hashes + 3
    status, answer = await api.call("nobody:guess")
    assert status == 429 and b"retry-after:" in answer.lower()
    assert await api.status("shop:wrong-again") == 429
    assert api.auth.hashes == hashes + 3  # refused without hashing
    assert await api.status(good) == 200  # a cached key is not held up
    # Another source is not: its failures are its own.
    elsewhere = Request(
        "GET", "/", {}, {"authorization": "Bearer shop:wrong"}, b"", source="10.9.9.9"
    )
    with pytest.raises(HttpError) as info:
        await api.auth.require(elsewhere)
    assert info.value.status == 401


async def test_the_failure_limit_is_shared_by_the_gates_of_a_cluster(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """With three live Gates each allows a third of the burst: an address
    that spreads its guesses over every Gate gets no more than one Gate gives."""
    limits = HttpConfig(auth_failures_per_s=0.001, auth_failure_burst=6)
    api = await start_api(nursery, tmp_path, limits)
    api.store.add_app("shop")
    api.auth.share_limits(3)
    for _ in range(2):
        assert await api.status("shop:wrong") == 401
    assert await api.status("shop:wrong") == 429
    api.auth.share_limits(1)  # the others left: the whole burst again, refilled as before
    assert api.auth._failures.burst == 6


async def test_many_first_requests_with_one_key_cost_one_pbkdf2_and_no_refusal(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """A pool opening 50 connections at once sends one key 50 times before
    its first check ends: all are let in, one PBKDF2 serves them, and none
    counts against the failure budget (here far smaller than 50)."""
    limits = HttpConfig(auth_failures_per_s=0.001, auth_failure_burst=3)
    api = await start_api(nursery, tmp_path, limits)
    good = "shop:" + api.store.add_app("shop")
    answers: list[str | None] = []

    async def first_request() -> None:
        answers.append(await api.auth.app_for(good, source="127.0.0.1"))

    async with trio.open_nursery() as requests:
        for _ in range(50):
            requests.start_soon(first_request)
    assert answers == ["shop"] * 50
    assert api.auth.hashes == 1
    # The failure budget is whole: three wrong keys are still judged.
    for _ in range(3):
        assert await api.status("shop:wrong") == 401


async def test_pbkdf2_runs_in_its_own_threads_and_never_starves_the_default_pool(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qmesh import state

    gate = threading.Event()
    lock = threading.Lock()
    running = 0
    real = state.scram_keys

    def slow_scram_keys(password: str, salt: bytes, iterations: int) -> tuple[bytes, bytes]:
        nonlocal running
        with lock:
            running += 1
        gate.wait(DEADLINE_S)
        return real(password, salt, iterations)

    limits = HttpConfig(hash_threads=2, auth_failure_burst=100)
    api = await start_api(nursery, tmp_path, limits)
    api.store.add_app("shop")
    # Both names: the authenticator's hashing, wherever it calls it from.
    monkeypatch.setattr(state, "scram_keys", slow_scram_keys)
    monkeypatch.setattr(auth_module, "scram_keys", slow_scram_keys, raising=False)
    default = trio.to_thread.current_default_thread_limiter()
    flood = 2 * int(default.total_tokens)

    async def bogus(n: int) -> None:
        request = Request("GET", "/", {}, {"authorization": f"Bearer shop:bad{n}"}, b"")
        with pytest.raises(HttpError):
            await api.auth.require(request)

    async with trio.open_nursery() as checks:
        try:
            for n in range(flood):
                checks.start_soon(bogus, n)
            # Every check has read its app's keys and now hashes (two) or
            # waits for a hashing thread (the rest) …
            hashing = api.auth.hash_limiter
            await until(lambda: hashing.statistics().tasks_waiting == flood - 2)
            assert running == 2
            # … holding none of trio's default threads: everything else on
            # that pool (a vault read, a tunnel handshake's key lookup)
            # still gets a thread at once.
            assert default.borrowed_tokens == 0
            with trio.fail_after(DEADLINE_S):
                assert await trio.to_thread.run_sync(lambda: "vault read") == "vault read"
        finally:
            gate.set()  # threads cannot be cancelled: let them finish either way
    assert running == flood


async def test_requests_in_progress_per_app_are_bounded(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    api = await start_api(nursery, tmp_path, HttpConfig(max_requests_per_app=2))
    shop = "shop:" + api.store.add_app("shop")
    blog = "blog:" + api.store.add_app("blog")
    results: list[int] = []

    async def held() -> None:
        results.append(await api.status(shop, "/hold"))

    async with trio.open_nursery() as inner:
        inner.start_soon(held)
        inner.start_soon(held)
        await until(lambda: api.auth.in_progress("shop") == 2)
        status, answer = await api.call(shop)
        assert status == 429 and b"requests in progress" in answer
        assert await api.status(blog) == 200  # another app is not held up
        api.release.set()
    assert results == [200, 200]
    await until(lambda: api.auth.in_progress("shop") == 0)
    assert await api.status(shop) == 200


async def test_a_streamed_answer_holds_its_slot_until_its_end(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    api = await start_api(nursery, tmp_path, HttpConfig(max_requests_per_app=1))
    shop = "shop:" + api.store.add_app("shop")
    stream = await trio.open_tcp_stream("127.0.0.1", api.port)
    async with stream:
        raw = f"GET /stream HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {shop}\r\n\r\n"
        await stream.send_all(raw.encode())
        received = bytearray()
        with trio.fail_after(DEADLINE_S):
            while b"data: one" not in received:
                received += await stream.receive_some(65536)
        assert await api.status(shop) == 429  # the stream is still going
        api.release.set()
        with trio.fail_after(DEADLINE_S):
            while b"0\r\n\r\n" not in received:
                received += await stream.receive_some(65536)
    await until(lambda: api.auth.in_progress("shop") == 0)
    assert await api.status(shop) == 200
