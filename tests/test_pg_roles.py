"""The ghost wire as an operator runs it: `qmesh --role gate` and `qmesh
--role minigate` as separate processes, set up with the CLI (keys, enroll,
apps, secrets). psql talks to the MiniGate; the real password is nowhere
the edge can read: not in its config, its log, its memory or psql's output."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

from pgcluster import PgCluster
from pgkit import RealDb
from processkit import free_port, start_role, stop
from test_roles_cli import qmesh


def memory_contains(pid: int, needle: bytes) -> bool:
    """Whether ``needle`` is anywhere in the readable memory of process ``pid``."""
    found = False
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            match = re.match(r"([0-9a-f]+)-([0-9a-f]+) (\S+)", line)
            if not match or not match.group(3).startswith("r") or "[vvar" in line:
                continue
            start, end = int(match.group(1), 16), int(match.group(2), 16)
            try:
                mem.seek(start)
                chunk = mem.read(end - start)
            except (OSError, ValueError, OverflowError):
                continue
            if needle in chunk:
                found = True
                break
    return found


def psql(dsn: str, sql: str, deadline: float = 30.0) -> subprocess.CompletedProcess[str]:
    """psql against the MiniGate, retrying while the roles start."""
    end = time.monotonic() + deadline
    while True:
        result = subprocess.run(
            ["psql", dsn, "-X", "-A", "-t", "-c", sql], capture_output=True, text=True, timeout=60
        )
        if result.returncode == 0 or time.monotonic() > end:
            return result
        if "could not connect" not in result.stderr and "Connection refused" not in result.stderr:
            return result
        time.sleep(0.2)


def test_psql_through_separate_gate_and_minigate_processes(
    tmp_path: Path, pg_cluster: PgCluster
) -> None:
    db = RealDb(pg_cluster, "roles")
    gate_dir = tmp_path / "gate"
    tunnel_port, http_port, pg_port = free_port(), free_port(), free_port()
    assert qmesh(gate_dir, "keys", "init").returncode == 0
    credential = tmp_path / "edge.cred"
    enrolled = qmesh(
        gate_dir, "enroll", "minigate", "edge-1", "--gate", f"127.0.0.1:{tunnel_port}",
        "--out", str(credential),
    )  # fmt: skip
    assert enrolled.returncode == 0, enrolled.stderr
    added = qmesh(gate_dir, "apps", "add", "shop")
    assert added.returncode == 0, added.stderr
    app_key = added.stdout.strip()
    assert qmesh(gate_dir, "secrets", "init-master-key").returncode == 0
    stored = subprocess.run(
        [sys.executable, "-m", "qmesh", "--data-dir", str(gate_dir), "secrets", "set", "db.main",
         "--dsn-stdin"],
        input=db.dsn(), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert stored.returncode == 0, stored.stderr
    assert db.password not in stored.stdout + stored.stderr

    gate_config = tmp_path / "gate.toml"
    gate_config.write_text(
        f'data_dir = "{gate_dir}"\n'
        f'[gate]\ntunnel_listen = "127.0.0.1:{tunnel_port}"\n'
        f'http_listen = "127.0.0.1:{http_port}"\n'
        '[gate.apps.shop]\ndatabases = ["main"]\n'
    )
    edge_config = tmp_path / "minigate.toml"
    edge_config.write_text(
        f'data_dir = "{tmp_path / "edge"}"\n'
        f'[minigate]\ngate = "127.0.0.1:{tunnel_port}"\ncredential_file = "{credential}"\n'
        f'pg_listen = "127.0.0.1:{pg_port}"\nllm_listen = "127.0.0.1:0"\n'
    )
    gate = start_role("gate", gate_config, tmp_path / "gate.log")
    edge = start_role("minigate", edge_config, tmp_path / "minigate.log")
    try:
        dsn = f"postgresql://shop:{app_key}@127.0.0.1:{pg_port}/main?sslmode=disable"
        result = psql(dsn, "SELECT current_user; SELECT 6 * 7")
        assert result.returncode == 0, result.stderr + (tmp_path / "gate.log").read_text()
        assert result.stdout.split() == [db.name, "42"]
        bad = psql(dsn.replace(app_key, "wrong"), "SELECT 1")
        assert "password authentication failed" in bad.stderr
        # The MiniGate never held the real password: not in its memory.
        assert edge.poll() is None
        assert not memory_contains(edge.pid, db.password.encode())
        assert memory_contains(gate.pid, db.password.encode())  # the check can find it
    finally:
        stop(edge)
        stop(gate)
    edge_side = [
        edge_config.read_text(),
        credential.read_text(),
        (tmp_path / "minigate.log").read_text(),
        result.stdout + result.stderr + bad.stdout + bad.stderr,
    ]
    assert all(db.password not in text for text in edge_side)
    gate_log = (tmp_path / "gate.log").read_text()
    assert db.password not in gate_log
    assert "Traceback" not in gate_log + edge_side[2]
