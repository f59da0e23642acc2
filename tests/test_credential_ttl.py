"""Credentials with an expiry (``qmesh enroll --ttl``): a live MiniGate renews
its own and keeps its session past the first expiry; an edge that does not
renew loses its session at the expiry, and its credential is refused after.

Real ``qmesh`` processes (Gate, MiniGate, commands) and a real tunnel
client; waits are on conditions (the expiry having passed is one), never on
guessed times.
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import trio
from daemonkit import FAST_TUNNEL, make_gate_dir
from processkit import eventually, free_port, start_role, stop
from processkit import qmesh_cli as qmesh

from qmesh.config import TunnelConfig
from qmesh.identity import load_credential
from qmesh.tunnel import HandshakeRefused, TunnelClient

DEADLINE_S = 60.0  # generous: the event must happen, how fast is for bench/
TTL_S = 15
"""The credentials' life. They are enrolled before the Gate and the
MiniGate start, so it must cover both processes' start and the first
handshake on a loaded machine: 4 s did not in a CI run (the MiniGate's
credential had expired before its first session)."""


def identity(config: Path, name: str) -> dict[str, Any]:
    listed = json.loads(qmesh(config, "identities", "--json").stdout)
    found: dict[str, Any] = next(i for i in listed if i["name"] == name)
    return found


def test_a_renewing_edge_keeps_its_session_and_a_silent_one_expires(tmp_path: Path) -> None:
    gate = make_gate_dir(tmp_path)
    config = tmp_path / "gate.toml"
    config.write_text(gate.config_text())
    address = f"127.0.0.1:{gate.tunnel_port}"
    for name in ("renewing", "silent"):
        qmesh(config, "enroll", "minigate", name, "--ttl", f"{TTL_S}s", "--gate", address,
              "--out", str(tmp_path / f"{name}.cred"))  # fmt: skip
    edge_config = tmp_path / "edge.toml"
    edge_config.write_text(
        f'data_dir = "{tmp_path / "edge"}"\n[minigate]\n'
        f'credential_file = "{tmp_path / "renewing.cred"}"\n'
        f'pg_listen = "127.0.0.1:{free_port()}"\nllm_listen = "127.0.0.1:{free_port()}"\n'
        + FAST_TUNNEL
    )
    gate_process = start_role("gate", config, tmp_path / "gate.log")
    edge_process = start_role("minigate", edge_config, tmp_path / "edge.log")

    def sessions() -> dict[str, str]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{gate.http_port}/api/tunnel",
            headers={"authorization": f"Bearer {gate.bearer}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                views = json.load(response)["sessions"]
        except OSError:
            return {}
        return {v["peer"]: v["session"] for v in views}

    try:
        first = eventually(lambda: sessions().get("renewing"), "the MiniGate's session")
        enrolled = identity(config, "renewing")
        assert enrolled["expires_at"] is not None and not enrolled["expired"]
        original = time.time() + TTL_S  # at most this: it was enrolled before now
        silent = trio.run(_silent_edge_loses_its_session, tmp_path / "silent.cred", config)
        assert "expired" in silent
        eventually(lambda: time.time() > original + 1, "the first expiry")
        # Past the expiry it was enrolled with: the same session, renewed.
        assert sessions().get("renewing") == first
        renewed = identity(config, "renewing")
        assert not renewed["expired"] and renewed["expires_at"] > enrolled["expires_at"]
        assert "credential renewed" in (tmp_path / "edge.log").read_text()
        assert identity(config, "silent")["expired"]
    finally:
        stop(edge_process)
        stop(gate_process)


async def _silent_edge_loses_its_session(credential_file: Path, config: Path) -> str:
    """An edge that never renews: its session ends at the expiry, and its
    next handshake is refused; the refusal's text."""
    credential = load_credential(credential_file)
    host, port = credential.gate_address.rsplit(":", 1)
    settings = TunnelConfig(reconnect_initial_s=0.05, reconnect_max_s=0.2)
    client = TunnelClient(
        settings, name=credential.name, role="minigate", private_key=credential.private_key,
        gate_public_key=credential.gate_public_key, gate_addresses=[(host, int(port))],
    )  # fmt: skip
    refusals: list[str] = []
    connected = trio.Event()

    async def run() -> None:
        try:
            await client.run()
        except HandshakeRefused as refusal:  # no retry fixes an expired credential
            refusals.append(str(refusal))

    with trio.fail_after(DEADLINE_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)

            async def connected_then_lost() -> None:
                await client.wait_connected()
                session = client.session
                assert session is not None
                connected.set()
                while not session.lost:  # noqa: ASYNC110 - the Gate ends it; no event here
                    await trio.sleep(0.05)

            nursery.start_soon(connected_then_lost)
    assert connected.is_set() and refusals
    return refusals[0]
