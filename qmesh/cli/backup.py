"""``qmesh state backup FILE`` and ``qmesh state restore FILE``: the Gate's state, kept.

For: a backup of the state store — identities, apps and their verifiers,
operators, policies, the vault, provider keys, the ledger and audit chains,
the statement audit, budget totals, the graph memory — as one SQLite file,
taken while Gates run (one read transaction: a consistent snapshot on
SQLite's WAL), and its restore into an empty state (a fresh ``DATA_DIR`` or
an empty PostgreSQL database). What the file holds stays as safe as the
state itself: vault values and provider keys stay sealed with the master
key, apps keep verifiers (no key), and the chains' key is written into the
file *sealed with the master key*. The master key is never in the file:
keep it apart (docs/operations.md says where), because a backup without it
restores apps and chains but no secret.

A backup of a PostgreSQL state is one REPEATABLE READ snapshot too;
``pg_dump`` of the database (with the master key kept apart) is the other
way, documented with the commands.

Not for: moving a SQLite state into PostgreSQL for good (``qmesh state
migrate``, which this shares the copy with: :mod:`qmesh.state.copy`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from qmesh import __version__
from qmesh.cmdline import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, print_err
from qmesh.config import Config
from qmesh.finops.chain import (
    CHAINS,
    ChainKeyMissing,
    chain_key_path,
    load_chain_key,
    seal_chain_key,
    sealed_chain_key,
    verify_chain,
    write_chain_key_file,
)
from qmesh.finops.control import attach_recorder, cli_actor
from qmesh.masterkey import key_fingerprint, load_master_key
from qmesh.state import StateStore
from qmesh.state.copy import copy_state, table_counts
from qmesh.state.db import Connection

__all__ = ["cmd_backup", "cmd_restore"]

_INFO_TABLE = "CREATE TABLE IF NOT EXISTS backup_info (name TEXT PRIMARY KEY, value TEXT NOT NULL)"
_KEYS_TABLE = (
    "CREATE TABLE IF NOT EXISTS state_keys (name TEXT PRIMARY KEY, key_fingerprint BLOB NOT NULL,"
    " nonce BLOB NOT NULL, ciphertext BLOB NOT NULL, created_at REAL NOT NULL)"
)


def cmd_backup(args: argparse.Namespace, config: Config) -> int:
    target: Path = args.file
    if target.exists():
        print_err(f"error: {target} exists; a backup never overwrites (choose another FILE)")
        return EXIT_USAGE
    if config.gate.database_url is None and not config.state_db_path.exists():
        print_err(f"error: no state at {config.state_db_path} to back up")
        return EXIT_USAGE
    master_key = load_master_key(config)
    partial = target.with_name(target.name + ".partial")
    partial.unlink(missing_ok=True)
    with StateStore.open(config.state_location) as source:
        try:
            chain_key: bytes | None = load_chain_key(source, master_key=master_key, create=False)
        except ChainKeyMissing:
            chain_key = None  # no ledger or audit row was ever written
        fingerprint = key_fingerprint(master_key)
        schema_version = source.schema_version  # not inside the copy: it holds the store

        def keys_and_info(conn: Connection) -> None:
            conn.execute(_INFO_TABLE)
            conn.execute(_KEYS_TABLE)
            if chain_key is not None:
                seal_chain_key(conn, chain_key, master_key)
            info = {
                "created_at": repr(time.time()),
                "qmesh_version": __version__,
                "schema_version": str(schema_version),
                "source": source.location,
                "master_key_fingerprint": fingerprint.hex(),
            }
            conn.executemany("INSERT INTO backup_info (name, value) VALUES (?, ?)", info.items())

        with StateStore.open(partial) as backup:
            report = copy_state(source, backup, also=keys_and_info)
    if not report.ok:
        partial.unlink(missing_ok=True)
        print_err("error: the backup's row counts differ from the state's; nothing kept")
        return EXIT_FAILURE
    partial.chmod(0o600)
    partial.rename(target)
    rows = sum(after for _, after in report.counts.values())
    print(f"backed up {rows} rows of {config.state_location} to {target}")
    print(
        f"master key {fingerprint.hex()[:16]}… is NOT in the file: without it the vault "
        "and provider keys cannot be opened (keep it apart)"
    )
    return EXIT_OK


def cmd_restore(args: argparse.Namespace, config: Config) -> int:
    source_path: Path = args.file
    if not source_path.is_file():
        print_err(f"error: no backup at {source_path}")
        return EXIT_USAGE
    master_key = load_master_key(config)
    fingerprint = key_fingerprint(master_key).hex()
    with StateStore.open(source_path) as backup:
        with backup._read() as conn:
            try:
                info = dict(conn.execute("SELECT name, value FROM backup_info").fetchall())
            except Exception:
                print_err(f"error: {source_path} is not a qmesh state backup")
                return EXIT_USAGE
        if info.get("master_key_fingerprint") != fingerprint:
            print_err(
                f"error: the backup's vault is sealed with master key "
                f"{str(info.get('master_key_fingerprint'))[:16]}…, this one is {fingerprint[:16]}…"
                " (give the backup's: gate.master_key_file or QMESH_MASTER_KEY)"
            )
            return EXIT_USAGE
        try:
            chain_key: bytes | None = sealed_chain_key(backup, master_key)
        except ChainKeyMissing:
            chain_key = None
        with StateStore.open(config.state_location) as target:
            held = {t: n for t, n in table_counts(target).items() if n}
            if held and not args.replace:
                listed = ", ".join(f"{t} ({n})" for t, n in held.items())
                print_err(f"error: {target.location} already holds rows: {listed}; "
                          "--replace empties it first")  # fmt: skip
                return EXIT_USAGE
            if target.path is not None and chain_key is not None and not args.replace:
                if chain_key_path(target.path).exists():
                    print_err(f"error: {target.path.parent} already has a chain key; "
                              "--replace overwrites it")  # fmt: skip
                    return EXIT_USAGE

            def chain_key_into(conn: Connection) -> None:
                if chain_key is not None and target.path is None:
                    seal_chain_key(conn, chain_key, master_key)

            report = copy_state(backup, target, replace=args.replace, also=chain_key_into)
            if chain_key is not None and target.path is not None:
                write_chain_key_file(target.path, chain_key, replace=args.replace)
            chains = []
            if chain_key is not None:
                with target._read() as conn:
                    chains = [verify_chain(conn, chain_key, chain) for chain in CHAINS]
                # The restore itself is a control-plane change, recorded last.
                attach_recorder(target, cli_actor(), master_key=master_key)
                with target._write() as conn:
                    target._record(conn, "state.restore", {"backup": str(source_path)})
    rows = sum(after for _, after in report.counts.values())
    print(f"restored {rows} rows from {source_path} (taken {info.get('created_at', '?')} "
          f"from {info.get('source', '?')}, qmesh {info.get('qmesh_version', '?')})")  # fmt: skip
    for chain in chains:
        verdict = "ok" if chain.ok else f"{len(chain.problems)} problem(s)"
        print(f"chain {chain.chain}: {chain.rows} rows verified, {verdict}")
    ok = report.ok and all(c.ok for c in chains)
    return EXIT_OK if ok else EXIT_FAILURE
