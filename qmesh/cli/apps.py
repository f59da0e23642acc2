"""``qmesh apps add|list|rotate-key|disable|enable``: applications and their app keys.

For: managing the applications that may use the mesh, on the data
directory's state store, without a running Gate. An app key is printed
once, when it is made: the store keeps only its verifiers.

Not for: how keys are checked (:mod:`qmesh.state`, :mod:`qmesh.web.auth`)
or per-app policy (the configuration).
"""

from __future__ import annotations

import argparse
import json
from typing import Final

from qmesh.cmdline import EXIT_OK, Subcommands, add_command, iso_seconds, print_err
from qmesh.config import Config
from qmesh.state import StateStore

__all__ = ["add_commands"]

DEFAULT_KEY_OVERLAP_S: Final = 3600.0
"""How long a rotated-out key keeps working: time to roll the new one out."""


def add_commands(commands: Subcommands, common: argparse.ArgumentParser) -> None:
    apps = add_command(commands, common, "apps", "manage applications and their app keys")
    apps_commands = apps.add_subparsers(dest="apps_command", metavar="COMMAND", required=True)
    add = apps_commands.add_parser(
        "add", parents=[common], help="create an app and print its app key (shown once)"
    )
    add.add_argument("app_id")
    add.set_defaults(handler=_cmd_add)
    listing = apps_commands.add_parser("list", parents=[common], help="list applications")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(handler=_cmd_list)
    rotate_key = apps_commands.add_parser(
        "rotate-key",
        parents=[common],
        help="give an app a new key (printed once); the old key keeps working for --overlap",
    )
    rotate_key.add_argument("app_id")
    rotate_key.add_argument(
        "--overlap",
        type=float,
        default=DEFAULT_KEY_OVERLAP_S,
        metavar="SECONDS",
        help="how long the previous key keeps working (default %(default)g; 0: stops now)",
    )
    rotate_key.set_defaults(handler=_cmd_rotate_key)
    disable = apps_commands.add_parser(
        "disable",
        parents=[common],
        help="refuse an app's keys everywhere and end its Postgres sessions (within a second "
        "at a running Gate); its keys are kept for 'enable'",
    )
    disable.add_argument("app_id")
    disable.set_defaults(handler=_cmd_disable)
    enable = apps_commands.add_parser(
        "enable", parents=[common], help="accept a disabled app's keys again"
    )
    enable.add_argument("app_id")
    enable.set_defaults(handler=_cmd_enable)


def _open_store(config: Config) -> StateStore:
    return StateStore.open(config.state_location)


def _cmd_add(args: argparse.Namespace, config: Config) -> int:
    with _open_store(config) as store:
        key = store.add_app(args.app_id)
    print(key)
    print_err(
        f"created app {args.app_id!r}; the app key above is shown only once. "
        f"Applications connect with user={args.app_id} and this key as the password."
    )
    return EXIT_OK


def _cmd_list(args: argparse.Namespace, config: Config) -> int:
    with _open_store(config) as store:
        apps = store.list_apps()
    if args.json:
        rows = [
            {
                "app_id": a.app_id,
                "created_at": iso_seconds(a.created_at),
                "disabled": a.disabled,
                "disabled_at": iso_seconds(a.disabled_at),
            }
            for a in apps
        ]
        print(json.dumps(rows))
        return EXIT_OK
    if not apps:
        print("no apps (see `qmesh apps add --help`)")
        return EXIT_OK
    width = max(len("APP ID"), *(len(a.app_id) for a in apps))
    print(f"{'APP ID':<{width}}  {'STATUS':<8}  CREATED")
    for a in apps:
        status = "disabled" if a.disabled else "active"
        print(f"{a.app_id:<{width}}  {status:<8}  {iso_seconds(a.created_at)}")
    return EXIT_OK


def _cmd_disable(args: argparse.Namespace, config: Config) -> int:
    with _open_store(config) as store:
        if not store.set_app_disabled(args.app_id, True):
            print(f"app {args.app_id!r} was already disabled")
            return EXIT_OK
    print(
        f"disabled app {args.app_id!r}: its keys are refused on every path and its live "
        "Postgres sessions end (within a second at a running Gate)"
    )
    return EXIT_OK


def _cmd_enable(args: argparse.Namespace, config: Config) -> int:
    with _open_store(config) as store:
        if not store.set_app_disabled(args.app_id, False):
            print(f"app {args.app_id!r} was not disabled")
            return EXIT_OK
    print(f"enabled app {args.app_id!r}: its keys work again")
    return EXIT_OK


def _cmd_rotate_key(args: argparse.Namespace, config: Config) -> int:
    with _open_store(config) as store:
        key, until = store.rotate_app_key(args.app_id, args.overlap)
    print(key)
    if args.overlap > 0:
        ends = f"keeps working until {iso_seconds(until)} ({args.overlap:g} s)"
    else:
        ends = "and any earlier ones stopped working"
    print_err(f"new key for app {args.app_id!r} above, shown only once; the previous key {ends}")
    return EXIT_OK
