"""The router with real daemons: the real Gemma 3 270M on llama.cpp, daemons
as separate processes, the Gate in this process, the ``openai`` client and
raw HTTP as the applications."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO, Any

import openai
import processkit
import pytest
import trio
from daemonkit import (
    GEMMA_ID,
    GateDir,
    daemon_config_text,
    gemma_path,
    make_gate_dir,
    model_dir_with,
    require_llama,
)

from qmesh.gate.role import run_gate
from qmesh.state import StateStore
from qmesh.web.pool import HttpPool, parse_url

pytestmark = pytest.mark.slow


class Mesh:
    def __init__(self, gate: GateDir, endpoints: dict[str, Any], token: str) -> None:
        self.gate = gate
        self.endpoints = endpoints
        self.token = token
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: list[IO[bytes]] = []

    @property
    def base_url(self) -> str:
        return f"{self.endpoints['http']}/v1"

    def start_daemon(self, tmp_path: Path, name: str, *, extra: str = "") -> None:
        (tmp_path / name).mkdir(parents=True, exist_ok=True)
        models = model_dir_with(tmp_path / name, GEMMA_ID)
        data = tmp_path / name / "data"
        data.mkdir(exist_ok=True)
        credential = self.gate.enroll_daemon(name, tmp_path / name / "cred")
        config = tmp_path / name / "daemon.toml"
        config.write_text(
            daemon_config_text(
                data,
                credential,
                self.gate,
                model_dirs=(models,),
                extra="threads = 1\n" + extra,
            )
        )
        log = (tmp_path / name / "daemon.log").open("wb")
        self.logs.append(log)
        self.processes[name] = subprocess.Popen(
            [sys.executable, "-m", "qmesh", "--role", "daemon", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "QMESH_LOG__LEVEL": "info"},
        )

    async def wait_for_candidates(self, count: int) -> None:
        router = self.endpoints["llm"].router
        with trio.fail_after(60):
            while True:  # the inventory is polled: no event to wait for
                healthy = [c for c in router.candidates if c.kind == "daemon" and c.healthy]
                if len(healthy) >= count:
                    return
                await trio.sleep(0.1)

    def stop(self) -> None:
        for process in self.processes.values():
            processkit.stop(process, timeout=10)
        for log in self.logs:
            log.close()


@pytest.fixture
async def mesh(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Mesh]:
    gemma_path()
    require_llama()
    gate = make_gate_dir(tmp_path)
    with StateStore.open(gate.path / "state.db") as store:
        token = f"app:{store.add_app('app')}"
    endpoints = await nursery.start(run_gate, gate.config(tmp_path))
    mesh = Mesh(gate, endpoints, token)
    try:
        yield mesh
    finally:
        mesh.stop()


async def test_creative_writing_goes_to_the_daemon_model_and_streams(
    mesh: Mesh, tmp_path: Path
) -> None:
    mesh.start_daemon(tmp_path, "gpu-1")
    await mesh.wait_for_candidates(1)
    client = openai.OpenAI(base_url=mesh.base_url, api_key=mesh.token, max_retries=0, timeout=120)

    def run() -> tuple[str, str, str]:
        chat = client.chat.completions.create(
            model="qg://task=creative_writing",
            messages=[{"role": "user", "content": "Write one sentence about the sea."}],
            max_tokens=24,
        )
        reply = client.completions.create(
            model="qg://task=creative_writing", prompt="The sea is", max_tokens=24
        )
        streamed = "".join(
            chunk.choices[0].text
            for chunk in client.completions.create(
                model="qg://task=creative_writing;privacy=local",
                prompt="My favourite colour is",
                max_tokens=12,
                stream=True,
            )
            if chunk.choices
        )
        return chat.model, reply.choices[0].text, streamed

    chat_model, text, streamed = await trio.to_thread.run_sync(run)
    assert chat_model == GEMMA_ID  # the daemon's model answered the chat
    assert len(text.split()) >= 3  # real words from the real model
    assert len(streamed.split()) >= 1


async def test_daemon_chat_has_real_text(mesh: Mesh, tmp_path: Path) -> None:
    mesh.start_daemon(tmp_path, "gpu-1")
    await mesh.wait_for_candidates(1)
    client = openai.OpenAI(base_url=mesh.base_url, api_key=mesh.token, max_retries=0, timeout=120)
    reply = await trio.to_thread.run_sync(
        lambda: client.chat.completions.create(
            model="qg://task=creative_writing",
            messages=[{"role": "user", "content": "Write one sentence about the sea."}],
            max_tokens=24,
        )
    )
    assert len((reply.choices[0].message.content or "").split()) >= 2


async def test_busy_daemon_sends_work_to_the_other_and_kill_9_loses_nothing(
    mesh: Mesh, tmp_path: Path
) -> None:
    mesh.start_daemon(tmp_path, "node-a")
    mesh.start_daemon(tmp_path, "node-b")
    await mesh.wait_for_candidates(2)
    router = mesh.endpoints["llm"].router
    pool = HttpPool()
    upstream = parse_url(mesh.base_url)
    headers = {"authorization": f"Bearer {mesh.token}", "content-type": "application/json"}

    async def ask(i: int) -> tuple[int, dict[str, Any]]:
        body = {
            "model": GEMMA_ID,
            "max_tokens": 4,
            "messages": [{"role": "user", "content": f"Say a number: {i}"}],
        }
        status, _, data = await pool.request(
            "POST", upstream, "/chat/completions", headers=headers, body=json.dumps(body).encode()
        )
        return status, json.loads(data)

    # node-a full: the router must say so and choose node-b. ``busy`` is the
    # router's live view, which the inventory poll rewrites from node-a's own
    # heartbeats, and on a loaded machine a late heartbeat makes a node stale
    # for a moment (the router then rebuilds its candidates, and refuses a
    # stale one before asking whether it is busy): ask again until a decision
    # was taken while node-a was still marked busy.
    with trio.fail_after(60):
        while True:
            await mesh.wait_for_candidates(2)
            a = router.get(f"node:node-a/{GEMMA_ID}")
            assert a is not None
            a.busy = True
            status, body = await ask(0)
            a.busy = False
            if status == 503 and "unhealthy" in body["error"]["message"]:
                continue  # node-b was stale then: nothing else could take it
            assert status == 200, body
            decision = router.recent[-1]
            if dict(decision.rejected).get(a.id, "").startswith("busy"):
                break
    assert decision.chosen.node == "node-b"

    # 200 non-streamed requests, 4 at a time; kill -9 node-a a third of the way in.
    results: list[int] = []
    limiter = trio.CapacityLimiter(4)

    async def one(i: int) -> None:
        async with limiter:
            status, body = await ask(i)
            results.append(status)
            if len(results) == 60:
                third.set()
            assert status == 200, body

    third = trio.Event()

    async def killer() -> None:
        await third.wait()
        mesh.processes["node-a"].send_signal(signal.SIGKILL)

    with trio.fail_after(600):
        async with trio.open_nursery() as inner:
            inner.start_soon(killer)
            for i in range(200):
                inner.start_soon(one, i)
    await pool.aclose()
    assert results.count(200) == 200
    assert mesh.processes["node-a"].wait(timeout=10) == -signal.SIGKILL
    served = {d.chosen.node for d in list(router.recent)[-150:]}
    assert "node-b" in served
