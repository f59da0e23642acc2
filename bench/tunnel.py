#!/usr/bin/env python3
"""Benchmark of qmesh's tunnel: the Rust frame codec, and TCP forwarded through it.

Run it from the repository root with the project's interpreter::

    .venv/bin/python bench/tunnel.py            # everything (a few minutes)
    .venv/bin/python bench/tunnel.py --quick    # smoke run, small sizes
    .venv/bin/python bench/tunnel.py --only codec --reps 7

Part 1, the frame codec (one thread, no I/O). Throughput is payload bytes per
second (MB/s, 1 MB = 10^6 bytes) for 1 KiB, 16 KiB and 256 KiB payloads of two
kinds: ``random`` (os.urandom, incompressible) and ``json`` (generated JSON
lines of an LLM chat-completions log: repeated keys, varied values; zstd
level 3 shrinks it about 3-6x). "seal" is compress + encrypt, "open" is
decrypt + decompress. Rows compare, on the same payloads:

- ``qmesh``     qmesh._core ``FrameEncoder.encode`` per frame, and a fresh
                ``FrameDecoder`` per pass fed one frame at a time (``feed`` +
                ``next_frames``): the decoder enforces sequence numbers, so
                each pass decodes the same pre-encoded stream from sequence 0;
- ``qmesh×64``  ``encode_batch`` of 64 frames, and one ``feed`` of those 64
                frames followed by one ``next_frames`` (the tunnel batches);
- ``py-pipe``   the same wire format in pure Python with ``zstandard`` and
                ``cryptography``: 20-byte header built with struct, zstd only
                when it shrinks the payload, AES-256-GCM with the header as
                AAD; open parses the header, checks the sequence, decrypts
                and decompresses (its frames are checked to be readable by
                the Rust decoder and vice versa before timing);
- ``zstd``      ``ZstdCompressor(level=3).compress`` / ``ZstdDecompressor().decompress``
                alone;
- ``aes-gcm``   ``AESGCM.encrypt`` / ``decrypt`` alone (12-byte nonce, the
                20-byte header as AAD).

Each figure is the best of ``--reps`` runs of at least ``--min-time`` seconds
each (the machine is small and shared; the best run is the least disturbed).
The ratio columns divide qmesh by the pure-Python pipeline (how much the Rust
hot path buys) and by zstd alone (how close the whole codec gets to the cost
of compression by itself; on random data "zstd alone" only stores blocks).

Part 2, TCP on loopback. A plain threaded echo server and a sink server run
in their own process; a Gate and a MiniGate run as two more processes
(``python -m qmesh --role ...``) with a throwaway data directory, the
MiniGate forwarding two local ports through the tunnel to the echo and sink
servers. The same client measures "direct" (client → server) and "qmesh"
(client → MiniGate → tunnel → Gate → server):

- echo throughput: ``--mib`` MiB streamed to the echo server while a second
  thread reads it back; one-way MB/s = bytes / time until the last byte came
  back. Best of ``--tcp-reps`` runs;
- upload throughput: ``--mib`` MiB sent to the sink, which answers with the
  byte count after the client's half-close; time until that answer. Best of
  ``--tcp-reps`` runs;
- round-trip latency of 64-byte messages, one at a time, after a warm-up:
  p50 and p99 in µs; the median over ``--tcp-reps`` runs;
- a new connection plus its first 64-byte round trip (through qmesh this
  includes opening a tunnel stream and the Gate's connect to the target).

The ratio column is qmesh / direct: below 1 is slower for throughput, above
1 is slower for latency. Everything (client, servers, Gate, MiniGate) shares
the machine's cores, so the qmesh numbers include that competition. Timings
are reported, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import socketserver
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Final

KIB: Final = 1024
MIB: Final = 1024 * 1024
MB: Final = 1_000_000

HEADER: Final = struct.Struct(">BBBBIQI")  # version, type, flags, reserved, stream, seq, length
HEADER_LEN: Final = HEADER.size
TAG_LEN: Final = 16
DATA_FRAME: Final = 0x02
FLAG_COMPRESSED: Final = 0x01
MIN_COMPRESS: Final = 64
LEVEL: Final = 3
BATCH: Final = 64
POOL_BYTES: Final = 4 * MIB  # distinct payload bytes per (kind, size)
HERE: Final = Path(__file__).resolve()
REPO: Final = HERE.parent.parent


# --------------------------------------------------------------------------
# Test data


_WORDS: Final = (
    "the of and to a in is that for it as with was on be by this are or at from an have not "
    "which but all can if will one has their there more so about when what would were we "
    "model token tokens context prompt response request latency cache memory batch stream "
    "user assistant system function tool call result error retry timeout queue worker node "
    "gate tunnel edge service route policy key secret vault account quota budget usage "
    "database query table index row column schema migration transaction commit rollback "
    "python rust trio async await socket frame header payload buffer compress encrypt "
    "please explain summarize translate write review refactor optimize debug test deploy "
    "customer order invoice shipping product price discount report dashboard metric alert "
    "because however therefore although instead also only just very much many most some "
    "first second next last new old large small fast slow simple complex important clear "
    "example step steps answer question idea problem solution approach detail details "
    "should could might must need want use make take give find show help keep start stop "
    "file line code function class method value type list map set string number date time"
).split()
_SYSTEM_PROMPTS: Final = (
    "You are a helpful assistant.",
    "You are a concise assistant for an e-commerce support team. Answer in at most three "
    "sentences and never invent order numbers.",
    "You are a senior software engineer. Review the code you are given and point out bugs, "
    "risky patterns and missing tests.",
    "Translate the user's message into German, keeping product names in English.",
)
_MODELS: Final = (
    "gpt-4o-mini",
    "llama-3.1-8b-instruct",
    "qwen2.5-7b-instruct",
    "mistral-7b-instruct-v0.3",
    "phi-3-mini-4k-instruct",
)
_APPS: Final = ("shop-web", "support-bot", "code-review", "analytics", "batch-translate")
# Zipf-like word frequencies, as in natural text.
_WEIGHTS: Final = [1.0 / (rank + 1) ** 0.9 for rank in range(len(_WORDS))]


def _sentences(rng: random.Random, low: int, high: int) -> str:
    out: list[str] = []
    for _ in range(rng.randint(low, high)):
        words = rng.choices(_WORDS, _WEIGHTS, k=rng.randint(5, 22))
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randrange(10_000)))
        out.append(" ".join(words).capitalize() + rng.choice(".....?!"))
    return " ".join(out)


def _record(rng: random.Random, i: int) -> dict[str, object]:
    prompt = _sentences(rng, 1, 4)
    answer = _sentences(rng, 1, 8)
    prompt_tokens = len(prompt) // 4 + rng.randint(10, 60)
    completion_tokens = len(answer) // 4 + rng.randint(0, 9)
    return {
        "id": f"chatcmpl-{rng.getrandbits(96):024x}",
        "object": "chat.completion",
        "created": 1_767_225_600 + 3 * i + rng.randrange(3),
        "model": rng.choice(_MODELS),
        "app": rng.choice(_APPS),
        "edge": f"minigate-{rng.randint(1, 8)}",
        "request": {
            "messages": [
                {"role": "system", "content": rng.choice(_SYSTEM_PROMPTS)},
                {"role": "user", "content": prompt},
            ],
            "temperature": round(rng.uniform(0.0, 1.2), 2),
            "max_tokens": rng.choice((256, 512, 1024, 2048)),
            "stream": rng.random() < 0.4,
        },
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": answer},
                "finish_reason": rng.choice(("stop", "stop", "stop", "length")),
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
        "latency_ms": round(rng.lognormvariate(6.0, 0.6), 1),
        "status": 200 if rng.random() < 0.97 else rng.choice((429, 500, 503)),
    }


def json_text(nbytes: int, seed: int = 20260101) -> bytes:
    """At least ``nbytes`` of JSON lines, deterministic for a seed."""
    rng = random.Random(seed)
    lines: list[bytes] = []
    total = i = 0
    while total < nbytes:
        line = json.dumps(_record(rng, i)).encode() + b"\n"
        lines.append(line)
        total += len(line)
        i += 1
    return b"".join(lines)


# --------------------------------------------------------------------------
# Part 1: the codec


@dataclass
class CodecCase:
    """One (data kind, payload size): the payloads of one timed pass."""

    kind: str
    size: int
    payloads: list[bytes]  # one pass; a multiple of BATCH frames
    zstd_ratio: float = 0.0

    @property
    def pass_bytes(self) -> int:
        return sum(len(p) for p in self.payloads)


@dataclass
class CodecResult:
    case: CodecCase
    direction: str
    mbps: dict[str, float] = field(default_factory=dict)


def _pool(source: bytes, size: int) -> list[bytes]:
    """Distinct ``size``-byte slices of ``source``, repeated to a multiple of BATCH."""
    distinct = [source[i : i + size] for i in range(0, len(source) - size + 1, size)]
    distinct = distinct[: max(1, POOL_BYTES // size)]
    count = max(BATCH, len(distinct))
    count = -(-count // BATCH) * BATCH
    return [distinct[i % len(distinct)] for i in range(count)]


def measure(fn: Callable[[], object], nbytes: int, min_time: float, reps: int) -> float:
    """Best MB/s over ``reps`` runs; each run repeats ``fn`` (one pass over
    ``nbytes`` of payload) until ``min_time`` seconds have passed."""
    fn()  # warm-up: caches, lazy allocations
    best = 0.0
    for _ in range(reps):
        passes = 0
        start = time.perf_counter()
        while True:
            fn()
            passes += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_time:
                break
        best = max(best, passes * nbytes / elapsed / MB)
    return best


class PyPipeline:
    """The qmesh frame format in pure Python (zstandard + cryptography)."""

    def __init__(self, key: bytes) -> None:
        import zstandard
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self.aead = AESGCM(key)
        self.cctx = zstandard.ZstdCompressor(level=LEVEL)
        self.dctx = zstandard.ZstdDecompressor()
        self.send_seq = 0
        self.recv_seq = 0

    def seal(self, frame_type: int, stream_id: int, payload: bytes) -> bytes:
        flags = 0
        body = payload
        if len(payload) >= MIN_COMPRESS:
            packed = self.cctx.compress(payload)
            if len(packed) < len(payload):
                body, flags = packed, FLAG_COMPRESSED
        seq = self.send_seq
        self.send_seq += 1
        header = HEADER.pack(1, frame_type, flags, 0, stream_id, seq, len(body) + TAG_LEN)
        nonce = b"\x00\x00\x00\x00" + seq.to_bytes(8, "big")
        return header + self.aead.encrypt(nonce, body, header)

    def open(self, frame: bytes) -> bytes:
        version, frame_type, flags, reserved, _stream_id, seq, length = HEADER.unpack_from(frame)
        if version != 1 or reserved or flags & ~FLAG_COMPRESSED or frame_type >= 0x10:
            raise ValueError("malformed")
        if length != len(frame) - HEADER_LEN:
            raise ValueError("bad length")
        nonce = b"\x00\x00\x00\x00" + seq.to_bytes(8, "big")
        view = memoryview(frame)
        plain = self.aead.decrypt(nonce, view[HEADER_LEN:], view[:HEADER_LEN])
        if seq != self.recv_seq:
            raise ValueError("replayed or reordered")
        self.recv_seq += 1
        if flags & FLAG_COMPRESSED:
            plain = self.dctx.decompress(plain)
        return plain


def _cross_check(core: object, key: bytes, payloads: Sequence[bytes]) -> str | None:
    """Whether the pure-Python pipeline and qmesh._core read each other's frames."""
    from qmesh import _core

    assert core is _core
    sample = list(payloads[:8])
    py = PyPipeline(key)
    decoder = _core.FrameDecoder(key)
    for p in sample:
        decoder.feed(py.seal(DATA_FRAME, 1, p))
    got = [frame[4] for frame in decoder.next_frames()]
    if got != sample:
        return "qmesh._core could not read the pure-Python pipeline's frames"
    encoder = _core.FrameEncoder(key, level=LEVEL)
    reader = PyPipeline(key)
    try:
        back = [reader.open(encoder.encode(DATA_FRAME, 1, p)) for p in sample]
    except Exception as exc:
        return f"the pure-Python pipeline could not read qmesh._core's frames: {exc!r}"
    if back != sample:
        return "the pure-Python pipeline read qmesh._core's frames wrongly"
    return None


def _codec_plans(
    case: CodecCase, key: bytes, max_payload: int
) -> dict[str, dict[str, Callable[[], None]]]:
    """The timed passes for one case: ``{direction: {column: one pass}}``.

    Everything a pass reads (pre-encoded frames, compressed payloads) is
    prepared here, outside the timing."""
    import zstandard
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from qmesh import _core

    payloads = case.payloads
    cctx = zstandard.ZstdCompressor(level=LEVEL)
    dctx = zstandard.ZstdDecompressor()
    aead = AESGCM(key)
    fixed_header = HEADER.pack(1, DATA_FRAME, 0, 0, 1, 0, 0)
    fixed_nonce = bytes(12)

    compressed = [cctx.compress(p) for p in payloads]
    case.zstd_ratio = case.pass_bytes / sum(len(c) for c in compressed)
    sealed_aes = [aead.encrypt(fixed_nonce, p, fixed_header) for p in payloads]
    frames_in = [(DATA_FRAME, 1, p) for p in payloads]
    batches_in = [frames_in[i : i + BATCH] for i in range(0, len(frames_in), BATCH)]

    encoder = _core.FrameEncoder(key, level=LEVEL, max_payload=max_payload)
    stream = _core.FrameEncoder(key, level=LEVEL, max_payload=max_payload)
    single_frames = [stream.encode(DATA_FRAME, 1, p) for p in payloads]
    batch_stream = _core.FrameEncoder(key, level=LEVEL, max_payload=max_payload)
    batch_frames = [batch_stream.encode_batch(b) for b in batches_in]
    py_sealer = PyPipeline(key)
    py_stream = PyPipeline(key)
    py_frames = [py_stream.seal(DATA_FRAME, 1, p) for p in payloads]

    def q_seal() -> None:
        enc = encoder.encode
        for p in payloads:
            enc(DATA_FRAME, 1, p)

    def q_seal_batch() -> None:
        enc = encoder.encode_batch
        for b in batches_in:
            enc(b)

    def q_opener(wire: list[bytes]) -> Callable[[], None]:
        """A timed pass that feeds ``wire`` chunk by chunk to a fresh decoder
        (it insists on sequence numbers from 0), taking the frames after each."""

        def q_open() -> None:
            dec = _core.FrameDecoder(key, max_payload=max_payload)
            feed, next_frames = dec.feed, dec.next_frames
            for chunk in wire:
                feed(chunk)
                next_frames()

        return q_open

    q_open = q_opener(single_frames)
    q_open_batch = q_opener(batch_frames)

    def p_seal() -> None:
        seal = py_sealer.seal
        for p in payloads:
            seal(DATA_FRAME, 1, p)

    def p_open() -> None:
        op = PyPipeline(key).open
        for f in py_frames:
            op(f)

    def z_seal() -> None:
        c = cctx.compress
        for p in payloads:
            c(p)

    def z_open() -> None:
        d = dctx.decompress
        for c in compressed:
            d(c)

    def a_seal() -> None:
        e = aead.encrypt
        for p in payloads:
            e(fixed_nonce, p, fixed_header)

    def a_open() -> None:
        d = aead.decrypt
        for s in sealed_aes:
            d(fixed_nonce, s, fixed_header)

    return {
        "seal": {
            "qmesh": q_seal,
            "qmesh×64": q_seal_batch,
            "py-pipe": p_seal,
            "zstd": z_seal,
            "aes-gcm": a_seal,
        },
        "open": {
            "qmesh": q_open,
            "qmesh×64": q_open_batch,
            "py-pipe": p_open,
            "zstd": z_open,
            "aes-gcm": a_open,
        },
    }


def run_codec(sizes: Sequence[int], min_time: float, reps: int) -> list[CodecResult]:
    from qmesh import _core

    key = os.urandom(32)
    sources = {
        "random": os.urandom(POOL_BYTES + max(sizes)),
        "json": json_text(POOL_BYTES + max(sizes)),
    }
    problem = _cross_check(_core, key, [sources["json"][:4096], sources["random"][:4096]])
    if problem:
        print(f"WARNING: {problem}; the py-pipe column may not be comparable")

    results: list[CodecResult] = []
    for kind in ("random", "json"):
        for size in sizes:
            case = CodecCase(kind, size, _pool(sources[kind], size))
            plans = _codec_plans(case, key, max(sizes))
            for direction, plan in plans.items():
                result = CodecResult(case, direction)
                for name, fn in plan.items():
                    result.mbps[name] = measure(fn, case.pass_bytes, min_time, reps)
                results.append(result)
                _progress(f"codec {kind} {_size(size)} {direction} done")
    return results


def _size(n: int) -> str:
    return f"{n // MIB} MiB" if n >= MIB else f"{n // KIB} KiB"


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def print_codec(results: Sequence[CodecResult], min_time: float, reps: int) -> None:
    cols = ("qmesh", "qmesh×64", "py-pipe", "zstd", "aes-gcm")
    print()
    print(
        "== 1. Frame codec, single thread: MB/s of payload (1 MB = 10^6 B); "
        f"best of {reps} run(s) of >= {min_time:g} s each =="
    )
    print(
        "seal = compress (if it shrinks) + AES-256-GCM; open = decrypt + decompress. "
        "qmesh = one frame per call;\nqmesh×64 = encode_batch / one feed of 64 frames; "
        "py-pipe = same frames in pure Python (zstandard + cryptography).\n"
        "zstd× = zstd level-3 compression ratio of those payloads."
    )
    head = (
        f"{'data':<6} {'size':>7} {'zstd×':>6} {'dir':<4} |"
        + "".join(f"{c:>9}" for c in cols)
        + f" |{'q/py':>7}{'q64/py':>8}{'q/zstd':>8}{'q64/zstd':>9}"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        m = r.mbps
        print(
            f"{r.case.kind:<6} {_size(r.case.size):>7} {r.case.zstd_ratio:>5.2f}x "
            f"{r.direction:<4} |"
            + "".join(f"{m[c]:>9.0f}" for c in cols)
            + f" |{_ratio(m['qmesh'], m['py-pipe']):>6.2f}x"
            + f"{_ratio(m['qmesh×64'], m['py-pipe']):>7.2f}x"
            + f"{_ratio(m['qmesh'], m['zstd']):>7.2f}x"
            + f"{_ratio(m['qmesh×64'], m['zstd']):>8.2f}x"
        )
    _print_targets(results)


def _print_targets(results: Sequence[CodecResult]) -> None:
    def verdict(value: float, target: float) -> str:
        return f"{value:.2f}x {'met' if value >= target else 'NOT met'}"

    print()
    print("Targets (reported, not asserted; qmesh = one frame per call):")
    small = [r for r in results if r.case.size == KIB]
    if small:
        print("  qmesh >= 3x the pure-Python pipeline at 1 KiB:")
        for r in small:
            q = _ratio(r.mbps["qmesh"], r.mbps["py-pipe"])
            b = _ratio(r.mbps["qmesh×64"], r.mbps["py-pipe"])
            print(
                f"    {r.case.kind:<6} {r.direction}: {verdict(q, 3.0)}  (×64: {verdict(b, 3.0)})"
            )
    mid = [r for r in results if r.case.size == 16 * KIB and r.case.kind == "json"]
    if mid:
        print('  qmesh >= 0.85x "zstd alone" at 16 KiB json (seal and open):')
        for r in mid:
            q = _ratio(r.mbps["qmesh"], r.mbps["zstd"])
            b = _ratio(r.mbps["qmesh×64"], r.mbps["zstd"])
            print(
                f"    {r.case.kind:<6} {r.direction}: {verdict(q, 0.85)}  (×64: {verdict(b, 0.85)})"
            )


# --------------------------------------------------------------------------
# Part 2: TCP through MiniGate → Gate


class _EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = bytearray(256 * KIB)
        view = memoryview(buf)
        try:
            while n := sock.recv_into(buf):
                sock.sendall(view[:n])
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass


class _SinkHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        buf = bytearray(256 * KIB)
        total = 0
        try:
            while n := sock.recv_into(buf):
                total += n
            sock.sendall(struct.pack(">Q", total))
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


def serve_forever() -> None:
    """The ``--serve`` mode: echo and sink servers; prints their ports, then serves."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    echo = _Server(("127.0.0.1", 0), _EchoHandler)
    sink = _Server(("127.0.0.1", 0), _SinkHandler)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    print(echo.server_address[1], sink.server_address[1], flush=True)
    try:
        echo.serve_forever()
    except KeyboardInterrupt:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _connect(port: int, timeout: float | None = 30.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def echo_throughput(port: int, total: int, data: bytes) -> float:
    """One-way MB/s streaming ``total`` bytes to the echo server and back."""
    received = 0
    error: list[BaseException] = []

    with _connect(port) as sock:

        def reader() -> None:
            nonlocal received
            buf = bytearray(MIB)
            try:
                while received < total:
                    n = sock.recv_into(buf)
                    if not n:
                        break
                    received += n
            except BaseException as exc:
                error.append(exc)

        thread = threading.Thread(target=reader, daemon=True)
        view = memoryview(data)
        chunk = 256 * KIB
        start = time.perf_counter()
        thread.start()
        sent = 0
        while sent < total:
            n = min(chunk, total - sent)
            offset = sent % (len(data) - chunk)
            sock.sendall(view[offset : offset + n])
            sent += n
        sock.shutdown(socket.SHUT_WR)
        thread.join()
        elapsed = time.perf_counter() - start
    if error:
        raise error[0]
    if received != total:
        raise ConnectionError(f"echo returned {received} of {total} bytes")
    return total / elapsed / MB


def upload_throughput(port: int, total: int, data: bytes) -> float:
    """MB/s sending ``total`` bytes to the sink, until it confirms the count."""
    view = memoryview(data)
    chunk = 256 * KIB
    with _connect(port) as sock:
        start = time.perf_counter()
        sent = 0
        while sent < total:
            n = min(chunk, total - sent)
            offset = sent % (len(data) - chunk)
            sock.sendall(view[offset : offset + n])
            sent += n
        sock.shutdown(socket.SHUT_WR)
        (count,) = struct.unpack(">Q", _recv_exact(sock, 8))
        elapsed = time.perf_counter() - start
    if count != total:
        raise ConnectionError(f"sink counted {count} of {total} bytes")
    return total / elapsed / MB


def round_trips(port: int, count: int, warmup: int) -> list[float]:
    """Seconds per 64-byte round trip, one message at a time."""
    message = os.urandom(64)
    samples: list[float] = []
    clock = time.perf_counter
    with _connect(port) as sock:
        send, recv = sock.sendall, sock.recv
        for i in range(warmup + count):
            start = clock()
            send(message)
            got = recv(64)
            while len(got) < 64:
                more = recv(64 - len(got))
                if not more:
                    raise ConnectionError("echo closed the connection")
                got += more
            if i >= warmup:
                samples.append(clock() - start)
    return samples


def connect_round_trips(port: int, count: int) -> list[float]:
    """Seconds for connect + one 64-byte round trip + close, ``count`` times."""
    message = os.urandom(64)
    samples: list[float] = []
    for _ in range(count):
        start = time.perf_counter()
        with _connect(port) as sock:
            sock.sendall(message)
            _recv_exact(sock, 64)
            samples.append(time.perf_counter() - start)
    return samples


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class Mesh:
    """Echo/sink servers, a Gate and a MiniGate in subprocesses, in a temp dir."""

    def __init__(self, stack: ExitStack) -> None:
        self.stack = stack
        self.tmp = Path(tempfile.mkdtemp(prefix="qmesh-bench-"))
        stack.callback(shutil.rmtree, self.tmp, ignore_errors=True)
        self.procs: list[Proc] = []
        stack.callback(self._stop_all)
        self.echo_port = self.sink_port = 0
        self.fwd_echo = self.fwd_sink = 0
        self.gate: Proc | None = None
        self.minigate: Proc | None = None

    def _spawn(self, name: str, argv: list[str], *, pipe_stdout: bool = False) -> Proc:
        log = self.tmp / f"{name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                argv,
                stdout=subprocess.PIPE if pipe_stdout else out,
                stderr=out,
                stdin=subprocess.DEVNULL,
                cwd=REPO,
                start_new_session=True,  # Ctrl-C reaches only us; we stop them
            )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def _stop_all(self) -> None:
        for proc in reversed(self.procs):
            if proc.popen.poll() is None:
                proc.popen.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 5.0
        for proc in reversed(self.procs):
            try:
                proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait()
            if proc.popen.stdout is not None:
                proc.popen.stdout.close()

    def _qmesh(self, *args: str) -> str:
        argv = [sys.executable, "-m", "qmesh", "--data-dir", str(self.tmp / "data"), *args]
        done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr}")
        return done.stdout

    def start(self) -> None:
        servers = self._spawn("servers", [sys.executable, str(HERE), "--serve"], pipe_stdout=True)
        assert servers.popen.stdout is not None
        line = servers.popen.stdout.readline().decode()
        if not line:
            raise RuntimeError(f"echo/sink servers did not start:\n{servers.tail()}")
        self.echo_port, self.sink_port = map(int, line.split())

        tunnel_port, self.fwd_echo, self.fwd_sink = free_port(), free_port(), free_port()
        data = self.tmp / "data"
        cred = self.tmp / "edge.cred"
        self._qmesh("keys", "init")
        gate_address = f"127.0.0.1:{tunnel_port}"
        self._qmesh("enroll", "minigate", "bench-edge", "--gate", gate_address, "--out", str(cred))
        gate_toml = self.tmp / "gate.toml"
        gate_toml.write_text(
            f"data_dir = {json.dumps(str(data))}\n"
            "[gate]\n"
            f'tunnel_listen = "127.0.0.1:{tunnel_port}"\n'
            'http_listen = "127.0.0.1:0"\n'
            f'forward_allow = ["127.0.0.1:{self.echo_port}", "127.0.0.1:{self.sink_port}"]\n'
            "[log]\n"
            'level = "warning"\n'
        )
        minigate_toml = self.tmp / "minigate.toml"
        minigate_toml.write_text(
            f"data_dir = {json.dumps(str(self.tmp / 'edge-data'))}\n"
            "[minigate]\n"
            f'gate = "127.0.0.1:{tunnel_port}"\n'
            f"credential_file = {json.dumps(str(cred))}\n"
            'pg_listen = "127.0.0.1:0"\n'
            'llm_listen = "127.0.0.1:0"\n'
            "[[minigate.forward]]\n"
            f'listen = "127.0.0.1:{self.fwd_echo}"\n'
            f'target = "127.0.0.1:{self.echo_port}"\n'
            "[[minigate.forward]]\n"
            f'listen = "127.0.0.1:{self.fwd_sink}"\n'
            f'target = "127.0.0.1:{self.sink_port}"\n'
            "[log]\n"
            'level = "warning"\n'
        )
        module = [sys.executable, "-m", "qmesh"]
        self.gate = self._spawn("gate", [*module, "--role", "gate", "--config", str(gate_toml)])
        self._wait_port(tunnel_port, self.gate)
        self.minigate = self._spawn(
            "minigate", [*module, "--role", "minigate", "--config", str(minigate_toml)]
        )
        self._wait_round_trip(self.fwd_echo)
        self._wait_round_trip(self.fwd_sink, sink=True)

    def _check_alive(self) -> None:
        for proc in self.procs:
            if proc.popen.poll() is not None:
                raise RuntimeError(
                    f"{proc.name} exited with status {proc.popen.returncode}:\n{proc.tail()}"
                )

    def _wait_port(self, port: int, proc: Proc, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{proc.name} is not listening on {port}") from None
                time.sleep(0.05)

    def _wait_round_trip(self, port: int, *, sink: bool = False, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        last: BaseException | None = None
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                with _connect(port, timeout=3.0) as sock:
                    if sink:
                        sock.sendall(b"x" * 100)
                        sock.shutdown(socket.SHUT_WR)
                        if struct.unpack(">Q", _recv_exact(sock, 8))[0] == 100:
                            return
                    else:
                        sock.sendall(b"ready?")
                        if _recv_exact(sock, 6) == b"ready?":
                            return
            except OSError as exc:
                last = exc
            time.sleep(0.1)
        tails = "\n".join(f"--- {p.name}\n{p.tail()}" for p in self.procs)
        raise RuntimeError(f"no round trip through forward port {port}: {last!r}\n{tails}")

    def cpu_seconds(self) -> dict[str, float]:
        """User + system CPU seconds of the Gate and MiniGate so far (Linux)."""
        out: dict[str, float] = {}
        tick = os.sysconf("SC_CLK_TCK")
        for proc in (self.gate, self.minigate):
            if proc is None:
                continue
            try:
                fields = Path(f"/proc/{proc.popen.pid}/stat").read_text().rsplit(")", 1)[1].split()
                out[proc.name] = (int(fields[11]) + int(fields[12])) / tick
            except (OSError, IndexError, ValueError):
                out[proc.name] = float("nan")
        return out


@dataclass
class TcpRow:
    metric: str
    direct: float
    qmesh: float
    unit_fmt: str = "{:,.0f}"


def run_tcp(
    total: int, rtt_count: int, warmup: int, connects: int, reps: int
) -> tuple[list[TcpRow], list[str]]:
    rows: list[TcpRow] = []
    notes: list[str] = []
    payloads = {"random": os.urandom(4 * MIB), "json": json_text(4 * MIB)}
    with ExitStack() as stack:
        mesh = Mesh(stack)
        mesh.start()
        _progress("tcp: gate and minigate are up, round trip works")
        targets = {
            "direct": (mesh.echo_port, mesh.sink_port),
            "qmesh": (mesh.fwd_echo, mesh.fwd_sink),
        }

        def both(
            label: str, fn: Callable[[str], float], pick: Callable[[list[float]], float]
        ) -> tuple[float, float]:
            values: dict[str, list[float]] = {"direct": [], "qmesh": []}
            cpu: dict[str, float] = {}
            wall = 0.0
            for _ in range(reps):  # interleaved, so drift hits both alike
                for path in values:
                    before = mesh.cpu_seconds()
                    start = time.perf_counter()
                    values[path].append(fn(path))
                    if path == "qmesh":
                        wall += time.perf_counter() - start
                        for name, seconds in mesh.cpu_seconds().items():
                            cpu[name] = cpu.get(name, 0.0) + seconds - before[name]
            used = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in cpu.items())
            notes.append(f"{label} through qmesh: {wall:.1f} s wall, CPU {used}")
            return pick(values["direct"]), pick(values["qmesh"])

        def echo(path: str, data: bytes) -> float:
            return echo_throughput(targets[path][0], total, data)

        def upload(path: str, data: bytes) -> float:
            return upload_throughput(targets[path][1], total, data)

        for kind, data in payloads.items():
            label = f"echo {_size(total)} {kind}"
            d, q = both(label, partial(echo, data=data), max)
            rows.append(TcpRow(f"{label}, MB/s one-way", d, q))
            _progress(f"tcp: {label} done")
        for kind, data in payloads.items():
            label = f"upload {_size(total)} {kind} to sink"
            d, q = both(label, partial(upload, data=data), max)
            rows.append(TcpRow(f"{label}, MB/s", d, q))
            _progress(f"tcp: {label} done")

        samples: dict[str, list[list[float]]] = {"direct": [], "qmesh": []}
        for _ in range(reps):
            for path in samples:
                samples[path].append(round_trips(targets[path][0], rtt_count, warmup))
        for label, q in (("p50", 0.50), ("p99", 0.99)):
            d_us, q_us = (
                statistics.median(_percentile(s, q) for s in samples[path]) * 1e6
                for path in ("direct", "qmesh")
            )
            rows.append(TcpRow(f"64 B round trip {label}, µs", d_us, q_us, "{:,.1f}"))
        _progress("tcp: round trips done")

        conn: dict[str, list[float]] = {
            path: connect_round_trips(targets[path][0], connects) for path in targets
        }
        d_us, q_us = (statistics.median(conn[path]) * 1e6 for path in ("direct", "qmesh"))
        rows.append(TcpRow("connect + first 64 B round trip p50, µs", d_us, q_us, "{:,.1f}"))
        _progress("tcp: connects done")
        mesh._check_alive()
    return rows, notes


def print_tcp(
    rows: Sequence[TcpRow], notes: Sequence[str], reps: int, rtt_count: int, connects: int
) -> None:
    print()
    print(
        "== 2. TCP on loopback: direct (client → server) vs qmesh "
        "(client → MiniGate → tunnel → Gate → server) =="
    )
    print(
        f"Throughput: best of {reps} interleaved runs. Latency: median over {reps} runs of "
        f"{rtt_count:,} round trips each;\nconnect: median of {connects} connections. "
        "ratio = qmesh / direct (throughput: higher is better; latency: lower is better)."
    )
    width = max(len(r.metric) for r in rows)
    head = f"{'metric':<{width}} | {'direct':>10} | {'qmesh':>10} | {'ratio':>7}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r.metric:<{width}} | {r.unit_fmt.format(r.direct):>10} | "
            f"{r.unit_fmt.format(r.qmesh):>10} | {_ratio(r.qmesh, r.direct):>6.2f}x"
        )
    print(f"qmesh CPU (user + system of the Gate and MiniGate processes), all {reps} run(s):")
    for note in notes:
        print(f"  {note}")


# --------------------------------------------------------------------------


def _progress(message: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Benchmark qmesh's frame codec and TCP forwarding through the tunnel.",
        epilog="See the module docstring (or bench/README.md) for how to read the output.",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--only", choices=("codec", "tcp"), help="run one part only")
    parser.add_argument("--mib", type=int, help="MiB per TCP throughput run (default 256)")
    parser.add_argument("--reps", type=int, help="codec repetitions, best kept (default 5)")
    parser.add_argument("--min-time", type=float, help="seconds per codec run (default 0.3)")
    parser.add_argument("--tcp-reps", type=int, help="TCP repetitions (default 3)")
    parser.add_argument("--round-trips", type=int, help="64 B round trips per run (default 5000)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve_forever()
        return 0

    quick = args.quick
    sizes = (KIB, 16 * KIB) if quick else (KIB, 16 * KIB, 256 * KIB)
    reps = args.reps or (1 if quick else 5)
    min_time = args.min_time or (0.05 if quick else 0.3)
    total = (args.mib or (16 if quick else 256)) * MIB
    tcp_reps = args.tcp_reps or (1 if quick else 3)
    rtt_count = args.round_trips or (500 if quick else 5000)
    warmup = min(500, rtt_count // 5)
    connects = 30 if quick else 200

    from qmesh import __version__

    print(
        f"qmesh {__version__} tunnel benchmark; Python {sys.version.split()[0]}, "
        f"{os.cpu_count()} CPU(s){', --quick' if quick else ''}"
    )
    print("Timings are noisy on a small shared machine: compare columns of one run, not runs.")
    with _sigterm_as_interrupt():
        try:
            if args.only in (None, "codec"):
                results = run_codec(sizes, min_time, reps)
                print_codec(results, min_time, reps)
                sys.stdout.flush()
            if args.only in (None, "tcp"):
                rows, notes = run_tcp(total, rtt_count, warmup, connects, tcp_reps)
                print_tcp(rows, notes, tcp_reps, rtt_count, connects)
        except KeyboardInterrupt:
            print("\ninterrupted; subprocesses stopped, temp dirs removed", file=sys.stderr)
            return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
