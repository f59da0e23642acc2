"""An app's LLM policy at the Gate: models, providers, tasks, a privacy
floor, a max_tokens cap, requests and tokens per minute.

Real sockets: the Gate's LLM API on the native HTTP engine, a real
OpenAI-compatible provider on loopback, the ``openai`` package as the
client. The policy is stored in the state as ``qmesh apps policy`` stores
it, and the Gate reloads it as its state watcher would.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import attrs
import httpx2 as httpx
import openai
import trio
from llmkit import FakeProvider, GateApi, paid_model, provider_config, start_api, start_provider

from qmesh.config import GateAppConfig, LlmPolicyConfig
from qmesh.finops.chain import verify_chain
from qmesh.finops.ledger import read_prompts, read_rows
from qmesh.pg.policy import policy_to_json
from qmesh.web.pool import HttpPool, parse_url

TEXT = (
    "The river rose overnight after three days of rain. By morning the bridge was closed "
    "and the ferry carried the commuters across. The mayor said the bridge would reopen "
    "once engineers had inspected it."
)
SUMMARIZE = "qg://task=summarize;prefer=quality"


async def gate(nursery: trio.Nursery, tmp_path: Any) -> tuple[GateApi, FakeProvider]:
    acme = await start_provider(nursery, "acme", prompt_tokens=40, completion_tokens=10)
    api = await start_api(
        nursery, tmp_path, providers=[provider_config("acme", acme.port, [paid_model("acme-pro")])]
    )
    return api, acme


async def set_policy(api: GateApi, app: str, **llm: Any) -> None:
    api.store.set_app_policy(app, policy_to_json(GateAppConfig(llm=LlmPolicyConfig(**llm))))
    await api.service.reload_policies()


async def call(
    api: GateApi, path: str, body: dict[str, Any], app: str = "app-a"
) -> tuple[int, dict[str, str], Any]:
    pool = HttpPool()
    try:
        status, headers, data = await pool.request(
            "POST", parse_url(f"http://127.0.0.1:{api.port}"), path,
            headers={"authorization": f"Bearer {api.tokens[app]}",
                     "content-type": "application/json"},
            body=json.dumps(body).encode(),
        )  # fmt: skip
    finally:
        await pool.aclose()
    return status, {k.decode().lower(): v.decode() for k, v in headers}, json.loads(data)


def chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": TEXT}], **extra}


async def test_a_forbidden_model_is_refused_naming_the_rule(
    nursery: trio.Nursery, tmp_path: Any
) -> None:
    api, acme = await gate(nursery, tmp_path)
    await set_policy(api, "app-a", models=("qmesh-*",))
    status, _, body = await call(api, "/v1/chat/completions", chat("acme-pro"))
    assert status == 403, body
    assert body["error"]["code"] == "policy_forbids"
    assert (
        "app policy of 'app-a' allows models ['qmesh-*']: not 'acme-pro'"
        in body["error"]["message"]
    )
    # A DSN is routed within the policy: the skill serves what acme would have.
    status, _, body = await call(api, "/v1/chat/completions", chat(SUMMARIZE))
    assert status == 200 and body["model"] == "qmesh-summarize", body
    status, _, explained = await call(api, "/qg/v1/route", chat(SUMMARIZE))
    rows = {r["candidate"]: r for r in explained["candidates"]}
    assert rows["provider:acme/acme-pro"]["admission"].startswith(
        "skipped: app policy of 'app-a' allows models"
    )
    # Another app, without the policy, is served by acme as before.
    status, _, body = await call(api, "/v1/chat/completions", chat("acme-pro"), app="app-b")
    assert status == 200 and body["model"] == "acme-pro"
    assert acme.requests == 1


async def test_providers_and_tasks_are_held_to_the_policy(
    nursery: trio.Nursery, tmp_path: Any
) -> None:
    api, acme = await gate(nursery, tmp_path)
    await set_policy(api, "app-a", providers=("internal-llm",))
    status, _, body = await call(api, "/v1/chat/completions", chat("acme-pro"))
    assert status == 403
    assert "allows providers ['internal-llm']: not 'acme'" in body["error"]["message"]
    status, _, body = await call(api, "/v1/chat/completions", chat(SUMMARIZE))
    assert status == 200 and body["model"] == "qmesh-summarize"  # not a provider: allowed
    await set_policy(api, "app-a", tasks=("summarize",))
    status, _, body = await call(api, "/v1/chat/completions", chat("qg://task=chat"))
    assert status == 403
    assert (
        body["error"]["message"] == "app policy of 'app-a' allows tasks ['summarize']: not 'chat'"
    )
    assert acme.requests == 0


async def test_a_privacy_floor_changes_the_decision_and_its_explanation(
    nursery: trio.Nursery, tmp_path: Any
) -> None:
    api, acme = await gate(nursery, tmp_path)
    status, _, explained = await call(api, "/qg/v1/route", chat(SUMMARIZE))
    assert explained["decision"]["chosen"] == "provider:acme/acme-pro"
    await set_policy(api, "app-a", privacy="private")
    status, _, explained = await call(api, "/qg/v1/route", chat(SUMMARIZE))
    assert status == 200
    assert explained["dsn"] == "qg://task=summarize;prefer=quality;privacy=private"
    assert explained["decision"]["chosen"] == "skill:summarize"
    rows = {r["candidate"]: r for r in explained["candidates"]}
    assert rows["provider:acme/acme-pro"]["admission"] == (
        "skipped: privacy=private excludes a provider (cloud)"
    )
    status, _, body = await call(api, "/v1/chat/completions", chat(SUMMARIZE))
    assert status == 200 and body["model"] == "qmesh-summarize"
    assert acme.requests == 0


async def test_max_tokens_is_capped(nursery: trio.Nursery, tmp_path: Any) -> None:
    api, acme = await gate(nursery, tmp_path)
    await set_policy(api, "app-a", max_tokens=50)
    status, _, body = await call(api, "/v1/chat/completions", chat("acme-pro", max_tokens=100))
    assert status == 400
    assert (
        body["error"]["message"] == "max_tokens 100 is over the app policy's cap of 50 for 'app-a'"
    )
    status, _, body = await call(api, "/v1/chat/completions", chat("acme-pro"))
    assert status == 200
    assert acme.bodies[-1]["max_tokens"] == 50  # the model is told to stop there too
    status, _, body = await call(api, "/v1/chat/completions", chat("acme-pro", max_tokens=20))
    assert status == 200 and body["model"] == "acme-pro" and acme.bodies[-1]["max_tokens"] == 20


async def test_rate_limits_answer_429_and_the_openai_client_retries(
    nursery: trio.Nursery, tmp_path: Any
) -> None:
    api, _ = await gate(nursery, tmp_path)
    now = [1000.0]
    api.service.rate_limits._clock = lambda: now[0]  # time moves when the test says
    await set_policy(api, "app-a", requests_per_minute=3)
    for _ in range(3):
        status, _, body = await call(api, "/v1/chat/completions", chat(SUMMARIZE))
        assert status == 200, body
    status, headers, body = await call(api, "/v1/chat/completions", chat(SUMMARIZE))
    assert status == 429
    assert body["error"]["code"] == "rate_limit_exceeded"
    assert "over its limit of 3 requests per minute" in body["error"]["message"]
    assert headers["retry-after"] == "20" and headers["retry-after-ms"] == "20000"
    assert headers["x-ratelimit-limit-requests"] == "3"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    # A request bigger than a whole minute's tokens never fits: 400, not a 429 to wait on.
    await set_policy(api, "app-a", tokens_per_minute=100)
    status, _, body = await call(api, "/v1/chat/completions", chat(SUMMARIZE, max_tokens=500))
    assert status == 400 and "can never fit 100 tokens per minute" in body["error"]["message"]
    await set_policy(api, "app-a", requests_per_minute=3)
    # Other apps are not held back by this one's limit.
    status, _, _ = await call(api, "/v1/chat/completions", chat(SUMMARIZE), app="app-b")
    assert status == 200

    # The openai client waits Retry-After and tries again; when it has
    # waited, a request fits (the refill is made to happen at its 429).
    await set_policy(api, "app-a", requests_per_minute=60)  # a 1 s refill
    for _ in range(60):
        assert (await call(api, "/v1/chat/completions", chat(SUMMARIZE)))[0] == 200
    seen: list[tuple[int, str | None]] = []

    def on_response(response: httpx.Response) -> None:
        seen.append((response.status_code, response.headers.get("retry-after")))
        if response.status_code == 429:
            now[0] += 1.0

    def ask() -> str:
        client = openai.OpenAI(
            base_url=api.base_url, api_key=api.tokens["app-a"], max_retries=2,
            http_client=httpx.Client(event_hooks={"response": [on_response]}),
        )  # fmt: skip
        answer = client.chat.completions.create(
            model=SUMMARIZE, messages=[{"role": "user", "content": TEXT}]
        )
        return answer.choices[0].message.content or ""

    text = await trio.to_thread.run_sync(ask)
    assert text
    assert seen == [(429, "1"), (200, None)]


async def test_a_policy_without_llm_rules_restricts_nothing(
    nursery: trio.Nursery, tmp_path: Any
) -> None:
    api, acme = await gate(nursery, tmp_path)
    api.store.set_app_policy("app-a", policy_to_json(GateAppConfig(databases=("orders",))))
    await api.service.reload_policies()
    assert not api.service.llm_policy("app-a").restricts
    assert attrs.asdict(api.service.llm_policy("app-a")) == attrs.asdict(LlmPolicyConfig())
    status, _, body = await call(api, "/v1/chat/completions", chat("acme-pro"))
    assert status == 200 and body["model"] == "acme-pro" and acme.requests == 1


async def test_the_ledger_keeps_what_the_policy_says_of_prompts_and_answers(
    nursery: trio.Nursery, tmp_path: Any
) -> None:
    api, _ = await gate(nursery, tmp_path)
    await set_policy(api, "app-a", keep="text")
    await set_policy(api, "app-b", keep="hash")
    status, _, body = await call(api, "/v1/chat/completions", chat(SUMMARIZE))
    assert status == 200
    answer = body["choices"][0]["message"]["content"]
    status, _, hashed = await call(api, "/v1/chat/completions", chat(SUMMARIZE), app="app-b")
    assert status == 200

    def streamed() -> str:
        client = openai.OpenAI(base_url=api.base_url, api_key=api.tokens["app-a"], max_retries=0)
        chunks = client.chat.completions.create(
            model="acme-pro", messages=[{"role": "user", "content": "stream it"}], stream=True
        )
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    streamed_text = await trio.to_thread.run_sync(streamed)
    assert streamed_text
    await api.service.ledger.flush()
    kept = {k.request_id: k for k in read_prompts(api.store)}
    rows = {r["request_id"]: r for r in read_rows(api.store)}
    assert len(kept) == 3 and set(kept) <= set(rows)  # one per request, by its ledger row
    by_app = sorted(kept.values(), key=lambda k: k.ts)
    text, hashed_row, stream_row = by_app
    assert (text.app, text.kept) == ("app-a", "text")
    assert json.loads(text.prompt) == [{"role": "user", "content": TEXT}]
    assert text.answer == answer
    assert (hashed_row.app, hashed_row.kept) == ("app-b", "hash")
    assert (
        hashed_row.answer
        == hashlib.sha256(hashed["choices"][0]["message"]["content"].encode()).hexdigest()
    )
    assert TEXT not in hashed_row.prompt
    assert stream_row.answer == streamed_text
    with api.store._read() as conn:
        report = verify_chain(conn, api.service.ledger._key, "prompts")
    assert report.ok and report.rows == 3
    # Apps that keep nothing leave no row.
    await set_policy(api, "app-a", keep="nothing")
    assert (await call(api, "/v1/chat/completions", chat(SUMMARIZE)))[0] == 200
    await api.service.ledger.flush()
    assert len(read_prompts(api.store)) == 3
