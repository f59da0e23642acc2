"""The FinOps tables: one entry of :data:`qmesh.state.MIGRATIONS`.

``qg_ledger`` has a row per routed request (append-only; each row's
``hash`` chains it to the one before, see :mod:`qmesh.finops.chain`);
``qg_audit`` is the same kind of chain for events that are not requests
(budget state changes, provider key changes); ``qg_chain_heads`` holds
each chain's authenticated head, so deleting the newest rows is detected
too; ``qg_provider_keys`` holds provider API keys sealed with the vault's
master key. Names start with ``qg_`` so they never collide with the
Postgres path's ``pg_audit``.
"""

from __future__ import annotations

from typing import Final

__all__ = ["MIGRATION"]

MIGRATION: Final[tuple[str, ...]] = (
    """
    CREATE TABLE qg_ledger (
        id              INTEGER PRIMARY KEY,
        ts              REAL NOT NULL,
        request_id      TEXT NOT NULL,
        app             TEXT NOT NULL,
        budget          TEXT NULL,
        task            TEXT NOT NULL,
        candidate       TEXT NOT NULL,
        kind            TEXT NOT NULL,
        model           TEXT NOT NULL,
        provider        TEXT NULL,
        tokens_in       INTEGER NOT NULL,
        tokens_out      INTEGER NOT NULL,
        cost_usd        REAL NOT NULL,
        shifted_from    TEXT NULL,
        avoided_usd     REAL NOT NULL,
        outcome         TEXT NOT NULL,
        hops            TEXT NOT NULL,
        reason          TEXT NOT NULL,
        prev_hash       BLOB NOT NULL,
        hash            BLOB NOT NULL
    )
    """,
    "CREATE INDEX qg_ledger_ts ON qg_ledger (ts)",
    "CREATE INDEX qg_ledger_budget_ts ON qg_ledger (budget, ts)",
    """
    CREATE TABLE qg_audit (
        id          INTEGER PRIMARY KEY,
        ts          REAL NOT NULL,
        actor       TEXT NOT NULL,
        action      TEXT NOT NULL,
        detail      TEXT NOT NULL,
        prev_hash   BLOB NOT NULL,
        hash        BLOB NOT NULL
    )
    """,
    """
    CREATE TABLE qg_chain_heads (
        chain       TEXT PRIMARY KEY,
        last_id     INTEGER NOT NULL,
        last_hash   BLOB NOT NULL,
        rows        INTEGER NOT NULL,
        mac         BLOB NOT NULL
    )
    """,
    """
    CREATE TABLE qg_provider_keys (
        name            TEXT PRIMARY KEY,
        key_fingerprint BLOB NOT NULL,
        nonce           BLOB NOT NULL,
        ciphertext      BLOB NOT NULL,
        updated_at      REAL NOT NULL
    )
    """,
)
