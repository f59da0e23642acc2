"""``qmesh keys``, ``enroll``, ``revoke`` and ``identities``: who may join the mesh.

For: the Gate's key pair (``keys init|show``), issuing a credential for a
new MiniGate or Daemon (``enroll``), revoking one (``revoke``; a running
Gate ends its sessions within a second) and listing them (``identities``),
on the data directory's files and state store, without a running Gate.

Not for: the keys and credentials themselves (:mod:`qmesh.identity`) or the
handshake that checks them (:mod:`qmesh.tunnel`).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import time
from pathlib import Path

from qmesh.cmdline import (
    EXIT_OK,
    EXIT_USAGE,
    Subcommands,
    add_command,
    iso_seconds,
    print_err,
)
from qmesh.config import Config, parse_hostport
from qmesh.finops.control import open_answerable
from qmesh.identity import (
    GATE_KEY_ENV,
    GateKeyMissing,
    GateKeys,
    JoinToken,
    enroll,
    write_private_file,
)
from qmesh.roles import EDGE_ROLES
from qmesh.state import StateStore

__all__ = ["add_commands"]


def add_commands(commands: Subcommands, common: argparse.ArgumentParser) -> None:
    keys = add_command(commands, common, "keys", "manage the Gate's key pair")
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
    rotate = keys_commands.add_parser(
        "rotate", parents=[common],
        help="a new Gate key; the old one keeps working for --overlap, and an edge that uses "
        "it is told the new one (its credential is rewritten)",
    )  # fmt: skip
    rotate.add_argument(
        "--overlap", type=_duration, default=7 * 86400.0, metavar="DURATION",
        help="how long edges may still use the old key (default 7d)",
    )  # fmt: skip
    rotate.set_defaults(handler=_cmd_keys_rotate)

    enroll_cmd = add_command(
        commands, common, "enroll", "issue a credential for a new minigate or daemon"
    )
    enroll_cmd.add_argument("role", choices=EDGE_ROLES)
    enroll_cmd.add_argument("name", help="a unique name for the edge, e.g. web-1")
    enroll_cmd.add_argument(
        "--gate",
        metavar="HOST:PORT",
        action="append",
        help="a Gate address the edge dials; repeat it for each Gate of a cluster "
        "(default: gate.tunnel_listen)",
    )
    enroll_cmd.add_argument(
        "--out", type=Path, metavar="FILE", help="write the credential to FILE (mode 0600)"
    )
    enroll_cmd.add_argument(
        "--ttl", type=_duration, metavar="DURATION",
        help="the credential expires this long from now (90s, 30m, 12h, 30d) unless the live "
        "edge renews it, which it does by itself a third of the way before; default: never",
    )  # fmt: skip
    enroll_cmd.set_defaults(handler=_cmd_enroll)

    tokens = add_command(
        commands, common, "tokens", "one-time join tokens: an edge enrolls itself with its own key"
    )
    tokens_commands = tokens.add_subparsers(dest="tokens_command", metavar="COMMAND", required=True)
    create = tokens_commands.add_parser(
        "create", parents=[common],
        help="print a join token (shown once) that one edge trades for its identity",
    )  # fmt: skip
    create.add_argument("--role", choices=EDGE_ROLES, required=True)
    create.add_argument("--name", required=True, help="the identity the edge gets, e.g. web-7")
    create.add_argument(
        "--ttl", type=_duration, default=3600.0, metavar="DURATION",
        help="how long the token may be used (default 1h)",
    )  # fmt: skip
    create.add_argument(
        "--credential-ttl", type=_duration, metavar="DURATION",
        help="the credential it yields expires this long after (renewed by the live edge)",
    )  # fmt: skip
    create.add_argument("--gate", metavar="HOST:PORT", action="append",
                        help="as for enroll (default: gate.tunnel_listen)")  # fmt: skip
    create.add_argument(
        "--out", type=Path, metavar="FILE", help="write the token to FILE (mode 0600)"
    )
    create.set_defaults(handler=_cmd_tokens_create)
    listing = tokens_commands.add_parser("list", parents=[common], help="list join tokens")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(handler=_cmd_tokens_list)

    revoke = add_command(commands, common, "revoke", "revoke an enrolled identity")
    revoke.add_argument("name")
    revoke.set_defaults(handler=_cmd_revoke)

    identities = add_command(commands, common, "identities", "list enrolled minigates and daemons")
    identities.add_argument("--json", action="store_true", help="print JSON")
    identities.set_defaults(handler=_cmd_identities)


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(text: str) -> float:
    number, unit = (text[:-1], text[-1]) if text[-1:] in _UNITS else (text, "s")
    try:
        value = float(number) * _UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a duration like 90s, 30m, 12h or 30d, "
                                         f"got {text!r}") from None  # fmt: skip
    if not value > 0:
        raise argparse.ArgumentTypeError("a duration must be more than 0")
    return value


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _open_store(config: Config) -> StateStore:
    return StateStore.open(config.state_location)


def _load_gate_keys(config: Config) -> GateKeys:
    try:
        return GateKeys.load(config.data_dir)
    except GateKeyMissing:
        raise GateKeyMissing(
            f"no gate key in {config.data_dir}; run `qmesh keys init` first "
            "(or pass the Gate's --data-dir)"
        ) from None


def _cmd_keys_init(args: argparse.Namespace, config: Config) -> int:
    keys = GateKeys.create(config.data_dir, force=args.force)
    print(_b64(keys.public_key))
    print_err(f"created {GateKeys.path_in(config.data_dir)} (the line above is its public key)")
    return EXIT_OK


def _cmd_keys_rotate(args: argparse.Namespace, config: Config) -> int:
    if os.environ.get(GATE_KEY_ENV):
        print_err(f"error: the Gate key comes from {GATE_KEY_ENV}: rotate it where it is kept")
        return EXIT_USAGE
    with open_answerable(config) as store:
        old, new = GateKeys.rotate(config.data_dir, args.overlap)
        # Recorded in the state, which is also how running Gates hear of it.
        with store._write() as conn:
            store._record(conn, "keys.rotate", {"from": _b64(old.public_key),
                                                "to": _b64(new.public_key),
                                                "overlap_s": args.overlap})  # fmt: skip
    print(_b64(new.public_key))
    print_err(
        f"new gate key above (public); the old one works for {args.overlap:g} s more. Copy "
        f"{GateKeys.path_in(config.data_dir)} and {GateKeys.previous_path_in(config.data_dir)} "
        "to every Gate of the cluster: running Gates pick them up"
    )
    return EXIT_OK


def _cmd_keys_show(args: argparse.Namespace, config: Config) -> int:
    print(_b64(_load_gate_keys(config).public_key))
    return EXIT_OK


def _cmd_enroll(args: argparse.Namespace, config: Config) -> int:
    keys = _load_gate_keys(config)
    gate_address = _gate_address(args, config)
    if gate_address is None:
        return EXIT_USAGE
    if _out_taken(args.out):
        return EXIT_USAGE
    with open_answerable(config) as store:
        credential = enroll(store, keys, args.role, args.name, gate_address, ttl_s=args.ttl)
    _hand_over(credential.encode(), args.out, f"enrolled {args.role} {args.name!r}; the "
               "credential above is shown only once, keep it secret")  # fmt: skip
    return EXIT_OK


def _out_taken(out: Path | None) -> bool:
    if out is not None and out.exists():
        print_err(f"error: {out} already exists; remove it or choose another --out")
        return True
    return False


def _hand_over(text: str, out: Path | None, shown_once: str) -> None:
    """A secret made for someone: printed (with ``shown_once`` on stderr),
    or written to ``out`` (0600) and its path printed."""
    if out is None:
        print(text)
        print_err(shown_once)
    else:
        write_private_file(out, (text + "\n").encode("ascii"))
        print(out)


def _gate_address(args: argparse.Namespace, config: Config) -> str | None:
    """The addresses edges dial: ``--gate``s, else gate.tunnel_listen — only
    a good default when edges can dial it."""
    gate_address: str = ",".join(args.gate) if args.gate else config.gate.tunnel_listen
    if args.gate is None:
        host, port = parse_hostport(gate_address)
        if host in ("0.0.0.0", "::") or port == 0:
            print_err(
                f"error: gate.tunnel_listen is {gate_address}, which edges cannot dial; "
                "pass --gate HOST:PORT with the address they should use"
            )
            return None
    return gate_address


def _cmd_tokens_create(args: argparse.Namespace, config: Config) -> int:
    keys = _load_gate_keys(config)
    gate_address = _gate_address(args, config)
    if gate_address is None:
        return EXIT_USAGE
    if _out_taken(args.out):
        return EXIT_USAGE
    with open_answerable(config) as store:
        token_id, secret = store.create_join_token(
            args.role, args.name, args.ttl, credential_ttl_s=args.credential_ttl
        )
    token = JoinToken(token_id, secret, args.name, args.role, keys.public_key, gate_address)
    _hand_over(token.encode(), args.out, f"join token {token_id} for {args.role} {args.name!r} "
               f"above, shown only once; it works once, within {args.ttl:g} s")  # fmt: skip
    return EXIT_OK


def _cmd_tokens_list(args: argparse.Namespace, config: Config) -> int:
    with _open_store(config) as store:
        tokens = store.list_join_tokens()
    now = time.time()
    for token in tokens:
        used, expires = token["used_at"], float(token["expires_at"])  # type: ignore[arg-type]
        token["state"] = "used" if used is not None else "expired" if expires <= now else "open"
    if args.json:
        print(json.dumps(tokens, indent=2))
        return EXIT_OK
    if not tokens:
        print("no join tokens (see `qmesh tokens create --help`)")
        return EXIT_OK
    for token in tokens:
        print(f"{token['id']}  {token['role']:<8}  {token['name']}  {token['state']}  "
              f"expires {iso_seconds(float(token['expires_at']))}")  # type: ignore[arg-type]  # fmt: skip
    return EXIT_OK


def _cmd_revoke(args: argparse.Namespace, config: Config) -> int:
    with open_answerable(config) as store:
        identity = store.get_identity(args.name)
        if identity is None:
            print_err(f"error: no identity named {args.name!r} (see `qmesh identities`)")
            return EXIT_USAGE
        if not store.revoke_identity(args.name):
            print(f"{args.name} was already revoked at {iso_seconds(identity.revoked_at)}")
            return EXIT_OK
    print(f"revoked {args.name}")
    return EXIT_OK


def _cmd_identities(args: argparse.Namespace, config: Config) -> int:
    with _open_store(config) as store:
        identities = store.list_identities()
    now = time.time()
    if args.json:
        rows = [
            {
                "name": i.name,
                "role": i.role,
                "public_key": _b64(i.public_key),
                "created_at": iso_seconds(i.created_at),
                "revoked_at": iso_seconds(i.revoked_at),
                "revoked": i.revoked,
                "expires_at": iso_seconds(i.expires_at),
                "expired": i.expired(now),
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
        status = "revoked" if i.revoked else "expired" if i.expired(now) else "active"
        print(
            f"{i.name:<{width}}  {i.role:<8}  {status:<7}  {iso_seconds(i.created_at):<25}  "
            f"{_b64(i.public_key)}"
        )
    return EXIT_OK
