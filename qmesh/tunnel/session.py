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

This module is not for sockets or handshakes: a caller (client or server)
makes the connection, runs the handshake and hands the resulting codec to
:meth:`Session.serve_connection`.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from qmesh import _core
from qmesh.fastsocket import FastSocketStream, fast, runnable_counter
from qmesh.tunnel.errors import ConnectionLost, PeerProtocolError, SessionLost, StreamReset
from qmesh.tunnel.frames import (
    FrameType,
    ResetCode,
    decode_open,
    decode_reason,
    decode_u32,
    decode_u64,
    encode_open,
    encode_reason,
    encode_u64,
)
from qmesh.tunnel.stream import TunnelStream

if TYPE_CHECKING:
    from qmesh.config import TunnelConfig

log = logging.getLogger(__name__)

StreamHandler = Callable[[TunnelStream], Awaitable[None]]

# Bytes asked of the socket per read: large enough to take many frames per
# call into the decoder, small enough to keep latency fair between streams.
RECEIVE_SIZE = 256 * 1024
# A batch handed to one encode_batch call and one send_all.
BATCH_BYTES = 512 * 1024
# Acknowledge at least every this many reliable frames, or after ACK_DELAY.
ACK_EVERY = 32
ACK_DELAY = 0.01
# A peer that stops acknowledging while it keeps reading would make us
# retain frames forever; past this many bytes it is treated as broken.
MAX_UNACKED_BYTES = 256 * 1024 * 1024

_CONTROL_MIN = _core.CONTROL_TYPE_MIN

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
        self.initiator = initiator
        self._handler = handler
        self._handler_nursery = handler_nursery
        self._streams: dict[int, TunnelStream] = {}
        # Streams we open are odd at the initiator (the edge), even at the
        # responder (the Gate), so both ends can open without colliding.
        self._next_stream_id = 1 if initiator else 2
        self._last_peer_stream_id = 0
        # Send side.
        self._pending: deque[Frame] = deque()
        self._control: list[Frame] = []
        self._retained: deque[tuple[int, int, int, bytes]] = deque()  # (seq, type, id, payload)
        self._retained_bytes = 0
        self._send_next = 0
        # Receive side.
        self._recv_next = 0
        self._ack_sent = 0
        # When the oldest unacknowledged reliable frame must be acknowledged
        # by; None while everything received has been acknowledged.
        self._ack_deadline: float | None = None
        self._ack_armings = 0  # how often the deadline went from None to set
        self._ack_timer_idle: trio.Event | None = None  # set to wake a parked ACK timer
        # Connection.
        self._work = trio.Event()
        # The current connection's socket and encoder while frames may be
        # sent from the task that queued them (see _kick); None otherwise.
        self._direct: FastSocketStream | None = None
        self._encoder: _core.FrameEncoder | None = None
        self._writer_busy = False  # the writer is inside send_all
        self._runnable: Callable[[], int] = lambda: 1  # set inside trio.run
        self._unsent = b""  # sealed bytes a direct send could not finish
        self._connection_scope: trio.CancelScope | None = None
        self._connection_done: trio.Event | None = None
        self._connection_error: BaseException | None = None
        self._last_heard = -math.inf
        self._ping_sent_at: dict[int, float] = {}
        self._lost: SessionLost | None = None
        self.closed = trio.Event()
        # Counters for operators (and tests).
        self.connections = 0
        self.rtt: float | None = None
        self.bytes_sent = 0
        self.bytes_received = 0

    def __repr__(self) -> str:
        return f"<Session {self.id.hex()[:12]} peer={self.peer!r} streams={len(self._streams)}>"

    # -- public API ----------------------------------------------------------

    @property
    def recv_next(self) -> int:
        return self._recv_next

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
        stream = TunnelStream(self, stream_id, request)
        self._streams[stream_id] = stream
        return stream

    def acknowledge(self, peer_recv_next: int) -> None:
        """Apply the peer's ``recv_next`` from a handshake; the encoder for the
        new connection must start at that sequence."""
        self._on_ack(peer_recv_next)
        if self._retained and self._retained[0][0] != peer_recv_next:
            raise PeerProtocolError(
                f"peer resumes at {peer_recv_next}, oldest retained frame is {self._retained[0][0]}"
            )
        if not self._retained and peer_recv_next != self._send_next:
            raise PeerProtocolError(
                f"peer resumes at {peer_recv_next}, but {self._send_next} frames were sent"
            )

    async def serve_connection(
        self,
        transport: trio.abc.Stream,
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
        transport = fast(transport)
        self._runnable = runnable_counter()
        scope = trio.CancelScope()
        done = trio.Event()
        self._connection_scope = scope
        self._connection_done = done
        self._connection_error = None
        self._last_heard = trio.current_time()
        self._ack_sent = self._recv_next  # the handshake told the peer
        self._ack_deadline = None
        self._control.clear()
        self._unsent = b""
        self.connections += 1
        try:
            with scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._reader, transport, decoder, initial)
                    nursery.start_soon(self._writer, transport, encoder)
                    nursery.start_soon(self._heartbeat)
                    nursery.start_soon(self._ack_timer)
            error = self._connection_error or ConnectionLost("connection detached")
        except trio.Cancelled:
            # Our owner is shutting down (not a detach, which cancels only
            # ``scope``): tell the peer not to keep the session for us.
            await self._say_goodbye(transport, encoder, "peer shutting down")
            raise
        finally:
            self._direct = None
            self._encoder = None
            self._writer_busy = False
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

    async def _say_goodbye(
        self, transport: trio.abc.Stream, encoder: _core.FrameEncoder, reason: str
    ) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(0.5):
            try:
                frame = encoder.encode(FrameType.GOAWAY, 0, encode_reason(0, reason))
                await transport.send_all(frame)
            except (
                trio.BrokenResourceError,
                trio.ClosedResourceError,
                trio.BusyResourceError,
                OSError,
            ):
                pass

    def lose(self, error: SessionLost) -> None:
        """End the session for good: reset every stream, drop the connection."""
        if self._lost is not None:
            return
        self._lost = error
        for stream in list(self._streams.values()):
            stream.on_reset(ResetCode.SESSION_LOST, str(error))
        self._streams.clear()
        self._pending.clear()
        self._retained.clear()
        self._retained_bytes = 0
        if self._connection_scope is not None:
            self._connection_scope.cancel()
        self.closed.set()

    # -- used by TunnelStream -----------------------------------------------------

    def queue_frame(self, frame_type: int, stream_id: int, payload: bytes) -> None:
        if self._lost is not None:
            return
        self._pending.append((frame_type, stream_id, payload))
        self._kick()

    def forget_stream(self, stream_id: int) -> None:
        self._streams.pop(stream_id, None)

    # -- connection tasks ---------------------------------------------------------

    def _fail_connection(self, error: BaseException) -> None:
        if self._connection_error is None:
            self._connection_error = error
        if self._connection_scope is not None:
            self._connection_scope.cancel()

    def _wake(self) -> None:
        self._work.set()

    def _kick(self) -> None:
        """Get queued frames moving.

        When no other task is ready to run, nothing else is about to join a
        batch: seal and write now, from this task, instead of paying a task
        switch to the writer on every request/response turn (the latency of
        an interactive protocol like Postgres is mostly such switches).
        Otherwise the writer collects everything queued in one batch.
        """
        if self._direct is None or self._writer_busy or self._unsent or self._runnable():
            self._wake()
            return
        batch = self._take_batch()
        if not batch:
            return
        assert self._encoder is not None
        data = self._seal(self._encoder, batch)
        if data is None:
            return
        try:
            written = self._direct.send_nowait(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            # The frames are retained: a resumed connection resends them.
            self._fail_connection(ConnectionLost(f"send failed: {exc}"))
            return
        self.bytes_sent += written
        if written < len(data) or self._pending:
            self._unsent = data[written:]
            self._wake()

    async def _reader(
        self, transport: trio.abc.Stream, decoder: _core.FrameDecoder, initial: bytes
    ) -> None:
        try:
            data: bytes | bytearray = initial
            while True:
                if not data:
                    data = await transport.receive_some(RECEIVE_SIZE)
                if not data:
                    decoder.eof()
                    raise ConnectionLost("peer closed the connection")
                self._last_heard = trio.current_time()
                self.bytes_received += len(data)
                decoder.feed(data)
                # Until empty: a bad frame behind good ones raises on the
                # call after the one that returned the good ones.
                while frames := decoder.next_frames():
                    for frame_type, stream_id, seq, _flags, payload in frames:
                        self._dispatch(frame_type, stream_id, payload)
                        if frame_type < _CONTROL_MIN:
                            self._recv_next = seq + 1
                self._schedule_ack()
                data = b""
        except _core.FrameError as exc:
            kind = type(exc).__name__
            # A connection cut mid-frame is usually the network, not an attack.
            level = logging.INFO if isinstance(exc, _core.Truncated) else logging.WARNING
            log.log(
                level,
                "session %s: rejected frame from %s: %s: %s",
                self.id.hex()[:12],
                self.peer,
                kind,
                exc,
            )
            self._fail_connection(ConnectionLost(f"bad frame: {kind}: {exc}"))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._fail_connection(ConnectionLost(f"receive failed: {exc}"))
        except (ConnectionLost, SessionLost, PeerProtocolError) as exc:
            self._fail_connection(exc)

    async def _writer(self, transport: trio.abc.Stream, encoder: _core.FrameEncoder) -> None:
        try:
            self._writer_busy = True
            await self._resend(transport, encoder)
            self._writer_busy = False
            self._encoder = encoder
            if isinstance(transport, FastSocketStream):
                self._direct = transport
            while True:
                await self._wait_for_work()
                data, self._unsent = self._unsent, b""
                batch = self._take_batch()
                if batch:
                    sealed = self._seal(encoder, batch)
                    if sealed is None:
                        return
                    data += sealed
                self._writer_busy = True
                await transport.send_all(data)
                self._writer_busy = False
                self.bytes_sent += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._fail_connection(ConnectionLost(f"send failed: {exc}"))

    def _seal(self, encoder: _core.FrameEncoder, batch: list[Frame]) -> bytes | None:
        """Seal ``batch`` and retain its reliable frames; None (and the
        connection failed) when the peer has left too much unacknowledged."""
        seq = encoder.next_reliable_seq
        data = encoder.encode_batch(batch)
        for frame_type, stream_id, payload in batch:
            if frame_type < _CONTROL_MIN:
                self._retained.append((seq, frame_type, stream_id, payload))
                self._retained_bytes += len(payload)
                seq += 1
        self._send_next = seq
        if self._retained_bytes > MAX_UNACKED_BYTES:
            unacked = f"{self._retained_bytes >> 20} MiB"
            self._fail_connection(PeerProtocolError(f"peer left {unacked} unacknowledged"))
            return None
        return data

    async def _resend(self, transport: trio.abc.Stream, encoder: _core.FrameEncoder) -> None:
        """Reseal and send every unacknowledged frame, oldest first."""
        frames = [(t, sid, payload) for _seq, t, sid, payload in self._retained]
        if not frames:
            return
        log.debug("session %s: resending %d frames", self.id.hex()[:12], len(frames))
        start = 0
        while start < len(frames):
            end, size = start, 0
            while end < len(frames) and size < BATCH_BYTES:
                size += len(frames[end][2])
                end += 1
            data = encoder.encode_batch(frames[start:end])
            self.bytes_sent += len(data)
            await transport.send_all(data)
            start = end
        if encoder.next_reliable_seq != self._send_next:
            raise AssertionError("resent frames did not end at the next sequence")

    def _schedule_ack(self) -> None:
        """After a read: make sure what arrived is acknowledged, at once if
        much is unacknowledged, else within ACK_DELAY (so the ACK can ride
        along with data going the other way)."""
        unacked = self._recv_next - self._ack_sent
        if unacked <= 0:
            return
        if self._ack_deadline is None:
            self._ack_deadline = trio.current_time() + ACK_DELAY
            self._ack_armings += 1
            if self._ack_timer_idle is not None:
                self._ack_timer_idle.set()
                self._ack_timer_idle = None
        if unacked >= ACK_EVERY:
            self._kick()

    async def _ack_timer(self) -> None:
        """Send a lone ACK when no outgoing frame carried one in time.

        While traffic flows, deadlines are armed and met by piggybacked ACKs
        on every request/response turn; waking this task for each would
        cost a task switch per message. So it polls every ACK_DELAY while
        deadlines keep being armed, and parks only after a quiet period.
        """
        armings_seen = -1
        while True:
            deadline = self._ack_deadline
            if deadline is not None:
                await trio.sleep_until(deadline)
                if self._ack_due():
                    self._kick()
                    if self._ack_deadline is not None:
                        # The writer has it, but is busy sending (a full
                        # socket): look again later rather than spin.
                        await trio.sleep(ACK_DELAY)
            elif self._ack_armings != armings_seen:
                armings_seen = self._ack_armings
                await trio.sleep(ACK_DELAY)
            else:
                self._ack_timer_idle = idle = trio.Event()
                await idle.wait()

    def _ack_due(self) -> bool:
        return self._ack_deadline is not None and (
            self._recv_next - self._ack_sent >= ACK_EVERY
            or trio.current_time() >= self._ack_deadline
        )

    async def _wait_for_work(self) -> None:
        while not (self._unsent or self._pending or self._control or self._ack_due()):
            if self._work.is_set():
                self._work = trio.Event()
                continue
            await self._work.wait()

    def _take_batch(self) -> list[Frame]:
        batch: list[Frame] = []
        if self._recv_next > self._ack_sent:
            batch.append((FrameType.ACK, 0, encode_u64(self._recv_next)))
            self._ack_sent = self._recv_next
            self._ack_deadline = None
        batch.extend(self._control)
        self._control.clear()
        size = 0
        pending = self._pending
        while pending and size < BATCH_BYTES:
            frame = pending.popleft()
            size += len(frame[2])
            batch.append(frame)
        return batch

    async def _heartbeat(self) -> None:
        interval = self.settings.heartbeat_interval_s
        dead_after = self.settings.dead_after_s
        ping_id = 0
        while True:
            await trio.sleep(min(interval, dead_after / 3))
            now = trio.current_time()
            silent = now - self._last_heard
            if silent > dead_after:
                self._fail_connection(ConnectionLost(f"peer silent for {silent:.1f}s"))
                return
            ping_id += 1
            self._ping_sent_at = {ping_id: now}
            self._control.append((FrameType.PING, 0, encode_u64(ping_id)))
            self._kick()

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
        elif frame_type == FrameType.ACK:
            self._on_ack(decode_u64(payload, "ACK"))
        elif frame_type == FrameType.PING:
            self._control.append((FrameType.PONG, 0, payload))
            self._kick()
        elif frame_type == FrameType.PONG:
            sent = self._ping_sent_at.pop(decode_u64(payload, "PONG"), None)
            if sent is not None:
                self.rtt = trio.current_time() - sent
        elif frame_type == FrameType.GOAWAY:
            _code, reason = decode_reason(payload, "GOAWAY")
            raise SessionLost(f"peer ended the session: {reason}")
        else:
            raise PeerProtocolError(f"unknown frame type {frame_type:#04x}")

    def _on_ack(self, recv_next: int) -> None:
        if recv_next > self._send_next:
            raise PeerProtocolError(
                f"peer acknowledges {recv_next}, only {self._send_next} frames were sent"
            )
        retained = self._retained
        while retained and retained[0][0] < recv_next:
            self._retained_bytes -= len(retained.popleft()[3])

    def _accept(self, stream_id: int, payload: bytes) -> None:
        peer_parity = 0 if self.initiator else 1
        if stream_id % 2 != peer_parity or stream_id <= self._last_peer_stream_id:
            raise PeerProtocolError(f"peer opened stream {stream_id} out of order")
        self._last_peer_stream_id = stream_id
        try:
            request = decode_open(payload)
        except ValueError as exc:
            self.queue_frame(FrameType.RESET, stream_id, encode_reason(ResetCode.REFUSED, str(exc)))
            return
        if self._handler is None:
            reason = encode_reason(ResetCode.REFUSED, "this end accepts no streams")
            self.queue_frame(FrameType.RESET, stream_id, reason)
            return
        stream = TunnelStream(self, stream_id, request)
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
