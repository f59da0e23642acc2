"""The control-plane audit: who changed trust, when, from where, and what.

For: :func:`attach_recorder`, which makes a :class:`~qmesh.state.StateStore`
answerable — every control-plane change written through it (enroll, revoke,
apps added, disabled, enabled, rotated, deleted or given a policy,
operators added, re-roled or removed, secrets set, rotated or deleted) then
appends a row to the hash-chained ``qg_audit`` trail *in the transaction
that makes the change*, so none commits without its record; :func:`cli_actor`,
the name a command-line change is recorded under; what an operator does
through a running Gate's API (ending sessions, stopping models) goes
through :meth:`qmesh.web.auth.AppAuthenticator.record` into the Gate's
ledger; and
:func:`list_control`, the trail for ``qmesh audit --control``.

A record holds names and numbers only — an alias, an app id, a role, a
policy — never a key, a password or a DSN: the store's methods choose
what they pass. ``qmesh ledger verify`` checks the chain.

Not for: the request ledger (:mod:`qmesh.finops.ledger`) or the Postgres
statement audit (:mod:`qmesh.pg.audit`).
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import time
from collections.abc import Mapping
from typing import Any

import attrs

from qmesh.config import Config
from qmesh.finops.chain import append_rows, load_chain_key
from qmesh.masterkey import load_master_key
from qmesh.state import StateStore
from qmesh.state.db import Connection

__all__ = [
    "ControlRecord",
    "attach_recorder",
    "cli_actor",
    "list_control",
    "open_answerable",
]


def cli_actor() -> str:
    """``cli:USER@HOST``: whoever runs a ``qmesh`` command on the state."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (a container's arbitrary uid)
        user = f"uid{os.getuid()}"
    return f"cli:{user}@{socket.gethostname()}"


def _detail(detail: Mapping[str, object], source: str | None) -> str:
    values = dict(detail)
    if source:
        values["from"] = source
    return json.dumps(values, sort_keys=True, separators=(",", ":"))


def attach_recorder(
    store: StateStore, actor: str, *, master_key: bytes | None = None, source: str | None = None
) -> StateStore:
    """Record ``store``'s control-plane changes as ``actor`` (from
    ``source``); returns the store. The chain key is read now (on
    PostgreSQL it is sealed with ``master_key``): a store that cannot
    record refuses before anything is changed."""
    key = load_chain_key(store, master_key=master_key)

    def record(conn: Connection, action: str, detail: dict[str, object]) -> None:
        append_rows(conn, key, "audit", [(time.time(), actor, action, _detail(detail, source))])

    store.recorder = record
    return store


def open_answerable(config: Config) -> StateStore:
    """The state store of ``config`` for a command that changes it: its
    changes are recorded as :func:`cli_actor` (raises what opening the store
    or reading the master key raises)."""
    store = StateStore.open(config.state_location)
    try:
        master_key = None if store.dialect == "sqlite" else load_master_key(config)
        return attach_recorder(store, cli_actor(), master_key=master_key)
    except BaseException:
        store.close()
        raise


@attrs.frozen
class ControlRecord:
    id: int
    ts: float
    actor: str
    action: str
    detail: dict[str, Any]


def list_control(store: StateStore, *, limit: int = 50) -> list[ControlRecord]:
    """The newest ``limit`` records of the trail, oldest first."""
    with store._read() as conn:
        rows = conn.execute(
            "SELECT id, ts, actor, action, detail FROM qg_audit ORDER BY id DESC LIMIT ?",
            (max(1, limit),),
        ).fetchall()
    records = []
    for row in reversed(rows):
        try:
            detail = json.loads(row[4])
        except ValueError:
            detail = {"unreadable": row[4][:200]}
        records.append(ControlRecord(int(row[0]), float(row[1]), row[2], row[3], detail))
    return records
