"""Draining a Gate of a cluster, under load: SIGTERM, and ``qmesh gates drain``.

Real processes: three ``qmesh --role gate`` on one PostgreSQL state, a
``qmesh --role minigate`` whose credential lists all three, and the
``openai`` client (no retries of its own) sending non-streamed chat
completions through the MiniGate without a pause. The Gate the MiniGate is
attached to is stopped with SIGTERM: it takes nothing new, sends the edge to
another Gate and exits; then the next one is drained with ``qmesh gates
drain``. Not one request fails.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

from clusterkit import Traffic, gate_config, gates
from clusterkit import qmesh_ok as qmesh
from pgcluster import PgCluster
from pgkit import RealDb
from processkit import free_port, start_role, stop, wait_for

DEADLINE_S = 60.0


def test_draining_gates_under_load_fails_no_request(tmp_path: Path, pg_cluster: PgCluster) -> None:
    url = RealDb(pg_cluster, prefix="drain").dsn()
    data = tmp_path / "gate"
    qmesh(data, url, "keys", "init")
    qmesh(data, url, "secrets", "init-master-key")
    key = qmesh(data, url, "apps", "add", "shop").stdout.strip().splitlines()[-1]
    tunnels = {name: free_port() for name in ("gate-a", "gate-b", "gate-c")}
    for name, tunnel in tunnels.items():
        gate_config(tmp_path / f"{name}.toml", data, url, name, tunnel=tunnel)
    credential = tmp_path / "edge.cred"
    qmesh(data, url, "enroll", "minigate", "edge-1", "--out", str(credential),
          *(arg for t in tunnels.values() for arg in ("--gate", f"127.0.0.1:{t}")))  # fmt: skip
    llm_port = free_port()
    (tmp_path / "edge.toml").write_text(
        f'data_dir = "{tmp_path / "edge"}"\n'
        f'[minigate]\ncredential_file = "{credential}"\n'
        f'pg_listen = "127.0.0.1:{free_port()}"\nllm_listen = "127.0.0.1:{llm_port}"\n'
        "[tunnel]\nheartbeat_interval_s = 0.5\ndead_after_s = 3.0\nfailover_jitter_s = 0.2\n"
    )
    processes = {
        name: start_role("gate", tmp_path / f"{name}.toml", tmp_path / f"{name}.log")
        for name in tunnels
    }
    traffic = Traffic(f"http://127.0.0.1:{llm_port}/v1", f"shop:{key}")

    def attached(exclude: set[str]) -> str | None:
        held = [
            n for n, g in gates(data, url).items()
            if g["state"] == "live" and g["sessions"] and n not in exclude
        ]  # fmt: skip
        return held[0] if len(held) == 1 else None

    try:
        wait_for("three Gates live", lambda: [
            g["state"] for g in gates(data, url).values()
        ] == ["live"] * 3, DEADLINE_S)  # fmt: skip
        processes["edge"] = start_role("minigate", tmp_path / "edge.toml", tmp_path / "edge.log")
        wait_for("the edge attached", lambda: attached(set()), DEADLINE_S)
        first = attached(set())
        assert first is not None
        traffic.start()
        wait_for("requests flowing", lambda: len(traffic.answered) >= 20, DEADLINE_S)

        # SIGTERM: the Gate drains and exits; the edge is on another Gate.
        stopped = time.monotonic()
        processes[first].send_signal(signal.SIGTERM)
        assert processes[first].wait(timeout=DEADLINE_S) == 0
        wait_for("answers through another Gate",
                 lambda: traffic.answered_since(stopped) >= 20, DEADLINE_S)  # fmt: skip
        assert (
            "draining: 1 edge session(s) sent to other gates"
            in (tmp_path / f"{first}.log").read_text()
        )
        wait_for("the edge attached again", lambda: attached({first}), DEADLINE_S)
        second_name = attached({first})
        assert second_name is not None and second_name != first

        # qmesh gates drain: the Gate stays up, takes nothing, the edge moves on.
        asked = time.monotonic()
        qmesh(data, url, "gates", "drain", second_name)
        wait_for("the Gate draining", lambda: gates(data, url)[second_name]["state"]
                 == "draining", DEADLINE_S)  # fmt: skip
        wait_for("the edge on the last Gate", lambda: attached({first, second_name}), DEADLINE_S)
        wait_for("answers through the last Gate",
                 lambda: traffic.answered_since(asked) >= 20, DEADLINE_S)  # fmt: skip
        assert processes[second_name].poll() is None  # drained, not stopped
    finally:
        traffic.stop()
        for process in processes.values():
            stop(process)
    assert traffic.errors == [], traffic.errors[:5]
    actions = [
        line for line in qmesh(data, url, "audit", "--control").stdout.splitlines()
        if "gates.drain" in line
    ]  # fmt: skip
    assert len(actions) == 1 and second_name in actions[0]
