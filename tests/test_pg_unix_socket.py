"""The MiniGate's Postgres port on a Unix-domain socket
(``minigate.pg_unix_socket_dir``): real clients (psql, psycopg, asyncpg)
connect with ``host=DIR``, as to PostgreSQL's own socket, and get the same
sessions as on the TCP port: SCRAM login with the app key, native relay,
prepared statements, cancel."""

from __future__ import annotations

import asyncio
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psycopg
import pytest
import trio
from pgcluster import PgCluster
from pgkit import RealDb, in_asyncio, in_thread, run, start_ghost
from tunnelkit import until

from qmesh.pg.edge import unix_socket_path


@pytest.fixture(scope="module")
def db(pg_cluster: PgCluster) -> Iterator[RealDb]:
    yield RealDb(pg_cluster, "unixsock")


async def test_clients_log_in_and_work_over_the_unix_socket(
    nursery: trio.Nursery, db: RealDb, tmp_path: Path
) -> None:
    sockets = tmp_path / "run"
    sockets.mkdir()
    ghost = await start_ghost(nursery, db, tmp_path, unix_socket_dir=sockets)
    await ghost.edge.wait_connected()
    edge_session = ghost.edge.session
    assert edge_session is not None
    path = unix_socket_path(sockets, ghost.port)
    assert path == sockets / f".s.PGSQL.{ghost.port}"  # libpq's name for it
    assert stat.S_ISSOCK(path.lstat().st_mode)
    assert stat.S_IMODE(path.lstat().st_mode) == 0o700

    # psql, as to PostgreSQL's own socket: -h names the directory.
    with trio.fail_after(30):
        code, out, err = await run(
            ["psql", "-X", "-A", "-t", "-h", str(sockets), "-p", str(ghost.port),
             "-U", ghost.app_id, "-d", ghost.alias, "-c", "SELECT 'over ' || 'the socket'"],
            env={"PGPASSWORD": ghost.app_key},
        )  # fmt: skip
    assert code == 0, err
    assert out.strip() == "over the socket"

    # psycopg: a wrong key is refused as on the TCP port; the right one's
    # session is relayed by the engine, a large value both ways included.
    blob = bytes(range(256)) * 8192

    def work() -> tuple[str, int, bytes]:
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(**ghost.kwargs(host=str(sockets), password="not-the-key"))
        with psycopg.connect(**ghost.kwargs(host=str(sockets))) as conn:
            native = trio.from_thread.run_sync(lambda: edge_session.native_streams)
            (echoed,) = conn.execute("SELECT %s::bytea", (blob,)).fetchone() or (b"",)
            return conn.info.host, native, echoed

    with trio.fail_after(30):
        host, native, echoed = await in_thread(work)
    assert host == str(sockets)
    assert native == 1
    assert echoed == blob
    await until(lambda: edge_session.native_streams == 0)


async def test_asyncpg_prepares_and_cancels_over_the_unix_socket(
    nursery: trio.Nursery, db: RealDb, tmp_path: Path
) -> None:
    """asyncpg prepares every statement; its cancel opens a second
    connection to the same socket, which the Gate maps to the real key."""
    sockets = tmp_path / "run"
    sockets.mkdir()
    ghost = await start_ghost(nursery, db, tmp_path, unix_socket_dir=sockets)

    async def work() -> tuple[list[int], int]:
        conn = await asyncpg.connect(**ghost.asyncpg_kwargs(host=str(sockets)))
        try:
            statement = await conn.prepare("SELECT $1::int * 2")
            doubled = [await statement.fetchval(n) for n in range(5)]
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(conn.fetchval("SELECT pg_sleep(60)"), timeout=0.5)
            after = await conn.fetchval("SELECT 41 + 1")  # still usable
        finally:
            await conn.close()
        return doubled, after

    with trio.fail_after(30):
        started = time.monotonic()
        doubled, after = await in_asyncio(work)
        assert time.monotonic() - started < 20  # not 60 s: the sleep was cancelled
    assert doubled == [0, 2, 4, 6, 8]
    assert after == 42
    assert ghost.service.cancel_keys.forwarded == 1
