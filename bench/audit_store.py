#!/usr/bin/env python3
"""The statement audit's writer: compressed blocks against a row per
statement. One run, one table.

What runs: a fresh SQLite state store (the default backend: WAL,
synchronous=NORMAL, in the run's temporary directory) per strategy and
workload, schema applied. ``--records`` statements are recorded through a
real ``qmesh.pg.audit.AuditLog`` (``record_many``, 10 at a time, app
``bench``, alias ``pgbench``, one client session, ``text`` mode), then
written in batches of 1,000, as the Gate's writer does, by one of:

  blocks  what qmesh does: ``AuditLog._write_batch``:
          ``AuditQueue.take_blocks`` (hash, encode, zstd without the GIL)
          and one INSERT per block into ``pg_audit_blocks``
  rows    the earlier format, a row per statement into ``pg_audit`` (two
          indexes), as ``qmesh.state.db.insert_many`` wrote it. Only the
          INSERTs and the commit are timed: the values (hash included) are
          made beforehand, so this is a lower bound on that writer's CPU.

Workloads: ``simple``, pgbench's select-only statement with a literal that
changes each time (every text differs); ``prepared``, one text with a
parameter, as the Executes of a prepared statement are recorded.

Printed per workload: the writer thread's CPU per record (thread time, so
other load on the machine counts little) and the state files' bytes per
record after a WAL checkpoint, each strategy side by side, and rows ÷
blocks. Nothing is asserted.

    .venv/bin/python bench/audit_store.py [--records 200000]
"""

from __future__ import annotations

import argparse
import hashlib
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from qmesh.pg.audit import AuditLog
from qmesh.state import StateStore
from qmesh.state.db import insert_many

BATCH = 1_000
ROW_WIDTH = 9

WORKLOADS: dict[str, Callable[[random.Random], str]] = {
    "simple": lambda rng: (
        f"SELECT abalance FROM pgbench_accounts WHERE aid = {rng.randint(1, 1_000_000)};"
    ),
    "prepared": lambda rng: "SELECT abalance FROM pgbench_accounts WHERE aid = $1;",
}


def statements(workload: str, count: int) -> list[bytes]:
    rng = random.Random(7)
    make = WORKLOADS[workload]
    return [make(rng).encode() for _ in range(count)]


def recorded(audit: AuditLog, texts: list[bytes]) -> None:
    for start in range(0, len(texts), 10):
        audit.record_many(
            app="bench",
            alias="pgbench",
            session="edge-1/4242",
            statements=[(text, 0.00012, 1, "ok") for text in texts[start : start + 10]],
        )


def run_blocks(store: StateStore, texts: list[bytes]) -> float:
    """Thread seconds writing ``texts`` as blocks."""
    audit = AuditLog(store, max_queue=len(texts), batch_size=BATCH)
    recorded(audit, texts)
    spent = 0.0
    while audit.queue.queued:
        started = time.thread_time()
        audit._write_batch()
        spent += time.thread_time() - started
    return spent


def run_rows(store: StateStore, texts: list[bytes]) -> float:
    """Thread seconds writing ``texts`` a row each (values made untimed)."""
    now = time.time()
    spent = 0.0
    for start in range(0, len(texts), BATCH):
        values: list[object] = []
        for i, text in enumerate(texts[start : start + BATCH]):
            values += [
                now + (start + i) * 1e-5,
                "bench",
                "pgbench",
                text.decode(),
                hashlib.sha256(text).hexdigest(),
                0.12,
                1,
                "ok",
                "edge-1/4242",
            ]
        started = time.thread_time()
        with store._write(announce=False) as conn:
            insert_many(
                conn,
                "INSERT INTO pg_audit (ts, app, alias, statement, statement_sha256,"
                " duration_ms, rows, outcome, session)",
                values,
                ROW_WIDTH,
            )
        spent += time.thread_time() - started
    return spent


STRATEGIES: dict[str, Callable[[StateStore, list[bytes]], float]] = {
    "blocks": run_blocks,
    "rows": run_rows,
}


def measure(strategy: str, texts: list[bytes], base: Path) -> tuple[float, float]:
    """(µs of writer CPU, bytes of state files) per record."""
    directory = Path(tempfile.mkdtemp(prefix=f"{strategy}-", dir=base))
    with StateStore.open(directory / "state.db") as store:
        spent = STRATEGIES[strategy](store, texts)
    # Closed: SQLite has checkpointed the WAL into the database file.
    size = sum(path.stat().st_size for path in directory.iterdir())
    return spent / len(texts) * 1e6, size / len(texts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=200_000)
    args = parser.parse_args()
    print(
        f"{args.records:,} records per cell, batches of {BATCH:,}, SQLite state, text mode;"
        " writer µs of thread CPU / state bytes per record"
    )
    header = f"{'workload':<10} {'blocks':>18} {'rows':>18} {'rows ÷ blocks':>16}"
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory(prefix="audit-store-") as base:
        for workload in WORKLOADS:
            texts = statements(workload, args.records)
            cells = {s: measure(s, texts, Path(base)) for s in STRATEGIES}
            (b_cpu, b_size), (r_cpu, r_size) = cells["blocks"], cells["rows"]
            print(
                f"{workload:<10} {b_cpu:>7.2f} µs {b_size:>6.1f} B"
                f" {r_cpu:>7.2f} µs {r_size:>6.1f} B"
                f" {r_cpu / b_cpu:>6.1f}× {r_size / b_size:>6.1f}×"
            )


if __name__ == "__main__":
    main()
