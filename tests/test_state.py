"""qmesh.state on both backends — a SQLite file and a real PostgreSQL: schema,
identities, apps and their SCRAM-SHA-256 verifiers, and use from several
threads and connections. What only one backend has (a file's mode, WAL, a
read-only replica) is tested on that one."""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import hmac
import sqlite3
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg
import psycopg.conninfo
import pytest
import trio
from pgcluster import PgCluster
from tunnelkit import until

from qmesh.state import (
    DATABASE_ERRORS,
    INTEGRITY_ERRORS,
    MIGRATIONS,
    POSTGRES_MIGRATIONS,
    SCRAM_ITERATIONS,
    AppExists,
    IdentityExists,
    InvalidValue,
    StateStore,
    StateUnavailable,
    scram_keys,
)
from qmesh.state import db as state_db


@pytest.fixture
def store(state_location: Path | str) -> Iterator[StateStore]:
    with StateStore.open(state_location) as s:
        yield s


def key(n: int) -> bytes:
    return bytes([n]) * 32


def test_open_creates_a_private_wal_database(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "state.db"
    with StateStore.open(path) as store:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert store.schema_version == len(MIGRATIONS)
        store.add_identity("a", "daemon", key(1))
        for extra in ("state.db-wal", "state.db-shm"):
            assert stat.S_IMODE((path.parent / extra).stat().st_mode) == 0o600
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(len(MIGRATIONS),)]
    finally:
        conn.close()


def test_foreign_keys_are_on_in_sqlite(tmp_path: Path) -> None:
    # (PostgreSQL enforces foreign keys always.)
    with StateStore.open(tmp_path / "state.db") as store, store._read() as conn:
        assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1


def test_reopen_keeps_data_and_does_not_migrate_again(state_location: Path | str) -> None:
    with StateStore.open(state_location) as store:
        store.add_identity("edge", "minigate", key(1))
        steps = len(store.migrations)
    with StateStore.open(state_location) as store:
        assert store.schema_version == steps
        assert [i.name for i in store.list_identities()] == ["edge"]


def test_newer_schema_is_refused(state_location: Path | str) -> None:
    with StateStore.open(state_location) as store, store._write() as conn:
        conn.execute("UPDATE schema_version SET version = ?", (len(store.migrations) + 1,))
    with pytest.raises(StateUnavailable, match="upgrade qmesh"):
        StateStore.open(state_location)


def test_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StateUnavailable, match="cannot"):
        StateStore.open(path)


def test_closed_store(state_location: Path | str) -> None:
    store = StateStore.open(state_location)
    store.close()
    store.close()  # twice is fine
    with pytest.raises(RuntimeError, match="closed"):
        store.list_identities()


# -- identities --------------------------------------------------------------------


def test_add_and_look_up_identities(store: StateStore) -> None:
    added = store.add_identity("web-1", "minigate", key(1))
    store.add_identity("gpu.node_2", "daemon", key(2))
    assert added.name == "web-1" and not added.revoked
    assert store.get_identity("web-1") == added
    assert store.find_identity_by_key(key(1)) == added
    assert store.find_identity_by_key(key(3)) is None
    assert store.get_identity("nobody") is None
    listed = store.list_identities()
    assert [(i.name, i.role, i.public_key) for i in listed] == [
        ("gpu.node_2", "daemon", key(2)),
        ("web-1", "minigate", key(1)),
    ]


def test_duplicate_name_or_key(store: StateStore) -> None:
    store.add_identity("web-1", "minigate", key(1))
    with pytest.raises(IdentityExists, match="web-1"):
        store.add_identity("web-1", "daemon", key(2))
    with pytest.raises(IdentityExists, match="already enrolled"):
        store.add_identity("web-2", "minigate", key(1))
    assert len(store.list_identities()) == 1


@pytest.mark.parametrize(
    ("name", "role", "public_key"),
    [
        ("", "minigate", key(1)),
        ("-leading-dash", "minigate", key(1)),
        ("has space", "minigate", key(1)),
        ("x" * 64, "minigate", key(1)),
        ("ok", "gate", key(1)),
        ("ok", "minigate", b"short"),
    ],
)
def test_invalid_identity(store: StateStore, name: str, role: str, public_key: bytes) -> None:
    with pytest.raises(InvalidValue):
        store.add_identity(name, role, public_key)
    assert store.list_identities() == []


def test_role_is_also_checked_by_the_database(store: StateStore) -> None:
    with store._read() as conn, pytest.raises(INTEGRITY_ERRORS):
        conn.execute(
            "INSERT INTO identities (name, role, public_key, created_at) VALUES (?,?,?,?)",
            ("x", "gate", key(9), 0.0),
        )


def test_revoke(store: StateStore) -> None:
    store.add_identity("web-1", "minigate", key(1))
    assert store.revoke_identity("web-1") is True
    revoked = store.get_identity("web-1")
    assert revoked is not None and revoked.revoked and revoked.revoked_at is not None
    assert store.revoke_identity("web-1") is False  # already revoked
    again = store.get_identity("web-1")
    assert again is not None and again.revoked_at == revoked.revoked_at
    assert store.revoke_identity("nobody") is False
    found = store.find_identity_by_key(key(1))
    assert found is not None and found.revoked


# -- applications -----------------------------------------------------------------


def test_app_keys_verify(store: StateStore) -> None:
    app_key = store.add_app("shop")
    assert len(app_key) >= 40
    assert store.verify_app_key("shop", app_key)
    assert not store.verify_app_key("shop", app_key + "x")
    assert not store.verify_app_key("shop", "")
    assert not store.verify_app_key("other", app_key)
    other_key = store.add_app("other")
    assert other_key != app_key
    assert not store.verify_app_key("shop", other_key)
    assert [a.app_id for a in store.list_apps()] == ["other", "shop"]


def test_delete_app(store: StateStore) -> None:
    old_key = store.add_app("shop")
    assert store.delete_app("shop") is True
    assert store.get_app_verifier("shop") is None
    assert not store.verify_app_key("shop", old_key)
    assert store.delete_app("shop") is False
    new_key = store.add_app("shop")  # the id can be reused, with a new key
    assert store.verify_app_key("shop", new_key)
    assert not store.verify_app_key("shop", old_key)


def test_duplicate_and_invalid_app(store: StateStore) -> None:
    store.add_app("shop")
    with pytest.raises(AppExists):
        store.add_app("shop")
    with pytest.raises(InvalidValue):
        store.add_app("bad id")


def test_verifier_matches_the_scram_definition(store: StateStore) -> None:
    app_key = store.add_app("shop")
    verifier = store.get_app_verifier("shop")
    assert verifier is not None
    assert verifier.iterations == SCRAM_ITERATIONS == 4096
    assert len(verifier.salt) == 16
    salted = hashlib.pbkdf2_hmac("sha256", app_key.encode(), verifier.salt, 4096)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    assert verifier.stored_key == hashlib.sha256(client_key).digest()
    assert verifier.server_key == hmac.new(salted, b"Server Key", "sha256").digest()
    assert "stored_key" not in repr(verifier)
    assert store.get_app_verifier("nobody") is None


def test_scram_keys_against_rfc7677_example() -> None:
    # RFC 7677 section 3: user "user", password "pencil".
    client_first_bare = "n=user,r=rOprNGfwEbeRWgbNEkqO"
    server_first = (
        "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
    )
    client_final_without_proof = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
    proof = base64.b64decode("dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
    server_signature = base64.b64decode("6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
    auth_message = f"{client_first_bare},{server_first},{client_final_without_proof}".encode()

    stored_key, server_key = scram_keys(
        "pencil", base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ=="), 4096
    )

    # The server's check of the client proof, and its own signature.
    client_signature = hmac.new(stored_key, auth_message, "sha256").digest()
    client_key = bytes(a ^ b for a, b in zip(proof, client_signature, strict=True))
    assert hashlib.sha256(client_key).digest() == stored_key
    assert hmac.new(server_key, auth_message, "sha256").digest() == server_signature


def test_the_app_key_itself_is_never_stored(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with StateStore.open(path) as store:
        app_key = store.add_app("shop")
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("state.db"))
    assert app_key.encode() not in raw
    assert b"shop" in raw  # the scan does see the table's contents


# -- threads and Trio -----------------------------------------------------------------


def test_concurrent_writers_from_threads(store: StateStore) -> None:
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            for i in range(10):
                store.add_identity(f"t{t}-{i}", "daemon", bytes([t, i]) * 16)
                store.list_identities()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(store.list_identities()) == 80


def test_two_stores_on_one_database(state_location: Path | str) -> None:
    # The running Gate and a `qmesh enroll` in a shell (or two Gates) share it.
    with StateStore.open(state_location) as gate, StateStore.open(state_location) as cli:
        cli.add_identity("web-1", "minigate", key(1))
        assert gate.find_identity_by_key(key(1)) is not None
        gate.revoke_identity("web-1")
        found = cli.get_identity("web-1")
        assert found is not None and found.revoked


async def test_usable_from_trio_worker_threads(store: StateStore) -> None:
    async with trio.open_nursery() as nursery:
        for n in range(5):
            nursery.start_soon(
                functools.partial(
                    trio.to_thread.run_sync, store.add_identity, f"edge-{n}", "minigate", key(n)
                )
            )
    found = await trio.to_thread.run_sync(store.find_identity_by_key, key(3))
    assert found is not None and found.name == "edge-3"


async def test_the_change_marker_moves_after_another_stores_commit(
    state_location: Path | str,
) -> None:
    """How a Gate learns of a `qmesh revoke` run elsewhere (qmesh.state.watch)."""
    with StateStore.open(state_location) as gate, StateStore.open(state_location) as cli:
        before = gate.change_marker()
        assert gate.change_marker() == before  # nothing happened
        cli.add_identity("web-1", "minigate", key(1))
        # PostgreSQL delivers the NOTIFY asynchronously: wait for it.
        with trio.fail_after(30):
            await until(lambda: gate.change_marker() != before)
        with pytest.raises(IdentityExists):
            cli.add_identity("web-1", "minigate", key(1))
        settled = gate.change_marker()
        cli.list_identities()  # reads and failed writes commit nothing
        assert gate.change_marker() == settled


# -- PostgreSQL only ----------------------------------------------------------------------


@pytest.fixture
def pg_location(state_location: Path | str) -> str:
    if not isinstance(state_location, str):
        pytest.skip("PostgreSQL only")
    return state_location


def test_gates_starting_together_migrate_once(pg_location: str) -> None:
    """The first store migrates under the write lock; the others wait and
    find nothing to do (a second migration would fail on CREATE TABLE)."""
    errors: list[BaseException] = []
    stores: list[StateStore] = []
    barrier = threading.Barrier(4)

    def start() -> None:
        barrier.wait()
        try:
            stores.append(StateStore.open(pg_location))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for store in stores:
        store.close()
    assert errors == [] and len(stores) == 4
    with StateStore.open(pg_location) as store, store._read() as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [
            (len(POSTGRES_MIGRATIONS),)
        ]


@pytest.mark.parametrize("idle", [False, True])
def test_connections_the_server_ended_are_replaced(
    pg_location: str, monkeypatch: pytest.MonkeyPatch, idle: bool
) -> None:
    """pg_terminate_backend on every connection of the store (a server
    restart looks the same): a connection that sat idle is checked before
    use and replaced, so the call succeeds; one in steady use is not checked,
    so one call fails with a database error, and the next succeeds."""
    monkeypatch.setattr(state_db, "_CHECK_AFTER_IDLE_S", -1.0 if idle else 1e9)
    with StateStore.open(pg_location) as store:
        store.add_app("shop")
        assert [a.app_id for a in store.list_apps()] == ["shop"]
        with psycopg.connect(pg_location, application_name="dba") as dba:
            ended = dba.execute(
                "SELECT count(pg_terminate_backend(pid, 10000)) FROM pg_stat_activity"
                " WHERE application_name = 'qmesh-gate' AND datname = current_database()"
            ).fetchone()
        # Waited for: each backend has exited (the pool's and the listener's).
        assert ended is not None and ended[0] >= 2
        expectations: list[contextlib.AbstractContextManager[object]] = [contextlib.nullcontext()]
        if not idle:
            expectations.insert(0, pytest.raises(DATABASE_ERRORS))
        for expectation in expectations:
            with expectation:
                assert [a.app_id for a in store.list_apps()] == ["shop"]


def test_bad_database_urls_are_one_line_that_says_what(
    pg_location: str, pg_cluster: PgCluster
) -> None:
    port = 1  # nothing listens on port 1
    secret = str(psycopg.conninfo.conninfo_to_dict(pg_location)["password"])
    for url, expected in (
        (
            f"postgresql://qmesh:pw@127.0.0.1:{port}/state",
            f"cannot connect to postgresql://qmesh@127.0.0.1:{port}/state",
        ),
        (pg_location.replace("@", "x@", 1), "password authentication failed"),
        (pg_location.split("?")[0] + "_missing?sslmode=disable", "does not exist"),
    ):
        with pytest.raises(StateUnavailable) as refused:
            StateStore.open(url)
        message = str(refused.value)
        assert expected in message and "\n" not in message, message
        for password in ("pw", secret):  # never the password, given or real
            assert password not in message.replace("password", ""), message
    # A read-only session (as on a standby) is refused before anything is written.
    with pytest.raises(StateUnavailable, match="read-only"):
        StateStore.open(pg_location + "&options=-c%20default_transaction_read_only%3Don")


def test_app_sessions_are_counted_across_live_gates(store: StateStore) -> None:
    """max_sessions across Gates: each Gate's sessions count while it is
    live; a gone or stopped Gate's do not, and a restarted Gate starts at 0."""
    store.add_app("shop")
    now = 1_000.0
    with store._write() as conn:
        conn.executemany(
            "INSERT INTO gates (name, instance, tunnel, http, host, version, started_at,"
            " heartbeat_at, gone_after_s, sessions, stopped_at)"
            " VALUES (?, 'i', 't', 'h', 'host', 'v', 0, ?, 4, 0, NULL)",
            [("gate-a", now), ("gate-b", now)],
        )
    assert store.claim_app_session("gate-a", "shop", 3, now)
    assert store.claim_app_session("gate-a", "shop", 3, now)
    assert store.claim_app_session("gate-b", "shop", 3, now)
    assert not store.claim_app_session("gate-b", "shop", 3, now)  # 3 held in all
    store.release_app_session("gate-a", "shop")
    assert store.claim_app_session("gate-b", "shop", 3, now)
    assert not store.claim_app_session("gate-a", "shop", 3, now)
    # gate-a falls silent: its one session no longer counts at gate-b.
    later = now + 10
    with store._write() as conn:
        conn.execute("UPDATE gates SET heartbeat_at = ? WHERE name = 'gate-b'", (later,))
    assert store.claim_app_session("gate-b", "shop", 3, later)
    assert not store.claim_app_session("gate-b", "shop", 3, later)  # gate-b holds 3
    # Releasing more than was claimed never goes below zero.
    for _ in range(5):
        store.release_app_session("gate-a", "shop")
    with store._read() as conn:
        assert conn.execute(
            "SELECT sessions FROM app_sessions WHERE gate = 'gate-a'"
        ).fetchone() == (0,)


def test_opening_an_up_to_date_state_waits_for_no_writer(state_location: Path | str) -> None:
    """A command that opens the state (``qmesh gates``, every ``qmesh``
    command) while a Gate holds the writer lock does not queue behind it:
    only a store with steps to apply takes the lock."""
    opened: list[StateStore] = []
    with StateStore.open(state_location) as gate, gate._write():
        thread = threading.Thread(target=lambda: opened.append(StateStore.open(state_location)))
        thread.start()
        thread.join(timeout=30)
        assert opened, "opening the state waited for the writer"
    for store in opened:
        store.close()
