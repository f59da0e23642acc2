"""The control-plane audit: every change of trust is a chained record.

Each command runs as an operator runs it (``qmesh …`` in a subprocess) on a
Gate's data directory; the actions through a running Gate's API are made
with a named operator's key over a real socket, against a real MiniGate's
session. Each record must exist, name who did it, verify in the chain
(``qmesh ledger verify``) and hold no secret: not an app key, an operator
token, an edge credential or a database password.
"""

from __future__ import annotations

import getpass
import json
import socket
import sqlite3
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from daemonkit import FAST_TUNNEL, make_gate_dir
from processkit import free_port, start_role, stop
from processkit import qmesh_cli as qmesh

DEADLINE_S = 30.0  # generous: the event must happen, how fast is for bench/
DB_PASSWORD = "s3cret-Db-Passw0rd"


def control(config: Path) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = json.loads(
        qmesh(config, "audit", "--control", "--json", "--limit", "1000").stdout
    )
    return records


def test_every_cli_change_is_recorded_chained_and_secret_free(tmp_path: Path) -> None:
    gate = make_gate_dir(tmp_path)
    config = tmp_path / "gate.toml"
    config.write_text(gate.config_text())
    secrets: list[str] = [gate.admin_key]
    (tmp_path / "orders.dsn").write_text(f"postgresql://shop:{DB_PASSWORD}@127.0.0.1:5432/orders")
    steps: list[tuple[list[str], str, dict[str, Any]]] = [
        (["enroll", "minigate", "edge-1", "--gate", "127.0.0.1:1"], "identities.enroll",
         {"name": "edge-1", "role": "minigate"}),
        (["revoke", "edge-1"], "identities.revoke", {"name": "edge-1"}),
        (["apps", "add", "shop"], "apps.add", {"app": "shop"}),
        (["apps", "rotate-key", "shop", "--overlap", "0"], "apps.rotate_key", {"app": "shop"}),
        (["apps", "disable", "shop"], "apps.disable", {"app": "shop"}),
        (["apps", "enable", "shop"], "apps.enable", {"app": "shop"}),
        (["apps", "policy", "shop", "--read-only"], "apps.policy", {"app": "shop"}),
        (["operators", "add", "alice", "--role", "viewer"], "operators.add",
         {"operator": "alice", "role": "viewer"}),
        (["operators", "set-role", "alice", "operator"], "operators.set_role",
         {"operator": "alice", "from": "viewer", "to": "operator"}),
        (["operators", "remove", "alice"], "operators.remove", {"operator": "alice"}),
        (["secrets", "set", "db.orders", "--dsn-file", str(tmp_path / "orders.dsn")],
         "secrets.set", {"alias": "orders"}),
        (["secrets", "delete", "db.orders"], "secrets.delete", {"alias": "orders"}),
    ]  # fmt: skip
    actor = f"cli:{getpass.getuser()}@{socket.gethostname()}"
    for args, action, detail in steps:
        before = len(control(config))
        done = qmesh(config, *args)
        secrets += [line.strip() for line in done.stdout.splitlines() if len(line.strip()) > 20]
        records = control(config)
        assert len(records) == before + 1, (args, records[before:])
        record = records[-1]
        assert record["action"] == action
        assert record["actor"] == actor
        assert detail.items() <= record["detail"].items(), record
    verified = json.loads(qmesh(config, "ledger", "verify", "--json").stdout)
    audit = next(chain for chain in verified if chain["chain"] == "audit")
    assert audit == {"chain": "audit", "rows": len(steps), "ok": True, "problems": []}
    # No secret anywhere in the trail: not in what the command prints, not in the table.
    shown = qmesh(config, "audit", "--control").stdout
    with sqlite3.connect(gate.path / "state.db") as db:
        stored = json.dumps(db.execute("SELECT * FROM qg_audit").fetchall(), default=repr)
    assert len(secrets) >= 5  # the keys, tokens and credentials the commands printed
    for secret in [*secrets, DB_PASSWORD]:
        assert secret not in shown and secret not in stored
        assert secret.split(":", 1)[-1] not in stored


def test_an_operator_action_through_the_gate_names_the_operator(tmp_path: Path) -> None:
    gate = make_gate_dir(tmp_path)
    config = tmp_path / "gate.toml"
    config.write_text(gate.config_text())
    token = qmesh(config, "operators", "add", "alice", "--role", "operator").stdout.strip()
    credential = tmp_path / "edge.cred"
    qmesh(config, "enroll", "minigate", "edge-1", "--out", str(credential),
          "--gate", f"127.0.0.1:{gate.tunnel_port}")  # fmt: skip
    edge_config = tmp_path / "edge.toml"
    edge_config.write_text(
        f'data_dir = "{tmp_path / "edge"}"\n[minigate]\ncredential_file = "{credential}"\n'
        f'pg_listen = "127.0.0.1:{free_port()}"\nllm_listen = "127.0.0.1:{free_port()}"\n'
        + FAST_TUNNEL
    )
    gate_process = start_role("gate", config, tmp_path / "gate.log")
    edge_process = start_role("minigate", edge_config, tmp_path / "edge.log")
    try:
        url = f"http://127.0.0.1:{gate.http_port}/api/sessions/kill"

        def kill() -> int:
            request = urllib.request.Request(
                url,
                data=json.dumps({"target": "edge-1"}).encode(),
                headers={"authorization": f"Bearer {token}"},
            )
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    return int(response.status)
            except urllib.error.HTTPError as error:
                return error.code
            except OSError:
                return 0

        deadline = time.monotonic() + DEADLINE_S
        while kill() != 200:  # 404 until the edge's session is up
            assert time.monotonic() < deadline, (tmp_path / "edge.log").read_text()[-2000:]
            time.sleep(0.05)
        deadline = time.monotonic() + DEADLINE_S
        while not (kills := [r for r in control(config) if r["action"] == "sessions.kill"]):
            assert time.monotonic() < deadline, "the Gate's ledger did not write the record"
            time.sleep(0.05)
    finally:
        stop(edge_process)
        stop(gate_process)
    record = kills[0]
    assert record["actor"] == "alice"
    assert record["detail"]["target"] == "edge-1"
    assert record["detail"]["from"] == "127.0.0.1"
    assert record["detail"]["ended"][0].startswith("edge-1/")
    verified = json.loads(qmesh(config, "ledger", "verify", "--json").stdout)
    assert all(chain["ok"] for chain in verified)
