"""Running roles from the command line: ``qmesh --role``, ``qmesh up`` and ``qmesh version``.

For: handing ``--role`` to the runner and turning the operator's mistakes it
reports into one line and exit status 2; the ``up`` and ``version``
commands. The ``--role`` option itself is a global one (:mod:`qmesh.cli`).

Not for: running the roles (:mod:`qmesh.cli.runner`) or preparing a local
mesh (:mod:`qmesh.cli.up`). Both are imported only when asked for: they pull
in every role's code, which the other commands do not need.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

from qmesh import __version__
from qmesh.cmdline import EXIT_OK, EXIT_USAGE, Subcommands, add_command, print_err
from qmesh.config import Config

__all__ = ["add_commands", "cmd_version", "run_roles"]


def add_commands(commands: Subcommands, common: argparse.ArgumentParser) -> None:
    up = add_command(
        commands, common, "up", "run a gate, a minigate and a daemon together on this machine"
    )
    shift = up.add_mutually_exclusive_group()
    shift.add_argument(
        "--port-offset", type=int, default=0, metavar="N", help="add N to every listen port"
    )
    shift.add_argument("--ephemeral", action="store_true", help="listen on OS-chosen ports")
    up.add_argument(
        "--no-discovery",
        action="store_true",
        help="do not probe this machine's usual service ports (Ollama, llama.cpp, vLLM, "
        "LM Studio, PostgreSQL, qmesh)",
    )
    up.add_argument(
        "--no-demo-db",
        action="store_true",
        help="do not start the throwaway PostgreSQL (vault alias 'demo') for the demo app",
    )
    up.set_defaults(handler=_cmd_up)

    add_command(
        commands, common, "version", "print the qmesh and wire protocol versions"
    ).set_defaults(handler=cmd_version)


def run_roles(config: Config, roles: Sequence[str]) -> int:
    """Run ``roles`` in this process until they stop or are stopped."""
    # Looked up at call time, so the runner's imports are paid only here (and
    # tests can stand in for it).
    runner = importlib.import_module("qmesh.cli.runner")
    try:
        runner.run_until_stopped(lambda: runner.run_roles(config, tuple(roles)))
    except runner.RoleFailed as exc:
        # The runner turned the operator's mistakes (a missing credential, a
        # revoked key, a port in use) into one message; bugs keep their
        # traceback.
        print_err(f"error: {exc}")
        return EXIT_USAGE
    return EXIT_OK


def _cmd_up(args: argparse.Namespace, config: Config) -> int:
    runner = importlib.import_module("qmesh.cli.runner")
    up = importlib.import_module("qmesh.cli.up")
    try:
        return int(
            up.main(
                config,
                port_offset=args.port_offset,
                ephemeral=args.ephemeral,
                discover=not args.no_discovery,
                demo_db=not args.no_demo_db,
            )
        )
    except runner.RoleFailed as exc:  # as for --role: one line, no traceback
        print_err(f"error: {exc}")
        return EXIT_USAGE


def cmd_version(args: argparse.Namespace, config: Config | None) -> int:
    """Print the versions. ``config`` may be ``None``: this command works
    whatever state the configuration is in."""
    print(f"qmesh {__version__}")
    try:
        from qmesh import _core
    except ImportError:
        print("wire protocol unknown (the qmesh._core extension is not built)")
    else:
        print(f"wire protocol {_core.PROTOCOL_VERSION}")
    return EXIT_OK
