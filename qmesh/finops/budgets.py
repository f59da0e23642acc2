"""Budgets: spend limits per app or team and period, kept without overspending.

For: :class:`BudgetBook`, the Gate's in-memory book of each budget's
settled spend in the current period and its outstanding reservations.
Admission reserves the request's *maximum* cost (:meth:`BudgetBook.reserve`)
and completion settles the actual cost (:meth:`Reservation.settle`).
Reserve and the check before it run without an ``await`` in between, on
the Gate's one Trio thread, so concurrent requests cannot together pass a
check that only one of them fits: with a hard budget, the total of settled
and reserved never exceeds the limit.

:meth:`BudgetBook.state` tells the router what to do: ``ok``; ``shift``
when the spend projected to the period's end (burn rate so far) exceeds
the limit — prefer local candidates; ``block`` when a hard budget is spent
(or fully reserved) — no paid candidates. A soft budget at 100 % only warns.

Not for: the ledger rows (:mod:`qmesh.finops.ledger`; the book is seeded
from them at start-up) or prices (:meth:`qmesh.qg.candidates.Candidate.cost`).
"""

from __future__ import annotations

import calendar
import datetime
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Final

import attrs

from qmesh.config import BudgetConfig
from qmesh.qg.router import BUDGET_BLOCK, BUDGET_OK, BUDGET_SHIFT

__all__ = ["Budget", "BudgetBook", "Reservation", "period_bounds"]

# Early in a period a few requests would project an absurd burn rate; the
# projection treats at least this share of the period as elapsed.
MIN_ELAPSED_SHARE: Final = 1 / 48


def period_bounds(period: str, now: float) -> tuple[float, float]:
    """Start and end (UTC epoch seconds) of the ``day`` or ``month`` holding ``now``."""
    moment = datetime.datetime.fromtimestamp(now, datetime.UTC)
    if period == "day":
        start = moment.replace(hour=0, minute=0, second=0, microsecond=0)
        end = start + datetime.timedelta(days=1)
    else:
        start = moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        days = calendar.monthrange(start.year, start.month)[1]
        end = start + datetime.timedelta(days=days)
    return start.timestamp(), end.timestamp()


@attrs.define
class Budget:
    config: BudgetConfig
    period_start: float
    period_end: float
    spent: float = 0.0
    reserved: float = 0.0
    shifted: int = 0
    avoided: float = 0.0
    blocked: int = 0

    @property
    def name(self) -> str:
        return self.config.name

    def burn_rate(self, now: float) -> float:
        """USD per hour so far this period."""
        elapsed = max(now - self.period_start, 1.0)
        return self.spent / elapsed * 3600.0

    def projected(self, now: float) -> float:
        length = self.period_end - self.period_start
        elapsed = max(now - self.period_start, length * MIN_ELAPSED_SHARE)
        return (self.spent + self.reserved) / elapsed * length

    def view(self, now: float) -> dict[str, object]:
        limit = self.config.limit_usd
        return {
            "budget": self.name,
            "period": self.config.period,
            "mode": self.config.mode,
            "limit_usd": limit,
            "spent_usd": round(self.spent, 6),
            "reserved_usd": round(self.reserved, 6),
            "remaining_usd": round(max(0.0, limit - self.spent - self.reserved), 6),
            "used_pct": round(100.0 * self.spent / limit, 2) if limit else None,
            "burn_usd_per_hour": round(self.burn_rate(now), 6),
            "projected_usd": round(self.projected(now), 6),
            "period_start": self.period_start,
            "period_end": self.period_end,
            "apps": list(self.config.apps),
        }


@attrs.define
class Reservation:
    """Money held for one request until it finishes."""

    budget: Budget | None
    amount: float
    settled: bool = False

    def settle(self, actual: float) -> None:
        """Release the hold and charge ``actual``. Idempotent."""
        if self.settled:
            return
        self.settled = True
        if self.budget is not None:
            self.budget.reserved = max(0.0, self.budget.reserved - self.amount)
            self.budget.spent += actual


class BudgetBook:
    """Every configured budget's running totals."""

    def __init__(
        self, configs: Iterable[BudgetConfig], *, clock: Callable[[], float] = time.time
    ) -> None:
        self._clock = clock
        now = clock()
        self.budgets: dict[str, Budget] = {}
        self._by_app: dict[str, Budget] = {}
        for config in configs:
            start, end = period_bounds(config.period, now)
            budget = Budget(config, start, end)
            self.budgets[config.name] = budget
            for app in config.apps:
                self._by_app.setdefault(app, budget)

    def seed(self, spent: Mapping[str | None, float]) -> None:
        """Set each budget's settled spend (from the ledger, this period)."""
        for name, amount in spent.items():
            if name is not None and name in self.budgets:
                self.budgets[name].spent = amount

    def earliest_period_start(self) -> float:
        return min((b.period_start for b in self.budgets.values()), default=self._clock())

    def for_app(self, app: str, requested: str | None = None) -> Budget | None:
        """The budget that pays for ``app``'s request: ``requested`` (the
        DSN's ``budget=``) when the app belongs to it, else the app's own.
        Raises PermissionError for a budget the app may not charge, KeyError
        for an unknown one."""
        if requested is None:
            budget = self._by_app.get(app)
        else:
            budget = self.budgets[requested]
            if budget.config.apps and app not in budget.config.apps:
                raise PermissionError(f"app {app!r} may not charge budget {requested!r}")
        if budget is not None:
            self._roll(budget)
        return budget

    def _roll(self, budget: Budget) -> None:
        now = self._clock()
        if now >= budget.period_end:
            budget.period_start, budget.period_end = period_bounds(budget.config.period, now)
            budget.spent = 0.0
            budget.shifted = budget.blocked = 0
            budget.avoided = 0.0

    def state(self, budget: Budget | None) -> str:
        if budget is None:
            return BUDGET_OK
        limit = budget.config.limit_usd
        committed = budget.spent + budget.reserved
        if committed >= limit and budget.config.mode == "hard":
            return BUDGET_BLOCK
        if committed >= limit or budget.projected(self._clock()) > limit:
            return BUDGET_SHIFT
        return BUDGET_OK

    def reserve(self, budget: Budget | None, amount: float, *, paid: bool) -> Reservation | None:
        """Hold ``amount`` for a request; None when a hard budget cannot
        cover it and the candidate is paid (local work is never refused:
        its cost is charged, but a budget exists to stop paid spend)."""
        if budget is None:
            return Reservation(None, amount)
        if paid and budget.config.mode == "hard":
            if budget.spent + budget.reserved + amount > budget.config.limit_usd:
                budget.blocked += 1
                return None
        budget.reserved += amount
        return Reservation(budget, amount)

    def views(self) -> list[dict[str, object]]:
        now = self._clock()
        for budget in self.budgets.values():
            self._roll(budget)
        return [b.view(now) for b in self.budgets.values()]
