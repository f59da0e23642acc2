"""Transaction pooling at the Gate: many client sessions through MiniGates
on a PostgreSQL that allows 50 connections, with real clients (psql,
pgbench, psycopg 3, asyncpg) and the server's own view of its connections."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import asyncpg
import attrs
import psycopg
import pytest
import trio
from pgcluster import PgCluster
from pgkit import Ghost, RealDb, cancel_a_sleep, in_asyncio, in_thread, run, start_ghost
from tunnelkit import until

from qmesh.config import GateAppConfig
from qmesh.fleet.inventory import Inventory
from qmesh.ops.metrics import GateMetrics
from qmesh.pg.audit import list_audit
from qmesh.pg.policy import policy_to_json
from qmesh.pg.pool_cli import format_pools

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
    out = db.superuser(f"SELECT count(*) FROM pg_stat_activity WHERE usename = '{db.name}'")
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
                row = conn.execute(
                    "SELECT %s::int * 2, pg_backend_pid()", (i * 100 + j,)
                ).fetchone()
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


async def test_pgbench_init_and_a_connection_per_transaction(ghost: Ghost) -> None:
    """pgbench -i (COPY, DDL, VACUUM) then 200 clients, each opening a new
    connection per transaction, in the three protocols: no failed
    transaction, and the server sees the pool's connections, no more."""
    env = {"PGPASSWORD": ghost.app_key}
    args = ["-h", "127.0.0.1", "-p", str(ghost.port), "-U", ghost.app_id, ghost.alias]
    with trio.fail_after(120):
        code, _, err = await run(["pgbench", "-i", "-s", "1", "-q", *args], env=env)
    assert code == 0, err
    most = 0

    async def watch() -> None:
        nonlocal most
        while True:
            most = max(most, await in_thread(lambda: server_connections(ghost.db)))
            await trio.sleep(0.05)

    async with trio.open_nursery() as watching:
        watching.start_soon(watch)
        for mode in ("simple", "extended", "prepared"):
            with trio.fail_after(180):
                code, out, err = await run(
                    ["pgbench", "-c", "200", "-j", "2", "-C", "-t", "5", "-S", "-M", mode, *args],
                    env=env,
                )
            assert code == 0, err
            assert "number of failed transactions: 0 (0.000%)" in out, out
            assert "number of transactions actually processed: 1000/1000" in out, out
        watching.cancel_scope.cancel()
    assert 1 <= most <= POOL_SIZE


async def test_a_thousand_clients_with_prepared_statements(ghost: Ghost) -> None:
    """1,000 asyncpg connections open at once, each with its own prepared
    statements (asyncpg prepares every query), through one pool of four."""
    import asyncio

    async def work() -> tuple[int, set[int]]:
        conns = await asyncio.gather(
            *(asyncpg.connect(**ghost.asyncpg_kwargs()) for _ in range(1000))
        )
        try:

            async def use(i: int, conn: asyncpg.Connection) -> tuple[int, int]:
                statement = await conn.prepare("SELECT $1::int + 1")
                total = 0
                for j in range(3):
                    total += int(await statement.fetchval(i + j))
                async with conn.transaction():
                    await conn.execute("SELECT 1")
                return total - (3 * i + 6), int(await conn.fetchval("SELECT pg_backend_pid()"))

            used = await asyncio.gather(*(use(i, c) for i, c in enumerate(conns)))
            values = await asyncio.gather(*(c.fetchval("SELECT $1::int * 3", 7) for c in conns))
            assert all(off == 0 for off, _ in used)  # each client got its own answers
            return sum(values), {pid for _, pid in used}
        finally:
            await asyncio.gather(*(c.close() for c in conns))

    with trio.fail_after(240):
        total, pids = await in_asyncio(work)
    assert total == 21 * 1000
    assert 1 <= len(pids) <= POOL_SIZE
    assert server_connections(ghost.db) <= POOL_SIZE


# -- queueing, session state, cancel ---------------------------------------------------


async def small_pool(nursery: trio.Nursery, db: RealDb, tmp_path: Path, **policy: object) -> Ghost:
    values: dict[str, object] = {"size": 1, "wait_ms": 400}
    values.update(policy)
    return await start_ghost(nursery, db, tmp_path, policy=pooled(**values))  # type: ignore[arg-type]


async def test_a_pool_exhausted_past_its_wait_refuses_the_waiting_client_only(
    nursery: trio.Nursery, db: RealDb, tmp_path: Path
) -> None:
    ghost = await small_pool(nursery, db, tmp_path)

    def work() -> str:
        with psycopg.connect(**ghost.kwargs()) as holder:  # not autocommit: BEGIN holds it
            assert holder.execute("SELECT 1").fetchone() == (1,)
            with psycopg.connect(**ghost.kwargs(), autocommit=True) as waiter:
                with pytest.raises(psycopg.OperationalError) as refused:
                    waiter.execute("SELECT 2")
            assert holder.execute("SELECT 3").fetchone() == (3,)  # the holder is unharmed
            holder.commit()
        with psycopg.connect(**ghost.kwargs(), autocommit=True) as later:
            assert later.execute("SELECT 4").fetchone() == (4,)
        return str(refused.value)

    with trio.fail_after(30):
        message = await in_thread(work)
    assert "no server connection became free within 0.4 s" in message
    assert (
        f'app "{ghost.app_id}" on database alias "main"' in message and "pool_size = 1" in message
    )
    (stats,) = ghost.service.pools.stats()
    assert stats.timeouts == 1 and stats.waits >= 1 and stats.open == 1
    # What an operator reads: /metrics and `qmesh pg pools`.
    metrics = GateMetrics(
        server=ghost.gate.server, inventory=Inventory(), pg_pools=ghost.service.pools.stats
    ).render()
    labels = f'{{app="{ghost.app_id}",alias="main"}}'
    assert f"qmesh_pg_pool_timeouts_total{labels} 1" in metrics
    assert f"qmesh_pg_pool_size{labels} 1" in metrics
    assert f"qmesh_pg_pool_waiting_clients{labels} 0" in metrics
    header, row = format_pools([attrs.asdict(stats)]).splitlines()
    assert header.split()[:3] == ["APP", "ALIAS", "SIZE"]
    assert row.split()[:3] == [ghost.app_id, "main", "1"]


async def test_session_state_pins_and_is_reset_before_the_next_client(
    nursery: trio.Nursery, db: RealDb, tmp_path: Path
) -> None:
    """A session-level SET pins the session to its connection (it keeps
    its setting across transactions); when it leaves, the connection is
    reset before the next client gets it."""
    ghost = await small_pool(nursery, db, tmp_path, wait_ms=10_000)

    def work() -> tuple[str, str, str]:
        with psycopg.connect(**ghost.kwargs(), autocommit=True) as conn:
            conn.execute("SET search_path = pinned_schema, public")
            conn.execute("LISTEN somewhere")
            kept = conn.execute("SHOW search_path").fetchone()
            assert conn.execute("SELECT 1").fetchone() == (1,)
        with psycopg.connect(**ghost.kwargs(), autocommit=True) as other:
            fresh = other.execute("SHOW search_path").fetchone()
            channels = other.execute("SELECT count(*) FROM pg_listening_channels()").fetchone()
        assert kept is not None and fresh is not None and channels is not None
        return kept[0], fresh[0], str(channels[0])

    with trio.fail_after(30):
        kept, fresh, channels = await in_thread(work)
    assert kept == "pinned_schema, public"
    assert fresh == '"$user", public' and channels == "0"


async def test_cancel_reaches_the_connection_running_the_query(ghost: Ghost) -> None:
    assert await cancel_a_sleep(ghost) == 42
    assert ghost.service.cancel_keys.forwarded == 1
    sleeping = ghost.db.superuser(
        "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(60)%'"
        " AND state = 'active'"
    )
    assert sleeping.strip() == "0"


async def test_copy_errors_and_pipelines_in_transaction_mode(ghost: Ghost) -> None:
    def work() -> tuple[list[tuple[int, str]], bytes, int]:
        with psycopg.connect(**ghost.kwargs(), prepare_threshold=0) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS c (id int PRIMARY KEY, note text)")
            conn.execute("TRUNCATE c")
            with conn.cursor().copy("COPY c (id, note) FROM STDIN") as copy:
                for i in range(500):
                    copy.write_row((i, f"row {i}"))
            conn.commit()
            with pytest.raises(psycopg.errors.UniqueViolation):
                conn.execute("INSERT INTO c VALUES (1, 'again')")
            conn.rollback()
            out = b""
            with conn.cursor().copy(
                "COPY (SELECT id FROM c WHERE id < 3 ORDER BY id) TO STDOUT"
            ) as copy:
                for chunk in copy:
                    out += bytes(chunk)
            conn.commit()
            with conn.pipeline():
                cur = conn.cursor()
                for i in range(20):
                    cur.execute("INSERT INTO c VALUES (%s, %s)", (1000 + i, "piped"))
            conn.commit()
            rows = conn.execute(
                "SELECT id, note FROM c WHERE id IN (0, 499) ORDER BY id"
            ).fetchall()
            count = conn.execute("SELECT count(*) FROM c").fetchone()
            assert count is not None
            return rows, out, count[0]

    with trio.fail_after(60):
        rows, out, count = await in_thread(work)
    assert rows == [(0, "row 0"), (499, "row 499")]
    assert out == b"0\n1\n2\n"
    assert count == 520


async def test_a_server_connection_killed_while_idle_is_replaced_unnoticed(ghost: Ghost) -> None:
    def work() -> tuple[int, int]:
        with psycopg.connect(**ghost.kwargs(), autocommit=True, prepare_threshold=0) as conn:
            before = conn.execute("SELECT pg_backend_pid(), %s::int", (1,)).fetchone()
            assert before is not None
            ghost.db.superuser(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                f" WHERE usename = '{ghost.db.name}'"
            )
            after = conn.execute("SELECT pg_backend_pid(), %s::int", (2,)).fetchone()
            assert after is not None and after[1] == 2
            return before[0], after[0]

    with trio.fail_after(30):
        before, after = await in_thread(work)
    assert before != after


@pytest.mark.parametrize(
    "cursor", [psycopg.Cursor, psycopg.ClientCursor], ids=["python-relay", "engine"]
)
async def test_a_server_connection_killed_mid_transaction_ends_that_client_only(
    ghost: Ghost, cursor: type[psycopg.Cursor[tuple[object, ...]]]
) -> None:
    """With the extended protocol the session is in Python's relay; with
    simple Queries (ClientCursor) the engine holds the connection."""

    def work() -> str:
        with (
            psycopg.connect(**ghost.kwargs(), cursor_factory=cursor) as victim,
            psycopg.connect(**ghost.kwargs(), autocommit=True, cursor_factory=cursor) as bystander,
        ):
            row = victim.execute("SELECT pg_backend_pid()").fetchone()
            assert row is not None
            ghost.db.superuser(f"SELECT pg_terminate_backend({row[0]})")
            with pytest.raises(psycopg.OperationalError) as lost:
                victim.execute("SELECT 1")
            assert bystander.execute("SELECT 5").fetchone() == (5,)
            return str(lost.value)

    with trio.fail_after(30):
        message = await in_thread(work)
    assert "terminating connection due to administrator command" in message


async def test_bad_client_bytes_end_that_client_only(ghost: Ghost) -> None:
    from pgkit import RawClient

    from qmesh import _core

    def work() -> dict[str, str]:
        with psycopg.connect(**ghost.kwargs(), autocommit=True) as bystander:
            raw = RawClient(ghost.port)
            raw.login(ghost.app_id, ghost.app_key, ghost.alias)
            raw.query("SELECT 1")
            raw.send(_core.encode_message(ord("P"), b"dup\0SELECT 1\0\0\0"))
            raw.send(_core.encode_message(ord("P"), b"dup\0SELECT 2\0\0\0"))
            raw.send(_core.encode_message(ord("S"), b""))
            error = raw.error()
            assert raw.closed()
            garbage = RawClient(ghost.port)
            garbage.login(ghost.app_id, ghost.app_key, ghost.alias)
            garbage.send(b"\x01\x00\x00\x00\x04")
            assert garbage.error()["C"] == "08P01"
            assert bystander.execute("SELECT 6").fetchone() == (6,)
            return error

    with trio.fail_after(30):
        error = await in_thread(work)
    assert error["C"] == "42P05" and 'prepared statement "dup" already exists' in error["M"]


async def test_statements_are_audited_under_the_app_and_client_session(ghost: Ghost) -> None:
    """Each record names the app and the client session: the edge and the
    process id the client was told (not the pooled server connection's)."""

    def work() -> list[int]:
        pids = []
        for _ in range(2):
            with psycopg.connect(**ghost.kwargs(), autocommit=True, prepare_threshold=0) as conn:
                conn.execute("SELECT %s::int AS audited_in_pool", (1,))
                pids.append(conn.info.backend_pid)
        return pids

    with trio.fail_after(30):
        pids = await in_thread(work)
        await ghost.audit_settled()
    records = [r for r in list_audit(ghost.store) if "audited_in_pool" in (r.statement or "")]
    assert all(r.app == ghost.app_id and r.outcome == "ok" for r in records)
    assert sorted(r.session or "" for r in records) == sorted(f"edge-pg/{pid}" for pid in pids)


async def test_a_server_restart_breaks_no_later_transaction_and_the_pool_refills(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Idle connections broken by a restart fail their check before reuse
    and are replaced; while the server is down a client gets a clear
    error; when it is back the pool opens connections again."""
    base = Path(tempfile.mkdtemp(prefix="qmesh-pg-restart-"))
    try:
        with PgCluster(base, max_connections=50) as cluster:
            db = RealDb(cluster, prefix="restart")
            ghost = await start_ghost(nursery, db, tmp_path, policy=pooled(size=2))
            ghost.service.pools.settings = attrs.evolve(
                ghost.service.pools.settings, server_check_delay_s=0.0
            )

            def query(value: int) -> int:
                with psycopg.connect(**ghost.kwargs(), autocommit=True) as conn:
                    row = conn.execute("SELECT %s::int", (value,)).fetchone()
                    assert row is not None
                    return int(row[0])

            with trio.fail_after(60):
                assert await in_thread(lambda: query(1)) == 1
                cluster.stop()
                with pytest.raises(psycopg.OperationalError, match="cannot reach the server"):
                    await in_thread(lambda: query(2))
                cluster.start()
                assert await in_thread(lambda: query(3)) == 3
            (stats,) = ghost.service.pools.stats()
            assert stats.checks_failed >= 1 and stats.open >= 1
    finally:
        shutil.rmtree(base, ignore_errors=True)


async def test_apps_on_one_alias_share_its_cap(ghost: Ghost) -> None:
    """With max_server_connections_per_alias, a second app's pool takes an
    idle connection's place from the first app's: the server never sees
    more than the cap (the Gate's count: the server's own lags a closed
    connection's exit)."""
    ghost.service.pools.settings = attrs.evolve(
        ghost.service.pools.settings, max_server_connections_per_alias=2
    )
    other = "app-other"
    other_key = ghost.store.add_app(other)
    ghost.store.set_app_policy(other, policy_to_json(pooled(size=5)))
    await ghost.service.refresh_apps()

    def work() -> int:
        first = [psycopg.connect(**ghost.kwargs()) for _ in range(2)]
        try:
            for conn in first:  # two transactions at once: two server connections
                conn.execute("SELECT 1")
            for conn in first:
                conn.commit()
            held = server_connections(ghost.db)
            with psycopg.connect(**ghost.kwargs(user=other, password=other_key)) as second:
                row = second.execute("SELECT 7").fetchone()
                assert row == (7,)
                second.commit()
            return held
        finally:
            for conn in first:
                conn.close()

    with trio.fail_after(30):
        held = await in_thread(work)
    assert held == 2
    by_app = {s.app_id: s for s in ghost.service.pools.stats()}
    assert sum(s.open for s in by_app.values()) == 2
    assert by_app[ghost.app_id].closed >= 1 and by_app[other].opened == 1


async def test_the_alias_cap_holds_across_gates_on_one_state(
    nursery: trio.Nursery, db: RealDb, tmp_path: Path
) -> None:
    """Two Gates on one state, a cap of 2 connections to the alias: while
    the first Gate's clients hold both, the second Gate's client waits in
    line; when the first Gate's connections go (idle timeout), it gets one."""
    state = tmp_path / "shared.db"
    first = await start_ghost(nursery, db, tmp_path, policy=pooled(size=5), state=state)
    second = await start_ghost(nursery, db, tmp_path, policy=pooled(size=5), state=state)
    for name, ghost in (("gate-a", first), ("gate-b", second)):
        gate = attrs.evolve(ghost.service.config.gate, name=name)
        ghost.service.config = attrs.evolve(ghost.service.config, gate=gate)
        ghost.service.pools.settings = attrs.evolve(
            ghost.service.pools.settings,
            max_server_connections_per_alias=2,
            server_idle_timeout_s=0.2,
        )
        with ghost.store._write() as registry:  # registered and live, as a running Gate is
            registry.execute(
                "INSERT INTO gates (name, instance, tunnel, http, host, version, started_at,"
                " heartbeat_at, gone_after_s) VALUES (?, 'i', '-', '-', 'h', 'v', ?, ?, 3600)",
                (name, time.time(), time.time() + 3600),
            )
    await nursery.start(first.service.pools.run)  # the reapers, with the short idle timeout
    await nursery.start(second.service.pools.run)

    late = await in_thread(lambda: psycopg.connect(**second.kwargs(), autocommit=True))
    holders = [await in_thread(lambda: psycopg.connect(**first.kwargs())) for _ in range(2)]
    try:
        with trio.fail_after(60):
            for holder in holders:  # two transactions open at gate-a: both places taken
                await in_thread(partial(holder.execute, "SELECT 1"))
            assert sum(p.lent for p in first.service.pools.stats()) == 2
            async with trio.open_nursery() as waiting:
                answer: list[object] = []

                async def ask() -> None:
                    answer.append(await in_thread(lambda: late.execute("SELECT 2").fetchone()))

                waiting.start_soon(ask)
                await until(lambda: sum(p.waiting for p in second.service.pools.stats()) == 1)
                for holder in holders:
                    await in_thread(holder.commit)  # idle, then closed after 0.2 s at gate-a
            assert answer == [(2,)]
    finally:
        for client in [late, *holders]:
            client.close()
    (late_pool,) = second.service.pools.stats()
    assert late_pool.waits == 1 and late_pool.timeouts == 0
