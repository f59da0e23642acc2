"""``qmesh operators add|list|set-role|remove``: named operator keys with roles.

For: the people and jobs that run a Gate — a Prometheus job (``metrics``),
an on-call engineer's dashboard (``viewer``), whoever ends sessions and
stops models (``operator``), and ``admin``. An operator is an app of the
state store with a role (:mod:`qmesh.operator_roles` lists each role's
rights), so its key is made, shown once, rotated (``qmesh apps rotate-key``),
disabled and enabled as an app's is, and every running Gate follows a change
within a second. A key is sent as ``Authorization: Bearer NAME:KEY``.

Not for: applications (``qmesh apps``) or how keys are checked
(:mod:`qmesh.web.auth`).
"""

from __future__ import annotations

import argparse
import json

from qmesh.cmdline import EXIT_OK, EXIT_USAGE, Subcommands, add_command, iso_seconds, print_err
from qmesh.config import Config
from qmesh.finops.control import open_answerable
from qmesh.operator_roles import OPERATOR_ROLES, describe_role
from qmesh.state import StateStore

__all__ = ["add_commands"]


def add_commands(commands: Subcommands, common: argparse.ArgumentParser) -> None:
    operators = add_command(commands, common, "operators", "manage operator keys and their roles")
    sub = operators.add_subparsers(dest="operators_command", metavar="COMMAND", required=True)
    add = sub.add_parser(
        "add", parents=[common], help="create an operator and print its key (shown once)"
    )
    add.add_argument("name")
    add.add_argument("--role", choices=OPERATOR_ROLES, required=True)
    add.set_defaults(handler=_cmd_add)
    listing = sub.add_parser("list", parents=[common], help="list operators and their rights")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(handler=_cmd_list)
    set_role = sub.add_parser(
        "set-role", parents=[common], help="change an operator's role (at once, on every Gate)"
    )
    set_role.add_argument("name")
    set_role.add_argument("role", choices=OPERATOR_ROLES)
    set_role.set_defaults(handler=_cmd_set_role)
    remove = sub.add_parser(
        "remove", parents=[common], help="delete an operator: its key stops working at once"
    )
    remove.add_argument("name")
    remove.set_defaults(handler=_cmd_remove)


def _open_store(config: Config) -> StateStore:
    return StateStore.open(config.state_location)


def _cmd_add(args: argparse.Namespace, config: Config) -> int:
    with open_answerable(config) as store:
        key = store.add_app(args.name, role=args.role)
    print(f"{args.name}:{key}")
    print_err(
        f"created operator {args.name!r} ({describe_role(args.role)}); the bearer token above "
        "is shown only once: send it as 'Authorization: Bearer TOKEN'"
    )
    return EXIT_OK


def _cmd_list(args: argparse.Namespace, config: Config) -> int:
    with _open_store(config) as store:
        operators = [a for a in store.list_apps() if a.role is not None]
    if args.json:
        print(json.dumps([
            {"name": a.app_id, "role": a.role, "created_at": iso_seconds(a.created_at),
             "disabled": a.disabled}
            for a in operators
        ]))  # fmt: skip
        return EXIT_OK
    if not operators:
        print("no operators (see `qmesh operators add --help`)")
        return EXIT_OK
    width = max(len("NAME"), *(len(a.app_id) for a in operators))
    print(f"{'NAME':<{width}}  {'STATUS':<8}  {'CREATED':<20}  RIGHTS")
    for a in operators:
        status = "disabled" if a.disabled else "active"
        print(f"{a.app_id:<{width}}  {status:<8}  {iso_seconds(a.created_at):<20}  "
              f"{describe_role(a.role)}")  # fmt: skip
    return EXIT_OK


def _operator_exists(store: StateStore, name: str) -> bool:
    keys = store.get_app_keys(name)
    return keys is not None and keys.role is not None


def _cmd_set_role(args: argparse.Namespace, config: Config) -> int:
    with open_answerable(config) as store:
        if not _operator_exists(store, args.name):
            print_err(f"no operator named {args.name!r} (an application is not made one here)")
            return EXIT_USAGE
        changed = store.set_app_role(args.name, args.role)
    print(
        f"operator {args.name!r}: {describe_role(args.role)}" + ("" if changed else " (unchanged)")
    )
    return EXIT_OK


def _cmd_remove(args: argparse.Namespace, config: Config) -> int:
    with open_answerable(config) as store:
        if not _operator_exists(store, args.name):
            print_err(f"no operator named {args.name!r}")
            return EXIT_USAGE
        store.delete_app(args.name)
    print(f"removed operator {args.name!r}: its key is refused everywhere")
    return EXIT_OK
