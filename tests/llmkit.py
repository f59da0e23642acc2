"""Helpers for the qg:// and OpenAI-compatible API tests: a real (small)
OpenAI-compatible provider server on loopback, and a Gate's LLM service
with its HTTP API on port 0."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import trio
import trio.lowlevel
from statekit import close_after_the_test

from qmesh.config import (
    BudgetConfig,
    Config,
    GateConfig,
    HttpConfig,
    ProviderConfig,
    ProviderModelConfig,
    RoutingConfig,
)
from qmesh.finops.ledger import read_rows
from qmesh.llm.api import add_llm_routes
from qmesh.llm.service import LlmService
from qmesh.state import StateStore
from qmesh.web.auth import ADMIN_APP, AppAuthenticator
from qmesh.web.http import HttpError, Request, Response, Router
from qmesh.web.native import serve_http
from qmesh.web.tls import GateTls

WORDS = "the quick brown fox jumps over the lazy dog".split()


@attrs.define
class FakeProvider:
    """An OpenAI-compatible server that answers with fixed usage. ``mode``:
    ``ok``, ``busy`` (503), ``error`` (500), ``break`` (a stream that dies
    after two chunks), ``stall`` (a stream that stops sending)."""

    name: str
    mode: str = "ok"
    prompt_tokens: int = 100
    completion_tokens: int = 20
    delay_s: float = 0.0
    port: int = 0
    requests: int = 0
    bodies: list[dict[str, Any]] = attrs.field(factory=list)
    auth: list[str | None] = attrs.field(factory=list)
    peers: list[str] = attrs.field(factory=list)
    """The client address of each request: one per connection the Gate opened."""
    tls: GateTls | None = None
    """Serve https with this certificate."""

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    async def chat(self, request: Request) -> Response:
        self.requests += 1
        body = request.json()
        self.bodies.append(body)
        self.auth.append(request.headers.get("authorization"))
        self.peers.append(request.client)
        if self.delay_s:
            await trio.sleep(self.delay_s)
        if self.mode == "busy":
            raise HttpError(503, "overloaded", kind="server_error")
        if self.mode == "error":
            raise HttpError(500, "boom", kind="server_error")
        text = f"answer from {self.name}"
        if body.get("stream"):
            return Response.event_stream(self._events(body, text))
        return Response.json(
            {
                "id": "chatcmpl-x",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "stop",
                    }
                ],
                "usage": self.usage(),
            }
        )

    async def _events(self, body: dict[str, Any], text: str) -> AsyncIterator[bytes]:
        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            data = {
                "id": "chatcmpl-x",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": body["model"],
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            return f"data: {json.dumps(data)}\n\n".encode()

        yield chunk({"role": "assistant", "content": ""})
        for i, word in enumerate(text.split()):
            if i == 2 and self.mode == "break":
                raise RuntimeError("provider died mid-stream")
            if i == 2 and self.mode == "stall":
                await trio.sleep_forever()
            yield chunk({"content": word + " "})
            await trio.lowlevel.checkpoint()
        yield chunk({}, "stop")
        if (body.get("stream_options") or {}).get("include_usage"):
            final: dict[str, Any] = {"id": "x", "object": "chat.completion.chunk", "choices": []}
            final["usage"] = self.usage()
            data = final
            yield f"data: {json.dumps(data)}\n\n".encode()
        yield b"data: [DONE]\n\n"

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        router = Router()
        router.add("POST", "/v1/chat/completions", self.chat)
        router.add("POST", "/v1/completions", self.chat)
        await serve_http(router, "127.0.0.1", self.port, tls=self.tls, task_status=task_status)


async def start_provider(nursery: trio.Nursery, name: str, **options: Any) -> FakeProvider:
    provider = FakeProvider(name, **options)
    provider.port = await nursery.start(provider.serve)
    return provider


def provider_config(
    name: str,
    port: int,
    models: Sequence[ProviderModelConfig],
    *,
    private: bool = False,
    api_key: str | None = None,
) -> ProviderConfig:
    return ProviderConfig(
        name=name,
        base_url=f"http://127.0.0.1:{port}/v1",
        api_key=api_key,
        private=private,
        models=tuple(models),
    )


def paid_model(model_id: str, **values: Any) -> ProviderModelConfig:
    defaults: dict[str, Any] = {
        "tasks": ("chat", "creative_writing", "summarize"),
        "price_in": 1.0,
        "price_out": 2.0,
        "latency_ms": 50.0,
        "quality": 4,
    }
    defaults.update(values)
    return ProviderModelConfig(id=model_id, **defaults)


@attrs.define
class GateApi:
    service: LlmService
    store: StateStore
    port: int
    tokens: dict[str, str]
    auth: AppAuthenticator

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


MASTER_KEY = bytes(range(32))


async def start_api(
    nursery: trio.Nursery,
    tmp_path: Path,
    *,
    providers: Sequence[ProviderConfig] = (),
    budgets: Sequence[BudgetConfig] = (),
    routing: RoutingConfig | None = None,
    apps: Sequence[str] | None = ("app-a", "app-b"),
    env: dict[str, str] | None = None,
    http: HttpConfig | None = None,
    state: Path | str | None = None,
) -> GateApi:
    """``state``: where the Gate's state lives (default: SQLite in ``tmp_path``);
    ``apps`` are added to it with the admin app, unless None (another Gate
    on the same state added them: no tokens then)."""
    store = StateStore.open(state or tmp_path / "state.db")
    close_after_the_test(store)
    tokens = (
        {} if apps is None else {app: f"{app}:{store.add_app(app)}" for app in (*apps, ADMIN_APP)}
    )
    config = attrs.evolve(
        Config(data_dir=tmp_path),
        gate=GateConfig(
            providers=tuple(providers),
            budgets=tuple(budgets),
            routing=routing or RoutingConfig(cooldown_s=30.0),
        ),
    )
    # On PostgreSQL the ledger's chain key is sealed with the vault's master key.
    master_key = None if store.dialect == "sqlite" else MASTER_KEY
    service = LlmService(config, store, env=env or {}, master_key=master_key)
    await nursery.start(service.run)
    router = Router(http)
    auth = AppAuthenticator(store, http)
    add_llm_routes(router, service, auth)
    port: int = await nursery.start(serve_http, router, "127.0.0.1", 0)
    return GateApi(service, store, port, tokens, auth)


@attrs.define
class FakeAnthropic:
    """An Anthropic-style ``/v1/messages`` server with fixed usage."""

    port: int = 0
    bodies: list[dict[str, Any]] = attrs.field(factory=list)
    keys: list[str | None] = attrs.field(factory=list)

    async def messages(self, request: Request) -> Response:
        body = request.json()
        self.bodies.append(body)
        self.keys.append(request.headers.get("x-api-key"))
        if body.get("stream"):
            return Response.event_stream(self._events())
        return Response.json(
            {
                "id": "msg_1",
                "type": "message",
                "role": "assistant",
                "content": [{"type": "text", "text": "bonjour from claude-ish"}],
                "stop_reason": "end_turn",
                "usage": {"input_tokens": 11, "output_tokens": 5},
            }
        )

    async def _events(self) -> AsyncIterator[bytes]:
        events: list[dict[str, Any]] = [
            {"type": "message_start", "message": {"usage": {"input_tokens": 11}}},
            {"type": "content_block_start", "index": 0},
            {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "bon"}},
            {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "jour"}},
            {"type": "message_delta", "usage": {"output_tokens": 2}},
            {"type": "message_stop"},
        ]
        for event in events:
            yield f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        router = Router()
        router.add("POST", "/v1/messages", self.messages)
        await serve_http(router, "127.0.0.1", 0, task_status=task_status)


async def flushed_rows(api: GateApi, at_least: int = 1) -> list[dict[str, Any]]:
    """The ledger once it has ``at_least`` rows: a streamed request's row is
    written as its stream closes, which can be just after the client saw it end."""
    with trio.fail_after(5):
        while True:
            await api.service.ledger.flush()
            rows = read_rows(api.store)
            if len(rows) >= at_least:
                return rows
            await trio.sleep(0.01)
