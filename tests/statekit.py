"""Helpers for tests that run on both state backends (the ``state_location`` fixture)."""

from __future__ import annotations

import zstandard

from qmesh.state import StateStore


def stored_bytes(store: StateStore) -> bytes:
    """Everything the state holds, as an attacker with a copy would see it:
    the SQLite files, or every row of every table (bytea as PostgreSQL prints
    it); and the audit's compressed blocks decompressed (compression hides
    nothing)."""
    with store._read() as conn:
        bodies = [bytes(row[0]) for row in conn.execute("SELECT body FROM pg_audit_blocks")]
        blocks = b"".join(zstandard.ZstdDecompressor().decompress(body) for body in bodies)
        if store.path is not None:
            files = [p.read_bytes() for p in store.path.parent.iterdir() if p.is_file()]
            return b"".join(files) + blocks
        tables = [row[0] for row in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
        ).fetchall()]  # fmt: skip
        return (
            "\n".join(
                str(row[0])
                for table in tables
                for row in conn.execute(f"SELECT row_to_json(t)::text FROM {table} t").fetchall()
            ).encode()
            + blocks
        )


OPEN_STORES: list[StateStore] = []


def close_after_the_test(store: StateStore) -> StateStore:
    """Close ``store`` once the test is over — after its nursery, whose tasks
    may still be using it, has ended (conftest's ``_close_state_stores``):
    a PostgreSQL store holds connections to the shared cluster."""
    OPEN_STORES.append(store)
    return store
