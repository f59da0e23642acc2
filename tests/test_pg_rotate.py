"""``qmesh secrets rotate`` against a real PostgreSQL 15 (the pg_cluster fixture):
the old password stops working, the new one (read back from the vault) works,
sessions opened before carry on, and the plain password never reaches the
server's log; interrupted rotations are settled by the next one."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from pgcluster import PgCluster

from qmesh.config import Config
from qmesh.masterkey import load_master_key
from qmesh.pg.errors import RotationError
from qmesh.pg.rotate import rotate_password, scram_verifier
from qmesh.pg.vault import DatabaseSecret, Vault
from qmesh.state import StateStore, StateUnavailable

REPO = Path(__file__).resolve().parent.parent
KEY = bytes(range(32))


class Role:
    """A dedicated login role and database on the shared cluster."""

    def __init__(self, cluster: PgCluster) -> None:
        self.cluster = cluster
        self.name = f"rot_{secrets.token_hex(4)}"
        self.password = secrets.token_urlsafe(18)
        psql = cluster.psql
        psql(f"CREATE ROLE {self.name} LOGIN PASSWORD '{self.password}'")
        psql(f"CREATE DATABASE {self.name} OWNER {self.name}")
        # Log every statement this role runs, so the test sees what the
        # server would write with the most verbose logging.
        psql(f"ALTER ROLE {self.name} SET log_statement = 'all'")

    @property
    def dsn(self) -> str:
        return self.cluster.dsn_for(self.name, self.password, self.name)

    def logs_in(self, password: str) -> bool:
        cluster = self.cluster
        try:
            with psycopg.connect(
                host=cluster.host,
                port=cluster.port,
                user=self.name,
                password=password,
                dbname=self.name,
                connect_timeout=10,
            ) as conn:
                conn.execute("SELECT 1")
        except psycopg.OperationalError:
            return False
        return True


@pytest.fixture
def role(pg_cluster: PgCluster) -> Role:
    return Role(pg_cluster)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StateStore]:
    with StateStore.open(tmp_path / "state.db") as store:
        yield store


def qmesh(*args: str, tmp_path: Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QMESH_")}
    env["HOME"] = str(tmp_path / "home")
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        [sys.executable, "-m", "qmesh", "--data-dir", str(tmp_path / "data"), *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )


def test_scram_verifier_format() -> None:
    verifier = scram_verifier("pencil", salt=b"\x01" * 16)
    prefix, salt_part, keys = verifier.split("$")
    assert prefix == "SCRAM-SHA-256"
    assert salt_part == "4096:AQEBAQEBAQEBAQEBAQEBAQ=="
    assert len(keys.split(":")) == 2
    assert "pencil" not in verifier


def test_secrets_rotate_on_the_real_server(
    pg_cluster: PgCluster, role: Role, tmp_path: Path
) -> None:
    assert qmesh("secrets", "init-master-key", tmp_path=tmp_path).returncode == 0
    stored = qmesh("secrets", "set", "db.rot", "--dsn-stdin", tmp_path=tmp_path, stdin=role.dsn)
    assert stored.returncode == 0, stored.stderr
    log_file = pg_cluster.log_file
    log_before = log_file.stat().st_size

    with psycopg.connect(role.dsn) as before:  # a session opened before the rotation
        rotated = qmesh("secrets", "rotate", "db.rot", tmp_path=tmp_path)
        assert rotated.returncode == 0, rotated.stderr
        assert "rotated db.rot" in rotated.stdout
        # still usable afterwards
        assert before.execute("SELECT 41 + 1").fetchone() == (42,)

    config = Config(data_dir=tmp_path / "data")
    with StateStore.open(config.state_db_path) as store:
        vault = Vault.open(store, load_master_key(config, env={}))
        secret = vault.get("rot")
        assert vault.get_pending("rot") is None
    assert secret is not None
    new = secret.password
    assert new != role.password and len(new) >= 40
    assert not role.logs_in(role.password)
    assert role.logs_in(new)

    output = rotated.stdout + rotated.stderr + stored.stdout + stored.stderr
    assert role.password not in output and new not in output
    log = log_file.read_bytes()[log_before:].decode(errors="replace")
    assert f'ALTER ROLE "{role.name}" PASSWORD \'SCRAM-SHA-256$4096:' in log  # logged...
    assert new not in log  # ...hashed
    raw = b"".join(p.read_bytes() for p in (tmp_path / "data").iterdir() if p.is_file())
    assert new.encode() not in raw and role.password.encode() not in raw


def test_a_second_rotation_and_the_server_keeps_the_verifier(
    pg_cluster: PgCluster, role: Role, store: StateStore
) -> None:
    vault = Vault.open(store, KEY)
    vault.set("rot", role.dsn)
    first = rotate_password(vault, "rot", sleep=lambda s: None)
    second = rotate_password(vault, "rot", sleep=lambda s: None)
    assert first.verified and second.verified and first.settled is None
    assert first.secret.password != second.secret.password
    assert role.logs_in(second.secret.password) and not role.logs_in(first.secret.password)
    stored = pg_cluster.psql(f"SELECT rolpassword FROM pg_authid WHERE rolname = '{role.name}'")
    assert stored.startswith("SCRAM-SHA-256$4096:")


class FlakyVault(Vault):
    """A real vault whose promotion fails the first ``failures`` times."""

    failures = 0

    def finish_rotation(self, alias: str, *, promote: bool) -> bool:
        if promote and self.failures > 0:
            self.failures -= 1
            raise StateUnavailable("cannot use state database: disk I/O error")
        return super().finish_rotation(alias, promote=promote)


def test_a_failed_vault_update_is_retried(role: Role, store: StateStore) -> None:
    vault = FlakyVault(store, KEY)
    vault.set("rot", role.dsn)
    vault.failures = 2
    result = rotate_password(vault, "rot", sleep=lambda s: None)
    assert vault.failures == 0 and result.verified
    assert role.logs_in(result.secret.password)


def test_vault_update_that_keeps_failing_is_recovered_by_the_next_rotation(
    role: Role, store: StateStore
) -> None:
    vault = FlakyVault(store, KEY)
    vault.set("rot", role.dsn)
    vault.failures = 100
    with pytest.raises(RotationError) as info:
        rotate_password(vault, "rot", sleep=lambda s: None)
    error = info.value
    assert error.server_changed
    message = str(error)
    assert "the server now has the new password" in message
    assert "run `qmesh secrets rotate db.rot` again" in message
    pending = vault.get_pending("rot")
    assert pending is not None
    assert role.password not in message and pending.password not in message
    # The server has the pending password; the vault's current one is stale.
    assert role.logs_in(pending.password) and not role.logs_in(role.password)

    healthy = Vault.open(store, KEY)
    result = rotate_password(healthy, "rot", sleep=lambda s: None)
    assert result.settled == "promoted" and result.verified
    assert healthy.get_pending("rot") is None
    assert role.logs_in(result.secret.password)
    assert not role.logs_in(pending.password)


def test_an_interrupted_rotation_the_server_never_saw_is_discarded(
    role: Role, store: StateStore
) -> None:
    vault = Vault.open(store, KEY)
    vault.set("rot", role.dsn)
    vault.begin_rotation("rot", "never-applied-password", stale_after_s=300)
    vault.release_rotation("rot")  # as if that process had died
    result = rotate_password(vault, "rot", sleep=lambda s: None)
    assert result.settled == "discarded" and result.verified
    assert role.logs_in(result.secret.password) and not role.logs_in(role.password)


def test_wrong_current_password_changes_nothing(role: Role, store: StateStore) -> None:
    vault = Vault.open(store, KEY)
    secret = vault.set("rot", role.dsn)
    vault.put(secret.with_password("not-the-password"))
    with pytest.raises(RotationError) as info:
        rotate_password(vault, "rot", sleep=lambda s: None)
    assert not info.value.server_changed
    assert "nothing was changed" in str(info.value)
    assert "not-the-password" not in str(info.value)
    assert vault.get_pending("rot") is None
    assert role.logs_in(role.password)


def test_unreachable_server_changes_nothing(store: StateStore) -> None:
    vault = Vault.open(store, KEY)
    vault.put(
        DatabaseSecret(
            alias="gone",
            host="127.0.0.1",
            port=1,
            dbname="x",
            user="x",
            password="pw-for-nowhere",
            sslmode="disable",
            sslrootcert=None,
        )
    )
    with pytest.raises(RotationError, match="nothing was changed") as info:
        rotate_password(vault, "gone", sleep=lambda s: None)
    assert "pw-for-nowhere" not in str(info.value)
    assert vault.get_pending("gone") is None
