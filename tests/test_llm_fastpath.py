"""The HTTP engine's fast path with the official ``openai`` client over real
loopback sockets: once Python decided a request, the engine relays the
requests that would be decided the same way without asking it, and each is
booked as if Python had served it. Whatever the decision did not cover goes
to Python; a failure on the fast path is a failover the client never sees."""

from __future__ import annotations

import json
import ssl
import threading
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import attrs
import openai
import pytest
import trio
from llmkit import (
    FakeProvider,
    GateApi,
    flushed_rows,
    paid_model,
    provider_config,
    start_api,
    start_provider,
)
from openai.types.chat import ChatCompletionMessageParam
from pgkit import in_thread
from testca import make_ca_and_server
from tunnelkit import until

from qmesh import _core
from qmesh.config import BudgetConfig, HttpConfig, RoutingConfig
from qmesh.finops import ledger as ledger_module
from qmesh.finops.ledger import Ledger
from qmesh.llm import fastpath as llm_fastpath
from qmesh.web import native as native_module
from qmesh.web.tls import GateTls

HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]


def client(api: GateApi, app: str = "app-a") -> openai.OpenAI:
    return openai.OpenAI(base_url=api.base_url, api_key=api.tokens[app], max_retries=0, timeout=20)


def fast_relayed(api: GateApi) -> int:
    return sum(routes.relayed for routes in api.service.executor.fast_routes)


async def chat(
    c: openai.OpenAI, model: str, messages: list[ChatCompletionMessageParam] = HELLO
) -> tuple[str, str]:
    """The answer's text and its ``x-qmesh-route`` header."""
    raw = await in_thread(
        lambda: c.chat.completions.with_raw_response.create(model=model, messages=messages)
    )
    return raw.parse().choices[0].message.content or "", raw.headers["x-qmesh-route"]


async def streamed(c: openai.OpenAI, model: str) -> str:
    def run() -> str:
        stream = c.chat.completions.create(model=model, messages=HELLO, stream=True)
        return "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)

    return await in_thread(run)


async def routed(nursery: trio.Nursery, tmp_path: Path) -> tuple[FakeProvider, GateApi]:
    """A Gate with one provider (model ``p``), and a route installed for
    app-a's chat with it: one request decided by Python, one on the route."""
    acme = await start_provider(nursery, "acme")
    api = await start_api(
        nursery, tmp_path, providers=[provider_config("acme", acme.port, [paid_model("p")])]
    )
    await chat(client(api), "p")
    await chat(client(api), "p")
    assert fast_relayed(api) == 1
    return acme, api


async def test_requests_like_a_decided_one_skip_python_and_are_booked_alike(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    acme = await start_provider(nursery, "acme", prompt_tokens=1000, completion_tokens=500)
    api = await start_api(
        nursery,
        tmp_path,
        providers=[
            provider_config(
                "acme", acme.port, [paid_model("acme-large", upstream="large-v2")], api_key="env:K"
            )
        ],
        env={"K": "sk-test-secret"},
    )
    c = client(api)
    first = await chat(c, "acme-large")
    assert fast_relayed(api) == 0
    for _ in range(5):
        assert await chat(c, "acme-large") == first
    assert first == ("answer from acme", "provider:acme/acme-large")
    assert fast_relayed(api) == 5
    # What the provider got is what Python would have sent: renamed, its key.
    assert [b["model"] for b in acme.bodies] == ["large-v2"] * 6
    assert acme.auth == ["Bearer sk-test-secret"] * 6
    rows = await flushed_rows(api, 6)
    assert len(rows) == 6 and len({r["request_id"] for r in rows}) == 6
    for row in rows:
        assert (row["app"], row["provider"], row["outcome"]) == ("app-a", "provider:acme", "ok")
        assert (row["tokens_in"], row["tokens_out"]) == (1000, 500)
        assert row["cost_usd"] == pytest.approx(1000 * 1.0 / 1e6 + 500 * 2.0 / 1e6)
        assert [h["outcome"] for h in json.loads(row["hops"])] == ["ok"]
    # The fast path's rows say what Python's says, but for when and which request.
    decided, *relayed = (booked_columns(row) for row in rows)
    assert relayed == [decided] * 5


def booked_columns(row: dict[str, Any]) -> dict[str, Any]:
    """A ledger row as it would be for any request decided alike: without
    its id, time, request id and each hop's milliseconds."""
    hops = [{k: v for k, v in hop.items() if k != "ms"} for hop in json.loads(row["hops"])]
    assert all(hop["ms"] >= 0 for hop in json.loads(row["hops"]))
    return {k: v for k, v in row.items() if k not in ("id", "ts", "request_id")} | {"hops": hops}


async def test_requests_relayed_together_are_booked_one_by_one(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests the engine relays in the same round are reported to Python
    together: each still gets its own row, request id, latency and metrics."""
    # One route for them all, however slow the machine: none is renewed.
    monkeypatch.setattr(llm_fastpath, "ROUTE_TTL_S", 600.0)
    acme, api = await routed(nursery, tmp_path)
    told: list[tuple[str, list[str]]] = []
    api.service.ledger.observers.append(
        lambda entries, hops: told.extend(
            (entry.request_id, [str(h["outcome"]) for h in entry_hops])
            for entry, entry_hops in zip(entries, hops, strict=True)
        )
    )
    c = client(api)
    async with trio.open_nursery() as clients:
        for _ in range(16):
            clients.start_soon(chat, c, "p")
    assert fast_relayed(api) == 17 and acme.requests == 18
    rows = await flushed_rows(api, 18)
    assert len(rows) == 18 and len({r["request_id"] for r in rows}) == 18
    decided, *relayed = (booked_columns(row) for row in rows)
    assert relayed == [decided] * 17
    # Observers were told of each request once, with its one hop.
    assert sorted(told) == sorted((r["request_id"], ["ok"]) for r in rows[2:])


async def test_what_the_decision_did_not_cover_goes_to_python(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    acme, api = await routed(nursery, tmp_path)
    a = client(api)
    # A longer prompt, another app, a stream: each decided by Python.
    longer: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello " * 200}]
    assert (await chat(a, "p", longer))[0] == "answer from acme"
    assert (await chat(client(api, "app-b"), "p"))[0] == "answer from acme"
    assert (await streamed(a, "p")).strip() == "answer from acme"
    assert fast_relayed(api) == 1
    rows = await flushed_rows(api, 5)
    assert [r["app"] for r in rows] == ["app-a", "app-a", "app-a", "app-b", "app-a"]
    assert acme.requests == 5


async def test_a_failure_on_the_fast_path_moves_to_the_next_candidate(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    flaky = await start_provider(nursery, "flaky")
    good = await start_provider(nursery, "good")
    same = {"family": "llama", "size_class": "m"}
    api = await start_api(
        nursery,
        tmp_path,
        providers=[
            provider_config("flaky", flaky.port, [paid_model("m-flaky", price_in=0.1, **same)]),
            provider_config("good", good.port, [paid_model("m-good", **same)]),
        ],
        routing=RoutingConfig(cooldown_s=60.0),
    )
    c = client(api)
    await chat(c, "m-flaky")
    await chat(c, "m-flaky")
    assert fast_relayed(api) == 1
    flaky.mode = "error"
    assert await chat(c, "m-flaky") == ("answer from good", "provider:good/m-good")
    assert flaky.requests == 3, "the failed attempt is not sent twice"
    assert good.requests == 1
    rows = await flushed_rows(api, 3)
    hops = json.loads(rows[-1]["hops"])
    assert (hops[0]["candidate"], hops[0]["outcome"]) == ("provider:flaky/m-flaky", "failed")
    assert (hops[-1]["candidate"], hops[-1]["outcome"]) == ("provider:good/m-good", "ok")
    # The failure took the route away: the next request is decided again
    # (the flaky provider cools down) and served by the good one.
    assert (await chat(c, "m-flaky"))[0] == "answer from good"
    assert flaky.requests == 3


async def test_streams_take_the_fast_path_and_a_break_ends_in_words(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    acme = await start_provider(nursery, "acme", prompt_tokens=7, completion_tokens=9)
    api = await start_api(
        nursery, tmp_path, providers=[provider_config("acme", acme.port, [paid_model("p")])]
    )
    c = client(api)
    for _ in range(3):
        assert (await streamed(c, "p")).strip() == "answer from acme"
    assert fast_relayed(api) == 2
    assert all(b["stream_options"] == {"include_usage": True} for b in acme.bodies)
    rows = await flushed_rows(api, 3)
    assert [(r["tokens_in"], r["tokens_out"], r["outcome"]) for r in rows] == [(7, 9, "ok")] * 3

    acme.mode = "break"
    with trio.fail_after(15), pytest.raises(openai.APIError, match="stream broke off"):
        await streamed(c, "p")
    assert fast_relayed(api) == 3
    rows = await flushed_rows(api, 4)
    assert rows[-1]["outcome"] == "stream_broken"


async def test_an_app_held_to_a_budget_never_skips_python(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    acme = await start_provider(nursery, "acme")
    api = await start_api(
        nursery,
        tmp_path,
        providers=[provider_config("acme", acme.port, [paid_model("p")])],
        budgets=[BudgetConfig(name="team", limit_usd=100.0, apps=("app-a",))],
    )
    a, b = client(api), client(api, "app-b")
    for _ in range(3):
        await chat(a, "p")
        await chat(b, "p")
    assert fast_relayed(api) == 2, "app-b's second and third"
    rows = await flushed_rows(api, 6)
    assert sum(r["budget"] == "team" for r in rows) == 3


async def test_a_key_dropped_by_a_refresh_takes_its_routes_along(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    acme, api = await routed(nursery, tmp_path)
    a = client(api)
    assert api.store.set_app_disabled("app-a", True)
    await api.auth.refresh()  # what the state watcher runs on a change
    with pytest.raises(openai.PermissionDeniedError, match="disabled"):
        await chat(a, "p")
    assert fast_relayed(api) == 1 and acme.requests == 2


def https_provider_tls(tmp_path: Path) -> tuple[Path, GateTls]:
    """A throwaway CA and the provider's certificate for 127.0.0.1."""
    ca, cert, key = make_ca_and_server(tmp_path / "provider-tls", "provider")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    native = _core.TlsServerConfig(cert.read_bytes(), key.read_bytes(), alpn=[b"http/1.1"])
    return ca, GateTls(context, native, "", cert)


async def test_an_https_provider_is_relayed_by_the_engine_and_verified(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca, tls = https_provider_tls(tmp_path)
    acme = await start_provider(nursery, "acme", tls=tls, prompt_tokens=3, completion_tokens=4)
    config = provider_config("acme", acme.port, [paid_model("p")], api_key="env:K")
    config = attrs.evolve(config, base_url=f"https://127.0.0.1:{acme.port}/v1")
    api = await start_api(
        nursery, tmp_path, providers=[config], env={"K": "sk-secret"},
        routing=RoutingConfig(cooldown_s=0.0),
    )  # fmt: skip
    c = client(api)
    # Nothing trusts the provider's CA yet: its certificate is refused, and
    # the request (and its key) never reaches it.
    with pytest.raises(openai.APIStatusError):
        await chat(c, "p")
    assert acme.requests == 0
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))  # the roots the Gate trusts
    for _ in range(3):
        assert await chat(c, "p") == ("answer from acme", "provider:acme/p")
    assert (await streamed(c, "p")).strip() == "answer from acme"
    assert api.service.executor.relayed == 4, "every answer relayed by the engine"
    assert fast_relayed(api) == 2
    assert acme.auth == ["Bearer sk-secret"] * 4
    assert len(set(acme.peers)) == 1, "one pooled TLS connection carried them all"
    first, *served = await flushed_rows(api, 5)
    assert first["outcome"] == "error" and "certificate" in first["hops"].lower()
    assert [(r["tokens_in"], r["tokens_out"], r["outcome"]) for r in served] == [(3, 4, "ok")] * 4


@attrs.define
class HeldBooks:
    """A Gate with one provider whose ledger writer waits for :attr:`written`
    before each batch; :attr:`behind` counts the times the books were
    found behind (``Ledger.backlog`` had something to await)."""

    api: GateApi
    written: threading.Event
    behind: list[bool]


async def held_books(
    nursery: trio.Nursery,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    http: HttpConfig | None = None,
) -> HeldBooks:
    behind: list[bool] = []
    backlog = Ledger.backlog

    def watched(ledger: Ledger) -> Awaitable[None] | None:
        awaitable = backlog(ledger)
        if awaitable is not None:
            behind.append(True)
        return awaitable

    monkeypatch.setattr(Ledger, "backlog", watched)
    acme = await start_provider(nursery, "acme")
    api = await start_api(
        nursery, tmp_path, providers=[provider_config("acme", acme.port, [paid_model("p")])],
        http=http,
    )  # fmt: skip
    ledger = api.service.ledger
    write, written = ledger._write, threading.Event()

    def held(*args: Any) -> None:  # in the ledger's writer thread
        written.wait()
        write(*args)

    monkeypatch.setattr(ledger, "_write", held)
    return HeldBooks(api, written, behind)


async def test_an_inline_engine_gives_a_ledger_behind_its_turns_and_serves_on(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An inline engine (the default) whose ledger writer has fallen behind
    gives it the core for a moment after each round (a bounded wait for
    the next batch), rather than relaying on until the ledger is full and
    requests are refused; the answers in flight are not held meanwhile."""
    monkeypatch.setattr(ledger_module, "BACKLOG_ROWS", 3)
    books = await held_books(nursery, tmp_path, monkeypatch)
    api, c = books.api, client(books.api)
    try:
        answer = ("answer from acme", "provider:acme/p")
        for _ in range(2):
            assert await chat(c, "p") == answer  # a route, then on it
        with trio.fail_after(10):
            await until(lambda: api.service.ledger.pending == 2)
        assert not books.behind, "the books were given turns while they kept up"
        with trio.fail_after(10):
            for _ in range(3):  # behind, and answered all the same
                assert await chat(c, "p") == answer
        assert books.behind, "the books were never given a turn"
        assert fast_relayed(api) == 4
    finally:
        books.written.set()
    rows = await flushed_rows(api, 5)
    assert [r["outcome"] for r in rows] == ["ok"] * 5


async def test_on_the_engine_threads_booking_waits_for_a_ledger_behind(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Gate on the engine threads whose ledger writer has fallen behind
    takes no more of the fast path's reports until a batch is written (the
    engine then holds new requests once its reports reach their bound):
    requests slow down to what the books keep, and none is refused."""
    monkeypatch.setattr(ledger_module, "BACKLOG_ROWS", 2)
    monkeypatch.setattr(native_module, "BACKLOG_WAIT_S", 60.0)
    books = await held_books(nursery, tmp_path, monkeypatch, HttpConfig(engine_threads=True))
    api, c = books.api, client(books.api)
    try:
        answer = ("answer from acme", "provider:acme/p")
        assert await chat(c, "p") == answer  # decided by Python: a route
        assert await chat(c, "p") == answer  # on the route
        with trio.fail_after(10):
            await until(lambda: fast_relayed(api) == 1)
        assert api.service.ledger.pending == 2 and not books.behind
        assert await chat(c, "p") == answer  # relayed all the same...
        with trio.fail_after(10):
            await until(lambda: bool(books.behind))
        assert fast_relayed(api) == 1  # ...but not booked while the books are behind
    finally:
        books.written.set()
    with trio.fail_after(10):
        await until(lambda: fast_relayed(api) == 2)
    rows = await flushed_rows(api, 3)
    assert [r["outcome"] for r in rows] == ["ok"] * 3
