"""``qmesh finops …`` and ``qmesh ledger verify``: the books from the shell,
on the data directory's state store (like ``qmesh apps``), without a
running Gate.

For: ``finops report [--json] [--days N]`` (spend by app/model/provider,
budgets' burn-down and projection, savings from shifting), ``finops
budgets`` (the configured budgets' state), ``ledger verify`` (the hash
chains of the ledger and the qg audit trail: exit 1 on any problem) — also
reachable as ``qmesh audit verify``.

Not for: provider API keys (``qmesh providers``, :mod:`qmesh.llm.cli`), or
parsing global options and loading the configuration (:mod:`qmesh.cli` does
both and hands the handlers a :class:`Config`).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import TYPE_CHECKING, Final

import attrs

from qmesh.cmdline import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, Subcommands, add_command, print_err

if TYPE_CHECKING:
    from qmesh.config import Config
    from qmesh.state import StateStore

__all__ = ["add_commands", "cmd_verify"]

EXIT_PROBLEMS: Final = EXIT_FAILURE
"""A hash chain is broken."""


def add_commands(commands: Subcommands, common: argparse.ArgumentParser) -> None:
    finops = add_command(
        commands, common, "finops", "spend, budgets and savings from the Gate's request ledger"
    )
    finops_commands = finops.add_subparsers(dest="finops_command", metavar="COMMAND", required=True)
    report = finops_commands.add_parser(
        "report", parents=[common], help="spend by app/model/provider, budgets, savings"
    )
    report.add_argument("--json", action="store_true", help="print JSON")
    report.add_argument(
        "--days", type=float, metavar="N", help="the last N days (default: the budgets' periods)"
    )
    report.set_defaults(handler=_cmd_report)
    budgets = finops_commands.add_parser("budgets", parents=[common], help="the budgets' state")
    budgets.add_argument("--json", action="store_true", help="print JSON")
    budgets.set_defaults(handler=_cmd_budgets)

    ledger = add_command(
        commands, common, "ledger", "verify the request ledger's and qg audit trail's hash chains"
    )
    ledger_commands = ledger.add_subparsers(dest="ledger_command", metavar="COMMAND", required=True)
    verify = ledger_commands.add_parser(
        "verify", parents=[common], help="check the ledger's and the qg audit trail's hash chains"
    )
    verify.add_argument("--json", action="store_true", help="print JSON")
    verify.set_defaults(handler=cmd_verify)
    prompts = ledger_commands.add_parser(
        "prompts", parents=[common],
        help="what the ledger kept of prompts and answers (apps whose policy has llm.keep)",
    )  # fmt: skip
    prompts.add_argument("--app", metavar="APP", help="only this app's")
    prompts.add_argument("--limit", type=int, default=50, metavar="N", help="newest N (default 50)")
    prompts.add_argument("--json", action="store_true", help="print JSON")
    prompts.set_defaults(handler=_cmd_prompts)


def _cmd_prompts(args: argparse.Namespace, config: Config) -> int:
    from qmesh.finops.ledger import read_prompts

    with _store(config) as store:
        kept = read_prompts(store, app=args.app, limit=args.limit)
    if args.json:
        print(json.dumps([attrs.asdict(k) for k in kept], indent=2, ensure_ascii=False))
        return EXIT_OK
    if not kept:
        print("nothing kept (an app's policy chooses: qmesh apps policy APP --llm-keep hash|text)")
        return EXIT_OK
    for k in kept:
        print(f"{k.request_id}  {k.app}  {k.kept}\n  prompt: {k.prompt[:200]}\n"
              f"  answer: {k.answer[:200]}")  # fmt: skip
    return EXIT_OK


def _store(config: Config) -> StateStore:
    from qmesh.state import StateStore

    return StateStore.open(config.state_location)


def _cmd_report(args: argparse.Namespace, config: Config) -> int:
    from qmesh.finops.report import build_report, format_report

    since = None if args.days is None else time.time() - args.days * 86_400
    with _store(config) as store:
        report = build_report(store, config.gate.budgets, since=since)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return EXIT_OK


def _cmd_budgets(args: argparse.Namespace, config: Config) -> int:
    from qmesh.finops.report import build_report

    with _store(config) as store:
        report = build_report(store, config.gate.budgets)
    if args.json:
        print(json.dumps(report["budgets"], indent=2))
        return EXIT_OK
    if not report["budgets"]:
        print("no budgets configured (see [[gate.budgets]] in docs/qg.md)")
    for b in report["budgets"]:
        print(
            f"{b['budget']}: ${b['spent_usd']:.4f} of ${b['limit_usd']:.4f} "
            f"({b['mode']}, per {b['period']}), projected ${b['projected_usd']:.4f}"
        )
    return EXIT_OK


def cmd_verify(args: argparse.Namespace, config: Config) -> int:
    """Verify both chains; exit 1 and name each problem when any is found."""
    from qmesh.finops.chain import CHAINS, ChainKeyMissing, load_chain_key, verify_chain
    from qmesh.masterkey import load_master_key

    if config.gate.database_url is None and not config.state_db_path.exists():
        print_err(f"error: no state database at {config.state_db_path}")
        return EXIT_USAGE
    with _store(config) as store:  # brings the schema up to date
        master_key = None if store.dialect == "sqlite" else load_master_key(config)
        try:
            key = load_chain_key(store, master_key=master_key, create=False)
        except ChainKeyMissing as exc:
            print_err(f"error: {exc}")
            return EXIT_USAGE
        with store._read() as conn:
            reports = [verify_chain(conn, key, chain) for chain in CHAINS]
    if getattr(args, "json", False):
        print(
            json.dumps(
                [
                    {
                        "chain": r.chain,
                        "rows": r.rows,
                        "ok": r.ok,
                        "problems": [{"id": p.row_id, "problem": p.problem} for p in r.problems],
                    }
                    for r in reports
                ],
                indent=2,
            )
        )
    else:
        for r in reports:
            state = "ok" if r.ok else f"{len(r.problems)} problem(s)"
            print(f"{r.chain}: {r.rows} rows, {state}")
            for p in r.problems:
                where = "head" if p.row_id is None else f"row {p.row_id}"
                print(f"  {where}: {p.problem}")
    return EXIT_OK if all(r.ok for r in reports) else EXIT_PROBLEMS
