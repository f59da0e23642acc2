"""``qmesh state status|migrate|backup|restore``: where the Gate's state is, and keeping it.

For: ``status`` shows the backend (the SQLite file, or ``gate.database_url``
without its password), the schema version against this qmesh's, the steps
still pending (they apply when a Gate or a command next opens the state)
and the row counts — without changing anything. ``migrate --to
postgresql://…`` copies the SQLite state of ``DATA_DIR`` into PostgreSQL
in one transaction (:mod:`qmesh.state.copy`), moves the ledger's chain key
into it sealed with the master key, verifies the chains there and compares
every count; a target that holds rows is refused unless ``--replace``.

``backup FILE`` and ``restore FILE`` (:mod:`qmesh.cli.backup`) keep it.

Not for: the copy itself (:mod:`qmesh.state.copy`) or the chains
(:mod:`qmesh.finops.chain`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qmesh.cmdline import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, Subcommands, add_command, print_err

if TYPE_CHECKING:
    from qmesh.config import Config

__all__ = ["add_commands"]


def add_commands(commands: Subcommands, common: argparse.ArgumentParser) -> None:
    state = add_command(
        commands, common, "state", "the Gate's state store: its backend, schema and migration"
    )
    actions = state.add_subparsers(dest="state_command", metavar="COMMAND", required=True)
    status = actions.add_parser(
        "status",
        parents=[common],
        help="backend, schema version, pending steps and row counts (changes nothing)",
    )
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(handler=cmd_status)
    migrate = actions.add_parser(
        "migrate",
        parents=[common],
        help="copy DATA_DIR's SQLite state into PostgreSQL",
        description="Copy the SQLite state of DATA_DIR (identities, apps and keys, the vault, "
        "provider keys, the ledger and audit chains, the statement audit, app policies, "
        "budget totals, the graph memory) into the PostgreSQL database at URL, in one "
        "transaction; then set gate.database_url to it.",
    )
    migrate.add_argument("--to", required=True, metavar="URL", help="postgresql://…")
    migrate.add_argument(
        "--replace", action="store_true", help="empty the target's tables first if it holds rows"
    )
    migrate.set_defaults(handler=cmd_migrate)
    backup = actions.add_parser(
        "backup",
        parents=[common],
        help="write a consistent snapshot of the state to FILE (while Gates run); the master "
        "key is not in it",
    )
    backup.add_argument("file", type=Path, metavar="FILE")
    backup.set_defaults(handler=_cmd_backup)
    restore = actions.add_parser(
        "restore",
        parents=[common],
        help="restore a backup into this config's state (empty, unless --replace); needs the "
        "backup's master key",
    )
    restore.add_argument("file", type=Path, metavar="FILE")
    restore.add_argument(
        "--replace", action="store_true", help="empty the state's tables first if it holds rows"
    )
    restore.set_defaults(handler=_cmd_restore)


def _cmd_backup(args: argparse.Namespace, config: Config) -> int:
    from qmesh.cli.backup import cmd_backup

    return cmd_backup(args, config)


def _cmd_restore(args: argparse.Namespace, config: Config) -> int:
    from qmesh.cli.backup import cmd_restore

    return cmd_restore(args, config)


def cmd_status(args: argparse.Namespace, config: Config) -> int:
    from qmesh.state import StateStore
    from qmesh.state.copy import table_counts

    if config.gate.database_url is None and not config.state_db_path.exists():
        print_err(f"error: no state at {config.state_db_path} (a Gate creates it on first start)")
        return EXIT_USAGE
    with StateStore.open(config.state_location, migrate=False) as store:
        version, latest = store.schema_version, len(store.migrations)
        counts = table_counts(store) if version == latest else {}
        report: dict[str, Any] = {
            "backend": store.dialect,
            "location": store.location,
            "schema_version": version,
            "latest_version": latest,
            "pending_steps": max(latest - version, 0),
            "rows": counts,
        }
    if args.json:
        print(json.dumps(report, indent=2))
        return EXIT_OK
    source = "gate.database_url" if config.gate.database_url else "DATA_DIR"
    print(f"state    {report['backend']} at {report['location']} ({source})")
    if version > latest:
        print(f"schema   version {version}, newer than this qmesh knows ({latest}): upgrade qmesh")
        return EXIT_FAILURE
    pending = report["pending_steps"]
    state = "up to date" if not pending else f"{pending} step(s) pending (applied at next open)"
    print(f"schema   version {version} of {latest}: {state}")
    if counts:
        print("rows     " + ", ".join(f"{t} {n}" for t, n in counts.items()))
    return EXIT_OK


def cmd_migrate(args: argparse.Namespace, config: Config) -> int:
    from qmesh.finops.chain import (
        CHAINS,
        ChainKeyMissing,
        load_chain_key,
        seal_chain_key,
        verify_chain,
    )
    from qmesh.masterkey import key_fingerprint, load_master_key
    from qmesh.state import StateStore, is_database_url
    from qmesh.state.copy import copy_state
    from qmesh.state.db import Connection

    if not is_database_url(args.to):
        print_err("error: --to expects a postgresql:// URL")
        return EXIT_USAGE
    if not config.state_db_path.exists():
        print_err(f"error: no SQLite state at {config.state_db_path} to copy")
        return EXIT_USAGE
    master_key = load_master_key(config)
    with StateStore.open(config.state_db_path) as source, StateStore.open(args.to) as target:
        try:
            chain_key: bytes | None = load_chain_key(source, create=False)
        except ChainKeyMissing:
            chain_key = None  # nothing was ever written to the ledger

        def move_chain_key(conn: Connection) -> None:
            if chain_key is not None:
                seal_chain_key(conn, chain_key, master_key)

        report = copy_state(source, target, replace=args.replace, also=move_chain_key)
        chains = []
        if chain_key is not None:
            with target._read() as conn:
                chains = [verify_chain(conn, chain_key, chain) for chain in CHAINS]
        location = target.location
    width = max(len(t) for t in report.counts)
    print(f"copied {config.state_db_path} → {location} in one transaction:")
    for table, (before, after) in report.counts.items():
        mark = "" if before == after else "   ← differs"
        print(f"  {table.ljust(width)}  {before:>8} → {after:<8}{mark}")
    fingerprint = key_fingerprint(master_key).hex()
    print(f"vault and provider keys: copied sealed (master key {fingerprint})")
    if chain_key is None:
        print("chains: empty (no ledger row yet); the first Gate on the target creates the key")
    else:
        for chain in chains:
            verdict = "ok" if chain.ok else f"{len(chain.problems)} problem(s)"
            print(f"chain {chain.chain}: {chain.rows} rows verified on the target, {verdict}")
        print("chain key: moved into the target, sealed with the master key")
    ok = report.ok and all(c.ok for c in chains)
    if ok:
        print("next: set gate.database_url (or QMESH_GATE__DATABASE_URL) to the target's URL")
    return EXIT_OK if ok else EXIT_FAILURE
