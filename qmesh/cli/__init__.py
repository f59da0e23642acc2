"""The ``qmesh`` command line: the executable's composition root.

For: building the parser from every command module, then parsing the
arguments, loading the configuration, setting up logging and either running
roles (``qmesh --role gate``) or one command. Errors the operator can fix
(bad config, missing key, duplicate name) print one line on stderr and exit
with status 2, without a traceback.

Each command module adds its commands in the same shape,
``add_commands(commands, common)`` (:mod:`qmesh.cmdline`), and gives every
command a handler ``(args, config) -> exit status``. The commands that
belong to no capability live in this package: running roles, ``up`` and
``version`` (:mod:`qmesh.cli.roles`), the Gate's keys and edge identities
(:mod:`qmesh.cli.identity`), applications (:mod:`qmesh.cli.apps`), operators
(:mod:`qmesh.cli.operators`) and the
state store itself (:mod:`qmesh.cli.state`). A
capability's commands live with the capability: ``secrets`` and ``audit``
(:mod:`qmesh.pg.cli`), ``memory`` (:mod:`qmesh.memory.cli`), ``quant`` and
``node`` (:mod:`qmesh.daemon.cli`), ``route`` and ``providers``
(:mod:`qmesh.llm.cli`), ``inventory`` and ``models`` (:mod:`qmesh.fleet.cli`),
``sessions`` (:mod:`qmesh.ops.cli`), ``finops`` and ``ledger``
(:mod:`qmesh.finops.cli`), ``gates`` (:mod:`qmesh.cluster.cli`). They import
:mod:`qmesh.cmdline`, never this package.

Not for: what the roles do (:mod:`qmesh.cli.runner`) or the local cluster
launcher (:mod:`qmesh.cli.up`); both are imported only when asked for, so
the other commands work without them and start quickly.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import attrs

from qmesh.cli import apps, identity, operators
from qmesh.cli import roles as roles_cli
from qmesh.cli import state as state_cli
from qmesh.cluster import cli as cluster_cli
from qmesh.cmdline import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, AddCommands, Handler, print_err
from qmesh.config import Config, ConfigError, load_config
from qmesh.daemon import cli as daemon_cli
from qmesh.finops import cli as finops_cli
from qmesh.finops.chain import reseal_chain_key
from qmesh.fleet import cli as inventory_cli
from qmesh.identity import IdentityError
from qmesh.llm import cli as llm_cli
from qmesh.llm.provider_keys import reseal_provider_keys
from qmesh.logs import LEVELS, setup_logging
from qmesh.memory import cli as memory_cli
from qmesh.ops import cli as sessions_cli
from qmesh.pg import cli as pg_cli
from qmesh.pg import pool_cli
from qmesh.pg.errors import PgError
from qmesh.roles import ROLES
from qmesh.state import StateError
from qmesh.state.db import Connection

__all__ = ["build_parser", "main"]


def _reseal_chain_key_on_postgres(conn: Connection, old_key: bytes, new_key: bytes) -> int:
    # SQLite's state keeps its chain key in a file of its own, not sealed.
    return 0 if isinstance(conn, sqlite3.Connection) else reseal_chain_key(conn, old_key, new_key)


COMMAND_MODULES: Final[tuple[AddCommands, ...]] = (
    # In this order in `qmesh --help`.
    roles_cli.add_commands,  # up, version
    identity.add_commands,  # keys, enroll, revoke, identities
    apps.add_commands,  # apps
    operators.add_commands,  # operators
    state_cli.add_commands,  # state
    cluster_cli.add_commands,  # gates
    pg_cli.add_commands,  # secrets, audit
    pool_cli.add_commands,  # pg pools
    memory_cli.add_commands,  # memory
    daemon_cli.add_commands,  # quant, node
    llm_cli.add_commands,  # route, providers
    inventory_cli.add_commands,  # inventory, models
    sessions_cli.add_commands,  # sessions
    finops_cli.add_commands,  # finops, ledger
)
# Sealed rows of other capabilities that `qmesh secrets rekey` reseals too.
pg_cli.RESEALERS.update(
    {"provider keys": reseal_provider_keys, "chain keys": _reseal_chain_key_on_postgres}
)
# Errors that are the operator's to fix: one line on stderr, exit status 2.
_OPERATOR_ERRORS: Final = (ConfigError, IdentityError, StateError, PgError)

_DESCRIPTION = """\
qmesh: a federated AI service mesh. One executable, three roles:

  gate      the brain: authenticates edges, holds the real secrets, routes
            qg:// capability requests, keeps inventory and accounts
            (tunnel listener :11439, HTTP API :11480)
  minigate  the edge sidecar beside an application: mimics Postgres (:11438)
            and an OpenAI-compatible LLM API (:11435) on localhost and
            carries the traffic to the Gate through a sealed tunnel
  daemon    the hands on a compute node: reports hardware, runs models
            (health endpoint :11450)

Run roles with --role (repeatable), or give one command."""

_EPILOG = """\
examples:
  qmesh keys init                         create the Gate's key pair
  qmesh enroll minigate web-1 --out web-1.cred
  qmesh --role gate --config gate.toml    run a Gate
  qmesh --role minigate --config edge.toml
  qmesh up --port-offset 100              a whole local mesh, shifted ports

configuration: --config FILE (TOML), overridden by QMESH_<SECTION>__<KEY>
environment variables, e.g. QMESH_GATE__TUNNEL_LISTEN=0.0.0.0:11439."""


def _add_global_options(parser: argparse.ArgumentParser, *, in_command: bool) -> None:
    # The same options are accepted after a command too (`qmesh enroll ...
    # --config f`). There they default to SUPPRESS so that leaving them out
    # does not overwrite a value given before the command.
    def default(value: object) -> object:
        return argparse.SUPPRESS if in_command else value

    group = parser.add_argument_group("global options")
    group.add_argument(
        "--config", type=Path, metavar="FILE", default=default(None), help="TOML config file"
    )
    group.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        default=default(None),
        help="state and key directory (overrides data_dir; default ~/.qmesh)",
    )
    group.add_argument(
        "--log-level", choices=tuple(LEVELS), default=default(None), help="overrides log.level"
    )
    group.add_argument(
        "--log-json",
        action="store_true",
        default=default(False),
        help="log one JSON object per line",
    )


def build_parser() -> argparse.ArgumentParser:
    """The whole ``qmesh`` parser: global options, ``--role`` and every command."""
    common = argparse.ArgumentParser(add_help=False)
    _add_global_options(common, in_command=True)

    parser = argparse.ArgumentParser(
        prog="qmesh",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_global_options(parser, in_command=False)
    parser.add_argument(
        "--role",
        action="append",
        choices=ROLES,
        dest="roles",
        default=[],
        help="run this role (repeat to run several in one process)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for add_commands in COMMAND_MODULES:
        add_commands(commands, common)
    return parser


def _load_config(args: argparse.Namespace) -> Config:
    config = load_config(args.config)
    if args.data_dir is not None:
        config = attrs.evolve(config, data_dir=args.data_dir.expanduser().absolute())
    log = config.log
    if args.log_level is not None:
        log = attrs.evolve(log, level=args.log_level)
    if args.log_json:
        log = attrs.evolve(log, format="json")
    return attrs.evolve(config, log=log)


def _exit_code(code: object) -> int:
    if code is None:
        return EXIT_OK
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return EXIT_FAILURE


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``qmesh`` command line; return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed
        return _exit_code(exc.code)
    roles: list[str] = list(dict.fromkeys(args.roles))  # in order, without repeats
    if args.command is None and not roles:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if args.command is not None and roles:
        parser.print_usage(sys.stderr)
        print_err(f"error: --role cannot be combined with the {args.command!r} command")
        return EXIT_USAGE
    if args.command == "version":
        # Works whatever state the configuration is in.
        return roles_cli.cmd_version(args, None)
    try:
        config = _load_config(args)
        level = config.log.level
        if not roles and args.command != "up" and args.log_level is None and level == "info":
            # A one-shot command prints its answer; the progress lines that
            # suit a running role would bury it (--log-level info shows them).
            level = "warning"
        setup_logging(level, config.log.format)
        if roles:
            return roles_cli.run_roles(config, roles)
        handler: Handler = args.handler
        try:
            return handler(args, config)
        except OSError as exc:
            # Commands touch the data directory and output files; permission
            # problems there are for the operator to fix.
            print_err(f"error: {exc}")
            return EXIT_USAGE
    except _OPERATOR_ERRORS as exc:
        print_err(f"error: {exc}")
        return EXIT_USAGE
