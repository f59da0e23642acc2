"""One-time join tokens: an edge enrolls itself, its private key made on the
edge and never seen by the Gate; a token works once, and not after its time.

Real processes: the Gate, MiniGates joining with ``minigate.join_token_file``,
and ``qmesh`` commands; waits are on conditions.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from daemonkit import FAST_TUNNEL, make_gate_dir
from processkit import eventually, free_port, start_role, stop
from processkit import qmesh_cli as qmesh

from qmesh.identity import load_credential
from qmesh.state import StateStore


def edge_config(tmp_path: Path, name: str, token_file: Path) -> Path:
    config = tmp_path / f"{name}.toml"
    config.write_text(
        f'data_dir = "{tmp_path / name}"\n[minigate]\n'
        f'credential_file = "{tmp_path / f"{name}.cred"}"\njoin_token_file = "{token_file}"\n'
        f'pg_listen = "127.0.0.1:{free_port()}"\nllm_listen = "127.0.0.1:{free_port()}"\n'
        + FAST_TUNNEL
    )
    return config


def test_a_token_enrolls_one_edge_with_its_own_key_once(tmp_path: Path) -> None:
    gate = make_gate_dir(tmp_path)
    config = tmp_path / "gate.toml"
    config.write_text(gate.config_text())
    token_file = tmp_path / "web-7.join"
    qmesh(config, "tokens", "create", "--role", "minigate", "--name", "web-7", "--ttl", "10m",
          "--credential-ttl", "30d", "--gate", f"127.0.0.1:{gate.tunnel_port}",
          "--out", str(token_file))  # fmt: skip
    assert token_file.stat().st_mode & 0o777 == 0o600
    expired_file = tmp_path / "late.join"
    qmesh(config, "tokens", "create", "--role", "minigate", "--name", "late", "--ttl", "1s",
          "--gate", f"127.0.0.1:{gate.tunnel_port}", "--out", str(expired_file))  # fmt: skip
    gate_process = start_role("gate", config, tmp_path / "gate.log")
    first = start_role("minigate", edge_config(tmp_path, "first", token_file), tmp_path / "a.log")
    processes = [first]
    try:
        credential_file = tmp_path / "first.cred"
        eventually(credential_file.exists, "the joined credential")
        credential = load_credential(credential_file)
        assert credential.name == "web-7" and credential.role == "minigate"
        assert credential_file.stat().st_mode & 0o777 == 0o600
        with StateStore.open(gate.path / "state.db") as store:
            identity = store.get_identity("web-7")
        # The Gate holds the public key the edge made; the private key is the edge's alone.
        assert identity is not None and identity.public_key == credential.public_key
        assert identity.expires_at is not None and identity.expires_at > time.time() + 29 * 86400
        assert credential.private_key not in (gate.path / "state.db").read_bytes()

        # The same token, again: refused, and nothing is written.
        second = start_role("minigate", edge_config(tmp_path, "second", token_file),
                            tmp_path / "b.log")  # fmt: skip
        processes.append(second)
        eventually(lambda: "this join token was used already" in (tmp_path / "b.log").read_text(),
                 "the second edge's refusal")  # fmt: skip
        assert not (tmp_path / "second.cred").exists()
        # A token past its time: refused.
        tokens = json.loads(qmesh(config, "tokens", "list", "--json").stdout)
        late_expiry = next(t["expires_at"] for t in tokens if t["name"] == "late")
        eventually(lambda: time.time() > late_expiry, "the late token's expiry")
        late = start_role("minigate", edge_config(tmp_path, "late", expired_file),
                          tmp_path / "c.log")  # fmt: skip
        processes.append(late)
        eventually(lambda: "this join token has expired" in (tmp_path / "c.log").read_text(),
                 "the late edge's refusal")  # fmt: skip
        # The joined edge restarts from its credential file, token or not.
        stop(first)
        processes.remove(first)
        again = start_role("minigate", edge_config(tmp_path, "first", token_file),
                           tmp_path / "a2.log")  # fmt: skip
        processes.append(again)
        eventually(lambda: "connected to gate" in (tmp_path / "a2.log").read_text(),
                 "the restart with the credential")  # fmt: skip
        states = {t["name"]: t["state"] for t in json.loads(
            qmesh(config, "tokens", "list", "--json").stdout)}  # fmt: skip
        assert states == {"web-7": "used", "late": "expired"}
        actions = [r["action"] for r in json.loads(
            qmesh(config, "audit", "--control", "--json").stdout)]  # fmt: skip
        assert actions.count("tokens.create") == 2 and "identities.join" in actions
    finally:
        for process in processes:
            stop(process)
        stop(gate_process)
