"""qmesh._core from Python: frame codec round trips, every error kind, buffer
inputs, batching, and the Noise handshake ending in a codec pair.

The protocol logic is tested in depth by ``cargo test -p qmesh-wire``; this
file checks the binding: argument conversion, exception mapping, and that
the behaviour promised in ``qmesh/_core.pyi`` holds from Python.
"""

from __future__ import annotations

import json
import random
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tunnelkit import keypair

from qmesh import _core
from qmesh._core import (
    CONTROL_TYPE_MIN,
    FLAG_COMPRESSED,
    HEADER_LEN,
    MAX_PAYLOAD_LIMIT,
    TAG_LEN,
    FrameDecoder,
    FrameEncoder,
    FrameError,
    FrameTooLarge,
    HandshakeError,
    Malformed,
    NoiseHandshake,
    Reordered,
    Replayed,
    Tampered,
    Truncated,
)

KEY = bytes(range(32))
OTHER_KEY = bytes(32)
PROLOGUE = b"qmesh test prologue"


def make_payload(kind: str, size: int, seed: int) -> bytes:
    rng = random.Random(seed)
    if kind == "random":
        return rng.randbytes(size)
    if kind == "zeros":
        return bytes(size)
    # JSON-like text: compresses well, but not trivially.
    parts: list[bytes] = []
    total = 0
    while total < size:
        line = json.dumps(
            {"id": rng.randrange(10**6), "role": "assistant", "tokens": rng.randrange(4096)}
        ).encode()
        parts.append(line)
        total += len(line)
    return b"".join(parts)[:size]


def chunks(data: bytes, max_chunk: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    out = []
    pos = 0
    while pos < len(data):
        n = rng.randint(1, max_chunk)
        out.append(data[pos : pos + n])
        pos += n
    return out


def decode_all(dec: FrameDecoder, data: bytes) -> list[_core.Frame]:
    dec.feed(data)
    return dec.next_frames()


def one_frame(payload: bytes = b"x" * 500) -> bytes:
    return FrameEncoder(KEY).encode(0x02, 7, payload)


# ---- constants and types ---------------------------------------------------


def test_constants() -> None:
    assert _core.PROTOCOL_VERSION == 1
    assert HEADER_LEN == 20
    assert TAG_LEN == 16
    assert MAX_PAYLOAD_LIMIT == 16 * 1024 * 1024
    assert FLAG_COMPRESSED == 1
    assert CONTROL_TYPE_MIN == 0x10
    assert _core.NOISE_PATTERN == "Noise_IK_25519_AESGCM_SHA256"


def test_exception_hierarchy() -> None:
    for exc in (Tampered, Replayed, Reordered, Truncated, FrameTooLarge, Malformed):
        assert issubclass(exc, FrameError)
        assert exc.__module__ == "qmesh._core"
    assert issubclass(FrameError, Exception)
    assert issubclass(HandshakeError, Exception)
    assert not issubclass(HandshakeError, FrameError)


# ---- round trips --------------------------------------------------------------

SIZES = st.one_of(
    st.integers(0, 2048),
    st.integers(2048, 256 * 1024),
    st.sampled_from([0, 1, 63, 64, MAX_PAYLOAD_LIMIT - 1, MAX_PAYLOAD_LIMIT]),
)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    specs=st.lists(
        st.tuples(
            st.integers(0, 0x1F),
            st.integers(0, 2**32 - 1),
            st.sampled_from(["random", "text", "zeros"]),
            SIZES,
            st.integers(0, 2**32),
        ),
        min_size=1,
        max_size=3,
    ),
    max_chunk=st.sampled_from([1, 7, 1000, 70_000, 1 << 20]),
    chunk_seed=st.integers(0, 2**32),
)
def test_round_trip_random_chunks(
    specs: list[tuple[int, int, str, int, int]], max_chunk: int, chunk_seed: int
) -> None:
    payloads = [make_payload(kind, size, seed) for _, _, kind, size, seed in specs]
    total = sum(map(len, payloads))
    if total > 64 * 1024:
        # One-byte feeds of megabytes only test Python's loop speed.
        max_chunk = max(max_chunk, 4096)
    enc = FrameEncoder(KEY)
    wire = b"".join(
        enc.encode(t, sid, p) for (t, sid, _, _, _), p in zip(specs, payloads, strict=True)
    )
    dec = FrameDecoder(KEY)
    frames: list[_core.Frame] = []
    for chunk in chunks(wire, max_chunk, chunk_seed):
        dec.feed(chunk)
        frames.extend(dec.next_frames())
    dec.eof()
    assert dec.buffered == 0
    assert len(frames) == len(specs)
    rel = ctl = 0
    for (ftype, sid, seq, flags, payload), (t, s, _, _, _), p in zip(
        frames, specs, payloads, strict=True
    ):
        assert (ftype, sid) == (t, s)
        if t < CONTROL_TYPE_MIN:
            assert seq == rel
            rel += 1
        else:
            assert seq == ctl
            ctl += 1
        assert flags in (0, FLAG_COMPRESSED)
        assert payload == p


@pytest.mark.parametrize("kind", ["random", "text"])
@pytest.mark.parametrize("size", [0, MAX_PAYLOAD_LIMIT])
def test_round_trip_extremes(kind: str, size: int) -> None:
    payload = make_payload(kind, size, 1)
    enc = FrameEncoder(KEY)
    wire = enc.encode(0, 1, payload)
    if kind == "random" or size == 0:
        assert len(wire) == HEADER_LEN + size + TAG_LEN
    dec = FrameDecoder(KEY)
    for chunk in chunks(wire, 1 << 20, 2):
        dec.feed(chunk)
    [(ftype, sid, seq, _flags, got)] = dec.next_frames()
    assert (ftype, sid, seq) == (0, 1, 0)
    assert type(got) is bytes
    assert got == payload


def test_payload_over_limit_is_value_error() -> None:
    enc = FrameEncoder(KEY)
    with pytest.raises(ValueError):
        enc.encode(0, 0, bytes(MAX_PAYLOAD_LIMIT + 1))
    small = FrameEncoder(KEY, max_payload=10)
    small.encode(0, 0, bytes(10))
    with pytest.raises(ValueError):
        small.encode(0, 0, bytes(11))


def test_compression_flag() -> None:
    enc = FrameEncoder(KEY)
    text = make_payload("text", 16 * 1024, 3)
    wire = enc.encode(0, 0, text)
    assert wire[2] == FLAG_COMPRESSED
    assert len(wire) < len(text)
    assert enc.encode(0, 0, make_payload("random", 16 * 1024, 3))[2] == 0
    assert enc.encode(0, 0, b"a" * 63)[2] == 0  # below min_compress
    never = FrameEncoder(KEY, min_compress=1 << 30)
    assert never.encode(0, 0, text)[2] == 0
    [frame] = decode_all(FrameDecoder(KEY), wire)
    assert frame[3] == FLAG_COMPRESSED
    assert frame[4] == text


def test_one_byte_feeds() -> None:
    enc = FrameEncoder(KEY)
    payloads = [make_payload("text", n, n) for n in (0, 10, 100, 1000)]
    wire = b"".join(enc.encode(0, i, p) for i, p in enumerate(payloads))
    dec = FrameDecoder(KEY)
    got: list[bytes] = []
    for i in range(len(wire)):
        dec.feed(wire[i : i + 1])
        got.extend(f[4] for f in dec.next_frames())
    assert got == payloads
    dec.eof()


def test_next_frames_limit_and_buffered() -> None:
    enc = FrameEncoder(KEY)
    wire = b"".join(enc.encode(0, 0, b"abc") for _ in range(5))
    dec = FrameDecoder(KEY)
    dec.feed(wire + wire[:10])
    assert len(dec.next_frames(2)) == 2
    assert len(dec.next_frames(limit=2)) == 2
    assert len(dec.next_frames(-1)) == 1  # limit <= 0: everything
    assert dec.buffered == 10
    assert dec.next_frames() == []


# ---- every error kind ------------------------------------------------------------


def expect(exc: type[Exception], data: bytes, key: bytes = KEY) -> FrameDecoder:
    dec = FrameDecoder(key)
    dec.feed(data)
    with pytest.raises(exc):
        dec.next_frames()
    return dec


@pytest.mark.parametrize("at", [1, 4, 7, 8, 15])
def test_flipped_header_byte_is_tampered(at: int) -> None:
    wire = bytearray(one_frame())
    wire[at] ^= 0x01
    expect(Tampered, bytes(wire))


@pytest.mark.parametrize("where", ["first", "middle", "tag_first", "tag_last"])
def test_flipped_body_byte_is_tampered(where: str) -> None:
    wire = bytearray(one_frame(make_payload("random", 300, 1)))
    at = {
        "first": HEADER_LEN,
        "middle": HEADER_LEN + 150,
        "tag_first": len(wire) - TAG_LEN,
        "tag_last": len(wire) - 1,
    }[where]
    wire[at] ^= 0x40
    expect(Tampered, bytes(wire))


def test_wrong_key_is_tampered() -> None:
    expect(Tampered, one_frame(), key=OTHER_KEY)


def test_replay() -> None:
    enc = FrameEncoder(KEY)
    a, b = enc.encode(0, 0, b"a"), enc.encode(0, 0, b"b")
    dec = FrameDecoder(KEY)
    assert len(decode_all(dec, a + b)) == 2
    dec.feed(a)
    with pytest.raises(Replayed):
        dec.next_frames()


def test_reorder() -> None:
    enc = FrameEncoder(KEY)
    a, b = enc.encode(0x11, 0, b"a"), enc.encode(0x11, 0, b"b")
    expect(Reordered, b + a)


@pytest.mark.parametrize("cut", [1, HEADER_LEN, HEADER_LEN + 5, -1])
def test_truncated_then_eof(cut: int) -> None:
    wire = one_frame()
    dec = FrameDecoder(KEY)
    dec.feed(wire[:cut])
    assert dec.next_frames() == []
    with pytest.raises(Truncated):
        dec.eof()


def test_clean_eof() -> None:
    dec = FrameDecoder(KEY)
    dec.eof()
    assert decode_all(dec, one_frame()) == [(0x02, 7, 0, FLAG_COMPRESSED, b"x" * 500)]
    dec.eof()
    assert dec.buffered == 0


def test_four_gib_length_is_too_large() -> None:
    wire = bytearray(one_frame())
    wire[16:20] = (0xFFFFFFFF).to_bytes(4, "big")
    dec = FrameDecoder(KEY)
    dec.feed(bytes(wire[:HEADER_LEN]))  # the header alone is enough
    with pytest.raises(FrameTooLarge):
        dec.next_frames()
    assert dec.buffered == HEADER_LEN


def test_length_over_configured_limit_is_too_large() -> None:
    wire = FrameEncoder(KEY).encode(0, 0, make_payload("random", 2000, 1))
    dec = FrameDecoder(KEY, max_payload=1000)
    dec.feed(wire)
    with pytest.raises(FrameTooLarge):
        dec.next_frames()


@pytest.mark.parametrize(
    ("at", "value"),
    [(0, 2), (0, 0), (1, 0x20), (1, 0xFF), (2, 0x02), (2, 0x80), (3, 1)],
    ids=["version2", "version0", "type20", "typeFF", "flag2", "flag80", "reserved"],
)
def test_bad_header_fields_are_malformed(at: int, value: int) -> None:
    wire = bytearray(one_frame())
    wire[at] = value
    expect(Malformed, bytes(wire))


def test_poisoned_decoder_repeats_error() -> None:
    wire = bytearray(one_frame())
    wire[HEADER_LEN] ^= 1
    dec = expect(Tampered, bytes(wire))
    with pytest.raises(Tampered):
        dec.next_frames()
    with pytest.raises(Tampered):
        dec.feed(one_frame())
    with pytest.raises(Tampered):
        dec.eof()


def test_good_frames_returned_before_error() -> None:
    enc = FrameEncoder(KEY)
    good = enc.encode(0, 0, b"1") + enc.encode(0, 0, b"2")
    bad = bytearray(enc.encode(0, 0, b"3"))
    bad[-1] ^= 1
    dec = FrameDecoder(KEY)
    dec.feed(good + bytes(bad))
    assert [f[4] for f in dec.next_frames()] == [b"1", b"2"]
    with pytest.raises(Tampered):
        dec.next_frames()


def test_constructor_validation() -> None:
    with pytest.raises(ValueError):
        FrameEncoder(b"short")
    with pytest.raises(ValueError):
        FrameDecoder(bytes(33))
    with pytest.raises(ValueError):
        FrameEncoder(KEY, level=0)
    with pytest.raises(ValueError):
        FrameEncoder(KEY, level=20)
    with pytest.raises(ValueError):
        FrameEncoder(KEY, max_payload=MAX_PAYLOAD_LIMIT + 1)
    with pytest.raises(ValueError):
        FrameDecoder(KEY, max_payload=MAX_PAYLOAD_LIMIT + 1)
    with pytest.raises(TypeError):
        FrameEncoder(KEY, 5)  # type: ignore[call-arg]  # reliable_seq is keyword-only


@pytest.mark.parametrize("frame_type", [0x20, 0xFF, 256, -1, 10**30])
def test_bad_frame_type_is_value_error(frame_type: int) -> None:
    enc = FrameEncoder(KEY)
    with pytest.raises(ValueError):
        enc.encode(frame_type, 0, b"")
    assert enc.next_reliable_seq == 0


# ---- buffer inputs -------------------------------------------------------------------


def test_bytearray_and_memoryview_inputs() -> None:
    payload = make_payload("text", 5000, 9)
    enc = FrameEncoder(KEY)
    ref = FrameEncoder(KEY)
    wires = [
        enc.encode(0, 0, bytearray(payload)),
        enc.encode(0, 0, memoryview(payload)),
        enc.encode(0, 0, memoryview(b"xx" + payload + b"yy")[2:-2]),
    ]
    assert wires == [ref.encode(0, 0, payload) for _ in range(3)]
    dec = FrameDecoder(KEY)
    wire = b"".join(wires)
    dec.feed(bytearray(wire[:100]))
    dec.feed(memoryview(wire)[100:2000])
    dec.feed(memoryview(bytearray(wire))[2000:])
    assert [f[4] for f in dec.next_frames()] == [payload] * 3
    batch = FrameEncoder(KEY).encode_batch([(0, 0, bytearray(b"a")), (0, 0, memoryview(b"b"))])
    assert [f[4] for f in decode_all(FrameDecoder(KEY), batch)] == [b"a", b"b"]


def test_non_buffer_inputs_are_type_errors() -> None:
    enc = FrameEncoder(KEY)
    with pytest.raises(TypeError):
        enc.encode(0, 0, "text")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        FrameDecoder(KEY).feed(123)  # type: ignore[arg-type]
    assert enc.next_reliable_seq == 0


# ---- batching and sequences ------------------------------------------------------------


def test_encode_batch_matches_single_encodes() -> None:
    frames = [
        (0x00, 1, make_payload("text", 3000, 1)),
        (0x10, 0, b"ping"),
        (0x01, 2, make_payload("random", 100_000, 2)),
        (0x00, 1, b""),
        (0x1F, 9, make_payload("zeros", 200, 3)),
    ]
    batch_enc = FrameEncoder(KEY, reliable_seq=5)
    single_enc = FrameEncoder(KEY, reliable_seq=5)
    batch = batch_enc.encode_batch(frames)
    assert batch == b"".join(single_enc.encode(*f) for f in frames)
    assert (batch_enc.next_reliable_seq, batch_enc.next_control_seq) == (8, 2)
    assert batch_enc.encode_batch([]) == b""
    dec = FrameDecoder(KEY, reliable_seq=5)
    assert [(f[0], f[1], f[4]) for f in decode_all(dec, batch)] == frames


def test_encode_batch_validates_before_encoding() -> None:
    enc = FrameEncoder(KEY, max_payload=100)
    enc.encode(0, 0, b"first")
    enc.encode(0x10, 0, b"first")
    for bad in (
        [(0, 0, b"ok"), (0x20, 0, b"bad type")],
        [(0, 0, b"ok"), (0x10, 0, bytes(101))],
        [(0, 0, b"ok"), (300, 0, b"")],
    ):
        with pytest.raises(ValueError):
            enc.encode_batch(bad)
        assert (enc.next_reliable_seq, enc.next_control_seq) == (1, 1)


def test_sequences_per_class_and_resumption() -> None:
    enc = FrameEncoder(KEY, reliable_seq=1000)
    wire = b"".join(enc.encode(t, 0, b"") for t in (0, 0x10, 0x10, 5))
    assert (enc.next_reliable_seq, enc.next_control_seq) == (1002, 2)
    dec = FrameDecoder(KEY, reliable_seq=1000)
    assert [(f[0], f[2]) for f in decode_all(dec, wire)] == [
        (0, 1000),
        (0x10, 0),
        (0x10, 1),
        (5, 1001),
    ]
    assert (dec.next_reliable_seq, dec.next_control_seq) == (1002, 2)
    with pytest.raises(Reordered):
        decode_all(FrameDecoder(KEY, reliable_seq=999), wire)
    with pytest.raises(Replayed):
        decode_all(FrameDecoder(KEY, reliable_seq=1001), wire)


def test_large_work_from_threads() -> None:
    """Above the GIL-release threshold the codec runs detached; it must work
    from worker threads (as under trio.to_thread) and give the same bytes."""
    payloads = [make_payload("text", 1 << 20, i) for i in range(4)]
    results: dict[int, list[bytes]] = {}

    def work(i: int) -> None:
        enc = FrameEncoder(KEY)
        dec = FrameDecoder(KEY)
        dec.feed(enc.encode_batch([(0, i, p) for p in payloads]))
        results[i] = [f[4] for f in dec.next_frames()]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {i: payloads for i in range(4)}


# ---- Noise handshake ------------------------------------------------------------------


def handshake() -> tuple[NoiseHandshake, NoiseHandshake, bytes, bytes]:
    client_priv, client_pub = keypair()
    server_priv, server_pub = keypair()
    init = NoiseHandshake.initiator(client_priv, server_pub, PROLOGUE)
    resp = NoiseHandshake.responder(server_priv, PROLOGUE)
    assert init.remote_static() == server_pub
    assert resp.remote_static() is None
    assert not init.is_finished
    m1 = init.write_message(b"hello server")
    assert client_pub not in m1  # the initiator's identity is encrypted
    assert resp.read_message(m1) == b"hello server"
    assert resp.remote_static() == client_pub
    m2 = resp.write_message(b"hello client")
    assert init.read_message(m2) == b"hello client"
    assert init.is_finished and resp.is_finished
    return init, resp, client_pub, server_pub


def test_handshake_end_to_end() -> None:
    init, resp, _client_pub, _server_pub = handshake()
    assert init.handshake_hash() == resp.handshake_hash()
    assert len(init.handshake_hash()) == 32
    c_enc, c_dec = init.into_codec()
    s_enc, s_dec = resp.into_codec()
    big = make_payload("text", 300_000, 5)
    [frame] = decode_all(s_dec, c_enc.encode(0, 1, big))
    assert frame[4] == big
    [frame] = decode_all(c_dec, s_enc.encode(0x10, 0, b"ack"))
    assert frame[4] == b"ack"
    # Each direction has its own key: a reflected frame does not verify.
    with pytest.raises(Tampered):
        decode_all(c_dec, c_enc.encode(0, 0, b"mirror"))
    # The handshake is consumed.
    with pytest.raises(HandshakeError):
        init.into_codec()


def test_handshake_into_codec_options() -> None:
    init, resp, _, _ = handshake()
    c_enc, _ = init.into_codec(send_reliable_seq=50, level=19, min_compress=0)
    _, s_dec = resp.into_codec(recv_reliable_seq=50, max_payload=1024)
    [frame] = decode_all(s_dec, c_enc.encode(0, 0, b"resumed"))
    assert frame[2] == 50
    with pytest.raises(FrameTooLarge):
        decode_all(s_dec, c_enc.encode(0, 0, make_payload("random", 2048, 1)))


def test_handshake_wrong_remote_public_fails() -> None:
    client_priv, _ = keypair()
    server_priv, _ = keypair()
    _, impostor_pub = keypair()
    init = NoiseHandshake.initiator(client_priv, impostor_pub, PROLOGUE)
    resp = NoiseHandshake.responder(server_priv, PROLOGUE)
    with pytest.raises(HandshakeError):
        resp.read_message(init.write_message(b"secret"))
    assert not resp.is_finished
    with pytest.raises(HandshakeError):
        resp.write_message(b"")


def test_handshake_tampered_reply_fails() -> None:
    client_priv, _ = keypair()
    server_priv, server_pub = keypair()
    init = NoiseHandshake.initiator(client_priv, server_pub, PROLOGUE)
    resp = NoiseHandshake.responder(server_priv, PROLOGUE)
    resp.read_message(init.write_message(b""))
    reply = bytearray(resp.write_message(b"x"))
    reply[-1] ^= 1
    with pytest.raises(HandshakeError):
        init.read_message(bytes(reply))
    with pytest.raises(HandshakeError):
        init.into_codec()


def test_handshake_misuse() -> None:
    client_priv, client_pub = keypair()
    server_priv, server_pub = keypair()
    init = NoiseHandshake.initiator(client_priv, server_pub, PROLOGUE)
    with pytest.raises(HandshakeError):
        init.into_codec()  # not finished
    with pytest.raises(HandshakeError):
        NoiseHandshake.responder(server_priv, PROLOGUE).write_message(b"")  # not our turn
    with pytest.raises(ValueError):
        init.write_message(bytes(65_001))
    init.write_message(bytes(65_000))
    with pytest.raises(ValueError):
        NoiseHandshake.initiator(client_priv[:31], server_pub, PROLOGUE)
    with pytest.raises(ValueError):
        NoiseHandshake.responder(b"", PROLOGUE)
    assert client_pub != server_pub
