"""The ghost wire under a broken network and a curious edge: Postgres
sessions survive tunnel resets without an error at the client, and the real
password never crosses the tunnel, never reaches a log line and never
appears in an error the client can read."""

from __future__ import annotations

import base64
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import trio
from faultproxy import FaultProxy, Faults
from pgcluster import PgCluster
from pgkit import Ghost, RealDb, in_thread, start_ghost
from testca import make_ca_and_server
from tunnelkit import Gate

from qmesh.pg.edge import tls_config


@pytest.fixture(scope="module")
def db(pg_cluster: PgCluster) -> Iterator[RealDb]:
    yield RealDb(pg_cluster, "faults")


async def test_session_survives_tunnel_resets(
    nursery: trio.Nursery, db: RealDb, tmp_path: Path
) -> None:
    proxies: list[FaultProxy] = []

    async def through_proxy(gate: Gate) -> int:
        proxy = FaultProxy(("127.0.0.1", gate.port), Faults(reset_every=400_000, seed=7))
        proxies.append(proxy)
        port: int = await nursery.start(proxy.serve)
        return port

    ghost = await start_ghost(nursery, db, tmp_path, edge_port=through_proxy)
    blob = os.urandom(3 * 1024 * 1024)

    def work() -> None:
        with psycopg.connect(**ghost.kwargs(), autocommit=True) as conn:
            conn.execute("CREATE TEMP TABLE j (i int, b bytea)")
            for round_ in range(3):
                conn.execute("INSERT INTO j VALUES (%s, %s)", (round_, blob))
                row = conn.execute("SELECT b FROM j WHERE i = %s", (round_,)).fetchone()
                assert row is not None and row[0] == blob
                for i in range(50):
                    assert conn.execute("SELECT %s::int + 1", (i,)).fetchone() == (i + 1,)
            with conn.cursor() as cur, cur.copy("COPY (SELECT i, b FROM j) TO STDOUT") as copy:
                assert sum(1 for _ in copy.rows()) == 3

    with trio.fail_after(120):
        await in_thread(work)
    assert proxies[0].resets >= 3, proxies[0].resets
    assert ghost.edge.resumptions >= 3 and ghost.edge.sessions_lost == 0


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
async def test_a_lost_gate_session_ends_postgres_clients_with_08006(
    nursery: trio.Nursery, db: RealDb, tmp_path: Path, tls: bool
) -> None:
    """When the session with the Gate is lost for good (here the Gate ends
    it; a dead Gate that no other could stand in for looks the same to the
    edge), a running statement and an idle client's next one both fail
    with SQLSTATE 08006, as when a PostgreSQL server shuts down, and the
    next connection works; for a TLS client too (the engine writes the
    error through the session's TLS layer)."""
    context, sslmode = None, "disable"
    if tls:
        _, cert, key = make_ca_and_server(tmp_path, "edge")
        context, sslmode = tls_config(cert, key), "require"
    ghost = await start_ghost(nursery, db, tmp_path, tls=context)
    kwargs = ghost.kwargs(sslmode=sslmode, autocommit=True)
    marker = f"lost-gate-{tls}"

    def connect() -> psycopg.Connection[tuple[object, ...]]:
        conn = psycopg.connect(**kwargs)
        assert conn.execute("SELECT 1").fetchone() == (1,)
        return conn

    def failure(conn: psycopg.Connection[tuple[object, ...]], sql: str) -> psycopg.Error:
        with pytest.raises(psycopg.OperationalError) as caught:
            conn.execute(sql.encode())
        return caught.value

    def running() -> bool:
        return "1" in db.superuser(
            "SELECT count(*) FROM pg_stat_activity"
            f" WHERE state = 'active' AND query LIKE '%{marker}%' AND pid <> pg_backend_pid()"
        )

    idle = await in_thread(connect)
    busy = await in_thread(connect)
    errors: dict[str, psycopg.Error] = {}

    async def run_busy() -> None:
        sql = f"SELECT pg_sleep(5) -- {marker}"
        errors["busy"] = await in_thread(lambda: failure(busy, sql))

    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as running_statement:
                running_statement.start_soon(run_busy)
                while not await in_thread(running):  # noqa: ASYNC110 - the server, polled
                    await trio.sleep(0.02)
                assert ghost.gate.server.end_sessions_of("edge-pg", "the gate is going away") == 1
            errors["idle"] = await in_thread(lambda: failure(idle, "SELECT 1"))
            for which, error in errors.items():
                assert error.sqlstate == "08006", (which, error)
                assert "qmesh: the connection to the gate was lost" in str(error), which
            again = await in_thread(connect)
            again.close()
    finally:
        idle.close()
        busy.close()


class CaptureProxy:
    """Relays edge ⇄ Gate bytes unchanged and keeps a copy of both directions."""

    def __init__(self, gate_port: int) -> None:
        self.gate_port = gate_port
        self.captured = bytearray()

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, edge: trio.SocketStream) -> None:
        gate = await trio.open_tcp_stream("127.0.0.1", self.gate_port)

        async def pump(src: trio.SocketStream, dst: trio.SocketStream) -> None:
            try:
                while data := await src.receive_some(65536):
                    self.captured += data
                    await dst.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, edge, gate)
            nursery.start_soon(pump, gate, edge)
        await trio.aclose_forcefully(edge)
        await trio.aclose_forcefully(gate)


def forms(secret: str) -> list[bytes]:
    raw = secret.encode()
    return [raw, raw.hex().encode(), base64.b64encode(raw).rstrip(b"="), raw.upper()]


async def test_real_password_never_reaches_the_client_side(
    nursery: trio.Nursery, db: RealDb, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="qmesh")
    captures: list[CaptureProxy] = []

    async def capture(gate: Gate) -> int:
        proxy = CaptureProxy(gate.port)
        captures.append(proxy)
        port: int = await nursery.start(proxy.serve)
        return port

    ghost: Ghost = await start_ghost(nursery, db, tmp_path, edge_port=capture)
    errors: list[str] = []

    def work() -> None:
        with psycopg.connect(**ghost.kwargs(), autocommit=True) as conn:
            conn.execute("SELECT current_user, current_database()").fetchone()
            for sql in (
                "SELECT * FROM pg_authid",
                "SELECT 1/0",
                "ALTER ROLE CURRENT_USER NOSUPERUSER",
            ):
                try:
                    conn.execute(sql)
                except psycopg.Error as exc:
                    errors.append(str(exc))
        for kwargs in ({"password": "wrong"}, {"dbname": "elsewhere"}):
            try:
                psycopg.connect(**ghost.kwargs(**kwargs))
            except psycopg.Error as exc:
                errors.append(str(exc))

    with trio.fail_after(60):
        await in_thread(work)
        # A login the real server refuses (its password changed behind the vault).
        db.superuser(f"ALTER ROLE {db.name} PASSWORD 'temporarily-different'")
        try:
            await in_thread(lambda: psycopg.connect(**ghost.kwargs()))
        except psycopg.Error as exc:
            errors.append(str(exc))
        finally:
            db.superuser(f"ALTER ROLE {db.name} PASSWORD '{db.password}'")

    assert len(errors) == 6, errors
    captured = bytes(captures[0].captured)
    assert len(captured) > 1000
    logs = "\n".join(r.getMessage() for r in caplog.records)
    for form in forms(db.password):
        assert form not in captured
        assert form.decode() not in logs
        assert all(form.decode() not in e for e in errors)
    # The tunnel is sealed: not even the SQL text crosses it in clear.
    assert b"current_database" not in captured
