"""FinOps over real sockets: budgets under concurrency, shifting to local,
hard and soft limits, and the hash-chained ledger's verification."""

from __future__ import annotations

import inspect
import json
import math
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st
from llmkit import (
    MASTER_KEY,
    GateApi,
    paid_model,
    provider_config,
    start_api,
    start_provider,
)
from statekit import close_after_the_test

from qmesh.config import BudgetConfig, HttpConfig, RoutingConfig
from qmesh.finops import ledger as ledger_module
from qmesh.finops.budgets import BudgetBook, Reservation
from qmesh.finops.chain import load_chain_key, verify_chain
from qmesh.finops.ledger import Ledger, LedgerEntry, read_rows
from qmesh.finops.totals import BudgetTotals
from qmesh.llm import executor as executor_module
from qmesh.qg.router import BUDGET_BLOCK, BUDGET_OK, BUDGET_SHIFT
from qmesh.state import StateStore
from qmesh.web.pool import HttpPool, parse_url

TEXT = (
    "The council voted to expand the bus network. The plan adds four new routes. "
    "Supporters said traffic would fall. Opponents worried about the cost. "
    "Work starts in the spring."
)
# No charge for the Gate's own skills here, so the ledger's total is the
# paid spend alone and can be compared with the budget exactly.
FREE_LOCAL = RoutingConfig(electricity_usd_per_kwh=0.0, cooldown_s=30.0)


async def post(
    pool: HttpPool, api: GateApi, model: str, *, app: str = "app-a", max_tokens: int = 500
) -> tuple[int, dict[str, object]]:
    body = {
        "model": model,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": TEXT}],
    }
    status, _, data = await pool.request(
        "POST",
        parse_url(api.base_url),
        "/chat/completions",
        headers={"authorization": f"Bearer {api.tokens[app]}", "content-type": "application/json"},
        body=json.dumps(body).encode(),
    )
    return status, json.loads(data)


async def test_500_concurrent_requests_never_overspend(
    nursery: trio.Nursery, tmp_path: Path, state_location: Path | str
) -> None:
    # Each paid call costs 10 in + 500 out at $1/$2 per 1M = $0.00101.
    acme = await start_provider(nursery, "acme", prompt_tokens=10, completion_tokens=500)
    per_call = 10 * 1.0 / 1e6 + 500 * 2.0 / 1e6
    limit = 100 * per_call
    api = await start_api(
        nursery,
        tmp_path,
        providers=[provider_config("acme", acme.port, [paid_model("acme-pro")])],
        budgets=[BudgetConfig(name="team", limit_usd=limit, apps=("app-a",))],
        routing=FREE_LOCAL,
        # All 500 at once from one app: the per-app cap on requests in
        # progress (64 by default) must not answer 429 before the budget is
        # what decides.
        http=HttpConfig(max_requests_per_app=500),
        state=state_location,
    )
    pool = HttpPool()
    results: list[tuple[int, dict[str, object]]] = []

    async def one() -> None:
        results.append(await post(pool, api, "qg://task=summarize;prefer=quality"))

    with trio.fail_after(120):
        async with trio.open_nursery() as inner:
            for _ in range(500):
                inner.start_soon(one)
    await pool.aclose()
    assert len(results) == 500 and all(status == 200 for status, _ in results)
    paid = sum(1 for _, body in results if body["model"] == "acme-pro")
    local = sum(1 for _, body in results if body["model"] == "qmesh-summarize")
    assert paid + local == 500
    assert 90 <= paid <= 100, paid
    assert acme.requests == paid
    await api.service.ledger.flush()
    rows = read_rows(api.store)
    assert len(rows) == 500
    assert sum(r["cost_usd"] for r in rows) <= limit + 1e-12
    budget = api.service.book.budgets["team"]
    assert budget.reserved == pytest.approx(0.0, abs=1e-12)
    assert budget.spent <= limit + 1e-12
    with api.store._read() as conn:
        assert verify_chain(conn, api.service.ledger._key, "ledger").ok


async def test_three_gates_with_100_paid_requests_each_never_overspend_together(
    nursery: trio.Nursery, tmp_path: Path, state_location: Path | str
) -> None:
    """Three Gates' LLM services on one state, one priced provider, a hard
    budget worth 50 paid calls, 100 concurrent requests at each Gate: the
    paid calls that were made fit the budget, the rest were served by the
    local skill, and the ledger has one row per answered request."""
    acme = await start_provider(nursery, "acme", prompt_tokens=10, completion_tokens=500)
    per_call = 10 * 1.0 / 1e6 + 500 * 2.0 / 1e6
    limit = 50 * per_call
    gates = []
    for n in range(3):
        work = tmp_path / f"gate-{n}"
        work.mkdir()
        gates.append(
            await start_api(
                nursery, work, state=state_location, routing=FREE_LOCAL,
                providers=[provider_config("acme", acme.port, [paid_model("acme-pro")])],
                budgets=[BudgetConfig(name="team", limit_usd=limit, apps=("app-a",))],
                http=HttpConfig(max_requests_per_app=100), apps=("app-a",) if n == 0 else None,
            )
        )  # fmt: skip
    for api in gates[1:]:
        api.tokens.update(gates[0].tokens)  # one app, one key, at every Gate
    pool = HttpPool()
    results: list[tuple[int, dict[str, object]]] = []

    async def one(api: GateApi) -> None:
        results.append(await post(pool, api, "qg://task=summarize;prefer=quality"))

    with trio.fail_after(180):
        async with trio.open_nursery() as inner:
            for _ in range(100):
                for api in gates:
                    inner.start_soon(one, api)
    await pool.aclose()
    assert len(results) == 300 and all(status == 200 for status, _ in results), results[:3]
    paid = sum(1 for _, body in results if body["model"] == "acme-pro")
    assert 40 <= paid <= 50, paid  # the budget, not a Gate's share of it, decided
    assert acme.requests == paid
    for api in gates:
        await api.service.ledger.flush()
    rows = read_rows(gates[0].store)
    assert len(rows) == 300
    assert sum(r["cost_usd"] for r in rows) <= limit + 1e-12
    with gates[0].store._read() as conn:
        assert verify_chain(conn, gates[0].service.ledger._key, "ledger").ok


async def test_spent_hard_budget_without_local_equivalent_is_refused(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    acme = await start_provider(nursery, "acme", prompt_tokens=10, completion_tokens=500)
    api = await start_api(
        nursery,
        tmp_path,
        providers=[provider_config("acme", acme.port, [paid_model("acme-pro")])],
        budgets=[BudgetConfig(name="tiny", limit_usd=0.0015, apps=("app-a",))],
    )
    pool = HttpPool()
    first = await post(pool, api, "qg://task=creative_writing")
    assert first[0] == 200
    status, body = await post(pool, api, "qg://task=creative_writing")
    assert status == 402
    error = body["error"]
    assert isinstance(error, dict)
    assert error["code"] == "budget_exceeded"
    assert "budget spent" in str(error["message"])
    # Another app, not in the budget, is not affected.
    status, _ = await post(pool, api, "qg://task=creative_writing", app="app-b")
    assert status == 200
    await pool.aclose()


async def test_soft_budget_only_warns(nursery: trio.Nursery, tmp_path: Path) -> None:
    acme = await start_provider(nursery, "acme", prompt_tokens=10, completion_tokens=500)
    api = await start_api(
        nursery,
        tmp_path,
        providers=[provider_config("acme", acme.port, [paid_model("acme-pro")])],
        budgets=[BudgetConfig(name="soft", limit_usd=0.001, mode="soft", apps=("app-a",))],
    )
    pool = HttpPool()
    for _ in range(3):
        status, body = await post(pool, api, "qg://task=creative_writing")
        assert status == 200 and body["model"] == "acme-pro"
    await pool.aclose()
    assert api.service.book.budgets["soft"].spent > 0.001


async def test_projection_over_budget_shifts_to_local_and_counts_savings(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    cloud = await start_provider(nursery, "cloud", prompt_tokens=10, completion_tokens=500)
    onprem = await start_provider(nursery, "onprem", prompt_tokens=10, completion_tokens=500)
    api = await start_api(
        nursery,
        tmp_path,
        providers=[
            provider_config("cloud", cloud.port, [paid_model("fast", latency_ms=1)]),
            # the operator's own server: no price, slower
            provider_config(
                "onprem",
                onprem.port,
                [paid_model("own", price_in=0.0, price_out=0.0, latency_ms=900)],
                private=True,
            ),
        ],
        budgets=[BudgetConfig(name="month", limit_usd=1.0, period="month", apps=("app-a",))],
        routing=FREE_LOCAL,
    )
    budget = api.service.book.budgets["month"]
    pool = HttpPool()
    status, body = await post(pool, api, "qg://task=creative_writing;prefer=speed")
    assert status == 200 and body["model"] == "fast"
    # $0.20 in the first hour of a 30-day period projects far over $1.
    budget.period_start = time.time() - 3600
    budget.period_end = budget.period_start + 30 * 86_400
    budget.spent = 0.2
    assert api.service.book.state(budget) == BUDGET_SHIFT
    status, body = await post(pool, api, "qg://task=creative_writing;prefer=speed")
    assert status == 200 and body["model"] == "own"
    # prefer=quality may still pay while the budget has room.
    status, body = await post(pool, api, "qg://task=creative_writing;prefer=quality")
    assert body["model"] == "fast"
    await pool.aclose()
    await api.service.ledger.flush()
    shifted = [r for r in read_rows(api.store) if r["shifted_from"]]
    assert len(shifted) == 1 and shifted[0]["avoided_usd"] > 0
    assert shifted[0]["shifted_from"] == "provider:cloud/fast"
    assert budget.shifted == 1


async def test_budget_states_and_reservations() -> None:
    now = [1_700_000_000.0]
    book = BudgetBook(
        [BudgetConfig(name="b", limit_usd=1.0, period="day", apps=("a",))], clock=lambda: now[0]
    )
    budget = book.for_app("a")
    assert budget is not None and book.state(budget) == BUDGET_OK
    first = await book.reserve(budget, 0.6, paid=True)
    assert first is not None
    assert await book.reserve(budget, 0.6, paid=True) is None  # would overspend
    local = await book.reserve(budget, 0.6, paid=False)  # local work is never refused
    assert local is not None
    await local.settle(0.0)
    await first.settle(0.5)
    await first.settle(0.5)  # idempotent
    assert budget.spent == 0.5 and budget.reserved == 0.0
    second = await book.reserve(budget, 0.5, paid=True)
    assert second is not None
    await second.settle(0.5)
    assert book.state(budget) == BUDGET_BLOCK
    now[0] += 86_400  # the next day: a fresh period
    assert book.state(book.for_app("a")) == BUDGET_OK
    with pytest.raises(PermissionError):
        book.for_app("other", "b")


async def test_gates_sharing_a_state_never_overspend_a_hard_budget_together(
    state_location: Path | str,
) -> None:
    """Two Gates' books, each on its own connection to one state, 250
    concurrent paid reservations each against one hard budget: together they
    hold exactly what fits, and what they spend — paid and local — adds up
    in the shared totals, which each Gate then sees."""
    config = BudgetConfig(name="team", limit_usd=1.0, period="month", apps=("a",))
    PRICE = 1 / 64
    stores = [close_after_the_test(StateStore.open(state_location)) for _ in range(2)]
    books = [BudgetBook([config], totals=BudgetTotals(store)) for store in stores]
    for book in books:
        budget = book.for_app("a")
        assert budget is not None
        await book.seed_shared(budget, 0.0)
    held: list[tuple[BudgetBook, Reservation]] = []

    async def reserve(book: BudgetBook) -> None:
        reservation = await book.reserve(book.for_app("a"), PRICE, paid=True)
        if reservation is not None:
            held.append((book, reservation))

    async with trio.open_nursery() as nursery:
        for _ in range(250):
            for book in books:
                nursery.start_soon(reserve, book)
    assert len(held) == 64  # 64 × $1/64 = the limit, across both Gates
    for _, reservation in held:
        await reservation.settle(PRICE)
    for book in books:  # local work is charged, never refused
        local = await book.reserve(book.for_app("a"), 0.0625, paid=False)
        assert local is not None
        await local.settle(0.0625)
    for _ in range(2):  # each adds its own, then reads the other's
        for book in books:
            await book.sync()
    for book in books:
        budget = book.budgets["team"]
        assert budget.spent == 1.125 and budget.reserved == 0.0  # exact in binary
        assert book.state(budget) == BUDGET_BLOCK
        assert await book.reserve(budget, PRICE, paid=True) is None


async def test_ledger_chain_detects_edit_insert_and_delete(
    nursery: trio.Nursery, tmp_path: Path, state_location: Path | str
) -> None:
    api = await start_api(nursery, tmp_path, state=state_location)
    pool = HttpPool()
    for _ in range(5):
        assert (await post(pool, api, "qg://task=keywords"))[0] == 200
    await pool.aclose()
    api.service.ledger.audit("operator", "budget.changed", {"budget": "x"})
    await api.service.ledger.flush()
    key = load_chain_key(api.store, master_key=MASTER_KEY)
    # Whoever can write the database, outside the Gate, as an attacker would.
    tamper = api.store._write

    def check(chain: str = "ledger") -> list[str]:
        with api.store._read() as conn:
            return [p.problem for p in verify_chain(conn, key, chain).problems]

    assert check() == [] and check("audit") == []
    with tamper() as conn:
        (original,) = conn.execute("SELECT app FROM qg_ledger WHERE id = 2").fetchone()
        conn.execute("UPDATE qg_ledger SET app = 'someone-else' WHERE id = 2")
    assert any("edited" in p for p in check())
    with tamper() as conn:
        conn.execute("UPDATE qg_ledger SET app = ? WHERE id = 2", (original,))
    assert check() == []
    columns = "id, ts, request_id, app, budget, task, candidate, kind, model, provider, tokens_in"
    columns += ", tokens_out, cost_usd, shifted_from, avoided_usd, outcome, hops, reason"
    with tamper() as conn:
        row = conn.execute(
            f"SELECT {columns}, prev_hash, hash FROM qg_ledger WHERE id = 3"
        ).fetchone()
        conn.execute("DELETE FROM qg_ledger WHERE id = 3")
    assert any("deleted or inserted" in p for p in check())
    with tamper() as conn:
        placeholders = ", ".join("?" * len(row))
        conn.execute(
            f"INSERT INTO qg_ledger ({columns}, prev_hash, hash) VALUES ({placeholders})", row
        )
        conn.execute(
            f"INSERT INTO qg_ledger ({columns}, prev_hash, hash) SELECT 100"
            + columns.removeprefix("id")
            + ", prev_hash, hash FROM qg_ledger WHERE id = 5"
        )
    assert any("removed or added" in p for p in check())
    with tamper() as conn:
        conn.execute("DELETE FROM qg_ledger WHERE id = 100")
        conn.execute("DELETE FROM qg_ledger WHERE id = 5")  # the newest row
    assert any("removed or added" in p for p in check())


def ledger_entry(n: int) -> LedgerEntry:
    return LedgerEntry(
        ts=time.time(), request_id=f"r{n}", app="a", budget=None, task="keywords",
        candidate="local:x", kind="local", model="x", provider=None, tokens_in=1,
        tokens_out=1, cost_usd=0.0, shifted_from=None, avoided_usd=0.0, outcome="ok",
        hops="[]", reason="",
    )  # fmt: skip


def test_a_ledger_row_is_written_with_every_field_in_order() -> None:
    distinct: list[Any] = [f"field {i}" for i in range(len(attrs.fields(LedgerEntry)))]
    entry = LedgerEntry(*distinct)
    assert entry.values() == attrs.astuple(entry, recurse=False)


async def test_ledger_flush_waits_for_a_background_write_in_flight(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, state_location: Path | str
) -> None:
    store = StateStore.open(state_location)
    close_after_the_test(store)
    ledger = Ledger(store, master_key=MASTER_KEY)
    write = ledger._write
    in_thread = threading.Event()
    release = threading.Event()

    def held_write(*args: Any) -> None:
        in_thread.set()
        release.wait(timeout=60)  # the background flush holds its rows in a worker thread
        write(*args)

    monkeypatch.setattr(ledger, "_write", held_write)
    await nursery.start(ledger.run)
    ledger.record(ledger_entry(0))
    await trio.to_thread.run_sync(in_thread.wait)
    flushed = trio.Event()

    async def flush() -> None:
        await ledger.flush()  # nothing is buffered, but r0 is not written yet
        flushed.set()

    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as flushing:
                flushing.start_soon(flush)
                # Every task waits: the flush must be waiting for the write in flight.
                await trio.testing.wait_all_tasks_blocked()
                assert not flushed.is_set()
                release.set()
    finally:
        release.set()
    assert [r["request_id"] for r in read_rows(store)] == ["r0"]


async def test_batches_of_any_size_are_stored_whole_in_order_and_sealed(
    state_location: Path | str,
) -> None:
    """Rows go in as INSERTs of many rows each (sizes halving from 64): every
    count comes out whole, in order, with a chain that verifies."""
    with StateStore.open(state_location) as store:
        ledger = Ledger(store, master_key=MASTER_KEY)
        written = 0
        for size in (1, 2, 63, 64, 65, 200):
            for n in range(written, written + size):
                ledger.record(ledger_entry(n))
            await ledger.flush()
            written += size
        assert [r["request_id"] for r in read_rows(store)] == [f"r{n}" for n in range(written)]
        with store._read() as conn:
            report = verify_chain(conn, ledger._key, "ledger")
        assert report.ok and report.rows == written


async def test_ledger_keeps_rows_whose_write_failed(
    monkeypatch: pytest.MonkeyPatch, state_location: Path | str
) -> None:
    with StateStore.open(state_location) as store:
        await ledger_keeps_failed_rows(store, monkeypatch)


async def ledger_keeps_failed_rows(store: StateStore, monkeypatch: pytest.MonkeyPatch) -> None:
    ledger = Ledger(store, master_key=MASTER_KEY)
    write = ledger._write
    failures = [sqlite3.OperationalError("database is locked")]

    def flaky_write(*args: Any) -> None:
        if failures:
            raise failures.pop()
        write(*args)

    monkeypatch.setattr(ledger, "_write", flaky_write)
    ledger.record(ledger_entry(0))
    ledger.audit("operator", "budget.changed", {"budget": "x"})
    with pytest.raises(sqlite3.OperationalError):
        await ledger.flush()
    assert ledger.pending == 2
    await ledger.flush()
    assert [r["request_id"] for r in read_rows(store)] == ["r0"] and ledger.pending == 0


async def test_a_ledger_behind_its_rows_says_so_until_a_batch_is_written(
    monkeypatch: pytest.MonkeyPatch, state_location: Path | str
) -> None:
    """Past ``BACKLOG_ROWS`` rows waiting, the ledger hands out what to wait
    for (the next batch written); not while its writes fail, when waiting
    would only hold requests the full ledger must refuse."""
    monkeypatch.setattr(ledger_module, "BACKLOG_ROWS", 3)
    with StateStore.open(state_location) as store:
        ledger = Ledger(store, master_key=MASTER_KEY)
        for n in range(2):
            ledger.record(ledger_entry(n))
        assert ledger.backlog() is None
        ledger.record(ledger_entry(2))
        behind = ledger.backlog()
        assert behind is not None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ledger.flush)
            with trio.fail_after(10):
                await behind
        assert ledger.pending == 0 and ledger.backlog() is None

        monkeypatch.setattr(ledger, "_write", _database_away)
        for n in range(3, 6):
            ledger.record(ledger_entry(n))
        assert _behind(ledger)
        with pytest.raises(sqlite3.OperationalError):
            await ledger.flush()
        assert ledger.pending == 3 and not _behind(ledger)


def _database_away(*args: object) -> None:
    raise sqlite3.OperationalError("the database is away")


def _behind(ledger: Ledger) -> bool:
    behind = ledger.backlog()
    if behind is None:
        return False
    assert inspect.iscoroutine(behind)
    behind.close()  # not awaited here
    return True


async def test_a_write_that_committed_but_failed_is_not_written_twice(
    monkeypatch: pytest.MonkeyPatch, state_location: Path | str
) -> None:
    """The answer to COMMIT lost (the database failed over just then): the
    retry finds the rows stored and adds only the ones that are not."""
    with StateStore.open(state_location) as store:
        ledger = Ledger(store, master_key=MASTER_KEY)
        write = ledger._write
        lost_answers = [1]

        def commit_then_fail(*args: Any) -> None:
            write(*args)
            if lost_answers:
                lost_answers.pop()
                raise sqlite3.OperationalError("server closed the connection unexpectedly")

        monkeypatch.setattr(ledger, "_write", commit_then_fail)
        ledger.record(ledger_entry(0))
        ledger.audit("operator", "budget.changed", {"budget": "x"})
        with pytest.raises(sqlite3.OperationalError):
            await ledger.flush()
        ledger.record(ledger_entry(1))
        await ledger.flush()
        assert [r["request_id"] for r in read_rows(store)] == ["r0", "r1"]
        with store._read() as conn:
            assert conn.execute("SELECT count(*) FROM qg_audit").fetchone()[0] == 1
            assert verify_chain(conn, ledger._key, "ledger").ok
            assert verify_chain(conn, ledger._key, "audit").ok


async def test_requests_are_refused_while_the_ledger_cannot_keep_more(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The state's database is away long enough for the Gate to hold as many
    ledger rows as it keeps: requests get 503 (with Retry-After) rather than
    go unaccounted, and are served again once the rows are written."""
    monkeypatch.setattr(ledger_module, "MAX_PENDING", 3)
    api = await start_api(nursery, tmp_path)
    write = api.service.ledger._write
    away = [True]

    def database_away(*args: Any) -> None:
        if away:
            raise sqlite3.OperationalError("the database is away")
        write(*args)

    monkeypatch.setattr(api.service.ledger, "_write", database_away)
    pool = HttpPool()
    for _ in range(3):
        assert (await post(pool, api, "qg://task=keywords"))[0] == 200
    status, body = await post(pool, api, "qg://task=keywords")
    error = body["error"]
    assert status == 503 and isinstance(error, dict), body
    assert error["code"] == "ledger_unavailable"
    away.clear()
    await api.service.ledger.flush()
    assert (await post(pool, api, "qg://task=keywords"))[0] == 200
    await pool.aclose()
    await api.service.ledger.flush()
    assert len(read_rows(api.store)) == 4


@pytest.mark.parametrize(
    "hops",
    [
        [],
        [{"candidate": "provider:acme/p", "outcome": "ok", "ms": 1.234}],
        [
            {"candidate": "daemon:n1/m", "outcome": "failed", "ms": 0.0, "error": 'bad "µ"\n'},
            {"candidate": "provider:x/y", "outcome": "ok", "ms": 12, "extra": None},
        ],
        [{"candidate": 'provider:ä/"q"\n', "outcome": "ok", "ms": 1e-05}],
        [{"outcome": "ok", "candidate": "provider:acme/p", "ms": 1.5e16}],
        [{"candidate": "provider:acme/p", "outcome": "ok", "ms": math.inf}],
        [{"candidate": "provider:acme/p", "outcome": "ok", "ms": True}],
        [{"candidate": "provider:acme/p", "outcome": "ok", "ms": 2}],
        [{"candidate": "provider:acme/p", "outcome": "busy", "ms": 0.5}],
    ],
)
def test_a_rows_hops_are_the_json_python_writes(hops: list[dict[str, object]]) -> None:
    # The ledger's hops column, as readers parse it and the chain seals it.
    expected = json.dumps(hops, separators=(",", ":"))
    assert executor_module._compact_json(hops) == expected
    assert executor_module._hops_json(hops) == expected
    with pytest.raises(TypeError):
        executor_module._compact_json([{"ms": object()}])


@given(candidate=st.text(), ms=st.floats())
def test_an_answered_hop_is_written_as_the_encoder_writes_it(candidate: str, ms: float) -> None:
    hops: list[dict[str, object]] = [{"candidate": candidate, "outcome": "ok", "ms": ms}]
    assert executor_module._hops_json(hops) == json.dumps(hops, separators=(",", ":"))
