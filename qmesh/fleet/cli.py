"""``qmesh inventory`` and ``qmesh models``: the running Gate's fleet in a terminal.

For: ``qmesh inventory [--json] [--watch]`` asks a Gate's ``GET
/api/inventory`` (daemons and the services its scans found) and prints a
table, the JSON, or a table redrawn in place every ``--interval`` seconds
until Ctrl-C; ``--scan`` asks for a scan first and waits for it. ``qmesh
models`` lists every daemon's models with their state, and ``qmesh models
stop|start|unload MODEL [--node NODE]`` takes one out of service (the
router sends its work to an equivalent, or answers 503 saying why), puts it
back, or frees its memory (``POST /api/models/...``). Which Gate, and with
which key and pin: see :mod:`qmesh.web.admin_client`.

Not for: the inventory itself (:mod:`qmesh.fleet.inventory`) or its HTTP
handlers (:mod:`qmesh.fleet.api`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import urllib.parse
from typing import TYPE_CHECKING, Any, Final

from qmesh.cmdline import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, Subcommands, add_command, print_err
from qmesh.web.admin_client import CliError, GateApi, add_gate_options

if TYPE_CHECKING:
    from qmesh.config import Config

__all__ = ["add_commands"]

_STATES: Final = ("fresh", "stale", "gone")
_COLOURS: Final = {"fresh": "32", "stale": "33", "gone": "90"}
_CLEAR: Final = "\x1b[H\x1b[J"
_MODEL_OPERATIONS: Final = {
    "stop": "take a model out of service: new requests go to an equivalent model or get a "
    "503 that says why; running ones finish; then it leaves memory. It stays stopped, "
    "across daemon restarts, until 'start'",
    "start": "put a stopped model back in service (it loads on its next request)",
    "unload": "free a model's memory now, after its running requests (it loads again "
    "on its next request)",
}
"""Cursor home, then clear to the end: the table redraws in place."""


def add_commands(commands: Subcommands, common: argparse.ArgumentParser) -> None:
    inventory = add_command(
        commands, common, "inventory", "the running Gate's nodes, models and discovered services"
    )
    inventory.add_argument("--json", action="store_true", help="print the Gate's JSON")
    inventory.add_argument(
        "--watch", action="store_true", help="redraw the table in place until Ctrl-C"
    )
    inventory.add_argument(
        "--interval", type=float, default=2.0, metavar="S", help="--watch period (default 2)"
    )
    inventory.add_argument("--kind", help="only this kind (daemon, ollama, openai, postgres, …)")
    inventory.add_argument("--state", choices=_STATES, help="only entries in this state")
    inventory.add_argument("--model", metavar="ID", help="only entries with this model")
    inventory.add_argument("--scan", action="store_true", help="scan the targets first and wait")
    add_gate_options(inventory)
    inventory.set_defaults(handler=cmd_inventory)

    models = add_command(
        commands, common, "models", "the daemons' models; 'stop', 'start', 'unload' one"
    )
    models.add_argument("--json", action="store_true", help="print the Gate's JSON")
    add_gate_options(models)
    models.set_defaults(handler=cmd_models, operation=None)
    operations = models.add_subparsers(dest="models_command", metavar="COMMAND")
    for operation, help_text in _MODEL_OPERATIONS.items():
        command = operations.add_parser(operation, help=help_text, description=help_text)
        command.add_argument("model", metavar="MODEL", help="the model's id (qmesh models)")
        command.add_argument("--node", help="only on this daemon (default: every daemon with it)")
        command.add_argument("--json", action="store_true", help="print the Gate's JSON")
        add_gate_options(command)
        command.set_defaults(handler=cmd_models, operation=operation)


def fetch(args: argparse.Namespace, gate: GateApi) -> dict[str, Any]:
    query = {k: v for k in ("kind", "state", "model") if (v := getattr(args, k, None))}
    path = "/api/inventory"
    if query:
        path += "?" + urllib.parse.urlencode(query)
    data = gate.call("GET", path)
    if not isinstance(data, dict) or not isinstance(data.get("nodes"), list):
        raise CliError(f"{gate.base}{path} did not answer with an inventory", EXIT_FAILURE)
    return data


# -- the table -------------------------------------------------------------------------------


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 90:
        return f"{seconds:.1f}s" if seconds < 10 else f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _models(node: dict[str, Any]) -> str:
    models = [m for m in node.get("models") or () if isinstance(m, dict)]
    if not models:
        return "-"
    parts = []
    for m in models[:3]:
        quant = f" {m['quantization']}" if m.get("quantization") else ""
        mark = "*" if m.get("state") == "loaded" else ""
        parts.append(f"{m.get('id')}{quant}{mark}")
    more = f" +{len(models) - 3}" if len(models) > 3 else ""
    return ", ".join(parts) + more


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


def format_table(data: dict[str, Any], *, colour: bool = False, width: int = 120) -> str:
    nodes = [n for n in data["nodes"] if isinstance(n, dict)]
    if not nodes:
        return "no inventory entries (no daemon has reported and no scan found anything)"
    rows = []
    for n in nodes:
        extra = n.get("extra") or {}
        software = " ".join(str(x) for x in (extra.get("server"), n.get("version")) if x)
        seen = None if n.get("kind") == "absent" else n.get("seconds_since_seen")
        rows.append(
            [
                str(n.get("name")),
                str(n.get("kind")),
                str(n.get("state")),
                f"via {n['gate']}" if n.get("gate") else str(n.get("source")),
                software or "-",
                _models(n),
                _ago(seen),
                str(n.get("reason") or ""),
            ]
        )
    head = ["NAME", "KIND", "STATE", "SOURCE", "SOFTWARE", "MODELS (* loaded)", "SEEN", "REASON"]
    widths = [max(len(head[i]), *(len(r[i]) for r in rows)) for i in range(len(head) - 1)]
    widths[4] = min(widths[4], 28)
    widths[5] = min(widths[5], 44)
    used = sum(widths) + 2 * (len(widths))
    reason_width = max(width - used, 20)
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, [*widths, 0], strict=True)).rstrip()]
    for row in rows:
        cells = [_cut(c, w).ljust(w) for c, w in zip(row[:-1], widths, strict=True)]
        if colour:
            code = _COLOURS.get(row[2])
            if code:
                cells[2] = f"\x1b[{code}m{cells[2]}\x1b[0m"
        lines.append("  ".join([*cells, _cut(row[-1], reason_width)]).rstrip())
    counts = {s: sum(1 for n in nodes if n.get("state") == s) for s in _STATES}
    lines.append("")
    lines.append(
        f"{len(nodes)} entries: {counts['fresh']} fresh, {counts['stale']} stale, "
        f"{counts['gone']} gone"
    )
    return "\n".join(lines)


def format_models(data: dict[str, Any]) -> str:
    """One row per (daemon, model) of an inventory."""
    head = ("NODE", "MODEL", "QUANT", "STATE", "QUEUE", "ACTIVE", "NODE STATE")
    rows = [
        (
            str(node.get("name")),
            str(model.get("id")),
            str(model.get("quantization") or "-"),
            "stopped" if model.get("stopped") else str(model.get("state")),
            str(model.get("queue_depth", 0)),
            str(model.get("active", 0)),
            str(node.get("state")),
        )
        for node in data["nodes"]
        if isinstance(node, dict) and node.get("kind") == "daemon"
        for model in node.get("models") or ()
        if isinstance(model, dict)
    ]
    if not rows:
        return "no daemon reports a model"
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in (head, *rows)
    )


def format_operation(answer: dict[str, Any]) -> str:
    lines = []
    for result in answer.get("nodes") or ():
        if not result.get("ok"):
            lines.append(f"{result.get('node')}: failed: {result.get('error')}")
            continue
        state = "stopped" if result.get("stopped") else "in service"
        lines.append(f"{result.get('node')}: {answer.get('model')} {state} ({result.get('state')})")
    return "\n".join(lines)


# -- the commands ------------------------------------------------------------------------------


def cmd_models(args: argparse.Namespace, config: Config) -> int:
    from qmesh.fleet.daemons import CONTROL_TIMEOUT_S  # the Gate side: only when asked for

    try:
        gate = GateApi.from_args(args, config)
        if args.operation is None:
            args.kind = "daemon"
            data = fetch(args, gate)
            print(json.dumps(data, indent=2) if args.json else format_models(data))
            return EXIT_OK
        body = {"model": args.model, **({"node": args.node} if args.node else {})}
        # Stopping waits for the running requests: as long as the Gate waits, and a little more.
        path = f"/api/models/{args.operation}"
        answer = gate.call("POST", path, body=body, timeout=CONTROL_TIMEOUT_S + 30)
        results = answer.get("nodes") if isinstance(answer, dict) else None
        if not isinstance(results, list) or not all(isinstance(r, dict) for r in results):
            raise CliError(f"{gate.base}{path} did not answer with a result per node", EXIT_FAILURE)
        print(json.dumps(answer, indent=2) if args.json else format_operation(answer))
        return EXIT_OK if all(r.get("ok") for r in results) else EXIT_FAILURE
    except CliError as exc:
        print_err(f"error: {exc}")
        return exc.status


def cmd_inventory(args: argparse.Namespace, config: Config) -> int:
    try:
        gate = GateApi.from_args(args, config)
        if args.scan:
            gate.call("POST", "/api/discovery/scan", timeout=600)
        if not args.watch:
            data = fetch(args, gate)
            if args.json:
                print(json.dumps(data, indent=2))
            else:
                print(format_table(data, colour=sys.stdout.isatty(), width=_width()))
            return EXIT_OK
        return _watch(args, gate)
    except CliError as exc:
        print_err(f"error: {exc}")
        return exc.status


def _width() -> int:
    # Piped into another program: whole reasons, however wide.
    if not sys.stdout.isatty():
        return 10_000
    return shutil.get_terminal_size((140, 40)).columns


def _watch(args: argparse.Namespace, gate: GateApi) -> int:
    interval = max(float(args.interval), 0.2)
    try:
        while True:
            try:
                data = fetch(args, gate)
                body = (
                    json.dumps(data, indent=2)
                    if args.json
                    else format_table(data, colour=sys.stdout.isatty(), width=_width())
                )
            except CliError as exc:
                if exc.status == EXIT_USAGE:
                    raise
                body = f"qmesh: {exc} (retrying every {interval:g}s)"
            stamp = time.strftime("%H:%M:%S")
            sys.stdout.write(f"{_CLEAR}{gate.base}  {stamp}  every {interval:g}s, Ctrl-C stops\n\n")
            sys.stdout.write(body + "\n")
            sys.stdout.flush()
            time.sleep(interval)
    except KeyboardInterrupt:
        return EXIT_OK
