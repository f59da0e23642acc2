"""The paid-provider path against a real OpenAI-compatible server: a second
llama.cpp (``python -m llama_cpp.server``, the real Gemma 3 270M) configured
as a priced remote provider. The code path is the real pooled HTTP client;
the application is the official ``openai`` client."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest
import trio
from daemonkit import gemma_path, require_llama
from llmkit import GateApi, flushed_rows, paid_model, provider_config, start_api
from processkit import stop

from qmesh.config import BudgetConfig, RoutingConfig
from qmesh.finops.ledger import read_rows
from qmesh.web.pool import HttpPool, parse_url

pytestmark = pytest.mark.slow

PRICE_IN = 2.0  # USD per 1M tokens
PRICE_OUT = 8.0
TEXT = (
    "The council voted to expand the bus network. The plan adds four new routes. "
    "Supporters said traffic would fall. Opponents worried about the cost. "
    "Work starts in the spring."
)


def start_server(model: Path, port: int, log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--model_alias",
             "gemma-remote", "--chat_format", "gemma", "--n_ctx", "1024", "--n_threads", "1",
             "--host", "127.0.0.1", "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip


@pytest.fixture
async def llama_port(tmp_path: Path) -> AsyncIterator[int]:
    model = gemma_path()
    require_llama()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    process = start_server(model, port, tmp_path / "llama-server.log")
    try:
        with trio.fail_after(120):
            while True:  # a child process: nothing to wait on but its port
                try:
                    stream = await trio.open_tcp_stream("127.0.0.1", port)
                except OSError:
                    await trio.sleep(0.2)
                    continue
                await stream.aclose()
                break
        yield port
    finally:
        stop(process, timeout=20)


async def gate_with_llama(
    nursery: trio.Nursery, tmp_path: Path, port: int, budgets: list[BudgetConfig] | None = None
) -> GateApi:
    model = paid_model(
        "gemma-remote", price_in=PRICE_IN, price_out=PRICE_OUT, latency_ms=500, context=1024
    )
    return await start_api(
        nursery,
        tmp_path,
        providers=[provider_config("llama-remote", port, [model])],
        budgets=budgets or [],
        routing=RoutingConfig(electricity_usd_per_kwh=0.0),
    )


async def test_real_openai_compatible_server_as_a_priced_provider(
    nursery: trio.Nursery, tmp_path: Path, llama_port: int
) -> None:
    api = await gate_with_llama(nursery, tmp_path, llama_port)
    client = openai.OpenAI(
        base_url=api.base_url, api_key=api.tokens["app-a"], max_retries=0, timeout=120
    )

    def run() -> tuple[str, str]:
        reply = client.chat.completions.create(
            model="gemma-remote",
            messages=[{"role": "user", "content": "Write one sentence about the sea."}],
            max_tokens=20,
            temperature=0,
        )
        streamed = "".join(
            chunk.choices[0].delta.content or ""
            for chunk in client.chat.completions.create(
                model="qg://task=creative_writing;prefer=quality",
                messages=[{"role": "user", "content": "Name three colours."}],
                max_tokens=16,
                stream=True,
            )
            if chunk.choices
        )
        return reply.choices[0].message.content or "", streamed

    text, streamed = await trio.to_thread.run_sync(run)
    assert len(text.split()) >= 3 and streamed.strip()
    # The streamed request's row is written as its stream closes, which can
    # be just after the client saw its [DONE].
    rows = await flushed_rows(api, 2)
    assert [r["candidate"] for r in rows] == ["provider:llama-remote/gemma-remote"] * 2
    for row in rows:
        assert row["tokens_in"] > 5 and row["tokens_out"] > 0  # the server's own counts
        expected = (row["tokens_in"] * PRICE_IN + row["tokens_out"] * PRICE_OUT) / 1e6
        assert row["cost_usd"] == pytest.approx(expected)


async def test_concurrent_requests_against_a_budget_for_ten_paid_calls(
    nursery: trio.Nursery, tmp_path: Path, llama_port: int
) -> None:
    # Calibrate: what one paid call of this exact shape costs at the real server.
    probe = await gate_with_llama(nursery, tmp_path / "probe", llama_port)
    pool = HttpPool()
    body = json.dumps(
        {
            "model": "qg://task=summarize;prefer=quality",
            "messages": [{"role": "user", "content": f"Summarize: {TEXT}"}],
            "max_tokens": 8,
            "temperature": 0,
        }
    ).encode()

    async def post(api: GateApi) -> dict[str, object]:
        status, _, data = await pool.request(
            "POST", parse_url(api.base_url), "/chat/completions",
            headers={"authorization": f"Bearer {api.tokens['app-a']}"}, body=body,
        )  # fmt: skip
        assert status == 200, data
        result: dict[str, object] = json.loads(data)
        return result

    assert (await post(probe))["model"] == "gemma-remote"
    await probe.service.ledger.flush()
    per_call = read_rows(probe.store)[0]["cost_usd"]
    limit = 10 * per_call

    api = await gate_with_llama(
        nursery,
        tmp_path / "gate",
        llama_port,
        budgets=[BudgetConfig(name="team", limit_usd=limit, apps=("app-a",))],
    )
    models: list[object] = []

    async def one() -> None:
        models.append((await post(api))["model"])

    with trio.fail_after(300):
        async with trio.open_nursery() as inner:
            for _ in range(60):
                inner.start_soon(one)
    await pool.aclose()
    paid = models.count("gemma-remote")
    assert paid + models.count("qmesh-summarize") == 60
    await api.service.ledger.flush()
    rows = read_rows(api.store)
    paid_rows = [r for r in rows if r["kind"] == "provider"]
    assert len(paid_rows) == paid
    assert sum(r["cost_usd"] for r in rows) <= limit + 1e-12
    # Every paid call cost what the probe did (same prompt, temperature 0):
    # so the budget for ten allows at most ten.
    assert paid <= 10
    assert paid >= 5  # and the budget was used, not refused outright
