"""A Gate and a daemon in one Trio loop over real loopback sockets, with the
real Gemma model served by llama.cpp: inventory, streaming, queueing, swapping."""

from __future__ import annotations

import json
import os
import signal
import time
from contextlib import aclosing
from pathlib import Path
from typing import Any

import attrs
import psutil
import pytest
import trio
from daemonkit import (
    GEMMA_ID,
    GateDir,
    daemon_config_text,
    http_json,
    make_gate_dir,
    model_dir_with,
    require_llama,
    wait_until,
)

from qmesh.config import load_config
from qmesh.daemon.node import DaemonNode
from qmesh.daemon.role import run_daemon
from qmesh.daemon.runtimes.http import iter_sse, request
from qmesh.fleet.daemons import (
    DaemonClient,
    Done,
    InferenceFailed,
    ModelUnavailable,
    NodeBusy,
    NodeUnavailable,
    Started,
    TextDelta,
)
from qmesh.fleet.inventory import Inventory
from qmesh.gate.role import run_gate


@attrs.define
class Mesh:
    gate_dir: GateDir
    gate: dict[str, Any]
    daemon: dict[str, Any]

    @property
    def http(self) -> str:
        return str(self.gate["http"])

    @property
    def inventory(self) -> Inventory:
        inventory: Inventory = self.gate["inventory"]
        return inventory

    @property
    def client(self) -> DaemonClient:
        client: DaemonClient = self.gate["daemons"]
        return client

    @property
    def node(self) -> DaemonNode:
        node: DaemonNode = self.daemon["node"]
        return node


async def start_mesh(
    nursery: trio.Nursery, tmp_path: Path, *, models: tuple[str, ...] = (GEMMA_ID,), extra: str = ""
) -> Mesh:
    gate_dir = make_gate_dir(tmp_path)
    credential = gate_dir.enroll_daemon("node-a", tmp_path / "node-a.cred")
    dirs = (model_dir_with(tmp_path, *models),) if models else ()
    config_file = tmp_path / "daemon.toml"
    config_file.write_text(
        daemon_config_text(tmp_path / "node-a", credential, gate_dir, model_dirs=dirs, extra=extra)
    )
    gate = await nursery.start(run_gate, gate_dir.config(tmp_path))
    daemon = await nursery.start(run_daemon, load_config(config_file, env={}))
    mesh = Mesh(gate_dir, gate, daemon)
    await wait_until(lambda: mesh.inventory.nodes(now=time.time(), state="fresh"))
    return mesh


async def test_node_reports_cpu_only_telemetry_and_catalog(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    mesh = await start_mesh(nursery, tmp_path)
    status, body = await http_json("GET", mesh.http + "/api/inventory")
    assert status == 401
    status, body = await http_json("GET", mesh.http + "/api/inventory", bearer=mesh.gate_dir.bearer)
    assert status == 200, body
    (node,) = body["nodes"]
    assert (node["name"], node["kind"], node["source"], node["state"]) == (
        "node-a", "daemon", "tunnel", "fresh"
    )  # fmt: skip
    assert node["version"].startswith("qmesh/") and node["address"]
    telemetry = node["telemetry"]
    assert telemetry["cpu_only"] is True and telemetry["gpus"] == []
    assert telemetry["nvml"].startswith("nvmlInit failed") or telemetry["nvml"].startswith("pynvml")
    assert telemetry["host"]["memory_bandwidth_gbps"] > 0.1  # measured at start
    assert telemetry["model_memory_free"] == telemetry["host"]["ram_available"]
    bandwidth = json.loads((tmp_path / "node-a" / "daemon" / "membench.json").read_text())
    assert node["extra"]["bandwidth"]["gbps"] == bandwidth["gbps"]  # cached in the data dir
    (model,) = node["models"]
    assert model["id"] == GEMMA_ID and model["runtime"] == "llama.cpp"
    assert model["state"] == "available"  # on disk, not loaded until asked for
    assert (model["family"], model["size_class"], model["equivalence"]) == (
        "gemma3", "xs", "gemma3:270m"
    )  # fmt: skip
    assert (model["quantization"], model["parameters"], model["context_length"]) == (
        "Q4_K_M", 268_098_176, 32768
    )  # fmt: skip
    assert model["chat_template"] is False and model["predicted_tps"] > 0
    meta = model["metadata"]
    assert (meta["architecture"], meta["size_label"], meta["file_size"]) == (
        "gemma3", "270M", 253_113_024
    )  # fmt: skip
    # Filters.
    for query, expected in (("?state=fresh", 1), ("?state=stale", 0), ("?model=gemma3:270m", 1),
                            ("?kind=daemon&model=other", 0)):  # fmt: skip
        status, body = await http_json(
            "GET", mesh.http + "/api/inventory" + query, bearer=mesh.gate_dir.bearer
        )
        assert status == 200 and len(body["nodes"]) == expected, query
    status, body = await http_json(
        "GET", mesh.http + "/api/inventory?state=odd", bearer=mesh.gate_dir.bearer
    )
    assert status == 400
    # The daemon's own local endpoint tells the same story.
    status, local = await http_json("GET", mesh.daemon["health"] + "/api/node")
    assert status == 200 and local["inventory"]["models"][0]["id"] == GEMMA_ID


async def test_the_node_learns_its_models_speed_from_its_requests(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """A generation long enough to time reports its decode speed: the
    inventory shows it beside the prediction, with the error, and the
    planner's figure for the model (``predicted_tps``) becomes it; the
    daemon keeps it in its data directory for ``qmesh quant plan --explain``."""
    require_llama()
    mesh = await start_mesh(nursery, tmp_path)

    def model() -> Any:
        node = mesh.inventory.get("node-a", now=time.time())
        return None if node is None else node.models.get(GEMMA_ID)

    before = model()
    assert before is not None and before.metadata["measured_tps"] is None
    assert before.predicted_tps == before.metadata["model_tps"] > 0
    body = {"prompt": "The capital of France is", "max_tokens": 24, "temperature": 0}
    _, _, done = await mesh.client.complete("node-a", GEMMA_ID, "completions", body)
    assert done.completion_tokens == 24 and done.timings["per_token"] is True
    await wait_until(lambda: model().metadata.get("measured_tps") is not None)
    after = model()
    measured = after.metadata["measured_tps"]
    assert measured == pytest.approx(done.timings["decode_tps"], rel=0.01)
    assert after.predicted_tps == measured and after.metadata["measured_samples"] == 1
    error = (after.metadata["model_tps"] - measured) / measured
    assert after.metadata["prediction_error"] == pytest.approx(error, abs=1e-3)
    # Too short to time: not recorded.
    short = {**body, "max_tokens": 4}
    await mesh.client.complete("node-a", GEMMA_ID, "completions", short)
    (sample,) = mesh.node.speeds.models[GEMMA_ID].samples
    assert sample == pytest.approx(measured, rel=0.01)
    speeds = tmp_path / "node-a" / "daemon" / "speeds.json"
    await wait_until(lambda: speeds.exists())
    (saved,) = json.loads(speeds.read_text())["models"]
    assert saved["model"] == GEMMA_ID and saved["samples"] == [pytest.approx(measured, rel=0.01)]


async def test_completion_streams_token_by_token(nursery: trio.Nursery, tmp_path: Path) -> None:
    require_llama()
    mesh = await start_mesh(nursery, tmp_path)
    body = {"prompt": "The capital of France is", "max_tokens": 12, "temperature": 0}
    arrivals: list[float] = []
    pieces: list[str] = []
    events: list[Any] = []
    async with aclosing(mesh.client.stream("node-a", GEMMA_ID, "completions", body)) as stream:
        async for event in stream:
            events.append(event)
            if isinstance(event, TextDelta):
                arrivals.append(time.monotonic())
                pieces.append(event.text)
    assert isinstance(events[0], Started) and events[0].runtime == "llama.cpp"
    done = events[-1]
    assert isinstance(done, Done) and done.finish_reason in ("length", "stop")
    # Every piece is a token (a token may render as nothing: then no piece).
    assert done.completion_tokens == 12 and 3 <= len(pieces) <= 12
    assert "".join(pieces).strip()  # real text came back
    # Token by token: the pieces arrived spread over the generation, not in one burst.
    assert arrivals[-1] - arrivals[0] > 0.2 * (len(arrivals) - 1) / 1000 * 10
    assert len({round(t, 3) for t in arrivals}) >= len(arrivals) // 2
    assert done.timings["decode_tps"] > 0 and done.timings["ttft_ms"] > 0

    # The same through the Gate's HTTP API, as server-sent events.
    url = f"{mesh.http}/api/daemons/node-a/v1/completions"
    headers = {"authorization": f"Bearer {mesh.gate_dir.bearer}"}
    chunks: list[dict[str, Any]] = []
    with trio.fail_after(60):
        async with request(
            "POST", url, headers=headers, json_body={**body, "model": GEMMA_ID, "stream": True}
        ) as response:
            assert response.headers["content-type"] == "text/event-stream"
            async for data in iter_sse(response):
                if data == "[DONE]":
                    break
                chunks.append(json.loads(data))
    texts = [c["choices"][0]["text"] for c in chunks if c["choices"][0]["text"]]
    assert len(texts) >= 3 and chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    assert chunks[-1]["usage"]["completion_tokens"] == 12
    assert all(c["object"] == "text_completion" for c in chunks)
    # Greedy decoding is deterministic: the same text both ways.
    assert "".join(texts) == "".join(pieces)

    # Whole answers, completion and chat (the base model chats poorly: mechanics only).
    status, answer = await http_json(
        "POST", url, bearer=mesh.gate_dir.bearer, body={**body, "model": GEMMA_ID}
    )
    assert status == 200, answer
    assert answer["choices"][0]["text"] == "".join(pieces)
    assert answer["qmesh"]["node"] == "node-a" and answer["usage"]["completion_tokens"] >= 3
    status, chat = await http_json(
        "POST", f"{mesh.http}/api/daemons/node-a/v1/chat/completions", bearer=mesh.gate_dir.bearer,
        body={"model": GEMMA_ID, "max_tokens": 6, "messages": [{"role": "user", "content": "Hi"}]},
    )  # fmt: skip
    assert status == 200, chat
    assert chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"]["role"] == "assistant"
    # Without a chat template the base model may stop at once: shape only.
    assert chat["choices"][0]["finish_reason"] in ("stop", "length")
    assert isinstance(chat["choices"][0]["message"]["content"], str)

    # Errors the caller can act on.
    with pytest.raises(ModelUnavailable, match="unknown_model"):
        await mesh.client.complete("node-a", "no-such-model", "completions", body)
    with pytest.raises(NodeUnavailable, match="no node named"):
        await mesh.client.complete("node-z", GEMMA_ID, "completions", body)
    status, error = await http_json(
        "POST", url, bearer=mesh.gate_dir.bearer, body={"model": GEMMA_ID, "prompt": 42}
    )
    assert status == 400 and "'prompt' must be a string" in error["error"]["message"]


async def test_full_queue_is_busy(nursery: trio.Nursery, tmp_path: Path) -> None:
    require_llama()
    mesh = await start_mesh(nursery, tmp_path, extra="queue_limit = 1\n")
    body = {"prompt": "Once upon a time", "max_tokens": 40, "temperature": 0}
    started = trio.Event()
    results: list[str] = []

    async def run(signal: trio.Event | None) -> None:
        async with aclosing(mesh.client.stream("node-a", GEMMA_ID, "completions", body)) as events:
            async for event in events:
                if isinstance(event, TextDelta) and signal is not None and not signal.is_set():
                    signal.set()
                if isinstance(event, Done):
                    results.append(event.finish_reason)

    async with trio.open_nursery() as requests:
        requests.start_soon(run, started)
        await started.wait()  # the first one is generating
        requests.start_soon(run, None)  # the second waits in the queue (limit 1)
        scheduler = mesh.node.scheduler
        assert scheduler is not None
        await wait_until(lambda: scheduler.slots[GEMMA_ID].waiting == 1, 10)
        with pytest.raises(NodeBusy, match="busy"):
            await mesh.client.complete("node-a", GEMMA_ID, "completions", body)
        status, error = await http_json(
            "POST", f"{mesh.http}/api/daemons/node-a/v1/completions",
            bearer=mesh.gate_dir.bearer, body={**body, "model": GEMMA_ID, "stream": True},
        )  # fmt: skip
        assert status == 429 and error["error"]["code"] == "busy"

        def gate_sees_busy() -> bool:
            node = mesh.inventory.get("node-a", now=time.time())
            assert node is not None
            return node.models[GEMMA_ID].busy

        # The Gate hears about the full queue at once, not at the next heartbeat.
        await wait_until(gate_sees_busy, 5)
    assert results == ["length", "length"]  # the admitted ones both finished


@pytest.mark.slow
async def test_swapping_under_a_memory_budget(nursery: trio.Nursery, tmp_path: Path) -> None:
    """A budget that fits one model; A, B, A load and evict as expected —
    checked against the runtime's own state (its live model servers)."""
    require_llama()
    mesh = await start_mesh(
        nursery, tmp_path, models=("model-a", "model-b"), extra='memory_budget = "600MB"\n'
    )
    llama = mesh.node.llama
    assert llama is not None
    body = {"prompt": "Hello", "max_tokens": 3, "temperature": 0}

    async def ask(model: str) -> None:
        _, _, done = await mesh.client.complete("node-a", model, "completions", body)
        assert done.completion_tokens and done.completion_tokens >= 1

    async def resident() -> tuple[list[str], dict[str, int | None]]:
        return await llama.loaded_models(), {m: s.pid for m, s in llama.servers.items()}

    await ask("model-a")
    loaded, pids = await resident()
    assert loaded == ["model-a"]
    pid_a = pids["model-a"]
    assert pid_a is not None and psutil.pid_exists(pid_a)

    # B and B again while it loads: both wait for the one load.
    async with trio.open_nursery() as both:
        both.start_soon(ask, "model-b")
        both.start_soon(ask, "model-b")
    loaded, pids = await resident()
    assert loaded == ["model-b"]
    assert not _running(pid_a)  # A's server process is gone: its memory is free
    scheduler = mesh.node.scheduler
    assert scheduler is not None
    assert scheduler.slots["model-b"].loads == 1
    assert scheduler.slots["model-a"].evictions == 1

    await ask("model-a")
    loaded, pids = await resident()
    assert loaded == ["model-a"] and pids["model-a"] != pid_a
    assert scheduler.slots["model-b"].evictions == 1 and scheduler.slots["model-a"].loads == 2
    assert scheduler.used_memory() <= 600_000_000

    def gate_sees_swap() -> bool:
        node = mesh.inventory.get("node-a", now=time.time())
        assert node is not None
        states = {m.id: m.state for m in node.models.values()}
        return states == {"model-a": "loaded", "model-b": "available"}

    # And the Gate's inventory says the same.
    await wait_until(gate_sees_swap, 5)


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.slow
async def test_crashed_model_server_fails_mid_stream_and_is_restarted(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    require_llama()
    mesh = await start_mesh(nursery, tmp_path)
    llama = mesh.node.llama
    assert llama is not None
    body = {"prompt": "Once upon a time", "max_tokens": 200, "temperature": 0}
    pieces = 0
    with pytest.raises(InferenceFailed) as failure:
        async with aclosing(mesh.client.stream("node-a", GEMMA_ID, "completions", body)) as events:
            async for event in events:
                if isinstance(event, TextDelta):
                    pieces += 1
                    if pieces == 3:  # mid-generation: the model server crashes
                        pid = llama.servers[GEMMA_ID].pid
                        assert pid is not None
                        os.kill(pid, signal.SIGKILL)
    assert failure.value.partial and failure.value.node == "node-a"
    assert "runtime_failed" in str(failure.value) or "broke" in str(failure.value)
    # The supervisor starts it again; the next request is served.
    server = llama.servers[GEMMA_ID]
    await wait_until(lambda: server.restarts == 1 and server.state == "ready", 60)
    assert server.pid != pid
    _, text, done = await mesh.client.complete(
        "node-a", GEMMA_ID, "completions", {**body, "max_tokens": 4}
    )
    assert text and done.completion_tokens == 4


async def test_a_late_heartbeat_does_not_fail_a_connected_node(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """On a loaded machine heartbeats come late and the inventory calls the
    node stale, then gone, while its tunnel session is alive: a request sent
    to it then must still reach it (a failure here cools the node down, and
    with no other node every request fails for ``cooldown_s``)."""
    mesh = await start_mesh(nursery, tmp_path, models=())
    body = {"prompt": "Hello", "max_tokens": 4}
    # Ten seconds on: past daemon_gone_after_missed heartbeats (8 × 0.3 s).
    late = DaemonClient(mesh.inventory, clock=lambda: time.time() + 10.0)
    # As if no sweeper ran (it would hold the verdict back, see test_inventory):
    # the heartbeats really are late, and the node is called gone.
    mesh.inventory.listening = None
    # The daemon itself answers (it has no such model): the request got there.
    with pytest.raises(ModelUnavailable, match="unknown_model"):
        await late.complete("node-a", GEMMA_ID, "completions", body)
    mesh.inventory.listening = None
    node = mesh.inventory.get("node-a", now=time.time() + 10.0)
    assert node is not None and node.state == "gone"  # as the heartbeats have it
    # A node whose report channel ended is still refused at once.
    mesh.inventory.disconnected("node-a", node.connection, now=time.time(), reason="test")
    with pytest.raises(NodeUnavailable, match="is gone"):
        await late.complete("node-a", GEMMA_ID, "completions", body)


async def test_an_operator_stops_starts_and_unloads_a_model(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """``POST /api/models/stop`` lets the running request finish, unloads the
    model and takes it out of service: the router answers its task with a
    503 that says why, and sends work that has an equivalent there. The stop
    outlives a daemon restart; ``start`` puts it back at once."""
    require_llama()
    mesh = await start_mesh(nursery, tmp_path)
    llama, scheduler = mesh.node.llama, mesh.node.scheduler
    assert llama is not None and scheduler is not None
    admin = mesh.gate_dir.bearer
    models_api = f"{mesh.http}/api/models"

    async def chat(dsn: str) -> tuple[int, Any]:
        text = "Boats bring in cod. The market sells it."
        body = {"model": dsn, "max_tokens": 4, "messages": [{"role": "user", "content": text}]}
        return await http_json("POST", f"{mesh.http}/v1/chat/completions", bearer=admin, body=body)

    status, answer = await chat("qg://task=summarize;prefer=quality")
    assert status == 200 and answer["model"] == GEMMA_ID  # the daemon's model is the better one
    assert await llama.loaded_models() == [GEMMA_ID]

    # A generation is running when the operator stops the model: it finishes.
    body = {"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0}
    generating = trio.Event()
    finished: list[str] = []
    stop_answer: list[tuple[int, Any]] = []

    async def generate() -> None:
        async with aclosing(mesh.client.stream("node-a", GEMMA_ID, "completions", body)) as events:
            async for event in events:
                if isinstance(event, TextDelta):
                    generating.set()
                elif isinstance(event, Done):
                    assert not stop_answer  # the stop waited for this request
                    finished.append(event.finish_reason)

    async with trio.open_nursery() as running:
        running.start_soon(generate)
        await generating.wait()

        async def stop() -> None:
            stop_answer.append(await http_json("POST", models_api + "/stop", bearer=admin,
                                               body={"model": GEMMA_ID}))  # fmt: skip

        running.start_soon(stop)
        # New requests are refused at once, before the running one is done.
        await wait_until(lambda: GEMMA_ID in scheduler.stopped)
        with pytest.raises(ModelUnavailable, match="stopped"):
            await mesh.client.complete("node-a", GEMMA_ID, "completions", body)
    assert finished == ["length"]
    ((status, stopped),) = stop_answer
    assert status == 200, stopped
    assert stopped["nodes"] == [
        {"node": "node-a", "ok": True, "state": "available", "stopped": True, "error": None}
    ]
    assert await llama.loaded_models() == []  # its memory is free
    node = mesh.inventory.get("node-a", now=time.time())
    assert node is not None and node.models[GEMMA_ID].stopped  # the Gate knows at once

    # The router: work with an equivalent moves; work without one gets a reason.
    status, answer = await chat("qg://task=summarize;prefer=quality")
    assert status == 200 and answer["model"] == "qmesh-summarize"
    status, error = await chat("qg://task=creative_writing")
    assert status == 503, error
    assert (
        f"stopped on node-a by an operator (qmesh models start {GEMMA_ID})"
        in (error["error"]["message"])
    )

    # Stopped survives the daemon's restart.
    assert json.loads(mesh.node.stopped_file.read_text()) == [GEMMA_ID]
    again = DaemonNode(mesh.node.config, "node-a")
    assert again._read_stopped() == [GEMMA_ID]

    status, started = await http_json("POST", models_api + "/start", bearer=admin,
                                      body={"model": GEMMA_ID, "node": "node-a"})  # fmt: skip
    assert status == 200 and started["nodes"][0]["stopped"] is False
    status, answer = await chat("qg://task=creative_writing")  # at once: no wait for a report
    assert status == 200 and answer["model"] == GEMMA_ID
    assert json.loads(mesh.node.stopped_file.read_text()) == []

    # Unload frees the memory and leaves the model in service.
    status, unloaded = await http_json("POST", models_api + "/unload", bearer=admin,
                                       body={"model": GEMMA_ID})  # fmt: skip
    assert status == 200 and unloaded["nodes"][0]["state"] == "available"
    assert await llama.loaded_models() == []
    assert GEMMA_ID not in scheduler.stopped

    # What an operator can get wrong, and who may do it at all.
    for path, payload, expected in (
        ("/stop", {"model": "no-such-model"}, 404),
        ("/stop", {"model": GEMMA_ID, "node": "node-z"}, 404),
        ("/stop", {"node": "node-a"}, 400),
        ("/stop", {"model": GEMMA_ID, "node": 7}, 400),
        ("/explode", {"model": GEMMA_ID}, 404),
    ):
        status, error = await http_json("POST", models_api + path, bearer=admin, body=payload)
        assert status == expected, (path, payload, error)
    status, _ = await http_json("POST", models_api + "/stop", body={"model": GEMMA_ID})
    assert status == 401
    assert GEMMA_ID not in scheduler.stopped
