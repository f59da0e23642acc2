"""The edge's end of the tunnel: connect, authenticate, resume, forever.

The client holds one :class:`Session` across any number of TCP connections.
When a connection fails it reconnects and resumes the session; streams, and
the applications behind them, never notice. Only if the Gate no longer
knows the session (its grace period ran out, it restarted, or the edge
moved to another Gate of the cluster) are the streams reset.

An edge may know several Gates (a cluster; a host name that resolves to
several addresses counts as several). It starts at a random one, so that a
fleet spreads over the cluster, and stays with the Gate it has:

- a connection that ends (reset, closed) is retried on the same Gate first,
  where the session can resume; a Gate that refuses it, or cannot be
  reached, is left for the next one after a random pause of up to
  ``tunnel.failover_jitter_s`` (thousands of edges do not land on the
  survivors at once);
- a connection that went silent past ``tunnel.dead_after_s`` (a hung or cut
  off Gate) moves to the next Gate at once: waiting for a silent Gate's
  handshake would cost ``tunnel.handshake_timeout_s`` more;
- when every Gate failed in turn, exponential backoff with full jitter
  (``tunnel.reconnect_initial_s`` to ``reconnect_max_s``) before the next
  round, so a fleet does not stampede a restarted cluster.

Names are resolved again at every round: a DNS name's addresses may change.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import socket
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import trio

from qmesh.fastsocket import connect_tcp
from qmesh.tunnel import handshake
from qmesh.tunnel.errors import (
    ConnectionLost,
    HandshakeFailed,
    HandshakeRefused,
    PeerProtocolError,
    PeerSilent,
    SessionLost,
)
from qmesh.tunnel.services import ServiceHandler, dispatcher
from qmesh.tunnel.session import Session
from qmesh.tunnel.stream import TunnelStream

if TYPE_CHECKING:
    from qmesh.config import TunnelConfig

log = logging.getLogger(__name__)


class TunnelClient:
    """Keeps an edge connected to its Gate."""

    def __init__(
        self,
        settings: TunnelConfig,
        *,
        name: str,
        role: str,
        private_key: bytes,
        gate_public_key: bytes,
        gate_addresses: Sequence[tuple[str, int]],
        services: Mapping[str, ServiceHandler] | None = None,
        join: str | None = None,
    ) -> None:
        if not gate_addresses:
            raise ValueError("an edge needs at least one Gate address")
        self.settings = settings
        self.name = name
        self.role = role
        self._private_key = private_key
        self._gate_public_key = gate_public_key
        self.gate_addresses = tuple(gate_addresses)
        self._targets: list[tuple[str, int]] = list(self.gate_addresses)
        # Where this edge starts: a fleet spreads over the cluster.
        self._index = random.randrange(len(self._targets))
        self.services = dict(services or {})
        self.join = join
        """A one-time join token's proof, sent until a Gate accepts it (the
        key is enrolled from then on)."""
        self.on_gate_key: Callable[[bytes], None] | None = None
        """Told the Gate's new public key after a rotation (the role rewrites
        the credential file with it)."""
        self.joined = trio.Event()
        """Set once the Gate accepted the join token (never without one)."""
        self.session: Session | None = None
        self._session_ready = trio.Event()
        self._connected = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._last_timestamp = 0
        # Counters for operators (and tests).
        self.connects = 0
        self.resumptions = 0
        self.sessions_lost = 0

    def __repr__(self) -> str:
        host, port = self.gate_address
        return f"<TunnelClient {self.name!r} → {host}:{port}>"

    @property
    def gate_address(self) -> tuple[str, int]:
        """The Gate this edge is connected to, or will try next."""
        return self._targets[self._index % len(self._targets)]

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self) -> None:
        await self._connected.wait()

    async def open_stream(self, request: dict[str, Any]) -> TunnelStream:
        """Open a stream to a Gate service. Waits for the first session; after
        that, works even while the connection is down."""
        while self.session is None or self.session.lost:
            await self._session_ready.wait()
        return self.session.open_stream(request)

    async def run(
        self, *, task_status: trio.TaskStatus[TunnelClient] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Connect and stay connected until cancelled.

        Raises :class:`HandshakeRefused` when the Gate refuses this edge's key:
        no retry can fix a revoked or unknown credential.
        """
        refused: HandshakeRefused | None = None
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started(self)
            try:
                await self._connect_forever()
            except HandshakeRefused as exc:
                # Raised bare, not inside the nursery's exception group.
                refused = exc
                nursery.cancel_scope.cancel()
            finally:
                if self.session is not None:
                    self.session.lose(SessionLost("edge shutting down"))
        if refused is not None:
            raise refused

    async def _connect_forever(self) -> None:
        # Each address of a name is a Gate of its own, from the start: the
        # fleet spreads over them too.
        self._targets = await _resolve(self.gate_addresses) or self._targets
        self._index = random.randrange(len(self._targets))
        rounds = 0  # rounds in which every Gate failed, since the last connection
        failed = 0  # Gates that failed in this round
        while True:
            try:
                silent = await self._connect_once()
            except (OSError, HandshakeFailed, trio.TooSlowError) as exc:
                if isinstance(exc, HandshakeRefused) and not exc.retryable:
                    raise
                host, port = self.gate_address
                failed += 1
                if failed < len(self._targets):
                    delay = random.uniform(0, self.settings.failover_jitter_s)
                    log.warning("cannot reach gate %s:%d (%s); trying the next in %.2fs",
                                host, port, exc or "timeout", delay)  # fmt: skip
                else:
                    rounds, failed = rounds + 1, 0
                    delay = self._backoff(rounds)
                    log.warning("cannot reach gate %s:%d (%s); retrying in %.2fs",
                                host, port, exc or "timeout", delay)  # fmt: skip
                await trio.sleep(delay)
                await self._next_gate(resolve=failed == 0)
                continue
            rounds = failed = 0
            if silent:
                # A hung or cut-off Gate: the next one, at once.
                await self._next_gate(resolve=False)
            else:
                # The connection was up and went down: the same Gate first
                # (the session may resume there), a moment later.
                await trio.sleep(self._backoff(0))

    async def _next_gate(self, *, resolve: bool) -> None:
        """Move to the next Gate; with ``resolve``, look the names up again first."""
        if resolve:
            self._targets = await _resolve(self.gate_addresses) or list(self.gate_addresses)
        self._index = (self._index + 1) % len(self._targets)

    def _next_timestamp(self) -> int:
        # Strictly growing even if the wall clock steps back while we run;
        # the Gate refuses a HELLO whose timestamp is not above the last.
        self._last_timestamp = max(handshake.clock_ns(), self._last_timestamp + 1)
        return self._last_timestamp

    def _backoff(self, failures: int) -> float:
        ceiling = min(
            self.settings.reconnect_max_s,
            self.settings.reconnect_initial_s * 2 ** min(failures, 30),
        )
        return random.uniform(0, ceiling)

    async def _connect_once(self) -> bool:
        """One connection to the current Gate, served until it ends; whether
        it ended by going silent. Raises when it could not be made."""
        assert self._nursery is not None
        host, port = self.gate_address
        session = self.session if self.session is not None and not self.session.lost else None
        with trio.fail_after(self.settings.handshake_timeout_s):
            transport = await connect_tcp(host, port)
            try:
                hello = handshake.Hello(
                    role=self.role,
                    name=self.name,
                    session_id=session.id if session else None,
                    recv_next=session.recv_next if session else 0,
                    timestamp=self._next_timestamp(),
                    join=self.join,
                )
                noise, welcome, leftover = await handshake.initiate(
                    transport,
                    local_private=self._private_key,
                    gate_public=self._gate_public_key,
                    hello=hello,
                )
            except BaseException:
                await trio.aclose_forcefully(transport)
                raise
        self.connects += 1
        if welcome.gate_key is not None and welcome.gate_key != self._gate_public_key:
            # The Gate rotated its key and still accepted the old one: from
            # now on, the new one (kept by whoever stores the credential).
            log.info("the gate's key was rotated; using the new one from now on")
            self._gate_public_key = welcome.gate_key
            if self.on_gate_key is not None:
                self.on_gate_key(welcome.gate_key)
        if self.join is not None:
            self.join = None
            self.joined.set()
        if session is not None and welcome.resumed and welcome.session_id == session.id:
            self.resumptions += 1
        else:
            if session is not None:
                self.sessions_lost += 1
                log.warning("gate did not resume %s; its streams are reset", session)
                session.lose(SessionLost("gate did not resume the session"))
            session = Session(
                self.settings,
                session_id=welcome.session_id,
                initiator=True,
                peer=welcome.gate,
                handler=dispatcher(self.services),
                handler_nursery=self._nursery,
            )
            session.peer_role = "gate"
            self.session = session
            self._session_ready.set()
            self._session_ready = trio.Event()
        session.protocol_version = welcome.version
        try:
            session.acknowledge(welcome.recv_next)
        except PeerProtocolError as exc:
            log.error("cannot resume %s: %s", session, exc)
            session.lose(SessionLost(str(exc)))
            await trio.aclose_forcefully(transport)
            return False
        encoder, decoder = noise.into_codec(
            send_reliable_seq=welcome.recv_next,
            recv_reliable_seq=session.recv_next,
            level=self.settings.compression_level,
            max_payload=self.settings.max_frame_payload,
        )
        log.info(
            "connected to gate %s:%d (%s)",
            host,
            port,
            "resumed" if welcome.resumed else "new session",
        )
        self._connected.set()
        try:
            await session.serve_connection(transport, encoder, decoder, leftover)
        except ConnectionLost as exc:
            log.info("connection to gate %s:%d lost: %s; resuming", host, port, exc)
            return isinstance(exc, PeerSilent)
        except (SessionLost, PeerProtocolError) as exc:
            log.warning("session with gate ended: %s", exc)
        finally:
            self._connected = trio.Event()
        return False


async def _resolve(addresses: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
    """Every address the entries name: an IP literal as is, a host name as
    each of its addresses (in the resolver's order); names that do not
    resolve now are left out. Order kept, duplicates dropped."""
    found: list[tuple[str, int]] = []
    for host, port in addresses:
        try:
            ipaddress.ip_address(host)
            resolved = [(host, port)]
        except ValueError:
            try:
                infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError as exc:
                log.warning("cannot resolve gate address %s: %s", host, exc)
                continue
            resolved = [(str(info[4][0]), port) for info in infos]
        found += [a for a in resolved if a not in found]
    return found
