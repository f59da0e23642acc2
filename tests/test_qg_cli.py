"""``qmesh route``, ``qmesh audit verify`` / ``ledger verify``, ``qmesh finops``
and ``qmesh providers`` as real subprocesses on real files."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import attrs
import trio
from llmkit import paid_model, provider_config, start_provider

from qmesh.config import Config, GateConfig, ProviderConfig
from qmesh.finops.ledger import Ledger, LedgerEntry
from qmesh.llm.service import LlmService
from qmesh.masterkey import load_master_key
from qmesh.state import StateStore

REPO = Path(__file__).resolve().parent.parent


def qmesh(
    *args: str, tmp_path: Path, stdin: str | None = None, config: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QMESH_")}
    env["HOME"] = str(tmp_path / "home")
    env["PYTHONPATH"] = str(REPO)
    extra = ["--config", str(config)] if config else []
    return subprocess.run(
        [sys.executable, "-m", "qmesh", "--data-dir", str(tmp_path / "data"), *extra, *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )


def test_route_explain_and_dsn_errors(tmp_path: Path) -> None:
    config = tmp_path / "gate.toml"
    config.write_text(
        '[[gate.providers]]\nname = "acme"\nbase_url = "http://127.0.0.1:9/v1"\n'
        'api_key = "env:NOT_SET_HERE"\n'
        '[[gate.providers.models]]\nid = "acme-large"\nprice_in = 3.0\nprice_out = 15.0\n'
        "quality = 5\n"
    )
    out = qmesh("route", "qg://task=summarize;prefer=speed", "--explain", tmp_path=tmp_path,
                config=config)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "choice: skill:summarize (qmesh-summarize)" in out.stdout
    assert "provider:acme/acme-large" in out.stdout and "cannot do task" in out.stdout
    quality = qmesh("route", "qg://task=summarize;prefer=quality", "--json", tmp_path=tmp_path,
                    config=config)  # fmt: skip
    assert json.loads(quality.stdout)["decision"]["chosen"] == "provider:acme/acme-large"
    bad = qmesh("route", "qg://task=summarise", tmp_path=tmp_path)
    assert bad.returncode == 2
    assert "unknown task 'summarise'" in bad.stderr and "did you mean 'summarize'" in bad.stderr
    local = qmesh("route", "qg://task=creative_writing;privacy=local", tmp_path=tmp_path,
                  config=config)  # fmt: skip
    assert local.returncode == 1 and "no route" in local.stdout


async def test_audit_verify_passes_then_fails_after_an_edit(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    with StateStore.open(data / "state.db") as store:
        ledger = Ledger(store)
        for i in range(4):
            ledger.record(
                LedgerEntry(
                    ts=1_700_000_000.0 + i, request_id=f"r{i}", app="web", budget=None,
                    task="chat", candidate="provider:acme/m", kind="provider", model="m",
                    provider="provider:acme", tokens_in=10, tokens_out=20, cost_usd=0.001,
                    shifted_from=None, avoided_usd=0.0, outcome="ok", hops="[]", reason="test",
                )
            )  # fmt: skip
        ledger.audit("operator", "budget.set", {"budget": "team", "limit_usd": 5})
        await ledger.flush()
    ok = qmesh("audit", "verify", tmp_path=tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "ledger: 4 rows, ok" in ok.stdout and "audit: 1 rows, ok" in ok.stdout
    with sqlite3.connect(data / "state.db") as conn:
        conn.execute("UPDATE qg_ledger SET cost_usd = 0.0001 WHERE id = 2")
    bad = qmesh("audit", "verify", tmp_path=tmp_path)
    assert bad.returncode == 1
    assert "row 2: contents do not match its seal (edited)" in bad.stdout
    as_json = json.loads(qmesh("ledger", "verify", "--json", tmp_path=tmp_path).stdout)
    assert as_json[0]["chain"] == "ledger" and not as_json[0]["ok"]
    # the statement audit listing of the Postgres path still works
    assert qmesh("audit", tmp_path=tmp_path).returncode == 0


async def test_finops_report_after_real_requests(nursery: trio.Nursery, tmp_path: Path) -> None:
    from llmkit import start_api

    from qmesh.config import BudgetConfig
    from qmesh.web.pool import HttpPool, parse_url

    acme = await start_provider(nursery, "acme", prompt_tokens=100, completion_tokens=50)
    api = await start_api(
        nursery,
        tmp_path / "data",
        providers=[provider_config("acme", acme.port, [paid_model("m")])],
        budgets=[BudgetConfig(name="team", limit_usd=1.0, apps=("app-a",))],
    )
    pool = HttpPool()
    for model in ("m", "m", "qg://task=keywords"):
        body = {"model": model, "messages": [{"role": "user", "content": "ledger test text"}]}
        status, _, _ = await pool.request(
            "POST", parse_url(api.base_url), "/chat/completions",
            headers={"authorization": f"Bearer {api.tokens['app-a']}"},
            body=json.dumps(body).encode(),
        )  # fmt: skip
        assert status == 200
    await pool.aclose()
    await api.service.ledger.flush()
    config = tmp_path / "gate.toml"
    config.write_text('[[gate.budgets]]\nname = "team"\nlimit_usd = 1.0\napps = ["app-a"]\n')

    def report() -> subprocess.CompletedProcess[str]:
        return qmesh("finops", "report", "--json", tmp_path=tmp_path, config=config)

    out = await trio.to_thread.run_sync(report)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["requests"] == 3
    by_model = {g["model"]: g for g in data["by_model"]}
    assert by_model["m"]["requests"] == 2
    assert by_model["m"]["cost_usd"] > 0
    assert data["budgets"][0]["budget"] == "team"
    assert data["budgets"][0]["spent_usd"] > 0
    table = await trio.to_thread.run_sync(
        lambda: qmesh("finops", "report", tmp_path=tmp_path, config=config)
    )
    assert "BUDGET" in table.stdout and "shifted to local" in table.stdout


async def test_provider_key_from_the_store(nursery: trio.Nursery, tmp_path: Path) -> None:
    assert qmesh("secrets", "init-master-key", tmp_path=tmp_path).returncode == 0
    stored = qmesh("providers", "set-key", "acme", tmp_path=tmp_path, stdin="sk-stored-123\n")
    assert stored.returncode == 0, stored.stderr
    assert "sk-stored-123" not in stored.stdout + stored.stderr
    assert "acme" in qmesh("providers", "list", tmp_path=tmp_path).stdout
    acme = await start_provider(nursery, "acme")
    provider = attrs.evolve(
        provider_config("acme", acme.port, [paid_model("m")]), api_key="store:acme"
    )
    config = attrs.evolve(
        Config(data_dir=tmp_path / "data"), gate=GateConfig(providers=(provider,))
    )
    with StateStore.open(tmp_path / "data" / "state.db") as store:
        service = LlmService(
            config, store, master_key=load_master_key(config, env={}), measure_skills=False
        )
        backend = service.router.get("provider:acme/m")
        assert backend is not None
        assert (b"authorization", b"Bearer sk-stored-123") in backend.backend._headers
    assert isinstance(provider, ProviderConfig)
    assert qmesh("providers", "delete", "acme", tmp_path=tmp_path).returncode == 0
