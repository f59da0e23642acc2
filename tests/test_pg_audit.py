"""qmesh.pg.audit: the statement audit log, on a real state store: SQLite and PostgreSQL."""

from __future__ import annotations

import functools
import hashlib
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from daemonkit import wait_until
from statekit import stored_bytes
from tunnelkit import until

from qmesh import _core
from qmesh.config import Config, GateAppConfig, GateConfig, PgAuditConfig
from qmesh.pg import audit as audit_module
from qmesh.pg.audit import AuditLog, list_audit
from qmesh.pg.policy import AppPolicy
from qmesh.pg.service import PgService
from qmesh.pg.watch import MAX_TRACKED_BYTES, SessionWatch
from qmesh.state import StateStore


@pytest.fixture
def store(state_location: Path | str) -> Iterator[StateStore]:
    with StateStore.open(state_location) as store:
        yield store


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class CountingAuditLog(AuditLog):
    """Remembers the size of every batch it writes."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.batches: list[int] = []

    def _write_batch(self) -> tuple[int, int]:
        written, taken = super()._write_batch()
        if taken:
            self.batches.append(taken)
        return written, taken


def record(audit: AuditLog, i: int, **overrides: object) -> None:
    fields: dict[str, object] = {
        "app": "shop",
        "alias": "orders",
        "statement": f"SELECT {i}",
        "duration_s": 0.0015,
        "rows": 1,
        "outcome": "ok",
    }
    fields.update(overrides)
    audit.record(**fields)  # type: ignore[arg-type]


async def test_many_records_are_written_in_batches(store: StateStore) -> None:
    audit = CountingAuditLog(store, batch_size=250)
    async with trio.open_nursery() as nursery:
        await nursery.start(audit.run)
        for i in range(3000):
            record(audit, i)
            if i % 500 == 0:
                await trio.lowlevel.checkpoint()  # let the writer take what has queued
        with trio.fail_after(30):
            await audit.flush()
        nursery.cancel_scope.cancel()
    assert (audit.recorded, audit.written, audit.dropped, audit.failed) == (3000, 3000, 0, 0)
    assert sum(audit.batches) == 3000
    assert max(audit.batches) == 250  # many records per transaction, never more than asked
    assert len(audit.batches) < 100
    records = list_audit(store, limit=5000)
    assert len(records) == 3000
    assert [r.statement for r in records[:2]] == ["SELECT 2999", "SELECT 2998"]  # newest first
    last = records[0]
    assert (last.app, last.alias, last.rows, last.outcome) == ("shop", "orders", 1, "ok")
    assert last.duration_ms == pytest.approx(1.5)
    assert last.statement_sha256 == sha("SELECT 2999")


async def test_hash_mode_stores_only_the_hash(store: StateStore) -> None:
    audit = AuditLog(store, mode="hash")
    async with trio.open_nursery() as nursery:
        await nursery.start(audit.run)
        record(audit, 1, statement="SELECT secret_column FROM t")
        record(audit, 2, statement=b"UPDATE t SET x = 1", mode="text")  # per-app override
        with trio.fail_after(10):
            await audit.flush()
        nursery.cancel_scope.cancel()
    hashed, text = sorted(list_audit(store), key=lambda r: r.id)
    assert hashed.statement is None
    assert hashed.statement_sha256 == sha("SELECT secret_column FROM t")
    assert text.statement == "UPDATE t SET x = 1"
    raw = stored_bytes(store)
    assert b"secret_column" not in raw
    assert b"UPDATE t SET x = 1" in raw  # the check can see statements that are stored


async def test_off_mode_stores_nothing(store: StateStore) -> None:
    audit = AuditLog(store, mode="off")
    async with trio.open_nursery() as nursery:
        await nursery.start(audit.run)
        for i in range(10):
            record(audit, i)
        record(audit, 99, mode="hash")  # an app whose policy asks for hashes still gets them
        with trio.fail_after(10):
            await audit.flush()
        nursery.cancel_scope.cancel()
    assert audit.recorded == 1
    assert [r.statement for r in list_audit(store)] == [None]
    with pytest.raises(ValueError, match="audit mode"):
        AuditLog(store, mode="full")
    with pytest.raises(ValueError, match="audit mode"):
        record(audit, 1, mode="bogus")


async def test_long_statements_are_truncated_but_hashed_whole(store: StateStore) -> None:
    audit = AuditLog(store, max_statement_chars=100)
    long = "SELECT '" + "x" * 5000 + "'"
    async with trio.open_nursery() as nursery:
        await nursery.start(audit.run)
        record(audit, 1, statement=long)
        record(audit, 2, statement=b"SELECT '\xff'")  # not UTF-8: stored with a replacement
        with trio.fail_after(10):
            await audit.flush()
        nursery.cancel_scope.cancel()
    first, second = sorted(list_audit(store), key=lambda r: r.id)
    assert first.statement is not None
    assert first.statement.startswith(long[:100])
    assert "[truncated: 5009 characters in all]" in first.statement
    assert first.statement_sha256 == sha(long)
    assert second.statement == "SELECT '\ufffd'"
    assert second.statement_sha256 == hashlib.sha256(b"SELECT '\xff'").hexdigest()


async def test_a_full_queue_drops_and_reports_but_never_blocks(
    store: StateStore, state_location: Path | str
) -> None:
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler = Collect()
    logging.getLogger("qmesh.pg.audit").addHandler(handler)
    # Another connection holds the write lock, as a slow disk or a busy
    # `qmesh` command would: the writer is stuck, the producer must not be.
    holding, release = threading.Event(), threading.Event()

    def hold_the_write_lock() -> None:
        with StateStore.open(state_location) as other, other._write():
            holding.set()
            release.wait()

    blocker = threading.Thread(target=hold_the_write_lock)
    blocker.start()
    assert holding.wait(60), "the other connection never took the write lock"
    audit = AuditLog(store, max_queue=20, batch_size=5)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(audit.run)
            try:
                record(audit, 0)
                # The writer has taken a batch and waits for the lock.
                await wait_until(lambda: not audit.queue.queued, 30)
                for i in range(1, 100):
                    record(audit, i)  # returns at once: the queue is bounded
                assert audit.dropped == 100 - 1 - audit.max_queue
            finally:
                # Before the writer's shielded last flush: it waits for the lock.
                release.set()
            with trio.fail_after(10):
                await audit.flush()
            nursery.cancel_scope.cancel()
    finally:
        release.set()
        blocker.join()
        logging.getLogger("qmesh.pg.audit").removeHandler(handler)
    assert audit.written == 1 + audit.max_queue
    assert len(list_audit(store, limit=1000)) == audit.written
    assert any(f"dropped {audit.dropped} records" in m for m in messages), messages


async def test_a_failed_batch_is_counted_and_the_service_goes_on(store: StateStore) -> None:
    audit = AuditLog(store)
    with store._write() as conn:  # the database refuses the batch: no such table
        conn.execute("ALTER TABLE pg_audit_blocks RENAME TO pg_audit_away")
    async with trio.open_nursery() as nursery:
        await nursery.start(audit.run)
        record(audit, 1)
        with trio.fail_after(10):
            await audit.flush()
        with store._write() as conn:
            conn.execute("ALTER TABLE pg_audit_away RENAME TO pg_audit_blocks")
        record(audit, 2)
        with trio.fail_after(10):
            await audit.flush()
        nursery.cancel_scope.cancel()
    assert (audit.failed, audit.written) == (1, 1)


async def test_a_row_count_past_the_column_is_held_to_it(store: StateStore) -> None:
    """A server's CommandComplete counts are summed per statement; a count no
    column holds (a hostile server) is stored as the largest one, and the
    records of the same batch are not lost with it."""
    audit = AuditLog(store)
    async with trio.open_nursery() as nursery:
        await nursery.start(audit.run)
        record(audit, 1, rows=2**70)
        record(audit, 2)
        with trio.fail_after(10):
            await audit.flush()
        nursery.cancel_scope.cancel()
    assert (audit.written, audit.failed) == (2, 0)
    assert [r.rows for r in list_audit(store)] == [1, 2**63 - 1]


async def test_records_from_threads_and_a_final_flush_on_cancel(store: StateStore) -> None:
    audit = AuditLog(store)
    async with trio.open_nursery() as nursery:
        await nursery.start(audit.run)
        for i in range(3):
            await trio.to_thread.run_sync(functools.partial(record, audit, i))
        for i in range(3, 50):
            record(audit, i)
        nursery.cancel_scope.cancel()  # before the writer had a chance to run
    assert audit.written == 50
    assert len(list_audit(store, limit=100)) == 50


def test_records_queued_before_the_service_starts_are_written(store: StateStore) -> None:
    audit = AuditLog(store)
    record(audit, 1)
    thread_done = threading.Event()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(audit.run)
            with trio.fail_after(10):
                await audit.flush()
            thread_done.set()
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert thread_done.is_set() and audit.written == 1


async def test_list_audit_filters(store: StateStore) -> None:
    audit = AuditLog(store)
    async with trio.open_nursery() as nursery:
        await nursery.start(audit.run)
        record(audit, 1, app="shop", alias="orders")
        record(audit, 2, app="shop", alias="billing", outcome="error 42P01", rows=None)
        record(audit, 3, app="etl", alias="orders")
        with trio.fail_after(10):
            await audit.flush()
        nursery.cancel_scope.cancel()
    assert [r.statement for r in list_audit(store, app="shop")] == ["SELECT 2", "SELECT 1"]
    assert [r.statement for r in list_audit(store, alias="orders")] == ["SELECT 3", "SELECT 1"]
    assert [r.statement for r in list_audit(store, app="shop", alias="billing")] == ["SELECT 2"]
    assert len(list_audit(store, limit=2)) == 2
    assert list_audit(store, app="nobody") == []
    assert list_audit(store, since=1e12) == []
    error = list_audit(store, alias="billing")[0]
    assert (error.outcome, error.rows) == ("error 42P01", None)


async def test_a_sessions_prepared_texts_are_bounded_in_bytes(store: StateStore) -> None:
    """A client that prepares large statements under many names cannot make
    the audit hold them all: past the byte bound the oldest is forgotten,
    and only its text is lost to the audit (the engine's bounds, alike)."""
    audit = AuditLog(store)
    watch = SessionWatch(audit, "shop", "orders", AppPolicy.of(GateAppConfig()))
    size = MAX_TRACKED_BYTES // 4  # the fourth and fifth push the first two out
    texts = {f"s{i}".encode(): f"SELECT '{i}' || '{'x' * size}'" for i in range(5)}
    for name, text in texts.items():
        watch.frontend(ord("P"), _core.encode_parse(name, text), 0.0)
    assert watch.statements.bytes <= MAX_TRACKED_BYTES
    for name in (b"s0", b"s4"):
        bind = name + b"\0" + name + b"\0" + b"\0\0" * 3
        watch.frontend(ord("B"), _core.encode_message(ord("B"), bind), 0.0)
        execute = name + b"\0" + b"\0\0\0\0"
        watch.frontend(ord("E"), _core.encode_message(ord("E"), execute), 0.0)
        watch.backend(ord("C"), _core.encode_message(ord("C"), b"SELECT 1\0"), 0.001)
    async with trio.open_nursery() as nursery:
        await nursery.start(audit.run)
        with trio.fail_after(30):
            await audit.flush()
        nursery.cancel_scope.cancel()
    newest, oldest = list_audit(store, limit=10)
    assert oldest.statement == "<statement prepared before the audit could see it>"
    assert newest.statement_sha256 == sha(texts[b"s4"])
    assert (newest.rows, newest.outcome) == (1, "ok")


async def written(audit: AuditLog, *ids: int) -> None:
    """Record ``SELECT i`` for each of ``ids`` and wait until they are stored."""
    async with trio.open_nursery() as nursery:
        await nursery.start(audit.run)
        for i in ids:
            record(audit, i)
        with trio.fail_after(10):
            await audit.flush()
        nursery.cancel_scope.cancel()


async def test_records_of_earlier_versions_a_row_each_are_read_with_the_blocks(
    state_location: Path | str,
) -> None:
    """A state written before blocks keeps its rows: they are listed with the
    records written since, newest first, and no id is given twice."""
    with StateStore.open(state_location, migrate=False) as old:
        blocks = next(i for i, step in enumerate(old.migrations) if "pg_audit_blocks" in step[0])
        with old._write() as conn:
            conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
            conn.execute("INSERT INTO schema_version (version) VALUES (?)", (blocks,))
            for statements in old.migrations[:blocks]:
                for statement in statements:
                    conn.execute(statement)
            for row_id, ts, text in ((5000, 1.0, "SELECT 'oldest'"), (5001, 4e9, "SELECT 'ahead'")):
                conn.execute(
                    "INSERT INTO pg_audit (id, ts, app, alias, statement, statement_sha256,"
                    " duration_ms, rows, outcome, session) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (row_id, ts, "shop", "orders", text, sha(text), 2.0, 1, "ok", "edge-1/7"),
                )
    with StateStore.open(state_location) as store:
        await written(AuditLog(store), 1)
        records = list_audit(store)
        assert [r.statement for r in records] == ["SELECT 'ahead'", "SELECT 1", "SELECT 'oldest'"]
        assert records[1].id > 5001
        assert records[0].session == "edge-1/7"
        assert [r.statement for r in list_audit(store, limit=2)] == ["SELECT 'ahead'", "SELECT 1"]
        assert [r.statement for r in list_audit(store, since=2.0)] == ["SELECT 'ahead'", "SELECT 1"]


async def test_a_damaged_block_is_skipped_with_an_error_and_the_rest_is_read(
    store: StateStore, caplog: pytest.LogCaptureFixture
) -> None:
    await written(AuditLog(store), 1)
    with store._write() as conn:
        conn.execute(
            "INSERT INTO pg_audit_blocks (id, app, alias, first_ts, last_ts, records, body)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (10**6, "shop", "orders", 4e9, 4e9, 1, b"not a block"),
        )
    with caplog.at_level(logging.ERROR, logger="qmesh.pg.audit"):
        assert [r.statement for r in list_audit(store)] == ["SELECT 1"]
    assert [r.getMessage() for r in caplog.records] == [
        "audit: block 1000000 skipped: damaged audit block: not a zstd frame"
    ]


async def test_the_newest_records_come_from_the_newest_blocks(store: StateStore) -> None:
    """With records in many blocks, a short listing (which stops reading at
    the first block too old to matter) is the start of the whole one."""
    audit = CountingAuditLog(store, batch_size=7)
    async with trio.open_nursery() as nursery:
        await nursery.start(audit.run)
        for i in range(100):
            record(audit, i, app=("shop", "etl")[i % 2])
            if i % 10 == 0:
                await trio.lowlevel.checkpoint()
        with trio.fail_after(30):
            await audit.flush()
        nursery.cancel_scope.cancel()
    assert len(audit.batches) > 10
    everything = list_audit(store, limit=1000)
    assert len(everything) == 100
    assert len({r.id for r in everything}) == 100
    keys = [(r.ts, r.id) for r in everything]
    assert keys == sorted(keys, reverse=True)
    for limit in (1, 5, 13, 99):
        assert list_audit(store, limit=limit) == everything[:limit]
    etl = [r for r in everything if r.app == "etl"]
    assert list_audit(store, app="etl", limit=9) == etl[:9]
    since = everything[20].ts
    assert list_audit(store, since=since, limit=1000) == [r for r in everything if r.ts >= since]


DAY = 86_400.0


def block_ids(store: StateStore) -> list[int]:
    with store._read() as conn:
        return [i for (i,) in conn.execute("SELECT id FROM pg_audit_blocks ORDER BY id")]


def age(store: StateStore, block: int, *, first: float, last: float) -> None:
    """Move a block's first and last end times back by ``first`` and ``last`` seconds."""
    with store._write(announce=False) as conn:
        conn.execute(
            "UPDATE pg_audit_blocks SET first_ts = first_ts - ?, last_ts = last_ts - ?"
            " WHERE id = ?",
            (first, last, block),
        )


async def test_records_past_the_retention_are_deleted_a_block_at_a_time(
    store: StateStore,
) -> None:
    """A block goes once its newest record is past the retention; one that
    also holds newer records stays whole. Rows of earlier versions go by
    their own time. Nothing newer is touched."""
    audit = AuditLog(store)
    await written(audit, 1, 2)  # all past the retention
    await written(audit, 3)  # its first record past it, its last not
    await written(audit, 4)
    old, straddling, _ = block_ids(store)
    age(store, old, first=10 * DAY, last=10 * DAY)
    age(store, straddling, first=10 * DAY, last=0)
    now = time.time()
    with store._write(announce=False) as conn:
        for ts, text in ((now - 10 * DAY, "SELECT 'old row'"), (now, "SELECT 'new row'")):
            conn.execute(
                "INSERT INTO pg_audit (ts, app, alias, statement, statement_sha256, duration_ms,"
                " rows, outcome, session) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (ts, "shop", "orders", text, sha(text), 2.0, 1, "ok", None),
            )
    assert audit.prune_some(now - DAY) == (3, False)
    assert audit.pruned == 3
    kept = [r.statement or "" for r in list_audit(store)]
    assert sorted(kept) == ["SELECT 'new row'", "SELECT 3", "SELECT 4"]
    assert audit.prune_some(now - DAY) == (0, False)
    with pytest.raises(ValueError, match="retention must be > 0"):
        AuditLog(store, retention_s=0)


async def test_a_long_prune_goes_in_short_transactions(
    store: StateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each call deletes at most a chunk of blocks, in its own transaction,
    and says whether more may be left."""
    monkeypatch.setattr(audit_module, "_PRUNE_CHUNK", 2)
    audit = AuditLog(store)
    for i in range(5):
        await written(audit, i)
    for block in block_ids(store):
        age(store, block, first=10 * DAY, last=10 * DAY)
    before = time.time() - DAY
    assert [audit.prune_some(before) for _ in range(3)] == [(2, True), (2, True), (1, False)]
    assert list_audit(store) == []


async def test_the_service_applies_the_retention_while_it_writes(
    store: StateStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="qmesh.pg.audit")
    audit = AuditLog(store, retention_s=DAY, prune_every_s=0.01)
    async with trio.open_nursery() as nursery:
        await nursery.start(audit.run)
        record(audit, 1)
        record(audit, 2)
        with trio.fail_after(10):
            await audit.flush()
        for block in block_ids(store):
            age(store, block, first=2 * DAY, last=2 * DAY)
        record(audit, 3)
        with trio.fail_after(10):
            await audit.flush()
            await until(lambda: "audit: deleted 2 records older than 1.0 days" in caplog.text)
        nursery.cancel_scope.cancel()
    assert [r.statement for r in list_audit(store)] == ["SELECT 3"]
    assert audit.pruned == 2


def test_the_gates_retention_setting_reaches_its_audit(store: StateStore) -> None:
    kept = PgService(Config(), store, vault=None)
    assert kept.audit.retention_s is None
    gate = GateConfig(pg_audit=PgAuditConfig(retention_days=30))
    pruned = PgService(Config(gate=gate), store, vault=None)
    assert pruned.audit.retention_s == 30 * DAY
