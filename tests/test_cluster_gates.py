"""Gates registering in one shared state, as an operator sees them with
``qmesh gates``: real Gate processes on a real PostgreSQL, a ``kill -9``,
a clean stop, a restart, and a second Gate that takes a live Gate's name."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from clusterkit import gate_config, gates, qmesh
from pgcluster import PgCluster
from pgkit import RealDb
from processkit import free_port, start_role, stop, wait_for

DEADLINE_S = 30.0


def test_gates_register_heartbeat_and_are_marked_gone_or_stopped(
    tmp_path: Path, pg_cluster: PgCluster
) -> None:
    url = RealDb(pg_cluster, prefix="cluster").dsn()
    data = tmp_path / "gate"
    assert qmesh(data, url, "keys", "init").returncode == 0
    assert qmesh(data, url, "secrets", "init-master-key").returncode == 0
    ports = {"gate-a": free_port(), "gate-b": free_port()}
    for name, port in ports.items():
        gate_config(tmp_path / f"{name}.toml", data, url, name, tunnel=port,
                    heartbeat_s=0.5, gone_after_s=2.0)  # fmt: skip
    started = {
        name: start_role("gate", tmp_path / f"{name}.toml", tmp_path / f"{name}.log")
        for name in ports
    }
    try:
        wait_for("both Gates live in `qmesh gates`", lambda: {
            n: g["state"] for n, g in gates(data, url).items()
        } == {"gate-a": "live", "gate-b": "live"}, DEADLINE_S)  # fmt: skip
        listed = gates(data, url)
        for name, port in ports.items():
            assert listed[name]["tunnel"] == f"127.0.0.1:{port}"
            assert listed[name]["http"].startswith("http://127.0.0.1:")
            assert listed[name]["sessions"] == 0
        table = qmesh(data, url, "gates").stdout.splitlines()
        assert table[0].split() == [
            "NAME", "STATE", "TUNNEL", "HTTP", "HOST", "SINCE", "SESSIONS", "HEARTBEAT"
        ]  # fmt: skip
        assert table[1].split()[:3] == ["gate-a", "live", f"127.0.0.1:{ports['gate-a']}"]

        # A second Gate that takes a live Gate's name, elsewhere: refused, in one line.
        gate_config(tmp_path / "impostor.toml", data, url, "gate-a")
        impostor = start_role("gate", tmp_path / "impostor.toml", tmp_path / "impostor.log")
        assert impostor.wait(timeout=DEADLINE_S) == 2
        refusal = (tmp_path / "impostor.log").read_text()
        assert "gate name 'gate-a' is held by a live Gate at 127.0.0.1:" in refusal
        assert "give each Gate its own gate.name" in refusal and "Traceback" not in refusal
        assert gates(data, url)["gate-a"]["tunnel"] == f"127.0.0.1:{ports['gate-a']}"

        # kill -9: no goodbye; the Gate is gone once its heartbeat is older than its deadline.
        started["gate-b"].send_signal(signal.SIGKILL)
        started["gate-b"].wait(timeout=DEADLINE_S)
        killed = time.monotonic()
        wait_for("gate-b gone", lambda: gates(data, url)["gate-b"]["state"] == "gone", DEADLINE_S)
        print(f"gate-b marked gone {time.monotonic() - killed:.1f} s after kill -9")
        assert gates(data, url)["gate-a"]["state"] == "live"

        # The same Gate restarted (same host, same tunnel address) takes its row back.
        started["gate-b"] = start_role("gate", tmp_path / "gate-b.toml", tmp_path / "gate-b.2.log")
        wait_for("gate-b live again", lambda: gates(data, url)["gate-b"]["state"] == "live",
                 DEADLINE_S)  # fmt: skip

        # A clean stop says so at once.
        stop(started["gate-a"])
        assert gates(data, url)["gate-a"]["state"] == "stopped"
    finally:
        for process in started.values():
            stop(process)
