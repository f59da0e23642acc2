"""The qg:// router: filter the candidates, score them by preference, choose.

For: :meth:`Router.decide` — given a parsed DSN, the request's size and the
budget's state, the best candidate and the ordered fallbacks, with the
reasons every examined candidate was passed over; :meth:`Router.explain`
— the same decision with every candidate filtered and scored, for
``qmesh route --explain`` and ``POST /qg/v1/route``.

How it stays fast (≤ 50 µs with 1,000 candidates, ``bench/route.py``):
candidates are ranked ahead of time per (task, preference, pin, privacy)
and the ranking is rebuilt only when telemetry moved and at most every
``RESORT_INTERVAL_S``. A decision walks that ranking and stops at the first
candidate that passes the per-request filters (health, busy, latency,
cost, budget), so its cost depends on how many are rejected, not on how
many exist. Live state that can change between re-sorts (busy, cooling,
unhealthy) is read at decision time, never from the cached ranking.

Not for: running the request or retrying (``qmesh.llm.executor``), or the
books (``qmesh.finops``): the budget's state comes in as an argument.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from typing import Final

import attrs

from qmesh.qg.candidates import Candidate
from qmesh.qg.dsn import Dsn
from qmesh.qg.errors import BudgetBlocked, NoRoute

__all__ = [
    "BUDGET_BLOCK",
    "BUDGET_OK",
    "BUDGET_SHIFT",
    "Decision",
    "Explanation",
    "Router",
]

RESORT_INTERVAL_S: Final = 0.05
RECENT_DECISIONS: Final = 1000
TYPICAL_IN: Final = 1000
TYPICAL_OUT: Final = 256

BUDGET_OK: Final = "ok"
BUDGET_SHIFT: Final = "shift"
"""The projection is over budget: prefer local candidates to paid ones."""
BUDGET_BLOCK: Final = "block"
"""A hard budget is spent: paid candidates are refused."""


@attrs.frozen
class Decision:
    """The router's choice for one request."""

    dsn: Dsn
    pin: str | None
    """The model pin the ranking used (the DSN's, or a concrete model's group)."""
    chosen: Candidate
    fallbacks: tuple[Candidate, ...]
    """Candidates that also passed, best first: where failover goes next."""
    rejected: tuple[tuple[str, str], ...]
    """``(candidate id, reason)`` for each candidate examined and passed over."""
    estimated_cost: float
    elapsed_us: float
    reason: str
    shifted_from: Candidate | None = None
    """The paid candidate a budget shift passed over for ``chosen``."""

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
            "decision_us": round(self.elapsed_us, 1),
        }


@attrs.frozen
class Explanation:
    """Every candidate for a DSN: its filters' verdict and its score."""

    dsn: Dsn
    rows: tuple[dict[str, object], ...]
    decision: Decision | None
    error: str | None

    def as_dict(self) -> dict[str, object]:
        return {
            "dsn": self.dsn.format(),
            "candidates": list(self.rows),
            "decision": None if self.decision is None else self.decision.as_dict(),
            "error": self.error,
        }


def _privacy_ok(candidate: Candidate, privacy: str) -> bool:
    if privacy == "local":
        return candidate.local
    if privacy == "private":
        return candidate.private
    return True


class Router:
    """Holds the candidates and decides. Not thread-safe: one Trio thread."""

    def __init__(self) -> None:
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
        until = time.monotonic() + seconds
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
        now = time.monotonic()
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

    def _verdict(
        self,
        candidate: Candidate,
        dsn: Dsn,
        tokens_in: int,
        tokens_out: int,
        budget: str,
        now: float,
    ) -> tuple[str | None, float]:
        """``(reason it is refused or None, estimated cost)``."""
        if candidate.out_of_service is not None:
            return candidate.out_of_service, 0.0
        if not candidate.healthy:
            return "unhealthy: its node is stale or gone", 0.0
        if candidate.cool_until > now:
            return f"cooling down for {candidate.cool_until - now:.1f} s after a failure", 0.0
        if dsn.context is not None and candidate.context < dsn.context:
            return f"context {candidate.context} < {dsn.context} needed", 0.0
        if tokens_in + tokens_out > candidate.context and candidate.kind != "internal":
            return f"request of ~{tokens_in + tokens_out} tokens > context {candidate.context}", 0.0
        busy = candidate.busy_reason()
        if busy is not None:
            return busy, 0.0
        if dsn.max_latency_ms is not None and candidate.expected_latency_ms() > dsn.max_latency_ms:
            return (
                f"expected latency {candidate.expected_latency_ms():.0f} ms > "
                f"max_latency_ms {dsn.max_latency_ms}",
                0.0,
            )
        cost = candidate.cost(tokens_in, tokens_out)
        if dsn.max_cost is not None and cost > dsn.max_cost:
            return f"estimated cost ${cost:.6f} > max_cost ${dsn.max_cost:g}", cost
        if candidate.paid and budget == BUDGET_BLOCK:
            return "budget spent (hard limit): paid providers blocked", cost
        return None, cost

    def decide(
        self,
        dsn: Dsn,
        *,
        model: str | None = None,
        tokens_in: int = TYPICAL_IN,
        tokens_out: int = TYPICAL_OUT,
        budget: str = BUDGET_OK,
        fallbacks: int = 4,
    ) -> Decision:
        """Choose for ``dsn`` (``model``: the pin of a concrete model id, from
        :meth:`resolve_model`). Raises NoRoute (BudgetBlocked when a spent
        hard budget is why)."""
        started = time.perf_counter_ns()
        pin = self._pin(dsn, model)
        ranking = self._ranking(dsn.task, dsn.prefer, pin, dsn.privacy)
        now = time.monotonic()
        rejected: list[tuple[str, str]] = []
        chosen: Candidate | None = None
        chosen_cost = 0.0
        paid_held: Candidate | None = None  # a paid winner while the budget asks to shift
        paid_cost = 0.0
        extra: list[Candidate] = []
        shift = budget == BUDGET_SHIFT and dsn.prefer != "quality"
        reason = f"best by prefer={dsn.prefer}"
        for candidate in ranking:
            why, cost = self._verdict(candidate, dsn, tokens_in, tokens_out, budget, now)
            if why is not None:
                rejected.append((candidate.id, why))
                continue
            if chosen is None:
                if shift and candidate.paid:
                    if paid_held is None:
                        paid_held, paid_cost = candidate, cost
                    rejected.append((candidate.id, "budget projected over: shifted to local"))
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
            self.decisions += 1
            if not ranking:
                raise NoRoute(self._nothing_for(dsn, model))
            reasons = dict(rejected)
            if all("budget spent" in why for why in reasons.values()):
                raise BudgetBlocked(
                    "budget spent: paid providers are blocked and no local candidate can "
                    f"do task={dsn.task}",
                    reasons,
                )
            summary = "; ".join(f"{cid}: {why}" for cid, why in rejected[:5])
            raise NoRoute(f"no candidate can serve {dsn.format()} now ({summary})", reasons)
        decision = Decision(
            dsn=dsn,
            pin=pin,
            chosen=chosen,
            fallbacks=tuple(extra),
            rejected=tuple(rejected),
            estimated_cost=chosen_cost,
            elapsed_us=(time.perf_counter_ns() - started) / 1000,
            reason=reason,
            shifted_from=paid_held if paid_held is not chosen else None,
        )
        self.decisions += 1
        self.recent.append(decision)
        return decision

    def more_fallbacks(
        self, decision: Decision, tried: set[str], *, tokens_in: int, tokens_out: int, budget: str
    ) -> Iterator[Candidate]:
        """Candidates after the decision's own fallbacks, re-checked now: for a
        long failover chain (every hop re-reads health and busy state)."""
        dsn = decision.dsn
        ranking = self._ranking(dsn.task, dsn.prefer, decision.pin, dsn.privacy)
        now = time.monotonic()
        for candidate in ranking:
            if candidate.id in tried:
                continue
            why, _ = self._verdict(candidate, dsn, tokens_in, tokens_out, budget, now)
            if why is None:
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
        budget: str = BUDGET_OK,
    ) -> Explanation:
        """Every candidate: which filter stopped it, or its score and rank."""
        pin = self._pin(dsn, model)
        now = time.monotonic()
        rows: list[dict[str, object]] = []
        pool: list[Candidate] = []
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
                why, cost = self._verdict(candidate, dsn, tokens_in, tokens_out, budget, now)
                row["estimated_cost_usd"] = cost
                if why is None:
                    pool.append(candidate)
            row["status"] = "eligible" if why is None else "filtered"
            row["reason"] = why
            rows.append(row)
        scores = dict(zip((c.id for c in pool), self._scores(pool, dsn.prefer), strict=True))
        for row in rows:
            score = scores.get(str(row["candidate"]))
            if score is not None:
                row["score"] = round(score, 6)
        rows.sort(key=lambda r: (r["status"] != "eligible", r.get("score", 0.0)))
        decision: Decision | None = None
        error: str | None = None
        try:
            decision = self.decide(
                dsn, model=model, tokens_in=tokens_in, tokens_out=tokens_out, budget=budget
            )
        except NoRoute as exc:
            error = str(exc)
        if decision is not None:
            for row in rows:
                if row["candidate"] == decision.chosen.id:
                    row["status"] = "chosen"
        return Explanation(dsn=dsn, rows=tuple(rows), decision=decision, error=error)
