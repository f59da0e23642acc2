"""The cluster's errors: one family, a kind of state error (the shared state
is where Gates meet), so commands print them as one line."""

from __future__ import annotations

from qmesh.state import StateError

__all__ = ["ClusterError", "GateNameInUse"]


class ClusterError(StateError):
    """Gates sharing a state disagree about something only one may hold."""


class GateNameInUse(ClusterError):
    """Another live Gate, elsewhere, already registered this ``gate.name``."""
