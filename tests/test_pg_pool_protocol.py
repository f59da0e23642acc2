"""Transaction pooling at the protocol's edges, with exact client bytes
(RawClient) against a real PostgreSQL: what the server skips after an
error, COPY FROM STDIN in the extended protocol, the unnamed statement,
messages cut across transactions, a statement that ends its own
connection, waiters that leave, and the bound on answers due."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
import trio
from pgcluster import PgCluster
from pgkit import Ghost, RawClient, RealDb, in_thread, pooled_ghost
from tunnelkit import until

from qmesh import _core
from qmesh.pg.login import PgSessionError
from qmesh.pg.multiplex import MAX_REQUESTS, PooledSession
from qmesh.pg.pool import ServerPool

Messages = list[tuple[str, bytes]]


@pytest.fixture(scope="module")
def db(pg_cluster: PgCluster) -> Iterator[RealDb]:
    yield RealDb(pg_cluster, prefix="poolproto")


def msg(tag: str, body: bytes = b"") -> bytes:
    return _core.encode_message(ord(tag), body)


def parse(name: bytes, sql: bytes) -> bytes:
    return msg("P", name + b"\0" + sql + b"\0\0\0")


def bind(statement: bytes) -> bytes:
    return msg("B", b"\0" + statement + b"\0\0\0\0\0\0\0")


EXECUTE = msg("E", b"\0\0\0\0\0")
SYNC = msg("S")
FLUSH = msg("H")


def close_statement(name: bytes) -> bytes:
    return msg("C", b"S" + name + b"\0")


def login(ghost: Ghost) -> RawClient:
    client = RawClient(ghost.port)
    client.login(ghost.app_id, ghost.app_key, ghost.alias)
    return client


def ask(client: RawClient, data: bytes) -> Messages:
    client.send(data)
    return client.until_ready()


def tags(messages: Messages) -> list[str]:
    return [tag for tag, _ in messages]


def sqlstates(messages: Messages) -> list[str]:
    return [_core.parse_error_fields(body)["C"] for tag, body in messages if tag == "E"]


def values(messages: Messages) -> list[bytes | None]:
    return [v for tag, body in messages if tag == "D" for v in _core.parse_data_row(body[:])]


def pool_of(ghost: Ghost) -> ServerPool:
    (pool,) = list(ghost.service.pools)
    return pool


async def test_messages_the_server_skips_after_an_error_have_no_effect(
    nursery: trio.Nursery, db: RealDb, tmp_path: Path
) -> None:
    """After an error the server skips to Sync: a Parse, a Close or a
    ParseComplete made up meanwhile must not change what the session (or the
    shared connection) is believed to hold."""
    ghost = await pooled_ghost(nursery, db, tmp_path, wait_ms=2000)

    def work() -> None:
        a, b = login(ghost), login(ghost)
        a.send(parse(b"", b"SELEC 1") + FLUSH)
        assert a.message()[0] == "E"
        a.send(parse(b"s2", b"SELECT 2") + SYNC)  # skipped by the server
        assert tags(a.until_ready()) == ["Z"]
        # Another client on the same (only) connection prepares that text.
        got = ask(b, parse(b"b", b"SELECT 2") + bind(b"b") + EXECUTE + SYNC)
        assert tags(got) == ["1", "2", "D", "C", "Z"] and values(got) == [b"2"]
        # s2 was never prepared for a: preparing it now works.
        assert tags(ask(a, parse(b"s2", b"SELECT 2") + SYNC)) == ["1", "Z"]
        # A ParseComplete made up behind an error, and a Close behind one.
        a.send(
            parse(b"", b"SELECT 1/0") + bind(b"") + EXECUTE
            + parse(b"late", b"SELECT 2") + close_statement(b"s2") + SYNC
        )  # fmt: skip
        got = a.until_ready()
        assert tags(got) == ["1", "E", "Z"] and sqlstates(got) == ["22012"]  # at Bind: planned
        a.send(parse(b"late", b"SELECT 2") + bind(b"s2") + EXECUTE + SYNC)
        got = a.until_ready()
        assert tags(got) == ["1", "2", "D", "C", "Z"] and values(got) == [b"2"]

    with trio.fail_after(30):
        await in_thread(work)


async def test_copy_from_stdin_in_the_extended_protocol(
    nursery: trio.Nursery, db: RealDb, tmp_path: Path
) -> None:
    """libpq's COPY through PQexecParams: the Sync sent before the data is
    ignored by the server in COPY FROM STDIN; the connection goes back to the
    pool after the one ReadyForQuery, and made-up answers stay in order."""
    ghost = await pooled_ghost(nursery, db, tmp_path, wait_ms=1000)

    def work() -> None:
        a = login(ghost)
        ask(a, msg("Q", b"CREATE TABLE IF NOT EXISTS cp (x int)\0"))
        a.send(parse(b"", b"COPY cp FROM STDIN") + bind(b"") + msg("D", b"P\0") + EXECUTE + SYNC)
        seen = []
        while (tag := a.message()[0]) != "G":
            seen.append(tag)
        assert seen == ["1", "2", "n"]
        a.send(msg("d", b"1\n") + msg("c") + SYNC)
        assert tags(a.until_ready()) == ["C", "Z"]
        other = login(ghost)  # the pool's only connection is free again
        assert values(other.query("SELECT 7")) == [b"7"]
        a.send(close_statement(b"never") + SYNC)
        assert [a.message()[0], a.message()[0]] == ["3", "Z"]

    with trio.fail_after(30):
        await in_thread(work)


async def test_the_unnamed_statement_stays_with_its_client(
    nursery: trio.Nursery, db: RealDb, tmp_path: Path
) -> None:
    """PostgreSQL keeps the unnamed statement across transactions: on a
    shared connection a client must run its own, never another's."""
    ghost = await pooled_ghost(nursery, db, tmp_path, wait_ms=2000)

    def work() -> None:
        a, b = login(ghost), login(ghost)
        ask(b, parse(b"", b"SELECT 'mine'") + SYNC)
        ask(a, parse(b"", b"SELECT 'secret of a'") + SYNC)
        got = ask(b, bind(b"") + EXECUTE + SYNC)
        assert values(got) == [b"mine"] and tags(got) == ["2", "D", "C", "Z"]
        fresh = login(ghost)  # never prepared one: as on a server, 26000
        assert sqlstates(ask(fresh, bind(b"") + EXECUTE + SYNC)) == ["26000"]

    with trio.fail_after(30):
        await in_thread(work)


async def test_a_message_cut_across_a_transaction_end_keeps_its_connection(
    nursery: trio.Nursery, db: RealDb, tmp_path: Path
) -> None:
    """A client that stops inside a message (here a CopyData header) keeps
    its connection: the rest of the message goes where its start went, so
    neither another client nor a new connection reads it as a message."""
    ghost = await pooled_ghost(nursery, db, tmp_path, wait_ms=500)

    def work() -> None:
        a = login(ghost)
        smuggled = msg("Q", b"SELECT 'smuggled'\0")
        a.send(msg("Q", b"SELECT 1\0") + b"d" + (4 + len(smuggled)).to_bytes(4, "big"))
        assert values(a.until_ready()) == [b"1"]
        b = login(ghost)
        b.send(msg("Q", b"SELECT 2\0"))
        assert b.error()["C"] == "53300"  # the only connection is still a's
        a.send(smuggled + msg("Q", b"SELECT 3\0"))  # CopyData to the server: ignored
        assert values(a.until_ready()) == [b"3"]

    with trio.fail_after(30):
        await in_thread(work)


async def test_a_statement_that_ends_its_connection_is_not_run_again(
    nursery: trio.Nursery, db: RealDb, tmp_path: Path
) -> None:
    ghost = await pooled_ghost(nursery, db, tmp_path, size=2, wait_ms=2000)

    def work() -> dict[str, str]:
        a = login(ghost)
        # A DO block answers nothing before it ends: the FATAL is its first word.
        a.send(msg("Q", b"DO $$BEGIN PERFORM pg_terminate_backend(pg_backend_pid()); END$$\0"))
        error = a.error()
        assert a.closed()
        return error

    with trio.fail_after(30):
        error = await in_thread(work)
    assert error["C"] == "57P01"
    assert pool_of(ghost).opened == 1  # not replayed on a new connection


async def test_a_waiter_that_leaves_gives_its_turn_on(
    nursery: trio.Nursery, db: RealDb, tmp_path: Path
) -> None:
    """A client ended while it waits in line (its app disabled, say) takes
    nothing with it: the connection given back goes to the next client."""
    ghost = await pooled_ghost(nursery, db, tmp_path, wait_ms=10_000)
    holder = await in_thread(lambda: login(ghost))
    await in_thread(lambda: ask(holder, msg("Q", b"BEGIN\0")))
    waiter = await in_thread(lambda: login(ghost))
    await in_thread(lambda: waiter.send(msg("Q", b"SELECT 2\0")))
    pool = pool_of(ghost)
    with trio.fail_after(30):
        await until(lambda: pool.stats().waiting == 1)
        for live in ghost.service.live[ghost.app_id]:
            session = live.relay
            if isinstance(session, PooledSession) and session.conn is None:
                live.end(PgSessionError("57P01", "ended while waiting (test)"))
        await until(lambda: pool.stats().waiting == 0)
        await in_thread(lambda: ask(holder, msg("Q", b"COMMIT\0")))
        late = await in_thread(lambda: login(ghost))
        assert values(await in_thread(lambda: late.query("SELECT 3"))) == [b"3"]
    assert pool.stats().open == 1


async def test_answers_due_are_bounded(nursery: trio.Nursery, db: RealDb, tmp_path: Path) -> None:
    """In Python's relay, answers made up at the Gate (a CloseComplete)
    cost the server nothing: a client that sends requests without reading
    is ended. (The engine sends every request to the server, whose reading
    holds the client back; past its own bound it hands the session over.)"""
    ghost = await pooled_ghost(nursery, db, tmp_path, wait_ms=2000)

    def work() -> dict[str, str]:
        a = login(ghost)
        # A named portal takes the session to Python's relay.
        portal = msg("B", b"p\0\0\0\0\0\0\0\0")
        a.send(parse(b"", b"SELECT pg_sleep(30)") + portal + msg("E", b"p\0\0\0\0\0"))
        burst = close_statement(b"x") * 10_000
        try:
            for _ in range(MAX_REQUESTS // 10_000 + 1):
                a.send(burst)
        except OSError:
            pass  # the Gate may close first
        return a.error()

    with trio.fail_after(60):
        error = await in_thread(work)
    assert error["C"] == "54000" and f"more than {MAX_REQUESTS} requests" in error["M"]


async def test_a_connection_held_long_does_not_gather_statements(
    nursery: trio.Nursery, db: RealDb, tmp_path: Path
) -> None:
    """Closes are answered at the Gate while the statement stays shared;
    past max_prepared_per_server they reach the server, so a session that
    keeps its connection (a long transaction) cannot grow it without bound."""
    ghost = await pooled_ghost(nursery, db, tmp_path, wait_ms=2000)
    ghost.service.pools.settings = attrs.evolve(
        ghost.service.pools.settings, max_prepared_per_server=3
    )

    def work() -> list[bytes | None]:
        a = login(ghost)
        ask(a, msg("Q", b"BEGIN\0"))
        for i in range(20):
            name, sql = b"s%d" % i, b"SELECT %d" % i
            got = ask(a, parse(name, sql) + bind(name) + EXECUTE + close_statement(name) + SYNC)
            assert tags(got) == ["1", "2", "D", "C", "3", "Z"], got
        return values(ask(a, msg("Q", b"SELECT count(*) FROM pg_prepared_statements\0")))

    with trio.fail_after(30):
        held = await in_thread(work)
    assert held and int(held[0] or b"0") <= 4


async def test_a_query_in_a_pipeline_is_skipped_with_it_after_an_error(
    nursery: trio.Nursery, db: RealDb, tmp_path: Path
) -> None:
    """After an error in the extended protocol the server skips every
    message up to the Sync, a Query among them: the answers the Gate awaits
    must match, or the connection would go back with answers still coming
    (to the next client) or stay held."""
    ghost = await pooled_ghost(nursery, db, tmp_path, wait_ms=2000)

    def work() -> None:
        a, b = login(ghost), login(ghost)
        a.send(parse(b"", b"SELECT 1/0") + bind(b"") + EXECUTE + msg("Q", b"SELECT 5\0") + SYNC)
        got = a.until_ready()
        assert tags(got) == ["1", "E", "Z"] and sqlstates(got) == ["22012"]
        # The only connection went back: the other client is served, and
        # each gets its own answers.
        got = ask(b, msg("Q", b"SELECT 6\0"))
        assert tags(got) == ["T", "D", "C", "Z"] and values(got) == [b"6"]
        got = ask(a, parse(b"", b"SELECT 7") + bind(b"") + EXECUTE + SYNC)
        assert tags(got) == ["1", "2", "D", "C", "Z"] and values(got) == [b"7"]
        assert values(ask(b, msg("Q", b"SELECT 8\0"))) == [b"8"]

    with trio.fail_after(30):
        await in_thread(work)


@pytest.mark.parametrize("relay", ["engine", "python"])
async def test_what_an_error_skips_is_undone_last_first(
    nursery: trio.Nursery, db: RealDb, tmp_path: Path, relay: str
) -> None:
    """A Close that reaches the server and the Parse the Gate adds for a
    Bind of the same server statement, both skipped after an error: the
    connection still holds the statement. Undone first to last, the Gate
    would believe it gone, and the next client to prepare that text on the
    connection would get 42P05 (already exists)."""
    ghost = await pooled_ghost(nursery, db, tmp_path, wait_ms=2000)
    ghost.service.pools.settings = attrs.evolve(
        ghost.service.pools.settings, max_prepared_per_server=2
    )
    # A word that may leave session state moves the transaction to Python's relay.
    begin = b"BEGIN\0" if relay == "engine" else b"BEGIN; SELECT 'temp'\0"

    def work() -> None:
        a, b = login(ghost), login(ghost)
        ask(a, msg("Q", begin))
        # s1 and s2 share a server statement: three on the connection, one
        # past max_prepared_per_server, so the Close of s1 reaches the server.
        got = ask(
            a,
            parse(b"a", b"SELECT 1") + parse(b"b", b"SELECT 2")
            + parse(b"s1", b"SELECT 7") + parse(b"s2", b"SELECT 7") + SYNC,
        )  # fmt: skip
        assert tags(got) == ["1", "1", "1", "1", "Z"]
        got = ask(a, parse(b"", b"SELEC") + close_statement(b"s1") + bind(b"s2") + EXECUTE + SYNC)
        assert sqlstates(got) == ["42601"] and tags(got)[-1] == "Z"
        ask(a, msg("Q", b"ROLLBACK\0"))
        got = ask(b, parse(b"x", b"SELECT 7") + bind(b"x") + EXECUTE + SYNC)
        assert tags(got) == ["1", "2", "D", "C", "Z"] and values(got) == [b"7"], got

    with trio.fail_after(30):
        await in_thread(work)
