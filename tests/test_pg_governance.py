"""Governance at the Gate over real sessions: read-only apps stay read-only
(server-enforced, refusals consistent with the server's transaction state),
a policy statement_timeout holds, max_sessions counts, and a password
rotated by another process is picked up at the next login."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
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
    server_messages_seen_by_python,
    start_ghost,
)
from psycopg.pq import DiagnosticField

from qmesh import _core
from qmesh.pg.audit import list_audit
from qmesh.pg.guard import Refusal
from qmesh.pg.relay import Relay
from qmesh.pg.vault import DatabaseSecret
from qmesh.pg.watch import SessionWatch

DIAG_SQLSTATE = DiagnosticField.SQLSTATE
DIAG_MESSAGE = DiagnosticField.MESSAGE_PRIMARY


@pytest.fixture(scope="module")
def db(pg_cluster: PgCluster) -> Iterator[RealDb]:
    real = RealDb(pg_cluster, "gov")
    real.superuser("CREATE TABLE ledger (i int)")
    real.superuser(f"ALTER TABLE ledger OWNER TO {real.name}")
    yield real


def rows_in_ledger(db: RealDb) -> int:
    return int(db.superuser("SELECT count(*) FROM ledger"))


async def logs_in_as(ghost: Ghost, role: str) -> None:
    """A client of ``ghost`` logs in, and the server's session is ``role``'s."""

    def work() -> None:
        with psycopg.connect(**ghost.kwargs()) as conn:
            assert conn.execute("SELECT current_user").fetchone() == (role,)

    with trio.fail_after(30):
        await in_thread(work)


async def read_only_ghost(nursery: trio.Nursery, db: RealDb, tmp_path: Path) -> Ghost:
    return await start_ghost(
        nursery, db, tmp_path, policy=app_policy(databases=("main",), read_only=True)
    )


async def test_read_only_session_refuses_writes_and_escapes(
    nursery: trio.Nursery, db: RealDb, tmp_path: Path
) -> None:
    ghost = await read_only_ghost(nursery, db, tmp_path)
    before = rows_in_ledger(db)

    def work() -> None:
        with psycopg.connect(**ghost.kwargs(), autocommit=True) as conn:
            assert conn.execute("SHOW default_transaction_read_only").fetchone() == ("on",)
            assert conn.execute("SELECT count(*) FROM ledger").fetchone() is not None
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                conn.execute("INSERT INTO ledger VALUES (1)")  # the server says no
            escapes = [
                "SET default_transaction_read_only = off",
                "SET SESSION default_transaction_read_only TO off",
                'SET "DEFAULT_TRANSACTION_READ_ONLY" = off',
                "SET/**/default_transaction_read_only = off",
                "RESET default_transaction_read_only",
                "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
                "BEGIN READ WRITE",
                "START TRANSACTION READ WRITE",
                "SELECT set_config('default_transaction_read_only', 'off', false)",
                "UPDATE pg_settings SET setting = 'off'"
                " WHERE name = 'default_transaction_read_only'",
                "SELECT 1; SET default_transaction_read_only = off",
            ]
            for sql in escapes:
                # Simple protocol (libpq's PQexec sends a Query message)...
                result = conn.pgconn.exec_(sql.encode())
                assert result.error_field(DIAG_SQLSTATE) == b"25006", sql
                assert b"read-only" in (result.error_field(DIAG_MESSAGE) or b""), sql
                # ... and extended (Parse/Bind/Execute).
                with pytest.raises(psycopg.errors.ReadOnlySqlTransaction, match="read-only"):
                    conn.execute(sql)
            # Extended protocol with parameters: the Parse is replaced, Execute fails.
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                conn.execute(
                    "SELECT set_config(%s, %s, false)", ("default_transaction_read_only", "off")
                )
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                conn.execute("SELECT set_config(%s, %s, false)", ("search_path", "public"))
            assert conn.execute("SHOW default_transaction_read_only").fetchone() == ("on",)
            # Inside a transaction block the refusal aborts the transaction,
            # as a failing statement would; ROLLBACK brings the session back.
            conn.autocommit = False
            conn.execute("SELECT 1")
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                conn.execute("SET TRANSACTION READ WRITE")
            with pytest.raises(psycopg.errors.InFailedSqlTransaction):
                conn.execute("SELECT 1")
            conn.rollback()
            assert conn.execute("SELECT 5").fetchone() == (5,)
            conn.rollback()

    with trio.fail_after(30):
        await in_thread(work)
    assert rows_in_ledger(db) == before


async def test_statements_that_name_nothing_guarded_skip_the_python_check(
    nursery: trio.Nursery, db: RealDb, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The relay engine holds for the guard only the statements that name a
    word the guard looks for: the others reach the server without a trip
    through Python; the named ones are still checked and refused. The
    engine audits them all itself, the held ones as the client sent them:
    Python sees nothing but what it must judge."""
    checked: list[str] = []
    original = SessionWatch._refusal

    def counting(self: SessionWatch, text: str, what: str) -> Refusal | None:
        checked.append(text)
        return original(self, text, what)

    handed_to_python: list[bool] = []
    on_tap = Relay._on_tap

    def seen(relay: Relay, records: list[_core.TapRecord]) -> bytes | None:
        handed_to_python.extend(held for _, _, _, _, held in records)
        return on_tap(relay, records)

    monkeypatch.setattr(SessionWatch, "_refusal", counting)
    monkeypatch.setattr(Relay, "_on_tap", seen)
    ghost = await read_only_ghost(nursery, db, tmp_path)

    def work() -> None:
        with psycopg.connect(**ghost.kwargs(), autocommit=True) as conn:
            for i in range(20):
                assert conn.execute("SELECT %s::int + 1", (i,)).fetchone() == (i + 1,)
                assert conn.pgconn.exec_(b"SELECT count(*) FROM ledger").status == 2
            assert conn.execute("SHOW transaction_read_only").fetchone() == ("on",)
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction, match="read-only"):
                conn.execute("SET default_TRANSACTION_read_only = off")

    with trio.fail_after(30):
        await in_thread(work)
        await ghost.audit_settled()
    # The Parse of SHOW and of the SET (psycopg's extended protocol).
    assert checked == ["SHOW transaction_read_only", "SET default_TRANSACTION_read_only = off"]
    assert handed_to_python == [True, True]  # only what the guard held
    records = reversed(list_audit(ghost.store, app=ghost.app_id, limit=200))
    assert [(r.statement, r.rows, r.outcome) for r in records] == [
        ("SELECT $1::int + 1", 1, "ok"),
        ("SELECT count(*) FROM ledger", 1, "ok"),
    ] * 20 + [
        ("SHOW transaction_read_only", None, "ok"),
        ("SET default_TRANSACTION_read_only = off", None, "error:25006"),
    ]


async def test_guarded_statements_larger_than_the_stream_window(
    nursery: trio.Nursery, db: RealDb, tmp_path: Path
) -> None:
    """The guard collects a statement whole before any of it is sent: one of
    3 MB (three stream windows) that names a guarded word is held, checked
    and run, and one that names none passes; neither stalls the client."""
    ghost = await read_only_ghost(nursery, db, tmp_path)
    big = "x" * 3_000_000

    def work() -> tuple[list[bytes | None], list[bytes | None]]:
        client = RawClient(ghost.port)
        client.login(ghost.app_id, ghost.app_key, ghost.alias)
        held = client.query(f"SELECT length('{big}') AS read_only_guarded_set")
        plain = client.query(f"SELECT length('{big}')")
        return [v for t, b in held if t == "D" for v in _core.parse_data_row(b)], [
            v for t, b in plain if t == "D" for v in _core.parse_data_row(b)
        ]

    with trio.fail_after(30):
        held, plain = await in_thread(work)
    assert held == plain == [b"3000000"]


async def test_read_only_backstop_ends_a_session_that_gets_around_the_text_check(
    nursery: trio.Nursery, db: RealDb, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dynamic SQL the text check cannot see turns the setting off; the
    server reports it (ParameterStatus) and the Gate ends the session. The
    relay engine decides it without Python seeing the server's side, and
    the audit records the statement that did it with the session's error."""
    python_saw = server_messages_seen_by_python(monkeypatch)
    ghost = await read_only_ghost(nursery, db, tmp_path)
    before = rows_in_ledger(db)
    sneaky = (
        "DO $$BEGIN EXECUTE format('SET %s = off', 'default_transaction' || '_read_only'); END$$"
    )

    def work() -> None:
        with psycopg.connect(**ghost.kwargs(), autocommit=True) as conn:
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction, match="has been ended"):
                conn.execute(sneaky)
            with pytest.raises(psycopg.OperationalError):
                conn.execute("INSERT INTO ledger VALUES (2)")

    with trio.fail_after(30):
        await in_thread(work)
        await ghost.audit_settled()
    assert rows_in_ledger(db) == before
    assert python_saw == []
    records = list_audit(ghost.store, app=ghost.app_id, limit=10)
    assert (sneaky, "error:25006") in [(r.statement, r.outcome) for r in records]


async def test_startup_options_cannot_lift_read_only(
    nursery: trio.Nursery, db: RealDb, tmp_path: Path
) -> None:
    ghost = await read_only_ghost(nursery, db, tmp_path)

    def work() -> list[str]:
        with psycopg.connect(**ghost.kwargs(), options="-c default_transaction_read_only=off") as c:
            row = c.execute("SHOW default_transaction_read_only").fetchone()
            assert row is not None
        # A startup parameter naming the setting directly (libpq cannot send one).
        raw = RawClient(ghost.port)
        try:
            raw.login(
                ghost.app_id,
                ghost.app_key,
                ghost.alias,
                [("default_transaction_read_only", "off"), ("transaction_read_only", "off")],
            )
            answer = raw.query("SHOW default_transaction_read_only")
            body = next(b for tag, b in answer if tag == "D")
        finally:
            raw.close()
        return [str(row[0]), _core.parse_data_row(body)[0].decode()]  # type: ignore[union-attr]

    assert await in_thread(work) == ["on", "on"]


async def test_policy_statement_timeout(nursery: trio.Nursery, db: RealDb, tmp_path: Path) -> None:
    ghost = await start_ghost(
        nursery, db, tmp_path, policy=app_policy(databases=("main",), statement_timeout_ms=300)
    )

    def work() -> None:
        with psycopg.connect(**ghost.kwargs(), autocommit=True) as conn:
            assert conn.execute("SHOW statement_timeout").fetchone() == ("300ms",)
            with pytest.raises(psycopg.errors.QueryCanceled):
                conn.execute("SELECT pg_sleep(5)")
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="statement_timeout"):
                conn.execute("SET statement_timeout = 0")
            conn.execute("RESET statement_timeout")
            assert conn.execute("SHOW statement_timeout").fetchone() == ("300ms",)
            conn.execute("INSERT INTO ledger VALUES (3)")  # not read-only: writes work

    with trio.fail_after(30):
        await in_thread(work)


async def test_max_sessions(nursery: trio.Nursery, db: RealDb, tmp_path: Path) -> None:
    ghost = await start_ghost(
        nursery, db, tmp_path, policy=app_policy(databases=("main",), max_sessions=2)
    )

    def work() -> None:
        first = psycopg.connect(**ghost.kwargs())
        second = psycopg.connect(**ghost.kwargs())
        with pytest.raises(psycopg.OperationalError, match="too many sessions"):
            psycopg.connect(**ghost.kwargs())
        first.close()
        for _ in range(50):  # the Gate notices the close asynchronously
            try:
                third = psycopg.connect(**ghost.kwargs())
                break
            except psycopg.OperationalError:
                import time

                time.sleep(0.05)
        else:
            raise AssertionError("a freed session slot was never reused")
        assert third.execute("SELECT 1").fetchone() == (1,)
        third.close()
        second.close()

    with trio.fail_after(30):
        await in_thread(work)


async def test_login_retries_with_a_rotation_in_flight(
    nursery: trio.Nursery, db: RealDb, tmp_path: Path
) -> None:
    """Another process has put a new password on the server and in the
    vault's pending slot but not promoted it yet: the first login gets
    28P01, the Gate re-reads the vault and logs in with the pending one."""
    other = RealDb(db.cluster, "rot")
    ghost = await start_ghost(nursery, other, tmp_path)
    new_password = "rotated-" + secrets.token_urlsafe(12)
    ghost.vault.begin_rotation(ghost.alias, new_password, stale_after_s=60)
    other.superuser(f"ALTER ROLE {other.name} PASSWORD '{new_password}'")
    await logs_in_as(ghost, other.name)
    # The vault promoted afterwards: the current value works at once.
    ghost.vault.finish_rotation(ghost.alias, promote=True)
    await logs_in_as(ghost, other.name)


async def test_login_rereads_a_vault_changed_by_another_process(
    nursery: trio.Nursery, db: RealDb, tmp_path: Path
) -> None:
    other = RealDb(db.cluster, "rot")
    ghost = await start_ghost(nursery, other, tmp_path)
    # Another process (here: a second Vault on the same database file)
    # changes the password on the server and in the vault between this
    # Gate's vault read and its login; simulated by wrapping the first read.
    stale = ghost.vault.get(ghost.alias)
    assert stale is not None
    new_password = "changed-" + secrets.token_urlsafe(12)
    other.superuser(f"ALTER ROLE {other.name} PASSWORD '{new_password}'")
    ghost.vault.put(stale.with_password(new_password))
    reads: list[str] = []
    real_get = ghost.vault.get

    def get(alias: str) -> object:
        reads.append(alias)
        return stale if len(reads) == 1 else real_get(alias)

    ghost.service.vault.get = get  # type: ignore[method-assign,union-attr]

    def work() -> None:
        with psycopg.connect(**ghost.kwargs()) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)

    with trio.fail_after(30):
        await in_thread(work)
    assert len(reads) == 2


async def test_real_server_refusing_the_vault_password_is_a_clear_error(
    nursery: trio.Nursery, db: RealDb, tmp_path: Path
) -> None:
    other = RealDb(db.cluster, "bad")
    ghost = await start_ghost(nursery, other, tmp_path)
    other.superuser(f"ALTER ROLE {other.name} PASSWORD 'nobody-knows-this'")

    def work() -> str:
        with pytest.raises(psycopg.OperationalError) as info:
            psycopg.connect(**ghost.kwargs())
        return str(info.value)

    message = await in_thread(work)
    assert "refused the gate's credentials" in message
    assert other.password not in message and "nobody-knows-this" not in message


async def test_a_gate_without_its_vault_says_so(
    nursery: trio.Nursery, db: RealDb, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qmesh.pg.service import PgService

    monkeypatch.delenv("QMESH_MASTER_KEY", raising=False)
    ghost = await start_ghost(nursery, db, tmp_path)
    # What from_config gives a Gate whose master key is missing.
    config = ghost.service.config
    bare = PgService.from_config(attrs.evolve(config, data_dir=tmp_path / "nokey"), ghost.store)
    assert bare.vault is None and bare.vault_problem
    ghost.service.vault, ghost.service.vault_problem = bare.vault, bare.vault_problem

    def work() -> str:
        with pytest.raises(psycopg.OperationalError) as info:
            psycopg.connect(**ghost.kwargs())
        return str(info.value)

    assert "vault is not available" in await in_thread(work)


async def test_rotation_during_pgbench_fails_no_transaction(
    nursery: trio.Nursery, db: RealDb, tmp_path: Path
) -> None:
    """`qmesh secrets rotate` (its library call) while pgbench runs through
    the Gate: sessions opened before carry on, and with -C every transaction
    is a new login across the rotation window; none fails. Afterwards the
    old password no longer logs in to the real server."""
    from pgkit import run

    from qmesh.pg.rotate import rotate_password

    other = RealDb(db.cluster, "rotbench")
    ghost = await start_ghost(nursery, other, tmp_path)
    env = {"PGPASSWORD": ghost.app_key}
    args = ["-h", "127.0.0.1", "-p", str(ghost.port), "-U", ghost.app_id, ghost.alias]
    with trio.fail_after(60):
        code, _, err = await run(["pgbench", "-i", "-s", "1", "-q", *args], env=env)
    assert code == 0, err
    outputs: list[str] = []

    async def bench(name: str, *extra: str) -> None:
        # Long enough to outlast the rotations on a slow machine; the test
        # checks below that it did.
        command = ["pgbench", "-n", "-S", "-T", "6", *extra, *args]
        code, out, err = await run(command, env={**env, "PGAPPNAME": name})
        assert code == 0, err
        outputs.append(out)

    def server_now() -> str:
        return other.superuser("SELECT clock_timestamp()").strip()

    async def sessions(name: str, since: str = "-infinity") -> int:
        """The Gate's sessions at the real server for bench ``name`` (the
        Gate passes the client's application_name on) that began after ``since``."""
        sql = (
            "SELECT count(*) FROM pg_stat_activity"
            f" WHERE application_name = '{name}' AND backend_start > '{since}'"
        )
        return int((await in_thread(lambda: other.superuser(sql))).strip() or 0)

    async def until_sessions(name: str, count: int, since: str = "-infinity") -> None:
        while await sessions(name, since) < count:  # the server's view, polled
            assert not outputs, "pgbench ended before the rotations did: nothing was tested"
            await trio.sleep(0.01)

    with trio.fail_after(60):
        async with trio.open_nursery() as inner:
            inner.start_soon(bench, "held", "-c", "4")
            inner.start_soon(bench, "relogin", "-c", "2", "-C")
            await until_sessions("held", 4)
            since = "-infinity"
            for _ in range(3):
                # Each rotation comes after a login with the password before it.
                await until_sessions("relogin", 1, since)
                await trio.to_thread.run_sync(rotate_password, ghost.vault, ghost.alias)
                since = await in_thread(server_now)
            await until_sessions("relogin", 1, since)  # and with the last one
            assert await sessions("held") == 4  # opened before the first rotation
            assert not outputs, "pgbench ended before the rotations did: nothing was tested"
    for out in outputs:
        assert "number of failed transactions: 0 (0.000%)" in out, out
    current = ghost.vault.get(ghost.alias)
    assert current is not None and current.password != other.password

    def old_password_logs_in() -> bool:
        try:
            psycopg.connect(other.dsn()).close()
        except psycopg.OperationalError:
            return False
        return True

    assert not await in_thread(old_password_logs_in)


async def test_a_rotation_ending_between_the_gates_vault_reads_is_followed(
    nursery: trio.Nursery, db: RealDb, tmp_path: Path
) -> None:
    """The server already has the rotation's new password; the Gate's login
    with the current one gets 28P01, and the rotation finishes (its pending
    password promoted) between the Gate's two reads of the vault. The login
    still finds the new password, whichever slot holds it by then."""
    other = RealDb(db.cluster, "rotend")
    ghost = await start_ghost(nursery, other, tmp_path)
    vault = ghost.vault
    new_password = "rotated-" + secrets.token_urlsafe(12)
    vault.begin_rotation(ghost.alias, new_password, stale_after_s=60)
    other.superuser(f"ALTER ROLE {other.name} PASSWORD '{new_password}'")
    reads: list[str] = []

    def reading(
        read: Callable[[str], DatabaseSecret | None],
    ) -> Callable[[str], DatabaseSecret | None]:
        def wrapped(alias: str) -> DatabaseSecret | None:
            value = read(alias)
            reads.append(read.__name__)
            if len(reads) == 2:  # the first read after the 28P01
                vault.finish_rotation(alias, promote=True)
            return value

        return wrapped

    vault.get = reading(vault.get)  # type: ignore[method-assign,assignment]
    vault.get_pending = reading(vault.get_pending)  # type: ignore[method-assign,assignment]
    await logs_in_as(ghost, other.name)
    assert reads[:2] == ["get", "get_pending"]


async def test_rotations_following_each_other_during_a_login_are_followed(
    nursery: trio.Nursery, db: RealDb, tmp_path: Path
) -> None:
    """Each time the Gate reads a rotation's pending password, the next
    rotation has already changed the server's (twice): the login keeps
    reading the vault while it finds passwords it has not tried."""
    other = RealDb(db.cluster, "rotchain")
    ghost = await start_ghost(nursery, other, tmp_path)
    vault, alias = ghost.vault, ghost.alias

    def rotate() -> str:
        new_password = "rotated-" + secrets.token_urlsafe(12)
        vault.begin_rotation(alias, new_password, stale_after_s=60)
        other.superuser(f"ALTER ROLE {other.name} PASSWORD '{new_password}'")
        return new_password

    passwords = [rotate()]
    get_pending = vault.get_pending

    def overtaken(alias: str) -> DatabaseSecret | None:
        value = get_pending(alias)
        if value is not None and len(passwords) < 3:
            vault.finish_rotation(alias, promote=True)
            passwords.append(rotate())
        return value

    vault.get_pending = overtaken  # type: ignore[method-assign]
    await logs_in_as(ghost, other.name)
    assert len(passwords) == 3


async def test_a_login_that_tries_a_rotations_password_too_early_tries_it_again(
    nursery: trio.Nursery, db: RealDb, tmp_path: Path
) -> None:
    """The server refuses the Gate's stored password, and the rotation in
    flight has not yet given the server its new one when the Gate tries it;
    then it does. Seeing the rotation still in flight, the login tries again
    and gets in."""
    other = RealDb(db.cluster, "rotearly")
    ghost = await start_ghost(nursery, other, tmp_path)
    vault, alias = ghost.vault, ghost.alias
    other.superuser(f"ALTER ROLE {other.name} PASSWORD 'interim-{secrets.token_urlsafe(12)}'")
    new_password = "rotated-" + secrets.token_urlsafe(12)
    vault.begin_rotation(alias, new_password, stale_after_s=60)
    reads = 0
    get_pending = vault.get_pending

    def late(alias: str) -> DatabaseSecret | None:
        nonlocal reads
        reads += 1
        if reads == 2:  # the Gate has tried the new password once, too early
            other.superuser(f"ALTER ROLE {other.name} PASSWORD '{new_password}'")
        return get_pending(alias)

    vault.get_pending = late  # type: ignore[method-assign]
    await logs_in_as(ghost, other.name)
    assert reads >= 2
