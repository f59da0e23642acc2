#!/usr/bin/env python3
"""Postgres through qmesh against the stacks a user would otherwise build.

One run, one table. On one throwaway PostgreSQL (scripts/pgcluster.py),
pgbench's select-only (``-S``) and default TPC-B-like scripts, with 1 and 16
clients, in the simple and prepared protocols, against:

  (a) direct        pgbench → PostgreSQL, the real credentials
  (b) pgbouncer     pgbench → PgBouncer (holds the real credentials; the
                    client logs in with its own) → PostgreSQL
  (c) stunnel+pgb   pgbench → stunnel (client) ═TLS═ stunnel (server) →
                    PgBouncer → PostgreSQL: an encrypted hop with hidden
                    credentials assembled from Debian packages
  (d) qmesh         pgbench → MiniGate ═sealed tunnel═ Gate → PostgreSQL,
                    `qmesh --role minigate` and `qmesh --role gate` as
                    separate processes, default settings (audit on)
  (e) qmesh-pgstate the same, with the Gate's own state (app keys, vault,
                    audit) in PostgreSQL (`gate.database_url`, a database of
                    its own on the same server) instead of SQLite
  (f) qmesh-guard   qmesh with a statement guard: the benchmark app's policy
                    has statement_timeout_ms = 60000, so its sessions take
                    the guard (guarded messages wait for a verdict from
                    Python); qmesh-guard/qmesh is what the guard costs,
                    measured in the same run (the issue's target: ≥ 0.9×)

With --server-tls the server has TLS on (a throwaway self-signed certificate)
and every hop to it uses it: direct with sslmode=require, PgBouncer (alone and
behind stunnel) with server_tls_sslmode = require, qmesh and qmesh-pgstate with
a vault DSN of sslmode=require; and one more target runs on the same server:

  (g) qmesh-plain   qmesh exactly as without --server-tls (vault DSN
                    sslmode=disable), so that qmesh/qmesh-plain is what TLS
                    to the server costs qmesh, measured in the same run
  (g') direct-plain pgbench → the same server without TLS (sslmode=disable),
                    so that direct/direct-plain is what TLS costs the server
                    and pgbench themselves on this machine's CPUs: the floor
                    under qmesh/qmesh-plain

With --unix two more targets use Unix-domain sockets wherever a hop can be
one, as an application beside its sidecar and a Gate (or PgBouncer) beside
its database would:

  (u) direct-unix   pgbench → PostgreSQL's own socket (-h its directory)
  (u') qmesh-unix   pgbench → the MiniGate's socket (minigate.pg_unix_socket_dir)
                    ═sealed tunnel, TCP═ Gate → PostgreSQL's socket (a vault
                    DSN whose host is its directory)

and the table adds qmesh-unix/direct-unix (each on sockets where it can be)
and qmesh-unix/direct.

Before the first pgbench, a psql through each target checks pg_stat_ssl: TLS
on the server's hop for every target but the plain ones. The issue's targets
(qmesh with server TLS ≥ 0.9× qmesh-plain and ≥ 1.0× stunnel+pgb) are
printed under the table with "met"/"NOT met" per row; so is qmesh-guard's
(≥ 0.9× qmesh), with or without --server-tls. Nothing is asserted.

With --pool transaction the run is about pooling many clients onto few
server connections instead: the server gets max_connections = 50, and

  (h) pgbouncer-txn pgbench → PgBouncer in transaction mode (pool_mode =
                    transaction, default_pool_size = 20, max_client_conn =
                    2000, max_prepared_statements = 200 where PgBouncer has
                    it: 1.21+) → PostgreSQL
  (i) qmesh-txn     pgbench → MiniGate ═sealed tunnel═ Gate → PostgreSQL,
                    the app's policy with pool_mode = "transaction" and
                    pool_size = 20
  (c) direct        for reference, with at most 20 clients (-c 20: the
                    server connections a pool holds, without a pooler; the
                    workloads' 64 and 200 would not fit in max_connections)

run select-only with 64 clients in the simple, extended and prepared
protocols (-M extended: the unnamed statement, as psycopg's and JDBC's
default cursors send it; -M prepared: named prepared statements through the
pool) and with 200 clients
and -C (a new connection per transaction). Each cell has TPS, average latency
and failed transactions (pgbench's count, PG15+; and clients pgbench aborted
on an error); the qmesh-txn/pgbouncer-txn column and the line under the table
hold the issue's target (≥ 1.0×). With --rounds N the pools' cases run N
times, their order turning each round (direct once, first): each cell is the
run of median TPS and each ratio the median [min–max] of the rounds' paired
ratios, which a shared machine's drift moves far less than one run's. Each
pool logs in to the server as a role of
its own (bench_pgbouncer_txn, bench_qmesh_txn; direct is bench), and while
each run goes on a superuser connection of the benchmark's own samples
pg_stat_activity's client backends (itself counted out) every 0.5 s: a second
table has the most the target held at once and the most on the whole server.
Direct's runs go first, then the pools' case by case, so that direct's
clients never meet the pools' idle server connections. A third table has
the CPU time per transaction (user + system, from /proc) of each process
between pgbench and the server (PgBouncer; qmesh's Gate and MiniGate) and of
the whole machine, and the Gate's against PgBouncer's: the Gate is what
stands where PgBouncer stands, beside the server, while the MiniGate runs
on the application's host in a deployment (here it shares the two CPUs).

The "logins" rows run pgbench with -C: a new connection, and so a whole
login through the stack (SCRAM, the vault, the server's authentication),
for every transaction; their TPS is logins per second.

Prints TPS and average latency per cell, and qmesh's TPS ratio to each
(latency: what qmesh adds over direct at -c 1); then a table of the CPU
each transaction cost, per process between pgbench and the server, pgbench's
own, the server's and the whole machine's. On a shared machine one run of a
cell moves by ±15 %: with --rounds N every case runs N times, the targets'
order turning each round, each cell is the run of median TPS and each ratio
the median [min–max] of the rounds' paired ratios (a round pairs the two
targets' runs of a case, minutes apart at most). Needs pgbench, pgbouncer
and stunnel4 (apt-get install pgbouncer stunnel4). Numbers are for the
machine it runs on; the run is never a pass/fail test.

    python bench/pg_compare.py [--duration 5] [--scale 10] [--only qmesh,qmesh-pgstate,direct]
    python bench/pg_compare.py --only direct,qmesh,qmesh-guard
    python bench/pg_compare.py --server-tls --rounds 3 [--only direct,stunnel+pgb,qmesh,qmesh-plain]
    python bench/pg_compare.py --unix --rounds 3 --only direct,qmesh,direct-unix,qmesh-unix
    python bench/pg_compare.py --pool transaction [--only pgbouncer-txn,qmesh-txn] [--rounds 5]
    python bench/pg_compare.py --server-tls --engine-poll-us 200   # engine threads that poll
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import pwd
import re
import resource
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

import benchkit  # noqa: E402
from benchkit import cpu_seconds  # noqa: E402
from pgcluster import PgCluster  # noqa: E402

TARGETS = (
    "direct", "pgbouncer", "stunnel+pgb", "qmesh", "qmesh-pgstate", "qmesh-guard", "qmesh-plain",
    "direct-plain", "direct-unix", "qmesh-unix",
)  # fmt: skip
QMESH_TARGETS = ("qmesh", "qmesh-pgstate", "qmesh-guard", "qmesh-plain", "qmesh-txn", "qmesh-unix")
TLS_ONLY = ("qmesh-plain", "direct-plain")  # targets that run only with --server-tls
UNIX_ONLY = ("direct-unix", "qmesh-unix")  # targets that run only with --unix
# --pool transaction: its targets (direct for reference) and nothing else.
POOL_TARGETS = ("direct", "pgbouncer-txn", "qmesh-txn")
POOL_ONLY = ("pgbouncer-txn", "qmesh-txn")  # targets that run only with --pool
POOL_SIZE = 20  # PgBouncer's default_pool_size, qmesh's pool_size; direct's most clients
POOL_MAX_CONNECTIONS = 50  # the server's max_connections with --pool
POOL_MAX_CLIENT_CONN = 2000  # PgBouncer's max_client_conn
POOL_MAX_PREPARED = 200  # PgBouncer's max_prepared_statements (PgBouncer 1.21+)
# (script, clients, protocol): "logins" is -S with -C, a new connection per transaction.
POOL_CASES = (("select-only", 64, "simple"), ("logins", 200, "simple"),
              ("select-only", 64, "extended"), ("select-only", 64, "prepared"))  # fmt: skip
SAMPLE_EVERY = 0.5  # seconds between two samples of the server's connections
MACHINE = "machine"  # Run.cpu's key for the whole machine's CPU
PGBENCH = "pgbench"  # Run.cpu's key for pgbench's own CPU
# --pool: the process that stands where PgBouncer stands, beside the server.
POOL_CPU_PAIR = (("qmesh-txn", "Gate"), ("pgbouncer-txn", "PgBouncer"))
GUARD_TIMEOUT_MS = 60_000  # qmesh-guard's statement_timeout_ms
APP_USER = "benchapp"
# The targets: (target, baseline, minimum TPS ratio target/baseline).
# --server-tls: qmesh (server TLS) against another target.
TLS_GOALS = (("qmesh", "qmesh-plain", 0.9), ("qmesh", "stunnel+pgb", 1.0))
# Always: qmesh with a statement guard against qmesh.
GUARD_GOALS = (("qmesh-guard", "qmesh", 0.9),)
# --pool transaction: qmesh's transaction pooling against PgBouncer's.
POOL_GOALS = (("qmesh-txn", "pgbouncer-txn", 1.0),)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(port: int, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def give_to_postgres(*paths: Path) -> None:
    """As root, PostgreSQL and PgBouncer run as `postgres`: let it read these."""
    if os.geteuid() != 0:
        return
    user = pwd.getpwnam("postgres")
    for path in paths:
        os.chown(path, user.pw_uid, user.pw_gid)


def self_signed(directory: Path) -> tuple[Path, Path]:
    from qmesh.web.tls import generate_self_signed

    cert_path, key_path = directory / "tls.crt", directory / "tls.key"
    generate_self_signed(cert_path, key_path, valid_for=datetime.timedelta(days=1))
    return cert_path, key_path


def pgbouncer_version() -> tuple[int, int]:
    """(major, minor) of the installed PgBouncer; (0, 0) where it says none."""
    result = subprocess.run(["pgbouncer", "--version"], capture_output=True, text=True)
    found = re.search(r"PgBouncer (\d+)\.(\d+)", result.stdout)
    return (int(found.group(1)), int(found.group(2))) if found else (0, 0)


def log_tail(path: Path, lines: int = 15) -> str:
    """The last lines of a process's log, for an error message."""
    if not path.exists():
        return f"({path.name}: no log)"
    text = path.read_text(errors="replace").splitlines()[-lines:]
    return f"--- {path.name}:\n" + "\n".join(text)


class Stack:
    """Every target's processes, started in ``base`` and stopped together."""

    def __init__(
        self,
        base: Path,
        scale: int,
        audit: str = "text",
        statement_timeout_ms: int = 0,
        server_tls: bool = False,
        pool: str | None = None,
        engine_poll_us: int = 0,
    ) -> None:
        self.base = base
        self.engine_poll_us = engine_poll_us  # both qmesh processes' tunnel.engine_poll_us
        self.server_tls = server_tls
        self.pool = pool  # "transaction": --pool's server and targets
        self.scale = scale
        self.audit = audit
        self.statement_timeout_ms = statement_timeout_ms
        self.processes: list[subprocess.Popen[bytes]] = []
        self.pids: dict[str, int] = {}  # a spawned process's name: its pid
        self.ports: dict[str, int] = {}
        self.hosts: dict[str, str] = {}  # a Unix-domain socket's directory; else 127.0.0.1
        self.real_password = "real-" + secrets.token_urlsafe(16)
        self.app_key = "app-" + secrets.token_urlsafe(16)  # PgBouncer's client password
        self.qmesh_keys: dict[str, str] = {}
        self.pg: PgCluster | None = None
        self.notes: list[str] = []  # what the reader should know, printed under the table

    def spawn(self, name: str, command: list[str], **kwargs: object) -> None:
        log = (self.base / f"{name}.log").open("wb")
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, **kwargs)  # type: ignore[call-overload]
        self.processes.append(process)
        self.pids[name] = process.pid

    def proxies(self, target: str) -> dict[str, int]:
        """The processes a target's transactions cross between pgbench and
        the server, by what they are: their pids."""
        if target in QMESH_TARGETS:
            return {
                "Gate": self.pids[f"{target}-gate"],
                "MiniGate": self.pids[f"{target}-minigate"],
            }
        if target == "stunnel+pgb":
            return {
                "stunnel client": self.pids["stunnel-client"],
                "stunnel server": self.pids["stunnel-server"],
                "PgBouncer": self.pids["pgbouncer"],
            }
        if target in ("pgbouncer", "pgbouncer-txn"):
            return {"PgBouncer": self.pids[target]}
        return {}

    def server_user(self, target: str) -> str:
        """The role a target's server sessions log in as: with --pool, each
        pool a role of its own (a member of bench), so that its backends
        can be told apart in pg_stat_activity."""
        return "bench_" + target.replace("-", "_") if target in POOL_ONLY else "bench"

    def start(self, targets: tuple[str, ...]) -> None:
        self.pg = PgCluster(self.base / "pg").start()
        pg = self.pg
        if self.pool:
            self._max_connections(POOL_MAX_CONNECTIONS)
        if self.server_tls:
            self._server_tls()
        self.ports["direct"] = self.ports["direct-plain"] = self.ports["direct-unix"] = pg.port
        self.hosts["direct-unix"] = str(pg.run_dir)
        pg.psql(f"CREATE ROLE bench LOGIN PASSWORD '{self.real_password}'")
        pg.psql("CREATE DATABASE bench OWNER bench")
        for role in sorted({self.server_user(t) for t in targets} - {"bench"}):
            pg.psql(f"CREATE ROLE {role} LOGIN PASSWORD '{self.real_password}' IN ROLE bench")
        env = {**os.environ, "PGPASSWORD": self.real_password}
        subprocess.run(
            ["pgbench", "-i", "-q", "-s", str(self.scale), "-h", "127.0.0.1",
             "-p", str(pg.port), "-U", "bench", "bench"],
            check=True, env=env, capture_output=True,
        )  # fmt: skip
        if "pgbouncer" in targets or "stunnel+pgb" in targets:
            self._pgbouncer()
        if "stunnel+pgb" in targets:
            self._stunnel()
        if "pgbouncer-txn" in targets:
            self._pgbouncer("pgbouncer-txn")
        for target in QMESH_TARGETS:
            if target in targets:
                self._qmesh(target)
        if self.server_tls:
            self._check_server_tls(targets)

    def _max_connections(self, limit: int) -> None:
        """max_connections = ``limit`` (postgresql.auto.conf; it takes a restart)."""
        assert self.pg is not None
        self.pg.psql(f"ALTER SYSTEM SET max_connections = {limit}")
        self.pg.stop()
        self.pg.start()
        if self.pg.psql("SHOW max_connections") != str(limit):
            raise RuntimeError(f"max_connections is not {limit}; see {self.pg.log_file}")

    def _server_tls(self) -> None:
        """ssl = on with a throwaway self-signed certificate (as in
        tests/test_pg_tls.py: ALTER SYSTEM, then a reload)."""
        assert self.pg is not None
        directory = self.base / "server-tls"
        directory.mkdir()
        cert, key = self_signed(directory)
        os.chmod(key, 0o600)  # PostgreSQL refuses a key others can read
        for path in (directory, cert, key):
            give_to_postgres(path)
        os.chmod(directory, 0o755)
        self.pg.psql(f"ALTER SYSTEM SET ssl_cert_file = '{cert}'")
        self.pg.psql(f"ALTER SYSTEM SET ssl_key_file = '{key}'")
        self.pg.psql("ALTER SYSTEM SET ssl = on")
        self.pg.psql("SELECT pg_reload_conf()")
        end = time.monotonic() + 30
        while self.pg.psql("SHOW ssl") != "on":
            if time.monotonic() > end:
                raise RuntimeError(f"ssl did not come on; see {self.pg.log_file}")
            time.sleep(0.1)

    def _check_server_tls(self, targets: tuple[str, ...]) -> None:
        """Each target's session on the server is TLS, but the plain ones'."""
        for target in targets:
            result = subprocess.run(
                ["psql", self.dsn(target), "-X", "-A", "-t", "-c",
                 "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            expected = "f" if target in TLS_ONLY else "t"
            if result.returncode or result.stdout.strip() != expected:
                raise RuntimeError(
                    f"{target}: TLS to the server should be {expected!r}, psql said "
                    f"{result.stdout.strip()!r} {result.stderr.strip()!r}"
                )

    def _pgbouncer(self, target: str = "pgbouncer") -> None:
        """PgBouncer for ``target``: session pooling for pgbouncer (and
        stunnel+pgb), transaction pooling for pgbouncer-txn."""
        assert self.pg is not None
        directory = self.base / target
        directory.mkdir()
        port = free_port()
        if target == "pgbouncer-txn":
            pooling = (
                f"pool_mode = transaction\nmax_client_conn = {POOL_MAX_CLIENT_CONN}\n"
                f"default_pool_size = {POOL_SIZE}\n"
            )
            version = pgbouncer_version()
            if version >= (1, 21):
                pooling += f"max_prepared_statements = {POOL_MAX_PREPARED}\n"
            else:  # 1.18 (Debian 12) refuses to start with the setting.
                self.notes.append(
                    f"PgBouncer {version[0]}.{version[1]} has no max_prepared_statements "
                    "(1.21+): in transaction mode it cannot carry named prepared "
                    "statements, so pgbouncer-txn's -M prepared clients end on errors"
                )
        else:
            # Session pooling: `-M prepared` needs it with PgBouncer 1.18.
            pooling = "pool_mode = session\nmax_client_conn = 200\ndefault_pool_size = 40\n"
        (directory / "userlist.txt").write_text(f'"{APP_USER}" "{self.app_key}"\n')
        (directory / "pgbouncer.ini").write_text(
            f"[databases]\nbench = host=127.0.0.1 port={self.pg.port} dbname=bench "
            f"user={self.server_user(target)} password={self.real_password}\n"
            f"[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\n"
            f"unix_socket_dir =\nauth_type = scram-sha-256\n"
            f"auth_file = {directory / 'userlist.txt'}\n"
            + pooling
            + ("server_tls_sslmode = require\n" if self.server_tls else "")
            + f"logfile = {directory / 'pgbouncer.log'}\npidfile = {directory / 'pgbouncer.pid'}\n"
        )
        for path in (directory, *directory.iterdir()):
            give_to_postgres(path)
        os.chmod(directory, 0o755)
        command = ["pgbouncer", str(directory / "pgbouncer.ini")]
        if os.geteuid() == 0:
            command[1:1] = ["-u", "postgres"]
        self.spawn(target, command)
        wait_port(port)
        self.ports[target] = port

    def _stunnel(self) -> None:
        directory = self.base / "stunnel"
        directory.mkdir()
        cert, key = self_signed(directory)
        server_port, client_port = free_port(), free_port()
        (directory / "server.conf").write_text(
            f"foreground = yes\npid =\n[pg-server]\naccept = 127.0.0.1:{server_port}\n"
            f"connect = 127.0.0.1:{self.ports['pgbouncer']}\ncert = {cert}\nkey = {key}\n"
        )
        (directory / "client.conf").write_text(
            f"foreground = yes\npid =\n[pg-client]\nclient = yes\n"
            f"accept = 127.0.0.1:{client_port}\nconnect = 127.0.0.1:{server_port}\n"
            f"verifyPeer = yes\nCAfile = {cert}\n"
        )
        self.spawn("stunnel-server", ["stunnel", str(directory / "server.conf")])
        self.spawn("stunnel-client", ["stunnel", str(directory / "client.conf")])
        wait_port(server_port)
        wait_port(client_port)
        self.ports["stunnel+pgb"] = client_port

    def _qmesh(self, target: str) -> None:
        assert self.pg is not None
        directory = self.base / target
        state = ""
        if target == "qmesh-pgstate":
            self.pg.psql("CREATE DATABASE qmesh_state")
            url = self.pg.dsn_for("postgres", self.pg.password, "qmesh_state")
            state = f'database_url = "{url}"\n'
        environment = {**os.environ, **({"QMESH_GATE__DATABASE_URL": url} if state else {})}
        gate_dir = directory / "gate"
        tunnel_port, http_port, pg_port = free_port(), free_port(), free_port()

        def cli(*args: str, stdin: str | None = None) -> str:
            result = subprocess.run(
                [sys.executable, "-m", "qmesh", "--data-dir", str(gate_dir), *args],
                input=stdin, capture_output=True, text=True, cwd=REPO, env=environment,
            )  # fmt: skip
            if result.returncode:
                raise RuntimeError(
                    f"{target}: qmesh {' '.join(args)} failed ({result.returncode}):\n"
                    f"{result.stderr.strip()}"
                )
            return result.stdout

        cli("keys", "init")
        # Before the first change: on a PostgreSQL state, the control audit's
        # chain key is sealed with the master key.
        cli("secrets", "init-master-key")
        credential = directory / "edge.cred"
        cli("enroll", "minigate", "bench-edge", "--gate", f"127.0.0.1:{tunnel_port}",
            "--out", str(credential))  # fmt: skip
        self.qmesh_keys[target] = cli("apps", "add", APP_USER).strip()
        # qmesh-plain: qmesh as without --server-tls, on the same (TLS) server.
        sslmode = "require" if self.server_tls and target not in TLS_ONLY else "disable"
        user = self.server_user(target)
        server = "127.0.0.1"
        if target == "qmesh-unix":  # the server's socket: libpq's %2F-encoded directory
            server = str(self.pg.run_dir).replace("/", "%2F")
        dsn = f"postgresql://{user}:{self.real_password}@{server}:{self.pg.port}/bench?sslmode={sslmode}"
        cli("secrets", "set", "db.bench", "--dsn-stdin", stdin=dsn)
        # qmesh-guard: a statement_timeout_ms policy, so its sessions take the guard.
        timeout = GUARD_TIMEOUT_MS if target == "qmesh-guard" else self.statement_timeout_ms
        tunnel = (
            f"[tunnel]\nengine_poll_us = {self.engine_poll_us}\n" if self.engine_poll_us else ""
        )
        (directory / "gate.toml").write_text(
            f'data_dir = "{gate_dir}"\n[log]\nlevel = "warning"\n'
            f'[gate]\ntunnel_listen = "127.0.0.1:{tunnel_port}"\n'
            f'http_listen = "127.0.0.1:{http_port}"\n'
            + state
            + f'[gate.apps.{APP_USER}]\ndatabases = ["bench"]\n'
            f'audit_statements = "{self.audit}"\n'
            + (f"statement_timeout_ms = {timeout}\n" if timeout else "")
            # qmesh-txn: transaction pooling, as pgbouncer-txn's.
            + (
                f'pool_mode = "transaction"\npool_size = {POOL_SIZE}\n'
                if target == "qmesh-txn"
                else ""
            )
            + tunnel
        )
        sockets = directory / "run"  # qmesh-unix: the MiniGate's socket
        if target == "qmesh-unix":
            sockets.mkdir()
            os.chmod(sockets, 0o755)  # pgbench runs as this user; the mode is for show
        (directory / "minigate.toml").write_text(
            f'data_dir = "{directory / "edge"}"\n[log]\nlevel = "warning"\n'
            f'[minigate]\ngate = "127.0.0.1:{tunnel_port}"\ncredential_file = "{credential}"\n'
            f'pg_listen = "127.0.0.1:{pg_port}"\nllm_listen = "127.0.0.1:0"\n'
            + (f'pg_unix_socket_dir = "{sockets}"\n' if target == "qmesh-unix" else "")
            + tunnel
        )
        for role in ("gate", "minigate"):
            self.spawn(
                f"{target}-{role}",
                [sys.executable, "-m", "qmesh", "--role", role,
                 "--config", str(directory / f"{role}.toml")],
                cwd=REPO,
            )  # fmt: skip
        roles = self.processes[-2:]
        logs = [self.base / f"{target}-{role}.log" for role in ("gate", "minigate")]
        self.ports[target] = pg_port
        if target == "qmesh-unix":
            self.hosts[target] = str(sockets)
        # The MiniGate listens before its tunnel is up: wait for a real login.
        end = time.monotonic() + 60
        while True:
            exited = [p for p in roles if p.poll() is not None]
            if exited or time.monotonic() > end:
                tails = "\n".join(log_tail(log) for log in logs)
                why = "a role exited" if exited else "no login in 60 s"
                raise RuntimeError(f"{target} did not come up ({why}):\n{tails}")
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", pg_port), 0.5).close()
                login = subprocess.run(
                    ["psql", self.dsn(target), "-X", "-c", "SELECT 1"], capture_output=True
                )
                if not login.returncode:
                    break
            time.sleep(0.2)

    def user_password(self, target: str) -> tuple[str, str]:
        if target in ("direct", "direct-plain", "direct-unix"):
            return "bench", self.real_password
        if target in self.qmesh_keys:
            return APP_USER, self.qmesh_keys[target]
        return APP_USER, self.app_key

    def sslmode(self, target: str) -> str:
        """The client's sslmode: TLS from pgbench/psql only where it talks to
        the (TLS) server itself; the other targets' client hops stay as they are."""
        return "require" if self.server_tls and target == "direct" else "disable"

    def dsn(self, target: str) -> str:
        user, password = self.user_password(target)
        port, query = self.ports[target], f"sslmode={self.sslmode(target)}"
        if target in self.hosts:  # a socket's directory goes in the query
            return f"postgresql://{user}:{password}@/bench?host={self.hosts[target]}&port={port}&{query}"
        return f"postgresql://{user}:{password}@127.0.0.1:{port}/bench?{query}"

    def stop(self) -> None:
        for process in reversed(self.processes):
            benchkit.stop(process, timeout=10)  # SIGTERM, then kill -9
        if self.pg is not None:
            self.pg.stop()


def run_pgbench(
    stack: Stack, target: str, script: str, clients: int, mode: str, duration: int
) -> subprocess.CompletedProcess[str]:
    user, password = stack.user_password(target)
    command = [
        "pgbench", "-n", "-T", str(duration), "-c", str(clients), "-j", str(min(clients, 2)),
        "-M", mode, "-h", stack.hosts.get(target, "127.0.0.1"), "-p", str(stack.ports[target]),
        "-U", user, "bench",
    ]  # fmt: skip
    if script in ("select-only", "logins"):
        command.insert(1, "-S")
    if script == "logins":
        command.insert(1, "-C")  # a new connection, so a whole login, per transaction
    env = {**os.environ, "PGPASSWORD": password}
    if stack.server_tls and target in ("direct", "direct-plain"):
        env["PGSSLMODE"] = stack.sslmode(target)
    return subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=duration + 120
    )  # fmt: skip


class ServerConnections:
    """The server's client backends per role, sampled every SAMPLE_EVERY
    seconds while a run goes on, from a superuser session of its own (it gets
    in on the reserved slots when the others fill max_connections), which
    counts itself out."""

    QUERY = (
        "SELECT usename, count(*) FROM pg_stat_activity "
        "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() GROUP BY usename"
    )

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    @contextlib.contextmanager
    def sampling(self) -> Iterator[list[dict[str, int]]]:
        """Yields the list the samples go to, one {role: backends} each."""
        import psycopg

        samples: list[dict[str, int]] = []
        errors: list[Exception] = []
        done = threading.Event()
        with psycopg.connect(self.dsn, autocommit=True) as connection:

            def sample() -> None:
                try:
                    while True:
                        rows = connection.execute(self.QUERY).fetchall()
                        samples.append({str(user): int(count) for user, count in rows})
                        if done.wait(SAMPLE_EVERY):
                            return
                except Exception as exc:  # reported when the run is over
                    errors.append(exc)

            thread = threading.Thread(target=sample, name="pg-sampler", daemon=True)
            thread.start()
            try:
                yield samples
            finally:
                done.set()
                thread.join()
        if errors:
            raise RuntimeError(f"sampling pg_stat_activity failed: {errors[0]}") from errors[0]


class Run(NamedTuple):
    """One pgbench run, whatever came of it."""

    clients: int
    tps: float | None  # None: pgbench printed no result
    latency: float | None  # ms
    failed: int | None  # pgbench's "number of failed transactions" (PG15+), None if absent
    aborted: int  # clients pgbench ended on an error
    error: str  # pgbench's first error line, "" if it exited 0
    own: int  # --pool: the most server backends of the target's own role in one sample
    total: int  # --pool: the most client backends on the whole server in one sample
    samples: int  # --pool: samples of the server's backends (0 without --pool)
    # CPU µs per transaction (user + system): each proxy process's by what it
    # is (Stack.proxies), PGBENCH's, and MACHINE's, every process's and the
    # kernel's.
    cpu: dict[str, float]

    @property
    def clean(self) -> bool:
        """A result with no error, no failed transaction and no aborted client."""
        return self.tps is not None and not self.error and not self.failed and not self.aborted

    def cell(self) -> str:
        if self.tps is None or self.latency is None:
            return "error"
        failed = "-" if self.failed is None else str(self.failed)
        aborted = f", {self.aborted} aborted" if self.aborted else ""
        return f"{self.tps:,.0f} ({self.latency:.3f}) {failed} failed{aborted}"


def measure(
    stack: Stack,
    target: str,
    script: str,
    clients: int,
    mode: str,
    duration: int,
    sampler: ServerConnections | None = None,
) -> Run:
    """One pgbench run and the CPU it cost: errors and failures are results,
    not exceptions. With a ``sampler`` (--pool), the server's connections
    are sampled meanwhile."""
    if stack.pool and target == "direct":
        clients = min(clients, POOL_SIZE)  # more would not fit in max_connections
    proxies = stack.proxies(target)
    cpu_before = {name: cpu_seconds(pid) for name, pid in proxies.items()}
    cpu_before[PGBENCH] = children_cpu_seconds()
    cpu_before[MACHINE] = machine_cpu_seconds()
    sampling: contextlib.AbstractContextManager[list[dict[str, int]]] = (
        sampler.sampling() if sampler else contextlib.nullcontext([])
    )
    with sampling as samples:
        result = run_pgbench(stack, target, script, clients, mode, duration)
    used = {name: cpu_seconds(pid) - cpu_before[name] for name, pid in proxies.items()}
    # pgbench is the only child reaped meanwhile (the proxies run on).
    used[PGBENCH] = children_cpu_seconds() - cpu_before[PGBENCH]
    used[MACHINE] = machine_cpu_seconds() - cpu_before[MACHINE]
    processed = re.search(r"number of transactions actually processed: (\d+)", result.stdout)
    transactions = int(processed.group(1)) if processed else 0
    tps = re.search(r"tps = ([0-9.]+)", result.stdout)
    latency = re.search(r"latency average = ([0-9.]+) ms", result.stdout)
    failed = re.search(r"number of failed transactions: (\d+)", result.stdout)
    aborted = len(re.findall(r"client \d+ (?:script \d+ )?aborted", result.stderr))
    error = ""
    if result.returncode:
        lines = [line for line in result.stderr.splitlines() if "error" in line.lower()]
        error = (lines or result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[0]
    role = stack.server_user(target)
    return Run(
        clients=clients,
        tps=float(tps.group(1)) if tps else None,
        latency=float(latency.group(1)) if latency else None,
        failed=int(failed.group(1)) if failed else None,
        aborted=aborted,
        error=error.removeprefix("pgbench: error: ").strip(),
        own=max((sample.get(role, 0) for sample in samples), default=0),
        total=max((sum(sample.values()) for sample in samples), default=0),
        samples=len(samples),
        cpu={name: seconds * 1e6 / transactions for name, seconds in used.items()}
        if transactions
        else {},
    )


def children_cpu_seconds() -> float:
    """CPU seconds (user + system) of this process's children that ended
    and were waited for so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def machine_cpu_seconds() -> float:
    """CPU seconds the whole machine spent busy so far (/proc/stat: every
    CPU's time but idle and I/O wait)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle, iowait = fields[3], fields[4]
    return (sum(fields[:8]) - idle - iowait) / os.sysconf("SC_CLK_TCK")


def polling(args: argparse.Namespace) -> str:
    """The table heading's word on --engine-poll-us, if set."""
    return f", qmesh tunnel.engine_poll_us {args.engine_poll_us}" if args.engine_poll_us else ""


@contextlib.contextmanager
def stack_in(
    base: Path,
    scale: int,
    targets: tuple[str, ...],
    audit: str,
    statement_timeout_ms: int,
    server_tls: bool,
    pool: str | None = None,
    engine_poll_us: int = 0,
) -> Iterator[Stack]:
    stack = Stack(base, scale, audit, statement_timeout_ms, server_tls, pool, engine_poll_us)
    try:
        stack.start(targets)
        yield stack
    finally:
        stack.stop()


def print_table(rows: list[list[str]]) -> None:
    """Rows of cells in aligned columns, the first row a header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * width for width in widths))


def pool_run(args: argparse.Namespace, targets: tuple[str, ...], base: Path) -> int:
    """--pool transaction: POOL_CASES against ``targets``; the results and the
    server connections, a table each."""
    runs: dict[tuple[str, int, str, str], list[Run]] = {}
    # direct's runs first (once): by the pools' turn their idle server
    # connections (up to POOL_SIZE each) hold slots direct's clients could
    # not have. Then --rounds rounds of the pools, case by case, the pools'
    # order turning each round, so that a slow moment of the shared machine
    # is not always one pool's.
    pools = [t for t in targets if t != "direct"]
    order = [(case, t) for case in POOL_CASES for t in targets if t == "direct"]
    for r in range(args.rounds):
        order += [(case, t) for case in POOL_CASES for t in turned(pools, r)]
    try:
        with stack_in(
            base, args.scale, targets, args.audit, args.statement_timeout_ms, args.server_tls,
            args.pool, args.engine_poll_us,
        ) as stack:  # fmt: skip
            assert stack.pg is not None
            sampler = ServerConnections(stack.pg.dsn)
            for case, target in order:
                runs.setdefault((*case, target), []).append(
                    measure(stack, target, *case, args.duration, sampler)
                )
                print(".", end="", flush=True, file=sys.stderr)
    finally:
        leave_work_directory(base, keep=args.keep)
    # Each cell shows the run of median TPS; each ratio is the median of the
    # rounds' ratios (a round pairs the two pools' runs of a case).
    results = {key: _median_run(found) for key, found in runs.items()}
    print(
        f"pgbench -j 2, {args.duration} s per run, scale {args.scale}, {os.cpu_count()} CPUs, "
        f"server max_connections = {POOL_MAX_CONNECTIONS}, transaction pooling with "
        f"{POOL_SIZE} server connections (pgbouncer-txn default_pool_size, qmesh-txn "
        f"pool_size), qmesh audit {args.audit}{polling(args)}"
        + rounds_heading(args.rounds)
        + (", server TLS (sslmode=require)" if args.server_tls else "")
        + "; TPS (average latency ms) failed transactions[, clients aborted on an error]"
    )
    header = ["script", "-c", "protocol"]
    header += [f"direct (-c ≤{POOL_SIZE})" if t == "direct" else t for t in targets]
    ratios = [(t, b) for t, b, _ in POOL_GOALS if t in targets and b in targets]
    header += [f"{t}/{b}" for t, b in ratios]
    rows = [header]
    for case in POOL_CASES:
        row = [case[0], str(case[1]), case[2]]
        row += [results[(*case, target)].cell() for target in targets]
        for target, baseline in ratios:
            row.append(ratio_cell(_ratios(runs[(*case, target)], runs[(*case, baseline)])))
        rows.append(row)
    print_table(rows)
    for target, baseline, goal in POOL_GOALS:
        if target not in targets or baseline not in targets:
            continue
        missed, unmeasured = [], []
        for case in POOL_CASES:
            run, base_run = results[(*case, target)], results[(*case, baseline)]
            label = f"{case[0]} -c {case[1]} {case[2]}"
            paired = _ratios(runs[(*case, target)], runs[(*case, baseline)])
            if not run.clean or run.tps is None:
                missed.append(label)
            elif not base_run.clean or base_run.tps is None:
                unmeasured.append(label)  # the target completed where the baseline did not
            elif not paired or statistics.median(paired) < goal:
                missed.append(label)
        print(
            f"target {target}/{baseline} >= {goal:.2f}x: "
            + ("met in every row" if not missed else f"NOT met in {', '.join(missed)}")
            + (
                f" ({baseline} did not complete cleanly in {', '.join(unmeasured)}: {target} did)"
                if unmeasured
                else ""
            )
        )
    print()
    print_cpu_table(targets, POOL_CASES, runs, results, POOL_CPU_PAIR)
    print()
    print(
        "server connections: the most in one sample (every "
        f"{SAMPLE_EVERY:g} s) of the target's own backends / all client backends; "
        f"max_connections = {POOL_MAX_CONNECTIONS}"
    )
    rows = [["script", "-c", "protocol", *targets]]
    for case in POOL_CASES:
        row = [case[0], str(case[1]), case[2]]
        for target in targets:
            found = runs[(*case, target)]
            samples = sum(run.samples for run in found)
            row.append(
                f"{max(run.own for run in found)} / {max(run.total for run in found)} "
                f"({samples} sample{'s' * (samples != 1)})"
            )
        rows.append(row)
    own = {t: max(run.own for case in POOL_CASES for run in runs[(*case, t)]) for t in targets}
    total = max(run.total for found in runs.values() for run in found)
    rows.append(["most", "", "", *(str(own[t]) for t in targets)])
    print_table(rows)
    print(
        f"whole server: at most {total} client backends in a sample, "
        + ("under" if total < POOL_MAX_CONNECTIONS else "NOT under")
        + f" max_connections = {POOL_MAX_CONNECTIONS}; "
        + ", ".join(
            f"{t} held at most {own[t]}"
            + (f" (pool size {POOL_SIZE})" if t in POOL_ONLY else f" (-c ≤{POOL_SIZE})")
            for t in targets
        )
    )
    errors = sorted(
        {
            f"  {target} {script} -c {run.clients} {mode}: {run.error}"
            for (script, _, mode, target), found in runs.items()
            for run in found
            if run.error
        }
    )
    if errors:
        print("pgbench's errors (first line each):", *errors, sep="\n")
    for note in stack.notes:
        print(f"note: {note}")
    return 0


def print_cpu_table(
    targets: tuple[str, ...],
    cases: Sequence[tuple[str, int, str]],
    runs: dict[tuple[str, int, str, str], list[Run]],
    results: dict[tuple[str, int, str, str], Run],
    pair: tuple[tuple[str, str], tuple[str, str]] | None = None,
) -> None:
    """CPU per transaction of each target's processes, of pgbench, of the
    rest (the server and the kernel) and of the whole machine; with a
    ``pair`` ((target, process) twice), the first process's against the
    second's, paired by round."""
    (ours, our_process), (theirs, their_process) = pair or (("", ""), ("", ""))
    paired = ours in targets and theirs in targets
    print(
        "CPU per transaction, µs (user + system, from /proc; the run of median TPS): each "
        "process between pgbench and the server, pgbench's, the server's (the machine's less "
        "those: PostgreSQL, and the kernel's own threads) and the whole machine's (on "
        "saturated CPUs the TPS goes as its inverse)"
    )
    header = ["script", "-c", "protocol", *targets]
    if paired:
        header.append(f"{our_process}/{their_process}")
    rows = [header]
    for case in cases:
        row = [case[0], str(case[1]), case[2]]
        for target in targets:
            row.append(cpu_cell(results[(*case, target)].cpu))
        if paired:
            ratios = [
                run.cpu[our_process] / base.cpu[their_process]
                for run, base in zip(runs[(*case, ours)], runs[(*case, theirs)], strict=False)
                if run.clean and base.clean and run.cpu and base.cpu
            ]
            row.append(
                f"{statistics.median(ratios):.2f}x [{min(ratios):.2f}–{max(ratios):.2f}]"
                if ratios
                else "n/a"
            )
        rows.append(row)
    print_table(rows)


def cpu_cell(cpu: dict[str, float]) -> str:
    if not cpu:
        return "n/a"
    proxies = {name: us for name, us in cpu.items() if name not in (PGBENCH, MACHINE)}
    # Per-process times and the machine's are sampled apart (ticks, steal):
    # where the server did next to nothing (logins, pgbench's own SCRAM
    # dominating), the difference can come out below zero.
    server = max(0.0, cpu[MACHINE] - cpu[PGBENCH] - sum(proxies.values()))
    parts = [" + ".join(f"{name} {us:.1f}" for name, us in proxies.items())] if proxies else []
    parts += [f"pgbench {cpu[PGBENCH]:.1f}", f"server {server:.1f}", f"machine {cpu[MACHINE]:.1f}"]
    return " · ".join(parts)


def turned(targets: Sequence[str], round_: int) -> list[str]:
    """``targets`` in round ``round_``'s order: each round starts one later,
    so that a slow moment of the shared machine is not always one target's."""
    if not targets:
        return []
    first = round_ % len(targets)
    return [*targets[first:], *targets[:first]]


def rounds_heading(rounds: int) -> str:
    return (
        f", {rounds} rounds (cells: the run of median TPS; ratios: median [min–max] of the rounds')"
        if rounds > 1
        else ""
    )


def ratio_cell(paired: list[float]) -> str:
    """The rounds' paired ratios: one, or their median [min–max]."""
    if not paired:
        return "n/a"
    if len(paired) == 1:
        return f"{paired[0]:.2f}x"
    return f"{statistics.median(paired):.2f}x [{min(paired):.2f}–{max(paired):.2f}]"


def _median_run(found: list[Run]) -> Run:
    """The run of median TPS (the lower middle one of an even count)."""
    measured = sorted((run for run in found if run.tps is not None), key=lambda r: r.tps or 0.0)
    return measured[(len(measured) - 1) // 2] if measured else found[0]


def _ratios(runs: list[Run], baselines: list[Run]) -> list[float]:
    """TPS ratios of the rounds where both completed cleanly."""
    return [
        run.tps / base.tps
        for run, base in zip(runs, baselines, strict=False)
        if run.clean and base.clean and run.tps and base.tps
    ]


def leave_work_directory(base: Path, *, keep: bool) -> None:
    """Remove the run's servers' files, or say where they were kept."""
    if keep:
        print(f"\nwork directory kept: {base}", file=sys.stderr)
    else:
        shutil.rmtree(base, ignore_errors=True)
    print(file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=5, help="seconds per pgbench run")
    parser.add_argument("--scale", type=int, default=10, help="pgbench -i scale factor")
    parser.add_argument(
        "--only", default=None,
        help=f"comma-separated targets (default: all; {', '.join(TLS_ONLY)} "
        "only with --server-tls)",
    )  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--audit", choices=("text", "hash", "off"), default="text",
        help="qmesh's audit_statements for the benchmark app (default: text, the default)",
    )  # fmt: skip
    parser.add_argument(
        "--statement-timeout-ms", type=int, default=0,
        help="give the benchmark app a statement_timeout_ms policy: its sessions then have "
        "a statement guard, which judges in Python only the statements that name a guarded "
        f"word (qmesh-guard's is always {GUARD_TIMEOUT_MS})",
    )  # fmt: skip
    parser.add_argument(
        "--server-tls", action="store_true",
        help="TLS on the server and on every hop to it (sslmode=require, PgBouncer's "
        "server_tls_sslmode = require), plus qmesh-plain: qmesh without it, same server",
    )  # fmt: skip
    parser.add_argument(
        "--unix", action="store_true",
        help=f"add {', '.join(UNIX_ONLY)}: pgbench on PostgreSQL's and the MiniGate's "
        "Unix-domain sockets (not with --server-tls or --pool)",
    )  # fmt: skip
    parser.add_argument(
        "--pool", choices=["transaction"], default=None,
        help=f"transaction pooling instead: a server with max_connections = "
        f"{POOL_MAX_CONNECTIONS}, targets {', '.join(POOL_TARGETS)}, select-only with 64 "
        "clients (simple, extended, prepared) and 200 with -C",
    )  # fmt: skip
    parser.add_argument(
        "--engine-poll-us", type=int, default=0, metavar="US",
        help="qmesh's tunnel.engine_poll_us in both processes (default 0: the engine threads "
        "never poll)",
    )  # fmt: skip
    parser.add_argument(
        "--rounds", type=int, default=1,
        help="run every case this many times, the targets' order turning each round; cells "
        "show the run of median TPS, ratios the median of the rounds' paired ratios",
    )  # fmt: skip
    args = parser.parse_args()
    names = TARGETS + POOL_ONLY
    targets: tuple[str, ...]
    if args.pool and args.only is None:
        targets = POOL_TARGETS
    elif args.pool:
        targets = tuple(t for t in POOL_TARGETS if t in args.only.split(","))
        if not targets or any(t not in POOL_TARGETS for t in args.only.split(",")):
            print(f"pg_compare: --pool runs {', '.join(POOL_TARGETS)}", file=sys.stderr)
            return 2
    elif args.unix and (args.server_tls or args.pool):
        print("pg_compare: --unix goes with neither --server-tls nor --pool", file=sys.stderr)
        return 2
    elif args.only is None:
        targets = tuple(
            t
            for t in TARGETS
            if (args.server_tls or t not in TLS_ONLY) and (args.unix or t not in UNIX_ONLY)
        )
    else:
        targets = tuple(t for t in names if t in args.only.split(","))
        if not args.server_tls and any(t in TLS_ONLY for t in targets):
            print(f"pg_compare: {', '.join(TLS_ONLY)} needs --server-tls", file=sys.stderr)
            return 2
        if not args.unix and any(t in UNIX_ONLY for t in targets):
            print(f"pg_compare: {', '.join(UNIX_ONLY)} needs --unix", file=sys.stderr)
            return 2
        if any(t in POOL_ONLY for t in targets):
            print(f"pg_compare: {', '.join(POOL_ONLY)} need --pool transaction", file=sys.stderr)
            return 2
    bouncers = ("pgbouncer", "stunnel+pgb", "pgbouncer-txn")
    for tool in ("pgbench", "psql", *(["pgbouncer"] if set(bouncers) & set(targets) else [])):
        if shutil.which(tool) is None:
            print(f"pg_compare: {tool} is not installed (apt-get install {tool})", file=sys.stderr)
            return 2
    if "stunnel+pgb" in targets and shutil.which("stunnel") is None:
        print("pg_compare: stunnel is not installed (apt-get install stunnel4)", file=sys.stderr)
        return 2
    base = Path(tempfile.mkdtemp(prefix="qmesh-pgbench-"))
    os.chmod(base, 0o755)
    if args.pool:
        return pool_run(args, targets, base)
    return session_run(args, targets, base)


SESSION_CASES = [
    (script, clients, mode)
    for script in ("select-only", "tpcb-like")
    for clients in (1, 16)
    for mode in ("simple", "prepared")
] + [("logins", clients, "simple") for clients in (1, 8)]


def session_run(args: argparse.Namespace, targets: tuple[str, ...], base: Path) -> int:
    """Without --pool: SESSION_CASES against ``targets``, --rounds times
    (the targets' order turning each round); the results and the CPU they
    cost, a table each. Every run must complete cleanly."""
    runs: dict[tuple[str, int, str, str], list[Run]] = {}
    try:
        with stack_in(
            base, args.scale, targets, args.audit, args.statement_timeout_ms, args.server_tls,
            engine_poll_us=args.engine_poll_us,
        ) as stack:  # fmt: skip
            for r in range(args.rounds):
                for case in SESSION_CASES:
                    for target in turned(targets, r):
                        run = measure(stack, target, *case, args.duration)
                        if not run.clean:
                            why = run.error or f"{run.failed} failed, {run.aborted} aborted"
                            raise RuntimeError(f"pgbench against {target} {case} failed: {why}")
                        runs.setdefault((*case, target), []).append(run)
                        print(".", end="", flush=True, file=sys.stderr)
    finally:
        leave_work_directory(base, keep=args.keep)
    results = {key: _median_run(found) for key, found in runs.items()}

    def paired(case: tuple[str, int, str], target: str, baseline: str) -> list[float]:
        return _ratios(runs[(*case, target)], runs[(*case, baseline)])

    print(
        f"pgbench, {args.duration} s per run, scale {args.scale}, {os.cpu_count()} CPUs, "
        f"qmesh audit {args.audit}{polling(args)}"
        + (
            f", statement_timeout_ms {args.statement_timeout_ms}"
            if args.statement_timeout_ms
            else ""
        )
        + (
            f", qmesh-guard statement_timeout_ms {GUARD_TIMEOUT_MS}"
            if "qmesh-guard" in targets
            else ""
        )
        + (", server TLS (sslmode=require; the -plain targets: disable)" if args.server_tls else "")
        + rounds_heading(args.rounds)
        + "; TPS (average latency ms)"
    )
    # qmesh-guard is measured against qmesh (qmesh-guard/qmesh), not qmesh against it.
    others = [t for t in targets if t not in ("qmesh", "qmesh-guard", *UNIX_ONLY)]
    ratios = [("qmesh", t) for t in others] if "qmesh" in targets else []
    if "qmesh-unix" in targets:
        ratios += [("qmesh-unix", t) for t in ("direct", "direct-unix") if t in targets]
    if "qmesh" in targets and "qmesh-guard" in targets:
        ratios.append(("qmesh-guard", "qmesh"))
    added = "qmesh" in targets and "direct" in targets
    if "direct" in targets and "direct-plain" in targets:
        ratios.append(("direct", "direct-plain"))  # what TLS costs the server and pgbench
    header = ["script", "-c", "protocol", *targets, *(f"{t}/{b}" for t, b in ratios)]
    rows = [header + (["qmesh +µs"] if added else [])]
    for case in SESSION_CASES:
        row = [case[0], str(case[1]), case[2]]
        # Every run is clean here: TPS and latency say it all.
        row += [
            f"{results[(*case, t)].tps:,.0f} ({results[(*case, t)].latency:.3f})" for t in targets
        ]
        row += [ratio_cell(paired(case, target, baseline)) for target, baseline in ratios]
        if added:
            ours, direct = results[(*case, "qmesh")].latency, results[(*case, "direct")].latency
            row.append(f"{((ours or 0.0) - (direct or 0.0)) * 1000:+.0f}")
        rows.append(row)
    print_table(rows)
    for target, baseline, goal in (TLS_GOALS if args.server_tls else ()) + GUARD_GOALS:
        if target not in targets or baseline not in targets:
            continue
        missed = [
            f"{case[0]} -c {case[1]} {case[2]}"
            for case in SESSION_CASES
            if statistics.median(paired(case, target, baseline)) < goal
        ]
        print(
            f"target {target}/{baseline} >= {goal:.2f}x: "
            + ("met in every row" if not missed else f"NOT met in {', '.join(missed)}")
        )
    print()
    print_cpu_table(targets, SESSION_CASES, runs, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
