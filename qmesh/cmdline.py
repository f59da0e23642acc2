"""What every command module of the ``qmesh`` executable shares.

For: the one shape in which a module adds its commands to ``qmesh``
(:data:`AddCommands`): a function ``add_commands(commands, common)`` that
adds each of its top-level commands to ``commands`` with
:func:`add_command` and gives every runnable one a :data:`Handler` with
``set_defaults(handler=...)``. A handler receives the parsed arguments and
the loaded configuration and returns the exit status (:data:`EXIT_OK`,
:data:`EXIT_FAILURE`, :data:`EXIT_USAGE`, or a status of its own). Also two
small output helpers the command modules share.

Capability CLIs (``qmesh.memory.cli``, ``qmesh.pg.cli``, …) import this
module, never :mod:`qmesh.cli`: that package is the composition root, it
imports them.

Not for: the global options, loading the configuration or turning operator
errors into exit statuses (:mod:`qmesh.cli` does all three, once, for every
command), or talking to a running Gate (:mod:`qmesh.web.admin_client`).
"""

from __future__ import annotations

import argparse
import datetime
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, TypeAlias

if TYPE_CHECKING:
    from qmesh.config import Config

__all__ = [
    "EXIT_FAILURE",
    "EXIT_OK",
    "EXIT_USAGE",
    "AddCommands",
    "Handler",
    "Subcommands",
    "add_command",
    "iso_seconds",
    "print_err",
]

EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1
"""The command ran and failed, or found problems (a broken chain, no route)."""
EXIT_USAGE: Final = 2
"""The operator has something to fix: a usage error, bad config, a missing key."""

# argparse names the type of add_subparsers()'s result only privately; the
# alias keeps that name in one place. Strings: the class is not generic at
# run time.
Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
Handler: TypeAlias = "Callable[[argparse.Namespace, Config], int]"
"""A command: the parsed arguments and the loaded configuration in, the exit status out."""
AddCommands: TypeAlias = "Callable[[Subcommands, argparse.ArgumentParser], None]"
"""``add_commands(commands, common)``: add a module's top-level commands to
``commands``; ``common`` is the parent parser that carries the global options."""


def add_command(
    commands: Subcommands, common: argparse.ArgumentParser, name: str, help_text: str
) -> argparse.ArgumentParser:
    """Add the top-level command ``name``, which accepts the global options too."""
    return commands.add_parser(name, parents=[common], help=help_text, description=help_text)


def print_err(message: str) -> None:
    """``qmesh: MESSAGE`` on stderr."""
    print(f"qmesh: {message}", file=sys.stderr)


def iso_seconds(ts: float | None) -> str | None:
    """A Unix time as ISO 8601 in UTC to the second; ``None`` stays ``None``."""
    if ts is None:
        return None
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat(timespec="seconds")
