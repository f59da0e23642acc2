"""The ghost wire end to end: real clients (psql, pgbench, psycopg 3,
asyncpg) → MiniGate → sealed tunnel → Gate → a real PostgreSQL 15, with the
app's pseudo-credentials at the edge and the real ones only in the vault."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psycopg
import pytest
import trio
from pgcluster import PgCluster
from pgkit import Ghost, RealDb, in_asyncio, in_thread, run, start_ghost
from psycopg.types.json import Jsonb

from qmesh import _core
from qmesh.pg.audit import list_audit
from qmesh.pg.relay import Relay

# 10 s per protocol by default; QMESH_PGBENCH_SECONDS shortens it locally.
PGBENCH_SECONDS = os.environ.get("QMESH_PGBENCH_SECONDS", "10")


@pytest.fixture(scope="module")
def db(pg_cluster: PgCluster) -> Iterator[RealDb]:
    yield RealDb(pg_cluster)


@pytest.fixture
async def ghost(nursery: trio.Nursery, db: RealDb, tmp_path: Path) -> Ghost:
    return await start_ghost(nursery, db, tmp_path)


# -- psql --------------------------------------------------------------------------


async def test_psql_transaction_error_rollback_and_describe(ghost: Ghost) -> None:
    script = b"""
CREATE TABLE IF NOT EXISTS psql_t (id int PRIMARY KEY, note text);
BEGIN;
INSERT INTO psql_t VALUES (1, 'one'), (2, 'two');
UPDATE psql_t SET note = 'uno' WHERE id = 1;
COMMIT;
BEGIN;
INSERT INTO psql_t VALUES (3, 'three');
SELECT 1 / 0;
SELECT 1;
ROLLBACK;
SELECT id, note FROM psql_t ORDER BY id;
\\d psql_t
SELECT current_user;
"""
    with trio.fail_after(30):
        code, out, err = await run(["psql", ghost.dsn(), "-X", "-A", "-q"], stdin=script)
    assert code == 0, err
    assert "division by zero" in err
    assert "current transaction is aborted" in err  # SELECT 1 inside the failed transaction
    assert "1|uno\n2|two\n" in out and "three" not in out
    assert 'Table "public.psql_t"' in out and "note|text" in out
    assert ghost.db.name in out  # the app runs as the real role, without knowing its password


# -- psycopg 3 -----------------------------------------------------------------------


async def test_sessions_are_relayed_by_both_engines_without_python(
    ghost: Ghost, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once logged in, a session's messages go through the Rust engines of
    the MiniGate and the Gate, not through Python, and come back to Python
    when the session ends. The Gate's engine audits each statement itself:
    no message is handed to Python for it."""
    handed_to_python: list[int] = []
    on_tap = Relay._on_tap

    def counted(relay: Relay, records: list[_core.TapRecord]) -> bytes | None:
        handed_to_python.append(len(records))
        return on_tap(relay, records)

    monkeypatch.setattr(Relay, "_on_tap", counted)
    edge_session = ghost.edge.session
    assert edge_session is not None
    (gate_session,) = ghost.gate.server.sessions.values()

    def native_counts() -> tuple[int, int]:
        return edge_session.native_streams, gate_session.native_streams

    def work() -> tuple[int, int]:
        with psycopg.connect(**ghost.kwargs(), autocommit=True) as conn:
            for i in range(50):
                assert conn.execute("SELECT %s::int", (i,)).fetchone() == (i,)
            return trio.from_thread.run_sync(native_counts)

    with trio.fail_after(30):
        assert await in_thread(work) == (1, 1)
        await ghost.audit_settled()
    assert native_counts() == (0, 0)
    records = list_audit(ghost.store, app=ghost.app_id, limit=100)
    assert [(r.statement, r.rows, r.outcome) for r in records] == [("SELECT $1::int", 1, "ok")] * 50
    assert handed_to_python == []


async def test_psycopg_types_prepared_statements_and_cursor(ghost: Ghost) -> None:
    import datetime
    import decimal
    import json
    import uuid

    def work() -> None:
        with psycopg.connect(**ghost.kwargs(), autocommit=True) as conn:
            values = (
                42, 2**40, 3.5, decimal.Decimal("12345.678901234567890"), "héllo ✓",
                b"\x00\xff" * 10, True, None, datetime.date(2024, 2, 29),
                datetime.datetime(2024, 1, 2, 3, 4, 5, 678000, tzinfo=datetime.UTC),
                uuid.UUID("12345678-1234-5678-1234-567812345678"), [1, 2, 3],
                Jsonb({"a": [1, {"b": None}]}),
            )  # fmt: skip
            row = conn.execute(
                "SELECT %s::int, %s::bigint, %s::float8, %s::numeric, %s::text, %s::bytea,"
                " %s::bool, %s::text, %s::date, %s::timestamptz, %s::uuid, %s::int[], %s::jsonb",
                values,
            ).fetchone()
            assert row is not None
            assert row[:-1] == values[:-1]
            assert row[-1] == {"a": [1, {"b": None}]}
            assert json.dumps(row[-1])
            # Prepared statements: psycopg prepares after prepare_threshold uses.
            conn.execute("CREATE TABLE IF NOT EXISTS pp (i int)")
            conn.execute("TRUNCATE pp")
            for i in range(10):
                conn.execute("INSERT INTO pp VALUES (%s)", (i,), prepare=True)
            assert conn.execute("SELECT sum(i) FROM pp").fetchone() == (45,)
            prepared = conn.execute("SELECT count(*) FROM pg_prepared_statements").fetchone()
            assert prepared is not None and prepared[0] >= 1
            # A named server-side cursor.
            with conn.transaction(), conn.cursor(name="big_cursor") as cur:
                cur.itersize = 100
                cur.execute("SELECT g FROM generate_series(1, 2500) g")
                assert sum(r[0] for r in cur) == 2500 * 2501 // 2
            # An error inside a transaction, then the session carries on.
            with pytest.raises(psycopg.errors.UniqueViolation):
                with conn.transaction():
                    conn.execute("CREATE TEMP TABLE u (i int PRIMARY KEY)")
                    conn.execute("INSERT INTO u VALUES (1), (1)")
            assert conn.execute("SELECT 7").fetchone() == (7,)

    with trio.fail_after(60):
        await in_thread(work)


async def test_psycopg_copy_both_ways_and_notifications(ghost: Ghost) -> None:
    def work() -> None:
        with psycopg.connect(**ghost.kwargs(), autocommit=True) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS copied (i int, t text)")
            conn.execute("TRUNCATE copied")
            with conn.cursor() as cur:
                with cur.copy("COPY copied FROM STDIN") as copy:
                    for i in range(20_000):
                        copy.write_row((i, f"row {i}"))
                rows = []
                with cur.copy("COPY (SELECT i, t FROM copied ORDER BY i) TO STDOUT") as copy:
                    rows = list(copy.rows())
            assert len(rows) == 20_000 and rows[123] == ("123", "row 123")
            # LISTEN/NOTIFY: notifications arrive asynchronously.
            conn.execute("LISTEN qmesh_channel")
            with psycopg.connect(**ghost.kwargs(), autocommit=True) as other:
                other.execute(
                    "SELECT pg_notify('qmesh_channel', 'hello ' || g) FROM generate_series(1, 3) g"
                )
                other.execute("NOTIFY qmesh_channel, 'plain'")
            got = []
            for note in conn.notifies(timeout=10, stop_after=4):
                got.append((note.channel, note.payload))
            assert got == [("qmesh_channel", p) for p in ("hello 1", "hello 2", "hello 3", "plain")]
            # Notices and ParameterStatus changes pass through.
            notices: list[str] = []
            conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
            conn.execute("DO $$BEGIN RAISE NOTICE 'a notice'; END$$")
            assert notices == ["a notice"]
            conn.execute("SET application_name = 'ghosted'")
            assert conn.info.parameter_status("application_name") == "ghosted"

    with trio.fail_after(60):
        await in_thread(work)


async def test_psycopg_large_bytea(ghost: Ghost) -> None:
    """≥ 32 MiB bytea both ways: a Bind of 33 MiB, and a DataRow of 66 MiB of hex."""
    payload = os.urandom(33 * 1024 * 1024)

    def work() -> None:
        with psycopg.connect(**ghost.kwargs(), autocommit=True) as conn:
            conn.execute("CREATE TEMP TABLE blobs (b bytea)")
            conn.execute("INSERT INTO blobs VALUES (%s)", (payload,))
            row = conn.execute("SELECT b FROM blobs").fetchone()  # text format: hex
            assert row is not None and row[0] == payload
            row = conn.execute("SELECT length(b) FROM blobs").fetchone()
            assert row == (len(payload),)

    with trio.fail_after(120):
        await in_thread(work)


# -- asyncpg -------------------------------------------------------------------------


async def test_asyncpg_fetch_executemany_copy_records(ghost: Ghost) -> None:
    async def work() -> None:
        conn = await asyncpg.connect(**ghost.asyncpg_kwargs())
        try:
            await conn.execute("CREATE TEMP TABLE people (id int, name text, score float8)")
            await conn.executemany(
                "INSERT INTO people VALUES ($1, $2, $3)",
                [(i, f"person {i}", i / 3) for i in range(500)],
            )
            result = await conn.copy_records_to_table(
                "people", records=[(1000 + i, f"copied {i}", 0.5) for i in range(3000)]
            )
            assert result == "COPY 3000"
            rows = await conn.fetch("SELECT id, name FROM people WHERE id % 100 = 0 ORDER BY id")
            assert [r["id"] for r in rows][:3] == [0, 100, 200] and len(rows) == 35
            statement = await conn.prepare("SELECT score FROM people WHERE id = $1")
            assert await statement.fetchval(30) == 10.0
            assert await conn.fetchval("SELECT count(*) FROM people") == 3500
        finally:
            await conn.close()

    with trio.fail_after(60):
        await in_asyncio(work)


async def test_asyncpg_cancel_reaches_the_real_server(ghost: Ghost) -> None:
    """asyncio.wait_for cancels the query: asyncpg sends CancelRequest with
    the BackendKeyData qmesh minted; the Gate maps it to the real key."""
    import asyncio

    async def work() -> tuple[list[str], int]:
        conn = await asyncpg.connect(**ghost.asyncpg_kwargs())
        try:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(conn.fetchval("SELECT pg_sleep(60)"), timeout=0.5)
            # The connection stays usable.
            value = await conn.fetchval("SELECT 41 + 1")
            pid = await conn.fetchval("SELECT pg_backend_pid()")
        finally:
            await conn.close()
        return [str(value)], pid

    with trio.fail_after(30):
        started = time.monotonic()
        (value,), real_pid = await in_asyncio(work)
        assert time.monotonic() - started < 10  # not 60 s: the sleep was cancelled
    assert value == "42"
    assert ghost.service.cancel_keys.forwarded == 1
    active = ghost.db.superuser(
        "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(60)%'"
        " AND state = 'active'"
    )
    assert active == "0"
    assert real_pid > 0


# -- pgbench -------------------------------------------------------------------------


async def test_pgbench_init_and_three_protocols(ghost: Ghost) -> None:
    env = {"PGPASSWORD": ghost.app_key}
    args = ["-h", "127.0.0.1", "-p", str(ghost.port), "-U", ghost.app_id, ghost.alias]
    with trio.fail_after(60):
        code, _, err = await run(["pgbench", "-i", "-s", "1", "-q", *args], env=env)
    assert code == 0, err
    for mode in ("simple", "extended", "prepared"):
        with trio.fail_after(int(PGBENCH_SECONDS) + 60):
            code, out, err = await run(
                ["pgbench", "-c", "8", "-j", "2", "-T", PGBENCH_SECONDS, "-M", mode, *args],
                env=env,
            )
        assert code == 0, err
        assert "number of failed transactions: 0 (0.000%)" in out, out
        processed = [line for line in out.splitlines() if "transactions actually processed" in line]
        assert processed and int(processed[0].split(":")[1].split("/")[0]) > 0, out


# -- bad input -----------------------------------------------------------------------


async def test_wrong_key_unknown_alias_and_limits(ghost: Ghost, db: RealDb) -> None:
    def connect(**overrides: str) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(**ghost.kwargs(**overrides), connect_timeout=10)

    def work() -> None:
        with pytest.raises(psycopg.OperationalError) as info:
            connect(password="not-the-key")
        assert "28P01" in str(info.value.sqlstate) or "password authentication failed" in str(
            info.value
        )
        with pytest.raises(psycopg.OperationalError) as info:
            connect(user="no-such-app")
        assert "password authentication failed" in str(info.value)
        with pytest.raises(psycopg.OperationalError) as info:
            connect(dbname="not-allowed")
        assert "may not use database alias" in str(info.value)

    with trio.fail_after(30):
        await in_thread(work)
    # SQLSTATEs as the protocol carries them (psycopg hides them for
    # connection errors): use the raw client.
    from pgkit import RawClient

    def raw() -> list[str]:
        codes = []
        for user, password, database in (
            (ghost.app_id, "wrong", ghost.alias),
            (ghost.app_id, ghost.app_key, "unknown"),
        ):
            client = RawClient(ghost.port)
            try:
                client.login(user, password, database)
            except RuntimeError as exc:
                codes.append(exc.args[0]["C"])
            finally:
                client.close()
        return codes

    assert await in_thread(raw) == ["28P01", "3D000"]


async def test_alias_allowed_but_missing_is_3D000(
    nursery: trio.Nursery, db: RealDb, tmp_path: Path
) -> None:
    from pgkit import RawClient, app_policy

    ghost = await start_ghost(nursery, db, tmp_path, policy=app_policy(databases=("*",)))

    def raw() -> dict[str, str]:
        client = RawClient(ghost.port)
        try:
            client.login(ghost.app_id, ghost.app_key, "nowhere")
        except RuntimeError as exc:
            return dict(exc.args[0])
        finally:
            client.close()
        raise AssertionError("logged in to a missing alias")

    fields = await in_thread(raw)
    assert fields["C"] == "3D000" and 'alias "nowhere" does not exist' in fields["M"]


async def test_hostile_input_ends_only_its_connection(ghost: Ghost) -> None:
    """A malformed startup packet, a truncated message and a 1 GiB length
    field each end their own connection with an error; a session opened
    before keeps working and new ones can still be opened."""
    from pgkit import RawClient

    def work() -> None:
        with psycopg.connect(**ghost.kwargs(), autocommit=True) as bystander:
            assert bystander.execute("SELECT 1").fetchone() == (1,)

            # Malformed startup packets: protocol 2.0, a length below 8, garbage.
            for packet in (
                b"\x00\x00\x00\x09\x00\x02\x00\x00\x00",
                b"\x00\x00\x00\x04",
                b"\x00\x00\x00\x10\x00\x03\x00\x00user\x00x\xff\xff",
                b"\x40\x00\x00\x00\x00\x03\x00\x00",
            ):
                client = RawClient(ghost.port)
                client.send(packet)
                fields = client.error()
                assert fields["C"] == "08P01" and "invalid startup packet" in fields["M"]
                assert client.closed()
                client.close()

            # A 1 GiB length field after login.
            client = RawClient(ghost.port)
            client.login(ghost.app_id, ghost.app_key, ghost.alias)
            client.send(b"Q\x40\x00\x00\x00select")
            fields = client.error()
            assert fields["C"] == "08P01" and "exceeds the limit" in fields["M"]
            assert client.closed()
            client.close()

            # An unknown message type.
            client = RawClient(ghost.port)
            client.login(ghost.app_id, ghost.app_key, ghost.alias)
            client.send(b"Z\x00\x00\x00\x04")
            assert client.error()["C"] == "08P01"
            assert client.closed()
            client.close()

            # A truncated message: half a Query, then the client stops sending.
            client = RawClient(ghost.port)
            client.login(ghost.app_id, ghost.app_key, ghost.alias)
            client.send(b"Q\x00\x00\x00\x20select 1")
            client.sock.shutdown(__import__("socket").SHUT_WR)
            fields = client.error()
            assert fields["C"] == "08P01" and "inside a message" in fields["M"]
            assert client.closed()
            client.close()

            # The bystander carries on; new sessions work.
            assert bystander.execute("SELECT 2").fetchone() == (2,)
            with psycopg.connect(**ghost.kwargs()) as fresh:
                assert fresh.execute("SELECT 3").fetchone() == (3,)

    with trio.fail_after(60):
        await in_thread(work)


async def test_startup_negotiation_paths(ghost: Ghost) -> None:
    """GSSENCRequest → 'N', SSLRequest without TLS → 'N', a newer 3.x with a
    ``_pq_`` option → NegotiateProtocolVersion, CancelRequest with a made-up
    key → nothing happens; pipelined bytes after SSLRequest are refused."""
    from pgkit import RawClient

    from qmesh import _core

    def work() -> None:
        client = RawClient(ghost.port)
        client.send(_core.PG_GSSENC_REQUEST)
        assert client.read_exactly(1) == b"N"
        client.send(_core.PG_SSL_REQUEST)
        assert client.read_exactly(1) == b"N"
        client.send(
            _core.encode_startup([("user", ghost.app_id), ("_pq_.future", "1")], version=0x30002)
        )
        tag, body = client.message()
        assert tag == "v"
        assert _core.parse_negotiate_protocol_version(body) == (0, ["_pq_.future"])
        tag, body = client.message()
        assert tag == "R" and _core.parse_sasl_mechanisms(body) == ["SCRAM-SHA-256"]
        client.close()

        client = RawClient(ghost.port)
        client.send(_core.encode_cancel_request(1234, b"\x01\x02\x03\x04"))
        assert client.closed()
        client.close()

        client = RawClient(ghost.port)
        client.send(_core.PG_SSL_REQUEST + _core.encode_startup([("user", "x")]))
        assert client.error()["C"] == "08P01"
        client.close()

    with trio.fail_after(30):
        await in_thread(work)


# -- audit ---------------------------------------------------------------------------


async def test_audit_records_each_statement(ghost: Ghost) -> None:
    pids: list[int] = []

    def work() -> None:
        with psycopg.connect(**ghost.kwargs(), autocommit=True) as conn:
            pids.append(conn.info.backend_pid)
            conn.execute("SELECT g FROM generate_series(1, 5) g")  # extended protocol
            conn.execute("CREATE TEMP TABLE a (i int)")
            conn.execute("INSERT INTO a SELECT generate_series(1, 3)")
            with pytest.raises(psycopg.errors.DivisionByZero):
                conn.execute("SELECT 1 / %s", (0,))
            # A pipeline whose second statement fails: the third is skipped.
            with pytest.raises(psycopg.errors.UndefinedTable), conn.pipeline():
                conn.execute("SELECT 1")
                conn.execute("SELECT * FROM missing_table")
                conn.execute("SELECT 2")
        with psycopg.connect(**ghost.kwargs(), autocommit=True) as conn:
            pids.append(conn.info.backend_pid)
            conn.pgconn.exec_(b"SELECT 1; SELECT 2, 3")  # simple protocol, two statements

    with trio.fail_after(30):
        await in_thread(work)
    await ghost.audit_settled()
    records = list(reversed(list_audit(ghost.store, app=ghost.app_id, limit=100)))
    got = [(r.statement, r.rows, r.outcome) for r in records]
    assert ("SELECT g FROM generate_series(1, 5) g", 5, "ok") in got
    assert ("INSERT INTO a SELECT generate_series(1, 3)", 3, "ok") in got
    assert ("SELECT 1 / $1", None, "error:22012") in got
    assert ("SELECT * FROM missing_table", None, "error:42P01") in got
    assert ("SELECT 2", None, "skipped") in got
    assert ("SELECT 1; SELECT 2, 3", 2, "ok") in got
    assert all(r.alias == ghost.alias and r.duration_ms >= 0 for r in records)
    # Each names its client session: the edge and the process id the client was told.
    assert {r.session for r in records} == {f"edge-pg/{pid}" for pid in pids}
    assert [r.session for r in records if r.statement == "SELECT 1; SELECT 2, 3"] == [
        f"edge-pg/{pids[1]}"
    ]


async def test_audit_hash_mode_keeps_no_text(
    nursery: trio.Nursery, db: RealDb, tmp_path: Path
) -> None:
    import hashlib

    from pgkit import app_policy

    ghost = await start_ghost(
        nursery, db, tmp_path, policy=app_policy(databases=("main",), audit_statements="hash")
    )

    def work() -> None:
        with psycopg.connect(**ghost.kwargs(), autocommit=True) as conn:
            conn.execute("SELECT 'secret business'")

    await in_thread(work)
    await ghost.audit_settled()
    (record,) = [r for r in list_audit(ghost.store) if r.statement_sha256 == hashlib.sha256(
        b"SELECT 'secret business'").hexdigest()]  # fmt: skip
    assert record.statement is None and record.outcome == "ok"
