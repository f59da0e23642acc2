"""Trust at a running Gate: revocation and session kills bite on live
sessions, replayed handshakes are refused, edges reach the application API
only, and each role opens only its own services.

A real Gate (``run_gate``) with its SQLite state store; trust changes come
from another process (``qmesh revoke``) or another connection to the store,
as an operator's shell would make them. Loopback only; every wait is on a
condition with a generous limit.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trio
from daemonkit import GateDir, http_json, make_gate_dir
from tunnelkit import Recorder, keypair, roundtrip, until, wait_closed

from qmesh.config import load_config
from qmesh.gate.role import run_gate
from qmesh.identity import GateKeys
from qmesh.state import StateStore
from qmesh.tunnel import (
    HandshakeRefused,
    StreamReset,
    TunnelClient,
    TunnelServer,
    TunnelStream,
    handshake,
)

QUIET_TUNNEL = (
    # Raw handshakes in these tests never answer heartbeats: keep their
    # connections attached for the whole test.
    "[tunnel]\nheartbeat_interval_s = 20.0\ndead_after_s = 60.0\n"
    "reconnect_initial_s = 0.01\nreconnect_max_s = 0.2\nresume_grace_s = 30.0\n"
)


class Mesh:
    """A running Gate, its directory and keys, and an echo server behind it."""

    def __init__(self, gate: dict[str, Any], gate_dir: GateDir, echo_port: int) -> None:
        self.gate = gate
        self.dir = gate_dir
        self.keys = GateKeys.load(gate_dir.path)
        self.echo_port = echo_port

    @property
    def server(self) -> TunnelServer:
        server: TunnelServer = self.gate["server"]
        return server

    def enroll(self, name: str, role: str = "minigate") -> bytes:
        """Enroll through a connection of its own, as ``qmesh enroll`` does."""
        private, public = keypair()
        with StateStore.open(self.dir.path / "state.db") as store:
            store.add_identity(name, role, public)
        return private

    def edge(self, name: str, private: bytes, role: str = "minigate") -> TunnelClient:
        from tunnelkit import fast_settings

        return TunnelClient(
            fast_settings(),
            name=name,
            role=role,
            private_key=private,
            gate_public_key=self.keys.public_key,
            gate_addresses=[("127.0.0.1", self.dir.tunnel_port)],
        )

    def qmesh(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "qmesh", "--data-dir", str(self.dir.path), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )


async def _echo(stream: trio.SocketStream) -> None:
    async with stream:
        while data := await stream.receive_some(65536):
            await stream.send_all(data)


async def start_mesh(
    nursery: trio.Nursery, tmp_path: Path, tunnel: str = "", extra: str = ""
) -> Mesh:
    listeners = await nursery.start(trio.serve_tcp, _echo, 0)
    echo_port = listeners[0].socket.getsockname()[1]
    gate_dir = make_gate_dir(tmp_path)
    text = gate_dir.config_text().replace(
        "[tunnel]", f'forward_allow = ["127.0.0.1:{echo_port}"]\n[tunnel]'
    )
    if tunnel:
        text = text[: text.index("[tunnel]")] + tunnel
    config_file = tmp_path / "gate.toml"
    config_file.write_text(text + extra)
    gate = await nursery.start(run_gate, load_config(config_file, env={}))
    return Mesh(gate, gate_dir, echo_port)


async def run_until_refused(client: TunnelClient, refusals: list[HandshakeRefused]) -> None:
    try:
        await client.run()
    except HandshakeRefused as exc:
        refusals.append(exc)


async def test_revocation_ends_live_sessions_at_once(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    mesh = await start_mesh(nursery, tmp_path)
    edge = mesh.edge("edge-x", mesh.enroll("edge-x"))
    bystander = mesh.edge("edge-y", mesh.enroll("edge-y"))
    refusals: list[HandshakeRefused] = []
    nursery.start_soon(run_until_refused, edge, refusals)
    nursery.start_soon(bystander.run)
    target = {"service": "forward", "target": f"127.0.0.1:{mesh.echo_port}"}
    with trio.fail_after(30):
        live = await edge.open_stream(target)
        await live.send_all(b"before")
        assert await live.receive_some() == b"before"

        revoked = await trio.to_thread.run_sync(mesh.qmesh, "revoke", "edge-x")
        assert revoked.returncode == 0, revoked.stderr
        # The live stream is cut, the edge is told why and cannot come back.
        with pytest.raises(StreamReset):
            while await live.receive_some():
                pass
        await until(lambda: bool(refusals))
    assert refusals[0].code == "revoked"
    assert mesh.server.sessions_of("edge-x") == []
    assert any("identity revoked" in r.getMessage() for r in caplog.records)
    # Nobody else noticed.
    with trio.fail_after(10):
        other = await bystander.open_stream(target)
        assert await roundtrip(other, b"unharmed") == b"unharmed"


async def test_sessions_are_listed_and_killed_without_revoking(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    mesh = await start_mesh(nursery, tmp_path)
    edge = mesh.edge("edge-k", mesh.enroll("edge-k"))
    await nursery.start(edge.run)
    gate_url = ("--gate", mesh.gate["http"], "--key", mesh.dir.bearer)
    with trio.fail_after(30):
        await edge.wait_connected()
        first = edge.session
        assert first is not None
        listed = await trio.to_thread.run_sync(mesh.qmesh, "sessions", *gate_url)
        assert listed.returncode == 0, listed.stderr
        row = next(line for line in listed.stdout.splitlines() if "edge-k" in line)
        assert first.id.hex()[:12] in row and "minigate" in row and "127.0.0.1:" in row

        killed = await trio.to_thread.run_sync(
            mesh.qmesh, "sessions", "kill", first.id.hex()[:8], *gate_url
        )
        assert killed.returncode == 0, killed.stderr
        assert f"ended session {first.id.hex()[:12]} of edge-k" in killed.stdout
        # Not revoked: the edge comes back with a new session.
        await until(lambda: edge.session is not None and edge.session.id != first.id)
        await edge.wait_connected()
        second = edge.session
        assert second is not None
        assert [s.id for s in mesh.server.sessions_of("edge-k")] == [second.id]

        by_name = await trio.to_thread.run_sync(mesh.qmesh, "sessions", "kill", "edge-k", *gate_url)
        assert by_name.returncode == 0 and "of edge-k" in by_name.stdout
        nobody = await trio.to_thread.run_sync(mesh.qmesh, "sessions", "kill", "nobody", *gate_url)
        assert nobody.returncode != 0 and "no live session" in nobody.stderr


async def _record_handshake(
    mesh: Mesh, private: bytes, hello: handshake.Hello
) -> tuple[trio.SocketStream, bytes, handshake.Welcome]:
    """A genuine handshake, its bytes captured as an on-path observer would."""
    transport = await trio.open_tcp_stream("127.0.0.1", mesh.dir.tunnel_port)
    recorder = Recorder(transport)
    _noise, welcome, _ = await handshake.initiate(
        recorder, local_private=private, gate_public=mesh.keys.public_key, hello=hello
    )
    return transport, bytes(recorder.sent), welcome


async def _replay(mesh: Mesh, message: bytes) -> None:
    transport = await trio.open_tcp_stream("127.0.0.1", mesh.dir.tunnel_port)
    await transport.send_all(message)
    await wait_closed(transport)


async def test_a_replayed_handshake_is_refused(nursery: trio.Nursery, tmp_path: Path) -> None:
    mesh = await start_mesh(nursery, tmp_path, QUIET_TUNNEL)
    private = mesh.enroll("edge-r")

    def hello(session: bytes | None) -> handshake.Hello:
        return handshake.Hello(
            role="minigate",
            name="edge-r",
            session_id=session,
            recv_next=0,
            timestamp=handshake.clock_ns(),
        )

    with trio.fail_after(30):
        # A new session, captured: its replay must not open an orphan session.
        first, opening, welcome = await _record_handshake(mesh, private, hello(None))
        (session,) = mesh.server.sessions_of("edge-r")
        await _replay(mesh, opening)
        await until(lambda: mesh.server.handshake_failures == 1)
        assert mesh.server.sessions_of("edge-r") == [session]

        # A resumption, captured: its replay must not steal the live session.
        second, resuming, again = await _record_handshake(mesh, private, hello(welcome.session_id))
        assert again.resumed
        await until(lambda: session.connections == 2)
        await _replay(mesh, resuming)
        await until(lambda: mesh.server.handshake_failures == 2)
        assert session.attached and session.connections == 2
        assert mesh.server.sessions_of("edge-r") == [session]
    await first.aclose()
    await second.aclose()


async def _http_over(stream: TunnelStream, path: str, bearer: str) -> int:
    request = (
        f"GET {path} HTTP/1.1\r\nhost: edge\r\nauthorization: Bearer {bearer}\r\n"
        "connection: close\r\n\r\n"
    )
    await stream.send_all(request.encode())
    answer = bytearray()
    # The Gate closes the stream after a "connection: close" answer (a RESET
    # when this side has not sent EOF): all that matters is the answer.
    with contextlib.suppress(StreamReset):
        while data := await stream.receive_some():
            answer += data
    return int(answer.split(b" ", 2)[1])


async def test_an_edge_reaches_the_application_api_only(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    mesh = await start_mesh(nursery, tmp_path)
    with StateStore.open(mesh.dir.path / "state.db") as store:
        app_bearer = f"app-1:{store.add_app('app-1')}"
    edge = mesh.edge("edge-l", mesh.enroll("edge-l"))
    await nursery.start(edge.run)
    admin = mesh.dir.bearer

    async def through_edge(path: str, bearer: str) -> int:
        return await _http_over(await edge.open_stream({"service": "llm"}), path, bearer)

    with trio.fail_after(30):
        assert await through_edge("/api/tunnel", admin) == 404
        assert await through_edge("/metrics", admin) == 404
        assert await through_edge("/", admin) == 404
        assert await through_edge("/v1/models", admin) == 403
        assert await through_edge("/v1/memory/documents", admin) == 403
        assert await through_edge("/v1/models", app_bearer) == 200
        # The Gate's own listener still serves the operator.
        status, _ = await http_json("GET", mesh.gate["http"] + "/api/tunnel", bearer=admin)
        assert status == 200


async def test_each_role_opens_only_its_own_services(nursery: trio.Nursery, tmp_path: Path) -> None:
    mesh = await start_mesh(nursery, tmp_path)
    minigate = mesh.edge("edge-m", mesh.enroll("edge-m"))
    daemon = mesh.edge("gpu-1", mesh.enroll("gpu-1", "daemon"), role="daemon")
    await nursery.start(minigate.run)
    await nursery.start(daemon.run)
    target = {"service": "forward", "target": f"127.0.0.1:{mesh.echo_port}"}
    with trio.fail_after(30):
        refused = await daemon.open_stream(target)
        with pytest.raises(StreamReset, match="'forward' is not open to daemon edges"):
            await refused.receive_some()
        refused = await minigate.open_stream({"service": "inventory"})
        with pytest.raises(StreamReset, match="'inventory' is not open to minigate edges"):
            await refused.receive_some()
        allowed = await minigate.open_stream(target)
        assert await roundtrip(allowed, b"minigate") == b"minigate"


async def test_the_cli_talks_to_a_tls_gate_only_through_its_pinned_certificate(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    mesh = await start_mesh(nursery, tmp_path, extra='[gate.http]\ntls = "on"\n')
    url, pin = mesh.gate["http"], mesh.gate["tls_fingerprint"]
    assert url.startswith("https://127.0.0.1:") and pin.startswith("sha256:")
    edge = mesh.edge("edge-t", mesh.enroll("edge-t"))
    await nursery.start(edge.run)
    with trio.fail_after(30):
        await edge.wait_connected()
        key = ("--gate", url, "--key", mesh.dir.bearer)
        listed = await trio.to_thread.run_sync(mesh.qmesh, "sessions", *key, "--fingerprint", pin)
        assert listed.returncode == 0, listed.stderr
        assert "edge-t" in listed.stdout

        wrong = "sha256:" + "0" * 64
        refused = await trio.to_thread.run_sync(
            mesh.qmesh, "sessions", *key, "--fingerprint", wrong
        )
        assert refused.returncode == 1
        assert f"presented certificate {pin}, not the pinned {wrong}" in refused.stderr
        unpinned = await trio.to_thread.run_sync(mesh.qmesh, "sessions", *key)
        assert unpinned.returncode == 2 and "pin its certificate" in unpinned.stderr
        # Plain HTTP to a TLS listener gets nowhere.
        status = await trio.to_thread.run_sync(
            mesh.qmesh, "sessions", "--gate", url.replace("https", "http"), "--key", mesh.dir.bearer
        )
        assert status.returncode == 1
        # An app's command pins the same way.
        with StateStore.open(mesh.dir.path / "state.db") as store:
            app_key = f"app-t:{store.add_app('app-t')}"
        route = await trio.to_thread.run_sync(
            lambda: subprocess.run(
                [sys.executable, "-m", "qmesh", "route", "qg://task=summarize", "--json",
                 "--gate", url, "--fingerprint", pin],
                capture_output=True, text=True, timeout=60, check=False,
                env={**os.environ, "QMESH_APP_KEY": app_key},
            )
        )  # fmt: skip
        assert route.returncode == 0, route.stderr
        assert json.loads(route.stdout)["decision"]["chosen"]  # answered by the Gate
    # The generated certificate is kept: the pin survives a restart.
    from qmesh.web.tls import load_or_create

    assert load_or_create(mesh.dir.path).fingerprint == pin
    assert oct((mesh.dir.path / "gate-http.key").stat().st_mode & 0o777) == "0o600"


async def _model_ids(mesh: Mesh) -> set[str]:
    status, body = await http_json("GET", mesh.gate["http"] + "/v1/models", bearer=mesh.dir.bearer)
    assert status == 200
    return {m["id"] for m in body["data"]}


async def test_a_revoked_daemon_leaves_the_inventory_and_the_router(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    from qmesh.daemon.wire import INVENTORY_SERVICE, WIRE_VERSION, encode

    mesh = await start_mesh(nursery, tmp_path)
    daemon = mesh.edge("gpu-r", mesh.enroll("gpu-r", "daemon"), role="daemon")
    refusals: list[HandshakeRefused] = []
    nursery.start_soon(run_until_refused, daemon, refusals)
    model = {"id": "fake-model", "runtime": "llamacpp", "state": "available"}
    with trio.fail_after(30):
        stream = await daemon.open_stream(
            {"service": INVENTORY_SERVICE, "node": "gpu-r", "wire": WIRE_VERSION}
        )
        await stream.send_all(
            encode({"type": "hello", "kind": "daemon", "heartbeat_interval_s": 5.0})
            + encode({"type": "inventory", "models": [model]})
        )
        while "fake-model" not in await _model_ids(mesh):  # noqa: ASYNC110 - polling the API
            await trio.sleep(0.02)
        revoked = await trio.to_thread.run_sync(mesh.qmesh, "revoke", "gpu-r")
        assert revoked.returncode == 0, revoked.stderr
        while "fake-model" in await _model_ids(mesh):  # noqa: ASYNC110 - polling the API
            await trio.sleep(0.02)
        await until(lambda: bool(refusals))
    node = mesh.gate["inventory"].get("gpu-r", now=time.time())
    assert node is not None and node.state == "gone"
    assert refusals[0].code == "revoked"


async def test_pg_pools_are_read_with_an_operator_key(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """`qmesh pg pools` asks the running Gate (GET /api/pg/pools); without
    a key the route refuses."""
    mesh = await start_mesh(nursery, tmp_path)
    gate_url = ("--gate", mesh.gate["http"], "--key", mesh.dir.bearer)
    with trio.fail_after(30):
        table = await trio.to_thread.run_sync(mesh.qmesh, "pg", "pools", *gate_url)
        assert table.returncode == 0, table.stderr
        assert table.stdout.split()[:3] == ["APP", "ALIAS", "SIZE"]
        assert "(no pools: no app in transaction mode has connected" in table.stdout
        as_json = await trio.to_thread.run_sync(mesh.qmesh, "pg", "pools", "--json", *gate_url)
        assert json.loads(as_json.stdout) == {"pools": []}
        keyless = await trio.to_thread.run_sync(
            mesh.qmesh, "pg", "pools", "--gate", mesh.gate["http"], "--key", "nobody:wrong"
        )
        assert keyless.returncode != 0 and "the Gate refused the key" in keyless.stderr
