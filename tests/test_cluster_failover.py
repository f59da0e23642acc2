"""An edge that knows every Gate of a cluster survives the death of its own.

Real processes throughout: two ``qmesh --role gate`` on one PostgreSQL
state, a ``qmesh --role minigate`` whose credential lists both, and the
official ``openai`` client (no retries of its own) sending a steady stream
of chat completions through the MiniGate. The Gate the MiniGate is attached
to is killed with ``kill -9``; the application sees no error, and its
requests go on through the other Gate. How long the failover took is
printed (``-s``); ``bench/cluster.py`` is where it is measured."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import openai
from pgcluster import PgCluster
from pgkit import RealDb
from processkit import free_port, start_role, stop, wait_for

DEADLINE_S = 60.0


def qmesh(data_dir: Path, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QMESH_")}
    env["QMESH_GATE__DATABASE_URL"] = url
    result = subprocess.run(
        [sys.executable, "-m", "qmesh", "--data-dir", str(data_dir), *args],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result


def gates(data_dir: Path, url: str) -> dict[str, dict[str, Any]]:
    listed = json.loads(qmesh(data_dir, url, "gates", "--json").stdout)
    return {g["name"]: g for g in listed}


class Traffic:
    """Chat completions one after another on one keep-alive client, until stopped."""

    def __init__(self, base_url: str, key: str) -> None:
        self.client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=30)
        self.answered: list[float] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            try:
                reply = self.client.chat.completions.create(
                    model="qg://task=keywords",
                    messages=[{"role": "user", "content": f"failover request {n} about gates"}],
                )
                assert reply.choices[0].message.content, reply
                self.answered.append(time.monotonic())
            except Exception as exc:  # every error is what the test counts
                self.errors.append(f"{type(exc).__name__}: {exc}")


def test_llm_requests_survive_the_kill_of_the_edges_gate(
    tmp_path: Path, pg_cluster: PgCluster
) -> None:
    url = RealDb(pg_cluster, prefix="failover").dsn()
    data = tmp_path / "gate"
    qmesh(data, url, "keys", "init")
    qmesh(data, url, "secrets", "init-master-key")
    key = qmesh(data, url, "apps", "add", "shop").stdout.strip().splitlines()[-1]
    tunnels = {name: free_port() for name in ("gate-a", "gate-b")}
    for name, tunnel in tunnels.items():
        (tmp_path / f"{name}.toml").write_text(
            f'data_dir = "{data}"\n'
            f'[gate]\nname = "{name}"\ntunnel_listen = "127.0.0.1:{tunnel}"\n'
            f'http_listen = "127.0.0.1:{free_port()}"\ndatabase_url = "{url}"\n'
            "[gate.cluster]\nheartbeat_interval_s = 0.25\ngone_after_s = 1.0\n"
        )
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
    try:
        wait_for("both Gates live", lambda: all(
            g["state"] == "live" for g in gates(data, url).values()
        ) and len(gates(data, url)) == 2, DEADLINE_S)  # fmt: skip
        processes["edge"] = start_role("minigate", tmp_path / "edge.toml", tmp_path / "edge.log")

        def attached() -> str | None:
            held = [
                n for n, g in gates(data, url).items() if g["state"] == "live" and g["sessions"]
            ]
            return held[0] if len(held) == 1 else None

        wait_for("the edge attached to a Gate", attached, DEADLINE_S)
        victim = attached()
        assert victim is not None
        survivor = next(n for n in tunnels if n != victim)
        traffic.start()
        wait_for("requests flowing", lambda: len(traffic.answered) >= 20, DEADLINE_S)

        processes[victim].send_signal(signal.SIGKILL)
        processes[victim].wait(timeout=DEADLINE_S)
        killed = time.monotonic()
        wait_for("requests answered through the other Gate",
                 lambda: sum(t > killed for t in traffic.answered) >= 20, DEADLINE_S)  # fmt: skip
        first = min(t for t in traffic.answered if t > killed)
        print(f"first answer {1000 * (first - killed):.0f} ms after kill -9 of {victim}")
        traffic.stop()
        assert traffic.errors == []
        wait_for("the edge's session at the survivor",
                 lambda: gates(data, url)[survivor]["sessions"] == 1, DEADLINE_S)  # fmt: skip
        assert "trying the next" in (tmp_path / "edge.log").read_text()
    finally:
        traffic.stop()
        for process in processes.values():
            stop(process)
