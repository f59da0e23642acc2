"""Hostile bytes on the wire: each kind of bad frame is rejected with its own
error kind, only the affected connection is torn down, the session resumes
on a clean connection, and other sessions never notice."""

from __future__ import annotations

import logging
import os

import pytest
import trio
import trio.lowlevel
from tunnelkit import roundtrip, start_edge, start_gate

HEADER = 20
CONTROL_MIN = 0x10
HANDSHAKE_PREFIX = 8  # the preamble; then u16 length + Noise message 1


class FrameMutator:
    """A loopback proxy that damages one client→gate reliable frame, once.

    It knows only the public framing: the handshake's length prefix and each
    frame header's length field. It cannot forge anything.
    """

    def __init__(self, gate_port: int, mode: str, victim: int = 3) -> None:
        self.gate_port = gate_port
        self.mode = mode
        self.victim = victim
        self.done = False

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        upstream = await trio.open_tcp_stream("127.0.0.1", self.gate_port)
        mutate = not self.done
        self.done = True
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._upstream, client, upstream, mutate, nursery.cancel_scope)
                nursery.start_soon(self._plain, upstream, client, nursery.cancel_scope)
        finally:
            await trio.aclose_forcefully(client)
            await trio.aclose_forcefully(upstream)

    async def _plain(
        self, src: trio.SocketStream, dst: trio.SocketStream, scope: trio.CancelScope
    ) -> None:
        try:
            while data := await src.receive_some(65536):
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()

    async def _upstream(
        self, src: trio.SocketStream, dst: trio.SocketStream, mutate: bool, scope: trio.CancelScope
    ) -> None:
        buf = bytearray()
        in_handshake = True
        index = 0
        held: bytes | None = None
        try:
            while data := await src.receive_some(65536):
                buf += data
                if in_handshake:
                    if len(buf) < HANDSHAKE_PREFIX + 2:
                        continue
                    end = HANDSHAKE_PREFIX + 2 + int.from_bytes(buf[8:10], "big")
                    if len(buf) < end:
                        continue
                    await dst.send_all(bytes(buf[:end]))
                    del buf[:end]
                    in_handshake = False
                while len(buf) >= HEADER:
                    length = int.from_bytes(buf[16:20], "big")
                    if mutate and index == self.victim and self.mode == "huge":
                        await dst.send_all(bytes(buf[:16]) + b"\xff\xff\xff\xff")
                        await trio.sleep_forever()  # the gate must hang up first
                    if len(buf) < HEADER + length:
                        break
                    frame = bytes(buf[: HEADER + length])
                    del buf[: HEADER + length]
                    if frame[1] >= CONTROL_MIN:
                        # Control frames have their own sequence space: moving
                        # them relative to reliable ones is not a reordering.
                        await dst.send_all(frame)
                        continue
                    if mutate and index == self.victim:
                        if self.mode == "flip":
                            frame = frame[:-5] + bytes([frame[-5] ^ 0x01]) + frame[-4:]
                        elif self.mode == "header":
                            frame = frame[:5] + bytes([frame[5] ^ 0x80]) + frame[6:]
                        elif self.mode == "truncate":
                            await dst.send_all(frame[: len(frame) // 2])
                            await dst.send_eof()
                            await trio.sleep_forever()
                        elif self.mode in ("replay", "reorder"):
                            if self.mode == "replay":
                                await dst.send_all(frame)
                            # Sent (again, or for the first time) after the next frame.
                            held = frame
                            index += 1
                            continue
                    await dst.send_all(frame)
                    if held is not None:
                        await dst.send_all(held)
                        held = None
                    index += 1
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()


EXPECTED = {
    "flip": "Tampered",
    "header": "Tampered",
    "replay": "Replayed",
    "reorder": "Reordered",
    "truncate": "Truncated",
    "huge": "FrameTooLarge",
}


@pytest.mark.parametrize("mode", sorted(EXPECTED))
async def test_bad_frame_tears_down_only_its_connection(
    mode: str, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="qmesh")
    gate = await start_gate(nursery)
    bystander = await start_edge(nursery, gate, "bystander")
    mutator = FrameMutator(gate.port, mode)
    port = await nursery.start(mutator.serve)
    victim = await start_edge(nursery, gate, "victim", port=port)

    payload = os.urandom(400_000)
    stream = await victim.open_stream({"service": "echo"})

    async def trickle() -> bytes:
        # Many small writes: many frames, so the victim frame has neighbours.
        received = bytearray()

        async def read() -> None:
            while data := await stream.receive_some():
                received.extend(data)

        async with trio.open_nursery() as inner:
            inner.start_soon(read)
            for i in range(0, len(payload), 4000):
                await stream.send_all(payload[i : i + 4000])
                await trio.lowlevel.checkpoint()
            await stream.send_eof()
        return bytes(received)

    with trio.fail_after(30):
        assert await trickle() == payload
        side = await bystander.open_stream({"service": "echo"})
        assert await roundtrip(side, b"unaffected") == b"unaffected"

    rejected = [r.getMessage() for r in caplog.records if "rejected frame" in r.getMessage()]
    assert rejected, "the gate did not report a rejected frame"
    assert EXPECTED[mode] in rejected[0]
    assert victim.resumptions >= 1 and victim.sessions_lost == 0
    assert bystander.connects == 1
