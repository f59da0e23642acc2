"""A throwaway PostgreSQL for ``qmesh up``'s first query.

For: a local cluster under ``DATA_DIR/demo-db`` (initdb on first start,
scram-sha-256 for every login, loopback only, a free port each start), with
a login role and a database both named ``demo``. ``qmesh up`` stores its
credentials in the vault as alias :data:`DEMO_ALIAS` and lets the demo app
open it, so ``psql postgresql://demo:APP_KEY@MINIGATE/demo`` answers right
after the first start. The data stays across restarts; the server stops
with ``qmesh up``.

Not for: production databases (they are the operator's, stored with
``qmesh secrets set``), or running without PostgreSQL's server binaries:
:class:`DemoDbUnavailable` then says in one line what to install.

As root the server runs as the ``postgres`` system user, because
PostgreSQL refuses to run as root; the data directory is private to root,
so the cluster then lives in that user's home (``~postgres/qmesh-demo/ID``,
one per qmesh data directory) and only the passwords stay under
``DATA_DIR/demo-db``. Passwords are written to files of mode 0600 and
handed to the server on stdin or in a file it deletes, never on a command
line.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import re
import secrets
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Final

import attrs

from qmesh.fastsocket import free_loopback_port

__all__ = ["DEMO_ALIAS", "PG_BIN_ENV", "DemoDatabase", "DemoDbUnavailable", "find_pg_bin"]

DEMO_ALIAS: Final = "demo"
"""The vault alias, the database and its login role."""
PG_BIN_ENV: Final = "QMESH_PG_BIN"
"""A directory holding ``initdb``, ``pg_ctl`` and ``postgres``, if not Debian's."""
_COMMAND_TIMEOUT_S: Final = 120.0
_NEEDED: Final = ("initdb", "pg_ctl", "postgres")


class DemoDbUnavailable(Exception):
    """The demo database cannot start here; the message says what to do."""


def find_pg_bin(environ: Mapping[str, str] = os.environ) -> Path | None:
    """The newest directory with PostgreSQL's server binaries: ``QMESH_PG_BIN``,
    else Debian's ``/usr/lib/postgresql/*/bin``, else the ``PATH``."""
    configured = environ.get(PG_BIN_ENV)
    if configured:
        candidates = [Path(configured)]
    else:
        versions = Path("/usr/lib/postgresql").glob("*/bin")
        candidates = sorted(versions, key=_major_version, reverse=True)
        on_path = shutil.which("initdb")
        if on_path:
            candidates.append(Path(on_path).parent)
    for directory in candidates:
        if all((directory / name).is_file() for name in _NEEDED):
            return directory
    return None


def _major_version(path: Path) -> int:
    match = re.fullmatch(r"\d+", path.parent.name)
    return int(match.group()) if match else -1


@attrs.define
class DemoDatabase:
    """One cluster in ``base``: data in ``base/data``, sockets and the server
    log in ``base/run``, passwords in ``base/*.password``."""

    base: Path
    bin: Path
    port: int = 0
    as_postgres: bool = attrs.field(factory=lambda: os.geteuid() == 0)

    @property
    def cluster(self) -> Path:
        """Where the server's files live: under ``base``, or as root under
        the ``postgres`` user's home (see the module docstring)."""
        if not self.as_postgres:
            return self.base
        digest = hashlib.sha256(str(self.base).encode()).hexdigest()[:16]
        return Path(pwd.getpwnam("postgres").pw_dir) / "qmesh-demo" / digest

    @property
    def data(self) -> Path:
        return self.cluster / "data"

    @property
    def run_dir(self) -> Path:
        return self.cluster / "run"

    @property
    def password_file(self) -> Path:
        return self.base / "demo.password"

    @classmethod
    def at(cls, data_dir: Path, environ: Mapping[str, str] = os.environ) -> DemoDatabase:
        bin_dir = find_pg_bin(environ)
        if bin_dir is None:
            raise DemoDbUnavailable(
                "no PostgreSQL server binaries (initdb, pg_ctl, postgres) found: "
                f"scripts/setup.sh installs them, or set {PG_BIN_ENV}; --no-demo-db skips this"
            )
        database = cls((data_dir / "demo-db").resolve(), bin_dir)
        if database.as_postgres:
            database._server_user()  # fail here, in one line
        return database

    @property
    def exists(self) -> bool:
        return (self.data / "PG_VERSION").is_file() and self.password_file.is_file()

    def dsn(self) -> str:
        """The demo role's DSN, for the vault (it holds the password)."""
        password = self.password_file.read_text().strip()
        return (
            f"postgresql://{DEMO_ALIAS}:{password}@127.0.0.1:{self.port}/{DEMO_ALIAS}"
            "?sslmode=disable"
        )

    def start(self) -> None:
        """Create the cluster on first use, then start it on a free port."""
        if not self.exists:
            self._create()
        if (self.data / "postmaster.pid").exists():
            # A qmesh up that was killed left its server behind: it is ours.
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop", check=False)
        self.port = free_loopback_port()
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.run_dir / "server.log"),
            "-w", "-t", "60", "-o", f"-p {self.port}", "start",
        )  # fmt: skip

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop", check=False)

    def _create(self) -> None:
        for directory in {self.base, self.cluster}:
            if directory.exists():
                shutil.rmtree(directory)  # a first start that did not finish
        self.base.mkdir(mode=0o700, parents=True)
        self.run_dir.mkdir(mode=0o700, parents=True)
        self.password_file.write_text(secrets.token_urlsafe(24) + "\n")
        self.password_file.chmod(0o600)
        # The superuser's password is never needed again: the server reads
        # it once, from a file of its own that is deleted right after.
        superuser_file = self.run_dir / "superuser.password"
        superuser_file.write_text(secrets.token_urlsafe(24) + "\n")
        superuser_file.chmod(0o600)
        if self.as_postgres:
            uid, gid = self._server_user()
            for path in (self.cluster.parent, self.cluster, self.run_dir, superuser_file):
                os.chown(path, uid, gid)
        try:
            self._run(
                "initdb", "-D", str(self.data), "-U", "postgres", "--auth=scram-sha-256",
                f"--pwfile={superuser_file}", "--no-sync", "-E", "UTF8", "--locale=C",
            )  # fmt: skip
        finally:
            superuser_file.unlink(missing_ok=True)
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                "\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.run_dir}'\n"
                "max_connections = 50\n"
            )
        # Single-user mode takes the SQL on stdin: the password never
        # appears in a process list.
        password = self.password_file.read_text().strip()
        sql = (
            f"CREATE ROLE {DEMO_ALIAS} LOGIN PASSWORD '{password}'\n"
            f"CREATE DATABASE {DEMO_ALIAS} OWNER {DEMO_ALIAS}\n"
        )
        self._run("postgres", "--single", "-D", str(self.data), "postgres", stdin=sql)

    def _server_user(self) -> tuple[int, int]:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            raise DemoDbUnavailable(
                "running as root, and there is no 'postgres' system user to run the "
                "server as (apt-get install postgresql creates it); --no-demo-db skips this"
            ) from None
        return user.pw_uid, user.pw_gid

    def _run(self, *args: str, check: bool = True, stdin: str | None = None) -> None:
        command = [str(self.bin / args[0]), *args[1:]]
        if self.as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(
            command,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=_COMMAND_TIMEOUT_S,
            check=False,
        )
        if check and result.returncode != 0:
            # The server's own words, which never include the passwords (they
            # reach it on stdin and in files only).
            said = (result.stderr or result.stdout).strip().splitlines()
            raise DemoDbUnavailable(
                f"{args[0]} failed: {said[-1] if said else f'exit {result.returncode}'} "
                f"(log: {self.run_dir / 'server.log'})"
            )
