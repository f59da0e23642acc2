"""``qmesh pg pools``: the running Gate's Postgres pools (transaction mode).

For: asking the Gate's ``GET /api/pg/pools`` with an operator key (which
Gate, key and pin: :mod:`qmesh.web.admin_client`) and printing one line per
pool: its app and alias, size, connections open, idle and lent, clients
waiting now and the longest wait, and the totals since the Gate started.

Not for: the pools themselves (:mod:`qmesh.pg.pool`).
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from qmesh.cmdline import EXIT_FAILURE, EXIT_OK, Subcommands, add_command, print_err
from qmesh.web.admin_client import CliError, GateApi, add_gate_options

if TYPE_CHECKING:
    from qmesh.config import Config

__all__ = ["add_commands", "format_pools"]

_COLUMNS = ("APP", "ALIAS", "SIZE", "OPEN", "IDLE", "LENT", "WAITING", "LONGEST WAIT",
            "WAITS", "AVG WAIT", "TIMEOUTS", "OPENED", "CLOSED", "ENGINE LOANS")  # fmt: skip


def add_commands(commands: Subcommands, common: argparse.ArgumentParser) -> None:
    pg = add_command(commands, common, "pg", "the running Gate's Postgres path")
    sub = pg.add_subparsers(dest="pg_command", metavar="COMMAND", required=True)
    pools = sub.add_parser(
        "pools",
        help="server connection pools (apps in transaction mode): use, queue and waits",
        description="One line per pool of the running Gate: server connections open, idle "
        "and lent, clients waiting and for how long, and 53300 refusals.",
    )
    pools.add_argument("--json", action="store_true", help="print the Gate's JSON")
    add_gate_options(pools)
    pools.set_defaults(handler=_cmd_pools)


def format_pools(pools: list[dict[str, Any]]) -> str:
    rows: list[tuple[str, ...]] = [_COLUMNS]
    for p in pools:
        waits = int(p.get("waits", 0))
        average = float(p.get("wait_s_total", 0.0)) / waits if waits else 0.0
        rows.append(
            (
                str(p.get("app_id", "")),
                str(p.get("alias", "")),
                *(str(p.get(k, 0)) for k in ("size", "open", "idle", "lent", "waiting")),
                f"{float(p.get('longest_wait_s', 0.0)) * 1000:.0f} ms",
                str(waits),
                f"{average * 1000:.0f} ms",
                *(str(p.get(k, 0)) for k in ("timeouts", "opened", "closed", "engine_loans")),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    if not pools:
        lines.append("(no pools: no app in transaction mode has connected since the Gate started)")
    return "\n".join(line.rstrip() for line in lines)


def _cmd_pools(args: argparse.Namespace, config: Config) -> int:
    try:
        gate = GateApi.from_args(args, config)
        data = gate.call("GET", "/api/pg/pools")
        pools = data.get("pools") if isinstance(data, dict) else None
        if not isinstance(pools, list):
            raise CliError(f"{gate.base}/api/pg/pools did not answer with pools", EXIT_FAILURE)
        print(json.dumps(data, indent=2) if args.json else format_pools(pools))
        return EXIT_OK
    except CliError as exc:
        print_err(f"error: {exc}")
        return exc.status
