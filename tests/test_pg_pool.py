"""Transaction pooling at the Gate: many client sessions through MiniGates
on a PostgreSQL that allows 50 connections, with real clients (psql,
pgbench, psycopg 3, asyncpg) and the server's own view of its connections."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psycopg
import pytest
import trio
from pgcluster import PgCluster
from pgkit import Ghost, RealDb, in_asyncio, in_thread, run, start_ghost

from qmesh.config import GateAppConfig
from qmesh.pg.audit import list_audit

POOL_SIZE = 4


@pytest.fixture(scope="module")
def small_cluster() -> Iterator[PgCluster]:
    """A server of its own, with max_connections = 50."""
    base = Path(tempfile.mkdtemp(prefix="qmesh-pg50-"))
    try:
        with PgCluster(base, max_connections=50) as cluster:
            yield cluster
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def db(small_cluster: PgCluster) -> Iterator[RealDb]:
    yield RealDb(small_cluster, prefix="pool")


def pooled(size: int = POOL_SIZE, wait_ms: int = 30_000, **more: object) -> GateAppConfig:
    return GateAppConfig(
        databases=("main",), pool_mode="transaction", pool_size=size, pool_wait_ms=wait_ms,
        **more,  # type: ignore[arg-type]
    )  # fmt: skip


@pytest.fixture
async def ghost(nursery: trio.Nursery, db: RealDb, tmp_path: Path) -> Ghost:
    return await start_ghost(nursery, db, tmp_path, policy=pooled())


def server_connections(db: RealDb) -> int:
    """The server's own count of the role's client connections."""
    out = db.superuser(
        f"SELECT count(*) FROM pg_stat_activity WHERE usename = '{db.name}'"
    )
    return int(out.strip())


async def test_psql_script_in_transaction_mode(ghost: Ghost) -> None:
    script = b"""
CREATE TABLE IF NOT EXISTS t (id int PRIMARY KEY, note text);
TRUNCATE t;
BEGIN;
INSERT INTO t VALUES (1, 'one'), (2, 'two');
COMMIT;
BEGIN;
INSERT INTO t VALUES (3, 'three');
SELECT 1 / 0;
SELECT 1;
ROLLBACK;
SELECT id, note FROM t ORDER BY id;
\\d t
"""
    with trio.fail_after(30):
        code, out, err = await run(["psql", ghost.dsn(), "-X", "-A", "-q"], stdin=script)
    assert code == 0, err
    assert "division by zero" in err and "current transaction is aborted" in err
    assert "1|one\n2|two\n" in out and "three" not in out
    assert 'Table "public.t"' in out


async def test_psycopg_prepared_statements_share_few_connections(ghost: Ghost) -> None:
    def work(i: int) -> list[int]:
        seen = []
        with psycopg.connect(**ghost.kwargs(), autocommit=True, prepare_threshold=0) as conn:
            for j in range(30):
                row = conn.execute("SELECT %s::int * 2, pg_backend_pid()", (i * 100 + j,)).fetchone()
                assert row is not None and row[0] == 2 * (i * 100 + j)
                seen.append(row[1])
                with conn.transaction():
                    conn.execute("SELECT %s::text", ("in a transaction",))
        return seen

    results: list[list[int]] = []

    async def one(i: int) -> None:
        results.append(await in_thread(lambda: work(i)))

    with trio.fail_after(60):
        async with trio.open_nursery() as clients:
            for i in range(12):
                clients.start_soon(one, i)
    pids = {pid for seen in results for pid in seen}
    assert 1 <= len(pids) <= POOL_SIZE
    assert server_connections(ghost.db) <= POOL_SIZE
