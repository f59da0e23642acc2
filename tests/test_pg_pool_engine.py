"""Transaction pooling relayed by the tunnel engine: simple-Query sessions
borrow and return server connections on the engine thread, and a session
moves to Python's relay, on the connection it holds and with the answers
still due, at the first message the engine does not follow. Real clients
(psycopg's simple-Query ClientCursor, raw protocol bytes) against a real
PostgreSQL."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import psycopg
import pytest
import trio
from pgcluster import PgCluster
from pgkit import (
    Ghost,
    RawClient,
    RealDb,
    app_policy,
    in_thread,
    pooled_ghost,
    server_messages_seen_by_python,
    start_ghost,
)
from tunnelkit import until

from qmesh import _core
from qmesh.config import GateAppConfig
from qmesh.fleet.inventory import Inventory
from qmesh.ops.metrics import GateMetrics
from qmesh.pg.audit import list_audit
from qmesh.pg.guard import Refusal
from qmesh.pg.policy import policy_to_json
from qmesh.pg.pool import PoolStats
from qmesh.pg.pool_cli import format_pools
from qmesh.pg.watch import SessionWatch
from qmesh.tunnel.errors import SessionLost


@pytest.fixture(scope="module")
def db(pg_cluster: PgCluster) -> Iterator[RealDb]:
    yield RealDb(pg_cluster, prefix="poolengine")


def simple(ghost: Ghost, *, autocommit: bool = True) -> psycopg.Connection[tuple[object, ...]]:
    """psycopg sending its statements as simple Queries (ClientCursor)."""
    return psycopg.connect(
        **ghost.kwargs(), autocommit=autocommit, cursor_factory=psycopg.ClientCursor
    )


def msg(tag: str, body: bytes = b"") -> bytes:
    return _core.encode_message(ord(tag), body)


def extended(sql: bytes, name: bytes = b"", *, portal: bytes = b"") -> bytes:
    """Parse (of statement ``name``), Bind (to ``portal``), Execute and Sync:
    the extended protocol. The engine relays statements, named or not, and
    the unnamed portal; a named portal moves the session to Python's relay."""
    return (
        msg("P", name + b"\0" + sql + b"\0\0\0")
        + msg("B", portal + b"\0" + name + b"\0\0\0\0\0\0\0")
        + msg("E", portal + b"\0\0\0\0\0")
        + msg("S")
    )


def values(messages: list[tuple[str, bytes]]) -> list[bytes | None]:
    return [v for tag, body in messages if tag == "D" for v in _core.parse_data_row(body)]


def stats(ghost: Ghost) -> PoolStats:
    (pool,) = ghost.service.pools.stats()
    return pool


async def test_simple_queries_of_many_clients_share_the_connections_in_the_engine(
    nursery: trio.Nursery, db: RealDb, tmp_path: Path
) -> None:
    """Six clients, two connections, 20 transactions each (one statement,
    or BEGIN … COMMIT): every answer right, every loan made by the engine."""
    ghost = await pooled_ghost(nursery, db, tmp_path, size=2)

    def setup() -> None:
        with simple(ghost) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS engine_t (client int, n int)")
            conn.execute("TRUNCATE engine_t")

    def count() -> object:
        with simple(ghost) as conn:
            return conn.execute("SELECT count(*) FROM engine_t").fetchone()

    await in_thread(setup)
    loans_before = stats(ghost).engine_loans

    def client(i: int) -> None:
        with simple(ghost) as conn:
            for n in range(10):
                row = conn.execute(f"SELECT {i} * 100 + {n}").fetchone()
                assert row == (i * 100 + n,)
                with conn.transaction():
                    conn.execute(f"INSERT INTO engine_t VALUES ({i}, {n})")

    def work() -> None:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    with trio.fail_after(60):
        await in_thread(work)
        assert await in_thread(count) == (60,)
    pool = stats(ghost)
    assert pool.engine_loans - loans_before >= 120  # one per transaction at least
    assert pool.open <= 2 and pool.timeouts == 0
    # What an operator reads.
    metrics = GateMetrics(
        server=ghost.gate.server, inventory=Inventory(), pg_pools=ghost.service.pools.stats
    ).render()
    labels = f'{{app="{ghost.app_id}",alias="main"}}'
    assert f"qmesh_pg_pool_engine_loans_total{labels} {pool.engine_loans}" in metrics
    header, row = format_pools([attrs.asdict(pool)]).splitlines()
    assert header.split()[-2:] == ["ENGINE", "LOANS"] and row.split()[-1] == str(pool.engine_loans)


async def test_psycopg_default_cursors_stay_in_the_engine(
    nursery: trio.Nursery, db: RealDb, tmp_path: Path
) -> None:
    """psycopg's default cursors send each statement as an unnamed Parse,
    Bind, Describe, Execute and Sync: the engine relays them loan by loan,
    with parameters, an error and a transaction block, and audits each
    Execute with its rows and outcome."""
    ghost = await pooled_ghost(nursery, db, tmp_path, size=2)

    def work() -> list[tuple[object, ...] | None]:
        kwargs = {**ghost.kwargs(), "autocommit": True, "prepare_threshold": None}
        with psycopg.connect(**kwargs) as conn:
            got = [
                conn.execute("SELECT %s::int * 2 AS audited_x", (i,)).fetchone() for i in range(8)
            ]
            with pytest.raises(psycopg.errors.DivisionByZero):
                conn.execute("SELECT 1 / %s AS audited_zero", (0,))
            with conn.transaction():
                got.append(conn.execute("SELECT %s::int AS audited_block", (5,)).fetchone())
            got.append(conn.execute("SELECT %s::text AS audited_after", ("ok",)).fetchone())
            return got

    with trio.fail_after(30):
        got = await in_thread(work)
        await ghost.audit_settled()
    assert got == [(i * 2,) for i in range(8)] + [(5,), ("ok",)]
    assert stats(ghost).engine_loans >= 11  # the session never left the engine
    records = [
        ((r.statement or "").split(" AS ")[-1], r.rows, r.outcome)
        for r in reversed(list_audit(ghost.store))
        if "audited_" in (r.statement or "")
    ]
    assert records == [("audited_x", 1, "ok")] * 8 + [
        ("audited_zero", None, "error:22012"),
        ("audited_block", 1, "ok"),
        ("audited_after", 1, "ok"),
    ]


async def test_named_statements_of_many_clients_stay_in_the_engine(
    nursery: trio.Nursery, db: RealDb, tmp_path: Path
) -> None:
    """psycopg with ``prepare_threshold=0`` prepares every statement under a
    name of its own: on two connections shared by four clients, the engine
    prepares each text once per connection under its shared server name,
    makes every loan itself, and audits each Execute with its text."""
    ghost = await pooled_ghost(nursery, db, tmp_path, size=2)
    sql = "SELECT %s::int * 100 + %s::int AS audited_named"

    def client(i: int) -> None:
        kwargs = {**ghost.kwargs(), "autocommit": True, "prepare_threshold": 0}
        with psycopg.connect(**kwargs) as conn:
            for n in range(10):
                assert conn.execute(sql, (i, n)).fetchone() == (i * 100 + n,)
            with conn.transaction():
                assert conn.execute(sql, (i, 99)).fetchone() == (i * 100 + 99,)

    def work() -> list[object]:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        # In one transaction: on the connection that has just run it.
        with psycopg.connect(**ghost.kwargs(), prepare_threshold=0) as conn:
            assert conn.execute(sql, (0, 1)).fetchone() == (1,)
            query = "SELECT name FROM pg_prepared_statements WHERE statement LIKE '%%' || %s"
            return [row[0] for row in conn.execute(query, ("audited_named",)).fetchall()]

    with trio.fail_after(60):
        names = await in_thread(work)
        await ghost.audit_settled()
    assert len(names) == 1 and str(names[0]).startswith("qmesh_")  # shared, renamed
    assert stats(ghost).engine_loans >= 45  # every transaction in the engine
    records = [r for r in list_audit(ghost.store) if "AS audited_named" in (r.statement or "")]
    assert len(records) == 45
    assert {(r.rows, r.outcome) for r in records} == {(1, "ok")}


async def test_named_statements_go_with_the_session_into_pythons_relay(
    nursery: trio.Nursery, db: RealDb, tmp_path: Path
) -> None:
    """A statement prepared in the engine is still the client's once a named
    portal moves the session to Python's relay: a Bind of it runs it there,
    and the audit records its text."""
    ghost = await pooled_ghost(nursery, db, tmp_path)
    sql = b"SELECT 41 + 1 AS audited_handed_over"

    def work() -> list[bytes | None]:
        a = RawClient(ghost.port)
        a.login(ghost.app_id, ghost.app_key, ghost.alias)
        a.send(extended(sql, b"s1"))
        first = values(a.until_ready())
        a.send(extended(b"SELECT 1", portal=b"moved"))
        a.until_ready()
        a.send(msg("B", b"\0s1\0" + bytes(6)) + msg("E", bytes(5)) + msg("S"))
        return first + values(a.until_ready())

    with trio.fail_after(30):
        got = await in_thread(work)
        await ghost.audit_settled()
    assert got == [b"42", b"42"]
    records = [r for r in list_audit(ghost.store) if r.outcome == "ok" and r.rows == 1]
    assert [r.statement for r in records].count(sql.decode()) == 2


async def test_a_session_goes_back_to_the_engine_after_pythons_transaction(
    nursery: trio.Nursery, db: RealDb, tmp_path: Path
) -> None:
    """A transaction with a named portal runs in Python's relay; once it is
    over, the engine carries the session on, with the statements the client
    prepared in either."""
    ghost = await pooled_ghost(nursery, db, tmp_path)
    a = RawClient(ghost.port)

    def python_transaction() -> list[bytes | None]:
        a.login(ghost.app_id, ghost.app_key, ghost.alias)
        a.send(extended(b"SELECT 7", b"in_engine"))
        got = values(a.until_ready())
        a.send(extended(b"SELECT 8", b"in_python", portal=b"moved"))
        return got + values(a.until_ready())

    def later_transactions() -> list[bytes | None]:
        got = []
        for name in (b"in_engine", b"in_python", b"in_engine", b"in_python"):
            a.send(msg("B", b"\0" + name + b"\0" + bytes(6)) + msg("E", bytes(5)) + msg("S"))
            got += values(a.until_ready())
        return got

    with trio.fail_after(30):
        assert await in_thread(python_transaction) == [b"7", b"8"]
        loans = stats(ghost).engine_loans
        assert await in_thread(later_transactions) == [b"7", b"8", b"7", b"8"]
    # Each of the four, in the engine (the first may have come before the
    # engine took the session back).
    assert stats(ghost).engine_loans - loans >= 3


async def test_a_session_that_needs_python_every_transaction_stays_there_longer(
    nursery: trio.Nursery, db: RealDb, tmp_path: Path
) -> None:
    """Each transaction with a named portal (a cursor) goes to Python's
    relay. When the engine takes the session back and it bounces straight
    back, Python's relay ends twice as many transactions (and one) before
    the next try: 24 cursor transactions cost the engine a few loans, not 24."""
    ghost = await pooled_ghost(nursery, db, tmp_path)
    a = RawClient(ghost.port)

    def cursors() -> list[bytes | None]:
        got = []
        for i in range(24):
            a.query("BEGIN")
            a.send(extended(b"SELECT %d" % i, portal=b"cursor"))
            got += values(a.until_ready())
            a.query("COMMIT")
        return got

    with trio.fail_after(60):
        await in_thread(lambda: a.login(ghost.app_id, ghost.app_key, ghost.alias))
        loans = stats(ghost).engine_loans
        assert await in_thread(cursors) == [b"%d" % i for i in range(24)]
    # Tries after 1, 2, 4, 8 and 16 transactions in Python's relay, and the first.
    assert stats(ghost).engine_loans - loans <= 6


async def test_what_the_engine_sent_in_the_clients_stead_is_answered_right_in_python(
    nursery: trio.Nursery, db: RealDb, tmp_path: Path
) -> None:
    """A Bind on a connection that lacks its statement (the engine adds the
    Parse) and a Parse of a statement the connection has (the engine stands
    in a Close for it), then a named portal moves the session to Python's
    relay before their answers come: the client gets exactly the answers to
    what it sent."""
    ghost = await pooled_ghost(nursery, db, tmp_path, size=2)
    sql = b"SELECT 7"

    def work() -> tuple[list[str], list[bytes | None]]:
        a = RawClient(ghost.port)
        a.login(ghost.app_id, ghost.app_key, ghost.alias)
        a.send(extended(sql, b"s1"))
        assert values(a.until_ready()) == [b"7"]
        b = RawClient(ghost.port)
        b.login(ghost.app_id, ghost.app_key, ghost.alias)
        b.query("BEGIN")  # holds the connection that has s1
        a.send(
            msg("B", b"\0s1\0" + bytes(6))  # on the other connection, which lacks s1
            + msg("E", bytes(5))
            + msg("S")
            + msg("P", b"s2\0" + sql + b"\0\0\0")  # the connection has it now
            + msg("B", b"moved\0s2\0" + bytes(6))
            + msg("E", b"moved\0" + bytes(4))
            + msg("S")
        )
        got = a.until_ready() + a.until_ready()
        b.query("COMMIT")
        return [tag for tag, _ in got], values(got)

    with trio.fail_after(30):
        got_tags, got_values = await in_thread(work)
    assert got_tags == ["2", "D", "C", "Z", "1", "2", "D", "C", "Z"]
    assert got_values == [b"7", b"7"]


async def test_a_connection_back_with_too_many_statements_is_closed(
    nursery: trio.Nursery, db: RealDb, tmp_path: Path
) -> None:
    """A connection that comes back to the engine's pool with more
    statements than ``max_prepared_per_server`` is closed, not lent again."""
    ghost = await pooled_ghost(nursery, db, tmp_path)
    ghost.service.pools.settings = attrs.evolve(
        ghost.service.pools.settings, max_prepared_per_server=1
    )

    def work() -> tuple[object, object, object]:
        kwargs = {**ghost.kwargs(), "autocommit": True, "prepare_threshold": 0}
        with psycopg.connect(**kwargs) as conn:
            with conn.transaction():
                conn.execute("SELECT 1")
                held = conn.execute("SELECT pg_backend_pid()").fetchone()
            after = conn.execute("SELECT pg_backend_pid()").fetchone()
            again = conn.execute("SELECT pg_backend_pid()").fetchone()
            return held, after, again

    with trio.fail_after(30):
        held, after, again = await in_thread(work)
    # Two statements on the first connection: closed when it came back; one
    # on the next: kept.
    assert held != after == again
    assert stats(ghost).closed >= 1 and stats(ghost).engine_loans >= 3


async def test_an_unnamed_statement_bound_on_a_later_transaction_is_parsed_again(
    nursery: trio.Nursery, db: RealDb, tmp_path: Path
) -> None:
    """PostgreSQL keeps the unnamed statement across transactions, but the
    engine's next loan may be another connection, whose unnamed statement
    may be another client's: a Bind without this loan's Parse moves the
    session to Python's relay, which parses the client's statement again
    where it runs."""
    ghost = await pooled_ghost(nursery, db, tmp_path, size=2)

    def work() -> list[tuple[str, bytes]]:
        other = RawClient(ghost.port)
        other.login(ghost.app_id, ghost.app_key, ghost.alias)
        a = RawClient(ghost.port)
        a.login(ghost.app_id, ghost.app_key, ghost.alias)
        a.send(msg("P", b"\0SELECT 41 + 1\0\0\0") + msg("S"))
        assert [tag for tag, _ in a.until_ready()] == ["1", "Z"]
        # Another client's unnamed statement on the connections meanwhile.
        other.send(extended(b"SELECT 'not yours'"))
        other.until_ready()
        a.send(msg("B", b"\0\0\0\0\0\0\0\0") + msg("E", b"\0\0\0\0\0") + msg("S"))
        return a.until_ready()

    with trio.fail_after(30):
        got = await in_thread(work)
    assert [tag for tag, _ in got] == ["2", "D", "C", "Z"]
    assert values(got) == [b"42"]


async def test_a_pipeline_not_synced_keeps_its_connection_into_pythons_relay(
    nursery: trio.Nursery, db: RealDb, tmp_path: Path
) -> None:
    """An unnamed statement executed and flushed but not synced leaves the
    server in an implicit transaction: the connection stays the client's,
    in the engine (another client gets the other one) and after a named
    portal moves the session to Python's relay, until the Sync."""
    ghost = await pooled_ghost(nursery, db, tmp_path, size=2)
    pid_query = b"SELECT pg_backend_pid()"

    def work() -> tuple[list[bytes | None], list[bytes | None]]:
        a = RawClient(ghost.port)
        a.login(ghost.app_id, ghost.app_key, ghost.alias)
        b = RawClient(ghost.port)
        b.login(ghost.app_id, ghost.app_key, ghost.alias)
        a.send(extended(pid_query).removesuffix(msg("S")) + msg("H"))
        flushed = [a.message() for _ in range(3)]
        assert [tag for tag, _ in flushed] == ["1", "2", "D"]
        assert a.message()[0] == "C"
        other = values(b.query("SELECT pg_backend_pid()"))
        a.send(extended(pid_query, portal=b"moved"))
        return values(flushed) + values(a.until_ready()), other

    with trio.fail_after(30):
        mine, other = await in_thread(work)
    assert mine[0] == mine[1] != other[0]


async def test_a_client_gone_inside_a_pipeline_not_synced_leaves_nothing_behind(
    nursery: trio.Nursery, db: RealDb, tmp_path: Path
) -> None:
    """An INSERT executed and flushed but not synced, a named portal (the
    session moves to Python's relay), then the client leaves: its implicit
    transaction must not be committed by the next client of the connection."""
    ghost = await pooled_ghost(nursery, db, tmp_path, size=1)

    def work() -> list[bytes | None]:
        with simple(ghost) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS pipe_t (x int)")
            conn.execute("TRUNCATE pipe_t")
        a = RawClient(ghost.port)
        a.login(ghost.app_id, ghost.app_key, ghost.alias)
        a.send(extended(b"INSERT INTO pipe_t VALUES (1)").removesuffix(msg("S")) + msg("H"))
        assert [a.message()[0] for _ in range(3)] == ["1", "2", "C"]
        a.send(msg("P", b"\0SELECT 1\0\0\0") + msg("B", b"moved\0" + bytes(7)) + msg("H"))
        assert [a.message()[0] for _ in range(2)] == ["1", "2"]  # Python's relay has it
        a.close()
        b = RawClient(ghost.port)
        b.login(ghost.app_id, ghost.app_key, ghost.alias)
        return values(b.query("SELECT count(*) FROM pipe_t"))

    with trio.fail_after(30):
        assert await in_thread(work) == [b"0"]


async def test_a_transaction_moves_to_python_on_its_connection(
    nursery: trio.Nursery, db: RealDb, tmp_path: Path
) -> None:
    """BEGIN and a statement in the engine, then a named portal in Python's
    relay: one server backend all along, which the next client
    gets only after COMMIT."""
    ghost = await pooled_ghost(nursery, db, tmp_path, size=1)

    def work() -> tuple[list[bytes | None], list[bytes | None]]:
        a = RawClient(ghost.port)
        a.login(ghost.app_id, ghost.app_key, ghost.alias)
        a.query("BEGIN")
        first = values(a.query("SELECT pg_backend_pid()"))
        a.send(extended(b"SELECT pg_backend_pid()", portal=b"moved"))
        second = values(a.until_ready())
        b = RawClient(ghost.port)
        b.login(ghost.app_id, ghost.app_key, ghost.alias)
        b.send(_core.encode_query("SELECT pg_backend_pid()"))  # waits: a holds the one
        ready = a.query("COMMIT")
        assert ready[-1] == ("Z", b"I")
        return first + second, values(b.until_ready())

    with trio.fail_after(30):
        in_a, in_b = await in_thread(work)
    assert in_a[0] == in_a[1] == in_b[0]
    assert stats(ghost).open == 1


async def test_answers_due_when_python_takes_over_come_in_order(
    nursery: trio.Nursery, db: RealDb, tmp_path: Path
) -> None:
    """A simple Query still running when a named portal follows: its
    answers, then the next ones, in the order asked."""
    ghost = await pooled_ghost(nursery, db, tmp_path)

    def work() -> list[tuple[str, bytes]]:
        a = RawClient(ghost.port)
        a.login(ghost.app_id, ghost.app_key, ghost.alias)
        a.send(
            _core.encode_query("SELECT pg_sleep(0.2), 1") + extended(b"SELECT 2", portal=b"moved")
        )
        return a.until_ready() + a.until_ready()

    with trio.fail_after(30):
        got = await in_thread(work)
    assert [tag for tag, _ in got] == ["T", "D", "C", "Z", "1", "2", "D", "C", "Z"]
    assert values(got) == [b"", b"1", b"2"]


async def test_a_query_larger_than_the_stream_window_moves_to_python(
    nursery: trio.Nursery, db: RealDb, tmp_path: Path
) -> None:
    """The engine collects a Query whole to screen it: one of 3 MB (three
    stream windows) would never be complete, so the session moves to
    Python's relay, which reads it as it comes."""
    ghost = await pooled_ghost(nursery, db, tmp_path)
    big = "x" * 3_000_000

    def work() -> list[bytes | None]:
        client = RawClient(ghost.port)
        client.login(ghost.app_id, ghost.app_key, ghost.alias)
        got = values(client.query(f"SELECT length('{big}')"))
        return got + values(client.query("SELECT 7"))

    with trio.fail_after(30):
        assert await in_thread(work) == [b"3000000", b"7"]


@pytest.mark.parametrize(
    "policy",
    [
        app_policy(databases=("main",), pool_mode="transaction"),
        app_policy(databases=("main",), pool_mode="transaction", read_only=True),
        app_policy(databases=("main",), read_only=True),
    ],
    ids=["transaction", "transaction-read-only", "session-read-only"],
)
async def test_a_server_error_larger_than_the_stream_window_reaches_the_client(
    nursery: trio.Nursery, db: RealDb, tmp_path: Path, policy: GateAppConfig
) -> None:
    """The engine reads the server's errors in these sessions (a pool
    follows its answers; a read-only session's cut falls between them).
    PostgreSQL quotes a bad value whole in its error: one of 3 MB (three
    stream windows) reaches the client, the audit has its SQLSTATE, and the
    session goes on."""
    ghost = await start_ghost(nursery, db, tmp_path, policy=policy)

    def work() -> tuple[int, object]:
        with simple(ghost) as conn:
            with pytest.raises(psycopg.errors.InvalidTextRepresentation) as caught:
                conn.execute("SELECT repeat('x', 3000000)::int")
            return len(str(caught.value)), conn.execute("SELECT 7").fetchone()

    with trio.fail_after(30):
        length, row = await in_thread(work)
    assert length > 3_000_000 and row == (7,)
    with trio.fail_after(10):
        await ghost.audit_settled()
    records = [(r.statement, r.outcome) for r in list_audit(ghost.store, limit=2)]
    assert records == [("SELECT 7", "ok"), ("SELECT repeat('x', 3000000)::int", "error:22P02")]


async def test_a_client_waiting_in_the_engine_past_the_pool_wait_is_refused_alone(
    nursery: trio.Nursery, db: RealDb, tmp_path: Path
) -> None:
    ghost = await pooled_ghost(nursery, db, tmp_path, wait_ms=400)

    def work() -> str:
        with simple(ghost, autocommit=False) as holder:  # BEGIN holds the one connection
            assert holder.execute("SELECT 1").fetchone() == (1,)
            with simple(ghost) as waiter:
                with pytest.raises(psycopg.OperationalError) as refused:
                    waiter.execute("SELECT 2")
            assert holder.execute("SELECT 3").fetchone() == (3,)  # the holder is unharmed
            holder.commit()
        with simple(ghost) as later:
            assert later.execute("SELECT 4").fetchone() == (4,)
        return str(refused.value)

    with trio.fail_after(30):
        message = await in_thread(work)
    assert "no server connection became free within 0.4 s" in message
    pool = stats(ghost)
    assert pool.timeouts == 1 and pool.waits >= 1 and pool.open == 1 and pool.waiting == 0


async def test_a_full_pool_that_grows_serves_the_clients_waiting_in_the_engine(
    nursery: trio.Nursery, db: RealDb, tmp_path: Path
) -> None:
    """A client of the engine waiting in a full pool does not ask Python for a
    connection (it waits for one to come back); when the pool's policy grows
    it, the next login opens one for that client, which is served while the
    first connection is still held."""
    ghost = await pooled_ghost(nursery, db, tmp_path, size=1)
    holder = await in_thread(lambda: simple(ghost, autocommit=False))
    waiter = await in_thread(lambda: simple(ghost))
    try:
        assert await in_thread(lambda: holder.execute("SELECT 1").fetchone()) == (1,)
        async with trio.open_nursery() as waiting:
            answer: list[object] = []

            async def wait_in_line() -> None:
                answer.append(await in_thread(lambda: waiter.execute("SELECT 2").fetchone()))

            waiting.start_soon(wait_in_line)
            await until(lambda: stats(ghost).waiting == 1)
            assert stats(ghost).open == 1
            settings = ghost.service.policies.settings(ghost.app_id)
            assert settings is not None
            grown = attrs.evolve(settings, pool_size=2)
            ghost.store.set_app_policy(ghost.app_id, policy_to_json(grown))
            await ghost.service.refresh_apps()  # what the Gate's state watcher calls
            await in_thread(lambda: simple(ghost).close())  # a login: the pool takes the size
            with trio.fail_after(20):
                await until(lambda: answer == [(2,)])
        assert stats(ghost).open == 2
        await in_thread(holder.commit)  # held all along
    finally:
        await in_thread(holder.close)
        await in_thread(waiter.close)


async def test_cancel_reaches_the_query_the_engine_relays(
    nursery: trio.Nursery, db: RealDb, tmp_path: Path
) -> None:
    ghost = await pooled_ghost(nursery, db, tmp_path)

    def active() -> bool:
        out = ghost.db.superuser(
            "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)'"
            " AND state = 'active'"
        )
        return out.strip() == "1"

    def work() -> tuple[BaseException | None, object]:
        outcome: list[BaseException] = []
        with simple(ghost) as conn:

            def sleep() -> None:
                try:
                    conn.execute("SELECT pg_sleep(30)")
                except psycopg.Error as exc:
                    outcome.append(exc)

            sleeper = threading.Thread(target=sleep)
            sleeper.start()
            deadline = time.monotonic() + 20
            while not active() and time.monotonic() < deadline:
                time.sleep(0.01)  # polls the server's own view; the deadline bounds it
            # cancel() would hold the GIL while it waits, and the Gate
            # answering it runs in this process.
            conn.cancel_safe(timeout=10)
            sleeper.join()
            return (outcome[0] if outcome else None), conn.execute("SELECT 42").fetchone()

    with trio.fail_after(30):
        error, after = await in_thread(work)
    assert isinstance(error, psycopg.errors.QueryCanceled) and after == (42,)
    assert ghost.service.cancel_keys.forwarded == 1


async def test_session_state_through_a_simple_query_pins_and_is_reset(
    nursery: trio.Nursery, db: RealDb, tmp_path: Path
) -> None:
    """A SET sent as a simple Query takes the session to Python's relay,
    which pins it; the next client finds the connection reset."""
    ghost = await pooled_ghost(nursery, db, tmp_path)

    def work() -> tuple[object, object]:
        with simple(ghost) as conn:
            conn.execute("SELECT 1")  # in the engine
            conn.execute("SET search_path = pinned_in_engine, public")
            kept = conn.execute("SHOW search_path").fetchone()
        with simple(ghost) as other:
            fresh = other.execute("SHOW search_path").fetchone()
        return kept, fresh

    with trio.fail_after(30):
        kept, fresh = await in_thread(work)
    assert kept == ("pinned_in_engine, public",) and fresh == ('"$user", public',)


async def test_statements_the_engine_relays_are_audited(
    nursery: trio.Nursery, db: RealDb, tmp_path: Path
) -> None:
    """One record per statement, under the app and the client session, with
    its rows and outcome; a statement still running when the session moves
    to Python's relay is finished there."""
    ghost = await pooled_ghost(nursery, db, tmp_path)

    def work() -> int:
        with simple(ghost) as conn:
            conn.execute("SELECT generate_series(1, 3) AS audited_rows")
            with pytest.raises(psycopg.errors.DivisionByZero):
                conn.execute("SELECT 1 / 0 AS audited_error")
            pid = conn.info.backend_pid
        raw = RawClient(ghost.port)
        raw.login(ghost.app_id, ghost.app_key, ghost.alias)
        raw.send(
            _core.encode_query("SELECT pg_sleep(0.1) AS audited_moving")
            + extended(b"SELECT 2", portal=b"moved")
        )
        raw.until_ready()
        raw.until_ready()
        return pid

    with trio.fail_after(30):
        pid = await in_thread(work)
        await ghost.audit_settled()
    records = {
        (r.statement or "").split(" AS ")[-1]: r
        for r in list_audit(ghost.store)
        if "audited_" in (r.statement or "")
    }
    assert sorted(records) == ["audited_error", "audited_moving", "audited_rows"]
    assert (records["audited_rows"].rows, records["audited_rows"].outcome) == (3, "ok")
    assert records["audited_error"].outcome == "error:22012"
    assert all(r.app == ghost.app_id for r in records.values())
    assert records["audited_rows"].session == f"edge-pg/{pid}"
    moving = records["audited_moving"]
    assert (moving.rows, moving.outcome) == (1, "ok") and moving.duration_ms >= 100
    assert stats(ghost).engine_loans >= 3
    # What an operator reads.
    audit = ghost.service.audit
    metrics = GateMetrics(server=ghost.gate.server, inventory=Inventory(), pg_audit=audit).render()
    assert audit.written >= 3
    for outcome, count in (("written", audit.written), ("dropped", 0), ("pruned", 0)):
        assert f'qmesh_pg_audit_records_total{{outcome="{outcome}"}} {count}' in metrics
    assert "qmesh_pg_audit_queued_records 0" in metrics


async def test_a_lost_tunnel_session_gives_back_what_its_clients_held(
    nursery: trio.Nursery, db: RealDb, tmp_path: Path
) -> None:
    """The edge's session is lost while a client of it holds a connection
    inside a transaction (in the engine) and another waits in line: the
    held connection is closed (it may be mid-transaction), the place in
    line given up, and the pool serves the next clients."""
    ghost = await pooled_ghost(nursery, db, tmp_path)

    def hold() -> tuple[RawClient, RawClient]:
        holder = RawClient(ghost.port)
        holder.login(ghost.app_id, ghost.app_key, ghost.alias)
        holder.query("BEGIN")
        waiter = RawClient(ghost.port)
        waiter.login(ghost.app_id, ghost.app_key, ghost.alias)
        waiter.send(_core.encode_query("SELECT 2"))
        return holder, waiter

    with trio.fail_after(30):
        clients = await in_thread(hold)  # kept open until the end
        await until(lambda: stats(ghost).waiting == 1)
        assert stats(ghost).lent == 1
        (session,) = ghost.gate.server.sessions.values()
        session.lose(SessionLost("test: the edge is gone"))
        await until(lambda: stats(ghost).open == 0 and stats(ghost).waiting == 0)
        # The edge opens a new session (the Gate does not resume a lost one).
        await until(lambda: any(s is not session for s in ghost.gate.server.sessions.values()))

        def later() -> list[bytes | None]:
            client = RawClient(ghost.port)
            client.login(ghost.app_id, ghost.app_key, ghost.alias)
            return values(client.query("SELECT 3"))

        assert await in_thread(later) == [b"3"]
    assert stats(ghost).closed == 1
    for client in clients:
        client.close()


async def test_a_read_only_app_stays_in_the_engine_and_its_guard_holds(
    nursery: trio.Nursery, db: RealDb, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read-only app in transaction mode: statements that name none of the
    guard's words are relayed by the engine, a loan each; those that do move
    to Python's relay, where the guard judges (and refuses) them, and the
    session comes back to the engine after. The server refuses writes."""
    checked: list[str] = []
    original = SessionWatch._refusal

    def counting(self: SessionWatch, text: str, what: str) -> Refusal | None:
        checked.append(text)
        return original(self, text, what)

    monkeypatch.setattr(SessionWatch, "_refusal", counting)
    ghost = await pooled_ghost(nursery, db, tmp_path, size=2, read_only=True)
    refused = [
        "SET default_transaction_read_only = off",
        "BEGIN READ WRITE",
        "SELECT set_config('default_transaction_read_only', 'off', false)",
    ]

    def selects(conn: psycopg.Connection[tuple[object, ...]]) -> None:
        for i in range(20):
            assert conn.execute("SELECT %s::int + 1", (i,)).fetchone() == (i + 1,)

    def work() -> tuple[int, int]:
        with psycopg.connect(**ghost.kwargs(), autocommit=True) as conn:
            before = stats(ghost).engine_loans
            selects(conn)
            first = stats(ghost).engine_loans - before
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                conn.execute("CREATE TABLE ro_pool_t (i int)")
            for sql in refused:
                with pytest.raises(psycopg.errors.ReadOnlySqlTransaction, match="read-only"):
                    conn.execute(sql)
            assert conn.execute("SHOW transaction_read_only").fetchone() == ("on",)
            before = stats(ghost).engine_loans
            selects(conn)
            return first, stats(ghost).engine_loans - before

    with trio.fail_after(60):
        first, after = await in_thread(work)
    # Back from Python's relay, a session whose part in the engine ended no
    # transaction (the SHOW came first) finishes a few more there first.
    assert first >= 20 and after >= 15, (first, after)
    assert checked == [*refused, "SHOW transaction_read_only"]


async def test_a_read_only_session_whose_server_turns_it_off_ends_and_its_connection_closes(
    nursery: trio.Nursery, db: RealDb, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A function the text check cannot see into turns the read-only
    setting off. The engine sees the server report it: the client gets
    25006 instead of the statement's answer, and the connection, which keeps
    the setting, is closed rather than lent to the next client."""
    db.superuser(
        "CREATE OR REPLACE FUNCTION lift_guard() RETURNS int LANGUAGE plpgsql AS"
        " $$BEGIN PERFORM set_config('default_transaction_' || 'rea' || 'd_only',"
        " 'off', false); RETURN 1; END$$"
    )
    seen_by_python = server_messages_seen_by_python(monkeypatch)
    ghost = await pooled_ghost(nursery, db, tmp_path, size=1, read_only=True)

    def work() -> object:
        with simple(ghost) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction, match="has been ended"):
                conn.execute("SELECT lift_guard()")
        with simple(ghost) as conn:
            return conn.execute("SHOW default_transaction_read_only").fetchone()

    with trio.fail_after(30):
        assert await in_thread(work) == ("on",)
    assert stats(ghost).closed == 1
    # Seen by the engine: Python's relay never got the server's report.
    assert ord("S") not in seen_by_python
    # The statement that did it is in the audit, ended by it.
    with trio.fail_after(10):
        await ghost.audit_settled()
    records = [(r.statement, r.outcome) for r in list_audit(ghost.store, limit=10)]
    assert ("SELECT lift_guard()", "error:25006") in records
