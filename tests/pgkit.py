"""Building blocks for ghost-wire tests: a real role and database on the test
cluster, a Gate with a vault, policy and audit log, and a MiniGate Postgres
listener, all in one Trio loop over real loopback sockets.

The client libraries (psql, pgbench, psycopg, asyncpg) are real too; the
synchronous and asyncio ones run in worker threads against the Trio-served
port, the command-line ones as subprocesses.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import struct
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import attrs
import pytest
import trio
from pgcluster import PgCluster
from statekit import close_after_the_test
from tunnelkit import Gate, fast_settings, start_edge, start_gate, until

from qmesh import _core
from qmesh.config import Config, GateAppConfig, GateConfig, TunnelConfig
from qmesh.pg.audit import AuditLog
from qmesh.pg.edge import serve_pg
from qmesh.pg.scram import ScramClient
from qmesh.pg.service import PgService
from qmesh.pg.vault import Vault
from qmesh.pg.watch import SessionWatch
from qmesh.state import StateStore
from qmesh.tunnel import TunnelClient

T = TypeVar("T")
MASTER_KEY = bytes(range(32))


class RealDb:
    """A login role with its own database on the shared cluster; the
    "real credentials" that only the Gate's vault holds."""

    def __init__(self, cluster: PgCluster, prefix: str = "ghost") -> None:
        self.cluster = cluster
        self.name = f"{prefix}_{secrets.token_hex(4)}"
        self.password = "real-" + secrets.token_urlsafe(18)
        cluster.psql(f"CREATE ROLE {self.name} LOGIN PASSWORD '{self.password}'")
        cluster.psql(f"CREATE DATABASE {self.name} OWNER {self.name}")

    def dsn(self, sslmode: str = "disable", **extra: str) -> str:
        query = "&".join([f"sslmode={sslmode}", *(f"{k}={v}" for k, v in extra.items())])
        return f"{self.cluster.dsn_for(self.name, self.password, self.name)}?{query}"

    def superuser(self, sql: str) -> str:
        """Run SQL as the cluster's superuser in this database (directly)."""
        return self.cluster.psql(
            sql, dsn=self.cluster.dsn_for("postgres", self.cluster.password, self.name)
        )


@attrs.define
class Ghost:
    """A Gate and a MiniGate carrying Postgres sessions to one real database."""

    db: RealDb
    store: StateStore
    vault: Vault
    service: PgService
    gate: Gate
    edge: TunnelClient
    port: int
    app_id: str
    app_key: str
    alias: str

    def dsn(
        self,
        *,
        key: str | None = None,
        alias: str | None = None,
        app_id: str | None = None,
        sslmode: str = "disable",
        **extra: str,
    ) -> str:
        query = "&".join([f"sslmode={sslmode}", *(f"{k}={v}" for k, v in extra.items())])
        return (
            f"postgresql://{app_id or self.app_id}:{key or self.app_key}@127.0.0.1:{self.port}/"
            f"{alias or self.alias}?{query}"
        )

    def kwargs(self, **overrides: Any) -> dict[str, Any]:
        """Connection keywords for psycopg/asyncpg."""
        values: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": self.port,
            "user": self.app_id,
            "password": self.app_key,
            "dbname": self.alias,
        }
        values.update(overrides)
        return values

    async def audit_settled(self) -> None:
        """Wait until every session has ended at the Gate, then flush the
        audit: a native relay hands its audit records over in batches, the
        last when the session ends."""
        with trio.fail_after(10):
            await until(lambda: not self.service.active)
        await self.service.audit.flush()

    def asyncpg_kwargs(self, **overrides: Any) -> dict[str, Any]:
        values = self.kwargs()
        values["database"] = values.pop("dbname")
        values.update(overrides)
        return values


def app_policy(**values: Any) -> GateAppConfig:
    return GateAppConfig(**values)


async def start_ghost(
    nursery: trio.Nursery,
    db: RealDb,
    tmp_path: Path,
    *,
    policy: GateAppConfig | None = None,
    alias: str = "main",
    vault_dsn: str | None = None,
    settings: TunnelConfig | None = None,
    edge_port: Callable[[Gate], Awaitable[int]] | None = None,
    tls: _core.TlsServerConfig | None = None,
    audit: AuditLog | None = None,
    state: Path | str | None = None,
    unix_socket_dir: Path | None = None,
) -> Ghost:
    """Everything in ``nursery``. ``edge_port`` may put a proxy between the
    MiniGate and the Gate: it gets the Gate and returns the port to dial.
    ``state``: where the Gate's state lives (default: a SQLite file).
    ``unix_socket_dir``: the MiniGate listens on a Unix-domain socket there
    too (mode 0o700)."""
    store = StateStore.open(state or tmp_path / f"state-{secrets.token_hex(3)}.db")
    close_after_the_test(store)
    app_id = f"app-{secrets.token_hex(3)}"
    app_key = store.add_app(app_id)
    vault = Vault.open(store, MASTER_KEY)
    vault.set(alias, vault_dsn or db.dsn())
    config = attrs.evolve(
        Config(),
        gate=attrs.evolve(GateConfig(), apps={app_id: policy or GateAppConfig(databases=(alias,))}),
    )
    service = PgService(config, store, vault=vault, audit=audit or AuditLog(store))
    await nursery.start(service.run)
    settings = settings or fast_settings()
    gate = await start_gate(
        nursery, services={"pg": service.serve, "pg-cancel": service.cancel}, settings=settings
    )
    port = await edge_port(gate) if edge_port is not None else None
    edge = await start_edge(nursery, gate, "edge-pg", port=port, settings=settings)
    pg_port = await nursery.start(
        lambda task_status: serve_pg(
            edge,
            "127.0.0.1:0",
            tls=tls,
            unix_socket_dir=unix_socket_dir,
            unix_socket_mode=0o700,
            task_status=task_status,
        )
    )
    return Ghost(db, store, vault, service, gate, edge, pg_port, app_id, app_key, alias)


async def pooled_ghost(
    nursery: trio.Nursery,
    db: RealDb,
    tmp_path: Path,
    size: int = 1,
    wait_ms: int = 10_000,
    *,
    read_only: bool = False,
) -> Ghost:
    """A Gate and an edge whose app is in transaction mode."""
    policy = GateAppConfig(
        databases=("main",),
        pool_mode="transaction",
        pool_size=size,
        pool_wait_ms=wait_ms,
        read_only=read_only,
    )
    return await start_ghost(nursery, db, tmp_path, policy=policy)


def server_messages_seen_by_python(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The kinds of the server messages Python's session watch is shown
    from now on (the engine relays and checks the rest itself)."""
    seen: list[int] = []
    backend = SessionWatch.backend

    def watched(self: SessionWatch, tag: int, raw: bytes, now: float) -> None:
        seen.append(tag)
        backend(self, tag, raw, now)

    monkeypatch.setattr(SessionWatch, "backend", watched)
    return seen


async def in_thread(fn: Callable[[], T]) -> T:
    """Run a blocking client (psycopg) in a worker thread. Cancelled (a
    test's deadline), the thread is left to itself: a client that hangs
    fails its test instead of holding the whole run."""
    return await trio.to_thread.run_sync(fn, abandon_on_cancel=True)


async def in_asyncio(fn: Callable[[], Awaitable[T]]) -> T:
    """Run an asyncio client (asyncpg) on its own loop in a worker thread
    (left to itself when cancelled, as :func:`in_thread`)."""
    return await trio.to_thread.run_sync(
        lambda: asyncio.run(fn()),  # type: ignore[arg-type]
        abandon_on_cancel=True,
    )


async def cancel_a_sleep(ghost: Ghost, **overrides: Any) -> int:
    """asyncpg runs ``pg_sleep(60)`` through ``ghost`` and gives up after
    0.5 s, which sends a CancelRequest on a connection of its own; then the
    same session answers ``SELECT 41 + 1``. Returns that answer. Raises
    ``trio.TooSlowError`` if the sleep was not cancelled within 30 s.
    ``overrides``: asyncpg's connection keywords (a socket's ``host``)."""
    import asyncpg

    async def work() -> int:
        conn = await asyncpg.connect(**ghost.asyncpg_kwargs(**overrides))
        try:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(conn.fetchval("SELECT pg_sleep(60)"), timeout=0.5)
            value: int = await conn.fetchval("SELECT 41 + 1")
        finally:
            await conn.close()
        return value

    with trio.fail_after(30):
        return await in_asyncio(work)


async def run(
    command: Sequence[str], *, stdin: bytes = b"", env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    """A subprocess (psql, pgbench) with its output."""
    import os

    result = await trio.run_process(
        list(command),
        stdin=stdin,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env={**os.environ, **(env or {})},
    )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


# -- a raw protocol client, for bad input -------------------------------------------


class RawClient:
    """A Postgres client written with qmesh's own encoder and SCRAM client,
    over a blocking socket: it can send exactly the bytes a test wants."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buffer = b""

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_exactly(self, n: int) -> bytes:
        while len(self.buffer) < n:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("server closed the connection")
            self.buffer += data
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    def message(self) -> tuple[str, bytes]:
        header = self.read_exactly(5)
        (length,) = struct.unpack(">I", header[1:])
        return chr(header[0]), self.read_exactly(length - 4)

    def closed(self) -> bool:
        """True once the server has closed (EOF); reads what is pending."""
        try:
            while True:
                self.message()
        except (EOFError, ConnectionError):
            return True
        except TimeoutError:
            return False

    def login(
        self, user: str, password: str, database: str, params: Sequence[tuple[str, str]] = ()
    ) -> None:
        self.send(_core.encode_startup([("user", user), ("database", database), *params]))
        tag, body = self.message()
        assert tag == "R" and _core.parse_sasl_mechanisms(body) == ["SCRAM-SHA-256"]
        scram = ScramClient(password)
        self.send(_core.encode_sasl_initial_response("SCRAM-SHA-256", scram.client_first()))
        tag, body = self.message()
        code, data = _core.parse_authentication(body)
        assert tag == "R" and code == 11, (tag, body)
        self.send(_core.encode_message(ord("p"), scram.client_final(data)))
        while True:
            tag, body = self.message()
            if tag == "E":
                raise RuntimeError(_core.parse_error_fields(body))
            if tag == "R" and _core.parse_authentication(body)[0] == 12:
                scram.verify_server_final(_core.parse_authentication(body)[1])
            if tag == "Z":
                return

    def query(self, sql: str) -> list[tuple[str, bytes]]:
        self.send(_core.encode_query(sql))
        return self.until_ready()

    def until_ready(self) -> list[tuple[str, bytes]]:
        """Every message up to and with the next ReadyForQuery."""
        out = []
        while True:
            tag, body = self.message()
            out.append((tag, body))
            if tag == "Z":
                return out

    def error(self) -> dict[str, str]:
        """The next ErrorResponse's fields (skipping other messages)."""
        while True:
            tag, body = self.message()
            if tag == "E":
                return _core.parse_error_fields(body)
