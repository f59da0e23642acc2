"""The MiniGate's LLM port: the official ``openai`` client on the edge talks
to 127.0.0.1:PORT/v1, the bytes cross a real tunnel, the Gate answers."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
import trio
from llmkit import paid_model, provider_config, start_api, start_provider
from tunnelkit import start_edge, start_gate

from qmesh.llm.api import add_llm_routes
from qmesh.llm.edge import serve_llm
from qmesh.llm.relay import LlmRelay
from qmesh.web.auth import AppAuthenticator
from qmesh.web.http import Router

TEXT = (
    "The museum will return a collection of carved masks. The masks were collected in the "
    "1890s. Community leaders asked for their return for twenty years. The board agreed. "
    "A delegation will collect the masks next month."
)


async def test_openai_client_through_the_minigate_port(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    acme = await start_provider(nursery, "acme")
    api = await start_api(
        nursery, tmp_path, providers=[provider_config("acme", acme.port, [paid_model("remote")])]
    )
    router = Router()
    add_llm_routes(router, api.service, AppAuthenticator(api.store))
    relay = LlmRelay(router)
    await nursery.start(relay.run)
    gate = await start_gate(nursery, services={"llm": relay})
    edge = await start_edge(nursery, gate, "edge-llm")
    port = await nursery.start(serve_llm, edge, "127.0.0.1:0")
    base = f"http://127.0.0.1:{port}/v1"
    client = openai.OpenAI(base_url=base, api_key=api.tokens["app-a"], max_retries=0, timeout=20)

    def run() -> tuple[str, str, str]:
        plain = client.chat.completions.create(
            model="qg://task=summarize;prefer=speed",
            messages=[{"role": "user", "content": TEXT}],
        )
        streamed = "".join(
            chunk.choices[0].delta.content or ""
            for chunk in client.chat.completions.create(
                model="qg://task=summarize",
                messages=[{"role": "user", "content": TEXT}],
                stream=True,
            )
            if chunk.choices
        )
        remote = "".join(
            chunk.choices[0].delta.content or ""
            for chunk in client.chat.completions.create(
                model="remote", messages=[{"role": "user", "content": "hi"}], stream=True
            )
            if chunk.choices
        )
        return plain.choices[0].message.content or "", streamed, remote

    plain, streamed, remote = await trio.to_thread.run_sync(run)
    assert plain.startswith("The museum will return")
    assert streamed == plain
    assert remote.strip() == "answer from acme"

    wrong = openai.OpenAI(base_url=base, api_key="app-a:nope", max_retries=0, timeout=20)
    with pytest.raises(openai.AuthenticationError):
        await trio.to_thread.run_sync(
            lambda: wrong.chat.completions.create(
                model="qg://task=summarize", messages=[{"role": "user", "content": "x"}]
            )
        )
    with pytest.raises(openai.BadRequestError, match="did you mean 'task'"):
        await trio.to_thread.run_sync(
            lambda: client.chat.completions.create(
                model="qg://tsk=summarize", messages=[{"role": "user", "content": "x"}]
            )
        )
