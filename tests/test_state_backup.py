"""``qmesh state backup`` while a Gate runs, ``qmesh state restore`` into an
empty data directory: the restored Gate serves the same apps and operators,
opens the same vault aliases, and its chains verify with every row.

As an operator runs it: ``qmesh`` subprocesses, real Gate processes, real
sockets.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

import trio
from daemonkit import GateDir, make_gate_dir
from processkit import qmesh_cli as qmesh
from processkit import start_role, stop

from qmesh.finops.ledger import Ledger, LedgerEntry
from qmesh.masterkey import ensure_master_key
from qmesh.pg.vault import Vault
from qmesh.state import StateStore

DEADLINE_S = 30.0  # generous: the event must happen, how fast is for bench/
DSN = "postgresql://shop:Orders-Passw0rd@127.0.0.1:5432/orders"


def get(gate: GateDir, path: str, token: str) -> int:
    request = urllib.request.Request(
        f"http://127.0.0.1:{gate.http_port}{path}", headers={"authorization": f"Bearer {token}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return 0


def wait_up(gate: GateDir) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while get(gate, "/healthz", "-") != 200:
        assert time.monotonic() < deadline, "the Gate did not come up"
        time.sleep(0.05)


def ledger_rows(state: Path, count: int) -> None:
    async def write() -> None:
        with StateStore.open(state) as store:
            ledger = Ledger(store)
            for i in range(count):
                ledger.record(
                    LedgerEntry(
                        ts=time.time(), request_id=f"r{i}", app="shop", budget=None,
                        task="summarize", candidate="skill:summarize", kind="internal",
                        model="qmesh-summarize", provider=None, tokens_in=10, tokens_out=5,
                        cost_usd=0.0, shifted_from=None, avoided_usd=0.0, outcome="ok",
                        hops="[]", reason="test",
                    )
                )  # fmt: skip
            await ledger.flush()

    trio.run(write)


def test_backup_while_serving_and_restore_into_an_empty_data_dir(tmp_path: Path) -> None:
    source = make_gate_dir(tmp_path / "a")
    source_config = tmp_path / "a.toml"
    source_config.write_text(source.config_text())
    app_key = qmesh(source_config, "apps", "add", "shop").stdout.strip()
    viewer = qmesh(source_config, "operators", "add", "watch", "--role", "viewer").stdout.strip()
    dsn_file = tmp_path / "orders.dsn"
    dsn_file.write_text(DSN)
    qmesh(source_config, "secrets", "set", "db.orders", "--dsn-file", str(dsn_file))
    ledger_rows(source.path / "state.db", 25)
    backup = tmp_path / "backups" / "state.qmesh-backup"
    backup.parent.mkdir()

    gate = start_role("gate", source_config, tmp_path / "a.log")
    try:
        wait_up(source)
        assert get(source, "/v1/models", f"shop:{app_key}") == 200
        taken = qmesh(source_config, "state", "backup", str(backup))
    finally:
        stop(gate)
    assert "is NOT in the file" in taken.stdout
    assert backup.stat().st_mode & 0o777 == 0o600
    raw = backup.read_bytes()
    for secret in (app_key, viewer.split(":", 1)[1], "Orders-Passw0rd", source.admin_key):
        assert secret.encode() not in raw
    qmesh(source_config, "state", "backup", str(backup), ok=False)  # never overwrites

    # A new machine: its own Gate key, the same master key, an empty state.
    target = make_gate_dir(tmp_path / "b")
    (target.path / "state.db").unlink()
    for extra in target.path.glob("state.db-*"):
        extra.unlink()
    shutil.copy(source.path / "master.key", target.path / "master.key")
    target_config = tmp_path / "b.toml"
    target_config.write_text(target.config_text())
    restored = qmesh(target_config, "state", "restore", str(backup))
    assert "chain ledger: 25 rows verified, ok" in restored.stdout
    verified = {c["chain"]: c for c in json.loads(
        qmesh(target_config, "ledger", "verify", "--json").stdout)}  # fmt: skip
    assert verified["ledger"]["rows"] == 25 and verified["ledger"]["ok"]
    assert verified["audit"]["ok"]
    actions = [r["action"] for r in json.loads(
        qmesh(target_config, "audit", "--control", "--json").stdout)]  # fmt: skip
    assert actions == ["apps.add", "operators.add", "secrets.set", "state.restore"]
    master = ensure_master_key(target.path, env={})
    with StateStore.open(target.path / "state.db") as store:
        opened = Vault.open(store, master).get("orders")
    assert opened is not None and opened.password == "Orders-Passw0rd"

    gate = start_role("gate", target_config, tmp_path / "b.log")
    try:
        wait_up(target)
        assert get(target, "/v1/models", f"shop:{app_key}") == 200
        assert get(target, "/api/dashboard", viewer) == 200
        assert get(target, "/api/dashboard", f"shop:{app_key}") == 403
        assert get(target, "/metrics", f"admin:{source.admin_key}") == 200
    finally:
        stop(gate)

    # A state that holds rows is not overwritten without --replace; the
    # wrong master key is named, not tried.
    refused = qmesh(target_config, "state", "restore", str(backup), ok=False)
    assert "already holds rows" in refused.stderr
    other = make_gate_dir(tmp_path / "c")
    other_config = tmp_path / "c.toml"
    other_config.write_text(other.config_text())
    wrong = qmesh(other_config, "state", "restore", str(backup), ok=False)
    assert "sealed with master key" in wrong.stderr
