"""Which edges may hold a tunnel session at the Gate.

For: authenticating each tunnel handshake against the identities enrolled
in the state store (unknown, revoked and expired keys are refused, and so
is a replayed HELLO), ending the live sessions of identities that lose their
standing, and the ``renew`` service by which a live edge extends its own
credential before it expires (``qmesh enroll --ttl``). ``qmesh revoke``
from another process reaches the running Gate through
:class:`qmesh.state.watch.StateWatcher`, which calls :meth:`EnrolledEdges.sweep`;
expiry, which nobody writes, is swept on a timer
(:meth:`EnrolledEdges.expire_forever`).

Not for: issuing or storing credentials (:mod:`qmesh.identity`,
:mod:`qmesh.state`) or the handshake itself (:mod:`qmesh.tunnel`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Final

import trio

from qmesh.config.reader import GATE_NAME_RE
from qmesh.identity import parse_join_proof
from qmesh.state import Identity, InvalidValue, StateStore
from qmesh.tunnel import HandshakeRefused, TunnelError, TunnelServer, TunnelStream
from qmesh.tunnel.handshake import Hello

__all__ = ["EXPIRY_CHECK_S", "RENEW_SERVICE", "EnrolledEdges"]

log = logging.getLogger(__name__)

EXPIRY_CHECK_S: Final = 30.0
RENEW_SERVICE: Final = "renew"


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
        self.previous_gate_public_key: bytes | None = None
        """The cluster's key before a rotation, while its overlap lasts: a
        Gate that has not read the new one yet is still a Gate."""
        self.gate_name = gate_name
        self._new_expiry = trio.Event()
        """Set when an edge with an expiring credential is let in: the expiry
        timer looks again."""

    async def authenticate(self, public_key: bytes, hello: Hello) -> tuple[str, str]:
        if public_key in (self.gate_public_key, self.previous_gate_public_key):
            return await trio.to_thread.run_sync(self._authenticate_gate, hello)
        name, role, expires_at = await trio.to_thread.run_sync(
            self._authenticate, public_key, hello
        )
        if expires_at is not None:
            self._new_expiry.set()
        return name, role

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

    def _authenticate(self, public_key: bytes, hello: Hello) -> tuple[str, str, float | None]:
        timestamp = hello.timestamp
        identity = self.store.find_identity_by_key(public_key)
        if identity is None and hello.join is not None:
            identity = self._join(public_key, hello)
        if identity is None:
            raise HandshakeRefused("not_enrolled", "this key is not enrolled at the gate")
        if identity.revoked:
            raise HandshakeRefused("revoked", f"identity {identity.name!r} was revoked")
        if identity.expired(time.time()):
            raise HandshakeRefused(
                "expired",
                f"the credential of {identity.name!r} expired (it was not renewed in time): "
                "enroll the edge again",
            )
        if not self.store.accept_hello_timestamp(public_key, timestamp):
            raise HandshakeRefused(
                "replayed",
                "HELLO timestamp is not newer than this key's last one "
                "(a replayed handshake, or the edge's clock went back)",
            )
        return identity.name, identity.role, identity.expires_at

    def _join(self, public_key: bytes, hello: Hello) -> Identity:
        """Enroll a key the edge made itself, against a one-time token."""
        try:
            token_id, secret = parse_join_proof(hello.join or "")
            identity = self.store.redeem_join_token(token_id, secret, hello.role, public_key)
        except (ValueError, InvalidValue) as exc:
            raise HandshakeRefused("join_refused", f"join token refused: {exc}") from None
        log.info("%s %r joined with a one-time token", identity.role, identity.name)
        return identity

    async def sweep(self, server: TunnelServer) -> None:
        """End the sessions of identities that are revoked, expired (or gone)."""
        await self._sweep(server)

    async def _sweep(self, server: TunnelServer) -> float | None:
        """:meth:`sweep`; the earliest expiry among the live ones, if any."""
        identities = {i.name: i for i in await trio.to_thread.run_sync(self.store.list_identities)}
        now = time.time()
        earliest: float | None = None
        for peer in {s.peer for s in server.sessions.values() if s.peer_role != "gate"}:
            identity = identities.get(peer)
            if identity is None:
                server.end_sessions_of(peer, "identity no longer enrolled")
            elif identity.revoked:
                server.end_sessions_of(peer, "identity revoked")
            elif identity.expired(now):
                server.end_sessions_of(peer, "credential expired (not renewed in time)")
            elif identity.expires_at is not None:
                earliest = (
                    identity.expires_at if earliest is None else min(earliest, identity.expires_at)
                )
        return earliest

    async def expire_forever(self, server: TunnelServer) -> None:
        """Expiry is not a change anyone makes to the state: sweep when the
        earliest credential of a live session is due, again when an edge with
        an expiring credential comes in, and at least every
        :data:`EXPIRY_CHECK_S` (a renewal moves an expiry later)."""
        while True:
            earliest = await self._sweep(server)
            wait = EXPIRY_CHECK_S if earliest is None else earliest - time.time() + 0.01
            with trio.move_on_after(min(max(wait, 0.01), EXPIRY_CHECK_S)):
                await self._new_expiry.wait()
            self._new_expiry = trio.Event()

    async def renew(self, stream: TunnelStream) -> None:
        """The ``renew`` service: an edge extends its own credential (it
        proved its key in the handshake); answers one JSON line."""
        name = stream.session.peer
        answer: dict[str, object]
        try:
            expires = await trio.to_thread.run_sync(self.store.renew_identity, name)
            answer = {"ok": True, "expires_at": expires}
        except InvalidValue as exc:
            answer = {"ok": False, "error": str(exc)}
        try:
            await stream.send_all(json.dumps(answer).encode() + b"\n")
            await stream.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError, TunnelError):
            pass
        finally:
            await trio.aclose_forcefully(stream)
