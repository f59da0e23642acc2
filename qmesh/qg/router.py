"""The qg:// router: filter the candidates, score them by preference, choose.

For: :meth:`Router.decide` — given a parsed DSN, the request's size and a
snapshot of its budget, the first hop and the ordered fallbacks, with the
reasons every examined candidate was passed over; :meth:`Router.hops` —
the order execution walks (the decision's own hops, then anything that
passes admission at that moment); :meth:`Router.explain` — the same
decision and order, with every candidate's admission verdict and score,
for ``qmesh route --explain`` and ``POST /qg/v1/route``.

One decision for explaining and executing: every verdict on a candidate is
:func:`qmesh.qg.admission.admit` (health, cool-downs, busy, context,
latency, cost, and whether a paid request's maximum cost fits a hard
budget), and an explanation runs :meth:`decide`'s own walk without
recording it, so the hop it names first is the one the executor runs
first. What can still part them is time: a failure, a heartbeat or another
request's spend between the two.

How it stays fast (≤ 50 µs with 1,000 candidates, ``bench/route.py``):
candidates are ranked ahead of time per (task, preference, pin, privacy)
and the ranking is rebuilt only when telemetry moved and at most every
``RESORT_INTERVAL_S``. A decision walks that ranking and stops at the first
candidate that passes the per-request filters (health, busy, latency,
cost, budget), so its cost depends on how many are rejected, not on how
many exist. Live state that can change between re-sorts (busy, cooling,
unhealthy) is read at decision time, never from the cached ranking.

Not for: running the request or retrying (``qmesh.llm.executor``), or the
books (``qmesh.finops``): the budget comes in as a read-only snapshot.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Final

import attrs

from qmesh.qg.admission import (
    BUDGET_BLOCK,
    BUDGET_OK,
    BUDGET_SHIFT,
    AppRules,
    BudgetSnapshot,
    Refusal,
    admit,
)
from qmesh.qg.candidates import Candidate
from qmesh.qg.dsn import Dsn
from qmesh.qg.errors import BudgetBlocked, NoRoute, PolicyBlocked

__all__ = [
    "BUDGET_BLOCK",
    "BUDGET_OK",
    "BUDGET_SHIFT",
    "BudgetSnapshot",
    "Decision",
    "Explanation",
    "Router",
]

RESORT_INTERVAL_S: Final = 0.05
RECENT_DECISIONS: Final = 1000
TYPICAL_IN: Final = 1000
TYPICAL_OUT: Final = 256
FALLBACKS: Final = 4
"""Fallbacks a decision lists; failover goes on past them (:meth:`Router.hops`)."""

SHIFTED: Final = "budget projected over: shifted to local"


@attrs.frozen
class Decision:
    """The router's choice for one request."""

    dsn: Dsn
    pin: str | None
    """The model pin the ranking used (the DSN's, or a concrete model's group)."""
    chosen: Candidate
    """The first hop: what execution runs first."""
    fallbacks: tuple[Candidate, ...]
    """Candidates that also passed, best first: where failover goes next."""
    rejected: tuple[tuple[str, str], ...]
    """``(candidate id, reason)`` for each candidate examined and passed over."""
    estimated_cost: float
    elapsed_us: float
    reason: str
    shifted_from: Candidate | None = None
    """The paid candidate a budget shift passed over for ``chosen``."""
    budget: BudgetSnapshot | None = None
    """The budget as admission saw it."""
    rules: AppRules | None = None
    """The app's policy admission applied (and applies again before each hop)."""

    def as_dict(self) -> dict[str, object]:
        return {
            "dsn": self.dsn.format(),
            "chosen": self.chosen.id,
            "model": self.chosen.model,
            "kind": self.chosen.kind,
            "reason": self.reason,
            "estimated_cost_usd": self.estimated_cost,
            "fallbacks": [c.id for c in self.fallbacks],
            "shifted_from": None if self.shifted_from is None else self.shifted_from.id,
            "rejected": [{"candidate": cid, "reason": why} for cid, why in self.rejected],
            "budget": None if self.budget is None else self.budget.as_dict(),
            "decision_us": round(self.elapsed_us, 1),
        }


@attrs.frozen
class Explanation:
    """Every candidate for a DSN: its admission verdict, its score, and the
    order execution would try them in."""

    dsn: Dsn
    rows: tuple[dict[str, object], ...]
    decision: Decision | None
    error: str | None
    hops: tuple[str, ...] = ()
    """Candidate ids in the order execution tries them while none fails
    (at most ``max_hops`` of them are attempted)."""
    budget: BudgetSnapshot | None = None
    budget_blocked: bool = False
    """No route because a hard budget refuses every candidate (HTTP 402)."""

    def as_dict(self) -> dict[str, object]:
        budget = self.budget
        return {
            "dsn": self.dsn.format(),
            "candidates": list(self.rows),
            "decision": None if self.decision is None else self.decision.as_dict(),
            "hops": list(self.hops),
            "error": self.error,
            "budget": None if budget is None else budget.name,
            "budget_state": BUDGET_OK if budget is None else budget.state,
            "budget_mode": None if budget is None else ("hard" if budget.hard else "soft"),
            "budget_left_usd": None if budget is None else round(budget.left_usd, 9),
        }


def _privacy_ok(candidate: Candidate, privacy: str) -> bool:
    if privacy == "local":
        return candidate.local
    if privacy == "private":
        return candidate.private
    return True


class Router:
    """Holds the candidates and decides. Not thread-safe: one Trio thread."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        """Monotonic seconds: cool-downs, and how old a ranking is."""
        self._sources: dict[str, list[Candidate]] = {}
        self._all: list[Candidate] = []
        self._by_task: dict[str, list[Candidate]] = {}
        self._by_model: dict[str, Candidate] = {}
        self._rankings: dict[tuple[str, str, str | None, str], tuple[Candidate, ...]] = {}
        self._ranked_at = 0.0
        self._dirty = False
        self.recent: deque[Decision] = deque(maxlen=RECENT_DECISIONS)
        self.decisions = 0

    # -- candidates ----------------------------------------------------------

    def set_candidates(self, source: str, candidates: Iterable[Candidate]) -> None:
        """Replace the candidates that ``source`` (``skills``, ``inventory``,
        ``providers``) contributes."""
        self._sources[source] = list(candidates)
        self._all = [c for group in self._sources.values() for c in group]
        for i, candidate in enumerate(self._all):
            candidate.order = i
        by_task: dict[str, list[Candidate]] = {}
        for candidate in self._all:
            for task in candidate.tasks:
                by_task.setdefault(task, []).append(candidate)
        self._by_task = by_task
        by_model: dict[str, Candidate] = {}
        for candidate in self._all:
            by_model.setdefault(candidate.model, candidate)
            by_model.setdefault(candidate.id, candidate)
        self._by_model = by_model
        self._rankings.clear()

    @property
    def candidates(self) -> Sequence[Candidate]:
        return self._all

    def get(self, candidate_id: str) -> Candidate | None:
        candidate = self._by_model.get(candidate_id)
        return candidate if candidate is not None and candidate.id == candidate_id else None

    def first_for_model(self, model: str) -> Candidate | None:
        """The first candidate serving ``model`` (a model id or a candidate id)."""
        return self._by_model.get(model)

    def cool_down(self, candidate: Candidate, seconds: float) -> None:
        """Pass over ``candidate`` and every other on its node for ``seconds``."""
        until = self.clock() + seconds
        for other in self._all:
            if other is candidate or (candidate.node is not None and other.node == candidate.node):
                other.cool_until = max(other.cool_until, until)

    def models(self) -> list[Candidate]:
        """One candidate per distinct model id, in order."""
        seen: dict[str, Candidate] = {}
        for candidate in self._all:
            seen.setdefault(candidate.model, candidate)
        return list(seen.values())

    def telemetry_changed(self) -> None:
        """Scores may have moved: re-rank at the next decision after the interval."""
        self._dirty = True

    def resolve_model(self, model: str) -> str | None:
        """The pin for a concrete model id: its equivalence group when it has
        one (so a busy node's request can go to an equivalent model), else
        the id itself; None when no candidate serves that model."""
        candidate = self._by_model.get(model)
        if candidate is None:
            return None
        if candidate.equivalence:
            return f"equiv:{candidate.equivalence}"
        return candidate.model if candidate.model == model else candidate.id

    # -- scoring ---------------------------------------------------------------

    def _ranking(
        self, task: str, prefer: str, pin: str | None, privacy: str
    ) -> tuple[Candidate, ...]:
        now = self.clock()
        if self._dirty and now - self._ranked_at >= RESORT_INTERVAL_S:
            self._rankings.clear()
            self._dirty = False
        key = (task, prefer, pin, privacy)
        ranking = self._rankings.get(key)
        if ranking is None:
            pool = [
                c
                for c in self._by_task.get(task, ())
                if (pin is None or pin in c.names) and _privacy_ok(c, privacy)
            ]
            scores = self._scores(pool, prefer)
            ranking = tuple(
                c
                for _, c in sorted(zip(scores, pool, strict=True), key=lambda p: (p[0], p[1].order))
            )
            self._rankings[key] = ranking
            self._ranked_at = now
        return ranking

    @staticmethod
    def _scores(pool: Sequence[Candidate], prefer: str) -> list[float]:
        """Lower is better."""
        speed = [c.expected_latency_ms() / (1.0 + c.tokens_per_s / 100.0) for c in pool]
        if prefer == "speed":
            return speed
        cost = [c.cost(TYPICAL_IN, TYPICAL_OUT) for c in pool]
        if prefer == "cost":
            return [cost[i] + speed[i] * 1e-9 for i in range(len(pool))]
        if prefer == "quality":
            return [-pool[i].quality * 1e6 + speed[i] for i in range(len(pool))]
        if prefer == "local":
            return [(0.0 if pool[i].local else 1e9) + speed[i] for i in range(len(pool))]

        # balanced: each criterion scaled to [0, 1] over this pool.
        def scaled(values: list[float]) -> list[float]:
            if not values:
                return values
            lo, hi = min(values), max(values)
            span = hi - lo
            return [(v - lo) / span if span > 0 else 0.0 for v in values]

        quality = scaled([-float(c.quality) for c in pool])
        s, k = scaled(speed), scaled(cost)
        return [s[i] + k[i] + 0.5 * quality[i] for i in range(len(pool))]

    # -- deciding ----------------------------------------------------------------

    def _pin(self, dsn: Dsn, model: str | None) -> str | None:
        if dsn.model is not None:
            return dsn.model
        return model

    def admission(
        self,
        candidate: Candidate,
        dsn: Dsn,
        *,
        tokens_in: int,
        tokens_out: int,
        budget: BudgetSnapshot | None,
        rules: AppRules | None = None,
    ) -> Refusal | None:
        """Why ``candidate`` may not take the request now, or None: the
        verdict :meth:`decide` gave, asked again (the executor, before each
        hop)."""
        why, _ = admit(
            candidate, dsn, tokens_in=tokens_in, tokens_out=tokens_out, budget=budget,
            now=self.clock(), rules=rules,
        )  # fmt: skip
        return why

    def _decide(
        self,
        dsn: Dsn,
        model: str | None,
        tokens_in: int,
        tokens_out: int,
        budget: BudgetSnapshot | None,
        fallbacks: int,
        rules: AppRules | None = None,
    ) -> Decision:
        """:meth:`decide` without recording anything: what :meth:`explain` runs."""
        started = time.perf_counter_ns()
        pin = self._pin(dsn, model)
        ranking = self._ranking(dsn.task, dsn.prefer, pin, dsn.privacy)
        now = self.clock()
        rejected: list[tuple[str, str]] = []
        refused_by_budget: set[str] = set()
        chosen: Candidate | None = None
        chosen_cost = 0.0
        paid_held: Candidate | None = None  # a paid winner while the budget asks to shift
        paid_cost = 0.0
        extra: list[Candidate] = []
        shift = budget is not None and budget.state == BUDGET_SHIFT and dsn.prefer != "quality"
        reason = f"best by prefer={dsn.prefer}"
        refused_by_policy: set[str] = set()
        for candidate in ranking:
            why, cost = admit(
                candidate, dsn, tokens_in=tokens_in, tokens_out=tokens_out, budget=budget,
                now=now, rules=rules,
            )  # fmt: skip
            if why is not None:
                rejected.append((candidate.id, why.reason))
                if why.kind == "budget":
                    refused_by_budget.add(candidate.id)
                elif why.kind == "policy":
                    refused_by_policy.add(candidate.id)
                continue
            if chosen is None:
                if shift and candidate.paid:
                    if paid_held is None:
                        paid_held, paid_cost = candidate, cost
                    rejected.append((candidate.id, SHIFTED))
                    continue
                chosen, chosen_cost = candidate, cost
                if paid_held is not None:
                    reason = f"budget projected over: local instead of {paid_held.id}"
                continue
            extra.append(candidate)
            if len(extra) >= fallbacks:
                break
        if chosen is None and paid_held is not None:
            # No local equivalent: the projection is a warning, not a block.
            chosen, chosen_cost = paid_held, paid_cost
            reason = "budget projected over, but no local candidate can do it"
            rejected = [r for r in rejected if r[0] != paid_held.id]
        if chosen is None:
            if not ranking:
                raise NoRoute(self._nothing_for(dsn, model))
            reasons = dict(rejected)
            if refused_by_policy and refused_by_policy == reasons.keys():
                raise PolicyBlocked(
                    f"no candidate for {dsn.format()} is allowed: {rejected[0][1]}", reasons
                )
            if refused_by_budget and refused_by_budget == reasons.keys():
                raise BudgetBlocked(
                    "budget spent: paid providers are blocked and no local candidate can "
                    f"do task={dsn.task} ({rejected[0][1]})",
                    reasons,
                )
            summary = "; ".join(f"{cid}: {why}" for cid, why in rejected[:5])
            raise NoRoute(f"no candidate can serve {dsn.format()} now ({summary})", reasons)
        return Decision(
            dsn=dsn,
            pin=pin,
            chosen=chosen,
            fallbacks=tuple(extra),
            rejected=tuple(rejected),
            estimated_cost=chosen_cost,
            elapsed_us=(time.perf_counter_ns() - started) / 1000,
            reason=reason,
            shifted_from=paid_held if paid_held is not chosen else None,
            budget=budget,
            rules=rules,
        )

    def decide(
        self,
        dsn: Dsn,
        *,
        model: str | None = None,
        tokens_in: int = TYPICAL_IN,
        tokens_out: int = TYPICAL_OUT,
        budget: BudgetSnapshot | None = None,
        fallbacks: int = FALLBACKS,
        rules: AppRules | None = None,
    ) -> Decision:
        """Choose for ``dsn`` (``model``: the pin of a concrete model id, from
        :meth:`resolve_model`; ``budget``: the snapshot of the budget that
        pays, from :meth:`~qmesh.finops.budgets.BudgetBook.snapshot`), and
        record the decision (``recent``, ``GET /qg/v1/decisions``). Raises
        NoRoute (BudgetBlocked when a hard budget is why)."""
        self.decisions += 1
        decision = self._decide(dsn, model, tokens_in, tokens_out, budget, fallbacks, rules)
        self.recent.append(decision)
        return decision

    def hops(
        self,
        decision: Decision,
        *,
        tokens_in: int,
        tokens_out: int,
        budget: Callable[[], BudgetSnapshot | None],
    ) -> Iterator[Candidate]:
        """The order execution tries candidates in: the decision's first hop
        and fallbacks, then (lazily, when those are used up) every other
        candidate that passes admission with the ``budget`` of that moment,
        in ranking order. The executor checks each again before it runs it
        (:meth:`admission`); :meth:`explain` lists them."""
        tried: set[str] = set()
        for candidate in (decision.chosen, *decision.fallbacks):
            tried.add(candidate.id)
            yield candidate
        yield from self.more_fallbacks(
            decision, tried, tokens_in=tokens_in, tokens_out=tokens_out, budget=budget()
        )

    def more_fallbacks(
        self,
        decision: Decision,
        tried: set[str],
        *,
        tokens_in: int,
        tokens_out: int,
        budget: BudgetSnapshot | None,
    ) -> Iterator[Candidate]:
        """Candidates after the decision's own fallbacks, re-checked now: for a
        long failover chain (every hop re-reads health and busy state)."""
        dsn = decision.dsn
        ranking = self._ranking(dsn.task, dsn.prefer, decision.pin, dsn.privacy)
        now = self.clock()
        for candidate in ranking:
            if candidate.id in tried:
                continue
            why, _ = admit(
                candidate, dsn, tokens_in=tokens_in, tokens_out=tokens_out, budget=budget,
                now=now, rules=decision.rules,
            )  # fmt: skip
            if why is None:
                tried.add(candidate.id)
                yield candidate

    def _nothing_for(self, dsn: Dsn, model: str | None) -> str:
        pin = self._pin(dsn, model)
        if pin is not None:
            return f"no candidate for task={dsn.task} matches model={pin!r}"
        if dsn.privacy != "any":
            return f"no candidate for task={dsn.task} with privacy={dsn.privacy}"
        return f"no candidate can do task={dsn.task}"

    # -- explaining ----------------------------------------------------------------

    def explain(
        self,
        dsn: Dsn,
        *,
        model: str | None = None,
        tokens_in: int = TYPICAL_IN,
        tokens_out: int = TYPICAL_OUT,
        budget: BudgetSnapshot | None = None,
        rules: AppRules | None = None,
    ) -> Explanation:
        """What :meth:`decide` and execution would do now, without doing or
        recording anything: every candidate with its admission verdict
        (``hop N``, or ``skipped: why``), its score, and the hop order."""
        pin = self._pin(dsn, model)
        decision: Decision | None = None
        error: str | None = None
        blocked = False
        try:
            decision = self._decide(dsn, model, tokens_in, tokens_out, budget, FALLBACKS, rules)
        except NoRoute as exc:
            error, blocked = str(exc), isinstance(exc, BudgetBlocked)
        order: list[Candidate] = []
        if decision is not None:
            order = list(
                self.hops(
                    decision, tokens_in=tokens_in, tokens_out=tokens_out, budget=lambda: budget
                )
            )
        hop_of = {c.id: n for n, c in enumerate(order, 1)}
        shifted = (
            set() if decision is None else {cid for cid, why in decision.rejected if why == SHIFTED}
        )
        now = self.clock()
        rows: list[dict[str, object]] = []
        for candidate in self._all:
            row: dict[str, object] = {
                "candidate": candidate.id,
                "kind": candidate.kind,
                "model": candidate.model,
                "expected_latency_ms": round(candidate.expected_latency_ms(), 3),
                "queue": candidate.queue_depth,
                "price_in_per_1m": candidate.price_in,
                "price_out_per_1m": candidate.price_out,
                "quality": candidate.quality,
            }
            why: str | None
            if dsn.task not in candidate.tasks:
                why = f"cannot do task={dsn.task}"
            elif pin is not None and pin not in candidate.names:
                why = f"model pin {pin!r} does not match"
            elif not _privacy_ok(candidate, dsn.privacy):
                why = f"privacy={dsn.privacy} excludes a {candidate.kind}" + (
                    " (cloud)" if not candidate.private else ""
                )
            else:
                refusal, cost = admit(
                    candidate, dsn, tokens_in=tokens_in, tokens_out=tokens_out, budget=budget,
                    now=now, rules=rules,
                )  # fmt: skip
                row["estimated_cost_usd"] = cost
                why = None if refusal is None else refusal.reason
            hop = hop_of.get(candidate.id)
            row["hop"] = hop
            if hop == 1:
                row["status"], row["admission"] = "chosen", "hop 1: runs first"
            elif hop is not None:
                row["status"], row["admission"] = "eligible", f"hop {hop}: if the hops before fail"
                if candidate.id in shifted:
                    row["admission"] = f"hop {hop}: after local candidates ({SHIFTED})"
            else:
                row["status"] = "filtered"
                row["admission"] = f"skipped: {why or 'not reached'}"
            row["reason"] = why
            rows.append(row)
        scores = dict(zip((c.id for c in order), self._scores(order, dsn.prefer), strict=True))
        for row in rows:
            score = scores.get(str(row["candidate"]))
            if score is not None:
                row["score"] = round(score, 6)
        rows.sort(key=lambda r: (r["hop"] is None, r["hop"] or 0))
        return Explanation(
            dsn=dsn,
            rows=tuple(rows),
            decision=decision,
            error=error,
            hops=tuple(c.id for c in order),
            budget=budget,
            budget_blocked=blocked,
        )
