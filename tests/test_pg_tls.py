"""TLS on both hops of the ghost wire: the app ⇄ MiniGate (SSLRequest and
direct TLS with ALPN), and the Gate ⇄ real server per the vault's sslmode
(require, verify-full with sslrootcert; a wrong CA is refused)."""

from __future__ import annotations

import functools
import hashlib
import os
import pwd
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import psycopg
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pgcluster import PgCluster
from pgkit import RealDb, in_thread, run, start_ghost
from testca import make_ca_and_server
from tunnelkit import until

from qmesh import _core
from qmesh.config import GateAppConfig
from qmesh.pg import login as gate_login
from qmesh.pg.edge import tls_config
from qmesh.pg.scram import ScramClient, tls_server_end_point
from qmesh.pg.server_tls import _trust
from qmesh.pg.vault import DatabaseSecret


@pytest.fixture(scope="module")
def db(pg_cluster: PgCluster) -> Iterator[RealDb]:
    yield RealDb(pg_cluster, "tls")


@pytest.fixture(scope="module")
def server_tls(pg_cluster: PgCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """TLS on the shared cluster for this module; returns the CA file."""
    ca, cert, key = make_ca_and_server(tmp_path_factory.mktemp("server-tls"), "server")
    data = pg_cluster.data
    for source, name in ((cert, "qmesh-test.crt"), (key, "qmesh-test.key")):
        target = data / name
        target.write_bytes(source.read_bytes())
        target.chmod(0o600)
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(target, user.pw_uid, user.pw_gid)
    pg_cluster.psql("ALTER SYSTEM SET ssl_cert_file = 'qmesh-test.crt'")
    pg_cluster.psql("ALTER SYSTEM SET ssl_key_file = 'qmesh-test.key'")
    pg_cluster.psql("ALTER SYSTEM SET ssl = on")
    pg_cluster.psql("SELECT pg_reload_conf()")
    try:
        yield ca
    finally:
        for setting in ("ssl", "ssl_cert_file", "ssl_key_file"):
            pg_cluster.psql(f"ALTER SYSTEM RESET {setting}")
        pg_cluster.psql("SELECT pg_reload_conf()")


def test_a_trust_is_loaded_once_per_file_and_again_once_the_file_changes(tmp_path: Path) -> None:
    ca, _, _ = make_ca_and_server(tmp_path / "ca", "server")
    bundle = tmp_path / "roots.pem"
    bundle.write_bytes(ca.read_bytes())
    first = _trust("full", str(bundle))
    assert _trust("full", str(bundle)) is first, "a login parsed the bundle again"
    assert _trust("ca", str(bundle)) is not first  # another verification
    # A rotated bundle is read on the next login, without a restart.
    other, _, _ = make_ca_and_server(tmp_path / "other", "server")
    bundle.write_bytes(other.read_bytes())
    modified = bundle.stat().st_mtime_ns + 1_000_000_000  # whatever the clock's grain
    os.utime(bundle, ns=(modified, modified))
    assert _trust("full", str(bundle)) is not first
    # Verifying nothing needs no bundle.
    assert _trust("none", None) is _trust("none", str(bundle))
    with pytest.raises(FileNotFoundError):
        _trust("full", str(tmp_path / "missing.pem"))


async def test_minigate_tls_for_the_app(nursery: trio.Nursery, db: RealDb, tmp_path: Path) -> None:
    ca, cert, key = make_ca_and_server(tmp_path / "edge", "edge")
    ghost = await start_ghost(nursery, db, tmp_path, tls=tls_config(cert, key))
    await ghost.edge.wait_connected()
    edge_session = ghost.edge.session
    assert edge_session is not None
    blob = os.urandom(2 * 1024 * 1024)

    def work() -> tuple[bool, bool, int]:
        with psycopg.connect(
            **ghost.kwargs(host="localhost"), sslmode="verify-full", sslrootcert=str(ca)
        ) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
            verified = conn.pgconn.ssl_in_use
        with psycopg.connect(**ghost.kwargs(), sslmode="require") as conn:
            assert conn.execute("SELECT 2").fetchone() == (2,)
            required = conn.pgconn.ssl_in_use
            # The TLS session is relayed by the MiniGate's engine, large
            # values both ways included.
            native = trio.from_thread.run_sync(lambda: edge_session.native_streams)
            assert conn.execute("SELECT %s::bytea", (blob,)).fetchone() == (blob,)
        return verified, required, native

    with trio.fail_after(30):
        assert await in_thread(work) == (True, True, 1)
        code, out, err = await run(["psql", ghost.dsn(sslmode="require"), "-X", "-c", "\\conninfo"])
    assert code == 0, err
    assert "SSL connection (protocol: TLSv1.3" in out


async def test_bytes_pipelined_behind_the_startup_over_tls_reach_the_gate(
    nursery: trio.Nursery, db: RealDb, tmp_path: Path
) -> None:
    """A TLS client that sends 30 KB behind its StartupMessage, in one burst,
    before any answer: the bytes decrypted with the startup packet go to the
    Gate ahead of the engine's relay, and the Gate judges them (a Query
    where the SCRAM exchange should be is a protocol violation): the client
    reads the Gate's answer and an ErrorResponse, not a dropped connection."""
    _, cert, key = make_ca_and_server(tmp_path / "edge", "edge")
    ghost = await start_ghost(nursery, db, tmp_path, tls=tls_config(cert, key))

    def work() -> bytes:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        with socket.create_connection(("127.0.0.1", ghost.port), timeout=20) as raw:
            raw.sendall(_core.PG_SSL_REQUEST)
            assert raw.recv(1) == b"S"
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                startup = _core.encode_startup([("user", ghost.app_id), ("database", "main")])
                tls.sendall(startup + _core.encode_query("SELECT 1") * 2000)
                received = b""
                while chunk := tls.recv(65536):
                    received += chunk
                return received

    with trio.fail_after(30):
        answer = await in_thread(work)
    assert answer[:1] == b"R", answer[:64]  # the Gate's AuthenticationSASL
    assert b"E" in answer and b"C08P01" in answer, answer


async def test_direct_tls_needs_the_postgresql_alpn(
    nursery: trio.Nursery, db: RealDb, tmp_path: Path
) -> None:
    ca, cert, key = make_ca_and_server(tmp_path / "edge", "edge")
    ghost = await start_ghost(nursery, db, tmp_path, tls=tls_config(cert, key))

    def hello(alpn: list[str]) -> bytes:
        context = ssl.create_default_context(cafile=str(ca))
        context.set_alpn_protocols(alpn)
        with socket.create_connection(("127.0.0.1", ghost.port), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(_core.encode_startup([("user", ghost.app_id), ("database", "main")]))
                return tls.recv(1)

    assert await in_thread(lambda: hello(["postgresql"])) == b"R"  # AuthenticationSASL
    assert await in_thread(lambda: hello(["http/1.1", "postgresql"])) == b"R"
    with pytest.raises(ssl.SSLError):  # no common ALPN protocol: the handshake fails
        await in_thread(lambda: hello(["http/1.1"]))


async def test_gate_to_server_tls_by_sslmode(
    nursery: trio.Nursery, db: RealDb, tmp_path: Path, server_tls: Path
) -> None:
    def ssl_used(ghost_kwargs: dict[str, object]) -> bool:
        with psycopg.connect(**ghost_kwargs) as conn:  # type: ignore[arg-type]
            row = conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            value = row.fetchone()
            assert value is not None
            return bool(value[0])

    cases = {
        "disable": db.dsn("disable"),
        "require": db.dsn("require"),
        "verify-full": db.dsn("verify-full", sslrootcert=str(server_tls)),
        "verify-ca": db.dsn("verify-ca", sslrootcert=str(server_tls)),
    }
    for mode, dsn in cases.items():
        ghost = await start_ghost(nursery, db, tmp_path, vault_dsn=dsn)
        with trio.fail_after(30):
            used = await in_thread(functools.partial(ssl_used, ghost.kwargs()))
            assert used == (mode != "disable")

    # verify-full against a CA that did not sign the server's certificate.
    other_ca, _, _ = make_ca_and_server(tmp_path / "other", "other")
    ghost = await start_ghost(
        nursery, db, tmp_path, vault_dsn=db.dsn("verify-full", sslrootcert=str(other_ca))
    )
    with pytest.raises(psycopg.OperationalError, match="TLS to the server of database alias"):
        await in_thread(lambda: ssl_used(ghost.kwargs()))


async def test_tls_to_the_server_is_relayed_in_the_engine(
    nursery: trio.Nursery, db: RealDb, tmp_path: Path, server_tls: Path
) -> None:
    """Over TLS to the server the session is still relayed natively: the
    engine reads and writes the TLS records itself. Large values both ways
    (records split across many socket reads and writes), COPY out, a run
    of small queries, and the session's data intact."""
    dsn = db.dsn("verify-full", sslrootcert=str(server_tls))
    ghost = await start_ghost(nursery, db, tmp_path, vault_dsn=dsn)
    await ghost.edge.wait_connected()
    (gate_session,) = ghost.gate.server.sessions.values()
    blob = os.urandom(3 * 1024 * 1024 + 7)

    def work() -> tuple[object, int, list[bytes], int]:
        with psycopg.connect(**ghost.kwargs(), autocommit=True) as conn:
            row = conn.execute("SELECT version FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            version = row.fetchone()
            native = trio.from_thread.run_sync(lambda: gate_session.native_streams)
            conn.execute("CREATE TEMP TABLE blobs (i int, b bytea)")
            for i in range(3):
                conn.execute("INSERT INTO blobs VALUES (%s, %s)", (i, blob))
            values = [r[0] for r in conn.execute("SELECT b FROM blobs ORDER BY i").fetchall()]
            for i in range(200):
                assert conn.execute("SELECT %s::int * 2", (i,)).fetchone() == (i * 2,)
            with conn.cursor() as cur, cur.copy("COPY (SELECT i, b FROM blobs) TO STDOUT") as copy:
                copied = sum(1 for _ in copy.rows())
            return version, native, values, copied

    with trio.fail_after(120):
        version, native, values, copied = await in_thread(work)
    assert version in (("TLSv1.3",), ("TLSv1.2",)), version
    assert native == 1
    assert values == [blob] * 3
    assert copied == 3
    await until(lambda: gate_session.native_streams == 0)


async def test_a_transaction_pool_over_tls_is_lent_by_the_engine(
    nursery: trio.Nursery, db: RealDb, tmp_path: Path, server_tls: Path
) -> None:
    """A transaction-mode pool whose server connections use TLS: the engine
    lends them with their TLS connection, loan by loan, and Python's relay
    uses the same connections between (COPY is Python's), so each TLS
    connection passes between the two many times. Six clients on two
    connections: every answer right, every statement run over TLS."""
    dsn = db.dsn("verify-full", sslrootcert=str(server_tls))
    policy = GateAppConfig(databases=("main",), pool_mode="transaction", pool_size=2)
    ghost = await start_ghost(nursery, db, tmp_path, vault_dsn=dsn, policy=policy)
    await ghost.edge.wait_connected()

    def setup() -> None:
        with psycopg.connect(**ghost.kwargs(), autocommit=True) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS pooled_tls (client int, n int)")
            conn.execute("TRUNCATE pooled_tls")

    def client(i: int, failures: list[BaseException]) -> None:
        try:
            kwargs = {**ghost.kwargs(), "autocommit": True, "prepare_threshold": 0}
            with psycopg.connect(**kwargs) as conn:
                for n in range(10):
                    row = conn.execute(
                        "SELECT ssl, %s::int FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                        (i * 100 + n,),
                    ).fetchone()
                    assert row == (True, i * 100 + n)
                    with conn.transaction():
                        conn.execute("INSERT INTO pooled_tls VALUES (%s, %s)", (i, n))
                    if n % 3 == 0:
                        with (
                            conn.cursor() as cur,
                            cur.copy(
                                "COPY (SELECT n FROM pooled_tls WHERE client = %s) TO STDOUT", (i,)
                            ) as copy,
                        ):
                            assert sum(1 for _ in copy.rows()) == n + 1
        except BaseException as exc:  # the test's thread: reported in the test
            failures.append(exc)

    def work() -> list[BaseException]:
        failures: list[BaseException] = []
        threads = [threading.Thread(target=client, args=(i, failures)) for i in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return failures

    def count() -> object:
        with psycopg.connect(**ghost.kwargs(), autocommit=True) as conn:
            return conn.execute("SELECT count(*) FROM pooled_tls").fetchone()

    await in_thread(setup)
    (before,) = ghost.service.pools.stats()
    with trio.fail_after(90):
        assert await in_thread(work) == []
        assert await in_thread(count) == (60,)
    (pool,) = ghost.service.pools.stats()
    assert pool.engine_loans - before.engine_loans >= 120  # each statement's, at least
    assert pool.open <= 2 and pool.timeouts == 0 and pool.checks_failed == 0


async def test_a_tls_pools_connections_killed_by_the_server_are_replaced_or_end_one_client(
    nursery: trio.Nursery, db: RealDb, tmp_path: Path, server_tls: Path
) -> None:
    """Killed while idle on the pool (their TLS inside the slot), the next
    transaction gets a fresh connection unnoticed; killed while an engine
    holds it inside a transaction, its client gets the server's reason and
    the other clients carry on."""
    dsn = db.dsn("require", sslrootcert=str(server_tls))
    policy = GateAppConfig(databases=("main",), pool_mode="transaction", pool_size=2)
    ghost = await start_ghost(nursery, db, tmp_path, vault_dsn=dsn, policy=policy)

    def kill(where: str) -> None:
        db.superuser(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE {where}")

    def work() -> tuple[int, int, str]:
        simple = {**ghost.kwargs(), "cursor_factory": psycopg.ClientCursor}
        with (
            psycopg.connect(**simple) as victim,
            psycopg.connect(**simple, autocommit=True) as bystander,
        ):
            before = bystander.execute("SELECT pg_backend_pid()").fetchone()
            kill(f"usename = '{db.name}'")  # the pool's, all idle now
            after = bystander.execute("SELECT pg_backend_pid()").fetchone()
            row = victim.execute("SELECT pg_backend_pid()").fetchone()  # holds it: no commit
            assert before is not None and after is not None and row is not None
            kill(f"pid = {row[0]}")
            with pytest.raises(psycopg.OperationalError) as lost:
                victim.execute("SELECT 1")
            ssl = bystander.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            assert ssl.fetchone() == (True,)
            return before[0], after[0], str(lost.value)

    with trio.fail_after(30):
        before, after, message = await in_thread(work)
    assert before != after
    assert "terminating connection due to administrator command" in message
    (pool,) = ghost.service.pools.stats()
    assert pool.engine_loans > 0


async def test_gate_binds_its_scram_login_to_the_tls_channel(
    nursery: trio.Nursery,
    db: RealDb,
    tmp_path: Path,
    server_tls: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mechanisms: list[str] = []

    def recording_client(*args: Any, **kwargs: Any) -> ScramClient:
        client = ScramClient(*args, **kwargs)
        mechanisms.append(client.mechanism)
        return client

    monkeypatch.setattr("qmesh.pg.login.ScramClient", recording_client)

    def select_one(ghost_kwargs: dict[str, Any]) -> object:
        with psycopg.connect(**ghost_kwargs) as conn:
            row = conn.execute("SELECT 1").fetchone()
            return row[0] if row else None

    # The default (prefer) binds over TLS; require insists and works; the
    # server checks the binding data, so a login that passes proves it.
    for extra in ({}, {"channel_binding": "require"}):
        ghost = await start_ghost(nursery, db, tmp_path, vault_dsn=db.dsn("require", **extra))
        with trio.fail_after(30):
            assert await in_thread(functools.partial(select_one, ghost.kwargs())) == 1
    assert mechanisms == ["SCRAM-SHA-256-PLUS"] * 2
    # disable: plain SCRAM over TLS.
    mechanisms.clear()
    ghost = await start_ghost(
        nursery, db, tmp_path, vault_dsn=db.dsn("require", channel_binding="disable")
    )
    with trio.fail_after(30):
        assert await in_thread(functools.partial(select_one, ghost.kwargs())) == 1
    assert mechanisms == ["SCRAM-SHA-256"]

    # A man in the middle shows another certificate: the binding data differs
    # from what the server signs, and the server refuses the login.
    monkeypatch.setattr("qmesh.pg.login.tls_server_end_point", lambda der: b"\x00" * 32)
    ghost = await start_ghost(nursery, db, tmp_path, vault_dsn=db.dsn("require"))
    with trio.fail_after(30), pytest.raises(psycopg.OperationalError) as info:
        await in_thread(functools.partial(select_one, ghost.kwargs()))
    assert "database alias" in str(info.value)


def test_channel_binding_required_without_a_channel_is_refused() -> None:
    secret = DatabaseSecret(
        alias="main", host="h", port=5432, dbname="d", user="u", password="p",
        sslmode="prefer", sslrootcert=None, channel_binding="require",
    )  # fmt: skip
    sasl = (10).to_bytes(4, "big") + b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0"
    plain_only = (10).to_bytes(4, "big") + b"SCRAM-SHA-256\0\0"
    # sslmode=prefer fell back to plain TCP: no channel to bind.
    with pytest.raises(gate_login.UpstreamFailed, match="requires channel binding"):
        gate_login._answer_auth(10, b"", sasl, secret, None, False, "main", None)
    # TLS, but the server does not offer -PLUS.
    with pytest.raises(gate_login.UpstreamFailed, match="requires channel binding"):
        gate_login._answer_auth(10, b"", plain_only, secret, b"x" * 32, True, "main", None)
    # Password methods cannot bind either.
    with pytest.raises(gate_login.UpstreamFailed, match="requires channel binding"):
        gate_login._answer_auth(5, b"salt", b"", secret, b"x" * 32, True, "main", None)
    # prefer over TLS without -PLUS: plain SCRAM, saying "y" (could bind).
    _, client = gate_login._answer_auth(
        10, b"", plain_only, attrs.evolve(secret, channel_binding="prefer"), b"x" * 32, True,
        "main", None,
    )  # fmt: skip
    assert client is not None and not client.bound
    assert client.client_first().startswith(b"y,,")


def test_tls_server_end_point_follows_the_certificate_hash(tmp_path: Path) -> None:
    _, cert_path, _ = make_ca_and_server(tmp_path, "cb")
    der = x509.load_pem_x509_certificate(cert_path.read_bytes()).public_bytes(
        serialization.Encoding.DER
    )
    assert tls_server_end_point(der) == hashlib.sha256(der).digest()  # signed with SHA-256
    with pytest.raises(ValueError):
        tls_server_end_point(b"not a certificate")


def test_minigate_tls_config_needs_both_files(tmp_path: Path) -> None:
    from qmesh.config import ConfigError, load_config

    config = tmp_path / "edge.toml"
    config.write_text('[minigate]\npg_tls_cert = "edge.crt"\n')
    with pytest.raises(ConfigError, match=r"needs minigate\.pg_tls_key too"):
        load_config(config, env={})
    config.write_text('[minigate]\npg_tls_key = "edge.key"\n')
    with pytest.raises(ConfigError, match=r"needs minigate\.pg_tls_cert too"):
        load_config(config, env={})
    config.write_text('[minigate]\npg_tls_cert = "edge.crt"\npg_tls_key = "edge.key"\n')
    loaded = load_config(config, env={}).minigate
    assert loaded.pg_tls_cert == tmp_path / "edge.crt"
    assert loaded.pg_tls_key == tmp_path / "edge.key"
