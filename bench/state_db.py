#!/usr/bin/env python3
"""The Gate's PostgreSQL state from Trio: the pool in worker threads against
one dedicated database thread. One run, one table.

What runs: a throwaway PostgreSQL (scripts/pgcluster.py, 127.0.0.1, a free
port, fsync off) with a database ``qmesh_state``, opened as a real
``qmesh.state.StateStore`` (``StateStore.open("postgresql://…")``, schema
applied), and a SQLite store (``state.db`` in the run's temporary directory,
the default backend) as a reference. One Trio program issues, from 1, 8 and
64 Trio tasks that each loop for ``--seconds`` (after ``--warmup`` seconds
not counted), one of two typical state operations:

  read   ``store.get_app_keys(app_id)``: what the Postgres mimic does for
         every login and the HTTP API for every uncached key (qmesh.pg.service,
         qmesh.web.auth): two SELECTs (the app's row, its previous verifiers)
  write  one ledger append, as qmesh.finops.ledger's batch write does it, for
         a batch of one row: ``store._write(announce=False)`` (on PostgreSQL
         the single-writer advisory lock) and ``qmesh.finops.chain.append_rows``
         (read the chain head and MAX(id), insert the sealed row, move the
         head), committed. The Gate batches these (one transaction per 50 ms),
         so this is the worst case, a transaction per request.

Each operation is run by the same store code under these strategies:

  pool       as qmesh does today: ``trio.to_thread.run_sync(fn)`` (trio's
             default limiter, 40 threads) on ``PostgresDatabase``: a
             psycopg_pool of 8 autocommit connections, each checked out with
             the pool's ``check_connection`` (an empty query, one round trip)
  pool-nock  ablation: the same, with the pool's check switched off
             (``pool._check = None``), to tell the check's round trip apart
             from the threads and the pool
  thread     one dedicated database thread with one connection, fed by a
             queue: a Trio task puts (fn, its task, the Trio token) and
             sleeps in ``trio.lowlevel.wait_task_rescheduled``; the thread
             runs the items in order and reschedules each task with its
             outcome through ``TrioToken.run_sync_soon``. The store is the
             same ``PostgresDatabase`` code with ``pool_size=1`` and no check
             (so one psycopg connection, the same SQL, advisory lock and
             transactions; the pool's checkout of an idle connection is a
             lock and a deque, no I/O)
  sqlite     the reference: the default SQLite store (one connection under a
             lock, WAL, synchronous=NORMAL) through ``trio.to_thread.run_sync``

Printed per operation × concurrency: ops/s and the p50/p99 latency in ms of
one call as a Trio task sees it (from the call to its result), each strategy
side by side, and thread ÷ pool ops/s. Everything runs on this machine
(PostgreSQL included), so a small machine's other load shows; compare the
columns of one run. Nothing is asserted.

    .venv/bin/python bench/state_db.py [--seconds 3] [--warmup 0.5]
        [--concurrency 1,8,64] [--only pool,pool-nock,thread,sqlite]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import queue
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import outcome
import trio

from qmesh.finops.chain import append_rows
from qmesh.finops.ledger import LedgerEntry
from qmesh.state import StateStore
from qmesh.state.db import PostgresDatabase

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from pgcluster import PgCluster  # noqa: E402

STRATEGIES = ("pool", "pool-nock", "thread", "sqlite")
OPERATIONS = ("read", "write")
APP_ID = "bench-app"
T = TypeVar("T")
Call = Callable[[Callable[[], Any]], Awaitable[Any]]


def without_check(store: StateStore) -> StateStore:
    """Switch off the pool's check of a connection before each checkout."""
    database = store._db
    if not isinstance(database, PostgresDatabase) or not hasattr(database._pool, "_check"):
        raise RuntimeError("psycopg_pool changed: run with --only pool,sqlite")
    database._pool._check = None
    return store


Job = tuple[Callable[[], Any], trio.lowlevel.Task, trio.lowlevel.TrioToken]


class DatabaseThread:
    """One thread that runs the callables it is given, in order."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="state-db", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, task, token = job
            result = outcome.capture(fn)
            token.run_sync_soon(trio.lowlevel.reschedule, task, result)

    async def run(self, fn: Callable[[], T]) -> T:
        await trio.lowlevel.checkpoint_if_cancelled()
        task = trio.lowlevel.current_task()
        self._jobs.put((fn, task, trio.lowlevel.current_trio_token()))

        def abort(_: Any) -> trio.lowlevel.Abort:
            return trio.lowlevel.Abort.FAILED  # the job runs anyway: wait for it

        result: T = await trio.lowlevel.wait_task_rescheduled(abort)
        return result

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=10)


async def to_thread(fn: Callable[[], T]) -> T:
    return await trio.to_thread.run_sync(fn)


_request_ids = itertools.count()


def ledger_append(store: StateStore, key: bytes) -> None:
    entry = LedgerEntry(
        ts=time.time(), request_id=f"req-{next(_request_ids)}", app=APP_ID, budget="bench",
        task="chat", candidate="bench-model", kind="provider", model="bench-model",
        provider="bench", tokens_in=12, tokens_out=34, cost_usd=0.0001, shifted_from=None,
        avoided_usd=0.0, outcome="ok", hops='[{"candidate":"bench-model","outcome":"ok","ms":1}]',
        reason="cheapest",
    )  # fmt: skip
    with store._write(announce=False) as conn:
        append_rows(conn, key, "ledger", [entry.values()])


async def measure(call: Call, fn: Callable[[], Any], tasks: int, seconds: float) -> list[float]:
    """Per-call latencies (s) of ``tasks`` Trio tasks looping for ``seconds``;
    the last element is the elapsed time."""
    latencies: list[float] = []
    end = time.perf_counter() + seconds

    async def loop() -> None:
        while time.perf_counter() < end:
            started = time.perf_counter()
            await call(fn)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(tasks):
            nursery.start_soon(loop)
    return [*latencies, time.perf_counter() - started]


def percentile(ordered: list[float], fraction: float) -> float:
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def run_all(
    setups: dict[str, tuple[Call, dict[str, Callable[[], Any]]]],
    counts: list[int],
    seconds: float,
    warmup: float,
) -> dict[tuple[str, int, str], tuple[float, float, float]]:
    results: dict[tuple[str, int, str], tuple[float, float, float]] = {}
    for operation in OPERATIONS:
        for tasks in counts:
            # Strategies alternate within each cell, so drift hits them alike.
            for name, (call, operations) in setups.items():
                fn = operations[operation]
                await measure(call, fn, tasks, warmup)
                *latencies, elapsed = await measure(call, fn, tasks, seconds)
                latencies.sort()
                results[(operation, tasks, name)] = (
                    len(latencies) / elapsed,
                    percentile(latencies, 0.50) * 1000,
                    percentile(latencies, 0.99) * 1000,
                )
                print(".", end="", flush=True, file=sys.stderr)
    print(file=sys.stderr)
    return results


def interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds per cell")
    parser.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds first")
    parser.add_argument("--concurrency", default="1,8,64", help="Trio tasks, comma-separated")
    parser.add_argument("--only", default=",".join(STRATEGIES), help="comma-separated strategies")
    args = parser.parse_args()
    counts = [int(c) for c in args.concurrency.split(",")]
    strategies = [s for s in STRATEGIES if s in args.only.split(",")]
    # SIGTERM as Ctrl-C: the finally below stops the server and removes the directory.
    signal.signal(signal.SIGTERM, interrupt)
    base = Path(tempfile.mkdtemp(prefix="qmesh-statedb-bench-"))
    os.chmod(base, 0o755)  # as root the server runs as `postgres`
    cluster: PgCluster | None = None
    closers: list[Callable[[], None]] = []
    try:
        cluster = PgCluster(base / "pg").start()
        cluster.psql("CREATE DATABASE qmesh_state")
        url = cluster.dsn_for("postgres", cluster.password, "qmesh_state")
        key = os.urandom(32)  # the chain key: any 32 bytes for sealing rows
        setups: dict[str, tuple[Call, dict[str, Callable[[], Any]]]] = {}

        def operations(store: StateStore) -> dict[str, Callable[[], Any]]:
            return {
                "read": lambda: store.get_app_keys(APP_ID),
                "write": lambda: ledger_append(store, key),
            }

        pool_store = StateStore.open(url)
        closers.append(pool_store.close)
        pool_store.add_app(APP_ID)
        if "pool" in strategies:
            setups["pool"] = (to_thread, operations(pool_store))
        if "pool-nock" in strategies:
            unchecked = without_check(StateStore.open(url))
            closers.append(unchecked.close)
            setups["pool-nock"] = (to_thread, operations(unchecked))
        if "thread" in strategies:
            one = without_check(StateStore(PostgresDatabase(url, pool_size=1)))
            closers.append(one.close)
            worker = DatabaseThread()
            closers.append(worker.close)  # runs first: closers are called in reverse
            setups["thread"] = (worker.run, operations(one))
        if "sqlite" in strategies:
            lite = StateStore.open(base / "state.db")
            closers.append(lite.close)
            lite.add_app(APP_ID)
            setups["sqlite"] = (to_thread, operations(lite))
        results = trio.run(run_all, setups, counts, args.seconds, args.warmup)
    finally:
        for close in reversed(closers):
            with contextlib.suppress(Exception):
                close()
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(base, ignore_errors=True)

    print(
        f"{args.seconds:g} s per cell after {args.warmup:g} s warm-up, {os.cpu_count()} CPUs, "
        "PostgreSQL on the same machine; ops/s (p50/p99 ms per call)"
    )
    print(
        "read = store.get_app_keys (2 SELECTs); write = a one-row ledger append, "
        "its own transaction"
    )
    header = ["op", "tasks", *setups]
    ratio = "pool" in setups and "thread" in setups
    if ratio:
        header.append("thread/pool")
    rows = [header]
    for operation in OPERATIONS:
        for tasks in counts:
            row = [operation, str(tasks)]
            for name in setups:
                rate, p50, p99 = results[(operation, tasks, name)]
                row.append(f"{rate:,.0f} ({p50:.2f}/{p99:.2f})")
            if ratio:
                pool_rate = results[(operation, tasks, "pool")][0]
                row.append(f"{results[(operation, tasks, 'thread')][0] / pool_rate:.2f}x")
            rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * width for width in widths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
