"""``qmesh finops …``, ``qmesh ledger verify`` and ``qmesh providers …``:
the books and provider keys from the shell, on the data directory's state
store (like ``qmesh apps``), without a running Gate.

For: ``finops report [--json] [--days N]`` (spend by app/model/provider,
budgets' burn-down and projection, savings from shifting), ``finops
budgets`` (the configured budgets' state), ``ledger verify`` (the hash
chains of the ledger and the qg audit trail: exit 1 on any problem) — also
reachable as ``qmesh audit verify`` — and ``providers set-key|list|delete``.

Not for: parsing global options or loading the configuration
(:mod:`qmesh.cli` does both and hands the handlers a :class:`Config`).
"""

from __future__ import annotations

import argparse
import getpass
import json
import sqlite3
import sys
import time
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from qmesh.config import Config
    from qmesh.state import StateStore

__all__ = ["add_commands", "cmd_verify"]

EXIT_OK: Final = 0
EXIT_PROBLEMS: Final = 1
EXIT_USAGE: Final = 2


def add_commands(
    finops: argparse.ArgumentParser,
    ledger: argparse.ArgumentParser,
    providers: argparse.ArgumentParser,
    common: argparse.ArgumentParser,
) -> None:
    commands = finops.add_subparsers(dest="finops_command", metavar="COMMAND", required=True)
    report = commands.add_parser(
        "report", parents=[common], help="spend by app/model/provider, budgets, savings"
    )
    report.add_argument("--json", action="store_true", help="print JSON")
    report.add_argument(
        "--days", type=float, metavar="N", help="the last N days (default: the budgets' periods)"
    )
    report.set_defaults(handler=_cmd_report)
    budgets = commands.add_parser("budgets", parents=[common], help="the budgets' state")
    budgets.add_argument("--json", action="store_true", help="print JSON")
    budgets.set_defaults(handler=_cmd_budgets)

    ledger_commands = ledger.add_subparsers(dest="ledger_command", metavar="COMMAND", required=True)
    verify = ledger_commands.add_parser(
        "verify", parents=[common], help="check the ledger's and the qg audit trail's hash chains"
    )
    verify.add_argument("--json", action="store_true", help="print JSON")
    verify.set_defaults(handler=cmd_verify)

    keys = providers.add_subparsers(dest="providers_command", metavar="COMMAND", required=True)
    set_key = keys.add_parser(
        "set-key",
        parents=[common],
        help="store a provider's API key (read from stdin), sealed with the master key",
    )
    set_key.add_argument("name", help='the NAME of api_key = "store:NAME" in [[gate.providers]]')
    set_key.set_defaults(handler=_cmd_set_key)
    listing = keys.add_parser("list", parents=[common], help="names with a stored key")
    listing.set_defaults(handler=_cmd_list_keys)
    delete = keys.add_parser("delete", parents=[common], help="remove a stored key")
    delete.add_argument("name")
    delete.set_defaults(handler=_cmd_delete_key)


def _store(config: Config) -> StateStore:
    from qmesh.state import StateStore

    return StateStore.open(config.state_db_path)


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
    from qmesh.finops.chain import CHAINS, chain_key_path, load_chain_key, verify_chain

    db = config.state_db_path
    if not db.exists():
        print(f"qmesh: error: no state database at {db}", file=sys.stderr)
        return EXIT_USAGE
    _store(config).close()  # brings the schema up to date
    try:
        key = load_chain_key(db, create=False)
    except FileNotFoundError:
        print(
            f"qmesh: error: no chain key at {chain_key_path(db)}: nothing was ever written, "
            "or the key was lost (then the chains cannot be verified)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
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


def _cmd_set_key(args: argparse.Namespace, config: Config) -> int:
    from qmesh.llm.provider_keys import store_key
    from qmesh.pg.masterkey import load_master_key

    if sys.stdin.isatty():
        value = getpass.getpass(f"API key for {args.name} (not echoed): ")
    else:
        value = sys.stdin.read()
    master_key = load_master_key(config)
    with _store(config) as store:
        store_key(store, master_key, args.name, value.strip())
    print(f'stored the API key {args.name!r}; use api_key = "store:{args.name}"')
    return EXIT_OK


def _cmd_list_keys(args: argparse.Namespace, config: Config) -> int:
    from qmesh.llm.provider_keys import list_keys

    with _store(config) as store:
        keys = list_keys(store)
    if not keys:
        print("no provider keys stored (see `qmesh providers set-key --help`)")
    for name, updated in keys:
        print(f"{name}  updated {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(updated))} UTC")
    return EXIT_OK


def _cmd_delete_key(args: argparse.Namespace, config: Config) -> int:
    from qmesh.llm.provider_keys import delete_key

    with _store(config) as store:
        if not delete_key(store, args.name):
            print(f"qmesh: error: no stored key {args.name!r}", file=sys.stderr)
            return EXIT_USAGE
    print(f"deleted the API key {args.name!r}")
    return EXIT_OK
