"""Copying one state store into another: ``qmesh state migrate --to URL``.

For: :func:`copy_state`, which copies every table the two backends share
(:data:`SHARED_TABLES`) from a source store into a target store in **one**
write transaction on the target — so a failure leaves the target as it
was — and compares the row counts afterwards. Rows are copied as stored:
vault and provider-key rows stay sealed with the master key, ledger and
audit rows keep their ids and hashes (the chains still verify with the same
key), and an app's verifiers stay verifiers. A target that already holds
rows is refused unless ``replace`` (then its rows go first, in the same
transaction).

The graph memory's tables are copied too, ids included, so every citation
keeps its sentence id and sequence number; on PostgreSQL its triggers check
each copied mention and supporting sentence as they arrive, and its deferred
foreign keys check every entity's and relation's anchor at COMMIT, so a
copy that lost a fact's source would not commit.

Not for: the chain key (:mod:`qmesh.finops.chain`, which the command moves)
or choosing what to copy where (the command line).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final

import attrs

from qmesh.state.db import Connection
from qmesh.state.errors import StateError
from qmesh.state.store import StateStore

__all__ = ["SHARED_TABLES", "CopyReport", "TargetNotEmpty", "copy_state", "table_counts"]

SHARED_TABLES: Final = (
    "identities",
    "edge_hellos",
    "apps",
    "app_old_verifiers",
    "vault_secrets",
    "pg_audit",
    "pg_audit_blocks",
    "qg_ledger",
    "qg_audit",
    "qg_prompts",
    "qg_chain_heads",
    "qg_provider_keys",
    "app_policies",
    "budget_totals",
    "memory_documents",
    "memory_sentences",
    "memory_entities",
    "memory_mentions",
    "memory_relations",
    "memory_relation_support",
)
"""Every table both backends have, parents before children (foreign keys)."""
_INSERTION_ORDER: Final = {"app_old_verifiers": "rowid"}
"""Tables without an id whose SQLite insertion order carries meaning."""
_GENERATED_IDS: Final = {
    "pg_audit": "id",
    "pg_audit_blocks": "id",
    "memory_sentences": "seq",
    "memory_entities": "id",
    "memory_relations": "id",
}
"""PostgreSQL tables whose identity column must continue after the copied ids."""
_BATCH_ROWS: Final = 5000


class TargetNotEmpty(StateError):
    """The target already holds rows, and replacing them was not asked for."""


@attrs.frozen
class CopyReport:
    counts: dict[str, tuple[int, int]]
    """Table → (rows in the source, rows in the target after the copy)."""

    @property
    def ok(self) -> bool:
        return all(source == target for source, target in self.counts.values())


def table_counts(store: StateStore, tables: Sequence[str] = SHARED_TABLES) -> dict[str, int]:
    with store._read() as conn:
        return {t: int(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]) for t in tables}


def _columns(conn: Connection, store: StateStore, table: str) -> list[str]:
    if store.dialect == "sqlite":
        return [str(row[1]) for row in conn.execute(f"PRAGMA table_info({table})").fetchall()]
    rows = conn.execute(
        "SELECT column_name FROM information_schema.columns"
        " WHERE table_schema = current_schema() AND table_name = ?"
        " AND coalesce(identity_generation, '') != 'ALWAYS' AND is_generated = 'NEVER'"
        " ORDER BY ordinal_position",
        (table,),
    ).fetchall()
    return [str(row[0]) for row in rows]


def copy_state(
    source: StateStore,
    target: StateStore,
    *,
    replace: bool = False,
    also: Callable[[Connection], None] = lambda conn: None,
) -> CopyReport:
    """Copy :data:`SHARED_TABLES` from ``source`` into ``target``; raises
    TargetNotEmpty (nothing written) unless the target is empty or ``replace``.
    ``also`` runs last inside the target's transaction (the chain key)."""
    # One snapshot of the source for the rows and their counts: Gates may be
    # writing to it meanwhile (a backup is taken while they run).
    with source._snapshot() as read, target._write(scope="all") as write:
        before = {
            t: int(read.execute(f"SELECT count(*) FROM {t}").fetchone()[0]) for t in SHARED_TABLES
        }
        present = {
            t: int(write.execute(f"SELECT count(*) FROM {t}").fetchone()[0]) for t in SHARED_TABLES
        }
        if any(present.values()) and not replace:
            held = ", ".join(f"{t} ({n})" for t, n in present.items() if n)
            raise TargetNotEmpty(
                f"{target.location} already holds rows: {held}; "
                "--replace empties those tables first"
            )
        for table in reversed(SHARED_TABLES):
            write.execute(f"DELETE FROM {table}")
        for table in SHARED_TABLES:
            wanted = _columns(write, target, table)
            columns = [c for c in _columns(read, source, table) if c in wanted]
            listed = ", ".join(columns)
            order = _INSERTION_ORDER.get(table, "1")
            marks = ", ".join("?" for _ in columns)
            cursor = read.execute(f"SELECT {listed} FROM {table} ORDER BY {order}")
            # In batches: a ledger of millions of rows never sits in memory whole.
            while rows := cursor.fetchmany(_BATCH_ROWS):
                write.executemany(f"INSERT INTO {table} ({listed}) VALUES ({marks})", rows)
        also(write)
        if target.dialect == "postgresql":
            for table, column in _GENERATED_IDS.items():
                write.execute(
                    f"SELECT setval(pg_get_serial_sequence('{table}', '{column}'),"
                    f" coalesce((SELECT max({column}) FROM {table}), 0) + 1, false)"
                )
    after = table_counts(target)
    return CopyReport({t: (before[t], after[t]) for t in SHARED_TABLES})
