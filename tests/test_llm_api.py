"""The Gate's OpenAI-compatible API with the official ``openai`` client over
real loopback sockets: internal skills, a real (small) OpenAI-compatible
provider server, failover, streaming, errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs
import openai
import pytest
import trio
from llmkit import (
    FakeAnthropic,
    GateApi,
    flushed_rows,
    paid_model,
    provider_config,
    start_api,
    start_provider,
)
from pgkit import in_thread

from qmesh.config import RoutingConfig

TEXT = (
    "The city council voted on Tuesday to expand the bus network into the northern suburbs. "
    "The plan adds four new routes and raises the frequency on the busiest line. "
    "Supporters said the change would cut car traffic on the main bridge. "
    "Opponents argued that the cost would force cuts to road maintenance. "
    "The mayor said the money would come from a federal grant. "
    "Construction of new shelters will begin in the spring."
)


def client(api: GateApi, app: str = "app-a", **options: Any) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=api.base_url, api_key=api.tokens[app], max_retries=0, timeout=20, **options
    )


async def test_summarize_dsn_is_answered_by_the_internal_skill(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    api = await start_api(nursery, tmp_path)
    c = client(api)
    reply = await in_thread(
        lambda: c.chat.completions.create(
            model="qg://task=summarize;prefer=speed",
            messages=[{"role": "user", "content": TEXT}],
        )
    )
    assert reply.model == "qmesh-summarize"
    content = reply.choices[0].message.content
    assert content and content.startswith("The city council voted")
    assert len(content) < len(TEXT)
    assert reply.usage is not None and reply.usage.prompt_tokens > 0
    rows = await flushed_rows(api)
    assert rows[-1]["candidate"] == "skill:summarize" and rows[-1]["outcome"] == "ok"
    assert rows[-1]["app"] == "app-a"


async def test_streaming_from_a_skill(nursery: trio.Nursery, tmp_path: Path) -> None:
    api = await start_api(nursery, tmp_path)
    c = client(api)

    def run() -> str:
        stream = c.chat.completions.create(
            model="qg://task=summarize",
            messages=[{"role": "user", "content": TEXT}],
            stream=True,
        )
        return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)

    text = await in_thread(run)
    assert text.startswith("The city council voted")


async def test_other_skills_embeddings_and_models(nursery: trio.Nursery, tmp_path: Path) -> None:
    api = await start_api(nursery, tmp_path)
    c = client(api)
    classified = await in_thread(
        lambda: c.chat.completions.create(
            model="qg://task=classify",
            messages=[{"role": "user", "content": "This update is terrible, it crashed my app."}],
        )
    )
    verdict = json.loads(classified.choices[0].message.content or "{}")
    assert verdict["language"] == "en" and verdict["sentiment"] == "negative"
    redacted = await in_thread(
        lambda: c.chat.completions.create(
            model="qmesh-redact",
            messages=[{"role": "user", "content": "mail jane@example.com now"}],
        )
    )
    assert redacted.choices[0].message.content == "mail [EMAIL] now"
    vectors = await in_thread(
        lambda: c.embeddings.create(model="qg://task=embed", input=["a cat", "a cat", "stocks"])
    )
    a, b, z = (v.embedding for v in vectors.data)
    assert len(a) == 256 and a == b and a != z
    models = await in_thread(lambda: c.models.list())
    ids = {m.id for m in models.data}
    assert {"qmesh-summarize", "qmesh-embed"} <= ids


@pytest.mark.parametrize(
    ("model", "needle"),
    [
        ("qg://taks=summarize", "unknown key 'taks' (did you mean 'task'?)"),
        ("qg://task=sumarize", "unknown task 'sumarize'"),
        ("qg://task=chat;max_cost=-1", "max_cost must not be negative"),
        ("qg://", "empty DSN"),
    ],
)
async def test_bad_dsn_is_a_400_naming_the_problem(
    nursery: trio.Nursery, tmp_path: Path, model: str, needle: str
) -> None:
    api = await start_api(nursery, tmp_path)
    c = client(api)
    with pytest.raises(openai.BadRequestError) as info:
        await in_thread(
            lambda: c.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hi"}]
            )
        )
    assert info.value.status_code == 400
    body = info.value.body
    assert isinstance(body, dict)
    assert needle in body["message"]
    assert body["type"] == "invalid_request_error" and body["param"] == "model"
    assert body["code"] == "invalid_dsn"


async def test_wrong_app_key_is_401_and_unknown_model_404(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    api = await start_api(nursery, tmp_path)
    bad = openai.OpenAI(base_url=api.base_url, api_key="app-a:wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        await in_thread(
            lambda: bad.chat.completions.create(
                model="qg://task=summarize", messages=[{"role": "user", "content": "x"}]
            )
        )
    assert info.value.status_code == 401
    with pytest.raises(openai.NotFoundError):
        await in_thread(
            lambda: client(api).chat.completions.create(
                model="no-such-model", messages=[{"role": "user", "content": "x"}]
            )
        )


async def test_paid_provider_is_called_and_costed(nursery: trio.Nursery, tmp_path: Path) -> None:
    acme = await start_provider(nursery, "acme", prompt_tokens=1000, completion_tokens=500)
    api = await start_api(
        nursery,
        tmp_path,
        providers=[
            provider_config(
                "acme", acme.port, [paid_model("acme-large", upstream="large-v2")], api_key="env:K"
            )
        ],
        env={"K": "sk-test-secret"},
    )
    c = client(api)
    reply = await in_thread(
        lambda: c.chat.completions.create(
            model="qg://task=creative_writing;prefer=quality",
            messages=[{"role": "user", "content": "a poem"}],
        )
    )
    assert reply.choices[0].message.content == "answer from acme"
    assert acme.bodies[-1]["model"] == "large-v2"
    assert acme.auth[-1] == "Bearer sk-test-secret"
    # Keep-alive: the second call reuses the pooled connection.
    await in_thread(
        lambda: c.chat.completions.create(
            model="acme-large", messages=[{"role": "user", "content": "again"}]
        )
    )
    assert len(acme.peers) == 2 and len(set(acme.peers)) == 1
    rows = await flushed_rows(api)
    assert rows[-1]["provider"] == "provider:acme"
    assert rows[-1]["tokens_in"] == 1000 and rows[-1]["tokens_out"] == 500
    # $1 per 1M in, $2 per 1M out
    assert rows[-1]["cost_usd"] == pytest.approx(1000 * 1.0 / 1e6 + 500 * 2.0 / 1e6)


async def test_busy_provider_fails_over_to_an_equivalent(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    busy = await start_provider(nursery, "busy", mode="busy")
    good = await start_provider(nursery, "good")
    same = {"family": "llama", "size_class": "m"}
    api = await start_api(
        nursery,
        tmp_path,
        providers=[
            # the busy one is cheaper, so prefer=cost picks it first
            provider_config("busy", busy.port, [paid_model("m-busy", price_in=0.1, **same)]),
            provider_config("good", good.port, [paid_model("m-good", **same)]),
        ],
    )
    c = client(api)
    reply = await in_thread(
        lambda: c.chat.completions.create(
            model="m-busy", messages=[{"role": "user", "content": "hello"}]
        )
    )
    assert reply.choices[0].message.content == "answer from good"
    assert busy.requests == 1 and good.requests == 1
    rows = await flushed_rows(api)
    hops = json.loads(rows[-1]["hops"])
    assert [h["outcome"] for h in hops] == ["busy", "ok"]
    assert hops[0]["candidate"] == "provider:busy/m-busy"


async def test_dead_provider_cools_down_and_requests_move_on(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    good = await start_provider(nursery, "good")
    with trio.socket.socket() as s:  # a port with nobody listening
        await s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    api = await start_api(
        nursery,
        tmp_path,
        providers=[
            provider_config("dead", dead_port, [paid_model("x-dead", price_in=0.1)]),
            provider_config("good", good.port, [paid_model("x-good")]),
        ],
        routing=RoutingConfig(cooldown_s=60.0),
    )
    c = client(api)
    for _ in range(3):
        reply = await in_thread(
            lambda: c.chat.completions.create(
                model="qg://task=chat;prefer=cost", messages=[{"role": "user", "content": "hi"}]
            )
        )
        assert reply.choices[0].message.content == "answer from good"
    rows = await flushed_rows(api)
    first, *later = (json.loads(r["hops"]) for r in rows)
    assert [h["outcome"] for h in first] == ["failed", "ok"]
    # cooling down: the dead provider is not even tried again
    assert all([h["outcome"] for h in hops] == ["ok"] for hops in later)


async def test_mid_stream_failure_ends_with_an_error_event(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    broken = await start_provider(nursery, "broken", mode="break")
    api = await start_api(
        nursery, tmp_path, providers=[provider_config("broken", broken.port, [paid_model("b")])]
    )
    c = client(api)

    def run() -> list[str]:
        got: list[str] = []
        stream = c.chat.completions.create(
            model="b", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        for chunk in stream:
            if chunk.choices:
                got.append(chunk.choices[0].delta.content or "")
        return got

    with trio.fail_after(15):
        with pytest.raises(openai.APIError, match="stream broke off"):
            await in_thread(run)
    rows = await flushed_rows(api)
    assert rows[-1]["outcome"] == "stream_broken"


async def test_streaming_through_a_provider_counts_usage(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    acme = await start_provider(nursery, "acme", prompt_tokens=7, completion_tokens=9)
    api = await start_api(
        nursery, tmp_path, providers=[provider_config("acme", acme.port, [paid_model("p")])]
    )
    c = client(api)

    def run() -> str:
        stream = c.chat.completions.create(
            model="p", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        return "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)

    assert (await in_thread(run)).strip() == "answer from acme"
    rows = await flushed_rows(api)
    assert (rows[-1]["tokens_in"], rows[-1]["tokens_out"]) == (7, 9)


async def test_route_endpoint_explains(nursery: trio.Nursery, tmp_path: Path) -> None:
    acme = await start_provider(nursery, "acme")
    api = await start_api(
        nursery, tmp_path, providers=[provider_config("acme", acme.port, [paid_model("big")])]
    )
    c = client(api)
    raw = await in_thread(
        lambda: c.post(
            "/../qg/v1/route",
            body={"dsn": "qg://task=summarize;privacy=local"},
            cast_to=object,
        )
    )
    assert isinstance(raw, dict)
    rows = {r["candidate"]: r for r in raw["candidates"]}
    assert rows["skill:summarize"]["status"] == "chosen"
    assert "privacy=local" in rows["provider:acme/big"]["reason"]
    assert raw["decision"]["chosen"] == "skill:summarize"


async def test_anthropic_style_provider_is_translated(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    claude = FakeAnthropic()
    claude.port = await nursery.start(claude.serve)
    provider = attrs.evolve(
        provider_config("anth", claude.port, [paid_model("claude-ish")], api_key="env:AK"),
        kind="anthropic",
        base_url=f"http://127.0.0.1:{claude.port}",
    )
    api = await start_api(nursery, tmp_path, providers=[provider], env={"AK": "ak-secret"})
    c = client(api)

    def run() -> tuple[str, str]:
        reply = c.chat.completions.create(
            model="claude-ish",
            messages=[
                {"role": "system", "content": "Answer in French."},
                {"role": "user", "content": "hello"},
            ],
            max_tokens=50,
        )
        streamed = "".join(
            chunk.choices[0].delta.content or ""
            for chunk in c.chat.completions.create(
                model="claude-ish", messages=[{"role": "user", "content": "hi"}], stream=True
            )
            if chunk.choices
        )
        return reply.choices[0].message.content or "", streamed

    text, streamed = await in_thread(run)
    assert text == "bonjour from claude-ish" and streamed == "bonjour"
    assert claude.bodies[0]["system"] == "Answer in French."
    assert claude.bodies[0]["messages"] == [{"role": "user", "content": "hello"}]
    assert claude.bodies[0]["max_tokens"] == 50 and claude.keys[0] == "ak-secret"
    rows = await flushed_rows(api, at_least=2)
    # Settled in whichever order the two calls finished their accounting.
    tokens = sorted((row["tokens_in"], row["tokens_out"]) for row in rows[:2])
    assert tokens == [(11, 2), (11, 5)]


async def test_memory_query_is_answered_from_the_graph_memory(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    from qmesh.memory.service import Memory

    api = await start_api(nursery, tmp_path)
    memory = Memory(api.store)
    memory.add(
        "Acme Corporation was founded in 1998 by Jane Doe. Acme is headquartered in Springfield.",
        document_id="acme",
        shared=True,
    )
    api.service.attach_memory(memory)
    c = client(api)
    reply = await in_thread(
        lambda: c.chat.completions.create(
            model="qg://task=memory_query",
            messages=[{"role": "user", "content": "Who founded Acme Corporation?"}],
        )
    )
    text = reply.choices[0].message.content or ""
    assert reply.model == "qmesh-memory"
    assert "Jane Doe" in text and "[1]" in text
