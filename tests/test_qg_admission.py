"""An explanation names what execution runs: one admission for both.

The regression over real sockets — a hard budget nearly spent, where
``POST /qg/v1/route`` used to name the paid model while the executor (by
its reservation) served the request with the built-in skill — and the
property behind it: for random candidates (kinds, prices, health, queues,
cool-downs), budgets (none, soft, hard; untouched, nearly spent, spent;
in one Gate's memory or in the shared totals), DSNs and request sizes,
the hop an explanation names first is the hop the executor runs first,
request after request, while the executor's own failures cool nodes down
and its answers spend the budget. The property drives the real router,
budget book and executor, with fake workers at the backend boundary, on
Trio's MockClock: nothing sleeps and every cost is exact.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import subprocess
import sys
import time
import types
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any
from unittest import mock

import attrs
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from llmkit import GateApi, paid_model, provider_config, start_api, start_provider
from statekit import close_after_the_test

from qmesh.config import BudgetConfig, RoutingConfig
from qmesh.finops.budgets import BudgetBook
from qmesh.finops.ledger import Ledger, LedgerEntry, read_rows
from qmesh.finops.totals import BudgetTotals
from qmesh.llm import executor as executor_module
from qmesh.llm.calls import DONE_EVENT, Answer, Call, Usage, estimate_call_tokens
from qmesh.llm.executor import Executor, RequestContext
from qmesh.qg.admission import BUDGET_OK
from qmesh.qg.candidates import DAEMON, INTERNAL, PROVIDER, Candidate
from qmesh.qg.dsn import Dsn, parse_dsn
from qmesh.qg.errors import BudgetBlocked, NoRoute, UpstreamBusy, UpstreamFailed
from qmesh.qg.router import Router
from qmesh.state import StateStore
from qmesh.web.auth import ADMIN_APP
from qmesh.web.pool import HttpPool, parse_url

REPO = Path(__file__).resolve().parent.parent
TEXT = (
    "The council voted to expand the bus network. The plan adds four new routes. "
    "Supporters said traffic would fall. Opponents worried about the cost. "
    "Work starts in the spring."
)

# -- the regression, over real sockets -------------------------------------------------


async def call_gate(
    pool: HttpPool, api: GateApi, method: str, path: str, body: object = None, app: str = "app-a"
) -> tuple[int, Any]:
    status, _, data = await pool.request(
        method,
        parse_url(f"http://127.0.0.1:{api.port}"),
        path,
        headers={"authorization": f"Bearer {api.tokens[app]}", "content-type": "application/json"},
        body=b"" if body is None else json.dumps(body).encode(),
    )
    return status, json.loads(data)


async def test_a_nearly_spent_hard_budget_is_explained_as_it_is_served(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The issue's case: one paid answer leaves the hard budget less than
    the next request's maximum cost. ``POST /qg/v1/route`` with that very
    request, ``GET /qg/v1/decisions`` and ``qmesh route --explain --gate``
    then name the built-in skill, as execution does, and say why the paid
    model is skipped; explaining reserved and recorded nothing."""
    acme = await start_provider(nursery, "acme", prompt_tokens=10, completion_tokens=500)
    api = await start_api(
        nursery,
        tmp_path,
        providers=[provider_config("acme", acme.port, [paid_model("acme-pro")])],
        # One answer costs 10 × $1/1M + 500 × $2/1M = $0.00101: $0.00049 left,
        # less than the next request's maximum (its prompt + 500 out).
        budgets=[BudgetConfig(name="tiny", limit_usd=0.0015, apps=("app-a",))],
    )
    request = {
        "model": "qg://task=summarize;prefer=quality",
        "max_tokens": 500,
        "messages": [{"role": "user", "content": TEXT}],
    }
    pool = HttpPool()
    status, explained = await call_gate(pool, api, "POST", "/qg/v1/route", request)
    assert status == 200 and explained["hops"][0] == "provider:acme/acme-pro", explained
    status, answer = await call_gate(pool, api, "POST", "/v1/chat/completions", request)
    assert status == 200 and answer["model"] == "acme-pro"

    budget = api.service.book.budgets["tiny"]
    spent, decisions = budget.spent, api.service.router.decisions
    status, explained = await call_gate(pool, api, "POST", "/qg/v1/route", request)
    assert status == 200
    assert explained["decision"]["chosen"] == "skill:summarize", explained
    assert explained["hops"][0] == "skill:summarize"
    assert explained["budget"] == "tiny" and explained["budget_mode"] == "hard"
    assert explained["budget_left_usd"] == round(0.0015 - spent, 9)
    rows = {r["candidate"]: r for r in explained["candidates"]}
    assert rows["skill:summarize"]["admission"] == "hop 1: runs first"
    skipped = rows["provider:acme/acme-pro"]["admission"]
    assert skipped.startswith("skipped: budget 'tiny' hard limit: 0.00049 USD left < "), skipped
    assert skipped.endswith(" USD estimated")
    # Explaining held no money and recorded no decision.
    assert (budget.spent, budget.reserved) == (spent, 0.0)
    assert api.service.router.decisions == decisions

    status, answer = await call_gate(pool, api, "POST", "/v1/chat/completions", request)
    assert status == 200 and answer["model"] == "qmesh-summarize"
    await api.service.ledger.flush()
    served = read_rows(api.store)[-1]
    assert served["candidate"] == "skill:summarize"
    # Straight to the skill: not a paid attempt refused by its reservation first.
    assert [h["candidate"] for h in json.loads(served["hops"])] == ["skill:summarize"]
    assert acme.requests == 1

    status, recent = await call_gate(pool, api, "GET", "/qg/v1/decisions", app=ADMIN_APP)
    assert status == 200
    last = recent["decisions"][-1]
    assert last["chosen"] == "skill:summarize" and len(recent["decisions"]) == 2
    assert last["budget"]["name"] == "tiny" and last["budget"]["mode"] == "hard"
    assert any(
        r["candidate"] == "provider:acme/acme-pro" and "0.00049 USD left" in r["reason"]
        for r in last["rejected"]
    )
    await pool.aclose()

    tokens_in = estimate_call_tokens(json.dumps(request).encode())
    env = {k: v for k, v in os.environ.items() if not k.startswith("QMESH_")}
    env.update(QMESH_APP_KEY=api.tokens["app-a"], HOME=str(tmp_path), PYTHONPATH=str(REPO))
    command = [
        sys.executable, "-m", "qmesh", "--data-dir", str(tmp_path / "cli"), "route",
        "qg://task=summarize;prefer=quality", "--explain", "--gate",
        f"http://127.0.0.1:{api.port}", "--tokens-in", str(tokens_in), "--max-tokens", "500",
    ]  # fmt: skip
    cli = await trio.to_thread.run_sync(
        lambda: subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
    )
    assert cli.returncode == 0, cli.stderr
    assert "choice: skill:summarize (qmesh-summarize)" in cli.stdout
    assert "budget: tiny (hard, " in cli.stdout
    # About $0.00049 left: the skill's answer above was charged its own
    # electricity, which grows with its run time (a slow runner's shows).
    left = 0.0015 - budget.spent
    assert 0.000489 < left <= 0.00049
    assert f"skipped: budget 'tiny' hard limit: {left:.6g} USD left" in cli.stdout


async def test_route_explain_without_a_gate_reads_the_apps_budget(tmp_path: Path) -> None:
    """``qmesh route --explain --app APP`` on the Gate's box judges by that
    app's budget as the ledger has it, only reading."""
    config = tmp_path / "gate.toml"
    config.write_text(
        '[[gate.providers]]\nname = "acme"\nbase_url = "http://127.0.0.1:9/v1"\n'
        '[[gate.providers.models]]\nid = "acme-pro"\nprice_in = 1.0\nprice_out = 2.0\n'
        'quality = 4\n[[gate.budgets]]\nname = "team"\nlimit_usd = 0.0015\napps = ["web"]\n'
    )
    data = tmp_path / "data"
    data.mkdir()
    with StateStore.open(data / "state.db") as store:
        ledger = Ledger(store)
        ledger.record(
            LedgerEntry(
                ts=time.time(), request_id="r1", app="web", budget="team", task="summarize",
                candidate="provider:acme/acme-pro", kind="provider", model="acme-pro",
                provider="provider:acme", tokens_in=10, tokens_out=500, cost_usd=0.00101,
                shifted_from=None, avoided_usd=0.0, outcome="ok", hops="[]", reason="test",
            )
        )  # fmt: skip
        await ledger.flush()
    env = {k: v for k, v in os.environ.items() if not k.startswith("QMESH_")}
    env.update(HOME=str(tmp_path), PYTHONPATH=str(REPO))

    def route(*extra: str) -> subprocess.CompletedProcess[str]:
        command = [
            sys.executable, "-m", "qmesh", "--data-dir", str(data), "--config", str(config),
            "route", "qg://task=summarize;prefer=quality", "--explain", "--tokens-in", "100",
            "--max-tokens", "500", *extra,
        ]  # fmt: skip
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)

    web = await trio.to_thread.run_sync(route, "--app", "web")
    assert web.returncode == 0, web.stderr
    assert "budget: team (hard, " in web.stdout and "0.00049 USD left" in web.stdout
    assert "choice: skill:summarize" in web.stdout
    assert "skipped: budget 'team' hard limit: 0.00049 USD left < 0.0011 USD estimated" in (
        web.stdout
    )
    anyone = await trio.to_thread.run_sync(route)  # no budget: the paid model first
    assert "choice: provider:acme/acme-pro" in anyone.stdout, anyone.stdout + anyone.stderr


# -- the property: the explained first hop is the executed first hop --------------------

APP = "app"
MARCH_2024 = 1_709_251_200.0
"""2024-03-01 00:00 UTC: budgets' clocks stand still in that day."""
MODELS = ("m-a", "m-b", "m-c")
NODES = ("n1", "n2", "n3")
COOLING = {"none": None, "past": -1.0, "soon": 5.0, "long": 120.0}
"""A cool-down's end, in seconds from the start of the example."""


@attrs.frozen
class Spec:
    """One candidate, and how its worker answers."""

    kind: str
    tasks: frozenset[str]
    model: str
    node: str
    equivalence: str | None
    private: bool
    context: int
    price_in: float
    price_out: float
    local_rate: float
    quality: int
    latency_ms: int
    tokens_per_s: float
    queue_depth: int
    queue_limit: int
    busy: bool
    healthy: bool
    stopped: bool
    cooling: str
    answers: str
    """``ok``, ``busy`` or ``fail``."""


@attrs.frozen
class BudgetSpec:
    mode: str
    limit_usd: float
    left_usd: float
    """What the spend so far leaves: about what one paid request costs
    (≈ $0.0001 to $0.05 here), so whether the next one fits is a close call."""
    in_flight: tuple[tuple[float, bool], ...]
    """Other requests' holds: (share of what the spend left, paid)."""
    shared: bool
    """In the state's shared totals, as every Gate keeps them, or in memory."""
    elapsed: float
    """Of the budget's day: near its end, a nearly spent budget is not
    projected over (``ok``); earlier, it is (``shift``)."""


@attrs.frozen
class RequestSpec:
    dsn: str
    tokens_in: int
    max_tokens: int
    stream: bool
    wait_s: float
    """How far the clock moves before it (cool-downs end)."""


PRICES = st.sampled_from([0.5, 1.0, 3.0, 0.0, 15.0])


@st.composite
def specs(draw: st.DrawFn, kinds: tuple[str, ...], *, steady: bool = False) -> Spec:
    """A candidate of one of ``kinds``; ``steady``: healthy, idle and not cooling."""
    kind = draw(st.sampled_from(kinds))
    provider = kind == PROVIDER

    def sometimes(usual: object, rare: object, odds: int) -> Any:
        return usual if steady else draw(st.sampled_from([usual] * odds + [rare]))

    return Spec(
        kind=kind,
        tasks=frozenset(
            draw(st.sampled_from([("chat", "summarize")] * 2 + [("chat",), ("summarize",)]))
        ),
        model=draw(st.sampled_from(MODELS)),
        node=draw(st.sampled_from(NODES)),
        equivalence=draw(st.sampled_from([None, "small"])),
        private=not provider or draw(st.booleans()),
        context=draw(st.sampled_from([1024, 8192, 128_000])),
        price_in=draw(PRICES) if provider else 0.0,
        price_out=draw(PRICES) if provider else 0.0,
        local_rate=0.0 if provider else draw(st.sampled_from([0.0, 2.0])),
        # As in life: the cloud's models are the larger ones, skills tier 0.
        quality=draw(st.integers(*{INTERNAL: (0, 0), DAEMON: (1, 3), PROVIDER: (2, 5)}[kind])),
        latency_ms=draw(st.integers(1, 3000)),
        tokens_per_s=draw(st.sampled_from([0.0, 40.0])),
        queue_depth=sometimes(0, 2, 3),
        queue_limit=sometimes(0, 2, 3),
        busy=sometimes(False, True, 9),
        healthy=sometimes(True, False, 9),
        stopped=sometimes(False, True, 11),
        cooling="none" if steady else draw(st.sampled_from(["none"] * 4 + list(COOLING))),
        answers=draw(st.sampled_from(["ok", "ok", "ok", "busy", "fail"])),
    )


IN_FLIGHT = st.lists(st.tuples(st.sampled_from([0.5, 0.2, 0.9]), st.booleans()), max_size=2)

budgets = st.none() | st.builds(
    BudgetSpec,
    mode=st.sampled_from(["hard", "hard", "soft"]),
    limit_usd=st.sampled_from([0.01, 0.05, 1.0]),
    left_usd=st.sampled_from([0.002, 0.0005, 0.001, 0.004, 0.008, 0.02, 0.0, 1.0]),
    in_flight=IN_FLIGHT.map(tuple),
    shared=st.booleans(),
    elapsed=st.sampled_from([0.9999, 0.5, 0.9]),
)

PREFERENCES = ("quality", "speed", "cost", "quality", "balanced", "local")


@st.composite
def requests(
    draw: st.DrawFn, prefer: tuple[str, ...] = PREFERENCES, *, plain: bool = False
) -> RequestSpec:
    """A request; ``plain``: no constraint but its task and preference."""
    parts = [
        f"task={draw(st.sampled_from(['chat', 'summarize']))}",
        f"prefer={draw(st.sampled_from(prefer))}",
    ]
    if not plain:
        parts.append(f"privacy={draw(st.sampled_from(['any', 'any', 'any', 'local', 'private']))}")
        for key, values in (
            ("model", [*MODELS, "equiv:small"]),
            ("max_cost", ["0.0005", "0.002", "0.05"]),
            ("max_latency_ms", ["1500", "1500", "50"]),
            ("context", ["2000", "2000", "100000"]),
        ):
            if draw(st.integers(0, 5)) == 0:
                parts.append(f"{key}={draw(st.sampled_from(values))}")
    return RequestSpec(
        dsn="qg://" + ";".join(parts),
        tokens_in=draw(st.sampled_from([500, 50, 2000, 1]) | st.integers(1, 5000)),
        max_tokens=draw(st.sampled_from([100, 500, 0, 1000]) | st.integers(0, 2000)),
        stream=draw(st.booleans()),
        wait_s=draw(st.sampled_from([0.0, 0.0, 10.0, 200.0])),
    )


@attrs.frozen
class World:
    candidates: tuple[Spec, ...]
    budget: BudgetSpec | None
    routing: RoutingConfig
    sequence: tuple[RequestSpec, ...]
    """Requests one after another: each one's failures cool nodes down and
    its answer spends the budget before the next is explained."""


ROUTING = st.builds(
    RoutingConfig,
    cooldown_s=st.sampled_from([0.0, 30.0]),
    max_hops=st.integers(1, 4),
    electricity_usd_per_kwh=st.just(0.0),
    local_rate_usd_per_1m=st.sampled_from([None, 3.0]),
)

anything = st.builds(
    World,
    candidates=st.lists(specs((INTERNAL, DAEMON, PROVIDER, PROVIDER)), min_size=2, max_size=7).map(
        tuple
    ),
    budget=budgets,
    routing=ROUTING,
    sequence=st.lists(requests(), min_size=2, max_size=8).map(tuple),
)
"""Any candidates, budget and requests: most of them are decided by a
health, busy, cool-down, privacy or pin filter."""

close_calls = st.builds(
    World,
    candidates=st.tuples(
        st.lists(specs((PROVIDER,), steady=True), min_size=1, max_size=3),
        st.lists(specs((INTERNAL, DAEMON), steady=True), max_size=2),
    ).map(lambda both: (*both[0], *both[1])),
    budget=st.builds(
        BudgetSpec,
        mode=st.sampled_from(["hard", "hard", "hard", "soft"]),
        limit_usd=st.just(0.05),
        left_usd=st.floats(0.0, 0.01),
        in_flight=IN_FLIGHT.map(tuple),
        shared=st.booleans(),
        elapsed=st.sampled_from([0.9999, 0.5]),
    ),
    routing=ROUTING,
    sequence=st.lists(
        requests(("quality", "quality", "speed", "cost", "balanced"), plain=True),
        min_size=2,
        max_size=8,
    ).map(tuple),
)
"""Paid candidates that would be first, and a budget whose remainder is
about what one request may cost: whether it fits is the question."""


@attrs.define
class Workers:
    """Every candidate's backend: answers as its spec says, and notes who ran."""

    answers: dict[str, str]
    ran: list[str] = attrs.field(factory=list)

    def _start(self, candidate: Candidate) -> None:
        self.ran.append(candidate.id)
        if self.answers[candidate.id] == "busy":
            raise UpstreamBusy(f"{candidate.id} is full")
        if self.answers[candidate.id] == "fail":
            raise UpstreamFailed(f"{candidate.id} refused the connection")

    async def complete(self, candidate: Candidate, call: Call) -> Answer:
        self._start(candidate)
        await trio.lowlevel.checkpoint()
        return Answer(b'{"choices":[]}', call.tokens_in, min(call.max_tokens, 7), candidate.model)

    async def stream(
        self, candidate: Candidate, call: Call, usage: Usage
    ) -> AsyncGenerator[bytes, None]:
        self._start(candidate)
        usage.tokens_in, usage.tokens_out = call.tokens_in, min(call.max_tokens, 7)
        yield b'data: {"choices":[]}\n\n'
        yield DONE_EVENT


def build_candidates(specs: tuple[Spec, ...], workers: Workers, now: float) -> list[Candidate]:
    out = []
    for i, spec in enumerate(specs):
        provider = spec.kind == PROVIDER
        prefix = {INTERNAL: "skill", DAEMON: f"node:{spec.node}", PROVIDER: f"provider:{spec.node}"}
        candidate = Candidate(
            id=f"{prefix[spec.kind]}/{spec.model}-{i}", kind=spec.kind, model=spec.model,
            tasks=spec.tasks, equivalence=spec.equivalence,
            node=None if spec.kind == INTERNAL else prefix[spec.kind],
            local=not provider, private=spec.private, context=spec.context,
            price_in=spec.price_in, price_out=spec.price_out, local_rate=spec.local_rate,
            quality=spec.quality, latency_ms=float(spec.latency_ms),
            tokens_per_s=spec.tokens_per_s, queue_depth=spec.queue_depth,
            queue_limit=spec.queue_limit, busy=spec.busy, healthy=spec.healthy,
            out_of_service="stopped by the operator" if spec.stopped else None,
            backend=workers,
        )  # fmt: skip
        cooling = COOLING[spec.cooling]
        if cooling is not None:
            candidate.cool_until = now + cooling
        workers.answers[candidate.id] = spec.answers
        out.append(candidate)
    return out


_names = itertools.count()


async def open_budget(book: BudgetBook, spec: BudgetSpec) -> None:
    budget = book.for_app(APP)
    assert budget is not None
    left = min(spec.left_usd, spec.limit_usd)
    if book.totals is not None:
        await book.seed_shared(budget, spec.limit_usd - left)
    else:
        book.seed({budget.name: spec.limit_usd - left})
    for share, paid in spec.in_flight:  # other requests' holds, never settled here
        await book.reserve(budget, share * left, paid=paid)


async def explain_then_execute(
    store: StateStore, world: World, clock: trio.testing.MockClock
) -> None:
    budget, routing = world.budget, world.routing
    workers = Workers({})
    router = Router(clock=trio.current_time)
    router.set_candidates("all", build_candidates(world.candidates, workers, trio.current_time()))
    configs = []
    if budget is not None:
        configs.append(
            BudgetConfig(
                f"b{next(_names)}", budget.limit_usd, period="day", mode=budget.mode, apps=(APP,)
            )
        )
    shared = budget is not None and budget.shared
    today = MARCH_2024 + 86_400 * (0.5 if budget is None else budget.elapsed)
    book = BudgetBook(configs, clock=lambda: today, totals=BudgetTotals(store) if shared else None)
    if budget is not None:
        await open_budget(book, budget)
    executor = Executor(router, book, Ledger(store), routing)
    for n, request in enumerate(world.sequence):
        clock.jump(request.wait_s)
        dsn = parse_dsn(request.dsn)
        # What POST /qg/v1/route does ...
        paying = book.for_app(APP, dsn.budget)
        before, decisions = book.snapshot(paying), router.decisions
        explanation = router.explain(
            dsn, tokens_in=request.tokens_in, tokens_out=request.max_tokens, budget=before
        )
        explained = explanation.hops[0] if explanation.hops else None
        assert book.snapshot(paying) == before, "explaining changed the budget"
        assert router.decisions == decisions, "explaining recorded a decision"
        # ... and what serving the same request does (LlmApi._route, then the executor).
        executed, blocked = await execute(router, book, executor, workers, dsn, request, n)
        assert explained == executed, (request, explanation.as_dict())
        if executed is None:
            assert explanation.budget_blocked == blocked, explanation.error
        else:
            assert router.recent[-1].chosen.id == explained  # as GET /qg/v1/decisions shows


async def execute(
    router: Router,
    book: BudgetBook,
    executor: Executor,
    workers: Workers,
    dsn: Dsn,
    request: RequestSpec,
    n: int,
) -> tuple[str | None, bool]:
    """The first worker that ran, or None and whether a budget refused it all."""
    paying = book.for_app(APP, dsn.budget)
    snapshot = book.snapshot(paying)
    try:
        decision = router.decide(
            dsn, tokens_in=request.tokens_in, tokens_out=request.max_tokens, budget=snapshot
        )
    except NoRoute as exc:
        return None, isinstance(exc, BudgetBlocked)
    state = BUDGET_OK if snapshot is None else snapshot.state
    ctx = RequestContext(APP, f"r{n}", paying, state)
    call = Call("chat", {}, b"", request.stream, f"r{n}", request.tokens_in, request.max_tokens)
    ran = len(workers.ran)
    if request.stream:
        async for _ in executor.stream(decision, call, ctx):
            pass
    else:
        with contextlib.suppress(NoRoute):  # every hop failed
            await executor.complete(decision, call, ctx)
    return (workers.ran[ran] if len(workers.ran) > ran else None), False


def test_the_explained_first_hop_is_the_executed_first_hop(tmp_path: Path) -> None:
    store = close_after_the_test(StateStore.open(tmp_path / "state.db"))

    @settings(
        max_examples=200,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(world=st.one_of(anything, close_calls))
    def check(world: World) -> None:
        clock = trio.testing.MockClock()
        # The executor times answers with its module's clock: Trio's virtual
        # one here, so measured latencies (and the rankings they move) repeat.
        virtual = types.SimpleNamespace(monotonic=trio.current_time, time=lambda: MARCH_2024)
        with mock.patch.object(executor_module, "time", virtual):
            trio.run(explain_then_execute, store, world, clock, clock=clock)

    check()
