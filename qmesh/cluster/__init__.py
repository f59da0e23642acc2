"""Gates that share one state: the registry each Gate heartbeats into.

For: :class:`GateRegistry` (a Gate's own row: registered at start, a
heartbeat every ``gate.cluster.heartbeat_interval_s``, marked stopped on a
clean stop), :func:`list_gates` (every Gate of the cluster with its state:
live, gone or stopped) and ``qmesh gates`` (:mod:`qmesh.cluster.cli`).
See docs/cluster.md.
"""

from qmesh.cluster.errors import ClusterError, GateNameInUse
from qmesh.cluster.registry import GateRecord, GateRegistry, list_gates

__all__ = ["ClusterError", "GateNameInUse", "GateRecord", "GateRegistry", "list_gates"]
