"""Hostile clients against a running Gate, driven by Hypothesis.

One real Gate (``run_gate``, its SQLite state store, an echo server it may
forward to) serves a whole test; Hypothesis throws inputs at its two public
ports, and after every input the Gate must still be serving: ``/healthz``
answers 200, an enrolled edge's stream through the tunnel still echoes, no
connection ended in an unexpected exception (``connection_errors``) and
nothing was logged at ERROR level (the mark of a handler or a session that
failed on a peer's input instead of refusing it).

* The tunnel port: random preambles; Noise messages truncated, oversized or
  random; a stranger's valid message 1 carrying random HELLO JSON (nested,
  huge numbers, wrong types) or random bytes; an enrolled key's HELLO with
  random fields; and, after a genuine handshake, random sealed frames (OPEN
  with random requests to every service, DATA, WINDOW, ACK, RESET, GOAWAY,
  unknown types) or plain garbage.
* The HTTP port: random methods, targets, versions and headers (bearer
  tokens valid and not, huge and malformed ones), bodies that are random
  bytes or JSON (deeply nested, huge numbers, OpenAI-shaped with wrong
  types), sent to the Gate's routes; every answer must be a well-formed
  status other than 500.

Hypothesis runs derandomized with a fixed example count and no example
database, so a run is the same on every machine and leaves nothing in the
repository. Each test prints how many inputs of each kind it sent (visible
with ``pytest -s``).

Bugs these tests found in code outside this file are listed under "known
bugs" at the end: each has an expected-failure test of its own, and the
random runs steer clear of it meanwhile.

How the pieces fit: the test body is async (pytest-trio) and owns the Gate;
Hypothesis, which is synchronous, runs in a worker thread
(``trio.to_thread.run_sync``), and each example hops back into the Gate's
event loop with ``trio.from_thread.run``. One Gate serves hundreds of
examples, and every wait is on an event (a PONG, a close, an answer) under
a generous ``fail_after``, never on a guessed time.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import logging
import random
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Final, Protocol

import attrs
import trio
from daemonkit import GateDir, make_gate_dir
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from tunnelkit import fast_settings, keypair, roundtrip

from qmesh import _core
from qmesh.config import load_config
from qmesh.gate.role import run_gate
from qmesh.identity import GateKeys
from qmesh.state import StateStore
from qmesh.tunnel import HandshakeFailed, TunnelClient, TunnelServer
from qmesh.tunnel import handshake as tunnel_handshake
from qmesh.tunnel.frames import FrameType
from qmesh.tunnel.handshake import PREAMBLE, Hello, clock_ns

TUNNEL_EXAMPLES: Final = 600
HTTP_EXAMPLES: Final = 600
IO_LIMIT_S: Final = 20.0
"""Per wait: far above anything a healthy Gate needs on a loaded CI box."""
MAX_NOISE_PAYLOAD: Final = 65_000
_U16: Final = struct.Struct(">H")

# Placeholders in generated inputs, filled in when an example runs (the
# values exist only then): the echo server's address, the time, the live
# session of the honest edge, the application's and the admin's keys.
ECHO: Final = "$echo"
NOW: Final = "$now"
LIVE_SESSION: Final = "$live-session"
APP_BEARER: Final = "$app"
ADMIN_BEARER: Final = "$admin"


# -- the Gate under attack ----------------------------------------------------------------


class ErrorLog(logging.Handler):
    """Keeps what qmesh logs at ERROR or above."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def take(self) -> list[str]:
        lines = [f"{r.name}: {r.getMessage()}" for r in self.records]
        self.records.clear()
        return lines


@contextlib.contextmanager
def errors_logged() -> Iterator[ErrorLog]:
    handler = ErrorLog()
    logger = logging.getLogger("qmesh")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


@attrs.define
class Target:
    """A running Gate, the keys to reach it, and what was thrown at it."""

    gate: dict[str, Any]
    gate_dir: GateDir
    echo_port: int
    gate_public: bytes
    hello_key: bytes
    """Enrolled as ``hostile-hello``: sends HELLOs with random fields (which
    may spoil its own timestamp; no other example uses it)."""
    frames_key: bytes
    """Enrolled as ``hostile-frames``: genuine handshakes, hostile frames."""
    app_bearer: str
    edge: TunnelClient
    """The honest edge, whose stream must keep working."""
    errors: ErrorLog
    sent: collections.Counter[str] = attrs.field(factory=collections.Counter)
    outcomes: collections.Counter[str] = attrs.field(factory=collections.Counter)
    connection_errors_seen: int = 0
    dirty: bool = False
    """The last example failed before its checks were done."""

    @property
    def server(self) -> TunnelServer:
        server: TunnelServer = self.gate["server"]
        return server

    @property
    def tunnel_port(self) -> int:
        return self.gate_dir.tunnel_port

    @property
    def http_port(self) -> int:
        return self.gate_dir.http_port

    def fill(self, value: Any) -> Any:
        """``value`` with the placeholders replaced."""
        if isinstance(value, dict):
            return {k: self.fill(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.fill(v) for v in value]
        if value == ECHO:
            return f"127.0.0.1:{self.echo_port}"
        if value == NOW:
            return clock_ns()
        if value == LIVE_SESSION:
            session = self.edge.session
            return session.id.hex() if session is not None else None
        if value == APP_BEARER:
            return self.app_bearer
        if value == ADMIN_BEARER:
            return self.gate_dir.bearer
        return value

    async def connect(self, port: int) -> trio.SocketStream:
        with trio.fail_after(IO_LIMIT_S):
            return await trio.open_tcp_stream("127.0.0.1", port)

    async def check_alive(self) -> None:
        """The Gate serves HTTP and the honest edge's streams, and nothing
        failed unexpectedly while it handled the last input."""
        with trio.fail_after(IO_LIMIT_S):
            status, _ = await http_exchange(
                await self.connect(self.http_port),
                b"GET /healthz HTTP/1.1\r\nhost: gate\r\nconnection: close\r\n\r\n",
            )
            assert status == 200, f"/healthz answered {status}"
            stream = await self.edge.open_stream({"service": "forward", "target": self.fill(ECHO)})
            assert await roundtrip(stream, b"still serving") == b"still serving"
        errors = self.errors.take()
        assert not errors, "the Gate logged errors:\n" + "\n".join(errors)
        failed = self.server.connection_errors - self.connection_errors_seen
        assert failed == 0, "a tunnel connection failed unexpectedly (see the log)"

    def report(self, what: str) -> str:
        total = sum(self.sent.values())
        kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(self.sent.items()))
        seen = ", ".join(f"{kind} {n}" for kind, n in sorted(self.outcomes.items()))
        return f"hostile {what} inputs: {total} ({kinds}); outcomes: {seen}"


async def _echo(stream: trio.SocketStream) -> None:
    async with stream:
        with contextlib.suppress(trio.BrokenResourceError):
            while data := await stream.receive_some(65536):
                await stream.send_all(data)


def _enroll(path: Path, name: str) -> bytes:
    private, public = keypair()
    with StateStore.open(path / "state.db") as store:
        store.add_identity(name, "minigate", public)
    return private


async def start_target(nursery: trio.Nursery, tmp_path: Path, errors: ErrorLog) -> Target:
    listeners = await nursery.start(functools.partial(trio.serve_tcp, _echo, 0, host="127.0.0.1"))
    echo_port = listeners[0].socket.getsockname()[1]
    gate_dir = make_gate_dir(tmp_path)
    text = gate_dir.config_text().replace(
        "[tunnel]", f'forward_allow = ["127.0.0.1:{echo_port}"]\n[tunnel]'
    )
    config_file = tmp_path / "gate.toml"
    config_file.write_text(text)
    gate = await nursery.start(run_gate, load_config(config_file, env={}))
    with StateStore.open(gate_dir.path / "state.db") as store:
        app_bearer = f"app-1:{store.add_app('app-1')}"
    keys = GateKeys.load(gate_dir.path)
    edge = TunnelClient(
        fast_settings(),
        name="edge-honest",
        role="minigate",
        private_key=_enroll(gate_dir.path, "edge-honest"),
        gate_public_key=keys.public_key,
        gate_addresses=[("127.0.0.1", gate_dir.tunnel_port)],
    )
    await nursery.start(edge.run)
    target = Target(
        gate=gate,
        gate_dir=gate_dir,
        echo_port=echo_port,
        gate_public=keys.public_key,
        hello_key=_enroll(gate_dir.path, "hostile-hello"),
        frames_key=_enroll(gate_dir.path, "hostile-frames"),
        app_bearer=app_bearer,
        edge=edge,
        errors=errors,
    )
    await target.check_alive()
    return target


class Attack(Protocol):
    @property
    def kind(self) -> str: ...

    async def run(self, target: Target) -> None: ...


def run_examples(
    target: Target,
    attacks: st.SearchStrategy[Attack],
    examples: int,
    explicit: Sequence[Attack] = (),
) -> None:
    """Run Hypothesis (in this worker thread) over ``attacks``, after the
    ``explicit`` ones (inputs that once found a bug); each example runs in
    the Gate's event loop and ends with the liveness check."""

    async def one(attack: Attack) -> None:
        if target.dirty:
            # The previous example failed half-way: what it left behind is
            # its own failure, already reported, not this example's.
            target.errors.take()
            target.connection_errors_seen = target.server.connection_errors
        target.dirty = True
        target.sent[attack.kind] += 1
        with trio.fail_after(3 * IO_LIMIT_S):
            await attack.run(target)
        await target.check_alive()
        target.dirty = False

    @settings(
        derandomize=True,
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(attacks)
    def test(attack: Attack) -> None:
        trio.from_thread.run(one, attack)

    for attack in explicit:
        test = example(attack)(test)
    test()


# -- bytes on the wire ----------------------------------------------------------------------


async def send_quietly(transport: trio.SocketStream, data: bytes, *, eof: bool) -> None:
    """Send ``data`` (then EOF); the Gate may have hung up already."""
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await transport.send_all(data)
        if eof:
            await transport.send_eof()


async def read_until_closed(transport: trio.SocketStream) -> bytes:
    received = bytearray()
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        while data := await transport.receive_some(65536):
            received += data
    return bytes(received)


async def http_exchange(transport: trio.SocketStream, request: bytes) -> tuple[int | None, bytes]:
    """Send ``request`` and EOF; the status of the answer (None when the
    Gate closed without one) and the whole answer."""
    async with transport:
        await send_quietly(transport, request, eof=True)
        answer = await read_until_closed(transport)
    if not answer:
        return None, answer
    line = answer.split(b"\r\n", 1)[0].split(b" ")
    assert len(line) >= 2 and line[0] in (b"HTTP/1.1", b"HTTP/1.0"), f"not HTTP: {answer[:80]!r}"
    return int(line[1]), answer


class _Reader:
    """Reads u16-framed handshake messages; None when the Gate hangs up."""

    def __init__(self, transport: trio.SocketStream) -> None:
        self.transport = transport
        self.buffer = bytearray()

    async def exactly(self, n: int) -> bytes | None:
        while len(self.buffer) < n:
            try:
                data = await self.transport.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return None
            if not data:
                return None
            self.buffer += data
        out = bytes(self.buffer[:n])
        del self.buffer[:n]
        return out

    async def message(self) -> bytes | None:
        head = await self.exactly(2)
        return None if head is None else await self.exactly(_U16.unpack(head)[0])


def framed(message: bytes) -> bytes:
    return _U16.pack(len(message)) + message


Damage = tuple[str, int, int]
"""What happens to message 1 on the way: ``("flip", at, xor)`` changes a
byte, ``("cut", at, _)`` sends only its first bytes (framed as if that
were all), ``("short", at, _)`` frames it whole but stops sending after
``at`` bytes (then EOF)."""


async def first_message(
    target: Target, private: bytes, payload: bytes, damage: Damage | None = None
) -> tuple[trio.SocketStream, _core.NoiseHandshake, _Reader, dict[str, Any] | None]:
    """Send message 1 carrying ``payload``, perhaps damaged; the Gate's
    answer, decrypted, or None when it hung up without one."""
    noise = _core.NoiseHandshake.initiator(private, target.gate_public, PREAMBLE)
    message = bytearray(noise.write_message(payload))
    wire = PREAMBLE + framed(bytes(message))
    if damage is not None:
        how, at, xor = damage
        at %= len(message)
        if how == "flip":
            message[at] ^= xor or 1
            wire = PREAMBLE + framed(bytes(message))
        elif how == "cut":
            wire = PREAMBLE + framed(bytes(message[:at]))
        else:
            wire = wire[: len(PREAMBLE) + 2 + at]
    transport = await target.connect(target.tunnel_port)
    reader = _Reader(transport)
    await send_quietly(transport, wire, eof=damage is not None and damage[0] == "short")
    reply = await reader.message()
    if reply is None:
        return transport, noise, reader, None
    answer = json.loads(noise.read_message(reply))
    assert isinstance(answer, dict)
    return transport, noise, reader, answer


# -- tunnel attacks -----------------------------------------------------------------------


@attrs.frozen
class RawPreamble:
    """Any bytes where the preamble and message 1 belong, then EOF."""

    data: bytes
    kind: str = "raw preamble"

    async def run(self, target: Target) -> None:
        async with await target.connect(target.tunnel_port) as transport:
            await send_quietly(transport, self.data, eof=True)
            await read_until_closed(transport)
        target.outcomes["cut off"] += 1


@attrs.frozen
class RandomMessage:
    """The right preamble, then a u16 length (maybe a lie) and random bytes."""

    declared: int | None
    body: bytes | Blob
    kind: str = "random noise message"

    async def run(self, target: Target) -> None:
        body = self.body.make() if isinstance(self.body, Blob) else self.body
        # Past 65,535 bytes the rest follows the message as junk.
        length = min(len(body), 0xFFFF) if self.declared is None else self.declared
        async with await target.connect(target.tunnel_port) as transport:
            await send_quietly(transport, PREAMBLE + _U16.pack(length) + body, eof=True)
            answer = await read_until_closed(transport)
        assert answer == b"", "the Gate answered a message it cannot have decrypted"
        target.outcomes["cut off"] += 1


@attrs.frozen
class StrangerHello:
    """A valid message 1 from a key the Gate never enrolled (anyone who
    knows its public key can send one), carrying any payload."""

    private: bytes
    payload: Payload
    damage: Damage | None
    kind: str = "stranger's message 1"

    async def run(self, target: Target) -> None:
        payload = payload_bytes(self.payload, target)[:MAX_NOISE_PAYLOAD]
        transport, _, _, answer = await first_message(target, self.private, payload, self.damage)
        async with transport:
            if answer is None:
                target.outcomes["stranger cut off"] += 1
            else:
                # Only an authentic, well-formed HELLO gets an answer: a refusal.
                assert self.damage is None, f"a damaged message 1 was answered: {answer}"
                assert answer.get("ok") is False and answer.get("code") == "not_enrolled", answer
                target.outcomes["stranger refused"] += 1


@attrs.frozen
class EnrolledHello:
    """An enrolled key's message 1 with a HELLO of random fields (a dict
    with placeholders) or random bytes."""

    fields: dict[str, Any] | None
    raw: bytes
    kind: str = "enrolled key's HELLO"

    async def run(self, target: Target) -> None:
        if self.fields is None:
            payload = self.raw
        else:
            payload = json.dumps(target.fill(self.fields)).encode()[:MAX_NOISE_PAYLOAD]
        try:
            Hello.from_json(payload)
            well_formed = True
        except HandshakeFailed:
            well_formed = False
        transport, _, _, answer = await first_message(target, target.hello_key, payload)
        async with transport:
            if answer is None:
                assert not well_formed, "a well-formed HELLO got no answer"
                target.outcomes["malformed HELLO cut off"] += 1
            elif answer.get("ok") is True:
                assert well_formed, "a malformed HELLO was accepted"
                target.outcomes["HELLO accepted"] += 1
            else:
                assert well_formed
                assert answer.get("code") in ("replayed", "too_many_sessions"), answer
                target.outcomes[f"HELLO refused: {answer['code']}"] += 1


@attrs.frozen
class Blob:
    """Bytes made when the example runs (Hypothesis need not hold them)."""

    size: int
    seed: int

    def make(self) -> bytes:
        return random.Random(self.seed).randbytes(self.size)


@attrs.frozen
class SealedFrames:
    """A genuine handshake by an enrolled edge, then random sealed frames
    and a PING (the answering PONG shows everything before it was handled,
    or the Gate hangs up); or, with ``garbage``, unsealed bytes and EOF."""

    frames: tuple[tuple[int, int, Payload], ...]
    garbage: bytes | None
    kind: str = "sealed frames after a handshake"

    async def run(self, target: Target) -> None:
        hello = Hello(
            role="minigate",
            name="hostile-frames",
            session_id=None,
            recv_next=0,
            timestamp=clock_ns(),
        )
        transport = await target.connect(target.tunnel_port)
        async with transport:
            noise, welcome, leftover = await tunnel_handshake.initiate(
                transport,
                local_private=target.frames_key,
                gate_public=target.gate_public,
                hello=hello,
            )
            assert not welcome.resumed
            encoder, decoder = noise.into_codec(max_payload=_core.MAX_PAYLOAD_LIMIT)
            decoder.feed(leftover)
            wire = bytearray()
            for frame_type, stream_id, payload in self.frames:
                wire += encoder.encode(frame_type, stream_id, payload_bytes(payload, target))
            if self.garbage is not None:
                await send_quietly(transport, bytes(wire) + self.garbage, eof=True)
                await read_until_closed(transport)
                target.outcomes["garbage: cut off"] += 1
                return
            nonce = random.Random(len(wire)).getrandbits(64).to_bytes(8, "big")
            wire += encoder.encode(FrameType.PING, 0, nonce)
            await send_quietly(transport, bytes(wire), eof=False)
            outcome = await _until_pong(transport, decoder, nonce)
        opened = [p.get("service") for _, _, p in self.frames if isinstance(p, dict)]
        stream = next((str(name) for name in ("pg", "llm", "forward") if name in opened), "any")
        target.outcomes[f"frames ({stream} stream): {outcome}"] += 1


async def _until_pong(
    transport: trio.SocketStream, decoder: _core.FrameDecoder, nonce: bytes
) -> str:
    """Read the Gate's frames until the PONG for ``nonce`` or the end."""
    while True:
        for frame_type, _stream, _seq, _flags, payload in decoder.next_frames():
            if frame_type == FrameType.PONG and payload == nonce:
                return "answered"
            if frame_type == FrameType.GOAWAY:
                return "session ended"
        try:
            data = await transport.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return "cut off"
        if not data:
            return "cut off"
        decoder.feed(data)


def _opening(request: Payload) -> SealedFrames:
    """A genuine handshake, then one OPEN of ``request``."""
    return SealedFrames(((FrameType.OPEN, 1, request),), None)


# -- HTTP requests ----------------------------------------------------------------------------


@attrs.frozen
class HttpRequest:
    """One request's bytes, built when it runs (placeholders filled in)."""

    method: bytes
    target: bytes
    version: bytes
    bearer: str | None
    headers: tuple[tuple[bytes, bytes], ...]
    raw_lines: tuple[bytes, ...]
    body: Payload
    framing: str
    """How the body is delimited: content-length (right, wrong, absent,
    garbage), chunked (right, garbage), or a pipelined second request."""
    kind: str = "http request"

    def build(self, target: Target) -> bytes:
        body = payload_bytes(self.body, target)
        lines = [self.method + b" " + self.target + b" " + self.version, b"host: gate"]
        if self.bearer is not None:
            token = str(target.fill(self.bearer))
            lines.append(b"authorization: Bearer " + token.encode("utf-8", "replace"))
        lines += [name + b": " + value for name, value in self.headers]
        lines += self.raw_lines
        if self.framing == "chunked":
            lines.append(b"transfer-encoding: chunked")
            body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n"
        elif self.framing == "bad chunks":
            lines.append(b"transfer-encoding: chunked")
            body = b"zz\r\n" + body
        elif self.framing == "length":
            lines.append(b"content-length: %d" % len(body))
        elif self.framing == "longer":
            lines.append(b"content-length: %d" % (len(body) + 10))
        elif self.framing == "shorter":
            lines.append(b"content-length: %d" % (len(body) // 2))
        elif self.framing == "huge":
            lines.append(b"content-length: 99999999999999999999")
        elif self.framing == "garbage":
            lines.append(b"content-length: -1, 5")
        elif self.framing == "pipelined":
            lines.append(b"content-length: %d" % len(body))
            body += b"GET /healthz HTTP/1.1\r\nhost: gate\r\n\r\n"
        return b"\r\n".join(lines) + b"\r\n\r\n" + body

    async def run(self, target: Target) -> None:
        status, _ = await http_exchange(await target.connect(target.http_port), self.build(target))
        if status is None:
            target.outcomes["closed without an answer"] += 1
            return
        assert 100 <= status <= 599
        assert status != 500, "a handler failed on this request (500)"
        target.outcomes[f"{status}"] += 1


Payload = bytes | Blob | dict[str, Any] | HttpRequest


def payload_bytes(payload: Payload, target: Target) -> bytes:
    if isinstance(payload, Blob):
        return payload.make()
    if isinstance(payload, dict):
        return json.dumps(target.fill(payload)).encode()
    if isinstance(payload, HttpRequest):
        return payload.build(target)
    return payload


# -- strategies: JSON ------------------------------------------------------------------------

HUGE_INTS: Final = (2**53 + 1, 2**63, 2**64 - 1, 2**64, -(2**63) - 1, 2**1100, -(2**1100))

json_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from(HUGE_INTS),
    st.floats(),  # inf and NaN too: Python's json writes and reads them
    st.text(max_size=30),
)
json_values = st.recursive(
    json_leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(max_size=12), children, max_size=4),
    ),
    max_leaves=12,
)
# JSON that json.dumps would not write: nesting past any limit, numbers
# past Python's 4300-digit int limit, cut-off and non-UTF-8 text.
raw_json = st.one_of(
    st.integers(1, 20_000).map(lambda d: b"[" * d + b"]" * d),
    st.integers(1, 20_000).map(lambda d: b'{"a":' * d + b"1" + b"}" * d),
    st.integers(1, 20_000).map(lambda d: b"[" * d),
    st.integers(4300, 6000).map(lambda n: b'{"n": ' + b"9" * n + b"}"),
    st.sampled_from([b"1e999999", b"-1e999999", b"NaN", b"[Infinity]", b'"\\ud800"', b"\xff\xfe"]),
    json_values.map(lambda v: json.dumps(v).encode()).map(lambda b: b[: len(b) // 2]),
)


def dicts_with(
    keys: list[str], values: st.SearchStrategy[Any]
) -> st.SearchStrategy[dict[str, Any]]:
    """Dicts using some of ``keys`` (the names a handler reads) with any values."""
    return st.dictionaries(st.sampled_from(keys), values, max_size=len(keys))


u64ish = st.one_of(
    st.integers(0, 2**64 - 1),
    st.sampled_from([-1, 2**64, 2**63, 2**63 - 1, 0, NOW]),
    json_leaves,
)
HELLO_FIELDS: Final[dict[str, st.SearchStrategy[Any]]] = {
    "v": st.one_of(st.just(1), json_leaves),
    "role": st.one_of(st.sampled_from(["minigate", "daemon", "", "admin"]), json_values),
    "name": st.one_of(st.sampled_from(["hostile-hello", "edge-honest", "x" * 300]), json_values),
    "session": st.one_of(
        st.none(),
        st.just(LIVE_SESSION),
        st.binary(min_size=16, max_size=16).map(bytes.hex),
        st.text(alphabet="0123456789abcdefgz", min_size=30, max_size=34),
        json_values,
    ),
    "recv_next": u64ish,
    "ts": st.one_of(st.just(NOW), u64ish),
    "software": json_values,
    "extra": json_values,
}
hello_overrides = st.lists(
    st.one_of(*(st.tuples(st.just(k), v) for k, v in HELLO_FIELDS.items())), max_size=2
).map(dict)


def _hello(overrides: dict[str, Any], dropped: list[str]) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "v": 1,
        "role": "minigate",
        "name": "hostile-hello",
        "session": None,
        "recv_next": 0,
        "ts": NOW,
        "software": "hostile/0",
    }
    fields.update(overrides)
    for name in dropped:
        fields.pop(name, None)
    return fields


# A genuine HELLO with a few fields replaced or missing: close enough to
# valid that the Gate's checks, not the JSON parser, have to say no.
hello_fields = st.builds(
    _hello,
    hello_overrides,
    st.lists(st.sampled_from(["v", "role", "name", "session", "recv_next", "ts"]), max_size=2),
)

# -- strategies: HTTP ----------------------------------------------------------------------------

ENDPOINTS: Final = [
    ("GET", "/healthz"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/embeddings"),
    ("GET", "/v1/models"),
    ("POST", "/v1/memory/documents"),
    ("GET", "/v1/memory/documents"),
    ("GET", "/v1/memory/documents/{}"),
    ("DELETE", "/v1/memory/documents/{}"),
    ("POST", "/v1/memory/query"),
    ("POST", "/qg/v1/route"),
    ("GET", "/qg/v1/skills"),
    ("GET", "/qg/v1/budgets"),
    ("GET", "/qg/v1/decisions"),
    ("GET", "/api/tunnel"),
    ("GET", "/api/sessions"),
    ("POST", "/api/sessions/kill"),
    ("GET", "/api/inventory"),
    ("GET", "/api/inventory/{}"),
    ("POST", "/api/daemons/{}/v1/chat/completions"),
    ("POST", "/api/daemons/{}/v1/completions"),
    ("GET", "/"),
    ("GET", "/static/{}"),
    ("GET", "/api/dashboard"),
    ("GET", "/metrics"),
    ("GET", "/api/discovery"),
    ("POST", "/api/discovery/scan"),
    # Not /api/dashboard/stream: with the admin key it streams until the
    # client leaves, which a request-then-read-to-EOF client never does.
]
TCHARS: Final = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
PATH_CHARS: Final = TCHARS + "/%:@=;,"
header_text = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
    max_size=40,
).map(lambda s: s.encode("latin-1"))
path_params = st.one_of(
    st.sampled_from(
        ["1", "gpu-1", "..", "%2e%2e", "..%2f..%2fstate.db", "app.js", "%00", "a" * 300]
    ),
    st.text(alphabet=PATH_CHARS, min_size=1, max_size=20),
)
queries = st.one_of(
    st.just(""),
    st.text(alphabet=PATH_CHARS + "?&#", max_size=30).map(lambda q: "?" + q),
)


def _target(path: str, param: str, query: str) -> bytes:
    return (path.replace("{}", param) + query).encode()


@st.composite
def endpoints(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """A (method, target) pair that routes somewhere, as a rule."""
    method, path = draw(st.sampled_from(ENDPOINTS))
    if draw(st.integers(0, 9)) == 0:
        method = draw(st.sampled_from(["GET", "POST", "DELETE", "PUT", "HEAD", "OPTIONS"]))
    return method.encode(), _target(path, draw(path_params), draw(queries))


bearers = st.one_of(
    st.just(APP_BEARER),
    st.sampled_from([APP_BEARER, ADMIN_BEARER, None]),
    st.sampled_from(["app-1:wrong", "admin:", ":", "app-1", "nobody:key"]),
    st.text(max_size=40),
)
benign_headers = st.lists(
    st.one_of(
        st.tuples(st.text(alphabet=TCHARS, min_size=1, max_size=20).map(str.encode), header_text),
        st.tuples(st.just(b"content-type"), st.sampled_from([b"application/json", b"text/x"])),
        st.tuples(st.just(b"accept"), st.sampled_from([b"*/*", b"text/event-stream"])),
    ),
    max_size=3,
).map(tuple)
CHAT_KEYS: Final = [
    "model", "messages", "prompt", "input", "max_tokens", "max_completion_tokens", "stream",
    "temperature", "tokens_in", "dsn", "text", "title", "id", "format", "replace",
    "question", "limit", "target", "n", "stop",
]  # fmt: skip
DSNS: Final = [
    "qg://task=summarize",
    "qg://task=summarize;prefer=speed",
    "qg://task=chat;privacy=local;max_cost=0",
    "qg://",
    "qg://a=b=c",
    "qg://task=chat;budget=nope",
    "gemma-3-270m-q4_k_m",
]
api_values = st.one_of(
    json_values,
    st.sampled_from(DSNS),
    st.sampled_from(HUGE_INTS),
    st.lists(dicts_with(["role", "content", "name"], json_values), max_size=3),
)
api_bodies = dicts_with(CHAT_KEYS, api_values)
http_bodies: st.SearchStrategy[Payload] = st.one_of(
    api_bodies,
    api_bodies,
    api_bodies,
    st.just(b""),
    json_values.map(lambda v: json.dumps(v).encode()),
    raw_json,
    st.binary(max_size=512),
)

CHAT: Final = {
    "model": "qg://task=summarize",
    "messages": [{"role": "user", "content": "Summarize: the mesh routes each request."}],
    "max_tokens": 16,
}
API_CALLS: Final[list[tuple[str, str, dict[str, Any] | None]]] = [
    ("POST", "/v1/chat/completions", CHAT),
    ("POST", "/v1/chat/completions", {**CHAT, "stream": True}),
    ("POST", "/v1/completions", {"model": "qg://task=summarize", "prompt": "hi", "max_tokens": 8}),
    ("POST", "/v1/embeddings", {"model": "qg://task=embed", "input": "hello"}),
    ("POST", "/qg/v1/route", {"dsn": "qg://task=summarize", "tokens_in": 10, "max_tokens": 10}),
    ("POST", "/v1/memory/documents", {"text": "Alice knows Bob.", "title": "note"}),
    ("POST", "/v1/memory/query", {"question": "Who knows Bob?", "limit": 3}),
    ("POST", "/api/sessions/kill", {"target": "nobody"}),
    ("POST", "/api/daemons/{}/v1/chat/completions", CHAT),
    *((method, path, None) for method, path in ENDPOINTS),
]


def _call(base: dict[str, Any], overrides: dict[str, Any], dropped: list[str]) -> dict[str, Any]:
    body = {**base, **overrides}
    for name in dropped:
        body.pop(name, None)
    return body


@st.composite
def api_requests(draw: st.DrawFn) -> HttpRequest:
    """A well-formed request to one of the Gate's routes, mostly with the
    application's key and a body close to a valid one: a few fields
    replaced (wrong types, huge numbers, odd DSNs) or missing, so the
    handlers' own checks are what has to hold."""
    method, path, base = draw(st.sampled_from(API_CALLS))
    body: Payload
    if base is not None and draw(st.integers(0, 7)) > 0:
        overrides = draw(st.dictionaries(st.sampled_from(CHAT_KEYS), api_values, max_size=3))
        dropped = draw(st.lists(st.sampled_from(sorted(base)), max_size=1))
        body = _call(base, overrides, dropped)
    else:
        body = draw(http_bodies)
    bearer = draw(st.one_of(st.just(APP_BEARER), st.just(APP_BEARER), bearers))
    return HttpRequest(
        method.encode(),
        _target(path, draw(path_params), draw(queries)),
        b"HTTP/1.1",
        bearer,
        draw(benign_headers),
        (),
        body,
        draw(st.sampled_from(["length", "length", "length", "chunked", "pipelined"])),
    )


# Requests that break HTTP itself.
methods = st.one_of(
    st.sampled_from([b"GET", b"POST", b"DELETE", b"PUT", b"PATCH", b"HEAD", b"OPTIONS"]),
    st.text(alphabet=TCHARS, min_size=1, max_size=12).map(str.encode),
    st.binary(min_size=1, max_size=8),
)
targets = st.one_of(
    endpoints().map(lambda e: e[1]),
    st.text(max_size=30).map(lambda t: t.encode("utf-8", "replace")),
    st.sampled_from([b"*", b"http://gate/healthz", b"//", b"/%00", b"/\xff", b""]),
    st.integers(1, 100_000).map(lambda n: b"/" + b"a" * n),
)
versions = st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1x", b""])
odd_headers = st.lists(
    st.one_of(
        st.tuples(st.just(b"x-big"), st.integers(1, 100_000).map(lambda n: b"v" * n)),
        st.tuples(st.just(b"connection"), st.sampled_from([b"close", b"keep-alive", b"upgrade"])),
        st.tuples(st.just(b"expect"), st.just(b"100-continue")),
        st.tuples(st.just(b"content-length"), st.sampled_from([b"0", b"-5", b"1e3", b""])),
        st.tuples(st.just(b"transfer-encoding"), st.sampled_from([b"gzip", b"chunked, chunked"])),
    ),
    max_size=3,
).map(tuple)
raw_header_lines = st.one_of(
    st.just(()),
    st.lists(
        st.one_of(
            st.sampled_from([b"no colon", b" folded: x", b"bad name: v", b"x:\x00y", b":"]),
            st.binary(max_size=30).filter(lambda b: b"\r" not in b and b"\n" not in b),
        ),
        min_size=1,
        max_size=2,
    ).map(tuple),
    st.integers(100, 400).map(lambda n: tuple(b"h%d: v" % i for i in range(n))),
)
malformed = st.builds(
    HttpRequest,
    method=methods,
    target=targets,
    version=versions,
    bearer=bearers,
    headers=st.tuples(benign_headers, odd_headers).map(lambda h: h[0] + h[1]),
    raw_lines=raw_header_lines,
    body=http_bodies,
    framing=st.sampled_from(
        ["length", "none", "chunked", "bad chunks", "longer", "shorter", "huge", "garbage"]
    ),
)

http_attacks: st.SearchStrategy[Attack] = st.one_of(api_requests(), api_requests(), malformed)


def _api(path: str, body: dict[str, Any]) -> HttpRequest:
    return HttpRequest(b"POST", path.encode(), b"HTTP/1.1", APP_BEARER, (), (), body, "length")


# Run first, every time. The HEAD ones found a bug: every answer to a HEAD
# request was written with its body, which h11 refuses (a 500 and an ERROR
# traceback, for anyone, without a key).
HTTP_REGRESSIONS: Final[list[Attack]] = [
    HttpRequest(b"HEAD", b"/healthz", b"HTTP/1.1", None, (), (), b"", "length"),
    HttpRequest(b"HEAD", b"/v1/models", b"HTTP/1.1", APP_BEARER, (), (), b"", "none"),
    HttpRequest(b"HEAD", b"/nowhere", b"HTTP/1.1", None, (), (), b"", "length"),
    _api("/v1/chat/completions", {**CHAT, "max_tokens": 2**63}),
    _api("/v1/chat/completions", {**CHAT, "temperature": float("inf")}),
    _api("/v1/memory/query", {"question": "who?", "limit": 10**400}),
    _api("/v1/memory/query", {"question": "who?", "limit": float("inf")}),
    _api("/v1/memory/documents", {"text": "x", "id": 10**400}),
    # Token counts past a float's range overflowed the router's cost
    # arithmetic (a 500 and a traceback); now a 400.
    _api("/qg/v1/route", {"dsn": "qg://task=summarize", "tokens_in": 10**400}),
    _api("/qg/v1/route", {"dsn": "qg://task=summarize", "max_tokens": 10**400}),
    _api("/v1/chat/completions", {**CHAT, "max_tokens": 10**400}),
    _api("/v1/completions", {"model": "qg://task=summarize", "max_completion_tokens": 2**1100}),
]


async def test_hostile_http_clients(nursery: trio.Nursery, tmp_path: Path) -> None:
    with errors_logged() as errors:
        target = await start_target(nursery, tmp_path, errors)
        await trio.to_thread.run_sync(
            run_examples,
            target,
            http_attacks,
            HTTP_EXAMPLES,
            HTTP_REGRESSIONS,
        )
    print(target.report("HTTP"))
    assert sum(target.sent.values()) >= HTTP_EXAMPLES


# -- strategies: tunnel -------------------------------------------------------------------------

stream_ids = st.one_of(st.sampled_from([0, 1, 2, 3, 5, 7, 9]), st.integers(0, 2**32 - 1))
SERVICES: Final = ["forward", "pg", "pg-cancel", "llm", "inventory", "", "nope"]
open_requests = st.one_of(
    st.just({"service": "forward", "target": ECHO}),
    dicts_with(
        ["target", "version", "params", "pid", "secret", "app", "database", "user"],
        st.one_of(
            st.sampled_from([ECHO, "127.0.0.1:1", "localhost:22", "[::1]:80", "a:b:c", ""]),
            json_values,
            st.lists(st.lists(st.text(max_size=10), min_size=2, max_size=2), max_size=4),
        ),
    ).flatmap(
        lambda fields: st.one_of(st.sampled_from(SERVICES), st.text(max_size=12)).map(
            lambda service: {"service": service, **fields}
        )
    ),
    json_values.map(lambda v: {"service": v}),
)
open_payloads: st.SearchStrategy[Payload] = st.one_of(
    open_requests,
    json_values.map(lambda v: json.dumps(v).encode()),
    raw_json,
    st.binary(max_size=64),
    st.integers(16 * 1024, 20 * 1024).map(lambda n: b'{"service": "' + b"x" * n + b'"}'),
)
blobs = st.builds(Blob, st.sampled_from([300_000, 1_048_577, 2_000_000]), st.integers(0, 9))


def frames_of(
    types: st.SearchStrategy[int], payloads: st.SearchStrategy[Payload]
) -> st.SearchStrategy[tuple[int, int, Payload]]:
    return st.tuples(types, stream_ids, payloads)


def packed(fmt: str, values: st.SearchStrategy[int]) -> st.SearchStrategy[Payload]:
    return st.one_of(values.map(struct.Struct(fmt).pack), st.binary(max_size=12))


frames = st.one_of(
    frames_of(st.just(FrameType.OPEN), open_payloads),
    frames_of(st.just(FrameType.DATA), st.one_of(st.binary(max_size=2048), blobs)),
    frames_of(st.just(FrameType.CLOSE), st.one_of(st.just(b""), st.binary(max_size=8))),
    frames_of(st.just(FrameType.RESET), st.binary(max_size=40)),
    frames_of(
        st.just(FrameType.WINDOW),
        packed(
            ">I", st.one_of(st.sampled_from([0, 1, 2**31, 2**32 - 1]), st.integers(0, 2**32 - 1))
        ),
    ),
    frames_of(
        st.just(FrameType.ACK),
        packed(">Q", st.one_of(st.sampled_from([0, 1, 2**64 - 1]), st.integers(0, 2**64 - 1))),
    ),
    frames_of(st.sampled_from([FrameType.PING, FrameType.PONG]), st.binary(max_size=12)),
    frames_of(st.just(FrameType.GOAWAY), st.binary(max_size=40)),
    frames_of(st.one_of(st.integers(0x06, 0x0F), st.integers(0x14, 0x1F)), st.binary(max_size=16)),
)
# An OPEN of the echo service, data for it, and a CLOSE, as often as not:
# the paths behind a stream that works.
echo_sequences = st.tuples(
    st.sampled_from([1, 3, 5]), st.lists(st.binary(max_size=512), max_size=3)
).map(
    lambda spec: (
        (FrameType.OPEN, spec[0], {"service": "forward", "target": ECHO}),
        *((FrameType.DATA, spec[0], d) for d in spec[1]),
        (FrameType.CLOSE, spec[0], b""),
    )
)


def _stream(
    request: st.SearchStrategy[Payload], data: st.SearchStrategy[Payload]
) -> st.SearchStrategy[tuple[tuple[int, int, Payload], ...]]:
    """OPEN ``request`` on an odd stream id, DATA frames, maybe a CLOSE."""
    return st.tuples(
        st.sampled_from([1, 3, 5]), request, st.lists(data, max_size=3), st.booleans()
    ).map(
        lambda spec: (
            (FrameType.OPEN, spec[0], spec[1]),
            *((FrameType.DATA, spec[0], d) for d in spec[2]),
            *([(FrameType.CLOSE, spec[0], b"")] if spec[3] else []),
        )
    )


def _pg_message(tag: int, body: bytes, lie: int | None) -> bytes:
    return bytes([tag]) + struct.pack(">I", len(body) + 4 if lie is None else lie) + body


PG_STARTUP: Final = {
    "service": "pg",
    "version": 196608,
    "params": [["user", "app-1"], ["database", "db"]],
}
# A Postgres client's side of a login, hostile: the Gate answers with
# AuthenticationSASL and parses what comes back.
pg_data = st.one_of(
    st.builds(
        _pg_message,
        st.sampled_from(list(b"pQXSPBEpd")),
        st.one_of(
            st.binary(max_size=64),
            st.just(b"SCRAM-SHA-256\x00\x00\x00\x00\x20n,,n=,r=" + b"a" * 24),
        ),
        st.one_of(st.none(), st.sampled_from([0, 3, 4, 2**31 - 1, 2**32 - 1])),
    ),
    st.binary(max_size=128),
)
# The application API through an edge: HTTP on an ``llm`` stream.
llm_streams = _stream(st.just({"service": "llm"}), api_requests())
pg_streams = _stream(
    st.one_of(
        st.just(PG_STARTUP),
        dicts_with(["version", "params"], json_values).map(lambda f: {**PG_STARTUP, **f}),
    ),
    pg_data,
)

tunnel_attacks: st.SearchStrategy[Attack] = st.one_of(
    st.builds(
        RawPreamble,
        st.one_of(
            st.binary(max_size=64),
            st.builds(
                lambda v, rest: b"QMSH" + bytes([v, 0, 0, 0]) + rest,
                st.integers(0, 255),
                st.binary(max_size=64),
            ),
        ),
    ),
    st.builds(
        RandomMessage,
        st.one_of(st.none(), st.integers(0, 65535)),
        st.one_of(st.binary(max_size=200), st.builds(Blob, st.integers(0, 70_000), st.just(0))),
    ),
    st.builds(
        StrangerHello,
        st.binary(min_size=32, max_size=32),
        st.one_of(
            hello_fields,
            raw_json,
            st.binary(max_size=256),
        ),
        st.one_of(
            st.none(),
            st.tuples(
                st.sampled_from(["flip", "cut", "short"]),
                st.integers(0, 2**16),
                st.integers(0, 255),
            ),
        ),
    ),
    st.builds(
        EnrolledHello,
        st.one_of(st.none(), hello_fields, hello_fields, hello_fields),
        st.one_of(raw_json.map(lambda b: b[:MAX_NOISE_PAYLOAD]), st.binary(max_size=128)),
    ),
    st.builds(
        SealedFrames,
        st.one_of(
            st.lists(frames, max_size=8).map(tuple),
            st.tuples(
                st.one_of(echo_sequences, llm_streams, pg_streams), st.lists(frames, max_size=4)
            ).map(lambda parts: (*parts[0], *parts[1])),
        ),
        st.none(),
    ),
    st.builds(
        SealedFrames,
        st.lists(frames, max_size=2).map(tuple),
        st.one_of(
            st.binary(min_size=1, max_size=256),
            # A frame header announcing 16 MiB, then silence.
            st.just(bytes([1, 0x02, 0, 0]) + bytes(12) + struct.pack(">I", 16 << 20)),
        ),
    ),
)


# Run first, every time. The pg-cancel ones found a bug: PgService.cancel
# did not catch the OverflowError of ``int(Infinity)``.
TUNNEL_REGRESSIONS: Final[list[Attack]] = [
    _opening(b'{"service": "pg-cancel", "pid": Infinity, "secret": "00000000"}'),
    _opening(b'{"service": "pg-cancel", "pid": -1e999, "secret": "00000000"}'),
    _opening(b'{"service": "pg", "version": 1e999}'),
]


async def test_hostile_tunnel_clients(nursery: trio.Nursery, tmp_path: Path) -> None:
    with errors_logged() as errors:
        target = await start_target(nursery, tmp_path, errors)
        await trio.to_thread.run_sync(
            run_examples,
            target,
            tunnel_attacks,
            TUNNEL_EXAMPLES,
            TUNNEL_REGRESSIONS,
        )
    print(target.report("tunnel"))
    assert sum(target.sent.values()) >= TUNNEL_EXAMPLES
