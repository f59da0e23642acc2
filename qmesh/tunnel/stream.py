"""One logical stream inside a tunnel session, as a Trio ``HalfCloseableStream``.

Flow control is per stream and credit based: a sender may have at most the
receiver's window of unconsumed bytes outstanding. The receiver grants more
credit (WINDOW) as its application *consumes* data, so a slow consumer stalls
only its own stream, never the connection.

A stream ends cleanly when both sides have sent CLOSE; ``aclose`` before that
sends RESET so the peer learns that nobody will read what it sends.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from qmesh.fastsocket import YieldBudget
from qmesh.tunnel.errors import StreamReset
from qmesh.tunnel.frames import (
    INITIAL_WINDOW,
    FrameType,
    ResetCode,
    encode_reason,
    encode_u32,
)

if TYPE_CHECKING:
    from qmesh.tunnel.session import Session

log = logging.getLogger(__name__)


class TunnelStream(trio.abc.HalfCloseableStream):
    """A bidirectional byte stream multiplexed over a :class:`Session`."""

    def __init__(self, session: Session, stream_id: int, request: dict[str, Any]) -> None:
        self.session = session
        self.id = stream_id
        self.request = request
        # Never below the protocol's initial credit: we can only grant, not take back.
        self._window = max(session.settings.stream_window, INITIAL_WINDOW)
        self._chunk_size = session.settings.chunk_size
        # Receive side.
        self._recv_chunks: deque[bytes] = deque()
        self._recv_buffered = 0
        self._recv_eof = False
        self._consumed_unreported = 0
        self.direct_sink: Callable[[bytes], int] | None = None
        """Takes arriving bytes straight from the session's reader while the
        receiving task is parked, saving a task switch per message; returns
        how many it took (the rest is queued for the receiver as usual).
        Whoever sets it must be the one task that receives from this stream.
        It runs only while that task waits inside :meth:`receive_some`, so
        never between a receive and the send that forwards it. Should it
        raise, only this stream is reset."""
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

    async def aclose(self) -> None:
        if not self._closed:
            if self._reset is None and not (self._eof_sent and self._recv_eof):
                self._queue(FrameType.RESET, encode_reason(ResetCode.CANCEL, "closed by peer"))
            self._closed = True
            self.session.forget_stream(self.id)
            self._lot.unpark_all()
        await trio.lowlevel.checkpoint()

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
        if self.direct_sink is not None and self._receiving and not self._recv_chunks:
            try:
                taken = self.direct_sink(payload)
            except Exception:
                # A bug in one relay must not take the session's reader (and
                # every other stream) down with it: end only this stream.
                log.exception("the relay of stream %d failed", self.id)
                self.reset(ResetCode.INTERNAL, "the relay failed")
                return True
            if taken:
                self._consumed(taken)
                payload = payload[taken:]
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

    def on_reset(self, code: int, reason: str) -> None:
        self._fail(StreamReset(code, reason))

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
