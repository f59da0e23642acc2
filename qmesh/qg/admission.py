"""Admission: whether a candidate may take a request now, and if not, why.

For: :func:`admit`, the one verdict on a candidate that every routing path
asks — the router walking its ranking for a decision
(:meth:`~qmesh.qg.router.Router.decide`), the explanation of that decision
(:meth:`~qmesh.qg.router.Router.explain`: ``POST /qg/v1/route``,
``qmesh route --explain``), and the executor again before each hop, when a
failure earlier in the same request may have cooled a node down
(:mod:`qmesh.llm.executor`). One function for all three is what makes an
explanation name the hop that execution runs first.

The budget comes in as a :class:`BudgetSnapshot`, a read-only view that
the book takes (:meth:`qmesh.finops.budgets.BudgetBook.snapshot`), so
admission holds no money: an explanation only reads, and execution then
reserves. :func:`hard_limit_fits` is the one rule for whether a paid
request's maximum cost still fits a hard budget; the book applies the same
function when it reserves, in memory or in the state's transaction.

Not for: ranking (:mod:`qmesh.qg.router`) or holding money
(:mod:`qmesh.finops.budgets`).
"""

from __future__ import annotations

import math
from fnmatch import fnmatchcase
from typing import Final

import attrs

from qmesh.qg.candidates import INTERNAL, PROVIDER, Candidate
from qmesh.qg.dsn import Dsn

__all__ = [
    "BUDGET_BLOCK",
    "BUDGET_OK",
    "BUDGET_SHIFT",
    "AppRules",
    "BudgetSnapshot",
    "Refusal",
    "admit",
    "hard_limit_fits",
]

BUDGET_OK: Final = "ok"
BUDGET_SHIFT: Final = "shift"
"""The projection is over budget: prefer local candidates to paid ones."""
BUDGET_BLOCK: Final = "block"
"""A hard budget is spent: paid candidates are refused."""


def hard_limit_fits(committed: float, amount: float, limit: float) -> bool:
    """Whether ``amount`` more may be held against a hard ``limit`` when
    ``committed`` (spent + reserved) is held already: never past the limit,
    and nothing at all once it is reached (a request estimated at nothing
    may still cost something)."""
    return committed < limit and committed + amount <= limit


def _usd(amount: float) -> str:
    return f"{amount:.6g}"


@attrs.frozen
class BudgetSnapshot:
    """A budget as admission sees it at one moment: read, never held."""

    name: str
    state: str = BUDGET_OK
    """:data:`BUDGET_OK`, :data:`BUDGET_SHIFT` or :data:`BUDGET_BLOCK`."""
    hard: bool = False
    limit_usd: float = math.inf
    committed_usd: float = 0.0
    """Spent plus reserved (by requests still running) this period."""

    @property
    def left_usd(self) -> float:
        return max(0.0, self.limit_usd - self.committed_usd)

    def refusal(self, estimated: float) -> str | None:
        """Why a paid candidate whose request may cost up to ``estimated``
        USD is refused, or None when it may run."""
        fits = not self.hard or hard_limit_fits(self.committed_usd, estimated, self.limit_usd)
        if fits and self.state != BUDGET_BLOCK:
            return None
        if self.state == BUDGET_BLOCK or self.left_usd <= 0:
            return (
                f"budget {self.name!r} spent (hard limit {_usd(self.limit_usd)} USD): "
                "paid providers blocked"
            )
        return (
            f"budget {self.name!r} hard limit: {_usd(self.left_usd)} USD left < "
            f"{_usd(estimated)} USD estimated"
        )

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "state": self.state,
            "mode": "hard" if self.hard else "soft",
            "limit_usd": self.limit_usd,
            "committed_usd": round(self.committed_usd, 9),
            "left_usd": round(self.left_usd, 9),
        }


@attrs.frozen
class AppRules:
    """An app's LLM policy as admission applies it: which candidates its
    requests may reach (:class:`qmesh.config.LlmPolicyConfig`'s ``models``
    and ``providers``; its other rules act before routing)."""

    app: str
    models: tuple[str, ...] | None = None
    """:mod:`fnmatch` patterns of model ids; None: any."""
    providers: tuple[str, ...] | None = None
    """Provider names; None: any. Daemons and skills are not providers."""

    def refusal(self, candidate: Candidate) -> Refusal | None:
        if self.models is not None and not any(
            fnmatchcase(candidate.model, p) for p in self.models
        ):
            return Refusal(
                "policy",
                f"app policy of {self.app!r} allows models {list(self.models)}: "
                f"not {candidate.model!r}",
            )
        if self.providers is not None and candidate.kind == PROVIDER:
            name = (candidate.node or "").removeprefix("provider:")
            if not any(fnmatchcase(name, p) for p in self.providers):
                return Refusal(
                    "policy",
                    f"app policy of {self.app!r} allows providers {list(self.providers)}: "
                    f"not {name!r}",
                )
        return None


@attrs.frozen
class Refusal:
    """Why a candidate may not take a request now."""

    kind: str
    """What stopped it, one word: ``out_of_service``, ``unhealthy``,
    ``cooling``, ``context``, ``busy``, ``latency``, ``max_cost``,
    ``budget``, ``policy``. The executor writes it as the hop's outcome."""
    reason: str


def admit(
    candidate: Candidate,
    dsn: Dsn,
    *,
    tokens_in: int,
    tokens_out: int,
    budget: BudgetSnapshot | None,
    now: float,
    rules: AppRules | None = None,
) -> tuple[Refusal | None, float]:
    """``(why it is refused or None, its estimated cost)`` for a request of
    ``tokens_in`` + at most ``tokens_out`` tokens on ``candidate`` at
    ``now`` (the router's clock), from an app whose policy is ``rules``.
    The cost is what a reservation holds."""
    if rules is not None:
        refused = rules.refusal(candidate)
        if refused is not None:
            return refused, 0.0
    if candidate.out_of_service is not None:
        return Refusal("out_of_service", candidate.out_of_service), 0.0
    if not candidate.healthy:
        return Refusal("unhealthy", "unhealthy: its node is stale or gone"), 0.0
    if candidate.cool_until > now:
        wait = candidate.cool_until - now
        return Refusal("cooling", f"cooling down for {wait:.1f} s after a failure"), 0.0
    if dsn.context is not None and candidate.context < dsn.context:
        return Refusal("context", f"context {candidate.context} < {dsn.context} needed"), 0.0
    if tokens_in + tokens_out > candidate.context and candidate.kind != INTERNAL:
        why = f"request of ~{tokens_in + tokens_out} tokens > context {candidate.context}"
        return Refusal("context", why), 0.0
    busy = candidate.busy_reason()
    if busy is not None:
        return Refusal("busy", busy), 0.0
    if dsn.max_latency_ms is not None and candidate.expected_latency_ms() > dsn.max_latency_ms:
        why = (
            f"expected latency {candidate.expected_latency_ms():.0f} ms > "
            f"max_latency_ms {dsn.max_latency_ms}"
        )
        return Refusal("latency", why), 0.0
    cost = candidate.cost(tokens_in, tokens_out)
    if dsn.max_cost is not None and cost > dsn.max_cost:
        return Refusal("max_cost", f"estimated cost ${cost:.6f} > max_cost ${dsn.max_cost:g}"), cost
    if candidate.paid and budget is not None:
        over = budget.refusal(cost)
        if over is not None:
            return Refusal("budget", over), cost
    return None, cost
