"""The Gate's durable state: the store, its schema and its change watcher.

- :mod:`qmesh.state.store` — :class:`StateStore`: edge identities, apps and
  their key verifiers, HELLO timestamps, and the connections that the
  capabilities' own stores (memory, FinOps, the Postgres vault and audit)
  use for their tables.
- :mod:`qmesh.state.db` — the two backends behind it: one SQLite file in
  WAL mode (the default), or PostgreSQL (``gate.database_url``).
- :mod:`qmesh.state.migrations`, :mod:`qmesh.state.pg_schema` — each
  backend's schema, one version per entry (SQLite's with the graph memory's
  and FinOps' tables in their own modules).
- :mod:`qmesh.state.errors` — the one error family of this layer.
- :mod:`qmesh.state.watch` — notices commits by other processes (``qmesh
  revoke`` from a shell) and wakes the Gate's subscribers.

The names below are the package's public face; import them from here.
"""

from __future__ import annotations

from qmesh.state.db import DATABASE_ERRORS, INTEGRITY_ERRORS, is_database_url
from qmesh.state.errors import (
    AppExists,
    IdentityExists,
    InvalidValue,
    StateError,
    StateUnavailable,
)
from qmesh.state.migrations import MIGRATIONS
from qmesh.state.pg_schema import POSTGRES_MIGRATIONS
from qmesh.state.store import (
    SCRAM_ITERATIONS,
    App,
    AppKeys,
    AppVerifier,
    Identity,
    StateStore,
    check_name,
    scram_keys,
)

__all__ = [
    "DATABASE_ERRORS",
    "INTEGRITY_ERRORS",
    "MIGRATIONS",
    "POSTGRES_MIGRATIONS",
    "SCRAM_ITERATIONS",
    "App",
    "AppExists",
    "AppKeys",
    "AppVerifier",
    "Identity",
    "IdentityExists",
    "InvalidValue",
    "StateError",
    "StateStore",
    "StateUnavailable",
    "check_name",
    "is_database_url",
    "scram_keys",
]
