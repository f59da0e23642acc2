"""The FinOps report: where the money went and where it is heading.

For: :func:`build_report` — spend, tokens and requests by app, model and
provider since a time; each budget's spend, burn rate, projection to the
period's end and what is left; the savings from shifting paid work to
local candidates — as a JSON-ready dict, and :func:`format_report` for
the terminal. Read-only: it reads the ledger rows and the configuration.

Not for: enforcing budgets (:mod:`qmesh.finops.budgets` does that live at
the Gate) or verifying the chain (:mod:`qmesh.finops.chain`).
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Sequence
from typing import Any

from qmesh.config import BudgetConfig
from qmesh.finops.budgets import BudgetBook
from qmesh.finops.ledger import read_rows
from qmesh.state import StateStore

__all__ = ["build_report", "format_report"]


def _group(rows: Sequence[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    groups: dict[str, dict[str, Any]] = {}
    for row in rows:
        name = row[key] or "-"
        g = groups.setdefault(
            name, {key: name, "requests": 0, "tokens_in": 0, "tokens_out": 0, "cost_usd": 0.0}
        )
        g["requests"] += 1
        g["tokens_in"] += row["tokens_in"]
        g["tokens_out"] += row["tokens_out"]
        g["cost_usd"] += row["cost_usd"]
    out = sorted(groups.values(), key=lambda g: (-g["cost_usd"], g[key]))
    for g in out:
        g["cost_usd"] = round(g["cost_usd"], 8)
    return out


def build_report(
    store: StateStore, budgets: Sequence[BudgetConfig], *, since: float | None = None
) -> dict[str, Any]:
    now = time.time()
    book = BudgetBook(budgets)
    start = since if since is not None else book.earliest_period_start()
    if not budgets and since is None:
        start = now - 30 * 86_400
    rows = read_rows(store, start)
    for budget in book.budgets.values():
        spent = sum(
            r["cost_usd"]
            for r in rows
            if r["budget"] == budget.name and r["ts"] >= budget.period_start
        )
        budget.spent = spent
        budget.shifted = sum(1 for r in rows if r["budget"] == budget.name and r["shifted_from"])
    shifted = [r for r in rows if r["shifted_from"]]
    return {
        "since": start,
        "until": now,
        "requests": len(rows),
        "cost_usd": round(sum(r["cost_usd"] for r in rows), 8),
        "by_app": _group(rows, "app"),
        "by_model": _group(rows, "model"),
        "by_provider": _group([r for r in rows if r["provider"]], "provider"),
        "budgets": book.views(),
        "savings": {
            "shifted_requests": len(shifted),
            "avoided_usd": round(sum(r["avoided_usd"] for r in shifted), 8),
        },
        "outcomes": {
            outcome: sum(1 for r in rows if r["outcome"] == outcome)
            for outcome in sorted({r["outcome"] for r in rows})
        },
    }


def _when(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M")


def format_report(report: dict[str, Any]) -> str:
    lines = [
        f"qg ledger {_when(report['since'])} .. {_when(report['until'])} UTC: "
        f"{report['requests']} requests, ${report['cost_usd']:.6f}",
        "",
    ]
    for title, key in (("APP", "app"), ("MODEL", "model"), ("PROVIDER", "provider")):
        groups = report[f"by_{key}"]
        if not groups:
            continue
        width = max(len(title), *(len(str(g[key])) for g in groups))
        lines.append(
            f"{title:<{width}}  {'REQUESTS':>8}  {'TOKENS IN':>10}  {'TOKENS OUT':>10}  COST USD"
        )
        for g in groups:
            lines.append(
                f"{g[key]:<{width}}  {g['requests']:>8}  {g['tokens_in']:>10}  "
                f"{g['tokens_out']:>10}  {g['cost_usd']:.6f}"
            )
        lines.append("")
    if report["budgets"]:
        lines.append(
            f"{'BUDGET':<12}  {'MODE':<4}  {'PERIOD':<6}  {'LIMIT':>10}  {'SPENT':>10}  "
            f"{'USED':>6}  {'BURN/H':>10}  {'PROJECTED':>10}  {'LEFT':>10}"
        )
        for b in report["budgets"]:
            used = "-" if b["used_pct"] is None else f"{b['used_pct']:.1f}%"
            flag = "  over projection" if b["projected_usd"] > b["limit_usd"] else ""
            lines.append(
                f"{b['budget']:<12}  {b['mode']:<4}  {b['period']:<6}  {b['limit_usd']:>10.4f}  "
                f"{b['spent_usd']:>10.4f}  {used:>6}  {b['burn_usd_per_hour']:>10.6f}  "
                f"{b['projected_usd']:>10.4f}  {b['remaining_usd']:>10.4f}{flag}"
            )
        lines.append("")
    savings = report["savings"]
    lines.append(
        f"shifted to local: {savings['shifted_requests']} requests, "
        f"${savings['avoided_usd']:.6f} not spent on paid providers"
    )
    return "\n".join(lines)
