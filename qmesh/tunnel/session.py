"""A tunnel session: the multiplexer state that outlives any one TCP connection.

Invariants (both ends keep them, which is what makes resumption exact):

- every reliable frame gets the next reliable sequence number when it is
  sealed, and is *retained* until the peer acknowledges it;
- ``recv_next`` is the sequence of the next reliable frame to deliver; it only
  moves when a frame has been fully dispatched, so after a reconnect the peer
  resends exactly the frames from ``recv_next`` on;
- a new connection starts with the handshake telling each side the other's
  ``recv_next``; retained frames below it are dropped, the rest resent first;
- control frames (ACK, PING, PONG, GOAWAY) belong to one connection and are
  never retained.

The per-message work lives in a :class:`qmesh._core.TunnelEngine` (Rust, run
by one of the process's few engine threads, each serving many sessions):
the connection's socket, sealing and opening, retention,
ACKs, heartbeats (PINGs, PONGs, the silent or never-acknowledging peer), and
*native* streams, whose bytes go between the tunnel and a plain socket
without Python (see :meth:`TunnelStream.relay_native`): an idle session
costs Python nothing. This module keeps the meaning: which streams exist,
opening and accepting them, and the connection's lifetime. Frames for
Python streams arrive from the engine through :meth:`_pump`.

This module is not for handshakes: a caller (client or server) makes the
connection, runs the handshake and hands the socket and resulting codec to
:meth:`Session.serve_connection`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from qmesh import _core
from qmesh.fastsocket import FastSocketStream, runnable_counter
from qmesh.tunnel.errors import (
    GOAWAY_BETWEEN_ANSWERS,
    ConnectionLost,
    PeerProtocolError,
    PeerSilent,
    SessionLost,
    StreamReset,
    TunnelError,
)
from qmesh.tunnel.frames import (
    FrameType,
    ResetCode,
    decode_open,
    decode_reason,
    decode_u32,
    encode_open,
    encode_reason,
)
from qmesh.tunnel.stream import TunnelStream
from qmesh.tunnel.wakeups import engine_wakeups

if TYPE_CHECKING:
    from qmesh.config import TunnelConfig

log = logging.getLogger(__name__)

StreamHandler = Callable[[TunnelStream], Awaitable[None]]

# Bytes asked of the socket per read: large enough to take many frames per
# call into the decoder, small enough to keep latency fair between streams.
RECEIVE_SIZE = 256 * 1024
# Acknowledge at least every this many reliable frames, or after ACK_DELAY.
ACK_EVERY = 32
ACK_DELAY = 0.01
# A peer that stops acknowledging while it keeps reading would make us
# retain frames forever; past this many bytes it is treated as broken.
MAX_UNACKED_BYTES = 256 * 1024 * 1024
# Audit taps of native Postgres streams reach Python at most this late.
TAP_DELAY = 0.02

Frame = tuple[int, int, bytes]  # (type, stream id, payload) before sealing


class Session:
    """Streams, retransmission and flow control for one edge ⇄ Gate session."""

    def __init__(
        self,
        settings: TunnelConfig,
        *,
        session_id: bytes,
        initiator: bool,
        peer: str,
        handler: StreamHandler | None,
        handler_nursery: trio.Nursery,
    ) -> None:
        self.settings = settings
        self.id = session_id
        self.peer = peer
        self.peer_role = ""
        self.protocol_version = 0
        """The tunnel protocol its last handshake agreed (qmesh.tunnel.handshake)."""
        self.initiator = initiator
        self._handler = handler
        self._handler_nursery = handler_nursery
        self._streams: dict[int, TunnelStream] = {}
        # Streams we open are odd at the initiator (the edge), even at the
        # responder (the Gate), so both ends can open without colliding.
        self._next_stream_id = 1 if initiator else 2
        self._last_peer_stream_id = 0
        self._wakeups = engine_wakeups()
        self._wakeup_key, self._wakeup = self._wakeups.register()
        self._engine = self._new_engine()
        # Frames queued while other tasks are about to run, sealed together
        # by the writer (see _kick).
        self._pending: list[Frame] = []
        self._work = trio.Event()
        self._attached = False
        self._runnable: Callable[[], int] = lambda: 1  # set inside trio.run
        self._connection_scope: trio.CancelScope | None = None
        self._connection_done: trio.Event | None = None
        self._connection_error: BaseException | None = None
        self._lost: SessionLost | None = None
        self._pump_scope = trio.CancelScope()
        self.closed = trio.Event()
        # For operators (``qmesh sessions``) and tests.
        self.opened_at = time.time()
        self.address = ""  # the peer's address on the latest connection
        self.connections = 0
        self.resumptions = 0
        handler_nursery.start_soon(self._pump)

    def _new_engine(
        self, *, ack_every: int = ACK_EVERY, ack_delay: float = ACK_DELAY
    ) -> _core.TunnelEngine:
        return _core.TunnelEngine(
            ack_every=ack_every,
            ack_delay=ack_delay,
            max_unacked=MAX_UNACKED_BYTES,
            read_size=RECEIVE_SIZE,
            chunk_size=self.settings.chunk_size,
            tap_delay=TAP_DELAY,
            heartbeat_interval=self.settings.heartbeat_interval_s,
            dead_after=self.settings.dead_after_s,
            notifier=self._wakeups.notifier,
            key=self._wakeup_key,
        )

    def __repr__(self) -> str:
        return f"<Session {self.id.hex()[:12]} peer={self.peer!r} streams={len(self._streams)}>"

    # -- public API ----------------------------------------------------------

    @property
    def recv_next(self) -> int:
        return self._engine.stats().recv_next

    @property
    def send_next(self) -> int:
        return self._engine.stats().send_next

    @property
    def retained_frames(self) -> int:
        return self._engine.stats().retained_frames

    @property
    def bytes_sent(self) -> int:
        return self._engine.stats().bytes_sent

    @property
    def bytes_received(self) -> int:
        return self._engine.stats().bytes_received

    @property
    def native_streams(self) -> int:
        return self._engine.stats().native_streams

    @property
    def rtt(self) -> float | None:
        """The latest heartbeat's round trip in seconds (None before the first)."""
        return self._engine.stats().rtt

    @property
    def attached(self) -> bool:
        return self._connection_scope is not None

    @property
    def lost(self) -> bool:
        return self._lost is not None

    @property
    def stream_count(self) -> int:
        return len(self._streams)

    def open_stream(self, request: dict[str, Any]) -> TunnelStream:
        """Open a stream to the peer's service ``request["service"]``.

        Works while disconnected: frames wait in the session until a
        connection carries them.
        """
        if self._lost is not None:
            raise self._lost
        stream_id = self._next_stream_id
        if stream_id >= 2**32:
            raise SessionLost("stream ids exhausted; open a new session")
        self._next_stream_id += 2
        self.queue_frame(FrameType.OPEN, stream_id, encode_open(request))
        stream = self._new_stream(stream_id, request)
        self._streams[stream_id] = stream
        return stream

    def _new_stream(self, stream_id: int, request: dict[str, Any]) -> TunnelStream:
        settings = self.settings
        return TunnelStream(
            self,
            stream_id,
            request,
            window=settings.stream_window,
            chunk_size=settings.chunk_size,
        )

    def acknowledge(self, peer_recv_next: int) -> None:
        """Apply the peer's ``recv_next`` from a handshake; the encoder for the
        new connection must start at that sequence."""
        try:
            self._engine.acknowledge(peer_recv_next)
        except _core.ProtocolViolation as exc:
            raise PeerProtocolError(str(exc)) from None

    async def serve_connection(
        self,
        transport: trio.SocketStream | FastSocketStream,
        encoder: _core.FrameEncoder,
        decoder: _core.FrameDecoder,
        initial: bytes = b"",
    ) -> None:
        """Carry this session over ``transport`` until the connection fails.

        ``initial`` holds bytes read past the handshake (frames the peer sent
        right behind its last handshake message).

        Always raises: :class:`ConnectionLost` (the session may resume on
        another connection), :class:`SessionLost` (it may not), or
        :class:`PeerProtocolError` (the peer broke the rules; the session is
        lost too, since resending the same frames would break them again).
        """
        if self._lost is not None:
            raise self._lost
        await self.detach()
        self._runnable = runnable_counter()
        scope = trio.CancelScope()
        done = trio.Event()
        self._connection_scope = scope
        self._connection_done = done
        self._connection_error = None
        self.connections += 1
        try:
            try:
                self._engine.attach(transport.socket.fileno(), encoder, decoder, initial)
            except ValueError as exc:
                raise PeerProtocolError(str(exc)) from None
            self._attached = True
            self._send_pending()  # what was queued while detached
            with scope:
                await self._writer()
            error = self._connection_error or ConnectionLost("connection detached")
        except BaseException as exc:
            # Our owner is shutting down (not a detach, which cancels only
            # ``scope``): tell the peer not to keep the session for us.
            if isinstance(exc, trio.Cancelled):
                self._say_goodbye("peer shutting down", 0)
            raise
        finally:
            self._attached = False
            self._engine.detach()
            self._connection_scope = None
            self._connection_error = None
            done.set()
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(transport)
        if isinstance(error, PeerProtocolError):
            self.lose(SessionLost(f"peer protocol error: {error}"))
        elif isinstance(error, SessionLost):
            self.lose(error)
        raise error

    async def detach(self) -> None:
        """Stop using the current connection (if any) and wait until it is gone."""
        scope, done = self._connection_scope, self._connection_done
        if scope is not None and done is not None:
            scope.cancel()
            await done.wait()

    def _say_goodbye(self, reason: str, code: int) -> None:
        # The engine writes at once when the socket has room, which it
        # almost always has for one small frame.
        self._engine.send([(FrameType.GOAWAY, 0, encode_reason(code, reason))])

    def end(self, reason: str, *, between_answers: bool = False) -> None:
        """End the session for good and tell the peer why (GOAWAY), so that
        it neither retries nor expects a resume. ``between_answers``: no
        answer on any stream is in progress (the peer is told so)."""
        if self._lost is None and self._attached:
            self._say_goodbye(reason, GOAWAY_BETWEEN_ANSWERS if between_answers else 0)
        self.lose(SessionLost(reason, between_answers=between_answers))

    def lose(self, error: SessionLost) -> None:
        """End the session for good: reset every stream, drop the connection."""
        if self._lost is not None:
            return
        self._lost = error
        self._engine.lose()
        for stream in list(self._streams.values()):
            stream.on_reset(
                ResetCode.SESSION_LOST, str(error), between_answers=error.between_answers
            )
        self._streams.clear()
        self._pending.clear()
        if self._connection_scope is not None:
            self._connection_scope.cancel()
        self._pump_scope.cancel()
        self._wakeups.unregister(self._wakeup_key)
        self._engine.close()
        self.closed.set()

    # -- used by TunnelStream -----------------------------------------------------

    def queue_frame(self, frame_type: int, stream_id: int, payload: bytes) -> None:
        if self._lost is not None:
            return
        self._pending.append((frame_type, stream_id, payload))
        self._kick()

    def forget_stream(self, stream_id: int) -> None:
        self._streams.pop(stream_id, None)

    def attach_native(
        self,
        stream_id: int,
        fd: int,
        *,
        credit: int,
        window: int,
        to_socket: bytes,
        consumed: int,
        eof_received: bool,
        end_on_socket_eof: bool,
        tap: _core.TapSpec | None,
        tls: _core.TlsSession | None = None,
        pooled: _core.PooledSpec | None = None,
        audit: _core.AuditAuthor | None = None,
    ) -> None:
        """Hand stream ``stream_id`` to the engine, relayed to the socket
        ``fd`` (or, ``pooled``, to its pool's connections)."""
        if self._lost is not None:
            raise self._lost
        self._send_pending()  # the stream's queued frames go out before any native one
        self._engine.attach_native(
            stream_id,
            fd,
            credit=credit,
            window=window,
            to_socket=to_socket,
            consumed=consumed,
            eof_received=eof_received,
            end_on_socket_eof=end_on_socket_eof,
            tap=tap,
            tls=tls,
            pooled=pooled,
            audit=audit,
        )

    def verdict(self, stream_id: int, replacement: bytes) -> None:
        self._engine.verdict(stream_id, replacement)

    def abort_native(self, stream_id: int) -> _core.RelayOutcome | None:
        return self._engine.abort_native(stream_id)

    def pooled_lease(self, stream_id: int) -> int | None:
        return self._engine.pooled_lease(stream_id)

    # -- sending ----------------------------------------------------------------

    def _kick(self) -> None:
        """Get queued frames moving.

        When no other task is ready to run, nothing else is about to join a
        batch: seal and write now, from this task, instead of paying a task
        switch to the writer. Otherwise the writer collects everything queued
        in one batch. While detached the engine keeps reliable frames for the
        next connection.
        """
        if self._attached and self._runnable():
            self._work.set()
        else:
            self._send_pending()

    def _send_pending(self) -> None:
        if self._pending:
            batch, self._pending = self._pending, []
            self._engine.send(batch)

    async def _writer(self) -> None:
        while True:
            await self._work.wait()
            self._work = trio.Event()
            self._send_pending()

    def _fail_connection(self, error: BaseException) -> None:
        if self._connection_error is None:
            self._connection_error = error
        if self._connection_scope is not None:
            self._connection_scope.cancel()

    # -- receiving ----------------------------------------------------------------

    async def _pump(self) -> None:
        """Take what the engine hands up, for the session's whole life (a
        native stream can end while no connection is attached)."""
        with self._pump_scope:
            while True:
                await self._wakeup.wait()
                try:
                    self._take()
                except Exception:
                    # A fault of ours on this session's input must end this
                    # session, never the nursery it runs in (the Gate's).
                    log.exception("session %s: failed to handle its frames", self.id.hex()[:12])
                    self.end("internal error handling the peer's frames")
                    return

    def _take(self) -> None:
        frames, taps, ended, error = self._engine.take()
        for stream_id, records in taps:
            stream = self._streams.get(stream_id)
            if stream is not None:
                stream.on_tap(records)
        for stream_id, outcome in ended:
            stream = self._streams.get(stream_id)
            if stream is not None:
                stream.on_native_end(outcome)
        try:
            for frame_type, stream_id, payload in frames:
                self._dispatch(frame_type, stream_id, payload)
        except (ConnectionLost, SessionLost, PeerProtocolError) as exc:
            self._fail_connection(exc)
        # The engine reports a failed connection on every take until it is
        # detached: judge (and log) it once.
        if error is not None and self._connection_error is None:
            self._fail_connection(self._engine_error(error))

    def _engine_error(self, error: BaseException) -> TunnelError:
        """The engine's reason the connection failed, in the tunnel's terms."""
        if isinstance(error, _core.FrameError):
            # Bad bytes end the connection, not the session: damage in transit
            # looks the same. A connection cut mid-frame is usually the
            # network, not an attack.
            level = logging.INFO if isinstance(error, _core.Truncated) else logging.WARNING
            log.log(level, "session %s: rejected frame from %s: %s: %s",
                    self.id.hex()[:12], self.peer, type(error).__name__, error)  # fmt: skip
            return ConnectionLost(f"bad frame: {error}")
        if isinstance(error, _core.PeerSilent):
            return PeerSilent(str(error))
        if isinstance(error, _core.PeerClosed | OSError):
            return ConnectionLost(str(error))
        if isinstance(error, _core.ProtocolViolation):
            return PeerProtocolError(str(error))
        # Frames of ours the engine could not seal: resending them would fail
        # again, so the session cannot go on.
        return SessionLost(f"tunnel engine failed: {error}")

    # -- dispatch -------------------------------------------------------------------

    def _dispatch(self, frame_type: int, stream_id: int, payload: bytes) -> None:
        if frame_type == FrameType.DATA:
            stream = self._streams.get(stream_id)
            if stream is not None and not stream.on_data(payload):
                stream.reset(ResetCode.PROTOCOL_ERROR, "flow-control window exceeded")
        elif frame_type == FrameType.WINDOW:
            increment = decode_u32(payload, "WINDOW")
            stream = self._streams.get(stream_id)
            if stream is not None:
                stream.on_window(increment)
        elif frame_type == FrameType.OPEN:
            self._accept(stream_id, payload)
        elif frame_type == FrameType.CLOSE:
            stream = self._streams.get(stream_id)
            if stream is not None:
                stream.on_close()
        elif frame_type == FrameType.RESET:
            code, reason = decode_reason(payload, "RESET")
            stream = self._streams.get(stream_id)
            if stream is not None:
                stream.on_reset(code, reason)
        elif frame_type == FrameType.GOAWAY:
            code, reason = decode_reason(payload, "GOAWAY")
            raise SessionLost(
                f"peer ended the session: {reason}",
                between_answers=code == GOAWAY_BETWEEN_ANSWERS,
            )
        else:
            raise PeerProtocolError(f"unknown frame type {frame_type:#04x}")

    def _accept(self, stream_id: int, payload: bytes) -> None:
        peer_parity = 0 if self.initiator else 1
        if stream_id % 2 != peer_parity or stream_id <= self._last_peer_stream_id:
            raise PeerProtocolError(f"peer opened stream {stream_id} out of order")
        self._last_peer_stream_id = stream_id
        if len(self._streams) >= self.settings.max_streams_per_session:
            limit = self.settings.max_streams_per_session
            reason = encode_reason(ResetCode.REFUSED, f"too many open streams (limit {limit})")
            self.queue_frame(FrameType.RESET, stream_id, reason)
            return
        try:
            request = decode_open(payload)
        except ValueError as exc:
            self.queue_frame(FrameType.RESET, stream_id, encode_reason(ResetCode.REFUSED, str(exc)))
            return
        if self._handler is None:
            reason = encode_reason(ResetCode.REFUSED, "this end accepts no streams")
            self.queue_frame(FrameType.RESET, stream_id, reason)
            return
        stream = self._new_stream(stream_id, request)
        self._streams[stream_id] = stream
        self._handler_nursery.start_soon(self._run_handler, self._handler, stream)

    async def _run_handler(self, handler: StreamHandler, stream: TunnelStream) -> None:
        try:
            await handler(stream)
        except StreamReset as exc:
            log.debug("stream %d of %s reset: %s", stream.id, self.peer, exc)
        except Exception:
            log.exception("handler for %r from %s failed", stream.request.get("service"), self.peer)
            stream.reset(ResetCode.INTERNAL, "the service failed")
        finally:
            await stream.aclose()
