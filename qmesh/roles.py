"""The names of qmesh's roles, written down once.

For: the roles one ``qmesh`` executable can run (``qmesh --role``, the
runner, ``qmesh up``) and the subset an enrolled edge identity can have
(``qmesh enroll``, the state store, credentials). The Gate is a role but
never an edge: it holds the key that edges are enrolled against.

Not for: what a role does (``qmesh.gate``, ``qmesh.minigate``,
``qmesh.daemon``). This module imports nothing, so every layer can use it.
"""

from __future__ import annotations

from typing import Final

__all__ = ["EDGE_ROLES", "ROLES"]

ROLES: Final = ("gate", "minigate", "daemon")
"""Every role, in the order they start (edges dial the Gate, so it comes first)."""
EDGE_ROLES: Final = ("minigate", "daemon")
"""Roles an enrolled edge identity can have: every role but the Gate."""
