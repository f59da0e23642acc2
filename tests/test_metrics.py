"""/metrics and the dashboard's data: the text format parses with
prometheus_client's own parser, and the counters move when a real Gate
serves requests — HTTP, routed model calls with a failover, a budget."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import trio
from daemonkit import http_json, make_gate_dir
from llmkit import start_provider
from prometheus_client.parser import text_string_to_metric_families

from qmesh import __version__, _core
from qmesh.config import load_config
from qmesh.gate.role import run_gate
from qmesh.ops.metrics import BurnDown, History
from qmesh.web.prom import Registry, gauge_family


def parse(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Sample name → labels → value, through the reference parser."""
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            out.setdefault(sample.name, {})[labels] = sample.value
    return out


# -- the format ---------------------------------------------------------------------------------


def test_registry_renders_what_prometheus_parses() -> None:
    registry = Registry()
    requests = registry.counter("demo_requests_total", "Requests.\nSecond line.", ("route",))
    latency = registry.histogram("demo_seconds", "Latency.", ("route",), buckets=(0.1, 1.0))
    temperature = registry.gauge("demo_temperature_celsius", "Temperature.", ("where",))
    requests.inc('/a"b\\c\nd')
    requests.cell('/a"b\\c\nd').inc(2)  # the same series as inc's
    latency.observe(0.05, "/x")
    latency.series("/x").observe(0.5)
    latency.observe(5.0, "/x")
    temperature.set(-3.5, "outside")
    registry.collector(lambda: [gauge_family("demo_up", "Up.", [({"node": "a"}, 1)])])
    text = registry.render()
    assert text.endswith("\n")
    samples = parse(text)
    assert samples["demo_requests_total"] == {(("route", '/a"b\\c\nd'),): 3.0}
    buckets = samples["demo_seconds_bucket"]
    assert buckets[(("le", "0.1"), ("route", "/x"))] == 1
    assert buckets[(("le", "1"), ("route", "/x"))] == 2
    assert buckets[(("le", "+Inf"), ("route", "/x"))] == 3
    assert samples["demo_seconds_count"][(("route", "/x"),)] == 3
    assert math.isclose(samples["demo_seconds_sum"][(("route", "/x"),)], 5.55)
    assert samples["demo_temperature_celsius"] == {(("where", "outside"),): -3.5}
    assert samples["demo_up"] == {(("node", "a"),): 1.0}


def test_registry_refuses_mistakes() -> None:
    registry = Registry()
    with pytest.raises(ValueError):
        registry.counter("no_suffix", "x")
    counter = registry.counter("ok_total", "x", ("a",))
    with pytest.raises(ValueError):
        counter.inc("1", "2")
    with pytest.raises(ValueError):
        counter.inc("1", amount=-1)
    with pytest.raises(ValueError):
        counter.cell("2").inc(-1)
    with pytest.raises(ValueError):
        counter.cell("1", "2")
    # A refused amount leaves no series behind; a cell's refusal leaves it at 0.
    assert parse(registry.render())["ok_total"] == {(("a", "2"),): 0.0}
    with pytest.raises(ValueError):
        registry.counter("ok_total", "x")
    with pytest.raises(ValueError):
        registry.gauge("bad-name", "x")
    with pytest.raises(ValueError):
        registry.histogram("h", "x", ("le",))


def test_history_rates_and_burn_down() -> None:
    history = History(maxlen=5)
    for t, value in enumerate([0, 2, 6, 6, 16, 20]):
        history.add(100.0 + t, {"n": float(value)})
    assert history.rates("n") == [(102.0, 4.0), (103.0, 0.0), (104.0, 10.0), (105.0, 4.0)]
    assert history.rate("n", window=2) == 7.0
    history.add(106.0, {"n": 0.0, "late": 5.0})  # a counter reset never shows as negative
    assert history.rates("n")[-1] == (106.0, 0.0)
    assert len(history.values["late"]) == len(history.times)

    burn = BurnDown.for_period("b", 0.0, 96.0)
    burn.add(0.5, 1.0)
    burn.add(10.2, 2.0)
    burn.add(200.0, 99.0)  # outside the period
    points = burn.points(10.0, now=11.5)
    assert points[0] == (0.0, 10.0) and points[1] == (1.0, 9.0)
    assert points[-1] == (11.5, 7.0)


# -- a real Gate -----------------------------------------------------------------------------------


def gate_toml(flaky: int, steady: int) -> str:
    model = 'tasks = ["chat"]\nprice_in = 1.0\nprice_out = 2.0\nquality = 4\n'
    return (
        "[[gate.providers]]\nname = \"flaky\"\n"
        f'base_url = "http://127.0.0.1:{flaky}/v1"\n'
        '[[gate.providers.models]]\nid = "fast-model"\nlatency_ms = 10\n' + model
        + "[[gate.providers]]\nname = \"steady\"\n"
        f'base_url = "http://127.0.0.1:{steady}/v1"\n'
        '[[gate.providers.models]]\nid = "steady-model"\nlatency_ms = 200\n' + model
        + '[[gate.budgets]]\nname = "ops"\nlimit_usd = 1.0\nperiod = "day"\napps = ["admin"]\n'
    )  # fmt: skip


async def test_metrics_move_with_requests(nursery: trio.Nursery, tmp_path: Path) -> None:
    flaky = await start_provider(nursery, "flaky", mode="error")
    steady = await start_provider(nursery, "steady")
    gate_dir = make_gate_dir(tmp_path)
    config_file = tmp_path / "gate.toml"
    config_file.write_text(gate_dir.config_text() + gate_toml(flaky.port, steady.port))
    gate = await nursery.start(run_gate, load_config(config_file, env={}))
    http, bearer = gate["http"], gate_dir.bearer

    status, _ = await http_json("GET", http + "/metrics")
    assert status == 401
    status, _ = await http_json("GET", http + "/api/dashboard")
    assert status == 401

    before = parse(await _metrics(http, bearer))
    for _ in range(3):
        status, _ = await http_json("GET", http + "/healthz")
        assert status == 200
    chat = {"model": "qg://task=chat;prefer=speed",
            "messages": [{"role": "user", "content": "hello"}]}  # fmt: skip
    status, answer = await http_json(
        "POST", http + "/v1/chat/completions", bearer=bearer, body=chat
    )
    assert status == 200 and answer["choices"][0]["message"]["content"] == "answer from steady"
    assert flaky.requests == 1  # tried first, failed, and the client never saw it

    after = parse(await _metrics(http, bearer))
    healthz = (("method", "GET"), ("route", "/healthz"), ("status", "200"))
    assert (
        after["qmesh_http_requests_total"][healthz]
        - before["qmesh_http_requests_total"].get(healthz, 0)
        == 3
    )
    assert after["qmesh_http_request_duration_seconds_count"][(("route", "/healthz"),)] >= 3
    assert after["qmesh_llm_requests_total"][(("kind", "provider"), ("outcome", "ok"))] == 1
    assert after["qmesh_llm_tokens_total"][(("direction", "in"), ("kind", "provider"))] == 100
    assert after["qmesh_llm_tokens_total"][(("direction", "out"), ("kind", "provider"))] == 20
    cost = after["qmesh_llm_cost_usd_total"][(("kind", "provider"),)]
    assert math.isclose(cost, (100 * 1.0 + 20 * 2.0) / 1e6)
    assert after["qmesh_llm_request_duration_seconds_count"][(("kind", "provider"),)] == 1
    assert after["qmesh_route_decisions_total"][()] == before["qmesh_route_decisions_total"][()] + 1
    assert after["qmesh_route_failovers_total"][()] == 1
    assert after["qmesh_llm_failover_hops_total"][(("outcome", "failed"),)] == 1
    assert math.isclose(after["qmesh_budget_spent_usd"][(("budget", "ops"),)], cost)
    assert after["qmesh_budget_state"][(("budget", "ops"), ("state", "ok"))] == 1
    assert (
        after["qmesh_budget_limit_usd"][(("budget", "ops"), ("mode", "hard"), ("period", "day"))]
        == 1.0
    )
    assert after["qmesh_tunnel_resumptions_total"][()] == 0
    assert after["qmesh_info"][(("version", __version__),)] == 1
    assert after["qmesh_gate_start_time_seconds"][()] > 0

    status, snapshot = await http_json("GET", http + "/api/dashboard", bearer=bearer)
    assert status == 200
    routing = snapshot["routing"]
    (failover,) = routing["recent_failovers"]
    assert failover["from"] == ["provider:flaky/fast-model"]
    assert failover["to"] == "provider:steady/steady-model" and failover["outcome"] == "ok"
    assert routing["decisions_total"] >= 1 and routing["failovers_total"] == 1
    assert routing["recent_decisions"][0]["chosen"] == "provider:flaky/fast-model"
    (budget,) = snapshot["budgets"]["items"]
    assert budget["budget"] == "ops" and budget["state"] == "ok"
    assert math.isclose(budget["burn"][-1][1], 1.0 - cost, rel_tol=1e-6)
    assert snapshot["budgets"]["note"] is None


async def test_requests_the_engine_relays_itself_move_the_metrics_alike(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """After the first, an app's calls like it take the HTTP engine's fast
    path (nothing holds this app to a budget): counted all the same."""
    steady = await start_provider(nursery, "steady")
    gate_dir = make_gate_dir(tmp_path)
    config_file = tmp_path / "gate.toml"
    config_file.write_text(
        gate_dir.config_text() + '[[gate.providers]]\nname = "steady"\n'
        f'base_url = "http://127.0.0.1:{steady.port}/v1"\n'
        '[[gate.providers.models]]\nid = "m"\ntasks = ["chat"]\nprice_in = 1.0\n'
        "price_out = 2.0\n"
    )  # fmt: skip
    gate = await nursery.start(run_gate, load_config(config_file, env={}))
    http, bearer = gate["http"], gate_dir.bearer
    chat = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}
    for _ in range(5):
        status, answer = await http_json(
            "POST", http + "/v1/chat/completions", bearer=bearer, body=chat
        )
        assert status == 200 and answer["choices"][0]["message"]["content"] == "answer from steady"

    after = parse(await _metrics(http, bearer))
    route = (("route", "/v1/chat/completions"),)
    assert after["qmesh_http_requests_total"][(("method", "POST"), *route, ("status", "200"))] == 5
    assert after["qmesh_http_request_duration_seconds_count"][route] == 5
    provider = (("kind", "provider"),)
    assert after["qmesh_llm_requests_total"][(*provider, ("outcome", "ok"))] == 5
    assert after["qmesh_llm_tokens_total"][(("direction", "in"), *provider)] == 5 * 100
    assert after["qmesh_llm_tokens_total"][(("direction", "out"), *provider)] == 5 * 20
    cost = after["qmesh_llm_cost_usd_total"][provider]
    assert math.isclose(cost, 5 * (100 * 1.0 + 20 * 2.0) / 1e6)
    assert after["qmesh_llm_request_duration_seconds_count"][provider] == 5
    assert after["qmesh_llm_request_duration_seconds_sum"][provider] > 0
    # The books: every request's row is written within the writer's linger.
    with trio.fail_after(10):
        while after["qmesh_ledger_written_rows_total"][()] < 5:  # the writer has no event to await
            await trio.sleep(0.01)
            after = parse(await _metrics(http, bearer))
    assert after["qmesh_ledger_written_rows_total"][()] == 5
    assert after["qmesh_ledger_pending_rows"][()] == 0


async def test_dashboard_notes_when_parts_are_missing(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    gate_dir = make_gate_dir(tmp_path)
    gate = await nursery.start(run_gate, gate_dir.config(tmp_path))
    status, snapshot = await http_json(
        "GET", gate["http"] + "/api/dashboard", bearer=gate_dir.bearer
    )
    assert status == 200
    assert snapshot["budgets"]["items"] == [] and "[[gate.budgets]]" in snapshot["budgets"]["note"]
    assert snapshot["routing"]["note"].startswith("No routed requests yet")
    assert snapshot["discovery"]["enabled"] is False
    assert snapshot["health"]["status"] == "warn"  # nothing to look after yet: said, not hidden
    status, _ = await http_json(
        "POST", gate["http"] + "/api/discovery/scan", bearer=gate_dir.bearer
    )
    assert status == 409


async def _metrics(http: str, bearer: str) -> str:
    from qmesh.daemon.runtimes.http import request

    async with request(
        "GET", http + "/metrics", headers={"authorization": f"Bearer {bearer}"}
    ) as response:
        assert response.status == 200
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
        data = await response.read()
    return data.decode()


async def test_the_engine_threads_poll_window_and_polls_are_exported(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    gate_dir = make_gate_dir(tmp_path)
    config_file = tmp_path / "gate.toml"
    config_file.write_text(gate_dir.config_text())
    gate = await nursery.start(run_gate, load_config(config_file, env={}))
    http, bearer = gate["http"], gate_dir.bearer
    scraped = parse(await _metrics(http, bearer))
    assert scraped["qmesh_engine_poll_window_seconds"][()] == 0, "off by default"
    assert set(scraped["qmesh_engine_polls_total"]) == {
        (("outcome", "caught"),),
        (("outcome", "missed"),),
    }
    try:
        _core.set_engine_poll(0.0002)
        scraped = parse(await _metrics(http, bearer))
        assert scraped["qmesh_engine_poll_window_seconds"][()] == pytest.approx(0.0002)
        for wrong in (0.0011, -1e-6, math.nan):
            with pytest.raises(ValueError, match="engine poll window"):
                _core.set_engine_poll(wrong)
        assert _core.engine_poll() == pytest.approx(0.0002)
    finally:
        _core.set_engine_poll(0)
