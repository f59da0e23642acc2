"""The Ollama and OpenAI-compatible runtime adapters, alone and behind a daemon.

OpenAI-compatible: a real server — llama-cpp-python's ``llama_cpp.server``
with the Gemma model. Ollama cannot be installed here, so its adapter runs
against :class:`FakeOllama`, a small HTTP server in this file that answers
the documented API shapes (``/api/tags``, ``/api/ps``, ``/api/generate``,
``/api/chat``, ``keep_alive`` loads and unloads, NDJSON streaming).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from daemonkit import (
    GEMMA_ID,
    daemon_config_text,
    free_port,
    gemma_path,
    http_json,
    make_gate_dir,
    require_llama,
    wait_until,
)
from processkit import stop

from qmesh.config import load_config
from qmesh.daemon.errors import BadRequest, RuntimeFailed, UnknownModel
from qmesh.daemon.role import run_daemon
from qmesh.daemon.runtimes.base import Delta, Finished, GenerationRequest
from qmesh.daemon.runtimes.ollama import OllamaRuntime
from qmesh.daemon.runtimes.openai import OpenAICompatRuntime
from qmesh.gate.role import run_gate
from qmesh.web.http import Request, Response, Router
from qmesh.web.native import serve_http

ANSWER = "Paris is the capital and largest city of France .".split()


class FakeOllama:
    """Ollama's HTTP API as documented (docs/api.md), with canned text."""

    def __init__(self) -> None:
        self.models = {
            "llama3.2:1b": {
                "size": 1_321_098_329,
                "family": "llama",
                "parameter_size": "1.2B",
                "quantization_level": "Q8_0",
            },
            "qwen2.5:0.5b": {
                "size": 397_821_319,
                "family": "qwen2",
                "parameter_size": "494.03M",
                "quantization_level": "Q4_K_M",
            },
        }
        self.loaded: dict[str, str] = {}  # model → keep_alive
        self.requests: list[dict[str, Any]] = []

    def router(self) -> Router:
        router = Router()
        router.add("GET", "/api/version", self.version)
        router.add("GET", "/api/tags", self.tags)
        router.add("GET", "/api/ps", self.ps)
        router.add("POST", "/api/generate", self.generate)
        router.add("POST", "/api/chat", self.chat)
        return router

    async def version(self, request: Request) -> Response:
        return Response.json({"version": "0.5.7"})

    async def tags(self, request: Request) -> Response:
        return Response.json(
            {
                "models": [
                    {
                        "name": name,
                        "model": name,
                        "size": m["size"],
                        "digest": "sha256:" + "0" * 64,
                        "details": {
                            "format": "gguf",
                            "family": m["family"],
                            "parameter_size": m["parameter_size"],
                            "quantization_level": m["quantization_level"],
                        },
                    }
                    for name, m in self.models.items()
                ]
            }
        )

    async def ps(self, request: Request) -> Response:
        return Response.json(
            {
                "models": [
                    {
                        "name": n,
                        "model": n,
                        "size": self.models[n]["size"],
                        "size_vram": 0,
                        "expires_at": "2099-01-01T00:00:00Z",
                    }
                    for n in self.loaded
                ]
            }
        )

    def _model(self, body: dict[str, Any]) -> str:
        model = body.get("model")
        if model not in self.models:
            raise _NotFound(model)
        return str(model)

    async def generate(self, request: Request) -> Response:
        body = request.json()
        self.requests.append(body)
        try:
            model = self._model(body)
        except _NotFound as exc:
            return exc.response()
        if not body.get("prompt"):
            if body.get("keep_alive") == 0:
                self.loaded.pop(model, None)
                return Response.json(
                    {"model": model, "response": "", "done": True, "done_reason": "unload"}
                )
            self.loaded[model] = str(body.get("keep_alive"))
            return Response.json(
                {"model": model, "response": "", "done": True, "done_reason": "load"}
            )
        self.loaded[model] = str(body.get("keep_alive"))
        return self._stream(model, body, lambda word: {"response": word})

    async def chat(self, request: Request) -> Response:
        body = request.json()
        self.requests.append(body)
        try:
            model = self._model(body)
        except _NotFound as exc:
            return exc.response()
        if not isinstance(body.get("messages"), list):
            return Response.json({"error": "messages is required"}, status=400)
        self.loaded[model] = str(body.get("keep_alive"))
        return self._stream(
            model, body, lambda word: {"message": {"role": "assistant", "content": word}}
        )

    def _stream(self, model: str, body: dict[str, Any], piece: Any) -> Response:
        limit = (body.get("options") or {}).get("num_predict") or len(ANSWER)
        words = ANSWER[:limit]

        async def lines() -> AsyncIterator[bytes]:
            for i, word in enumerate(words):
                text = word if i == 0 else " " + word
                line = {
                    "model": model,
                    "created_at": "2025-01-01T00:00:00Z",
                    "done": False,
                    **piece(text),
                }
                yield (json.dumps(line) + "\n").encode()
                await trio.sleep(0.01)  # one token at a time, like the real thing
            final = {
                "model": model,
                "done": True,
                "done_reason": "length" if len(words) < len(ANSWER) else "stop",
                "prompt_eval_count": 7,
                "eval_count": len(words),
                **piece(""),
            }
            yield (json.dumps(final) + "\n").encode()

        return Response(200, b"", (("content-type", "application/x-ndjson"),), lines())


class _NotFound(Exception):
    def response(self) -> Response:
        return Response.json(
            {"error": f"model '{self.args[0]}' not found, try pulling it first"}, status=404
        )


async def start_fake_ollama(nursery: trio.Nursery) -> tuple[FakeOllama, str]:
    fake = FakeOllama()
    port = await nursery.start(serve_http, fake.router(), "127.0.0.1", 0)
    return fake, f"http://127.0.0.1:{port}"


async def collect(events: AsyncIterator[Any]) -> tuple[list[str], Finished]:
    pieces: list[str] = []
    finished: Finished | None = None
    async for event in events:
        if isinstance(event, Delta):
            pieces.append(event.text)
        else:
            assert isinstance(event, Finished)
            finished = event
    assert finished is not None
    return pieces, finished


async def test_ollama_adapter(nursery: trio.Nursery) -> None:
    fake, url = await start_fake_ollama(nursery)
    ollama = OllamaRuntime("ollama", url, keep_alive="5m")
    assert (await ollama.health()).detail == "ollama 0.5.7"
    models = {m.id: m for m in await ollama.list_models()}
    assert set(models) == {"llama3.2:1b", "qwen2.5:0.5b"}
    assert models["llama3.2:1b"].details["quantization"] == "Q8_0"
    assert models["llama3.2:1b"].memory_bytes == 1_321_098_329

    assert await ollama.loaded_models() == []
    await ollama.load("llama3.2:1b")
    assert await ollama.loaded_models() == ["llama3.2:1b"]
    assert fake.requests[-1] == {"model": "llama3.2:1b", "keep_alive": "5m"}
    await ollama.unload("llama3.2:1b")
    assert await ollama.loaded_models() == []
    assert fake.requests[-1]["keep_alive"] == 0

    request = GenerationRequest.from_openai(
        "completions",
        {
            "prompt": "The capital of France:",
            "max_tokens": 4,
            "temperature": 0.2,
            "stop": ["\n"],
            "seed": 7,
        },
    )
    pieces, finished = await collect(ollama.generate("qwen2.5:0.5b", request))
    assert pieces == ["Paris", " is", " the", " capital"]
    assert (finished.finish_reason, finished.prompt_tokens, finished.completion_tokens) == (
        "length",
        7,
        4,
    )
    sent = fake.requests[-1]
    assert sent["raw"] is True and sent["stream"] is True  # the prompt is the prompt
    assert sent["options"] == {"num_predict": 4, "temperature": 0.2, "seed": 7, "stop": ["\n"]}
    assert await ollama.loaded_models() == ["qwen2.5:0.5b"]  # generating loaded it

    chat = GenerationRequest.from_openai(
        "chat.completions", {"messages": [{"role": "user", "content": "Capital of France?"}]}
    )
    pieces, finished = await collect(ollama.generate("llama3.2:1b", chat))
    assert "".join(pieces) == " ".join(ANSWER) and finished.finish_reason == "stop"
    assert fake.requests[-1]["messages"] == [{"role": "user", "content": "Capital of France?"}]

    with pytest.raises(UnknownModel):
        await collect(ollama.generate("mistral:7b", request))
    with pytest.raises(UnknownModel):
        await ollama.load("mistral:7b")
    down = OllamaRuntime("down", f"http://127.0.0.1:{free_port()}")
    assert not (await down.health()).ok
    with pytest.raises(RuntimeFailed, match="cannot connect"):
        await down.list_models()


@pytest.fixture(scope="module")
def llama_server() -> Iterator[str]:
    """A real OpenAI-compatible server: llama-cpp-python's, serving Gemma."""
    require_llama()
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(gemma_path()),
            "--model_alias",
            GEMMA_ID,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_ctx",
            "512",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                import urllib.request

                with urllib.request.urlopen(url + "/v1/models", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("llama_cpp.server did not start") from None
                time.sleep(0.2)
        yield url
    finally:
        stop(process, timeout=15)


async def test_openai_compatible_adapter(llama_server: str) -> None:
    server = OpenAICompatRuntime("openai", llama_server)
    assert (await server.health()).ok
    assert [m.id for m in await server.list_models()] == [GEMMA_ID]
    await server.load(GEMMA_ID)  # listed: nothing to do
    with pytest.raises(UnknownModel):
        await server.load("gpt-x")
    request = GenerationRequest.from_openai(
        "completions", {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
    )
    pieces, finished = await collect(server.generate(GEMMA_ID, request))
    assert len(pieces) >= 3 and "".join(pieces).strip()
    assert finished.finish_reason in ("length", "stop")
    assert finished.completion_tokens == len(pieces)
    chat = GenerationRequest.from_openai(
        "chat.completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    )
    _, finished = await collect(server.generate(GEMMA_ID, chat))
    assert finished.finish_reason in ("length", "stop")


def test_requests_are_validated() -> None:
    for endpoint, body, field in [
        ("completions", {"prompt": 3}, "'prompt'"),
        ("chat.completions", {"messages": []}, "'messages'"),
        ("chat.completions", {"messages": [{"role": "wizard", "content": "x"}]}, "role"),
        ("completions", {"prompt": "x", "max_tokens": 0}, "'max_tokens'"),
        ("completions", {"prompt": "x", "temperature": 9}, "'temperature'"),
        ("completions", {"prompt": "x", "stop": [1]}, "'stop'"),
        ("embeddings", {"input": "x"}, "endpoint"),
    ]:
        with pytest.raises(BadRequest, match=field):
            GenerationRequest.from_openai(endpoint, body)
    parts = GenerationRequest.from_openai(
        "chat.completions",
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                }
            ]
        },
    )
    assert parts.messages[0]["content"] == "ab"


async def test_daemon_with_remote_runtimes(
    nursery: trio.Nursery, tmp_path: Path, llama_server: str
) -> None:
    """A daemon that drives an Ollama and an OpenAI-compatible server (no
    llama.cpp of its own): both runtimes' models reach the Gate's inventory
    and run through it."""
    _, ollama_url = await start_fake_ollama(nursery)
    gate_dir = make_gate_dir(tmp_path)
    credential = gate_dir.enroll_daemon("remote-1", tmp_path / "remote-1.cred")
    extra = (
        "llama_cpp = false\n"
        f'[[daemon.runtime]]\nkind = "ollama"\nurl = "{ollama_url}"\nname = "ollama"\n'
        f'[[daemon.runtime]]\nkind = "openai"\nurl = "{llama_server}"\n'
    )
    (tmp_path / "d.toml").write_text(
        daemon_config_text(tmp_path / "remote-1", credential, gate_dir, extra=extra)
    )
    gate = await nursery.start(run_gate, gate_dir.config(tmp_path))
    await nursery.start(run_daemon, load_config(tmp_path / "d.toml", env={}))
    inventory = gate["inventory"]
    await wait_until(lambda: inventory.nodes(now=time.time(), state="fresh"))
    status, body = await http_json("GET", gate["http"] + "/api/inventory", bearer=gate_dir.bearer)
    (node,) = body["nodes"]
    runtimes = {m["id"]: m["runtime"] for m in node["models"]}
    assert runtimes == {
        "llama3.2:1b": "ollama",
        "qwen2.5:0.5b": "ollama",
        GEMMA_ID: f"openai@127.0.0.1:{llama_server.rsplit(':', 1)[1]}",
    }
    assert {r["kind"] for r in node["runtimes"]} == {"ollama", "openai"}
    assert all(r["healthy"] for r in node["runtimes"])
    url = gate["http"] + "/api/daemons/remote-1/v1/chat/completions"
    status, answer = await http_json(
        "POST",
        url,
        bearer=gate_dir.bearer,
        body={"model": "llama3.2:1b", "messages": [{"role": "user", "content": "Capital?"}]},
    )
    assert status == 200, answer
    assert answer["choices"][0]["message"]["content"] == " ".join(ANSWER)
    assert answer["usage"] == {"prompt_tokens": 7, "completion_tokens": 10, "total_tokens": 17}
    status, answer = await http_json(
        "POST",
        gate["http"] + "/api/daemons/remote-1/v1/completions",
        bearer=gate_dir.bearer,
        body={"model": GEMMA_ID, "prompt": "Hello", "max_tokens": 3},
    )
    assert status == 200 and answer["usage"]["completion_tokens"] >= 1
    # Ollama's own state reaches the inventory: what it loaded is "loaded".
    with trio.fail_after(10):
        while True:
            node = inventory.get("remote-1", now=time.time())
            if node.models["llama3.2:1b"].state == "loaded":
                break
            await trio.sleep(0.05)
