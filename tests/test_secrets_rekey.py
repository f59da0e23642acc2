"""``qmesh secrets rekey``: every sealed row under a new master key, at once.

As an operator runs it (``qmesh`` subprocesses) on a Gate's data directory;
a vault opened before the rekey stands for a running Gate, which must follow
the new key file on its own. Also: the master key from a configured command
(a secret manager's client), never from a file beside the state.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from daemonkit import make_gate_dir
from processkit import qmesh_cli as qmesh

from qmesh.config import load_config
from qmesh.llm.provider_keys import ProviderKeyError, load_key, store_key
from qmesh.masterkey import key_fingerprint, load_master_key
from qmesh.pg.errors import VaultError
from qmesh.pg.vault import Vault
from qmesh.state import StateStore


def test_rekey_keeps_every_alias_readable_and_a_running_vault_follows(tmp_path: Path) -> None:
    gate = make_gate_dir(tmp_path)
    config = tmp_path / "gate.toml"
    config.write_text(gate.config_text())
    for alias, password in (("orders", "Orders-Pw-1"), ("billing", "Billing-Pw-2")):
        dsn = tmp_path / f"{alias}.dsn"
        dsn.write_text(f"postgresql://app:{password}@127.0.0.1:5432/{alias}")
        qmesh(config, "secrets", "set", f"db.{alias}", "--dsn-file", str(dsn))
    loaded = load_config(config, env={})
    old_key = load_master_key(loaded, env={})
    state = gate.path / "state.db"
    with StateStore.open(state) as store:
        store_key(store, old_key, "acme", "sk-acme-provider-key")
    running = Vault.open(StateStore.open(state), old_key)
    running.reload = lambda: load_master_key(loaded, env={})

    done = qmesh(config, "secrets", "rekey")
    assert "resealed 2 vault secrets, 1 provider keys, 0 chain keys" in done.stdout
    new_key = load_master_key(loaded, env={})
    assert new_key != old_key
    assert not (gate.path / "master.key.new").exists()
    assert (gate.path / "master.key").stat().st_mode & 0o777 == 0o600
    with StateStore.open(state) as store:
        with pytest.raises(VaultError, match="wrong master key"):
            Vault.open(store, old_key)
        vault = Vault.open(store, new_key)
        assert {a: vault.get(a).password for a in ("orders", "billing")} == {  # type: ignore[union-attr]
            "orders": "Orders-Pw-1",
            "billing": "Billing-Pw-2",
        }
        assert load_key(store, new_key, "acme") == "sk-acme-provider-key"
        with pytest.raises(ProviderKeyError):
            load_key(store, old_key, "acme")
    # A Gate that opened the vault before follows the key file.
    orders = running.get("orders")
    assert orders is not None and orders.password == "Orders-Pw-1"
    # Recorded, with fingerprints and counts only.
    records = json.loads(qmesh(config, "audit", "--control", "--json").stdout)
    rekey = records[-1]
    assert rekey["action"] == "secrets.rekey"
    assert rekey["detail"]["to"] == key_fingerprint(new_key).hex()[:16]
    assert rekey["detail"]["vault_secrets"] == 2
    text = json.dumps(records)
    for secret in (base64.b64encode(new_key).decode(), base64.b64encode(old_key).decode()):
        assert secret not in text and secret not in done.stdout


def test_a_key_from_the_environment_is_rekeyed_into_a_new_file(tmp_path: Path) -> None:
    gate = make_gate_dir(tmp_path)
    key_text = (gate.path / "master.key").read_text().strip()
    (gate.path / "master.key").unlink()
    config = tmp_path / "gate.toml"
    config.write_text(gate.config_text())
    env = {"QMESH_MASTER_KEY": key_text}
    dsn = tmp_path / "orders.dsn"
    dsn.write_text("postgresql://app:Orders-Pw-1@127.0.0.1:5432/orders")
    qmesh(config, "secrets", "set", "db.orders", "--dsn-file", str(dsn), env=env)
    refused = qmesh(config, "secrets", "rekey", ok=False, env=env)
    assert "give --new-key-file" in refused.stderr
    target = tmp_path / "new.key"
    done = qmesh(config, "secrets", "rekey", "--new-key-file", str(target), env=env)
    assert "move it into your secret manager" in done.stdout
    assert target.stat().st_mode & 0o777 == 0o600
    new_text = target.read_text().strip()
    assert new_text not in done.stdout + done.stderr
    listed = qmesh(config, "secrets", "list", env={"QMESH_MASTER_KEY": new_text})
    assert "db.orders" in listed.stdout
    qmesh(config, "secrets", "list", ok=False, env=env)  # the old key opens nothing


def test_the_master_key_from_a_command(tmp_path: Path) -> None:
    gate = make_gate_dir(tmp_path)
    kept = tmp_path / "secret-manager" / "qmesh.key"
    kept.parent.mkdir()
    (gate.path / "master.key").rename(kept)
    config = tmp_path / "gate.toml"
    config.write_text(
        gate.config_text().replace("[gate]\n", f'[gate]\nmaster_key_command = ["cat", "{kept}"]\n')
    )
    dsn = tmp_path / "orders.dsn"
    dsn.write_text("postgresql://app:Orders-Pw-1@127.0.0.1:5432/orders")
    qmesh(config, "secrets", "set", "db.orders", "--dsn-file", str(dsn))
    assert "db.orders" in qmesh(config, "secrets", "list").stdout
    assert not (gate.path / "master.key").exists()  # never written beside the state
    broken = tmp_path / "broken.toml"
    broken.write_text(
        gate.config_text().replace("[gate]\n", '[gate]\nmaster_key_command = ["false"]\n')
    )
    failed = qmesh(broken, "secrets", "list", ok=False)
    assert "gate.master_key_command (false) failed with status 1" in failed.stderr
