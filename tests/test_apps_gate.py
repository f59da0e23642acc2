"""App keys at a running Gate (``run_gate``): ``qmesh apps disable``,
``enable`` and ``rotate-key --overlap 0``, run as separate processes, bite on
the Gate's own HTTP port and on an edge's LLM port (the ``llm`` tunnel
service) alike; ``[gate.http]`` limits reach the Gate's listener.

Loopback only; every wait is on a condition with a generous deadline.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs
import trio
from daemonkit import GateDir, make_gate_dir
from tunnelkit import fast_settings, keypair

from qmesh.config import load_config
from qmesh.gate.role import run_gate
from qmesh.identity import GateKeys
from qmesh.llm.edge import serve_llm
from qmesh.state import StateStore
from qmesh.tunnel import TunnelClient

DEADLINE_S = 30.0  # generous: the event must happen, how fast is for bench/


@attrs.define
class Mesh:
    gate: dict[str, Any]
    dir: GateDir
    gate_port: int
    edge_port: int

    def qmesh(self, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "qmesh", "--data-dir", str(self.dir.path), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    async def status(self, port: int, token: str, raw: bytes | None = None) -> int:
        """``GET /v1/models`` (an application route) with ``token``; the status."""
        request = (
            raw
            or (
                f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                "Connection: close\r\n\r\n"
            ).encode()
        )
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(request)
            received = bytearray()
            with trio.fail_after(DEADLINE_S):
                while data := await stream.receive_some(65536):
                    received += data
        return int(received.split(b" ", 2)[1])

    async def both(self, token: str) -> tuple[int, int]:
        return await self.status(self.gate_port, token), await self.status(self.edge_port, token)

    async def until_both(self, token: str, wanted: int) -> None:
        with trio.fail_after(DEADLINE_S):
            while await self.both(token) != (wanted, wanted):  # noqa: ASYNC110 - polled
                await trio.sleep(0.02)


async def start_mesh(nursery: trio.Nursery, tmp_path: Path) -> Mesh:
    gate_dir = make_gate_dir(tmp_path)
    config_file = tmp_path / "gate.toml"
    config_file.write_text(gate_dir.config_text() + "[gate.http]\nmax_body_bytes = 2048\n")
    gate = await nursery.start(run_gate, load_config(config_file, env={}))
    private, public = keypair()
    with StateStore.open(gate_dir.path / "state.db") as store:
        store.add_identity("edge-apps", "minigate", public)
    edge = TunnelClient(
        fast_settings(),
        name="edge-apps",
        role="minigate",
        private_key=private,
        gate_public_key=GateKeys.load(gate_dir.path).public_key,
        gate_addresses=[("127.0.0.1", gate_dir.tunnel_port)],
    )
    await nursery.start(edge.run)
    edge_port = await nursery.start(serve_llm, edge, "127.0.0.1:0")
    return Mesh(gate, gate_dir, gate_dir.http_port, edge_port)


async def test_disable_enable_and_rotation_bite_on_the_gate_and_through_an_edge(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    mesh = await start_mesh(nursery, tmp_path)
    key = (await trio.to_thread.run_sync(mesh.qmesh, "apps", "add", "shop")).strip()
    token = f"shop:{key}"
    assert await mesh.both(token) == (200, 200)  # both paths now have it cached

    await trio.to_thread.run_sync(mesh.qmesh, "apps", "disable", "shop")
    await mesh.until_both(token, 403)
    listed = json.loads(await trio.to_thread.run_sync(mesh.qmesh, "apps", "list", "--json"))
    assert [a["disabled"] for a in listed if a["app_id"] == "shop"] == [True]
    await trio.to_thread.run_sync(mesh.qmesh, "apps", "enable", "shop")
    await mesh.until_both(token, 200)

    new_key = await trio.to_thread.run_sync(
        mesh.qmesh, "apps", "rotate-key", "shop", "--overlap", "0"
    )
    await mesh.until_both(token, 401)
    assert await mesh.both(f"shop:{new_key.strip()}") == (200, 200)


async def test_the_gate_listener_applies_gate_http(nursery: trio.Nursery, tmp_path: Path) -> None:
    mesh = await start_mesh(nursery, tmp_path)
    body = b"x" * 4096
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    assert await mesh.status(mesh.gate_port, "", raw=request) == 413
