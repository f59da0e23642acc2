"""Budgets' running totals in the state, shared by every Gate on it.

For: :class:`BudgetTotals`, one row of ``budget_totals`` per budget and
period (``spent``, ``reserved``), changed only in write transactions — the
state's single-writer rule (:mod:`qmesh.state.db`) makes a paid request's
check-and-reserve atomic across every Gate, so several Gates together never
commit more than a hard budget's limit. A paid request's reservation and
its settlement are each one transaction; local work, which no budget
refuses, is added in batches (:meth:`BudgetTotals.add_spent`), which also
reads back what the other Gates spent.

Not for: deciding anything (:mod:`qmesh.finops.budgets`) or the ledger rows
(:mod:`qmesh.finops.ledger`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from qmesh.qg.admission import hard_limit_fits
from qmesh.state import StateStore
from qmesh.state.db import Connection

__all__ = ["BudgetTotals", "Key", "Totals"]

Key = tuple[str, float]
"""(budget name, period start)."""
Totals = tuple[float, float, int]
"""(spent, reserved) in USD, and the row's version: every change adds one,
so a Gate applying answers that arrive out of order keeps the newest."""


_READ: Final = (
    "SELECT spent, reserved, version FROM budget_totals WHERE name = ? AND period_start = ?"
)


class BudgetTotals:
    def __init__(self, store: StateStore) -> None:
        self.store = store

    def seed(self, key: Key, spent: float) -> Totals:
        """Create the period's row with ``spent`` (what the ledger says was
        spent before) unless a Gate already did; the row as it is."""
        with self.store._write(announce=False) as conn:
            return _ensure(conn, key, spent)

    def read(self, key: Key) -> Totals | None:
        """The period's row as it is, or None when no Gate made it yet."""
        with self.store._read() as conn:
            row = conn.execute(_READ, key).fetchone()
        return None if row is None else _totals(row)

    def reserve(self, key: Key, amount: float, limit: float | None) -> tuple[bool, Totals]:
        """Hold ``amount`` unless spent + reserved cannot take it under
        ``limit`` (None: no limit) by admission's rule,
        :func:`~qmesh.qg.admission.hard_limit_fits`; whether it was held,
        and the totals."""
        with self.store._write(announce=False) as conn:
            spent, reserved, version = _ensure(conn, key, 0.0)
            if limit is not None and not hard_limit_fits(spent + reserved, amount, limit):
                return False, (spent, reserved, version)
            conn.execute(
                "UPDATE budget_totals SET reserved = reserved + ?, version = version + 1"
                " WHERE name = ? AND period_start = ?",
                (amount, *key),
            )
        return True, (spent, reserved + amount, version + 1)

    def settle(self, key: Key, held: float, actual: float) -> Totals:
        """Release ``held`` and charge ``actual``; the totals after."""
        with self.store._write(announce=False) as conn:
            conn.execute(
                "UPDATE budget_totals SET spent = spent + ?,"
                " reserved = CASE WHEN reserved > ? THEN reserved - ? ELSE 0 END,"
                " version = version + 1 WHERE name = ? AND period_start = ?",
                (actual, held, held, *key),
            )
            row = conn.execute(_READ, key).fetchone()
        return (0.0, 0.0, 0) if row is None else _totals(row)

    def add_spent(self, increments: Mapping[Key, float], keys: list[Key]) -> dict[Key, Totals]:
        """Add local spend, then read every budget's current totals (the
        other Gates' included) in one transaction."""
        with self.store._write(announce=False) as conn:
            for key, amount in increments.items():
                conn.execute(
                    "INSERT INTO budget_totals (name, period_start, spent, reserved)"
                    " VALUES (?, ?, ?, 0) ON CONFLICT (name, period_start)"
                    " DO UPDATE SET spent = budget_totals.spent + excluded.spent,"
                    " version = budget_totals.version + 1",
                    (*key, amount),
                )
            totals: dict[Key, Totals] = {}
            for key in keys:
                row = conn.execute(_READ, key).fetchone()
                if row is not None:
                    totals[key] = _totals(row)
        return totals


def _ensure(conn: Connection, key: Key, spent: float) -> Totals:
    """The period's row, created with ``spent`` if no Gate made it yet."""
    conn.execute(
        "INSERT INTO budget_totals (name, period_start, spent, reserved)"
        " VALUES (?, ?, ?, 0) ON CONFLICT (name, period_start) DO NOTHING",
        (*key, spent),
    )
    return _totals(conn.execute(_READ, key).fetchone())


def _totals(row: Any) -> Totals:
    return float(row[0]), float(row[1]), int(row[2])
