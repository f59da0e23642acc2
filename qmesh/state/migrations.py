"""The state store's schema, one version per entry, in the order they apply.

For: every table of the Gate's state database — edge identities and apps
here, the graph memory's (:mod:`qmesh.state.memory_tables`) and FinOps'
(:mod:`qmesh.state.finops_tables`) in their own modules — as one ordered
list, because a schema version is a number for the whole database.

Not for: reading or writing rows (:mod:`qmesh.state.store`, and the
capabilities' own stores such as :mod:`qmesh.memory.store`).
"""

from __future__ import annotations

from typing import Final

from qmesh.state.finops_tables import MIGRATION as FINOPS_MIGRATION
from qmesh.state.memory_tables import MIGRATION as MEMORY_MIGRATION
from qmesh.state.memory_tables import SHARING_MIGRATION as MEMORY_SHARING_MIGRATION

__all__ = ["MIGRATIONS"]

# Each entry is one schema version: the statements that take the database
# from the previous version to it. Append only; never edit a released entry.
MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        """
        CREATE TABLE identities (
            name        TEXT PRIMARY KEY,
            role        TEXT NOT NULL CHECK (role IN ('minigate', 'daemon')),
            public_key  BLOB NOT NULL UNIQUE,
            created_at  REAL NOT NULL,
            revoked_at  REAL NULL
        )
        """,
        """
        CREATE TABLE apps (
            app_id            TEXT PRIMARY KEY,
            scram_salt        BLOB NOT NULL,
            scram_iterations  INTEGER NOT NULL,
            stored_key        BLOB NOT NULL,
            server_key        BLOB NOT NULL,
            created_at        REAL NOT NULL
        )
        """,
    ),
    # The Gate's Postgres path: the vault of real database credentials
    # (qmesh.pg.vault; values AES-256-GCM sealed, with a pending slot for a
    # rotation in flight), the statement audit log (qmesh.pg.audit), and app
    # keys that rotate with an overlap: the previous verifiers of an app stay
    # valid until expires_at. They share the app's salt and iterations, so a
    # SCRAM server can send one salt and check the proof against each.
    (
        """
        CREATE TABLE vault_secrets (
            alias               TEXT PRIMARY KEY,
            key_fingerprint     BLOB NOT NULL,
            nonce               BLOB NOT NULL,
            ciphertext          BLOB NOT NULL,
            pending_nonce       BLOB NULL,
            pending_ciphertext  BLOB NULL,
            pending_since       REAL NULL,
            created_at          REAL NOT NULL,
            updated_at          REAL NOT NULL
        )
        """,
        """
        CREATE TABLE pg_audit (
            id                INTEGER PRIMARY KEY,
            ts                REAL NOT NULL,
            app               TEXT NOT NULL,
            alias             TEXT NOT NULL,
            statement         TEXT NULL,
            statement_sha256  TEXT NOT NULL,
            duration_ms       REAL NOT NULL,
            rows              INTEGER NULL,
            outcome           TEXT NOT NULL
        )
        """,
        "CREATE INDEX pg_audit_ts ON pg_audit (ts)",
        "CREATE INDEX pg_audit_app_ts ON pg_audit (app, ts)",
        "ALTER TABLE apps ADD COLUMN key_created_at REAL NULL",
        """
        CREATE TABLE app_old_verifiers (
            app_id      TEXT NOT NULL REFERENCES apps (app_id) ON DELETE CASCADE,
            stored_key  BLOB NOT NULL,
            server_key  BLOB NOT NULL,
            created_at  REAL NOT NULL,
            expires_at  REAL NOT NULL
        )
        """,
        "CREATE INDEX app_old_verifiers_app ON app_old_verifiers (app_id, expires_at)",
    ),
    # The graph memory: documents, sentences, entities, relations and their
    # provenance (qmesh.state.memory_tables says what the database enforces).
    MEMORY_MIGRATION,
    # The capability router's books: the hash-chained request ledger and
    # audit trail, their heads, and sealed provider API keys (qmesh.finops).
    FINOPS_MIGRATION,
    # The newest HELLO timestamp seen per edge key: a replayed Noise message 1
    # carries an old one and is refused (qmesh.tunnel.handshake).
    (
        """
        CREATE TABLE edge_hellos (
            public_key  BLOB PRIMARY KEY,
            last_ts     INTEGER NOT NULL
        )
        """,
    ),
    # An app the operator disabled (qmesh apps disable): its keys are refused
    # on every path and its live Postgres sessions end; enabling restores it.
    ("ALTER TABLE apps ADD COLUMN disabled_at REAL NULL",),
    # Graph memory documents belong to the app that added them; "shared" lets
    # every app read one (qmesh.state.memory_tables).
    MEMORY_SHARING_MIGRATION,
    # Per-app policy kept in the state, so every Gate on it enforces the same
    # rules (qmesh apps policy; JSON of qmesh.config.GateAppConfig's fields).
    (
        """
        CREATE TABLE app_policies (
            app_id      TEXT PRIMARY KEY REFERENCES apps (app_id) ON DELETE CASCADE,
            policy      TEXT NOT NULL,
            updated_at  REAL NOT NULL
        )
        """,
    ),
    # Budgets' running totals per period, shared by every Gate on the state
    # (qmesh.finops.totals): paid reservations are checked against them.
    (
        """
        CREATE TABLE budget_totals (
            name          TEXT NOT NULL,
            period_start  REAL NOT NULL,
            spent         REAL NOT NULL,
            reserved      REAL NOT NULL,
            version       INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (name, period_start)
        )
        """,
    ),
    # The Gates sharing this state, each with its heartbeat (qmesh.cluster).
    (
        """
        CREATE TABLE gates (
            name          TEXT PRIMARY KEY,
            instance      TEXT NOT NULL,
            tunnel        TEXT NOT NULL,
            http          TEXT NOT NULL,
            host          TEXT NOT NULL,
            version       TEXT NOT NULL,
            started_at    REAL NOT NULL,
            heartbeat_at  REAL NOT NULL,
            gone_after_s  REAL NOT NULL,
            sessions      INTEGER NOT NULL DEFAULT 0,
            stopped_at    REAL NULL
        )
        """,
    ),
    # Postgres sessions per app and Gate, so that max_sessions holds across
    # the cluster (StateStore.claim_app_session).
    (
        """
        CREATE TABLE app_sessions (
            gate      TEXT NOT NULL,
            app_id    TEXT NOT NULL REFERENCES apps (app_id) ON DELETE CASCADE,
            sessions  INTEGER NOT NULL CHECK (sessions >= 0),
            PRIMARY KEY (gate, app_id)
        )
        """,
    ),
    # Operators: an app with a role holds that role's rights at the Gate
    # (qmesh.operator_roles); NULL is an application. The admin app made at
    # setup has always been the operator.
    (
        "ALTER TABLE apps ADD COLUMN role TEXT NULL",
        "UPDATE apps SET role = 'admin' WHERE app_id = 'admin'",
    ),
    # Credentials with an expiry (qmesh enroll --ttl): a live edge renews
    # its own before then (qmesh.admission); NULL: no expiry.
    (
        "ALTER TABLE identities ADD COLUMN expires_at REAL NULL",
        "ALTER TABLE identities ADD COLUMN ttl_s REAL NULL",
    ),
    # One-time join tokens (qmesh tokens create): an edge trades one for an
    # identity whose key it made itself (qmesh.admission).
    (
        """
        CREATE TABLE join_tokens (
            id              TEXT PRIMARY KEY,
            secret_hash     BLOB NOT NULL,
            role            TEXT NOT NULL,
            name            TEXT NOT NULL,
            credential_ttl_s REAL NULL,
            created_at      REAL NOT NULL,
            expires_at      REAL NOT NULL,
            used_at         REAL NULL
        )
        """,
    ),
    # A Gate asked to drain (qmesh gates drain NAME): it sees it at its next
    # heartbeat; registering again clears it.
    ("ALTER TABLE gates ADD COLUMN drain_requested_at REAL NULL",),
    # What the ledger keeps of prompts and answers, for the apps whose policy
    # asks (llm.keep = hash | text): a hash-chained table of its own
    # (qmesh.finops.chain's "prompts").
    (
        """
        CREATE TABLE qg_prompts (
            id          INTEGER PRIMARY KEY,
            ts          REAL NOT NULL,
            request_id  TEXT NOT NULL,
            app         TEXT NOT NULL,
            kept        TEXT NOT NULL,
            prompt      TEXT NOT NULL,
            answer      TEXT NOT NULL,
            prev_hash   BLOB NOT NULL,
            hash        BLOB NOT NULL
        )
        """,
        "CREATE INDEX qg_prompts_app_ts ON qg_prompts (app, ts)",
    ),
    # Server connections the Gates' Postgres pools hold per alias, for
    # gate.pg_pool.max_server_connections_per_alias (qmesh.pg.pool).
    (
        """
        CREATE TABLE pool_connections (
            gate        TEXT NOT NULL,
            alias       TEXT NOT NULL,
            connections INTEGER NOT NULL CHECK (connections >= 0),
            PRIMARY KEY (gate, alias)
        )
        """,
    ),
    # Which client session ran each audited statement (qmesh.pg.audit).
    ("ALTER TABLE pg_audit ADD COLUMN session TEXT NULL",),
    # The statement audit in compressed blocks, one per (app, alias) and
    # batch (qmesh.pg.audit); pg_audit keeps the records written before.
    # A record's id is its block's times 1,024 (_core.AUDIT_BLOCK_RECORDS)
    # plus its place, so block ids start past pg_audit's last id.
    (
        """
        CREATE TABLE pg_audit_blocks (
            id        INTEGER PRIMARY KEY AUTOINCREMENT,
            app       TEXT NOT NULL,
            alias     TEXT NOT NULL,
            first_ts  REAL NOT NULL,
            last_ts   REAL NOT NULL,
            records   INTEGER NOT NULL,
            body      BLOB NOT NULL
        )
        """,
        "CREATE INDEX pg_audit_blocks_last_ts ON pg_audit_blocks (last_ts)",
        "CREATE INDEX pg_audit_blocks_app_last_ts ON pg_audit_blocks (app, last_ts)",
        """
        INSERT INTO sqlite_sequence (name, seq)
        SELECT 'pg_audit_blocks', COALESCE(MAX(id), 0) / 1024 + 1 FROM pg_audit
        """,
    ),
)
