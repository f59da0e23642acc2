"""The state layer's one error family: what the operator or caller can act on.

Not for: bugs (a closed store is a RuntimeError) or a backend's own
exceptions, which the state layer turns into these where the caller can act.
"""

from __future__ import annotations

__all__ = ["AppExists", "IdentityExists", "InvalidValue", "StateError", "StateUnavailable"]


class StateError(Exception):
    """The state store cannot do what was asked: the request conflicts with
    what is stored, a value is invalid, or the database cannot be used.
    Raised for the operator's or caller's input, not for bugs."""


class StateUnavailable(StateError):
    """The database cannot be opened or used: an unreadable file, not a
    SQLite database, an unreachable or read-only PostgreSQL, or a schema
    written by a newer qmesh than this one."""


class InvalidValue(StateError, ValueError):
    """A name, role, app id or key is not acceptable."""


class IdentityExists(StateError):
    """An identity with this name (or this public key) is already enrolled."""


class AppExists(StateError):
    """An application with this app id already exists."""
