"""``qmesh secrets …`` and ``qmesh audit``: the Gate's Postgres path from the shell.

For: the vault of real database credentials (``secrets init-master-key``,
``set`` from stdin or a file, never the command line, ``list`` without
passwords, ``delete``, and ``rotate``, which sets a new random password on
the real server), and the statement audit (``audit`` lists what apps ran;
``audit verify`` checks the hash chains, like ``qmesh ledger verify``). All
on the data directory's files and state store, without a running Gate.

Not for: the vault, master key, audit log and rotation themselves
(:mod:`qmesh.pg.vault`, :mod:`qmesh.masterkey`, :mod:`qmesh.pg.audit`,
:mod:`qmesh.pg.rotate`), or parsing the global options and loading the
configuration (:mod:`qmesh.cli` does both and hands the handlers a
:class:`Config`).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import getpass
import importlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from qmesh.cmdline import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    Subcommands,
    add_command,
    iso_seconds,
    print_err,
)
from qmesh.finops.control import open_answerable
from qmesh.masterkey import MASTER_KEY_ENV, create_master_key, master_key_path
from qmesh.pg.errors import DsnError, PgError
from qmesh.pg.vault import Vault, delete_secret, load_master_key, reseal_vault
from qmesh.state import StateStore
from qmesh.state.db import Connection

if TYPE_CHECKING:
    from qmesh.config import Config

__all__ = ["add_commands"]


def add_commands(commands: Subcommands, common: argparse.ArgumentParser) -> None:
    secrets = add_command(
        commands, common, "secrets", "manage the vault of real database credentials"
    )
    sub = secrets.add_subparsers(dest="secrets_command", metavar="COMMAND", required=True)

    def secrets_command(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], help=help_text, description=help_text)

    secrets_command(
        "init-master-key",
        "create the vault's master key file (DATA_DIR/master.key or gate.master_key_file)",
    ).set_defaults(handler=_cmd_init_master_key)

    set_cmd = secrets_command(
        "set", "store the real credentials of a database alias (read from stdin or a file)"
    )
    set_cmd.add_argument("alias", type=_db_alias, metavar="db.ALIAS")
    source = set_cmd.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--dsn-stdin",
        action="store_true",
        help="read the DSN from stdin (prompted for, unechoed, on a terminal)",
    )
    source.add_argument("--dsn-file", type=Path, metavar="FILE", help="read the DSN from FILE")
    # Not offered, but caught: argparse would otherwise echo the unknown
    # argument, password and all, in its usage error.
    source.add_argument("--dsn", dest="dsn_argv", metavar="DSN", help=argparse.SUPPRESS)
    set_cmd.set_defaults(handler=_cmd_set)

    list_cmd = secrets_command("list", "list database aliases (never passwords)")
    list_cmd.add_argument("--json", action="store_true", help="print JSON")
    list_cmd.set_defaults(handler=_cmd_list)

    delete = secrets_command("delete", "remove a database alias (needs no master key)")
    delete.add_argument("alias", type=_db_alias, metavar="db.ALIAS")
    delete.set_defaults(handler=_cmd_delete)

    rekey = secrets_command(
        "rekey",
        "seal every secret, provider key and the chain key again under a new master key, in "
        "one transaction, then replace the key file (running Gates reading it follow)",
    )
    rekey.add_argument(
        "--new-key-file", type=Path, metavar="FILE",
        help="where to write the new key when the current one comes from QMESH_MASTER_KEY or "
        "gate.master_key_command (put it into your secret manager, then delete the file)",
    )  # fmt: skip
    rekey.set_defaults(handler=_cmd_rekey)

    rotate = secrets_command(
        "rotate", "set a new random password on the real server and in the vault"
    )
    rotate.add_argument("alias", type=_db_alias, metavar="db.ALIAS")
    rotate.set_defaults(handler=_cmd_rotate)

    audit = add_command(
        commands, common, "audit", "list the statements applications ran through the Gate"
    )
    audit.add_argument(
        "action",
        nargs="?",
        choices=("list", "verify"),
        default="list",
        help="list statements (default), or verify the ledger's and qg audit trail's hash chains",
    )
    audit.add_argument(
        "--control",
        action="store_true",
        help="the control-plane audit instead: who enrolled, revoked, changed apps, operators, "
        "policy or secrets, ended sessions or stopped models",
    )
    audit.add_argument("--app", metavar="APP", help="only this app's statements")
    audit.add_argument("--alias", metavar="ALIAS", help="only statements on this database alias")
    audit.add_argument(
        "--limit", type=int, default=50, metavar="N", help="newest N records (default 50)"
    )
    audit.add_argument("--json", action="store_true", help="print JSON")
    audit.set_defaults(handler=_cmd_audit)


def _db_alias(text: str) -> str:
    """``db.ALIAS`` on the command line: the alias, or a usage error."""
    prefix, dot, alias = text.partition(".")
    if prefix != "db" or not dot or not alias:
        raise argparse.ArgumentTypeError(f"expected db.ALIAS, e.g. db.orders; got {text!r}")
    return alias


def _open_store(config: Config) -> StateStore:
    return StateStore.open(config.state_location)


@contextlib.contextmanager
def _open_vault(config: Config) -> Iterator[Vault]:
    key = load_master_key(config)
    with open_answerable(config) as store:
        yield Vault.open(store, key)


# -- secrets -------------------------------------------------------------------------


def _cmd_init_master_key(args: argparse.Namespace, config: Config) -> int:
    path = master_key_path(config)
    create_master_key(path)
    print(path)
    print_err(
        f"created the master key {path} (mode 0600). Keep a copy somewhere safe: without "
        "it the vault's secrets cannot be read"
    )
    if MASTER_KEY_ENV in os.environ:
        print_err(f"note: {MASTER_KEY_ENV} is set and is used instead of this file")
    return EXIT_OK


def _read_dsn(args: argparse.Namespace, alias: str) -> str:
    if args.dsn_argv is not None:
        raise PgError(
            "refusing a DSN on the command line, where `ps` and the shell history show its "
            "password; use --dsn-stdin or --dsn-file FILE"
        )
    if args.dsn_file is not None:
        path: Path = args.dsn_file
        text = path.read_text(encoding="utf-8")
        if path.stat().st_mode & 0o077:
            print_err(f"warning: {path} is readable by other users; delete it or chmod 600 it")
        return text
    if sys.stdin.isatty():
        return getpass.getpass(f"DSN for db.{alias} (not echoed): ")
    return sys.stdin.read()


def _cmd_set(args: argparse.Namespace, config: Config) -> int:
    dsn = _read_dsn(args, args.alias)
    with _open_vault(config) as vault:
        try:
            secret = vault.set(args.alias, dsn)
        except DsnError as exc:
            raise DsnError(f"invalid DSN for db.{args.alias}: {exc}") from None
    print(f"stored db.{secret.alias}: {secret.describe()}")
    return EXIT_OK


def _cmd_list(args: argparse.Namespace, config: Config) -> int:
    with _open_vault(config) as vault:
        entries = vault.entries()
    if args.json:
        rows = [
            {
                "alias": f"db.{e.secret.alias}",
                "host": e.secret.host,
                "port": e.secret.port,
                "dbname": e.secret.dbname,
                "user": e.secret.user,
                "sslmode": e.secret.sslmode,
                "sslrootcert": e.secret.sslrootcert,
                "created_at": iso_seconds(e.created_at),
                "updated_at": iso_seconds(e.updated_at),
                "rotation_pending_since": iso_seconds(e.pending_since),
            }
            for e in entries
        ]
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    if not entries:
        print("no secrets (see `qmesh secrets set --help`)")
        return EXIT_OK
    width = max(len("ALIAS"), *(len(e.secret.alias) + 3 for e in entries))
    print(f"{'ALIAS':<{width}}  {'UPDATED':<25}  TARGET")
    for e in entries:
        note = "  (rotation pending)" if e.pending_since is not None else ""
        print(
            f"{'db.' + e.secret.alias:<{width}}  {iso_seconds(e.updated_at):<25}  "
            f"{e.secret.describe()}{note}"
        )
    return EXIT_OK


def _cmd_delete(args: argparse.Namespace, config: Config) -> int:
    with open_answerable(config) as store:
        if not delete_secret(store, args.alias):
            print_err(f"error: no secret db.{args.alias} (see `qmesh secrets list`)")
            return EXIT_USAGE
    print(f"deleted db.{args.alias}")
    return EXIT_OK


def _cmd_rotate(args: argparse.Namespace, config: Config) -> int:
    # Imported here: it pulls in psycopg, which no other command needs.
    rotate = importlib.import_module("qmesh.pg.rotate")
    with _open_vault(config) as vault:
        result = rotate.rotate_password(vault, args.alias)
    secret = result.secret
    if result.settled is not None:
        print_err(
            f"an interrupted earlier rotation of db.{args.alias} was settled ({result.settled})"
        )
    print(
        f"rotated db.{args.alias}: a new password for {secret.user} on "
        f"{secret.host}:{secret.port} is set on the server and stored in the vault"
    )
    if not result.verified:
        print_err("warning: a fresh login with the new password failed; check the server")
        return EXIT_FAILURE
    return EXIT_OK


# -- audit ---------------------------------------------------------------------------


def _iso_ms(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat(timespec="milliseconds")


def _cmd_audit(args: argparse.Namespace, config: Config) -> int:
    if args.action == "verify":
        # One verification for both chains, whichever command asks.
        from qmesh.finops.cli import cmd_verify

        return cmd_verify(args, config)
    if args.control:
        return _cmd_control_audit(args, config)
    from qmesh.pg.audit import list_audit

    with _open_store(config) as store:
        records = list_audit(store, app=args.app, alias=args.alias, limit=args.limit)
    if args.json:
        rows = [
            {
                "id": r.id,
                "ts": _iso_ms(r.ts),
                "app": r.app,
                "alias": r.alias,
                "statement": r.statement,
                "statement_sha256": r.statement_sha256,
                "duration_ms": round(r.duration_ms, 3),
                "rows": r.rows,
                "outcome": r.outcome,
                "session": r.session,
            }
            for r in records
        ]
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    if not records:
        print("no audit records")
        return EXIT_OK
    app_w = max(len("APP"), *(len(r.app) for r in records))
    alias_w = max(len("ALIAS"), *(len(r.alias) for r in records))
    outcome_w = max(len("OUTCOME"), *(len(r.outcome) for r in records))
    session_w = max(len("SESSION"), *(len(r.session or "-") for r in records))
    print(
        f"{'TIME':<29}  {'APP':<{app_w}}  {'ALIAS':<{alias_w}}  {'SESSION':<{session_w}}  "
        f"{'OUTCOME':<{outcome_w}}  {'MS':>9}  {'ROWS':>7}  STATEMENT"
    )
    for r in records:
        if r.statement is None:
            shown = f"sha256:{r.statement_sha256}"
        else:
            shown = " ".join(r.statement.split())
            shown = shown if len(shown) <= 80 else shown[:79] + "…"
        rows_text = "" if r.rows is None else str(r.rows)
        print(
            f"{_iso_ms(r.ts):<29}  {r.app:<{app_w}}  {r.alias:<{alias_w}}  "
            f"{r.session or '-':<{session_w}}  "
            f"{r.outcome:<{outcome_w}}  {r.duration_ms:>9.3f}  {rows_text:>7}  {shown}"
        )
    return EXIT_OK


def _cmd_control_audit(args: argparse.Namespace, config: Config) -> int:
    from qmesh.finops.control import list_control

    with _open_store(config) as store:
        records = list_control(store, limit=args.limit)
    if args.json:
        print(json.dumps([
            {"id": r.id, "ts": _iso_ms(r.ts), "actor": r.actor, "action": r.action,
             "detail": r.detail}
            for r in records
        ], indent=2))  # fmt: skip
        return EXIT_OK
    if not records:
        print("no control-plane records")
        return EXIT_OK
    actor_w = max(len("ACTOR"), *(len(r.actor) for r in records))
    action_w = max(len("ACTION"), *(len(r.action) for r in records))
    print(f"{'TIME':<29}  {'ACTOR':<{actor_w}}  {'ACTION':<{action_w}}  DETAIL")
    for r in records:
        detail = json.dumps(r.detail, sort_keys=True, separators=(",", ":"))
        print(f"{_iso_ms(r.ts):<29}  {r.actor:<{actor_w}}  {r.action:<{action_w}}  {detail}")
    return EXIT_OK


# -- rekey -----------------------------------------------------------------------------

Resealer = Callable[[Connection, bytes, bytes], int]
"""Seals one kind of row again under a new master key (old key, new key) in
the rekey's transaction; how many rows."""
RESEALERS: dict[str, Resealer] = {"vault secrets": reseal_vault}
"""What ``secrets rekey`` reseals; the command line's root adds the sealed
rows of other capabilities (provider keys, the chain key)."""


def _cmd_rekey(args: argparse.Namespace, config: Config) -> int:
    import secrets as random

    from qmesh.masterkey import key_fingerprint, promote_master_key_file, replace_master_key_file

    from_file = MASTER_KEY_ENV not in os.environ and config.gate.master_key_command is None
    if not from_file and args.new_key_file is None:
        print_err("error: the master key does not come from a file here: give --new-key-file")
        return EXIT_USAGE
    old_key = load_master_key(config)
    new_key = random.token_bytes(len(old_key))
    path = master_key_path(config) if from_file else args.new_key_file
    if not from_file and path.exists():
        print_err(f"error: {path} exists; the new key is never written over a file")
        return EXIT_USAGE
    # The new key is on disk before anything is sealed with it.
    staged = replace_master_key_file(path, new_key)
    counts: dict[str, int] = {}
    try:
        with open_answerable(config) as store, store._write() as conn:
            for what, reseal in RESEALERS.items():
                counts[what] = reseal(conn, old_key, new_key)
            store._record(conn, "secrets.rekey", {
                "from": key_fingerprint(old_key).hex()[:16],
                "to": key_fingerprint(new_key).hex()[:16],
                **{what.replace(" ", "_"): n for what, n in counts.items()},
            })  # fmt: skip
    except BaseException:
        staged.unlink(missing_ok=True)  # nothing was sealed with it
        raise
    if from_file:
        promote_master_key_file(path)
        where = f"{path} (replaced)"
    else:
        os.replace(staged, path)
        where = f"{path}: move it into your secret manager, then delete the file"
    sealed = ", ".join(f"{n} {what}" for what, n in counts.items())
    print(f"resealed {sealed} under master key {key_fingerprint(new_key).hex()[:16]}… in one "
          f"transaction; the new key: {where}")  # fmt: skip
    print("the previous key opens nothing any more; Gates reading the key file follow it, "
          "others need the new key and a restart")  # fmt: skip
    return EXIT_OK
