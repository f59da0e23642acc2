"""The ``qmesh`` command line.

For: parsing arguments, loading the configuration, setting up logging, then
either running roles (``qmesh --role gate``) or one management command
(``keys``, ``enroll``, ``revoke``, ``identities``, ``apps``, ``up``,
``version``, ``secrets``, ``audit``, ``memory``, ``route``, ``finops``,
``ledger``, ``providers``, ``quant``, ``node``, ``inventory``). Errors the operator can
fix (bad config, missing key, duplicate name) print one line on stderr and
exit with status 2, without a traceback.

Not for: what the roles do (:mod:`qmesh.runner`) or the local cluster
launcher (:mod:`qmesh.up`); both are imported only when asked for, so the
management commands work without them and start quickly.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import getpass
import importlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Final

import attrs

from qmesh import __version__
from qmesh.config import Config, ConfigError, load_config, parse_hostport
from qmesh.daemon import cli as daemon_cli
from qmesh.finops import cli as finops_cli
from qmesh.fleet import cli as inventory_cli
from qmesh.identity import (
    GateKeyMissing,
    GateKeys,
    IdentityError,
    enroll,
    write_private_file,
)
from qmesh.logs import LEVELS, setup_logging
from qmesh.memory import cli as memory_cli
from qmesh.ops import cli as sessions_cli
from qmesh.pg.errors import DsnError, PgError
from qmesh.pg.masterkey import MASTER_KEY_ENV, create_master_key, master_key_path
from qmesh.pg.vault import Vault, delete_secret, load_master_key
from qmesh.qg import cli as qg_cli
from qmesh.state import ROLES, StateError, StateStore

__all__ = ["main"]

RUN_ROLES: Final = ("gate", "minigate", "daemon")
# Errors that are the operator's to fix: one line on stderr, exit status 2.
_OPERATOR_ERRORS: Final = (ConfigError, IdentityError, StateError, PgError)
EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1
EXIT_USAGE: Final = 2
DEFAULT_KEY_OVERLAP_S: Final = 3600.0

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


def _build_parser() -> argparse.ArgumentParser:
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
        choices=RUN_ROLES,
        dest="roles",
        default=[],
        help="run this role (repeat to run several in one process)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, parents=[common], help=help_text, description=help_text)

    up = command("up", "run a gate, a minigate and a daemon together on this machine")
    shift = up.add_mutually_exclusive_group()
    shift.add_argument(
        "--port-offset", type=int, default=0, metavar="N", help="add N to every listen port"
    )
    shift.add_argument("--ephemeral", action="store_true", help="listen on OS-chosen ports")
    up.set_defaults(handler=_cmd_up)

    command("version", "print the qmesh and wire protocol versions").set_defaults(
        handler=_cmd_version
    )

    keys = command("keys", "manage the Gate's key pair")
    keys_commands = keys.add_subparsers(dest="keys_command", metavar="COMMAND", required=True)
    init = keys_commands.add_parser(
        "init", parents=[common], help="create gate.key in the data directory"
    )
    init.add_argument(
        "--force",
        action="store_true",
        help="replace an existing key (every issued credential stops working)",
    )
    init.set_defaults(handler=_cmd_keys_init)
    keys_commands.add_parser(
        "show", parents=[common], help="print the Gate's public key"
    ).set_defaults(handler=_cmd_keys_show)

    enroll_cmd = command("enroll", "issue a credential for a new minigate or daemon")
    enroll_cmd.add_argument("role", choices=ROLES)
    enroll_cmd.add_argument("name", help="a unique name for the edge, e.g. web-1")
    enroll_cmd.add_argument(
        "--gate",
        metavar="HOST:PORT",
        help="the Gate address edges dial (default: gate.tunnel_listen)",
    )
    enroll_cmd.add_argument(
        "--out", type=Path, metavar="FILE", help="write the credential to FILE (mode 0600)"
    )
    enroll_cmd.set_defaults(handler=_cmd_enroll)

    revoke = command("revoke", "revoke an enrolled identity")
    revoke.add_argument("name")
    revoke.set_defaults(handler=_cmd_revoke)

    identities = command("identities", "list enrolled minigates and daemons")
    identities.add_argument("--json", action="store_true", help="print JSON")
    identities.set_defaults(handler=_cmd_identities)

    apps = command("apps", "manage applications and their app keys")
    apps_commands = apps.add_subparsers(dest="apps_command", metavar="COMMAND", required=True)
    add = apps_commands.add_parser(
        "add", parents=[common], help="create an app and print its app key (shown once)"
    )
    add.add_argument("app_id")
    add.set_defaults(handler=_cmd_apps_add)
    apps_list = apps_commands.add_parser("list", parents=[common], help="list applications")
    apps_list.add_argument("--json", action="store_true", help="print JSON")
    apps_list.set_defaults(handler=_cmd_apps_list)
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
    rotate_key.set_defaults(handler=_cmd_apps_rotate_key)
    disable = apps_commands.add_parser(
        "disable",
        parents=[common],
        help="refuse an app's keys everywhere and end its Postgres sessions (within a second "
        "at a running Gate); its keys are kept for 'enable'",
    )
    disable.add_argument("app_id")
    disable.set_defaults(handler=_cmd_apps_disable)
    enable = apps_commands.add_parser(
        "enable", parents=[common], help="accept a disabled app's keys again"
    )
    enable.add_argument("app_id")
    enable.set_defaults(handler=_cmd_apps_enable)
    _add_pg_commands(command, common)
    memory_cli.add_commands(
        command("memory", "graph memory: add documents, ask questions answered with citations"),
        common,
    )
    daemon_cli.add_quant_commands(
        command("quant", "hardware-aware quantization: which variant of a model to run where"),
        common,
    )
    daemon_cli.add_node_commands(
        command("node", "this machine as a daemon sees it: telemetry and model catalog"), common
    )
    qg_cli.add_commands(command("route", "show how the Gate would route a qg:// DSN"))
    inventory_cli.add_commands(
        command("inventory", "the running Gate's nodes, models and discovered services")
    )
    sessions_cli.add_commands(
        command("sessions", "the running Gate's live tunnel sessions; 'kill' ends them")
    )
    finops_cli.add_commands(
        command("finops", "spend, budgets and savings from the Gate's request ledger"),
        command("ledger", "verify the request ledger's and qg audit trail's hash chains"),
        command("providers", "API keys of remote model providers (sealed in the state store)"),
        common,
    )
    return parser


# -- helpers ------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat(timespec="seconds")


def _err(message: str) -> None:
    print(f"qmesh: {message}", file=sys.stderr)


def _open_store(config: Config) -> StateStore:
    return StateStore.open(config.state_db_path)


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


# -- commands -------------------------------------------------------------------


def _run_roles(config: Config, roles: Sequence[str]) -> int:
    # Imported here: the runner pulls in every role's code, which the
    # management commands do not need.
    runner = importlib.import_module("qmesh.runner")
    try:
        runner.run_until_stopped(lambda: runner.run_roles(config, tuple(roles)))
    except runner.RoleFailed as exc:
        # The runner turned the operator's mistakes (a missing credential, a
        # revoked key, a port in use) into one message; bugs keep their
        # traceback.
        _err(f"error: {exc}")
        return EXIT_USAGE
    return EXIT_OK


def _cmd_up(args: argparse.Namespace, config: Config) -> int:
    up = importlib.import_module("qmesh.up")
    return int(up.main(config, port_offset=args.port_offset, ephemeral=args.ephemeral))


def _cmd_version(args: argparse.Namespace, config: Config | None) -> int:
    print(f"qmesh {__version__}")
    try:
        from qmesh import _core
    except ImportError:
        print("wire protocol unknown (the qmesh._core extension is not built)")
    else:
        print(f"wire protocol {_core.PROTOCOL_VERSION}")
    return EXIT_OK


def _cmd_keys_init(args: argparse.Namespace, config: Config) -> int:
    keys = GateKeys.create(config.data_dir, force=args.force)
    print(_b64(keys.public_key))
    _err(f"created {GateKeys.path_in(config.data_dir)} (the line above is its public key)")
    return EXIT_OK


def _load_gate_keys(config: Config) -> GateKeys:
    try:
        return GateKeys.load(config.data_dir)
    except GateKeyMissing:
        raise GateKeyMissing(
            f"no gate key in {config.data_dir}; run `qmesh keys init` first "
            "(or pass the Gate's --data-dir)"
        ) from None


def _cmd_keys_show(args: argparse.Namespace, config: Config) -> int:
    print(_b64(_load_gate_keys(config).public_key))
    return EXIT_OK


def _cmd_enroll(args: argparse.Namespace, config: Config) -> int:
    keys = _load_gate_keys(config)
    gate_address: str = args.gate or config.gate.tunnel_listen
    if args.gate is None:
        # The listen address is only a good default when edges can dial it.
        host, port = parse_hostport(gate_address)
        if host in ("0.0.0.0", "::") or port == 0:
            _err(
                f"error: gate.tunnel_listen is {gate_address}, which edges cannot dial; "
                "pass --gate HOST:PORT with the address they should use"
            )
            return EXIT_USAGE
    out: Path | None = args.out
    if out is not None and out.exists():
        _err(f"error: {out} already exists; remove it or choose another --out")
        return EXIT_USAGE
    with _open_store(config) as store:
        credential = enroll(store, keys, args.role, args.name, gate_address)
    text = credential.encode()
    if out is None:
        print(text)
        _err(
            f"enrolled {args.role} {args.name!r}; the credential above is shown only once, "
            "keep it secret"
        )
    else:
        write_private_file(out, (text + "\n").encode("ascii"))
        print(out)
    return EXIT_OK


def _cmd_revoke(args: argparse.Namespace, config: Config) -> int:
    with _open_store(config) as store:
        identity = store.get_identity(args.name)
        if identity is None:
            _err(f"error: no identity named {args.name!r} (see `qmesh identities`)")
            return EXIT_USAGE
        if not store.revoke_identity(args.name):
            print(f"{args.name} was already revoked at {_iso(identity.revoked_at)}")
            return EXIT_OK
    print(f"revoked {args.name}")
    return EXIT_OK


def _cmd_identities(args: argparse.Namespace, config: Config) -> int:
    with _open_store(config) as store:
        identities = store.list_identities()
    if args.json:
        rows = [
            {
                "name": i.name,
                "role": i.role,
                "public_key": _b64(i.public_key),
                "created_at": _iso(i.created_at),
                "revoked_at": _iso(i.revoked_at),
                "revoked": i.revoked,
            }
            for i in identities
        ]
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    if not identities:
        print("no identities enrolled (see `qmesh enroll --help`)")
        return EXIT_OK
    width = max(len("NAME"), *(len(i.name) for i in identities))
    print(f"{'NAME':<{width}}  {'ROLE':<8}  {'STATUS':<7}  {'CREATED':<25}  PUBLIC KEY")
    for i in identities:
        status = "revoked" if i.revoked else "active"
        print(
            f"{i.name:<{width}}  {i.role:<8}  {status:<7}  {_iso(i.created_at):<25}  "
            f"{_b64(i.public_key)}"
        )
    return EXIT_OK


def _cmd_apps_add(args: argparse.Namespace, config: Config) -> int:
    with _open_store(config) as store:
        key = store.add_app(args.app_id)
    print(key)
    _err(
        f"created app {args.app_id!r}; the app key above is shown only once. "
        f"Applications connect with user={args.app_id} and this key as the password."
    )
    return EXIT_OK


def _cmd_apps_list(args: argparse.Namespace, config: Config) -> int:
    with _open_store(config) as store:
        apps = store.list_apps()
    if args.json:
        rows = [
            {
                "app_id": a.app_id,
                "created_at": _iso(a.created_at),
                "disabled": a.disabled,
                "disabled_at": _iso(a.disabled_at),
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
        print(f"{a.app_id:<{width}}  {status:<8}  {_iso(a.created_at)}")
    return EXIT_OK


def _cmd_apps_disable(args: argparse.Namespace, config: Config) -> int:
    with _open_store(config) as store:
        if not store.set_app_disabled(args.app_id, True):
            print(f"app {args.app_id!r} was already disabled")
            return EXIT_OK
    print(
        f"disabled app {args.app_id!r}: its keys are refused on every path and its live "
        "Postgres sessions end (within a second at a running Gate)"
    )
    return EXIT_OK


def _cmd_apps_enable(args: argparse.Namespace, config: Config) -> int:
    with _open_store(config) as store:
        if not store.set_app_disabled(args.app_id, False):
            print(f"app {args.app_id!r} was not disabled")
            return EXIT_OK
    print(f"enabled app {args.app_id!r}: its keys work again")
    return EXIT_OK


def _cmd_apps_rotate_key(args: argparse.Namespace, config: Config) -> int:
    with _open_store(config) as store:
        key, until = store.rotate_app_key(args.app_id, args.overlap)
    print(key)
    if args.overlap > 0:
        ends = f"keeps working until {_iso(until)} ({args.overlap:g} s)"
    else:
        ends = "and any earlier ones stopped working"
    _err(f"new key for app {args.app_id!r} above, shown only once; the previous key {ends}")
    return EXIT_OK


# -- secrets and audit (the Gate's Postgres path, qmesh.pg) -----------------------


def _add_pg_commands(
    command: Callable[[str, str], argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    secrets = command("secrets", "manage the vault of real database credentials")
    sub = secrets.add_subparsers(dest="secrets_command", metavar="COMMAND", required=True)

    def secrets_command(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], help=help_text, description=help_text)

    secrets_command(
        "init-master-key",
        "create the vault's master key file (DATA_DIR/master.key or gate.master_key_file)",
    ).set_defaults(handler=_cmd_secrets_init_master_key)

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
    set_cmd.set_defaults(handler=_cmd_secrets_set)

    list_cmd = secrets_command("list", "list database aliases (never passwords)")
    list_cmd.add_argument("--json", action="store_true", help="print JSON")
    list_cmd.set_defaults(handler=_cmd_secrets_list)

    delete = secrets_command("delete", "remove a database alias (needs no master key)")
    delete.add_argument("alias", type=_db_alias, metavar="db.ALIAS")
    delete.set_defaults(handler=_cmd_secrets_delete)

    rotate = secrets_command(
        "rotate", "set a new random password on the real server and in the vault"
    )
    rotate.add_argument("alias", type=_db_alias, metavar="db.ALIAS")
    rotate.set_defaults(handler=_cmd_secrets_rotate)

    audit = command("audit", "list the statements applications ran through the Gate")
    audit.add_argument(
        "action",
        nargs="?",
        choices=("list", "verify"),
        default="list",
        help="list statements (default), or verify the ledger's and qg audit trail's hash chains",
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


@contextlib.contextmanager
def _open_vault(config: Config) -> Iterator[Vault]:
    key = load_master_key(config)
    with _open_store(config) as store:
        yield Vault.open(store, key)


def _cmd_secrets_init_master_key(args: argparse.Namespace, config: Config) -> int:
    path = master_key_path(config)
    create_master_key(path)
    print(path)
    _err(
        f"created the master key {path} (mode 0600). Keep a copy somewhere safe: without "
        "it the vault's secrets cannot be read"
    )
    if MASTER_KEY_ENV in os.environ:
        _err(f"note: {MASTER_KEY_ENV} is set and is used instead of this file")
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
            _err(f"warning: {path} is readable by other users; delete it or chmod 600 it")
        return text
    if sys.stdin.isatty():
        return getpass.getpass(f"DSN for db.{alias} (not echoed): ")
    return sys.stdin.read()


def _cmd_secrets_set(args: argparse.Namespace, config: Config) -> int:
    dsn = _read_dsn(args, args.alias)
    with _open_vault(config) as vault:
        try:
            secret = vault.set(args.alias, dsn)
        except DsnError as exc:
            raise DsnError(f"invalid DSN for db.{args.alias}: {exc}") from None
    print(f"stored db.{secret.alias}: {secret.describe()}")
    return EXIT_OK


def _cmd_secrets_list(args: argparse.Namespace, config: Config) -> int:
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
                "created_at": _iso(e.created_at),
                "updated_at": _iso(e.updated_at),
                "rotation_pending_since": _iso(e.pending_since),
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
            f"{'db.' + e.secret.alias:<{width}}  {_iso(e.updated_at):<25}  "
            f"{e.secret.describe()}{note}"
        )
    return EXIT_OK


def _cmd_secrets_delete(args: argparse.Namespace, config: Config) -> int:
    with _open_store(config) as store:
        if not delete_secret(store, args.alias):
            _err(f"error: no secret db.{args.alias} (see `qmesh secrets list`)")
            return EXIT_USAGE
    print(f"deleted db.{args.alias}")
    return EXIT_OK


def _cmd_secrets_rotate(args: argparse.Namespace, config: Config) -> int:
    # Imported here: it pulls in psycopg, which no other command needs.
    rotate = importlib.import_module("qmesh.pg.rotate")
    with _open_vault(config) as vault:
        result = rotate.rotate_password(vault, args.alias)
    secret = result.secret
    if result.settled is not None:
        _err(f"an interrupted earlier rotation of db.{args.alias} was settled ({result.settled})")
    print(
        f"rotated db.{args.alias}: a new password for {secret.user} on "
        f"{secret.host}:{secret.port} is set on the server and stored in the vault"
    )
    if not result.verified:
        _err("warning: a fresh login with the new password failed; check the server")
        return EXIT_FAILURE
    return EXIT_OK


def _iso_ms(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat(timespec="milliseconds")


def _cmd_audit(args: argparse.Namespace, config: Config) -> int:
    if args.action == "verify":
        return finops_cli.cmd_verify(args, config)
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
    print(
        f"{'TIME':<29}  {'APP':<{app_w}}  {'ALIAS':<{alias_w}}  {'OUTCOME':<{outcome_w}}  "
        f"{'MS':>9}  {'ROWS':>7}  STATEMENT"
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
            f"{r.outcome:<{outcome_w}}  {r.duration_ms:>9.3f}  {rows_text:>7}  {shown}"
        )
    return EXIT_OK


# -- entry point ------------------------------------------------------------------


def _exit_code(code: object) -> int:
    if code is None:
        return EXIT_OK
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return EXIT_FAILURE


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``qmesh`` command line; return the exit status."""
    parser = _build_parser()
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
        _err(f"error: --role cannot be combined with the {args.command!r} command")
        return EXIT_USAGE
    if args.command == "version":
        # Works whatever state the configuration is in.
        return _cmd_version(args, None)
    try:
        config = _load_config(args)
        setup_logging(config.log.level, config.log.format)
        if roles:
            return _run_roles(config, roles)
        handler: Callable[[argparse.Namespace, Config], int] = args.handler
        try:
            return handler(args, config)
        except OSError as exc:
            # Management commands touch the data directory and output files;
            # permission problems there are for the operator to fix.
            _err(f"error: {exc}")
            return EXIT_USAGE
    except _OPERATOR_ERRORS as exc:
        _err(f"error: {exc}")
        return EXIT_USAGE
