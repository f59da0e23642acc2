"""Rotating the Gate's identity key while an edge that holds the old one is
connected: its session goes on, its next handshake with the old key is
accepted during the overlap, and its credential is rewritten with the new.

Real processes: a Gate, a MiniGate, ``qmesh keys rotate``; waits are on
conditions.
"""

from __future__ import annotations

import base64
import json
import urllib.request
from pathlib import Path

from daemonkit import FAST_TUNNEL, make_gate_dir
from processkit import eventually, free_port, start_role, stop
from processkit import qmesh_cli as qmesh

from qmesh.identity import load_credential


def test_rotation_keeps_the_session_and_teaches_the_edge_the_new_key(tmp_path: Path) -> None:
    gate = make_gate_dir(tmp_path)
    config = tmp_path / "gate.toml"
    config.write_text(gate.config_text())
    credential_file = tmp_path / "edge.cred"
    qmesh(config, "enroll", "minigate", "edge-1", "--gate", f"127.0.0.1:{gate.tunnel_port}",
          "--out", str(credential_file))  # fmt: skip
    app_key = qmesh(config, "apps", "add", "shop").stdout.strip()
    llm_port = free_port()
    edge_config = tmp_path / "edge.toml"
    edge_config.write_text(
        f'data_dir = "{tmp_path / "edge"}"\n[minigate]\ncredential_file = "{credential_file}"\n'
        f'pg_listen = "127.0.0.1:{free_port()}"\nllm_listen = "127.0.0.1:{llm_port}"\n'
        + FAST_TUNNEL
    )
    old_key = load_credential(credential_file).gate_public_key

    def sessions() -> dict[str, str]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{gate.http_port}/api/tunnel",
            headers={"authorization": f"Bearer {gate.bearer}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return {v["peer"]: v["session"] for v in json.load(response)["sessions"]}
        except OSError:
            return {}

    def models_through_the_edge() -> bool:
        request = urllib.request.Request(
            f"http://127.0.0.1:{llm_port}/v1/models",
            headers={"authorization": f"Bearer shop:{app_key}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return bool(json.load(response)["data"])
        except OSError:
            return False

    gate_process = start_role("gate", config, tmp_path / "gate.log")
    edge = start_role("minigate", edge_config, tmp_path / "edge.log")
    try:
        session = eventually(lambda: sessions().get("edge-1"), "the edge's session")
        rotated = qmesh(config, "keys", "rotate", "--overlap", "1h")
        new_key = base64.b64decode(rotated.stdout.strip())
        assert new_key != old_key
        assert qmesh(config, "keys", "show").stdout.strip() == rotated.stdout.strip()
        eventually(lambda: "the gate key was rotated" in (tmp_path / "gate.log").read_text(),
                 "the Gate reading the new key")  # fmt: skip
        # The live session is untouched, and serves.
        assert sessions().get("edge-1") == session
        assert eventually(models_through_the_edge, "a request through the edge")

        # A new handshake with the old key: accepted (the overlap), and the
        # edge keeps the new key in its credential from then on.
        stop(edge)
        edge = start_role("minigate", edge_config, tmp_path / "edge-2.log")
        eventually(lambda: load_credential(credential_file).gate_public_key == new_key,
                 "the credential rewritten with the new key")  # fmt: skip
        assert eventually(models_through_the_edge, "a request after the new handshake")
        assert "the gate's key was rotated" in (tmp_path / "edge-2.log").read_text()
        assert credential_file.stat().st_mode & 0o777 == 0o600
        stop(edge)
        edge = start_role("minigate", edge_config, tmp_path / "edge-3.log")
        assert eventually(models_through_the_edge, "a request with the new key")
        assert "the gate's key was rotated" not in (tmp_path / "edge-3.log").read_text()
    finally:
        stop(edge)
        stop(gate_process)
    actions = json.loads(qmesh(config, "audit", "--control", "--json").stdout)
    assert [a["action"] for a in actions].count("keys.rotate") == 1
