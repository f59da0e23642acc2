"""The roles as an operator runs them: separate `qmesh --role` processes,
identities from `qmesh keys init` / `enroll` / `revoke`, TCP forwarding."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from processkit import LoopbackServer, echo, free_port, start_role, stop, wait_for

from qmesh import _core


def qmesh(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qmesh", "--data-dir", str(data_dir), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def echo_server() -> Iterator[LoopbackServer]:
    server = LoopbackServer(echo)
    yield server
    server.close()


def echo_through(port: int, payload: bytes, deadline: float = 20.0) -> bytes:
    """Connect to the MiniGate's forward port (retrying while it starts) and echo."""
    end = time.monotonic() + deadline
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
                conn.sendall(payload)
                conn.shutdown(socket.SHUT_WR)
                received = bytearray()
                while data := conn.recv(65536):
                    received += data
                return bytes(received)
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.1)


def kernel_keeps_time_slices() -> bool:
    """Whether threads here may ask for a time slice of their own (Linux
    6.12 on); asked from a thread of its own, so this one keeps its slice."""
    answer: list[bool] = []
    probe = threading.Thread(target=lambda: answer.append(_core.request_time_slice(0.001)))
    probe.start()
    probe.join()
    return answer == [True]


def time_slice_ns(pid: int, tid: int | None = None) -> int:
    """The time slice of a process's thread (its main thread by default),
    as its scheduler shows it."""
    for line in Path(f"/proc/{pid}/task/{tid or pid}/sched").read_text().splitlines():
        if line.startswith("se.slice"):
            return int(line.split(":")[1])
    raise AssertionError(f"no se.slice for {pid}/{tid}")


def engine_threads(pid: int) -> list[int]:
    """The thread ids of a process's relay engine threads."""
    tasks = Path(f"/proc/{pid}/task")
    return [
        int(task.name)
        for task in tasks.iterdir()
        if (task / "comm").read_text().startswith("qmesh-engine")
    ]


def test_forward_enroll_revoke_across_processes(
    tmp_path: Path, echo_server: LoopbackServer
) -> None:
    gate_dir = tmp_path / "gate"
    tunnel_port, forward_port = free_port(), free_port()
    assert qmesh(gate_dir, "keys", "init").returncode == 0
    credential = tmp_path / "edge.cred"
    enrolled = qmesh(
        gate_dir, "enroll", "minigate", "edge-1", "--gate", f"127.0.0.1:{tunnel_port}",
        "--out", str(credential),
    )  # fmt: skip
    assert enrolled.returncode == 0, enrolled.stderr
    assert oct(credential.stat().st_mode & 0o777) == "0o600"

    gate_config = tmp_path / "gate.toml"
    gate_config.write_text(
        f'data_dir = "{gate_dir}"\n'
        f'[gate]\ntunnel_listen = "127.0.0.1:{tunnel_port}"\n'
        f'forward_allow = ["127.0.0.1:{echo_server.port}"]\n'
        "[tunnel]\nheartbeat_interval_s = 0.5\ndead_after_s = 2.0\n"
    )
    edge_config = tmp_path / "minigate.toml"
    edge_config.write_text(
        f'data_dir = "{tmp_path / "edge"}"\n'
        f'[minigate]\ngate = "127.0.0.1:{tunnel_port}"\ncredential_file = "{credential}"\n'
        f'[[minigate.forward]]\nlisten = "127.0.0.1:{forward_port}"\n'
        f'target = "127.0.0.1:{echo_server.port}"\n'
        "[tunnel]\nreconnect_max_s = 0.5\n"
    )
    gate = start_role("gate", gate_config, tmp_path / "gate.log")
    edge = start_role("minigate", edge_config, tmp_path / "minigate.log")
    try:
        payload = os.urandom(2_000_000)
        assert echo_through(forward_port, payload) == payload
        if kernel_keeps_time_slices():
            # The event loops serve requests: woken, they preempt bulk work.
            assert time_slice_ns(gate.pid) == time_slice_ns(edge.pid) == 100_000
            # Their engine threads, which serve many streams a wake-up,
            # keep the kernel's own.
            for role in (gate, edge):
                engines = engine_threads(role.pid)
                assert engines
                assert all(time_slice_ns(role.pid, tid) != 100_000 for tid in engines)

        # Revocation takes effect at the next handshake: restart the Gate.
        assert qmesh(gate_dir, "revoke", "edge-1").returncode == 0
        stop(gate)
        gate = start_role("gate", gate_config, tmp_path / "gate2.log")
        assert edge.wait(timeout=30) == 2  # the MiniGate gives up: no retry can help
        edge_log = (tmp_path / "minigate.log").read_text()
        assert "revoked" in edge_log
        gate_log = (tmp_path / "gate2.log").read_text()
        assert gate.poll() is None, gate_log  # the Gate carries on
    finally:
        stop(edge)
        stop(gate)
    for log in tmp_path.glob("*.log"):
        text = log.read_text()
        assert credential.read_text().strip() not in text  # no secret in any log
        assert "Traceback" not in text, text


def test_unenrolled_minigate_is_refused(tmp_path: Path) -> None:
    gate_dir, other_dir = tmp_path / "gate", tmp_path / "other"
    tunnel_port = free_port()
    assert qmesh(gate_dir, "keys", "init").returncode == 0
    # A credential issued by *another* Gate that holds the same Gate key
    # would be enrolled there, not here: copy the key to forge that case.
    other_dir.mkdir(mode=0o700)
    (other_dir / "gate.key").write_bytes((gate_dir / "gate.key").read_bytes())
    os.chmod(other_dir / "gate.key", 0o600)
    credential = tmp_path / "stranger.cred"
    result = qmesh(other_dir, "enroll", "minigate", "stranger", "--gate",
                   f"127.0.0.1:{tunnel_port}", "--out", str(credential))  # fmt: skip
    assert result.returncode == 0, result.stderr
    gate_config = tmp_path / "gate.toml"
    gate_config.write_text(
        f'data_dir = "{gate_dir}"\n[gate]\ntunnel_listen = "127.0.0.1:{tunnel_port}"\n'
    )
    edge_config = tmp_path / "minigate.toml"
    edge_config.write_text(
        f'data_dir = "{tmp_path / "edge"}"\n'
        f'[minigate]\ngate = "127.0.0.1:{tunnel_port}"\ncredential_file = "{credential}"\n'
    )
    gate_log = tmp_path / "gate.log"
    gate = start_role("gate", gate_config, gate_log)
    try:
        wait_for("the Gate's tunnel", lambda: "tunnel listening" in gate_log.read_text(), 60)
        edge = start_role("minigate", edge_config, tmp_path / "minigate.log")
        assert edge.wait(timeout=30) == 2
        assert "not enrolled" in (tmp_path / "minigate.log").read_text()
        assert gate.poll() is None
    finally:
        stop(gate)


def test_missing_credential_is_a_clear_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "qmesh", "--role", "daemon", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "daemon.credential_file is required" in result.stderr
    assert "Traceback" not in result.stderr
