"""The router's filters, scores, budget states and explanations."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from qmesh.qg.candidates import DAEMON, INTERNAL, PROVIDER, Candidate
from qmesh.qg.dsn import parse_dsn
from qmesh.qg.errors import BudgetBlocked, NoRoute
from qmesh.qg.router import BUDGET_BLOCK, BUDGET_SHIFT, RESORT_INTERVAL_S, BudgetSnapshot, Router

CHAT = frozenset({"chat", "summarize"})


def make_router(clock: Callable[[], float] = time.monotonic) -> Router:
    router = Router(clock=clock)
    router.set_candidates(
        "skills",
        [Candidate(id="skill:summarize", kind=INTERNAL, model="qmesh-summarize",
                   tasks=frozenset({"summarize"}), latency_ms=0.2, quality=0)],
    )  # fmt: skip
    router.set_candidates(
        "daemons",
        [
            Candidate(id="node:a/gemma", kind=DAEMON, model="gemma", tasks=CHAT, node="a",
                      family="gemma3", size_class="xs", equivalence="gemma3:xs",
                      latency_ms=400, quality=1, context=4096, queue_limit=2),
            Candidate(id="node:b/gemma", kind=DAEMON, model="gemma", tasks=CHAT, node="b",
                      family="gemma3", size_class="xs", equivalence="gemma3:xs",
                      latency_ms=600, quality=1, context=4096, queue_limit=2),
        ],
    )  # fmt: skip
    router.set_candidates(
        "providers",
        [
            Candidate(id="provider:x/big", kind=PROVIDER, model="big", tasks=CHAT, node="x",
                      local=False, private=False, price_in=3, price_out=15, quality=5,
                      latency_ms=900, context=128_000),
            Candidate(id="provider:y/cheap", kind=PROVIDER, model="cheap", tasks=CHAT, node="y",
                      local=False, private=False, price_in=0.1, price_out=0.4, quality=3,
                      latency_ms=300, context=16_000),
        ],
    )  # fmt: skip
    return router


def decide(router: Router, text: str, **options: object) -> str:
    return router.decide(parse_dsn(text), **options).chosen.id  # type: ignore[arg-type]


def test_preferences() -> None:
    router = make_router()
    assert decide(router, "qg://task=summarize;prefer=speed") == "skill:summarize"
    assert decide(router, "qg://task=chat;prefer=speed") == "provider:y/cheap"
    assert decide(router, "qg://task=chat;prefer=quality") == "provider:x/big"
    assert decide(router, "qg://task=chat;prefer=local") == "node:a/gemma"
    assert decide(router, "qg://task=chat;prefer=cost") == "node:a/gemma"


def test_filters_say_why() -> None:
    router = make_router()
    decision = router.decide(parse_dsn("qg://task=chat;prefer=quality;privacy=private"))
    assert decision.chosen.kind == DAEMON
    decision = router.decide(parse_dsn("qg://task=chat;prefer=quality;context=20000"))
    assert decision.chosen.id == "provider:x/big"
    decision = router.decide(
        parse_dsn("qg://task=chat;prefer=quality;max_cost=0.001"), tokens_in=1000, tokens_out=500
    )
    assert decision.chosen.id != "provider:x/big"
    assert any("max_cost" in why for _, why in decision.rejected)
    decision = router.decide(parse_dsn("qg://task=chat;prefer=quality;max_latency_ms=500"))
    assert decision.chosen.id == "provider:y/cheap"
    with pytest.raises(NoRoute, match="no candidate for task=chat matches model='nope'"):
        router.decide(parse_dsn("qg://task=chat;model=nope"))


def test_busy_and_cooling_nodes_fall_to_the_equivalent() -> None:
    router = make_router()
    pin = router.resolve_model("gemma")
    assert pin == "equiv:gemma3:xs"
    dsn = parse_dsn("qg://task=chat;prefer=speed")
    a = router.get("node:a/gemma")
    assert a is not None
    assert router.decide(dsn, model=pin).chosen.id == "node:a/gemma"
    a.queue_depth = 2
    decision = router.decide(dsn, model=pin)
    assert decision.chosen.id == "node:b/gemma"
    assert ("node:a/gemma", "busy: queue 2/2") in decision.rejected
    a.queue_depth = 0
    router.cool_down(a, 60)
    decision = router.decide(dsn, model=pin)
    assert decision.chosen.id == "node:b/gemma"
    assert "cooling down" in dict(decision.rejected)["node:a/gemma"]


def test_telemetry_changes_rerank_after_the_interval() -> None:
    now = [1000.0]
    router = make_router(lambda: now[0])
    dsn = parse_dsn("qg://task=chat;prefer=local")
    assert router.decide(dsn).chosen.id == "node:a/gemma"
    a = router.get("node:a/gemma")
    assert a is not None
    for _ in range(30):
        a.observe_latency(5000)
    router.telemetry_changed()
    now[0] += RESORT_INTERVAL_S * 1.5
    assert router.decide(dsn).chosen.id == "node:b/gemma"


SHIFT = BudgetSnapshot("team", BUDGET_SHIFT)
BLOCK = BudgetSnapshot("team", BUDGET_BLOCK)


def test_budget_shift_and_block() -> None:
    router = make_router()
    dsn = parse_dsn("qg://task=chat;prefer=speed")
    shifted = router.decide(dsn, budget=SHIFT)
    assert shifted.chosen.kind == DAEMON and shifted.shifted_from is not None
    assert shifted.shifted_from.id == "provider:y/cheap"
    quality = router.decide(parse_dsn("qg://task=chat;prefer=quality"), budget=SHIFT)
    assert quality.chosen.id == "provider:x/big"  # quality may still pay
    blocked = router.decide(parse_dsn("qg://task=chat;prefer=quality"), budget=BLOCK)
    assert blocked.chosen.kind == DAEMON
    for cid in ("node:a/gemma", "node:b/gemma"):
        candidate = router.get(cid)
        assert candidate is not None
        candidate.healthy = False
    with pytest.raises(NoRoute):
        router.decide(dsn, budget=BLOCK)
    only_paid = Router()
    only_paid.set_candidates("p", [c for c in make_router().candidates if c.kind == PROVIDER])
    with pytest.raises(BudgetBlocked, match="budget spent"):
        only_paid.decide(dsn, budget=BLOCK)


def test_explain_lists_every_candidate() -> None:
    router = make_router()
    explanation = router.explain(parse_dsn("qg://task=chat;privacy=local"))
    rows = {str(r["candidate"]): r for r in explanation.rows}
    assert set(rows) == {c.id for c in router.candidates}
    assert rows["skill:summarize"]["reason"] == "cannot do task=chat"
    assert "privacy=local" in str(rows["provider:x/big"]["reason"])
    assert explanation.decision is not None
    assert rows[explanation.decision.chosen.id]["status"] == "chosen"
    assert explanation.as_dict()["decision"]["chosen"] == explanation.decision.chosen.id  # type: ignore[index]


def test_a_paid_candidate_beyond_a_hard_budget_is_skipped_and_explained_so() -> None:
    router = make_router()
    dsn = parse_dsn("qg://task=chat;prefer=quality")
    # $0.005 left: provider:x/big may cost $0.00684 (1000 in, 256 out), cheap $0.0002.
    nearly = BudgetSnapshot("team", hard=True, limit_usd=1.0, committed_usd=0.995)
    why = "budget 'team' hard limit: 0.005 USD left < 0.00684 USD estimated"
    explanation = router.explain(dsn, budget=nearly)
    assert router.decisions == 0 and not router.recent  # explaining records nothing
    assert explanation.hops[:2] == ("provider:y/cheap", "node:a/gemma")
    rows = {str(r["candidate"]): r for r in explanation.rows}
    assert rows["provider:x/big"]["admission"] == f"skipped: {why}"
    assert rows["provider:y/cheap"]["admission"] == "hop 1: runs first"
    decision = router.decide(dsn, budget=nearly)
    assert decision.chosen.id == "provider:y/cheap"
    assert ("provider:x/big", why) in decision.rejected
    assert decision.as_dict()["budget"] == {
        "name": "team", "state": "ok", "mode": "hard", "limit_usd": 1.0,
        "committed_usd": 0.995, "left_usd": 0.005,
    }  # fmt: skip
    # A soft budget never refuses; a hard one with nothing left refuses even
    # a request estimated at nothing.
    soft = BudgetSnapshot("team", hard=False, limit_usd=1.0, committed_usd=2.0)
    assert router.decide(dsn, budget=soft).chosen.id == "provider:x/big"
    spent = BudgetSnapshot("team", hard=True, limit_usd=1.0, committed_usd=1.0)
    refused = router.decide(dsn, tokens_in=0, tokens_out=0, budget=spent)
    assert refused.chosen.kind == DAEMON
    assert "budget 'team' spent" in dict(refused.rejected)["provider:x/big"]
