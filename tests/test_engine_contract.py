"""The Python session and the Rust engine read the tunnel protocol alike.

Frame types, reset codes and the RESET/GOAWAY reason codec are defined once,
in ``qmesh-wire``, and :mod:`qmesh.tunnel.frames` takes them from
:mod:`qmesh._core`. This file holds the two sides to each other:

- every :class:`FrameType` and :class:`ResetCode` member is the Rust value of
  the same name, and neither side has one the other lacks;
- the reason codec agrees, both ways, with the format docs/protocol.md
  writes down (``REFERENCE`` below, an independent implementation): what
  Python encodes Rust decodes and the other way round, including the empty
  reason, the 1024-byte cut (inside a character, too), lone surrogates and
  bytes that are not UTF-8;
- the engine itself speaks it: a peer's RESET reaches Python as the reference
  decodes it, the engine's own RESET decodes to the documented code and
  reason, and the engine's errors arrive as the documented exception classes.

Loopback socketpairs only; every wait is bounded.
"""

from __future__ import annotations

import errno
import os
import re
import select
import socket
import struct
import time
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qmesh import _core
from qmesh.tunnel import frames
from qmesh.tunnel.errors import PeerProtocolError
from qmesh.tunnel.frames import RELIABLE_TYPES, FrameType, ResetCode

DEADLINE = 5.0

# -- the reference: docs/protocol.md's "u16 code + UTF-8 reason (≤ 1024 bytes)" --


def reference_encode(code: int, reason: str) -> bytes:
    return struct.pack(">H", code) + reason.encode("utf-8", "replace")[:1024]


def reference_decode(payload: bytes) -> tuple[int, str]:
    if len(payload) < 2:
        raise ValueError("missing code")
    return struct.unpack_from(">H", payload)[0], payload[2:1026].decode("utf-8", "replace")


# -- one definition -------------------------------------------------------------------


def test_frame_types_are_rusts() -> None:
    assert {m.name: m.value for m in FrameType} == _core.FRAME_TYPES
    assert [m.name for m in FrameType] == list(_core.FRAME_TYPES), "protocol order"


def test_reset_codes_are_rusts() -> None:
    assert {m.name: m.value for m in ResetCode} == _core.RESET_CODES
    assert [m.name for m in ResetCode] == list(_core.RESET_CODES)


def test_reliable_types_follow_the_header_classes() -> None:
    # docs/protocol.md: stream frames are retained and resent, control frames are not.
    reliable = {FrameType(v).name for v in RELIABLE_TYPES}
    assert reliable == {"OPEN", "DATA", "CLOSE", "RESET", "WINDOW"}
    assert all(v < 0x20 for v in _core.FRAME_TYPES.values()), "a type the codec rejects"


def test_documented_values() -> None:
    # docs/protocol.md's tables: a change here is a protocol change.
    assert _core.FRAME_TYPES == {
        "OPEN": 0x01, "DATA": 0x02, "CLOSE": 0x03, "RESET": 0x04, "WINDOW": 0x05,
        "ACK": 0x10, "PING": 0x11, "PONG": 0x12, "GOAWAY": 0x13,
    }  # fmt: skip
    assert _core.RESET_CODES == {
        "CANCEL": 0, "REFUSED": 1, "CONNECT_FAILED": 2, "SESSION_LOST": 3,
        "PROTOCOL_ERROR": 4, "INTERNAL": 5,
    }  # fmt: skip
    assert _core.MAX_REASON == 1024


# -- the reason codec -----------------------------------------------------------------

REASONS = [
    "",
    "closed by peer",
    "é" * 512,  # exactly 1024 bytes
    "é" * 513,  # one character over, cut between characters
    "x" + "é" * 600,  # cut inside a two-byte character
    "\U0001f600" * 300,  # cut inside a four-byte character
    "a\udc80b\ud800",  # lone surrogates: no UTF-8 form
    "nul\x00inside",
]


@pytest.mark.parametrize("reason", REASONS)
@pytest.mark.parametrize("code", [0, ResetCode.PROTOCOL_ERROR, 0xFFFF])
def test_reason_round_trips_both_ways(code: int, reason: str) -> None:
    rust = _core.encode_reason(code, reason)
    python = reference_encode(code, reason)
    assert rust == python
    assert _core.decode_reason(python) == reference_decode(rust)
    assert frames.decode_reason(rust, "RESET") == reference_decode(python)
    decoded_code, text = _core.decode_reason(rust)
    assert decoded_code == code
    if len(reason.encode("utf-8", "replace")) <= 1024:
        assert text == reason.encode("utf-8", "replace").decode()


PAYLOADS = [
    b"\x00\x00",
    b"\x00\x01\xff\xfe",  # not UTF-8 at all
    b"\x00\x01ok\xe2\x82",  # a truncated three-byte character at the end
    b"\x00\x01\xc0\xaf",  # an overlong encoding
    b"\x00\x01\xed\xa0\x80",  # an encoded surrogate
    b"\x00\x01\xf4\x90\x80\x80",  # beyond U+10FFFF
    b"\x00\x01\xe2\x28\xa1",  # a bad continuation byte
    b"\x00\x01" + b"z" * 2000,  # a peer's reason past the limit
    b"\x00\x01" + b"z" * 1023 + "é".encode(),  # the limit splits a character
]


@pytest.mark.parametrize("payload", PAYLOADS)
def test_peer_payloads_decode_alike(payload: bytes) -> None:
    assert _core.decode_reason(payload) == reference_decode(payload)


@pytest.mark.parametrize("payload", [b"", b"\x04"])
def test_a_payload_without_its_code_is_refused(payload: bytes) -> None:
    with pytest.raises(ValueError):
        reference_decode(payload)
    with pytest.raises(_core.Malformed):
        _core.decode_reason(payload)
    with pytest.raises(PeerProtocolError, match="GOAWAY frame: missing code"):
        frames.decode_reason(payload, "GOAWAY")


@given(st.integers(0, 0xFFFF), st.text(max_size=1100))
def test_any_reason_round_trips(code: int, reason: str) -> None:
    assert _core.encode_reason(code, reason) == reference_encode(code, reason)
    assert _core.decode_reason(reference_encode(code, reason)) == reference_decode(
        _core.encode_reason(code, reason)
    )


@given(st.binary(min_size=2, max_size=1100))
def test_any_payload_decodes_alike(payload: bytes) -> None:
    assert _core.decode_reason(payload) == reference_decode(payload)


# -- the engine speaks it -------------------------------------------------------------

STREAM = 3
WINDOW = 1024


class Peer:
    """A tunnel peer in plain Python (the sans-IO codec over a socketpair)
    facing a :class:`qmesh._core.TunnelEngine` with one native stream."""

    def __init__(
        self,
        heartbeat_interval: float | None = None,
        dead_after: float | None = None,
        max_payload: int = _core.MAX_PAYLOAD_LIMIT,
    ) -> None:
        to_engine, to_peer = os.urandom(32), os.urandom(32)
        self.engine = _core.TunnelEngine(
            ack_delay=0.001, heartbeat_interval=heartbeat_interval, dead_after=dead_after
        )
        self.tunnel, engine_end = socket.socketpair()
        self.app, native_end = socket.socketpair()
        self.sockets = [engine_end, native_end]
        for sock in self.sockets:
            sock.setblocking(False)
        self.tunnel.settimeout(DEADLINE)
        self.encoder = _core.FrameEncoder(to_engine)
        self.decoder = _core.FrameDecoder(to_peer)
        self.engine.attach(
            engine_end.fileno(),
            _core.FrameEncoder(to_peer),
            _core.FrameDecoder(to_engine, max_payload=max_payload),
            b"",
        )
        self.engine.attach_native(STREAM, native_end.fileno(), credit=WINDOW, window=WINDOW)

    def send(self, frame_type: int, payload: bytes, stream_id: int = STREAM) -> None:
        self.tunnel.sendall(self.encoder.encode(frame_type, stream_id, payload))

    def frame(self, frame_type: int) -> bytes:
        """The payload of the next frame of ``frame_type`` the engine sends."""
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            for kind, _sid, _seq, _flags, payload in self.decoder.next_frames():
                if kind == frame_type:
                    return payload
            self.decoder.feed(self.tunnel.recv(65536))
        raise AssertionError(f"no frame of type {frame_type:#x} from the engine")

    def answer_pings_until_error(self) -> BaseException:
        """Answer every PING with its PONG (and acknowledge nothing) until
        the engine hands up the connection's error."""
        deadline = time.monotonic() + DEADLINE
        self.tunnel.settimeout(0.01)
        while time.monotonic() < deadline:
            _frames, _taps, _ended, error = self.engine.take()
            if error is not None:
                return error
            for kind, _sid, _seq, _flags, payload in self.decoder.next_frames():
                if kind == FrameType.PING:
                    self.send(FrameType.PONG, payload, stream_id=0)
            try:
                self.decoder.feed(self.tunnel.recv(65536))
            except TimeoutError:
                pass
        raise AssertionError("the engine never gave up on the connection")

    def take(self) -> tuple[list[tuple[int, _core.RelayOutcome]], BaseException | None]:
        """What the engine hands up first: endings, or the connection's error."""
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            select.select([self.engine.notify_fd], [], [], 0.05)
            _frames, _taps, ended, error = self.engine.take()
            if ended or error is not None:
                return ended, error
        raise AssertionError("the engine handed up nothing")

    def close(self) -> None:
        self.engine.close()  # stops watching every socket before they close
        for sock in [self.tunnel, self.app, *self.sockets]:
            sock.close()


@pytest.fixture
def peer() -> Iterator[Peer]:
    p = Peer()
    try:
        yield p
    finally:
        p.close()


def test_a_peers_reset_reaches_python_as_the_reference_reads_it(peer: Peer) -> None:
    reason = b"bye \xff\xfe " + "é".encode() * 600  # not UTF-8, and past the limit
    payload = struct.pack(">H", ResetCode.CONNECT_FAILED) + reason
    peer.send(FrameType.RESET, payload)
    ended, error = peer.take()
    assert error is None
    ((stream_id, outcome),) = ended
    assert stream_id == STREAM
    assert outcome.ending == _core.RelayEnding.RESET and outcome.failed
    assert (outcome.code, outcome.detail) == reference_decode(payload)
    assert (outcome.code, outcome.detail) == frames.decode_reason(payload, "RESET")


def test_the_engines_own_reset_decodes_to_the_documented_code(peer: Peer) -> None:
    peer.send(FrameType.DATA, b"x" * (WINDOW + 1))  # beyond the stream's window
    code, reason = frames.decode_reason(peer.frame(FrameType.RESET), "RESET")
    assert (code, reason) == (ResetCode.PROTOCOL_ERROR, "flow-control window exceeded")
    ended, error = peer.take()
    assert error is None
    ((_, outcome),) = ended
    assert outcome.ending == _core.RelayEnding.PROTOCOL
    assert outcome.detail == reason
    assert outcome.credit == WINDOW


def test_a_reset_without_its_code_is_a_protocol_violation(peer: Peer) -> None:
    peer.send(FrameType.RESET, b"\x00")
    _, error = peer.take()
    assert isinstance(error, _core.ProtocolViolation)
    assert str(error) == "RESET frame: missing code"


def test_an_ack_of_the_wrong_size_names_its_frame(peer: Peer) -> None:
    peer.send(FrameType.ACK, b"\x00\x01", stream_id=0)
    _, error = peer.take()
    assert isinstance(error, _core.ProtocolViolation)
    assert str(error) == "ACK frame: expected 8 bytes, got 2"


def test_a_ping_is_its_id_alone(peer: Peer) -> None:
    # Echoed whole, a larger PING would let a peer that never reads grow
    # the PONGs waiting for it as it pleased.
    peer.send(FrameType.PING, bytes(4096), stream_id=0)
    _, error = peer.take()
    assert isinstance(error, _core.ProtocolViolation)
    assert str(error) == "PING frame: expected 8 bytes, got 4096"


def test_an_authentic_frame_that_does_not_decompress_ends_the_session() -> None:
    # Resent on the next connection it would fail again: not a connection's
    # loss, which the session would resume from, but the peer's violation.
    peer = Peer(max_payload=1024)
    try:
        peer.send(FrameType.DATA, bytes(4096))  # compressed to far less than 1024
        _, error = peer.take()
        assert type(error) is _core.ProtocolViolation
        assert str(error) == (
            "peer sent an undecodable frame: 4096 bytes decompressed, more than the limit of 1024"
        )
    finally:
        peer.close()


def test_compressed_frames_are_decoded_no_faster_than_python_takes_them(peer: Peer) -> None:
    # A MiB of zeros is some 100 bytes on the wire: one read could hold
    # thousands of them. The engine decodes while less than 16 MiB waits
    # for Python, and goes on as Python takes them.
    mib, count = 1 << 20, 48
    wire = b"".join(peer.encoder.encode(FrameType.DATA, 5, bytes(mib)) for _ in range(count))
    assert len(wire) < 256 * 1024  # one read's worth
    peer.tunnel.sendall(wire)
    deadline = time.monotonic() + DEADLINE
    while peer.engine.stats().bytes_received < len(wire):
        assert time.monotonic() < deadline, "the engine did not read the frames"
        time.sleep(0.001)
    taken: list[tuple[int, int, bytes]] = []
    while len(taken) < count:
        assert time.monotonic() < deadline, f"{len(taken)} frames of {count} taken"
        select.select([peer.engine.notify_fd], [], [], 0.05)
        frames_now, _taps, _ended, error = peer.engine.take()
        assert error is None
        assert len(frames_now) <= 17, "more than 16 MiB decoded ahead of Python"
        taken += frames_now
    assert taken == [(FrameType.DATA, 5, bytes(mib))] * count


def test_damaged_bytes_are_the_wire_errors_kind(peer: Peer) -> None:
    frame = bytearray(peer.encoder.encode(FrameType.DATA, STREAM, b"hello"))
    frame[-1] ^= 0x01
    peer.tunnel.sendall(frame)
    _, error = peer.take()
    assert type(error) is _core.Tampered


def test_a_peer_hanging_up_is_peer_closed(peer: Peer) -> None:
    peer.tunnel.shutdown(socket.SHUT_WR)
    _, error = peer.take()
    assert type(error) is _core.PeerClosed


def test_a_socket_failure_ends_the_stream_with_its_os_error(peer: Peer) -> None:
    peer.app.close()  # the engine's writes to the native socket now fail
    peer.send(FrameType.DATA, b"nobody reads this")
    ended, error = peer.take()
    assert error is None
    ((_, outcome),) = ended
    assert outcome.ending == _core.RelayEnding.SOCKET
    assert outcome.detail.startswith("send failed: ")
    assert os.strerror(errno.EPIPE) in outcome.detail


def test_stats_are_named(peer: Peer) -> None:
    peer.send(FrameType.OPEN, b'{"service":"echo"}', stream_id=5)
    deadline = time.monotonic() + DEADLINE
    while (stats := peer.engine.stats()).recv_next == 0:
        assert time.monotonic() < deadline, stats
        time.sleep(0.001)
    assert (stats.recv_next, stats.native_streams, stats.attached) == (1, 1, True)
    assert stats.bytes_received > 0 and stats.retained_frames == 0
    assert stats.rtt is None  # no heartbeat
    assert "recv_next=1" in repr(stats)


def test_the_engine_pings_and_takes_the_round_trip_from_the_pong() -> None:
    peer = Peer(heartbeat_interval=0.02, dead_after=DEADLINE)
    try:
        ids = [struct.unpack(">Q", peer.frame(FrameType.PING))[0] for _ in range(2)]
        assert ids == [1, 2]
        assert peer.engine.stats().rtt is None
        # Answer PINGs until a PONG comes back before the next PING replaces
        # the one it answers (an old PING's PONG gives no round trip).
        deadline = time.monotonic() + DEADLINE
        while (rtt := peer.engine.stats().rtt) is None:
            assert time.monotonic() < deadline, "no round trip from the PONGs"
            peer.send(FrameType.PONG, peer.frame(FrameType.PING), stream_id=0)
        assert 0 < rtt < DEADLINE
        assert re.search(r" rtt=0\.\d{6}>$", repr(peer.engine.stats()))
    finally:
        peer.close()


def test_a_silent_peer_ends_the_connection_as_peer_silent() -> None:
    peer = Peer(heartbeat_interval=0.02, dead_after=0.2)
    try:
        _, error = peer.take()
        assert type(error) is _core.PeerSilent
        assert isinstance(error, _core.PeerClosed)  # the session may resume
        assert re.fullmatch(r"peer silent for \d+\.\ds", str(error))
    finally:
        peer.close()


def test_a_peer_that_answers_pings_but_never_acknowledges_is_a_violation() -> None:
    # A second of leeway: a PONG is what keeps the peer from being silent.
    peer = Peer(heartbeat_interval=0.02, dead_after=1.0)
    try:
        peer.app.sendall(b"retained until acknowledged")  # a reliable DATA to the peer
        error = peer.answer_pings_until_error()
        assert type(error) is _core.ProtocolViolation
        assert re.fullmatch(r"peer acknowledged nothing for \d+\.\ds", str(error))
    finally:
        peer.close()


def test_a_heartbeat_needs_both_settings() -> None:
    with pytest.raises(ValueError, match="heartbeat_interval and dead_after"):
        _core.TunnelEngine(heartbeat_interval=1.0)
    with pytest.raises(ValueError, match="heartbeat_interval and dead_after"):
        _core.TunnelEngine(dead_after=3.0)
    with pytest.raises(ValueError, match="heartbeat_interval and dead_after"):
        _core.TunnelEngine(heartbeat_interval=0.0, dead_after=3.0)
