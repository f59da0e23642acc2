"""``qmesh gates``: the Gates of the cluster, read from the shared state.

For: one line per Gate that ever registered in the state this command's
configuration points at (``gate.database_url``, else ``DATA_DIR``): its
name, state (live, gone, stopped), tunnel and HTTP addresses, host, since
when it runs, its edge sessions and the age of its last heartbeat.
``--json`` prints the same as a list of objects. Reads only.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import TYPE_CHECKING

from qmesh.cmdline import EXIT_OK, EXIT_USAGE, Subcommands, add_command, iso_seconds, print_err

if TYPE_CHECKING:
    from qmesh.config import Config

__all__ = ["add_commands"]

_HEADER = ("NAME", "STATE", "TUNNEL", "HTTP", "HOST", "SINCE", "SESSIONS", "HEARTBEAT")


def add_commands(commands: Subcommands, common: argparse.ArgumentParser) -> None:
    gates = add_command(
        commands, common, "gates", "the Gates sharing this state: live, gone or stopped"
    )
    gates.add_argument("--json", action="store_true", help="print JSON")
    gates.set_defaults(handler=_cmd_gates)
    actions = gates.add_subparsers(dest="gates_command", metavar="COMMAND")
    drain = actions.add_parser(
        "drain",
        parents=[common],
        help="ask a live Gate to drain: it takes no new sessions or requests, sends its edges to "
        "the other Gates and lets requests in flight finish (then stop it)",
    )
    drain.add_argument("name")
    drain.set_defaults(handler=_cmd_drain)


def _cmd_gates(args: argparse.Namespace, config: Config) -> int:
    from qmesh.cluster.registry import list_gates
    from qmesh.state import StateStore

    if config.gate.database_url is None and not config.state_db_path.exists():
        print_err(f"error: no state at {config.state_db_path} (a Gate creates it on first start)")
        return EXIT_USAGE
    with StateStore.open(config.state_location) as store:
        gates = list_gates(store)
    now = time.time()
    if args.json:
        print(json.dumps([g.to_json(now) for g in gates]))
        return EXIT_OK
    if not gates:
        print("no Gate has registered in this state yet")
        return EXIT_OK
    rows = [
        (
            g.name,
            g.state(now),
            g.tunnel,
            g.http,
            g.host,
            iso_seconds(g.started_at) or "",
            str(g.sessions) if g.state(now) in ("live", "draining") else "-",
            f"{max(0.0, now - g.heartbeat_at):.1f} s ago",
        )
        for g in gates
    ]
    widths = [max(len(row[i]) for row in (_HEADER, *rows)) for i in range(len(_HEADER))]
    for row in (_HEADER, *rows):
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    return EXIT_OK


def _cmd_drain(args: argparse.Namespace, config: Config) -> int:
    from qmesh.cluster.registry import request_drain
    from qmesh.finops.control import open_answerable

    with open_answerable(config) as store:
        asked = request_drain(store, args.name)
    if not asked:
        print_err(f"error: no live Gate named {args.name!r} (see `qmesh gates`)")
        return EXIT_USAGE
    print(f"asked gate {args.name!r} to drain: it does at its next heartbeat; "
          "`qmesh gates` shows it draining, then stop it")  # fmt: skip
    return EXIT_OK
