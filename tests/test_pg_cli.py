"""``qmesh secrets …``, ``qmesh audit`` and ``qmesh apps rotate-key`` as real
subprocesses on real files: passwords never on stdout, stderr or disk in clear."""

from __future__ import annotations

import json
import os
import pty
import select
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from qmesh.config import Config
from qmesh.masterkey import load_master_key
from qmesh.pg.audit import AuditLog
from qmesh.pg.vault import Vault
from qmesh.state import StateStore

REPO = Path(__file__).resolve().parent.parent
PASSWORD = "Zq8-very-secret-PW"
DSN = f"postgresql://shop:{PASSWORD}@db.internal:6432/orders?sslmode=require"


def environment(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QMESH_")}
    env["HOME"] = str(tmp_path / "home")  # never touch the real ~/.qmesh
    env["PYTHONPATH"] = str(REPO)
    return env


def qmesh(*args: str, tmp_path: Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qmesh", "--data-dir", str(tmp_path / "data"), *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=environment(tmp_path),
        cwd=tmp_path,
        timeout=60,
        check=False,
    )


def data_bytes(tmp_path: Path) -> bytes:
    """Every byte the state store has on disk (database, WAL, shared memory)."""
    return b"".join(p.read_bytes() for p in (tmp_path / "data").iterdir() if p.is_file())


def vault_of(tmp_path: Path) -> tuple[StateStore, Vault]:
    config = Config(data_dir=tmp_path / "data")
    store = StateStore.open(config.state_db_path)
    return store, Vault.open(store, load_master_key(config, env={}))


@pytest.fixture
def initialised(tmp_path: Path) -> Path:
    result = qmesh("secrets", "init-master-key", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    return tmp_path


def test_init_master_key(tmp_path: Path) -> None:
    missing = qmesh("secrets", "list", tmp_path=tmp_path)
    assert missing.returncode == 2
    assert "no master key" in missing.stderr and "init-master-key" in missing.stderr
    first = qmesh("secrets", "init-master-key", tmp_path=tmp_path)
    assert first.returncode == 0, first.stderr
    path = tmp_path / "data" / "master.key"
    assert first.stdout.strip() == str(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().strip() not in first.stdout + first.stderr
    before = path.read_bytes()
    again = qmesh("secrets", "init-master-key", tmp_path=tmp_path)
    assert again.returncode == 2 and "refusing to replace" in again.stderr
    assert path.read_bytes() == before


def test_set_from_stdin(initialised: Path) -> None:
    tmp_path = initialised
    result = qmesh("secrets", "set", "db.orders", "--dsn-stdin", tmp_path=tmp_path, stdin=DSN)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        "stored db.orders: shop@db.internal:6432/orders sslmode=require"
    )
    assert PASSWORD not in result.stdout + result.stderr
    assert PASSWORD.encode() not in data_bytes(tmp_path)
    store, vault = vault_of(tmp_path)
    with store:
        secret = vault.get("orders")
    assert secret is not None and secret.password == PASSWORD


def test_set_from_a_file(initialised: Path) -> None:
    tmp_path = initialised
    dsn_file = tmp_path / "orders.dsn"
    dsn_file.write_text(f"host=db.internal user=shop password='{PASSWORD}' dbname=orders\n")
    os.chmod(dsn_file, 0o600)
    result = qmesh("secrets", "set", "db.orders", "--dsn-file", str(dsn_file), tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "stored db.orders: shop@db.internal:5432/orders sslmode=prefer" in result.stdout
    assert result.stderr == ""
    assert PASSWORD not in result.stdout + result.stderr
    assert PASSWORD.encode() not in data_bytes(tmp_path)
    os.chmod(dsn_file, 0o644)
    loose = qmesh("secrets", "set", "db.orders", "--dsn-file", str(dsn_file), tmp_path=tmp_path)
    assert loose.returncode == 0 and "readable by other users" in loose.stderr


def test_set_with_a_typo_names_the_part_only(initialised: Path) -> None:
    tmp_path = initialised
    for dsn, named in (
        (f"host=db user=shop pasword={PASSWORD}", "unknown key 'pasword'"),
        (f"host=db user=shop password={PASSWORD} port=5x", "port: expected a number"),
        (f"postgresql://shop:{PASSWORD}@db/orders?sslmode=on", "sslmode: expected one of"),
    ):
        result = qmesh("secrets", "set", "db.orders", "--dsn-stdin", tmp_path=tmp_path, stdin=dsn)
        assert result.returncode == 2
        assert result.stderr.startswith("qmesh: error: invalid DSN for db.orders: ")
        assert named in result.stderr
        assert PASSWORD not in result.stdout + result.stderr
    assert PASSWORD.encode() not in data_bytes(tmp_path)


def test_a_dsn_on_the_command_line_is_refused_without_echo(initialised: Path) -> None:
    result = qmesh("secrets", "set", "db.orders", "--dsn", DSN, tmp_path=initialised)
    assert result.returncode == 2
    assert "--dsn-stdin or --dsn-file" in result.stderr
    assert PASSWORD not in result.stdout + result.stderr
    bad_alias = qmesh("secrets", "set", "orders", "--dsn-stdin", tmp_path=initialised, stdin=DSN)
    assert bad_alias.returncode == 2 and "expected db.ALIAS" in bad_alias.stderr


def test_set_from_a_terminal_does_not_echo(initialised: Path) -> None:
    tmp_path = initialised
    argv = [sys.executable, "-m", "qmesh", "--data-dir", str(tmp_path / "data")]
    argv += ["secrets", "set", "db.orders", "--dsn-stdin"]
    pid, fd = pty.fork()
    if pid == 0:  # the child: the pty is its controlling terminal
        os.chdir(tmp_path)
        os.execve(sys.executable, argv, environment(tmp_path))
    seen = b""

    def read_until(marker: bytes, deadline: float) -> None:
        nonlocal seen
        while marker not in seen and time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:  # EIO: the child closed the terminal
                    return
                if not chunk:
                    return
                seen += chunk

    read_until(b"(not echoed): ", time.monotonic() + 30)
    assert b"DSN for db.orders (not echoed): " in seen
    os.write(fd, DSN.encode() + b"\n")
    read_until(b"stored db.orders", time.monotonic() + 30)
    read_until(b"\n", time.monotonic() + 5)
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0, seen
    assert b"stored db.orders: shop@db.internal:6432/orders" in seen
    assert PASSWORD.encode() not in seen


def test_list_and_delete(initialised: Path) -> None:
    tmp_path = initialised
    empty = qmesh("secrets", "list", tmp_path=tmp_path)
    assert empty.returncode == 0 and "no secrets" in empty.stdout
    for alias in ("orders", "billing"):
        qmesh("secrets", "set", f"db.{alias}", "--dsn-stdin", tmp_path=tmp_path, stdin=DSN)
    listed = qmesh("secrets", "list", tmp_path=tmp_path)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["ALIAS", "UPDATED", "TARGET"]
    assert [line.split()[0] for line in lines[1:]] == ["db.billing", "db.orders"]
    assert "shop@db.internal:6432/orders sslmode=require" in lines[1]
    as_json = json.loads(qmesh("secrets", "list", "--json", tmp_path=tmp_path).stdout)
    assert [row["alias"] for row in as_json] == ["db.billing", "db.orders"]
    assert as_json[0]["user"] == "shop" and as_json[0]["rotation_pending_since"] is None
    assert PASSWORD not in listed.stdout + json.dumps(as_json)

    deleted = qmesh("secrets", "delete", "db.orders", tmp_path=tmp_path)
    assert deleted.returncode == 0 and deleted.stdout.strip() == "deleted db.orders"
    again = qmesh("secrets", "delete", "db.orders", tmp_path=tmp_path)
    assert again.returncode == 2 and "no secret db.orders" in again.stderr
    # Deleting needs no master key: the way out after losing it.
    (tmp_path / "data" / "master.key").unlink()
    assert qmesh("secrets", "delete", "db.billing", tmp_path=tmp_path).returncode == 0
    assert qmesh("secrets", "list", tmp_path=tmp_path).returncode == 2  # no key any more


def test_wrong_master_key_is_reported(initialised: Path) -> None:
    tmp_path = initialised
    qmesh("secrets", "set", "db.orders", "--dsn-stdin", tmp_path=tmp_path, stdin=DSN)
    key_file = tmp_path / "data" / "master.key"
    key_file.unlink()
    qmesh("secrets", "init-master-key", tmp_path=tmp_path)
    result = qmesh("secrets", "list", tmp_path=tmp_path)
    assert result.returncode == 2 and "wrong master key" in result.stderr


def test_audit_command(tmp_path: Path) -> None:
    config = Config(data_dir=tmp_path / "data")
    with StateStore.open(config.state_db_path) as store:
        audit = AuditLog(store)

        async def fill() -> None:
            async with trio.open_nursery() as nursery:
                await nursery.start(audit.run)
                audit.record(
                    app="shop", alias="orders", statement="SELECT *\n  FROM orders",
                    duration_s=0.0123, rows=7, outcome="ok", session="edge-1/4242",
                )  # fmt: skip
                audit.record(
                    app="etl", alias="billing", statement="DELETE FROM invoices",
                    duration_s=0.5, rows=None, outcome="error 42501", mode="hash",
                )  # fmt: skip
                await audit.flush()
                nursery.cancel_scope.cancel()

        trio.run(fill)
    table = qmesh("audit", tmp_path=tmp_path)
    assert table.returncode == 0, table.stderr
    header, etl, shop = table.stdout.splitlines()
    assert header.split() == [
        "TIME", "APP", "ALIAS", "SESSION", "OUTCOME", "MS", "ROWS", "STATEMENT"
    ]  # fmt: skip
    assert etl.split()[1:6] == ["etl", "billing", "-", "error", "42501"]
    assert "sha256:" in etl and "DELETE" not in etl
    assert shop.split()[1:7] == ["shop", "orders", "edge-1/4242", "ok", "12.300", "7"]
    assert shop.endswith("SELECT * FROM orders")
    only_shop = qmesh("audit", "--app", "shop", "--json", tmp_path=tmp_path)
    rows = json.loads(only_shop.stdout)
    assert [(r["app"], r["alias"], r["rows"], r["outcome"], r["session"]) for r in rows] == [
        ("shop", "orders", 7, "ok", "edge-1/4242")
    ]
    assert rows[0]["statement"] == "SELECT *\n  FROM orders"
    assert rows[0]["duration_ms"] == 12.3
    assert len(rows[0]["statement_sha256"]) == 64
    by_alias = json.loads(qmesh("audit", "--alias", "billing", "--json", tmp_path=tmp_path).stdout)
    assert [r["statement"] for r in by_alias] == [None]
    assert len(json.loads(qmesh("audit", "--limit", "1", "--json", tmp_path=tmp_path).stdout)) == 1
    assert "no audit records" in qmesh("audit", "--app", "x", tmp_path=tmp_path).stdout


def test_apps_rotate_key(tmp_path: Path) -> None:
    added = qmesh("apps", "add", "shop", tmp_path=tmp_path)
    old_key = added.stdout.strip()
    rotated = qmesh("apps", "rotate-key", "shop", "--overlap", "3600", tmp_path=tmp_path)
    assert rotated.returncode == 0, rotated.stderr
    new_key = rotated.stdout.strip()
    assert new_key and new_key != old_key
    assert "previous key keeps working until" in rotated.stderr
    assert old_key not in rotated.stdout + rotated.stderr
    config = Config(data_dir=tmp_path / "data")
    with StateStore.open(config.state_db_path) as store:
        assert store.verify_app_key("shop", old_key) and store.verify_app_key("shop", new_key)
    leaked = qmesh("apps", "rotate-key", "shop", "--overlap", "0", tmp_path=tmp_path)
    assert leaked.returncode == 0 and "stopped working" in leaked.stderr
    newest = leaked.stdout.strip()
    with StateStore.open(config.state_db_path) as store:
        assert store.verify_app_key("shop", newest)
        assert not store.verify_app_key("shop", old_key)
        assert not store.verify_app_key("shop", new_key)
    unknown = qmesh("apps", "rotate-key", "nobody", tmp_path=tmp_path)
    assert unknown.returncode == 2 and "no app with id 'nobody'" in unknown.stderr
