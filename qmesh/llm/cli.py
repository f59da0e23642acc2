"""``qmesh route`` and ``qmesh providers …``: the LLM service from the shell.

For: ``route 'qg://…' [--explain] [--json]``, what the router would do:
checking a DSN and seeing the decision, with each candidate's admission
verdict (``hop N``, or ``skipped: why``: the same admission execution runs,
budgets included, so hop 1 is what would serve the request). By default the
router is built here from the configuration (the Gate's skills, measured
now, and the configured providers; no daemons and no cool-downs, which only
a running Gate knows), and the budget of ``--app`` (or the DSN's
``budget=``) is read from the state as the Gates left it; with ``--gate URL``
the running Gate's ``POST /qg/v1/route`` answers instead, with its live
inventory, cool-downs and budgets (the app key comes from ``QMESH_APP_KEY``,
``APP_ID:APP_KEY``, and says whose budget; an https Gate's certificate is
pinned, see :mod:`qmesh.web.admin_client`). And ``providers set-key|list|delete``: the
API keys of remote model providers, sealed with the master key in the data
directory's state store (:mod:`qmesh.llm.provider_keys`), without a running
Gate.

Not for: sending a request (use the OpenAI-compatible API), or parsing
global options and loading the configuration (:mod:`qmesh.cli` does both
and hands the handlers a :class:`Config`). The service's modules are
imported inside the handlers so that ``qmesh --help`` does not pay for them.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import time
from typing import TYPE_CHECKING, Any, Final

from qmesh.cmdline import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, Subcommands, add_command, print_err
from qmesh.web.admin_client import PIN_ENV, CliError, GateApi

if TYPE_CHECKING:
    from qmesh.config import Config
    from qmesh.state import StateStore

__all__ = ["add_commands"]

EXIT_NO_ROUTE: Final = EXIT_FAILURE
"""No candidate can serve the DSN."""


def add_commands(commands: Subcommands, common: argparse.ArgumentParser) -> None:
    route = add_command(commands, common, "route", "show how the Gate would route a qg:// DSN")
    route.add_argument("dsn", help="a qg:// DSN, e.g. 'qg://task=summarize;prefer=speed'")
    route.add_argument(
        "--explain",
        action="store_true",
        help="every candidate: its admission (hop N, or skipped: why) and score",
    )
    route.add_argument("--json", action="store_true", help="print JSON")
    route.add_argument(
        "--app", metavar="APP", help="judge by this app's budget (without --gate; default: none)"
    )
    route.add_argument("--tokens-in", type=int, default=1000, metavar="N")
    route.add_argument("--max-tokens", type=int, default=256, metavar="N")
    route.add_argument(
        "--gate",
        metavar="URL",
        help="ask a running Gate (http(s)://host:port); key in QMESH_APP_KEY",
    )
    route.add_argument(
        "--fingerprint",
        metavar="sha256:HEX",
        help=f"an https Gate's certificate fingerprint (default: ${PIN_ENV})",
    )
    route.set_defaults(handler=_cmd_route)

    providers = add_command(
        commands,
        common,
        "providers",
        "API keys of remote model providers (sealed in the state store)",
    )
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


def _open_store(config: Config) -> StateStore:
    from qmesh.state import StateStore

    return StateStore.open(config.state_location)


# -- route -----------------------------------------------------------------------------


def _remote(args: argparse.Namespace) -> dict[str, Any]:
    token = os.environ.get("QMESH_APP_KEY")
    if not token:
        raise SystemExit("qmesh: error: --gate needs QMESH_APP_KEY=APP_ID:APP_KEY")
    pin = args.fingerprint or os.environ.get(PIN_ENV)
    gate = GateApi(args.gate.rstrip("/"), token, pin)
    body = {"dsn": args.dsn, "tokens_in": args.tokens_in, "max_tokens": args.max_tokens}
    try:
        result: dict[str, Any] = gate.call("POST", "/qg/v1/route", body=body)
    except CliError as exc:
        raise SystemExit(f"qmesh: error: {exc}") from None
    return result


def _local(args: argparse.Namespace, config: Config) -> dict[str, Any]:
    from qmesh.finops.ledger import spent_since
    from qmesh.llm.service import LlmService
    from qmesh.qg.dsn import parse_dsn

    with _open_store(config) as store:
        service = LlmService(config, store, resolve_keys=False)
        dsn = parse_dsn(args.dsn, tasks=service.tasks)
        book = service.book
        try:
            if args.app is not None:
                budget = book.for_app(args.app, dsn.budget)
            else:
                budget = None if dsn.budget is None else book.budgets[dsn.budget]
        except KeyError:
            raise SystemExit(f"qmesh: error: unknown budget {dsn.budget!r}") from None
        except PermissionError as exc:
            raise SystemExit(f"qmesh: error: {exc}") from None
        if budget is not None:
            spent = spent_since(store, budget.period_start).get(budget.name, 0.0)
            book.load(budget, spent)
        explanation = service.router.explain(
            dsn,
            tokens_in=args.tokens_in,
            tokens_out=args.max_tokens,
            budget=book.snapshot(budget),
        )
        out = explanation.as_dict()
        out["skills"] = service.skill_view()
        return out


def _print(result: dict[str, Any], explain: bool) -> None:
    decision = result.get("decision")
    print(f"dsn: {result['dsn']}")
    if result.get("budget") is not None:
        print(
            f"budget: {result['budget']} ({result.get('budget_mode')}, "
            f"{result.get('budget_state')}): {result.get('budget_left_usd'):.6g} USD left"
        )
    if explain:
        rows = result["candidates"]
        width = max([len("CANDIDATE"), *(len(r["candidate"]) for r in rows)])
        print(f"{'CANDIDATE':<{width}}  {'STATUS':<8}  {'SCORE':>12}  {'LAT MS':>9}  ADMISSION")
        for r in rows:
            score = "" if "score" not in r else f"{r['score']:.6g}"
            admission = r.get("admission") or r["reason"] or ""
            print(
                f"{r['candidate']:<{width}}  {r['status']:<8}  {score:>12}  "
                f"{r['expected_latency_ms']:>9.3f}  {admission}"
            )
    if decision:
        print(
            f"choice: {decision['chosen']} ({decision['model']}): {decision['reason']}; "
            f"estimated ${decision['estimated_cost_usd']:.6f}; decided in "
            f"{decision['decision_us']} µs"
        )
        hops = result.get("hops") or [decision["chosen"], *decision["fallbacks"]]
        if len(hops) > 1:
            print(f"then, if it fails: {', '.join(hops[1:])}")
    else:
        print(f"no route: {result.get('error')}")


def _cmd_route(args: argparse.Namespace, config: Config) -> int:
    from qmesh.qg.errors import DsnError

    if args.gate and args.app:
        print_err("error: with --gate the app key (QMESH_APP_KEY) says whose budget, not --app")
        return EXIT_USAGE

    try:
        result = _remote(args) if args.gate else _local(args, config)
    except DsnError as exc:
        print_err(f"error: {exc}")
        return EXIT_USAGE
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print(result, args.explain)
    return EXIT_OK if result.get("decision") else EXIT_NO_ROUTE


# -- providers -------------------------------------------------------------------------


def _cmd_set_key(args: argparse.Namespace, config: Config) -> int:
    from qmesh.llm.provider_keys import store_key
    from qmesh.masterkey import load_master_key

    if sys.stdin.isatty():
        value = getpass.getpass(f"API key for {args.name} (not echoed): ")
    else:
        value = sys.stdin.read()
    master_key = load_master_key(config)
    with _open_store(config) as store:
        store_key(store, master_key, args.name, value.strip())
    print(f'stored the API key {args.name!r}; use api_key = "store:{args.name}"')
    return EXIT_OK


def _cmd_list_keys(args: argparse.Namespace, config: Config) -> int:
    from qmesh.llm.provider_keys import list_keys

    with _open_store(config) as store:
        keys = list_keys(store)
    if not keys:
        print("no provider keys stored (see `qmesh providers set-key --help`)")
    for name, updated in keys:
        print(f"{name}  updated {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(updated))} UTC")
    return EXIT_OK


def _cmd_delete_key(args: argparse.Namespace, config: Config) -> int:
    from qmesh.llm.provider_keys import delete_key

    with _open_store(config) as store:
        if not delete_key(store, args.name):
            print_err(f"error: no stored key {args.name!r}")
            return EXIT_USAGE
    print(f"deleted the API key {args.name!r}")
    return EXIT_OK
