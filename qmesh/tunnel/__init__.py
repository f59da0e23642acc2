"""The sealed, resumable tunnel between edges (MiniGate, Daemon) and the Gate.

One TCP connection carries many logical streams. The Rust core seals and
opens frames, and its engine (one per session) carries the per-message path;
this package owns connecting and handshakes, the timers, and the state that
outlives a connection (a :class:`~qmesh.tunnel.session.Session`).
"""

from qmesh.tunnel.client import TunnelClient
from qmesh.tunnel.errors import (
    ConnectionLost,
    HandshakeFailed,
    HandshakeRefused,
    PeerProtocolError,
    SessionLost,
    StreamReset,
    TunnelError,
)
from qmesh.tunnel.server import TunnelServer
from qmesh.tunnel.session import Session
from qmesh.tunnel.stream import TunnelStream

__all__ = [
    "ConnectionLost",
    "HandshakeFailed",
    "HandshakeRefused",
    "PeerProtocolError",
    "Session",
    "SessionLost",
    "StreamReset",
    "TunnelClient",
    "TunnelError",
    "TunnelServer",
    "TunnelStream",
]
