"""``qmesh apps add|list|rotate-key|disable|enable|policy``: applications, their keys and policy.

For: managing the applications that may use the mesh, on the state store
(``DATA_DIR``'s, or ``gate.database_url``), without a running Gate. An app
key is printed once, when it is made: the store keeps only its verifiers.
``policy`` shows an app's rights on the Postgres path and where they come
from, and stores changed ones in the state, where every Gate on it follows
them (:mod:`qmesh.pg.policy` says which wins over ``[gate.apps.*]``).

Not for: how keys are checked (:mod:`qmesh.state`, :mod:`qmesh.web.auth`)
or how a policy is enforced (:mod:`qmesh.pg`).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any, Final

import attrs

from qmesh.cmdline import EXIT_OK, EXIT_USAGE, Subcommands, add_command, iso_seconds, print_err
from qmesh.config import (
    AUDIT_MODES,
    KEEP_MODES,
    POOL_MODES,
    PRIVACY_FLOORS,
    Config,
    GateAppConfig,
)
from qmesh.finops.control import open_answerable
from qmesh.pg.policy import PolicyBook, policy_to_json
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
    _add_policy_command(apps_commands, common)


def _count_or_none(text: str) -> int | None:
    if text == "none":
        return None
    if not text.isdigit() or int(text) > 2**31 - 1:
        raise argparse.ArgumentTypeError(f"expected a whole number or 'none', got {text!r}")
    return int(text)


def _bounded_count(most: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        number = int(text) if text.isascii() and text.isdigit() and len(text) <= 10 else 0
        if not 1 <= number <= most:
            raise argparse.ArgumentTypeError(
                f"expected a whole number from 1 to {most}, got {text!r}"
            )
        return number

    return parse


def _add_policy_command(apps_commands: Any, common: argparse.ArgumentParser) -> None:
    policy = apps_commands.add_parser(
        "policy",
        parents=[common],
        help="show or change what an app may do on the Postgres path (kept in the state: "
        "every Gate on it follows)",
        description="Without options: the app's policy and where it comes from. With any, the "
        "policy is stored in the state, starting from the current one; a stored policy wins "
        "over [gate.apps.APP] in the config for the whole app, and running Gates apply it to "
        "new sessions within a second.",
    )
    policy.add_argument("app_id")
    policy.add_argument(
        "--databases", metavar="PATTERNS", help="comma-separated alias patterns ('' for none)"
    )
    mode = policy.add_mutually_exclusive_group()
    mode.add_argument("--read-only", dest="read_only", action="store_true", default=None)
    mode.add_argument("--read-write", dest="read_only", action="store_false")
    policy.add_argument(
        "--statement-timeout-ms", type=_count_or_none, metavar="MS|none",
        help="the sessions' statement_timeout (none: the server's)",
    )  # fmt: skip
    policy.add_argument(
        "--max-sessions", type=_count_or_none, metavar="N|none",
        help="concurrent sessions per Gate (none: no limit)",
    )  # fmt: skip
    policy.add_argument("--audit", choices=AUDIT_MODES, help="what the statement audit keeps")
    policy.add_argument(
        "--pool-mode", choices=POOL_MODES,
        help="how long a session holds a server connection: to its end, or one transaction",
    )  # fmt: skip
    policy.add_argument(
        "--pool-size", type=_bounded_count(10_000), metavar="N",
        help="server connections the app's pool holds per alias at a Gate",
    )  # fmt: skip
    policy.add_argument(
        "--pool-wait-ms", type=_bounded_count(3_600_000), metavar="MS",
        help="how long a session waits for a server connection when all are busy (then 53300)",
    )  # fmt: skip
    policy.add_argument(
        "--from-config", action="store_true",
        help="forget the stored policy: [gate.apps.APP] applies again",
    )  # fmt: skip
    for name, what in (("tasks", "tasks its DSNs may ask for"),
                       ("models", "model id patterns it may be served by"),
                       ("providers", "cloud providers it may reach")):  # fmt: skip
        policy.add_argument(
            f"--llm-{name}", metavar="LIST|any", help=f"LLM: comma-separated {what} (any: all)"
        )
    policy.add_argument(
        "--llm-privacy", choices=PRIVACY_FLOORS, help="LLM: the privacy its DSNs get at least"
    )
    policy.add_argument(
        "--llm-keep", choices=KEEP_MODES,
        help="LLM: what the ledger keeps of prompts and answers (nothing, their hash, the text)",
    )  # fmt: skip
    for name, what in (("rpm", "requests per minute"), ("tpm", "tokens per minute"),
                       ("max-tokens", "the most max_tokens a request may ask")):  # fmt: skip
        policy.add_argument(
            f"--llm-{name}", type=_count_or_none, metavar="N|none", help=f"LLM: {what} at a Gate"
        )
    policy.add_argument("--json", action="store_true", help="print JSON")
    policy.set_defaults(
        handler=_cmd_policy, statement_timeout_ms=..., max_sessions=..., llm_rpm=...,
        llm_tpm=..., llm_max_tokens=...,
    )  # fmt: skip


def _open_store(config: Config) -> StateStore:
    return StateStore.open(config.state_location)


def _cmd_add(args: argparse.Namespace, config: Config) -> int:
    with open_answerable(config) as store:
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
    with open_answerable(config) as store:
        if not store.set_app_disabled(args.app_id, True):
            print(f"app {args.app_id!r} was already disabled")
            return EXIT_OK
    print(
        f"disabled app {args.app_id!r}: its keys are refused on every path and its live "
        "Postgres sessions end (within a second at a running Gate)"
    )
    return EXIT_OK


def _cmd_enable(args: argparse.Namespace, config: Config) -> int:
    with open_answerable(config) as store:
        if not store.set_app_disabled(args.app_id, False):
            print(f"app {args.app_id!r} was not disabled")
            return EXIT_OK
    print(f"enabled app {args.app_id!r}: its keys work again")
    return EXIT_OK


def _cmd_rotate_key(args: argparse.Namespace, config: Config) -> int:
    with open_answerable(config) as store:
        key, until = store.rotate_app_key(args.app_id, args.overlap)
    print(key)
    if args.overlap > 0:
        ends = f"keeps working until {iso_seconds(until)} ({args.overlap:g} s)"
    else:
        ends = "and any earlier ones stopped working"
    print_err(f"new key for app {args.app_id!r} above, shown only once; the previous key {ends}")
    return EXIT_OK


def _cmd_policy(args: argparse.Namespace, config: Config) -> int:
    changes: dict[str, Any] = {}
    if args.databases is not None:
        changes["databases"] = tuple(p.strip() for p in args.databases.split(",") if p.strip())
    if args.read_only is not None:
        changes["read_only"] = args.read_only
    if args.statement_timeout_ms is not ...:
        if args.statement_timeout_ms == 0:
            args.statement_timeout_ms = None
        changes["statement_timeout_ms"] = args.statement_timeout_ms
    if args.max_sessions is not ...:
        changes["max_sessions"] = args.max_sessions
    if args.audit is not None:
        changes["audit_statements"] = args.audit
    if args.pool_mode is not None:
        changes["pool_mode"] = args.pool_mode
    if args.pool_size is not None:
        changes["pool_size"] = args.pool_size
    if args.pool_wait_ms is not None:
        changes["pool_wait_ms"] = args.pool_wait_ms
    llm_changes = _llm_changes(args)
    if (changes or llm_changes) and args.from_config:
        print_err("error: --from-config cannot be combined with changes")
        return EXIT_USAGE
    with open_answerable(config) as store:
        if store.get_app_keys(args.app_id) is None:
            print_err(f"error: no app with id {args.app_id!r}")
            return EXIT_USAGE
        book = PolicyBook(config)
        book.load(store)
        if args.from_config:
            store.clear_app_policy(args.app_id)
        elif changes or llm_changes:
            current = book.settings(args.app_id) or GateAppConfig()
            changes["llm"] = attrs.evolve(current.llm, **llm_changes)
            store.set_app_policy(args.app_id, policy_to_json(attrs.evolve(current, **changes)))
        book.load(store)
    settings = book.settings(args.app_id)
    source = book.source(args.app_id)
    if args.json:
        data = (
            None if settings is None else json.loads(policy_to_json(settings, with_defaults=True))
        )
        print(json.dumps({"app_id": args.app_id, "source": source, "policy": data}, indent=2))
        return EXIT_OK
    where = {
        "state": "the state (every Gate on it; [gate.apps] is not used for this app)",
        "config": f"[gate.apps.{args.app_id}] in this config (no policy stored in the state)",
        None: "none: this app may open no database",
    }[source]
    print(f"app                   {args.app_id}\nsource                {where}")
    if settings is not None:
        print(f"databases             {', '.join(settings.databases) or '(none)'}")
        print(f"read_only             {'yes' if settings.read_only else 'no'}")
        timeout = settings.statement_timeout_ms
        print(f"statement_timeout_ms  {'the server default' if timeout is None else timeout}")
        limit = settings.max_sessions
        print(f"max_sessions          {'no limit' if limit is None else limit}")
        print(f"audit_statements      {settings.audit_statements}")
        print(f"pool_mode             {settings.pool_mode}")
        print(f"pool_size             {settings.pool_size}")
        print(f"pool_wait_ms          {settings.pool_wait_ms}")
        llm = settings.llm
        for name in ("tasks", "models", "providers"):
            value = getattr(llm, name)
            print(f"llm.{name:<17} {'any' if value is None else ', '.join(value) or '(none)'}")
        print(f"llm.privacy           at least {llm.privacy}")
        print(f"llm.keep              {llm.keep} (of prompts and answers, in the ledger)")
        for name in ("requests_per_minute", "tokens_per_minute", "max_tokens"):
            value = getattr(llm, name)
            print(f"llm.{name:<17} {'no limit' if value is None else value}")
    return EXIT_OK


def _llm_changes(args: argparse.Namespace) -> dict[str, Any]:
    changes: dict[str, Any] = {}
    for name in ("tasks", "models", "providers"):
        text = getattr(args, f"llm_{name}")
        if text is not None:
            items = tuple(p.strip() for p in text.split(",") if p.strip())
            changes[name] = None if items == ("any",) else items
    if args.llm_privacy is not None:
        changes["privacy"] = args.llm_privacy
    if args.llm_keep is not None:
        changes["keep"] = args.llm_keep
    for flag, name in (("llm_rpm", "requests_per_minute"), ("llm_tpm", "tokens_per_minute"),
                       ("llm_max_tokens", "max_tokens")):  # fmt: skip
        value = getattr(args, flag)
        if value is not ...:
            changes[name] = value or None
    return changes
