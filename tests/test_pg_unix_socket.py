"""Unix-domain sockets at both ends of the ghost wire.

The MiniGate's Postgres port (``minigate.pg_unix_socket_dir``): real clients
(psql, psycopg, asyncpg) connect with ``host=DIR``, as to PostgreSQL's own
socket, and get the same sessions as on the TCP port: SCRAM login with the
app key, native relay, prepared statements, cancel.

The Gate's way to the server (a vault DSN whose host is a directory, as
libpq reads it): sessions, a transaction pool and a cancel reach the real
server through its socket, which the server itself confirms
(``inet_client_addr()`` is NULL only on a socket)."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psycopg
import pytest
import trio
from pgcluster import PgCluster
from pgkit import Ghost, RealDb, cancel_a_sleep, in_asyncio, in_thread, run, start_ghost
from tunnelkit import until

from qmesh.config import GateAppConfig
from qmesh.pg.dsn import unix_socket_path


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

    async def work() -> list[int]:
        conn = await asyncpg.connect(**ghost.asyncpg_kwargs(host=str(sockets)))
        try:
            statement = await conn.prepare("SELECT $1::int * 2")
            return [await statement.fetchval(n) for n in range(5)]
        finally:
            await conn.close()

    with trio.fail_after(30):
        assert await in_asyncio(work) == [0, 2, 4, 6, 8]
    await cancel_through(ghost, host=str(sockets))


def socket_dsn(db: RealDb) -> str:
    """The vault's DSN for ``db`` through the server's own socket."""
    cluster = db.cluster
    return (
        f"host={cluster.run_dir} port={cluster.port} user={db.name} "
        f"password={db.password} dbname={db.name}"
    )


async def test_the_gate_reaches_the_server_through_its_socket(
    nursery: trio.Nursery, db: RealDb, tmp_path: Path
) -> None:
    ghost = await start_ghost(nursery, db, tmp_path, vault_dsn=socket_dsn(db))
    await ghost.edge.wait_connected()
    (gate_session,) = ghost.gate.server.sessions.values()

    def work() -> tuple[object, int, list[int]]:
        with psycopg.connect(**ghost.kwargs(), autocommit=True) as conn:
            (client_address,) = conn.execute("SELECT inet_client_addr()").fetchone() or (0,)
            native = trio.from_thread.run_sync(lambda: gate_session.native_streams)
            doubled = [
                (conn.execute("SELECT %s::int * 2", (i,)).fetchone() or (0,))[0] for i in range(50)
            ]
            return client_address, native, doubled

    with trio.fail_after(60):
        client_address, native, doubled = await in_thread(work)
    assert client_address is None, "the Gate reached the server over TCP"
    assert native == 1, "the session left the engine"
    assert doubled == [i * 2 for i in range(50)]
    await until(lambda: gate_session.native_streams == 0)
    await cancel_through(ghost)


async def cancel_through(ghost: Ghost, **overrides: str) -> None:
    """A query cancelled by asyncpg: the CancelRequest reaches the server
    the way the session's connection did (on the MiniGate's socket with a
    socket ``host`` in ``overrides``)."""
    forwarded = ghost.service.cancel_keys.forwarded
    assert await cancel_a_sleep(ghost, **overrides) == 42
    assert ghost.service.cancel_keys.forwarded == forwarded + 1


async def test_a_transaction_pool_on_the_servers_socket(
    nursery: trio.Nursery, db: RealDb, tmp_path: Path
) -> None:
    """Two clients take turns on the pool's one server connection, opened
    through the socket; a cancel finds it there too."""
    policy = GateAppConfig(databases=("main",), pool_mode="transaction", pool_size=1)
    ghost = await start_ghost(nursery, db, tmp_path, policy=policy, vault_dsn=socket_dsn(db))

    def work() -> tuple[set[object], set[int]]:
        addresses: set[object] = set()
        backends: set[int] = set()
        with (
            psycopg.connect(**ghost.kwargs(), autocommit=True) as first,
            psycopg.connect(**ghost.kwargs(), autocommit=True) as second,
        ):
            for i in range(20):
                conn = (first, second)[i % 2]
                address, backend = conn.execute(
                    "SELECT inet_client_addr(), pg_backend_pid()"
                ).fetchone() or (0, 0)
                addresses.add(address)
                backends.add(backend)
        return addresses, backends

    with trio.fail_after(60):
        addresses, backends = await in_thread(work)
    assert addresses == {None}, "a pooled connection went over TCP"
    assert len(backends) == 1, "the pool of one opened more than one connection"
    await cancel_through(ghost)
