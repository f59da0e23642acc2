#!/usr/bin/env python3
"""A throwaway PostgreSQL cluster for tests, benchmarks and manual play.

initdb in a directory of our own, scram-sha-256 for every login, listening
on 127.0.0.1 only, on a free port. As root, the server runs as the
``postgres`` system user (PostgreSQL refuses to run as root).

    python scripts/pgcluster.py start DIR     # prints a superuser DSN
    python scripts/pgcluster.py stop DIR

From Python: ``with PgCluster(tmp_dir) as pg: pg.dsn``.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import TracebackType

PG_BIN = Path(os.environ.get("QMESH_PG_BIN", "/usr/lib/postgresql/15/bin"))
SUPERUSER = "postgres"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class PgCluster:
    """One cluster in ``base``: data in ``base/data``, socket in ``base/run``."""

    def __init__(self, base: Path, port: int | None = None, *, max_connections: int = 200) -> None:
        self.base = Path(base).resolve()
        self.max_connections = max_connections
        self.data = self.base / "data"
        self.run_dir = self.base / "run"
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.password_file = self.base / "superuser.password"
        self.log_file = self.run_dir / "server.log"  # run_dir is writable by the server
        self._as_postgres = os.geteuid() == 0

    @property
    def password(self) -> str:
        return self.password_file.read_text().strip()

    @property
    def dsn(self) -> str:
        return self.dsn_for(SUPERUSER, self.password)

    def dsn_for(self, user: str, password: str, dbname: str = "postgres") -> str:
        return f"postgresql://{user}:{password}@{self.host}:{self.port}/{dbname}"

    def _run(self, *args: str) -> None:
        command = [str(PG_BIN / args[0]), *args[1:]]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            log = self.log_file.read_text()[-2000:] if self.log_file.exists() else ""
            raise RuntimeError(f"{args[0]} failed: {result.stderr.strip()}\n{log}")

    def _prepare_data_dir(self) -> None:
        """As root, the server runs as ``postgres``: its directories are its own."""
        if not self._as_postgres:
            return
        user = pwd.getpwnam("postgres")
        os.chmod(self.base, 0o755)
        for path in (self.run_dir, self.password_file):
            os.chown(path, user.pw_uid, user.pw_gid)
        self.data.mkdir(mode=0o700)
        os.chown(self.data, user.pw_uid, user.pw_gid)

    def start(self) -> PgCluster:
        self.base.mkdir(parents=True, exist_ok=True)
        self.run_dir.mkdir(exist_ok=True)
        if not self.data.exists():
            self.password_file.write_text(secrets.token_urlsafe(24) + "\n")
            os.chmod(self.password_file, 0o600)
            self._prepare_data_dir()
            self._run(
                "initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth=scram-sha-256",
                f"--pwfile={self.password_file}", "--no-sync", "-E", "UTF8", "--locale=C",
            )  # fmt: skip
            with (self.data / "postgresql.conf").open("a") as conf:
                conf.write(
                    f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                    f"unix_socket_directories = '{self.run_dir}'\n"
                    "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                    f"max_connections = {self.max_connections}\nshared_buffers = 128MB\n"
                )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log_file),
                  "-w", "-t", "60", "start")  # fmt: skip
        return self

    def standby(self, base: Path) -> PgCluster:
        """A streaming replica of this running cluster in ``base``, started
        (``pg_basebackup -R``: it follows this one until promoted)."""
        replica = PgCluster(base)
        replica.base.mkdir(parents=True, exist_ok=True)
        replica.run_dir.mkdir(exist_ok=True)
        shutil.copy(self.password_file, replica.password_file)
        replica._prepare_data_dir()
        source = f"host={self.host} port={self.port} user={SUPERUSER} password={self.password}"
        self._run("pg_basebackup", "-D", str(replica.data), "-R", "-X", "stream", "-c", "fast",
                  "-d", source, "--no-sync")  # fmt: skip
        with (replica.data / "postgresql.conf").open("a") as conf:
            conf.write(f"\nport = {replica.port}\nunix_socket_directories = '{replica.run_dir}'\n")
        replica._run("pg_ctl", "-D", str(replica.data), "-l", str(replica.log_file),
                     "-w", "-t", "60", "start")  # fmt: skip
        return replica

    def promote(self) -> None:
        """Make this standby the primary."""
        self._run("pg_ctl", "-D", str(self.data), "-w", "-t", "60", "promote")

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def psql(self, sql: str, *, dsn: str | None = None) -> str:
        """Run SQL with psql; returns unaligned, tuples-only output."""
        result = subprocess.run(
            ["psql", dsn or self.dsn, "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql],
            check=True, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        return result.stdout.strip()

    def __enter__(self) -> PgCluster:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] not in ("start", "stop", "destroy"):
        print(__doc__, file=sys.stderr)
        return 2
    base = Path(argv[2])
    port_file = base / "port"
    port = int(port_file.read_text()) if port_file.exists() else None
    cluster = PgCluster(base, port)
    if argv[1] == "start":
        cluster.start()
        port_file.write_text(f"{cluster.port}\n")
        print(cluster.dsn)
    else:
        cluster.stop()
        if argv[1] == "destroy":
            shutil.rmtree(base)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
