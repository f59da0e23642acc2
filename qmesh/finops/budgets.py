"""Budgets: spend limits per app or team and period, kept without overspending.

For: :class:`BudgetBook`, the Gate's book of each budget's settled spend in
the current period and its outstanding reservations. Admission reserves the
request's *maximum* cost (:meth:`BudgetBook.reserve`) and completion settles
the actual cost (:meth:`Reservation.settle`).

With the state's shared totals (:class:`~qmesh.finops.totals.BudgetTotals`,
as every Gate runs), a paid request's check-and-reserve and its settlement
are each one write transaction in the state, so every Gate on it together
never commits more than a hard budget's limit; local work — never refused —
is charged in memory and added to the shared totals every
``SYNC_INTERVAL_S`` (:meth:`BudgetBook.sync_forever`), which also brings
in what the other Gates spent. Without shared totals (a book on its own),
reserve and its check run without an ``await`` in between, on the Gate's
one Trio thread, which gives the same guarantee within one process.

:meth:`BudgetBook.snapshot` is what routing sees of a budget: its state —
``ok``; ``shift`` when the spend projected to the period's end (burn rate
so far) exceeds the limit — prefer local candidates; ``block`` when a hard
budget is spent (or fully reserved) — no paid candidates; a soft budget at
100 % only warns — and what is committed against its limit. Admission
(:func:`qmesh.qg.admission.admit`) refuses a paid candidate whose maximum
cost does not fit by :func:`~qmesh.qg.admission.hard_limit_fits`, and
:meth:`BudgetBook.reserve` holds the money by that same rule: a book on
its own over the very figures the snapshot showed, shared totals over the
state's figures in the reservation's own transaction, which may hold other
Gates' spend this Gate has not seen yet (its own local spend not yet added
there is in the snapshot, so admission already refused what that leaves
no room for).

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
import trio

from qmesh.config import BudgetConfig
from qmesh.finops.totals import BudgetTotals, Key, Totals
from qmesh.qg.admission import (
    BUDGET_BLOCK,
    BUDGET_OK,
    BUDGET_SHIFT,
    BudgetSnapshot,
    hard_limit_fits,
)

__all__ = ["SYNC_INTERVAL_S", "Budget", "BudgetBook", "Reservation", "period_bounds"]

SYNC_INTERVAL_S: Final = 1.0
"""How often local spend reaches the shared totals, and the other Gates' spend this one."""

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
    held_locally: float = 0.0
    """Reserved for local work in this process (not in the shared totals)."""
    unsynced: float = 0.0
    """Local spend not yet added to the shared totals."""
    totals_version: int = -1
    """The version of the shared totals last taken (newer ones only)."""

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def key(self) -> Key:
        return self.name, self.period_start

    def mirror(self, totals: Totals) -> None:
        """Take the shared totals, plus what this process holds that they
        lack — unless a newer version was taken already (transactions of
        concurrent requests finish in any order)."""
        spent, reserved, version = totals
        if version < self.totals_version:
            return
        self.totals_version = version
        self.spent = spent + self.unsynced
        self.reserved = reserved + self.held_locally

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
    totals: BudgetTotals | None = None
    """Where it is held: the shared totals (a paid request), or None (this process)."""
    key: Key | None = None
    settled: bool = False

    async def settle(self, actual: float) -> None:
        """Release the hold and charge ``actual``. Idempotent; finishes even
        when the request was cancelled (the money was spent all the same)."""
        if self.settled:
            return
        self.settled = True
        budget = self.budget
        if budget is None:
            return
        if self.totals is not None and self.key is not None:
            with trio.CancelScope(shield=True):
                totals = await trio.to_thread.run_sync(
                    self.totals.settle, self.key, self.amount, actual
                )
            if budget.key == self.key:
                budget.mirror(totals)
            return
        budget.reserved = max(0.0, budget.reserved - self.amount)
        budget.held_locally = max(0.0, budget.held_locally - self.amount)
        budget.spent += actual
        budget.unsynced += actual


class BudgetBook:
    """Every configured budget's running totals."""

    def __init__(
        self,
        configs: Iterable[BudgetConfig],
        *,
        clock: Callable[[], float] = time.time,
        totals: BudgetTotals | None = None,
    ) -> None:
        self._clock = clock
        self.totals = totals
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
        """Set each budget's settled spend (from the ledger, this period);
        with shared totals :meth:`seed_shared` instead."""
        for name, amount in spent.items():
            if name is not None and name in self.budgets:
                self.budgets[name].spent = amount

    async def seed_shared(self, budget: Budget, ledger_spent: float) -> None:
        """Start the period's shared totals from the ledger unless a Gate did."""
        assert self.totals is not None
        budget.mirror(await trio.to_thread.run_sync(self.totals.seed, budget.key, ledger_spent))

    async def sync(self) -> None:
        """Add local spend to the shared totals; take everyone's back."""
        if self.totals is None or not self.budgets:
            return
        for budget in self.budgets.values():
            self._roll(budget)
        pending = {b.key: b.unsynced for b in self.budgets.values() if b.unsynced}
        keys = [b.key for b in self.budgets.values()]
        current = await trio.to_thread.run_sync(self.totals.add_spent, pending, keys)
        for budget in self.budgets.values():
            budget.unsynced = max(0.0, budget.unsynced - pending.get(budget.key, 0.0))
            if budget.key in current:
                budget.mirror(current[budget.key])

    async def sync_forever(self, interval_s: float = SYNC_INTERVAL_S) -> None:
        """:meth:`sync` every ``interval_s`` until cancelled, and once more then."""
        try:
            while True:
                await trio.sleep(interval_s)
                await self.sync()
        finally:
            with trio.CancelScope(shield=True):
                await self.sync()

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
            budget.spent = budget.reserved = budget.unsynced = budget.held_locally = 0.0
            budget.totals_version = -1
            budget.shifted = budget.blocked = 0
            budget.avoided = 0.0

    def snapshot(self, budget: Budget | None) -> BudgetSnapshot | None:
        """The budget as admission judges it now: read, nothing held."""
        if budget is None:
            return None
        return BudgetSnapshot(
            name=budget.name,
            state=self.state(budget),
            hard=budget.config.mode == "hard",
            limit_usd=budget.config.limit_usd,
            committed_usd=budget.spent + budget.reserved,
        )

    def load(self, budget: Budget, ledger_spent: float) -> None:
        """Take the period's figures without a running Gate, only reading
        (``qmesh route --explain`` on the Gate's box): the shared totals'
        row when a Gate made one, else ``ledger_spent``."""
        totals = None if self.totals is None else self.totals.read(budget.key)
        if totals is None:
            budget.spent = ledger_spent
        else:
            budget.mirror(totals)

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

    async def reserve(
        self, budget: Budget | None, amount: float, *, paid: bool
    ) -> Reservation | None:
        """Hold ``amount`` for a request; None when a hard budget cannot
        cover it and the candidate is paid (local work is never refused:
        its cost is charged, but a budget exists to stop paid spend). The
        rule is admission's (:func:`hard_limit_fits` over spent + reserved,
        as :meth:`snapshot` shows them), checked again as the money is held."""
        if budget is None:
            return Reservation(None, amount)
        hard = budget.config.mode == "hard"
        if paid and self.totals is not None:
            key = budget.key
            limit = budget.config.limit_usd if hard else None
            held, totals = await trio.to_thread.run_sync(self.totals.reserve, key, amount, limit)
            if budget.key == key:
                budget.mirror(totals)
            if not held:
                budget.blocked += 1
                return None
            return Reservation(budget, amount, self.totals, key)
        committed = budget.spent + budget.reserved
        if paid and hard and not hard_limit_fits(committed, amount, budget.config.limit_usd):
            budget.blocked += 1
            return None
        budget.reserved += amount
        budget.held_locally += amount
        return Reservation(budget, amount)

    def views(self) -> list[dict[str, object]]:
        now = self._clock()
        for budget in self.budgets.values():
            self._roll(budget)
        return [b.view(now) for b in self.budgets.values()]
