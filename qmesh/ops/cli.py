"""``qmesh sessions`` and ``qmesh sessions kill NAME|SESSION_ID``: the running
Gate's live tunnel sessions, and ending them without revoking anything.

For: asking a Gate's ``GET /api/sessions`` and ``POST /api/sessions/kill``
with the admin key (which Gate, key and pin: :mod:`qmesh.web.admin_client`).
A killed edge may connect again at once; to keep it out, ``qmesh revoke NAME`` (which also ends its
sessions within a second).

Not for: the sessions themselves (:mod:`qmesh.tunnel.server`).
"""

from __future__ import annotations

import argparse
import datetime
import json
from typing import TYPE_CHECKING, Any

from qmesh.cmdline import EXIT_FAILURE, EXIT_OK, Subcommands, add_command, print_err
from qmesh.web.admin_client import CliError, GateApi, add_gate_options

if TYPE_CHECKING:
    from qmesh.config import Config

__all__ = ["add_commands", "format_sessions"]

_COLUMNS = ("SESSION", "PEER", "ROLE", "ADDRESS", "SINCE", "STREAMS", "BYTES IN/OUT", "RESUMED")


def add_commands(commands: Subcommands, common: argparse.ArgumentParser) -> None:
    sessions = add_command(
        commands, common, "sessions", "the running Gate's live tunnel sessions; 'kill' ends them"
    )
    sessions.add_argument("--json", action="store_true", help="print the Gate's JSON")
    add_gate_options(sessions)
    sessions.set_defaults(handler=cmd_sessions, target=None)
    sub = sessions.add_subparsers(dest="sessions_command", metavar="COMMAND")
    kill = sub.add_parser(
        "kill",
        help="end an identity's sessions, or one session, without revoking",
        description="End every live session of identity NAME, or the session whose id "
        "starts with SESSION_ID (8 hex digits or more). The edge may connect again.",
    )
    kill.add_argument("target", metavar="NAME|SESSION_ID")
    kill.add_argument("--json", action="store_true", help="print the Gate's JSON")
    add_gate_options(kill)
    kill.set_defaults(handler=cmd_sessions)


def _since(ts: object) -> str:
    if not isinstance(ts, int | float):
        return "-"
    moment = datetime.datetime.fromtimestamp(ts, datetime.UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def format_sessions(sessions: list[dict[str, Any]]) -> str:
    rows = [_COLUMNS] + [
        (
            str(s.get("session", "")),
            str(s.get("peer", "")),
            str(s.get("role", "")),
            str(s.get("address") or "-") + ("" if s.get("attached") else " (detached)"),
            _since(s.get("since")),
            str(s.get("streams", 0)),
            f"{s.get('bytes_received', 0)}/{s.get('bytes_sent', 0)}",
            str(s.get("resumptions", 0)),
        )
        for s in sessions
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    if not sessions:
        lines.append("(no live sessions)")
    return "\n".join(line.rstrip() for line in lines)


def cmd_sessions(args: argparse.Namespace, config: Config) -> int:
    try:
        gate = GateApi.from_args(args, config)
        if args.target is None:
            data = gate.call("GET", "/api/sessions")
            sessions = data.get("sessions") if isinstance(data, dict) else None
            if not isinstance(sessions, list):
                raise CliError(
                    f"{gate.base}/api/sessions did not answer with sessions", EXIT_FAILURE
                )
            print(json.dumps(data, indent=2) if args.json else format_sessions(sessions))
            return EXIT_OK
        data = gate.call("POST", "/api/sessions/kill", body={"target": args.target})
        ended = data.get("ended") if isinstance(data, dict) else None
        if not isinstance(ended, list):
            raise CliError(f"{gate.base}/api/sessions/kill did not say what it ended", EXIT_FAILURE)
        if args.json:
            print(json.dumps(data, indent=2))
        else:
            for session in ended:
                print(f"ended session {session.get('session')} of {session.get('peer')}")
        return EXIT_OK
    except CliError as exc:
        print_err(f"error: {exc}")
        return exc.status
