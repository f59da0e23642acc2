"""Daemons as an operator runs them: separate ``qmesh --role daemon``
processes with their own data directories, a Gate process, ``kill -9``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from daemonkit import (
    GEMMA_ID,
    GateDir,
    daemon_config_text,
    make_gate_dir,
    model_dir_with,
    require_llama,
)
from processkit import start_role, stop, wait_for

HEARTBEAT_S = 0.3
STALE_AFTER, GONE_AFTER = 3, 8  # missed heartbeats
SWEEP_S = 0.5  # the Gate's sweeper period: state changes land within it


def api(gate: GateDir, path: str, body: Any = None) -> Any:
    request = urllib.request.Request(
        f"http://127.0.0.1:{gate.http_port}{path}",
        data=None if body is None else json.dumps(body).encode(),
        headers={"authorization": f"Bearer {gate.bearer}", "content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.load(response)


def nodes(gate: GateDir) -> dict[str, dict[str, Any]]:
    try:
        return {n["name"]: n for n in api(gate, "/api/inventory")["nodes"]}
    except OSError:
        return {}  # the Gate is still starting


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in reversed(started):
        stop(process)


@pytest.mark.slow
def test_two_daemons_kill_stale_gone_restart(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    require_llama()
    gate = make_gate_dir(tmp_path)
    gate_config = tmp_path / "gate.toml"
    gate_config.write_text(gate.config_text(stale=STALE_AFTER, gone=GONE_AFTER))
    configs = {}
    for name in ("node-a", "node-b"):
        credential = gate.enroll_daemon(name, tmp_path / f"{name}.cred")
        dirs = (model_dir_with(tmp_path, GEMMA_ID),) if name == "node-a" else ()
        configs[name] = tmp_path / f"{name}.toml"
        configs[name].write_text(
            daemon_config_text(tmp_path / name, credential, gate, model_dirs=dirs,
                               heartbeat=HEARTBEAT_S)
        )  # fmt: skip
    processes.append(start_role("gate", gate_config, tmp_path / "gate.log"))
    daemons = {
        name: start_role("daemon", configs[name], tmp_path / f"{name}.log") for name in configs
    }
    processes.extend(daemons.values())

    def states() -> dict[str, str]:
        return {name: node["state"] for name, node in nodes(gate).items()}

    wait_for("both daemons fresh", lambda: states() == {"node-a": "fresh", "node-b": "fresh"}, 60)
    # Separate data directories: each measured and cached its own bandwidth.
    assert (tmp_path / "node-a" / "daemon" / "membench.json").exists()
    assert (tmp_path / "node-b" / "daemon" / "membench.json").exists()

    # node-a runs a model, so it has a model-server process of its own.
    answer = api(gate, "/api/daemons/node-a/v1/completions",
                 {"model": GEMMA_ID, "prompt": "Hello", "max_tokens": 4})  # fmt: skip
    assert answer["usage"]["completion_tokens"] >= 1
    wait_for(
        "the model server in the inventory",
        lambda: bool(nodes(gate)["node-a"]["runtimes"][0]["servers"]),
        10,
    )
    (server,) = nodes(gate)["node-a"]["runtimes"][0]["servers"]
    server_pid = server["pid"]
    assert psutil.Process(server_pid).ppid() == daemons["node-a"].pid

    os.kill(daemons["node-a"].pid, signal.SIGKILL)
    daemons["node-a"].wait()
    killed = time.monotonic()
    stale_limit = STALE_AFTER * HEARTBEAT_S + SWEEP_S + 0.5
    waited = wait_for("node-a stale", lambda: states()["node-a"] != "fresh", stale_limit + 2)
    assert states()["node-a"] == "stale", "stale first, not gone at once"
    assert waited <= stale_limit, f"stale after {waited:.2f}s, threshold {stale_limit:.2f}s"
    assert "no heartbeat" in nodes(gate)["node-a"]["reason"]
    wait_for("node-a gone", lambda: states()["node-a"] == "gone", GONE_AFTER * HEARTBEAT_S + 5)
    # Counted from the last heartbeat, which came up to one interval before the kill.
    assert time.monotonic() - killed >= (GONE_AFTER - 1) * HEARTBEAT_S
    assert states()["node-b"] == "fresh"  # the other daemon never missed a beat
    # The model server died with its daemon (it watches the daemon's pidfd), freeing its memory.
    wait_for("the orphaned model server to exit", lambda: not _alive(server_pid), 10)
    # Asking a gone node is a clear error, not a hang.
    with pytest.raises(urllib.error.HTTPError) as failure:
        api(gate, "/api/daemons/node-a/v1/completions", {"model": GEMMA_ID, "prompt": "x"})
    assert failure.value.code == 503

    daemons["node-a"] = start_role("daemon", configs["node-a"], tmp_path / "node-a.log")
    processes.append(daemons["node-a"])
    wait_for("node-a fresh again", lambda: states()["node-a"] == "fresh", 60)
    node = nodes(gate)["node-a"]
    assert node["reason"] == "reported in" and node["models"][0]["id"] == GEMMA_ID
    assert node["extra"]["bandwidth"]["cached"] is True  # the restart reused its measurement

    for process in processes:
        stop(process)
    for log in tmp_path.glob("*.log"):
        assert "Traceback" not in log.read_text(), log.name


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
