"""The Gate's durable state: the store, its schema and its change watcher.

- :mod:`qmesh.state.store` — :class:`StateStore`, one SQLite database in WAL
  mode: edge identities, apps and their key verifiers, HELLO timestamps, and
  the connection that the capabilities' own stores (memory, FinOps, the
  Postgres vault and audit) use for their tables.
- :mod:`qmesh.state.migrations` — the schema, one version per entry, with
  the graph memory's and FinOps' tables in their own modules.
- :mod:`qmesh.state.watch` — notices commits by other processes (``qmesh
  revoke`` from a shell) and wakes the Gate's subscribers.

The names below are the package's public face; import them from here.
"""

from __future__ import annotations

from qmesh.state.migrations import MIGRATIONS
from qmesh.state.store import (
    SCRAM_ITERATIONS,
    App,
    AppExists,
    AppKeys,
    AppVerifier,
    Identity,
    IdentityExists,
    InvalidValue,
    StateError,
    StateStore,
    StateUnavailable,
    check_name,
    scram_keys,
)

__all__ = [
    "MIGRATIONS",
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
    "scram_keys",
]
