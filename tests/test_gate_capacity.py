"""A Gate that runs out of room refuses new sessions and never exits.

Two ways to run out: the session cap (``tunnel.max_sessions``), and the
process's open-file limit, here lowered under a real ``qmesh --role gate``
while edges keep arriving. A refused edge is told ``gate_full``, keeps
trying (the next Gate of its list first) and gets in once there is room;
the sessions already held carry on throughout."""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path

import trio
from processkit import free_port, start_role, stop, wait_for
from tunnelkit import (
    echo_service,
    fast_settings,
    roundtrip,
    start_edge,
    start_gate,
    until,
)

from qmesh import _core
from qmesh.config import TunnelConfig, load_config
from qmesh.identity import GateKeys, enroll
from qmesh.state import StateStore
from qmesh.tunnel import TunnelClient, TunnelServer

QUICK = {"failover_jitter_s": 0.05, "reconnect_max_s": 0.1}


async def test_a_full_gate_refuses_new_sessions_until_there_is_room(nursery: trio.Nursery) -> None:
    full = await start_gate(nursery, settings=fast_settings(max_sessions=1))
    spare = TunnelServer(
        fast_settings(),
        name="spare",
        private_key=full.private,
        authenticate=full.registry.authenticate,
        services={"echo": echo_service},
    )
    spare_port: int = await nursery.start(spare.serve, "127.0.0.1", 0)
    with trio.fail_after(30):
        async with trio.open_nursery() as first_run:
            first = await start_edge(first_run, full, "edge-1", settings=fast_settings(**QUICK))
            waiting = await start_edge(nursery, full, "edge-2", settings=fast_settings(**QUICK))
            # Refused again and again, and still trying: not connected, not ended.
            await until(lambda: full.server.sessions_refused >= 3)
            assert not waiting.connected
            stream = await first.open_stream({"service": "echo"})
            assert await roundtrip(stream, b"still served") == b"still served"
            first_run.cancel_scope.cancel()  # edge-1 leaves: its session ends
        await waiting.wait_connected()
        assert [s.peer for s in full.server.sessions.values()] == ["edge-2"]

        # An edge that knows two Gates lands on the one with room, whichever
        # it tries first.
        private, _ = full.registry.enroll("edge-3")
        both = TunnelClient(
            fast_settings(**QUICK),
            name="edge-3",
            role="minigate",
            private_key=private,
            gate_public_key=full.public,
            gate_addresses=[("127.0.0.1", full.port), ("127.0.0.1", spare_port)],
        )
        await nursery.start(both.run)
        await both.wait_connected()
        assert [s.peer for s in spare.sessions.values()] == ["edge-3"]
        stream = await both.open_stream({"service": "echo"})
        assert await roundtrip(stream, b"at the spare") == b"at the spare"


def _threads() -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("Threads:")).split()[1])


async def test_sessions_share_a_few_engine_threads(nursery: trio.Nursery) -> None:
    """A hundred more sessions (two hundred engines: both ends are in this
    process) add no thread: the engines share the process's engine threads,
    about one per core."""
    gate = await start_gate(nursery)
    first = await start_edge(nursery, gate, "edge-first")
    await first.wait_connected()
    before = _threads()
    edges = [await start_edge(nursery, gate, f"edge-{i}") for i in range(100)]
    with trio.fail_after(30):
        for edge in edges:
            await edge.wait_connected()
    assert len(gate.server.sessions) == 101
    assert _threads() - before < 10, (before, _threads())
    assert 1 <= _core.engine_threads() <= (os.cpu_count() or 1)
    stream = await edges[-1].open_stream({"service": "echo"})
    assert await roundtrip(stream, b"still one thread per core") == b"still one thread per core"


def _open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def test_a_gate_out_of_file_descriptors_refuses_edges_and_recovers(tmp_path: Path) -> None:
    """The open-file limit of a running Gate is lowered to just above what
    it holds; edges keep arriving. The Gate refuses the ones it has no room
    for (no traceback, no exit), keeps serving the others, and once the
    limit is raised again every edge gets in."""
    data = tmp_path / "gate"
    env = {k: v for k, v in os.environ.items() if not k.startswith("QMESH_")}
    await trio.run_process(
        [sys.executable, "-m", "qmesh", "--data-dir", str(data), "keys", "init"],
        env=env, capture_stdout=True, capture_stderr=True,
    )  # fmt: skip
    tunnel = free_port()
    config = tmp_path / "gate.toml"
    config.write_text(
        f'data_dir = "{data}"\n[gate]\nname = "g"\ntunnel_listen = "127.0.0.1:{tunnel}"\n'
        f'http_listen = "127.0.0.1:{free_port()}"\n'
    )
    keys = GateKeys.load(data)
    with StateStore.open(load_config(config, env={}).state_location) as store:
        credentials = [
            enroll(store, keys, "minigate", f"edge-{i}", f"127.0.0.1:{tunnel}") for i in range(40)
        ]
    log = tmp_path / "gate.log"
    gate = start_role("gate", config, log)
    settings = TunnelConfig(reconnect_initial_s=0.01, reconnect_max_s=0.2, failover_jitter_s=0.05)

    def edge(i: int) -> TunnelClient:
        credential = credentials[i]
        return TunnelClient(
            settings,
            name=credential.name,
            role="minigate",
            private_key=credential.private_key,
            gate_public_key=credential.gate_public_key,
            gate_addresses=[("127.0.0.1", tunnel)],
        )

    try:
        wait_for("the gate's tunnel", lambda: "tunnel listening" in log.read_text(), 60)
        with trio.fail_after(90):
            async with trio.open_nursery() as nursery:
                first = edge(0)
                await nursery.start(first.run)
                await first.wait_connected()
                # Room for a few more sessions, not for forty.
                # (The soft limit: lowering the hard one could not be undone.)
                soft, hard = resource.prlimit(gate.pid, resource.RLIMIT_NOFILE)
                room = _open_files(gate.pid) + 12
                resource.prlimit(gate.pid, resource.RLIMIT_NOFILE, (room, hard))
                edges = [edge(i) for i in range(1, 40)]
                for client in edges:
                    nursery.start_soon(client.run)
                await until(lambda: "gate_full" in log.read_text(), poll_s=0.05)
                assert gate.poll() is None, "the gate exited"
                assert sum(c.connected for c in edges) < len(edges)
                assert first.connected and first.sessions_lost == 0
                resource.prlimit(gate.pid, resource.RLIMIT_NOFILE, (soft, hard))
                for client in edges:
                    await client.wait_connected()
                nursery.cancel_scope.cancel()
        assert gate.poll() is None, "the gate exited"
        text = log.read_text()
        assert "failed unexpectedly" not in text and "Traceback" not in text, text[-3000:]
    finally:
        stop(gate)
