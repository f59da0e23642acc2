"""Live Postgres sessions lose their standing with their app key
(qmesh.pg.service): ``qmesh apps disable`` and ``rotate-key --overlap 0`` end
them with a FATAL (57P01) through the Gate's StateWatcher; a session on a key
inside its rotation overlap carries on until the overlap ends.

Real psycopg clients → MiniGate → tunnel → Gate → a real PostgreSQL; the
trust changes are written through a second connection to the state
database, as a ``qmesh`` command in another process (or another Gate)
writes them — on both backends: a SQLite file, whose commits the Gate sees
in ``PRAGMA data_version``, and PostgreSQL, whose commits reach it as
NOTIFY. Each
session under test is inside a running statement when its key loses its
standing, so the FATAL is what the client reads; waits are on events and
on conditions with generous deadlines.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
import psycopg
import pytest
import trio
from pgcluster import PgCluster
from pgkit import Ghost, RealDb, in_thread, start_ghost

from qmesh.config import GateAppConfig
from qmesh.pg.audit import list_audit
from qmesh.pg.policy import policy_to_json
from qmesh.pg.service import KEY_REVOKED
from qmesh.state import StateStore
from qmesh.state.watch import StateWatcher

DEADLINE_S = 30.0  # generous: the event must happen, how fast is for bench/
SLEEP = "SELECT pg_sleep(30)"


@pytest.fixture(scope="module")
def db(pg_cluster: PgCluster) -> Iterator[RealDb]:
    yield RealDb(pg_cluster, prefix="keys")


@attrs.define
class Watched:
    ghost: Ghost
    watcher: StateWatcher
    state: Path | str
    refreshes: int = 0

    def other_process(self) -> StateStore:
        """A second connection to the Gate's state database."""
        return StateStore.open(self.state)

    async def refreshed(self) -> None:
        seen = self.refreshes
        await until(lambda: self.refreshes > seen)


async def until(condition: Callable[[], bool]) -> None:
    with trio.fail_after(DEADLINE_S):
        while not condition():  # noqa: ASYNC110 - a condition, polled with a deadline
            await trio.sleep(0.01)


async def start(
    nursery: trio.Nursery,
    db: RealDb,
    tmp_path: Path,
    state: Path | str,
    policy: GateAppConfig | None = None,
) -> Watched:
    ghost = await start_ghost(nursery, db, tmp_path, state=state, policy=policy)
    watcher = StateWatcher(ghost.store, interval_s=0.02)
    watched = Watched(ghost, watcher, state)
    watcher.subscribe("app keys (pg)", ghost.service.refresh_apps)

    async def count() -> None:
        watched.refreshes += 1

    watcher.subscribe("test", count)  # runs after refresh_apps has finished
    await nursery.start(watcher.run)
    return watched


def connect(ghost: Ghost, key: str) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(**ghost.kwargs(password=key), autocommit=True)


async def sleeping(db: RealDb, count: int) -> None:
    """Wait until ``count`` sessions run SLEEP at the real server."""
    sql = (
        "SELECT count(*) FROM pg_stat_activity"
        f" WHERE query = '{SLEEP}' AND state = 'active' AND usename = '{db.name}'"
    )
    with trio.fail_after(DEADLINE_S):
        while int((await in_thread(lambda: db.superuser(sql))).strip() or 0) < count:  # noqa: ASYNC110
            await trio.sleep(0.02)


def stop_sleepers(db: RealDb) -> None:
    """The real server notices a vanished client only when its statement
    ends: end the leftover statements now rather than in 30 s."""
    db.superuser(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        f" WHERE query = '{SLEEP}' AND usename = '{db.name}'"
    )


async def ended_while_sleeping(
    ghost: Ghost, key: str, started: trio.Event, first: str = "SELECT 1"
) -> psycopg.Error:
    """Log in with ``key``, run ``first`` then SLEEP; the error that ended it."""

    def session() -> psycopg.Error:
        with connect(ghost, key) as conn:
            conn.execute(first)
            trio.from_thread.run_sync(started.set)
            try:
                conn.execute(SLEEP)
            except psycopg.Error as exc:
                return exc
        raise AssertionError("the statement finished: the session was not ended")

    return await in_thread(session)


@pytest.mark.parametrize(
    ("pool_mode", "first"),
    [
        ("session", "SELECT 1"),
        ("transaction", "SELECT 1"),  # relayed by the engine
        ("transaction", "LISTEN ch"),  # pinned: relayed by Python
    ],
)
async def test_disabling_an_app_ends_its_live_sessions_with_a_fatal(
    nursery: trio.Nursery,
    db: RealDb,
    tmp_path: Path,
    state_location: Path | str,
    pool_mode: str,
    first: str,
) -> None:
    policy = GateAppConfig(databases=("main",), pool_mode=pool_mode, pool_size=2)
    watched = await start(nursery, db, tmp_path, state_location, policy)
    ghost = watched.ghost
    errors: list[psycopg.Error] = []
    try:
        async with trio.open_nursery() as sessions:
            for _ in range(2):
                started = trio.Event()

                async def one(started: trio.Event = started) -> None:
                    errors.append(await ended_while_sleeping(ghost, ghost.app_key, started, first))

                sessions.start_soon(one)
                await started.wait()
            await sleeping(db, 2)
            with watched.other_process() as other:
                assert other.set_app_disabled(ghost.app_id, True)
    finally:
        await in_thread(lambda: stop_sleepers(db))
    assert len(errors) == 2
    for error in errors:
        assert error.sqlstate == KEY_REVOKED, error
        assert f'app "{ghost.app_id}" was disabled' in str(error)
    assert ghost.service.sessions_ended == 2
    # The server was running them: the audit keeps them, unanswered.
    await ghost.audit_settled()
    records = list_audit(ghost.store, app=ghost.app_id, limit=20)
    assert [(r.statement, r.outcome) for r in records if r.statement == SLEEP] == [
        (SLEEP, "unanswered")
    ] * 2
    # A new login with the right key is refused, saying why …
    with pytest.raises(psycopg.OperationalError) as info:
        await in_thread(lambda: connect(ghost, ghost.app_key).close())
    assert "is disabled" in str(info.value)
    # … until the app is enabled again.
    with watched.other_process() as other:
        assert other.set_app_disabled(ghost.app_id, False)

    def works() -> object:
        with connect(ghost, ghost.app_key) as conn:
            row = conn.execute("SELECT 1").fetchone()
            return None if row is None else row[0]

    assert await in_thread(works) == 1


async def test_rotation_spares_sessions_inside_the_overlap_and_ends_them_without_one(
    nursery: trio.Nursery, db: RealDb, tmp_path: Path, state_location: Path | str
) -> None:
    watched = await start(nursery, db, tmp_path, state_location)
    ghost = watched.ghost
    old_key = ghost.app_key
    errors: list[psycopg.Error] = []
    try:
        async with trio.open_nursery() as sessions:
            started_old = trio.Event()

            async def on_old_key() -> None:
                errors.append(await ended_while_sleeping(ghost, old_key, started_old))

            sessions.start_soon(on_old_key)
            await started_old.wait()
            with watched.other_process() as other:
                new_key, _ = other.rotate_app_key(ghost.app_id, 3600)
            await watched.refreshed()
            # The old key is inside its overlap: its session carries on.
            assert ghost.service.sessions_ended == 0
            started_new = trio.Event()

            async def on_new_key() -> None:
                errors.append(await ended_while_sleeping(ghost, new_key, started_new))

            sessions.start_soon(on_new_key)
            await started_new.wait()
            await sleeping(db, 2)
            assert ghost.service.sessions_ended == 0
            # A leaked key: no overlap. Every previous key stops, and with
            # it every session that logged in with one.
            with watched.other_process() as other:
                newest, _ = other.rotate_app_key(ghost.app_id, 0)
    finally:
        await in_thread(lambda: stop_sleepers(db))
    assert len(errors) == 2
    for error in errors:
        assert error.sqlstate == KEY_REVOKED, error
        assert "was revoked" in str(error)
    for key in (old_key, new_key):
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            await in_thread(lambda key=key: connect(ghost, key).close())  # type: ignore[misc]
    await in_thread(lambda: connect(ghost, newest).close())


async def test_a_session_ends_when_its_keys_overlap_runs_out(
    nursery: trio.Nursery, db: RealDb, tmp_path: Path, state_location: Path | str
) -> None:
    watched = await start(nursery, db, tmp_path, state_location)
    ghost = watched.ghost
    errors: list[psycopg.Error] = []
    try:
        async with trio.open_nursery() as sessions:
            started = trio.Event()

            async def on_old_key() -> None:
                errors.append(await ended_while_sleeping(ghost, ghost.app_key, started))

            sessions.start_soon(on_old_key)
            await started.wait()
            await sleeping(db, 1)
            with watched.other_process() as other:
                other.rotate_app_key(ghost.app_id, 3)
            rotated = time.monotonic()
            await watched.refreshed()
            # Nothing else changes: the end of the overlap alone ends it.
    finally:
        await in_thread(lambda: stop_sleepers(db))
    assert time.monotonic() - rotated >= 2.5  # not before the overlap was over
    (error,) = errors
    assert error.sqlstate == KEY_REVOKED, error
    assert "rotation overlap" in str(error) and "has ended" in str(error)


async def test_a_policy_stored_in_the_state_is_followed_by_new_sessions(
    nursery: trio.Nursery, db: RealDb, tmp_path: Path, state_location: Path | str
) -> None:
    """``qmesh apps policy`` writes the state; the Gate reloads it on the
    change and the next session follows it: it wins over [gate.apps.*] for
    the whole app, and forgetting it gives the config's back."""
    watched = await start(nursery, db, tmp_path, state_location)
    ghost = watched.ghost
    assert ghost.service.policies.source(ghost.app_id) == "config"

    async def store_policy(policy: GateAppConfig | None) -> None:
        """Write it as another process would, and wait until the Gate has
        reloaded it (the watcher may do so before the write call returns)."""

        def write() -> None:
            with watched.other_process() as other:
                if policy is not None:
                    other.set_app_policy(ghost.app_id, policy_to_json(policy))
                else:
                    assert other.clear_app_policy(ghost.app_id)

        await in_thread(write)
        expected = policy if policy is not None else ghost.service.config.gate.apps[ghost.app_id]
        await until(lambda: ghost.service.policies.settings(ghost.app_id) == expected)

    def query(sql: str) -> object:
        with connect(ghost, ghost.app_key) as conn:
            row = conn.execute(sql).fetchone()
            return None if row is None else row[0]

    await store_policy(GateAppConfig(databases=("other-*",)))
    refused = f'may not use database alias "{ghost.alias}"'
    with pytest.raises(psycopg.OperationalError, match=refused):
        await in_thread(lambda: query("SELECT 1"))

    await store_policy(GateAppConfig(databases=(ghost.alias,), read_only=True))
    assert ghost.service.policies.source(ghost.app_id) == "state"
    assert await in_thread(lambda: query("SHOW default_transaction_read_only")) == "on"
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        await in_thread(lambda: query("CREATE TABLE policy_probe (x int)"))

    await store_policy(None)  # forget it: [gate.apps.APP] again
    assert ghost.service.policies.source(ghost.app_id) == "config"
    assert await in_thread(lambda: query("SHOW default_transaction_read_only")) == "off"


async def test_an_operator_key_opens_no_session_and_a_demoted_app_loses_its_own(
    nursery: trio.Nursery, db: RealDb, tmp_path: Path, state_location: Path | str
) -> None:
    """Operator keys are for the Gate's operator surface: a viewer's proves
    itself and is still refused, saying why; an app made an operator while
    its session runs loses it with a FATAL."""
    watched = await start(nursery, db, tmp_path, state_location)
    ghost = watched.ghost
    with watched.other_process() as other:
        viewer_key = other.add_app("on-call", role="viewer")
    with pytest.raises(psycopg.OperationalError, match="is an operator key"):
        await in_thread(
            lambda: psycopg.connect(**ghost.kwargs(user="on-call", password=viewer_key)).close()
        )
    started = trio.Event()
    errors: list[psycopg.Error] = []

    async def session() -> None:
        errors.append(await ended_while_sleeping(ghost, ghost.app_key, started))

    try:
        async with trio.open_nursery() as sessions:
            sessions.start_soon(session)
            await started.wait()
            await sleeping(db, 1)
            with watched.other_process() as other:
                assert other.set_app_role(ghost.app_id, "viewer")
    finally:
        await in_thread(lambda: stop_sleepers(db))
    assert errors and errors[0].sqlstate == KEY_REVOKED, errors
    assert "became an operator key" in str(errors[0])
