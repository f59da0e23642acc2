"""One logical stream inside a tunnel session, as a Trio ``HalfCloseableStream``.

Flow control is per stream and credit based: a sender may have at most the
receiver's window of unconsumed bytes outstanding. The receiver grants more
credit (WINDOW) as its application *consumes* data, so a slow consumer stalls
only its own stream, never the connection.

A stream ends cleanly when both sides have sent CLOSE; ``aclose`` before that
sends RESET so the peer learns that nobody will read what it sends.

A stream relayed to a plain socket can be handed to the session's engine
(:meth:`TunnelStream.relay_native`): from then until it ends, its frames never
reach Python. Its state (credit, windows, half-closes) goes with it and comes
back when it ends, so the protocol seen by the peer is the same either way.

A stream knows its session only as a :class:`StreamHost`, the few calls it
makes. What a native relay's scanners look for is a :class:`NativeTap`, built
by the package that knows what the bytes mean and passed through to the
engine unread.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any, Protocol

import trio

from qmesh._core import (
    AuditAuthor,
    PooledSpec,
    RelayEnding,
    RelayOutcome,
    TapRecord,
    TapSpec,
    TlsSession,
)
from qmesh.fastsocket import FastSocketStream, YieldBudget
from qmesh.tunnel.errors import StreamReset
from qmesh.tunnel.frames import (
    INITIAL_WINDOW,
    FrameType,
    ResetCode,
    encode_reason,
    encode_u32,
)

log = logging.getLogger(__name__)


class StreamHost(Protocol):
    """The session a stream lives in, as the stream and its handlers see it:
    who is at the other end, and the calls a stream makes.
    :class:`qmesh.tunnel.session.Session` is the one implementation."""

    @property
    def peer(self) -> str:
        """The other end's name (the edge's or node's)."""

    @property
    def peer_role(self) -> str:
        """The other end's role: ``gate`` at an edge, ``minigate`` or ``daemon`` at the Gate."""

    def queue_frame(self, frame_type: int, stream_id: int, payload: bytes) -> None:
        """Send a frame of this stream (kept for the next connection while
        there is none)."""

    def forget_stream(self, stream_id: int) -> None:
        """The stream is done: frames that still arrive for it are dropped."""

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
        tap: TapSpec | None,
        tls: TlsSession | None,
        pooled: PooledSpec | None = None,
        audit: AuditAuthor | None = None,
    ) -> None:
        """Hand the stream, with its state, to the engine, relayed to the
        socket ``fd`` (see ``qmesh._core.TunnelEngine.attach_native``)."""

    def abort_native(self, stream_id: int) -> RelayOutcome | None:
        """Take the stream back from the engine; None if it had ended."""

    def pooled_lease(self, stream_id: int) -> int | None:
        """The connection a pooled native stream holds now, or None."""

    def verdict(self, stream_id: int, replacement: bytes) -> None:
        """Relay ``replacement`` in place of the client message the stream holds."""


class NativeTap(Protocol):
    """What a native relay reports besides relaying, and who hears it.

    Built by the package that knows what the bytes are; the stream hands
    :attr:`spec` to the engine as it is, and the records it yields to
    :meth:`on_records`."""

    @property
    def spec(self) -> TapSpec:
        """The engine's scanners for the relay."""

    def on_records(self, records: list[TapRecord]) -> bytes | None:
        """A batch of records, in order. A batch ends with at most one held
        record (``held`` set); then return the bytes to relay in its place
        (None: no verdict, the relay is ending)."""


class TunnelStream(trio.abc.HalfCloseableStream):
    """A bidirectional byte stream multiplexed over a session.

    ``window`` is the receive window to grant (never below the protocol's
    initial credit: credit can only be granted, not taken back);
    ``chunk_size`` the largest DATA payload to send."""

    def __init__(
        self,
        session: StreamHost,
        stream_id: int,
        request: dict[str, Any],
        *,
        window: int,
        chunk_size: int,
    ) -> None:
        self.session = session
        self.id = stream_id
        self.request = request
        self._window = max(window, INITIAL_WINDOW)
        self._chunk_size = chunk_size
        # Receive side.
        self._recv_chunks: deque[bytes] = deque()
        self._recv_buffered = 0
        self._recv_eof = False
        self._consumed_unreported = 0
        # Set while the engine relays this stream natively.
        self._native_done: trio.Event | None = None
        self._native_outcome: RelayOutcome | None = None
        self._tap: NativeTap | None = None
        # Send side.
        self._send_credit = INITIAL_WINDOW
        self._eof_sent = False
        self._sending = False
        self._receiving = False
        # Lifecycle.
        self._reset: StreamReset | None = None
        self._closed = False
        self._lot = trio.lowlevel.ParkingLot()
        # Calls that need not wait skip the scheduling round (see fastsocket).
        self._budget = YieldBudget()
        if self._window > INITIAL_WINDOW:
            self._queue(FrameType.WINDOW, encode_u32(self._window - INITIAL_WINDOW))

    def __repr__(self) -> str:
        return f"<TunnelStream {self.id} {self.request.get('service')!r}>"

    # -- the application's side ------------------------------------------

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        try:
            await self._budget.checkpoint()
            self._check_sendable()
            size = len(data)
            if type(data) is bytes and 0 < size <= min(self._send_credit, self._chunk_size):
                # The common case on a relay: one frame, no copy.
                self._send_credit -= size
                self._queue(FrameType.DATA, data)
                return
            view = memoryview(data).cast("B")
            while view:
                while self._send_credit <= 0:
                    self._budget.reset()
                    await self._lot.park()
                    self._check_sendable()
                n = min(len(view), self._send_credit, self._chunk_size)
                self._send_credit -= n
                self._queue(FrameType.DATA, bytes(view[:n]))
                view = view[n:]
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        while self._send_credit <= 0 and self._reset is None and not self._closed:
            await self._lot.park()
        await trio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint()
        if self._closed:
            raise trio.ClosedResourceError("stream was closed")
        if self._reset is not None:
            raise self._reset
        if not self._eof_sent:
            self._eof_sent = True
            self._queue(FrameType.CLOSE, b"")
            self._forget_if_finished()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this stream")
        self._receiving = True
        try:
            await self._budget.checkpoint()
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("stream was closed")
                if self._recv_chunks:
                    return self._take(max_bytes)
                if self._reset is not None:
                    raise self._reset
                if self._recv_eof:
                    return b""
                self._budget.reset()
                await self._lot.park()
        finally:
            self._receiving = False

    async def drain(self, timeout_s: float) -> None:
        """Read and drop what the peer still sends, until its EOF or for at
        most ``timeout_s``. A stream closed after both ends finished closes
        cleanly; closed before the peer's EOF it is reset, and a peer still
        finishing its side (a request's EOF after the request) takes that
        reset for a broken exchange, though the answer reached it whole."""
        with trio.move_on_after(timeout_s):
            while await self.receive_some():
                pass

    async def aclose(self) -> None:
        if not self._closed:
            if self._reset is None and not (self._eof_sent and self._recv_eof):
                self._queue(FrameType.RESET, encode_reason(ResetCode.CANCEL, "closed by peer"))
            self._closed = True
            self.session.forget_stream(self.id)
            self._lot.unpark_all()
        await trio.lowlevel.checkpoint()

    async def relay_native(
        self,
        sock: trio.SocketStream | FastSocketStream | None,
        *,
        end_on_socket_eof: bool = False,
        tap: NativeTap | None = None,
        tls: TlsSession | None = None,
        pooled: PooledSpec | None = None,
        audit: AuditAuthor | None = None,
    ) -> RelayOutcome:
        """Relay this stream to the connected ``sock`` in the engine, both
        ways, until it ends; half-closes pass on as in
        :func:`qmesh.tunnel.services.splice`. With ``end_on_socket_eof`` it
        ends (after sending CLOSE) when the socket reaches end of stream.

        With a ``tap``, the engine scans the bytes as its spec says and
        hands what it reports to the tap, holding what it must until the
        tap's verdict; bytes its scanners reject end the relay (e.g.
        ``RelayEnding.POSTGRES``) before they reach the socket.

        With ``tls`` (a connection over ``sock`` whose handshake is done), the
        engine speaks TLS on the socket from now on; the connection is spent.

        With ``pooled`` (a ``PooledSpec``, and no ``sock``) the stream is a
        transaction-mode Postgres client whose server connections the engine
        borrows from the spec's shelf (see ``TunnelEngine.attach_native``); client
        bytes the engine did not relay (``outcome.pooled.leftover``) are this
        stream's to read again. With ``audit`` the engine records each
        finished statement there itself (a stream that is not pooled needs
        a ``tap`` whose scanners report what the audit reads).

        Cancelling takes the stream back at once (its outcome is then
        :attr:`native_outcome`, if the engine had not ended it already). The
        caller still owns both ends: it closes the socket and this stream
        afterwards.
        """
        if self._sending or self._receiving:
            raise trio.BusyResourceError("another task is using this stream")
        self._check_sendable()
        to_socket = b"".join(self._recv_chunks)
        self._recv_chunks.clear()
        self._recv_buffered = 0
        self._native_done = done = trio.Event()
        self._native_outcome = None
        self._tap = tap
        self._sending = self._receiving = True
        try:
            self.session.attach_native(
                self.id,
                -1 if sock is None else sock.socket.fileno(),
                credit=self._send_credit,
                window=self._window,
                to_socket=to_socket,
                consumed=self._consumed_unreported,
                eof_received=self._recv_eof,
                end_on_socket_eof=end_on_socket_eof,
                tap=None if tap is None else tap.spec,
                tls=tls,
                pooled=pooled,
                audit=audit,
            )
            self._consumed_unreported = 0  # the engine's to report now
            try:
                await done.wait()
            except BaseException:
                outcome = self.session.abort_native(self.id)
                if outcome is not None:
                    self.on_native_end(outcome)
                raise
        finally:
            self._sending = self._receiving = False
            self._native_done = None
            self._tap = None
        assert self._native_outcome is not None
        return self._native_outcome

    @property
    def native_outcome(self) -> RelayOutcome | None:
        """How the last native relay ended (None before one has)."""
        return self._native_outcome

    def pooled_lease(self) -> int | None:
        """The connection the engine relays this pooled stream to now."""
        return self.session.pooled_lease(self.id)

    @property
    def failure(self) -> StreamReset | None:
        """Why the stream was aborted (by the peer, the end of the session
        or this side), or None."""
        return self._reset

    def reset(self, code: ResetCode, reason: str) -> None:
        """Abort both directions and tell the peer why."""
        if self._closed or self._reset is not None:
            return
        self._queue(FrameType.RESET, encode_reason(code, reason))
        self._fail(StreamReset(code, reason))

    # -- the session's side ----------------------------------------------

    def on_data(self, payload: bytes) -> bool:
        """Deliver peer bytes; False if the peer overran its credit."""
        if self._closed or self._reset is not None:
            return True  # in flight when we gave up on the stream; drop it
        if self._recv_eof or self._recv_buffered + len(payload) > self._window:
            return False
        if payload:
            self._recv_chunks.append(payload)
            self._recv_buffered += len(payload)
            self._lot.unpark_all()
        return True

    def on_close(self) -> None:
        self._recv_eof = True
        self._lot.unpark_all()
        self._forget_if_finished()

    def on_window(self, increment: int) -> None:
        self._send_credit += increment
        self._lot.unpark_all()

    def on_reset(self, code: int, reason: str, *, between_answers: bool = False) -> None:
        """The peer reset the stream, or (``SESSION_LOST``) the session is over."""
        self._fail(StreamReset(code, reason, between_answers=between_answers))
        if self._native_done is not None:
            # The session is over; the engine has dropped the native relay.
            self._native_outcome = RelayOutcome(
                RelayEnding.RESET,
                code=code,
                detail=reason,
                eof_sent=self._eof_sent,
                eof_received=self._recv_eof,
            )
            self._native_done.set()

    def on_tap(self, records: list[TapRecord]) -> None:
        if self._tap is None:
            return
        try:
            verdict = self._tap.on_records(records)
        except Exception:
            # A bug in one relay's audit must not take the session's pump
            # (and every other stream) down with it.
            log.exception("the tap of stream %d failed", self.id)
            outcome = self.session.abort_native(self.id)
            if outcome is not None:
                self.on_native_end(outcome)
            self.reset(ResetCode.INTERNAL, "the relay failed")
            return
        _at, _from_tunnel, _tag, _raw, held = records[-1]
        if verdict is not None and held:
            self.session.verdict(self.id, verdict)

    def on_native_end(self, outcome: RelayOutcome) -> None:
        """The engine gave the stream back: carry on from its state."""
        self._send_credit = outcome.credit
        self._eof_sent = self._eof_sent or outcome.eof_sent
        self._recv_eof = self._recv_eof or outcome.eof_received
        pooled = outcome.pooled
        if pooled is not None:
            # What the engine read and did not relay is read again from here.
            if pooled.leftover:
                self._recv_chunks.appendleft(pooled.leftover)
                self._recv_buffered += len(pooled.leftover)
            self._consumed(pooled.consumed)
        if outcome.ending == RelayEnding.RESET:
            self._fail(StreamReset(outcome.code, outcome.detail))
        elif outcome.ending == RelayEnding.PROTOCOL:  # the engine has sent RESET
            self._fail(StreamReset(ResetCode.PROTOCOL_ERROR, outcome.detail))
        self._forget_if_finished()
        self._native_outcome = outcome
        if self._native_done is not None:
            self._native_done.set()

    def _fail(self, error: StreamReset) -> None:
        if self._reset is None:
            self._reset = error
            self.session.forget_stream(self.id)
            self._lot.unpark_all()

    # -- internals ---------------------------------------------------------

    def _check_sendable(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("stream was closed")
        if self._reset is not None:
            raise self._reset
        if self._eof_sent:
            raise trio.ClosedResourceError("send_eof() was already called")

    def _take(self, max_bytes: int | None) -> bytes:
        chunk = self._recv_chunks.popleft()
        if max_bytes is not None and len(chunk) > max_bytes:
            self._recv_chunks.appendleft(chunk[max_bytes:])
            chunk = chunk[:max_bytes]
        self._recv_buffered -= len(chunk)
        self._consumed(len(chunk))
        return chunk

    def _consumed(self, size: int) -> None:
        self._consumed_unreported += size
        # Grant credit in large steps: one WINDOW frame per half window keeps
        # the pipe full without a frame per read.
        if self._consumed_unreported >= self._window // 2 and not self._recv_eof:
            self._queue(FrameType.WINDOW, encode_u32(self._consumed_unreported))
            self._consumed_unreported = 0

    def _queue(self, frame_type: FrameType, payload: bytes) -> None:
        self.session.queue_frame(frame_type, self.id, payload)

    def _forget_if_finished(self) -> None:
        if self._eof_sent and self._recv_eof:
            self.session.forget_stream(self.id)
