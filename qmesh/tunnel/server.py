"""The Gate's tunnel listener: authenticates edges and keeps their sessions.

A session whose connection drops is kept, detached, for the resume grace
period; an edge that comes back within it continues where it stopped.
Resuming requires the same enrolled key that opened the session.

This listener is a boundary: anyone who knows the Gate's public key can
reach the handshake, and every enrolled edge can send frames. One place,
:meth:`TunnelServer._handle_connection`, stands between a connection and the
process: whatever goes wrong while serving it ends that connection (after
authentication, at worst its session) with a logged reason, and never the
listener or another edge's session. Bounds: handshakes in flight, handshake
time, sessions per identity and in all; streams per session are bounded by
the session.

Running out of file descriptors or memory refuses what needed them and
nothing else: accept waits and retries (:func:`serve_listeners`), a session
that cannot be made is refused with ``gate_full`` (so its edge tries the
next Gate of the cluster), and the sessions already held carry on. The
session cap (``tunnel.max_sessions``) refuses before the descriptors run
out, which keeps room for the streams of the sessions held.

A replayed handshake message is refused by its HELLO timestamp (checked by
``authenticate``, which keeps the newest one per key); without that check a
replay could make the Gate drop a session's live connection.
"""

from __future__ import annotations

import logging
import os
import resource
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import TYPE_CHECKING

import trio

from qmesh.fastsocket import (
    descriptor_reserve,
    open_listeners,
    out_of_descriptors,
    serve_listeners,
    within_descriptor_reserve,
)
from qmesh.tunnel import handshake
from qmesh.tunnel.errors import (
    ConnectionLost,
    HandshakeFailed,
    HandshakeRefused,
    PeerProtocolError,
    SessionLost,
)
from qmesh.tunnel.services import ServiceHandler, dispatcher
from qmesh.tunnel.session import Session

if TYPE_CHECKING:
    from qmesh.config import TunnelConfig

log = logging.getLogger(__name__)

Authenticate = Callable[[bytes, handshake.Hello], Awaitable[tuple[str, str]]]
"""Maps an edge's public key and HELLO to ``(name, role)`` or raises
HandshakeRefused (not enrolled, revoked, a replayed HELLO)."""


class TunnelServer:
    """Accepts edge connections; one :class:`Session` per enrolled edge session."""

    def __init__(
        self,
        settings: TunnelConfig,
        *,
        name: str,
        private_key: bytes,
        authenticate: Authenticate,
        services: Mapping[str, ServiceHandler],
        services_by_role: Mapping[str, Collection[str]] | None = None,
    ) -> None:
        """``services_by_role`` names the services each edge role may open
        (a role it does not list may open none); None opens every service to
        every role."""
        self.settings = settings
        self.name = name
        self._private_key = private_key
        self._previous_key: tuple[bytes, float] | None = None
        self._authenticate = authenticate
        self.services = dict(services)
        self._services_by_role = (
            None
            if services_by_role is None
            else {role: frozenset(names) for role, names in services_by_role.items()}
        )
        self.sessions: dict[bytes, Session] = {}
        # The same sessions by edge, oldest first: a handshake checks its
        # edge's cap here, not by scanning every session of the Gate.
        self._by_peer: dict[str, dict[bytes, Session]] = {}
        self._generation: dict[bytes, int] = {}
        self._nursery: trio.Nursery | None = None
        self._handshakes_in_flight = 0
        self.draining = False
        """Set by :meth:`drain`: handshakes are refused (``draining``, which an
        edge answers by trying the cluster's next Gate)."""
        self.resumptions = 0
        self.handshake_failures = 0
        self.handshakes_shed = 0
        self.connection_errors = 0
        self.sessions_refused = 0
        self.max_sessions = settings.max_sessions or _sessions_for_open_file_limit()

    def __repr__(self) -> str:
        return f"<TunnelServer {self.name!r} sessions={len(self.sessions)}>"

    async def serve(
        self,
        host: str,
        port: int,
        *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``host:port``; ``task_status.started`` gets the bound port."""
        listeners = await open_listeners(host, port, purpose="the Gate's tunnel")
        bound_port: int = listeners[0].socket.getsockname()[1]
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                log.info("tunnel listening on %s:%d", host, bound_port)
                task_status.started(bound_port)
                await serve_listeners(
                    self._handle_connection, listeners, what="tunnel", handler_nursery=nursery
                )
        finally:
            for session in list(self.sessions.values()):
                session.lose(SessionLost("gate shutting down"))
            self.sessions.clear()
            self._by_peer.clear()

    def sessions_of(self, peer: str) -> list[Session]:
        """The sessions of the identity ``peer``, oldest first."""
        return list(self._by_peer.get(peer, {}).values())

    def end_session(self, session: Session, reason: str, *, between_answers: bool = False) -> None:
        """End ``session`` for good: the edge is told ``reason`` (GOAWAY) and
        may not resume it; ``between_answers``: and that no answer was cut."""
        log.info("ending %s: %s", session, reason)
        session.end(reason, between_answers=between_answers)
        self._forget(session)

    def set_keys(self, private_key: bytes, previous: tuple[bytes, float] | None) -> None:
        """The Gate key, and the one a rotation replaced with the end of its
        overlap (wall clock): new handshakes use them; sessions keep theirs."""
        self._private_key = private_key
        self._previous_key = previous

    def _previous_private(self) -> bytes | None:
        previous = self._previous_key
        if previous is None or previous[1] <= time.time():
            return None
        return previous[0]

    def drain(self, reason: str, *, between_answers: bool = False) -> int:
        """Take no more sessions, and end the edges' (GOAWAY ``reason``): each
        moves to the cluster's next Gate at once, where a MiniGate sends again
        the requests whose answers had not begun (and, ``between_answers``,
        carries its applications' idle connections over). Links to other
        Gates stay (they carry requests for this Gate's nodes until it
        stops). How many sessions were ended."""
        self.draining = True
        edges = [s for s in self.sessions.values() if s.peer_role != "gate"]
        for session in edges:
            self.end_session(session, reason, between_answers=between_answers)
        return len(edges)

    def end_sessions_of(self, peer: str, reason: str) -> int:
        """End every session of the identity ``peer``; how many there were."""
        sessions = self.sessions_of(peer)
        for session in sessions:
            self.end_session(session, reason)
        return len(sessions)

    async def _handle_connection(self, transport: trio.SocketStream) -> None:
        """Serve one connection, start to end; never raises (see the module
        docstring: this is the boundary)."""
        address = _address(transport)
        try:
            if self._handshakes_in_flight >= self.settings.max_handshakes_in_flight:
                self.handshakes_shed += 1
                if self.handshakes_shed % 1000 == 1:  # a flood must not flood the log too
                    log.warning(
                        "%d handshakes in flight: closing new connections (%d so far, from %s)",
                        self._handshakes_in_flight,
                        self.handshakes_shed,
                        address,
                    )
                return
            await self._serve(transport, address)
        except Exception as exc:
            self.connection_errors += 1
            if out_of_descriptors(exc):
                log.warning("connection from %s closed: %s", address, exc)
            else:
                log.exception("connection from %s failed unexpectedly; closed", address)
        finally:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(transport)

    async def _serve(self, transport: trio.SocketStream, address: str) -> None:
        generation = 0
        fd = transport.socket.fileno()

        async def decide(edge_key: bytes, hello: handshake.Hello) -> handshake.Welcome:
            nonlocal generation
            welcome = await self._decide(edge_key, hello, fd)
            generation = self._generation[welcome.session_id]
            return welcome

        self._handshakes_in_flight += 1
        try:
            with trio.fail_after(self.settings.handshake_timeout_s):
                noise, hello, welcome, leftover = await handshake.respond(
                    transport,
                    local_private=self._private_key,
                    decide=decide,
                    previous_private=self._previous_private(),
                )
        except (HandshakeFailed, trio.TooSlowError) as exc:
            self.handshake_failures += 1
            log.info("handshake from %s failed: %s", address, exc or "timeout")
            return
        finally:
            self._handshakes_in_flight -= 1
        session = self.sessions.get(welcome.session_id)
        if session is None or self._generation.get(session.id) != generation:
            # A newer handshake for the same session won the race.
            return
        session.protocol_version = welcome.version
        encoder, decoder = noise.into_codec(
            send_reliable_seq=hello.recv_next if welcome.resumed else 0,
            recv_reliable_seq=session.recv_next,
            level=self.settings.compression_level,
            max_payload=self.settings.max_frame_payload,
        )
        log.info(
            "%s %s (%s) from %s",
            "resumed" if welcome.resumed else "opened",
            session,
            hello.role,
            address,
        )
        session.address = address
        try:
            await session.serve_connection(transport, encoder, decoder, leftover)
        except ConnectionLost as exc:
            log.info("%s detached: %s", session, exc)
            if self._nursery is not None:
                self._nursery.start_soon(self._expire_later, session, generation)
        except (SessionLost, PeerProtocolError) as exc:
            log.info("%s ended: %s", session, exc)
            self._forget(session)
        except Exception:
            # A fault of ours while serving this session: it cannot be trusted
            # to resume, so it ends; the caller logs the traceback.
            session.lose(SessionLost("internal error at the gate"))
            self._forget(session)
            raise

    async def _decide(self, edge_key: bytes, hello: handshake.Hello, fd: int) -> handshake.Welcome:
        """``fd``: the connection's descriptor, which says how many are in use."""
        if self.draining:
            raise HandshakeRefused(
                "draining", f"gate {self.name!r} is draining: another gate of the cluster takes it"
            )
        name, role = await self._authenticate(edge_key, hello)
        if hello.name != name or hello.role != role:
            log.warning(
                "edge %s (%s) introduced itself as %s (%s)", name, role, hello.name, hello.role
            )
        session = self.sessions.get(hello.session_id) if hello.session_id else None
        resumed = False
        if session is not None and session.peer == name and not session.lost:
            await session.detach()
            try:
                session.acknowledge(hello.recv_next)
                resumed = True
            except PeerProtocolError as exc:
                log.warning("%s cannot resume: %s", session, exc)
                session.lose(SessionLost(f"cannot resume: {exc}"))
                self._forget(session)
        if not resumed:
            if hello.session_id:
                log.info(
                    "edge %s asked for unknown session %s; opening a new one",
                    name,
                    hello.session_id.hex()[:12],
                )
            if self._nursery is None:
                raise HandshakeRefused("not_ready", "gate is starting")
            if within_descriptor_reserve(fd):
                # Refused while descriptors remain to say so, and for the
                # streams of the sessions already here.
                raise self._gate_full("its open files are near the limit")
            self._make_room_for(name)
            services = self._services_for(role)
            self._make_room_at_gate()
            try:
                session = Session(
                    self.settings,
                    session_id=os.urandom(16),
                    initiator=False,
                    peer=name,
                    handler=dispatcher(
                        services, role=role, withheld=self.services.keys() - services.keys()
                    ),
                    handler_nursery=self._nursery,
                )
            except OSError as exc:
                if not out_of_descriptors(exc):
                    raise
                raise self._gate_full(f"cannot open a session: {exc.strerror or exc}") from None
            session.peer_role = role
            self.sessions[session.id] = session
            self._by_peer.setdefault(session.peer, {})[session.id] = session
        assert session is not None
        if resumed:
            self.resumptions += 1
            session.resumptions += 1
        generation = self._generation.get(session.id, 0) + 1
        self._generation[session.id] = generation
        return handshake.Welcome(
            session_id=session.id,
            resumed=resumed,
            recv_next=session.recv_next,
            gate=self.name,
        )

    def _make_room_at_gate(self) -> None:
        """Keep the Gate under its session cap: a detached session (the
        oldest first) gives way to a new one, since its edge may never come
        back; with every session live, the new one is refused."""
        excess = len(self.sessions) - self.max_sessions + 1
        if excess <= 0:
            return
        for old in [s for s in self.sessions.values() if not s.attached][:excess]:
            self.end_session(old, "replaced by a new session: the gate is full")
        if len(self.sessions) >= self.max_sessions:
            live = len(self.sessions)
            raise self._gate_full(f"it holds {live} live sessions (tunnel.max_sessions)")

    def _gate_full(self, why: str) -> HandshakeRefused:
        """Count and log (sparingly) a new session refused; the refusal."""
        self.sessions_refused += 1
        if self.sessions_refused % 1000 == 1:  # a storm of edges must not flood the log
            log.warning("refusing new sessions (%d so far): %s", self.sessions_refused, why)
        return HandshakeRefused("gate_full", f"the gate is full: {why}; try another")

    def _services_for(self, role: str) -> Mapping[str, ServiceHandler]:
        if self._services_by_role is None:
            return self.services
        allowed = self._services_by_role.get(role, frozenset())
        return {name: handler for name, handler in self.services.items() if name in allowed}

    def _make_room_for(self, name: str) -> None:
        """Keep ``name`` under its session cap: detached sessions go first
        (oldest first: an edge that restarted will not resume them), then a
        new session is refused."""
        cap = self.settings.max_sessions_per_identity
        sessions = self.sessions_of(name)
        for old in [s for s in sessions if not s.attached][: max(0, len(sessions) - cap + 1)]:
            self.end_session(old, "replaced by a newer session of the same edge")
        if len(self.sessions_of(name)) >= cap:
            raise HandshakeRefused(
                "too_many_sessions", f"{name!r} already has {cap} live sessions at this gate"
            )

    async def _expire_later(self, session: Session, generation: int) -> None:
        await trio.sleep(self.settings.resume_grace_s)
        if self._generation.get(session.id) == generation and not session.attached:
            log.info("%s expired after %.0fs detached", session, self.settings.resume_grace_s)
            session.lose(SessionLost("resume grace period expired"))
            self._forget(session)

    def _forget(self, session: Session) -> None:
        if self.sessions.get(session.id) is session:
            del self.sessions[session.id]
            self._generation.pop(session.id, None)
            of_peer = self._by_peer.get(session.peer, {})
            of_peer.pop(session.id, None)
            if not of_peer:
                self._by_peer.pop(session.peer, None)


def _sessions_for_open_file_limit() -> int:
    """The default session cap: the open-file limit less its reserve (a
    session holds one descriptor; its streams' sockets share the rest)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    return max(1, soft - descriptor_reserve(soft))


def _address(transport: trio.SocketStream) -> str:
    try:
        host, port = transport.socket.getpeername()[:2]
    except OSError:
        return "?"
    return f"{host}:{port}"
