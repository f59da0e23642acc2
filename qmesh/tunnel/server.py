"""The Gate's tunnel listener: authenticates edges and keeps their sessions.

A session whose connection drops is kept, detached, for the resume grace
period; an edge that comes back within it continues where it stopped.
Resuming requires the same enrolled key that opened the session.

A replayed handshake message can at worst make the Gate drop a session's
current connection (it cannot complete the handshake without the edge's
ephemeral key); an on-path attacker could do that with a TCP reset anyway.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING

import trio

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

Authenticate = Callable[[bytes], Awaitable[tuple[str, str]]]
"""Maps an edge's public key to ``(name, role)`` or raises HandshakeRefused."""


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
    ) -> None:
        self.settings = settings
        self.name = name
        self._private_key = private_key
        self._authenticate = authenticate
        self.services = dict(services)
        self.sessions: dict[bytes, Session] = {}
        self._generation: dict[bytes, int] = {}
        self._nursery: trio.Nursery | None = None
        self.resumptions = 0
        self.handshake_failures = 0

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
        listeners = await trio.open_tcp_listeners(port, host=host)
        bound_port: int = listeners[0].socket.getsockname()[1]
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                log.info("tunnel listening on %s:%d", host, bound_port)
                task_status.started(bound_port)
                await trio.serve_listeners(
                    self._handle_connection, listeners, handler_nursery=nursery
                )
        finally:
            for session in list(self.sessions.values()):
                session.lose(SessionLost("gate shutting down"))
            self.sessions.clear()

    def sessions_of(self, peer: str) -> list[Session]:
        return [s for s in self.sessions.values() if s.peer == peer]

    async def _handle_connection(self, transport: trio.SocketStream) -> None:
        generation = 0

        async def decide(edge_key: bytes, hello: handshake.Hello) -> handshake.Welcome:
            nonlocal generation
            welcome = await self._decide(edge_key, hello)
            generation = self._generation[welcome.session_id]
            return welcome

        try:
            with trio.fail_after(self.settings.handshake_timeout_s):
                noise, hello, welcome, leftover = await handshake.respond(
                    transport, local_private=self._private_key, decide=decide
                )
        except (HandshakeFailed, trio.TooSlowError) as exc:
            self.handshake_failures += 1
            log.info("handshake from %s failed: %s", _address(transport), exc or "timeout")
            await trio.aclose_forcefully(transport)
            return
        session = self.sessions.get(welcome.session_id)
        if session is None or self._generation.get(session.id) != generation:
            # A newer handshake for the same session won the race.
            await trio.aclose_forcefully(transport)
            return
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
            _address(transport),
        )
        try:
            await session.serve_connection(transport, encoder, decoder, leftover)
        except ConnectionLost as exc:
            log.info("%s detached: %s", session, exc)
            if self._nursery is not None:
                self._nursery.start_soon(self._expire_later, session, generation)
        except (SessionLost, PeerProtocolError) as exc:
            log.info("%s ended: %s", session, exc)
            self._forget(session)

    async def _decide(self, edge_key: bytes, hello: handshake.Hello) -> handshake.Welcome:
        name, role = await self._authenticate(edge_key)
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
            session = Session(
                self.settings,
                session_id=os.urandom(16),
                initiator=False,
                peer=name,
                handler=dispatcher(self.services),
                handler_nursery=self._nursery,
            )
            session.peer_role = role
            self.sessions[session.id] = session
        else:
            self.resumptions += 1
        assert session is not None
        generation = self._generation.get(session.id, 0) + 1
        self._generation[session.id] = generation
        return handshake.Welcome(
            session_id=session.id,
            resumed=resumed,
            recv_next=session.recv_next,
            gate=self.name,
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


def _address(transport: trio.SocketStream) -> str:
    try:
        host, port = transport.socket.getpeername()[:2]
    except OSError:
        return "?"
    return f"{host}:{port}"
