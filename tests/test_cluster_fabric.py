"""One fabric across the Gates: a request at Gate A is served by a daemon
attached only to Gate B, through B.

Two Gates in this process on one real PostgreSQL state (they find each
other in the registry and link over the sealed tunnel with the shared Gate
key), a real daemon process serving the real Gemma 3 270M whose only Gate
is B, and the ``openai`` client at A."""

from __future__ import annotations

import time
from pathlib import Path

import attrs
import openai
import processkit
import pytest
import trio
from clusterkit import start_gate
from daemonkit import (
    GEMMA_ID,
    daemon_config_text,
    gemma_path,
    http_json,
    make_gate_dir,
    model_dir_with,
    require_llama,
    wait_until,
)
from pgcluster import PgCluster
from pgkit import RealDb

from qmesh.identity import GateKeys, enroll, write_private_file
from qmesh.state import StateStore

pytestmark = pytest.mark.slow


async def test_a_request_at_one_gate_is_served_by_a_daemon_at_another(
    nursery: trio.Nursery, tmp_path: Path, pg_cluster: PgCluster
) -> None:
    gemma_path()
    require_llama()
    url = RealDb(pg_cluster, prefix="fabric").dsn()
    gate_dir = make_gate_dir(tmp_path)
    with StateStore.open(url) as store:
        token = f"app:{store.add_app('app')}"
        admin = f"admin:{store.add_app('admin')}"
    gate_a = await start_gate(nursery, tmp_path, gate_dir.path, url, "gate-a")
    gate_b = await start_gate(nursery, tmp_path, gate_dir.path, url, "gate-b")

    # The daemon knows only Gate B.
    with StateStore.open(url) as store:
        credential = enroll(
            store, GateKeys.load(gate_dir.path), "daemon", "gpu-b", gate_b["tunnel"]
        )
    credential_file = tmp_path / "gpu-b.cred"
    write_private_file(credential_file, (credential.encode() + "\n").encode())
    _, b_port = gate_b["tunnel"].rsplit(":", 1)
    config = tmp_path / "daemon.toml"
    config.write_text(
        daemon_config_text(
            tmp_path / "daemon-data", credential_file,
            attrs.evolve(gate_dir, tunnel_port=int(b_port)),
            model_dirs=(model_dir_with(tmp_path, GEMMA_ID),), extra="threads = 1\n",
        )
    )  # fmt: skip
    daemon = processkit.start_role("daemon", config, tmp_path / "daemon.log")
    try:
        router_a = gate_a["llm"].router
        await wait_until(
            lambda: any(c.kind == "daemon" and c.healthy for c in router_a.candidates), 90
        )
        seen_at_a = gate_a["inventory"].get("gpu-b", now=time.time())
        seen_at_b = gate_b["inventory"].get("gpu-b", now=time.time())
        assert seen_at_a is not None and seen_at_a.gate == "gate-b"  # attached to B
        assert seen_at_b is not None and seen_at_b.gate is None  # B's own
        assert not any(s.peer == "gpu-b" for s in gate_a["server"].sessions.values())

        client = openai.OpenAI(
            base_url=f"{gate_a['http']}/v1", api_key=token, max_retries=0, timeout=120
        )

        def ask() -> tuple[str, str]:
            chat = client.chat.completions.create(
                model="qg://task=creative_writing;privacy=local",
                messages=[{"role": "user", "content": "Write one sentence about the sea."}],
                max_tokens=16,
            )
            return chat.model, chat.choices[0].message.content or ""

        model, text = await trio.to_thread.run_sync(ask)
        assert model == GEMMA_ID  # the daemon at Gate B answered the request at Gate A
        assert len(text.split()) >= 2
        # The dashboard and the inventory API at A show the node, and where it is.
        status, dashboard = await http_json("GET", f"{gate_a['http']}/api/dashboard", bearer=admin)
        assert status == 200
        assert [(n["name"], n["gate"]) for n in dashboard["nodes"]] == [("gpu-b", "gate-b")]
        status, inventory = await http_json("GET", f"{gate_a['http']}/api/inventory", bearer=admin)
        assert status == 200
        assert [(n["name"], n["gate"]) for n in inventory["nodes"]] == [("gpu-b", "gate-b")]
    finally:
        processkit.stop(daemon, timeout=10)
