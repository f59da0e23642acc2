"""Which edges may hold a tunnel session at the Gate.

For: authenticating each tunnel handshake against the identities enrolled
in the state store (unknown and revoked keys are refused, and so is a
replayed HELLO), and ending the live sessions of identities that lose their
standing. ``qmesh revoke`` from another process reaches the running Gate
through :class:`qmesh.state.watch.StateWatcher`, which calls :meth:`EnrolledEdges.sweep`.

Not for: issuing or storing credentials (:mod:`qmesh.identity`,
:mod:`qmesh.state`) or the handshake itself (:mod:`qmesh.tunnel`).
"""

from __future__ import annotations

import hashlib

import trio

from qmesh.config.reader import GATE_NAME_RE
from qmesh.state import StateStore
from qmesh.tunnel import HandshakeRefused, TunnelServer
from qmesh.tunnel.handshake import Hello

__all__ = ["EnrolledEdges"]


class EnrolledEdges:
    """Authenticates edges against the identities in the Gate's state store,
    and ends the sessions of identities that lose their standing.

    Each handshake reads the store and records the HELLO's timestamp (a
    replayed HELLO is refused). ``qmesh revoke`` from another process reaches
    the running Gate through its :class:`StateWatcher`: :meth:`sweep` then
    ends every session of a revoked identity, telling the edge why.
    """

    def __init__(
        self, store: StateStore, *, gate_public_key: bytes | None = None, gate_name: str = ""
    ) -> None:
        self.store = store
        self.gate_public_key = gate_public_key
        """The cluster's own key: a peer holding it is another Gate (role ``gate``)."""
        self.gate_name = gate_name

    async def authenticate(self, public_key: bytes, hello: Hello) -> tuple[str, str]:
        if self.gate_public_key is not None and public_key == self.gate_public_key:
            return await trio.to_thread.run_sync(self._authenticate_gate, hello)
        return await trio.to_thread.run_sync(self._authenticate, public_key, hello.timestamp)

    def _authenticate_gate(self, hello: Hello) -> tuple[str, str]:
        """Another Gate of the cluster: it proved it holds the Gate key. Its
        HELLO timestamps are kept per pair of Gates: every Gate has the same
        key, and one Gate's links to two others run their clocks apart."""
        name = hello.name.removeprefix("gate:")
        if hello.role != "gate" or name == hello.name or not GATE_NAME_RE.fullmatch(name):
            raise HandshakeRefused("not_enrolled", "the Gate key is for the Gates of the cluster")
        pair = f"{name}\0{self.gate_name}".encode()
        replay_key = hashlib.sha256(b"qmesh gate\0" + pair).digest()
        if not self.store.accept_hello_timestamp(replay_key, hello.timestamp):
            raise HandshakeRefused(
                "replayed", "HELLO timestamp is not newer than this Gate's last one"
            )
        return hello.name, "gate"

    def _authenticate(self, public_key: bytes, timestamp: int) -> tuple[str, str]:
        identity = self.store.find_identity_by_key(public_key)
        if identity is None:
            raise HandshakeRefused("not_enrolled", "this key is not enrolled at the gate")
        if identity.revoked:
            raise HandshakeRefused("revoked", f"identity {identity.name!r} was revoked")
        if not self.store.accept_hello_timestamp(public_key, timestamp):
            raise HandshakeRefused(
                "replayed",
                "HELLO timestamp is not newer than this key's last one "
                "(a replayed handshake, or the edge's clock went back)",
            )
        return identity.name, identity.role

    async def sweep(self, server: TunnelServer) -> None:
        """End the sessions of identities that are revoked (or gone)."""
        identities = await trio.to_thread.run_sync(self.store.list_identities)
        standing = {i.name: i.revoked for i in identities}
        for peer in {s.peer for s in server.sessions.values() if s.peer_role != "gate"}:
            revoked = standing.get(peer, True)
            if revoked:
                reason = "identity revoked" if peer in standing else "identity no longer enrolled"
                server.end_sessions_of(peer, reason)
