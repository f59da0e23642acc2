"""The graph memory's LLM paths over real loopback sockets: the Gate's HTTP
API (memory and model service on one router, as ``run_gate`` wires them)
and a real OpenAI-compatible provider server written here, whose replies
each test scripts. Nothing a model says reaches the caller or the graph
unless a stored sentence supports it."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from llmkit import paid_model, provider_config

from qmesh.config import (
    Config,
    ConfigError,
    GateConfig,
    MemoryConfig,
    ProviderConfig,
    RoutingConfig,
    load_config,
)
from qmesh.finops.ledger import read_rows
from qmesh.llm.api import add_llm_routes
from qmesh.llm.service import LlmService
from qmesh.memory.api import add_routes as add_memory_routes
from qmesh.memory.llm import EXTRACT_SYSTEM, LlmExtractor, parse_triples
from qmesh.memory.records import OPERATOR
from qmesh.memory.service import Memory
from qmesh.state import StateStore
from qmesh.web.auth import AppAuthenticator
from qmesh.web.http import Request, Response, Router
from qmesh.web.native import serve_http

ACME = (
    "Acme Corporation was founded in 1998 by Jane Doe in Springfield. "
    "The company makes anvils and rockets."
)
GLOBEX = "The headquarters of Globex are in Springfield. Globex sells gadgets."

Script = Callable[[str, str], str]
"""(system prompt, user prompt) -> the reply text."""


@attrs.define
class ScriptedProvider:
    """An OpenAI-compatible ``/v1/chat/completions`` server answering ``script``."""

    script: Script
    port: int = 0
    bodies: list[dict[str, Any]] = attrs.field(factory=list)

    async def chat(self, request: Request) -> Response:
        body = request.json()
        self.bodies.append(body)
        messages = {m["role"]: m["content"] for m in body["messages"]}
        content = self.script(messages.get("system", ""), messages.get("user", ""))
        return Response.json(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 50, "completion_tokens": 10, "total_tokens": 60},
            }
        )

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        router = Router()
        router.add("POST", "/v1/chat/completions", self.chat)
        await serve_http(router, "127.0.0.1", 0, task_status=task_status)


@attrs.define
class Gate:
    port: int
    token: str
    store: StateStore
    service: LlmService
    provider: ScriptedProvider | None

    async def post(self, path: str, body: Any) -> tuple[int, Any]:
        data = json.dumps(body).encode()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            f"Content-Length: {len(data)}\r\nAuthorization: Bearer {self.token}\r\n\r\n"
        )
        stream = await trio.open_tcp_stream("127.0.0.1", self.port)
        async with stream:
            await stream.send_all(head.encode() + data)
            received = bytearray()
            with trio.fail_after(10):
                while chunk := await stream.receive_some(65536):
                    received += chunk
        status, _, rest = bytes(received).partition(b"\r\n\r\n")
        return int(status.split(b" ", 2)[1]), json.loads(rest)


async def start_gate(
    nursery: trio.Nursery, tmp_path: Path, script: Script | None, memory: MemoryConfig | None = None
) -> Gate:
    provider = None
    providers: tuple[ProviderConfig, ...] = ()
    if script is not None:
        provider = ScriptedProvider(script)
        provider.port = await nursery.start(provider.serve)
        model = paid_model("gpt-x", tasks=("chat", "extract"), upstream="up-x")
        providers = (provider_config("cloud", provider.port, [model]),)
    store = StateStore.open(tmp_path / "state.db")
    token = f"app-a:{store.add_app('app-a')}"
    gate = GateConfig(
        providers=providers,
        routing=RoutingConfig(cooldown_s=30.0),
        memory=memory or MemoryConfig(),
    )
    config = attrs.evolve(Config(data_dir=tmp_path), gate=gate)
    service = LlmService(config, store, env={}, measure_skills=False)
    await nursery.start(service.run)
    router = Router()
    auth = AppAuthenticator(store)
    memory_service = Memory(store)
    add_memory_routes(router, memory_service, auth, mesh=service, config=config.gate.memory)
    add_llm_routes(router, service, auth)
    port: int = await nursery.start(serve_http, router, "127.0.0.1", 0)
    return Gate(port, token, store, service, provider)


def composer(reply: str) -> Script:
    def script(system: str, user: str) -> str:
        assert not system.startswith("You extract")
        return reply

    return script


async def ask_composed(gate: Gate) -> dict[str, Any]:
    status, body = await gate.post("/v1/memory/documents", {"id": "acme", "text": ACME})
    assert status == 201, body
    assert body["extractor"] == "rules" and "llm" not in body
    status, body = await gate.post(
        "/v1/memory/query", {"question": "Who founded Acme?", "compose": "llm"}
    )
    assert status == 200, body
    return dict(body)


async def test_a_well_cited_composed_answer_is_kept(nursery: trio.Nursery, tmp_path: Path) -> None:
    gate = await start_gate(
        nursery, tmp_path, composer("Jane Doe founded Acme Corporation in 1998 [1].")
    )
    body = await ask_composed(gate)
    assert body["composed_by"] == "llm"
    assert body["answer"] == "Jane Doe founded Acme Corporation in 1998 [1]."
    assert body["dropped"] == []
    assert body["citations"][0]["text"].startswith("Acme Corporation was founded in 1998")
    # The model saw the question and the numbered stored sentences, routed to
    # the provider's upstream model id, and the call is in the app's ledger.
    assert gate.provider is not None
    sent = gate.provider.bodies[-1]
    assert sent["model"] == "up-x"
    user = sent["messages"][-1]["content"]
    assert "[1] Acme Corporation was founded in 1998" in user and "Who founded Acme?" in user
    await gate.service.ledger.flush()
    rows = read_rows(gate.store)
    assert rows[-1]["app"] == "app-a" and rows[-1]["candidate"] == "provider:cloud/gpt-x"
    assert rows[-1]["task"] == "chat" and rows[-1]["outcome"] == "ok"


async def test_uncited_and_invented_sentences_are_dropped(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    reply = (
        "Jane Doe founded Acme Corporation in 1998 [1]. "
        "She later sold it to Globex for $5 million. "
        "Acme was founded in 2004 [1]. "
        "Acme is owned by Initech [9]."
    )
    gate = await start_gate(nursery, tmp_path, composer(reply))
    body = await ask_composed(gate)
    assert body["composed_by"] == "llm"
    assert body["answer"] == "Jane Doe founded Acme Corporation in 1998 [1]."
    reasons = {d["text"]: d["reason"] for d in body["dropped"]}
    assert reasons == {
        "She later sold it to Globex for $5 million.": "cites nothing",
        "Acme was founded in 2004 [1].": ("states 2004, which the sentences it cites do not"),
        "Acme is owned by Initech [9].": "cites [9], which no source has",
    }


async def test_garbage_falls_back_to_the_extractive_answer(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    gate = await start_gate(nursery, tmp_path, composer("}{ <|im_end|> lorem ipsum ###"))
    body = await ask_composed(gate)
    assert body["composed_by"] == "extractive"
    assert body["answer"] == (
        "Acme Corporation was founded in 1998 by Jane Doe in Springfield. [1]"
    )
    assert body["dropped"] and all(d["reason"] == "cites nothing" for d in body["dropped"])


async def test_no_model_means_the_extractive_answer(nursery: trio.Nursery, tmp_path: Path) -> None:
    gate = await start_gate(nursery, tmp_path, None)
    body = await ask_composed(gate)
    assert body["composed_by"] == "extractive" and body["found"] is True
    assert "no model answered" in body["compose_error"]
    # An unknown value is the caller's mistake.
    status, error = await gate.post(
        "/v1/memory/query", {"question": "Who founded Acme?", "compose": "gpt"}
    )
    assert status == 400 and "compose must be one of" in error["error"]["message"]


def extractor_script(system: str, user: str) -> str:
    """One valid triple (not one the rules find) and invented ones, for sentence 1."""
    assert system == EXTRACT_SYSTEM and user.startswith("1. The headquarters of Globex")
    return (
        "```json\n"
        + json.dumps(
            {
                "sentences": [
                    {
                        "n": 1,
                        "triples": [
                            {
                                "subject": "Globex",
                                "predicate": "headquartered in",
                                "object": "Springfield",
                            },
                            {"subject": "Globex", "predicate": "acquired", "object": "Initech"},
                            {"subject": "Globex", "predicate": "owns", "object": "Springfield"},
                        ],
                    },
                    {"n": 7, "triples": [{"subject": "x", "predicate": "y", "object": "z"}]},
                    "junk",
                ]
            }
        )
        + "\n```"
    )


async def test_llm_extractor_stores_only_supported_triples(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    gate = await start_gate(nursery, tmp_path, extractor_script)
    status, body = await gate.post(
        "/v1/memory/documents", {"id": "globex", "text": GLOBEX, "extractor": "llm"}
    )
    assert status == 201, body
    assert body["extractor"] == "rules+llm"
    assert body["llm"] == {"requests": 1, "failed": 0, "proposed": 3, "kept": 1}
    assert gate.provider is not None and gate.provider.bodies[-1]["model"] == "up-x"
    status, answer = await gate.post(
        "/v1/memory/query", {"question": "Where are the headquarters of Globex?"}
    )
    assert status == 200
    facts = [(f["subject"], f["predicate"], f["object"]) for f in answer["facts"]]
    assert ("Globex", "headquartered in", "Springfield") in facts
    assert not any(f[1] in ("acquired", "owns") for f in facts)
    fact = answer["facts"][facts.index(("Globex", "headquartered in", "Springfield"))]
    [citation] = fact["citations"]
    assert citation["document_id"] == "globex"
    assert citation["text"] == "The headquarters of Globex are in Springfield."
    assert GLOBEX[citation["start"] : citation["end"]] == citation["text"]
    listing = Memory(gate.store)
    with listing.store.reader() as reader:
        names = {e for es in reader.entities_by_key(["initech"]).values() for e in es}
    assert names == set()
    assert not any(listing.store.integrity_problems().values())
    assert [d.extractor for d in listing.documents(access=OPERATOR)] == ["rules+llm"]


async def test_llm_extractor_is_the_configured_default_and_survives_no_model(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    gate = await start_gate(nursery, tmp_path, None, MemoryConfig(extractor="llm"))
    status, body = await gate.post("/v1/memory/documents", {"id": "acme", "text": ACME})
    assert status == 201, body
    # No provider can do task=extract except the built-in skill, which is not
    # a model: the rules' facts are stored, and the response says so.
    assert body["extractor"] == "rules+llm" and body["relations"] >= 2
    assert body["llm"]["failed"] == body["llm"]["requests"] == 1
    status, body = await gate.post(
        "/v1/memory/documents", {"id": "g", "text": GLOBEX, "extractor": "rules"}
    )
    assert status == 201 and body["extractor"] == "rules" and "llm" not in body


def test_parse_triples_is_defensive() -> None:
    assert parse_triples("not json", 2) == [[], []]
    assert parse_triples('{"sentences": {"n": 1}}', 1) == [[]]
    triple = {"subject": "A", "predicate": "b", "object": 3}
    reply = json.dumps({"sentences": [{"n": 1, "triples": [triple]}]})
    assert parse_triples(reply, 1) == [[]]
    extractor = LlmExtractor(lambda system, user: '{"sentences": [{"n": true, "triples": []}]}')
    assert extractor.extract(["Acme makes anvils."])[0] == extractor.rules.extract_one(
        "Acme makes anvils."
    )


def test_gate_memory_config(tmp_path: Path) -> None:
    path = tmp_path / "qmesh.toml"
    path.write_text(
        '[gate.memory]\nextractor = "llm"\ncompose_dsn = "qg://task=chat;privacy=local"\n'
    )
    memory = load_config(path, env={}).gate.memory
    assert memory == MemoryConfig(extractor="llm", compose_dsn="qg://task=chat;privacy=local")
    assert load_config(None, env={}).gate.memory.extractor == "rules"
    for bad, problem in (
        ('extractor = "gpt"', "expected one of"),
        ('extract_dsn = "task=extract"', "expected a qg:// DSN"),
        ("compose = 1", "unknown key"),
    ):
        path.write_text(f"[gate.memory]\n{bad}\n")
        with pytest.raises(ConfigError, match=problem):
            load_config(path, env={})
