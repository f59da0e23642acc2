"""The tunnel listener as a boundary: hostile input ends one connection or
stream, never the Gate, and every resource a peer can claim is bounded.

Loopback only, ephemeral ports; each test waits on a condition, never on time.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
from tunnelkit import (
    echo_service,
    fast_settings,
    keypair,
    make_edge,
    raw_handshake,
    roundtrip,
    start_edge,
    start_gate,
    until,
    wait_closed,
)

from qmesh.tunnel import HandshakeRefused, StreamReset, TunnelServer, TunnelStream
from qmesh.tunnel import session as session_module
from qmesh.tunnel.handshake import clock_ns


def hello(**fields: Any) -> bytes:
    values: dict[str, Any] = {
        "v": 1, "role": "minigate", "name": "x", "session": None, "recv_next": 0, "ts": clock_ns()
    }  # fmt: skip
    values.update(fields)
    return json.dumps(values).encode()


async def test_a_stranger_with_a_deeply_nested_hello_cannot_crash_the_gate(
    nursery: trio.Nursery,
) -> None:
    gate = await start_gate(nursery)
    stranger, _ = keypair()  # anyone: the Gate's public key is all it takes
    with trio.fail_after(10):
        transport, _ = await raw_handshake(gate.port, gate.public, stranger, b"[" * 16_000)
        await wait_closed(transport)
        await until(lambda: gate.server.handshake_failures == 1)
        edge = await start_edge(nursery, gate, "edge-a")
        stream = await edge.open_stream({"service": "echo"})
        assert await roundtrip(stream, b"still here") == b"still here"


@pytest.mark.parametrize(
    "fields",
    [
        {"recv_next": 2**64},
        {"recv_next": -1},
        {"ts": 2**64},
        {"session": "zz" * 16},
        {"session": "00" * 4096},
        {"name": ["a"]},
        {"role": "x" * 10_000},
    ],
    ids=[
        "recv_next-2^64",
        "recv_next-negative",
        "ts-2^64",
        "session-not-hex",
        "session-huge",
        "name-not-text",
        "role-huge",
    ],
)
async def test_an_enrolled_edge_with_a_bad_hello_loses_only_that_handshake(
    nursery: trio.Nursery, fields: dict[str, Any]
) -> None:
    gate = await start_gate(nursery)
    private, _ = gate.registry.enroll("edge-a")
    edge = await start_edge(nursery, gate, "edge-a", private_key=private)
    with trio.fail_after(10):
        stream = await edge.open_stream({"service": "echo"})
        await edge.wait_connected()
        session = edge.session
        assert session is not None
        (gate_session,) = gate.server.sessions.values()
        # A resume HELLO naming the live session, with one field out of range.
        bad = hello(**{"name": "edge-a", "session": session.id.hex(), **fields})
        transport, _ = await raw_handshake(gate.port, gate.public, private, bad)
        await wait_closed(transport)
        await until(lambda: gate.server.handshake_failures == 1)
        assert gate_session.attached and gate_session.connections == 1
        assert session.attached and edge.connects == 1
        assert await roundtrip(stream, b"unharmed") == b"unharmed"


async def test_a_deeply_nested_open_resets_only_its_stream(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = await start_gate(nursery)
    edge = await start_edge(nursery, gate, "edge-a")
    with trio.fail_after(10):
        good = await edge.open_stream({"service": "echo"})
        with monkeypatch.context() as patch:
            patch.setattr(session_module, "encode_open", lambda request: b"[" * 16_000)
            hostile = await edge.open_stream({"service": "echo"})
        with pytest.raises(StreamReset, match="nested too deep"):
            await hostile.receive_some()
        assert await roundtrip(good, b"unharmed") == b"unharmed"
        assert len(gate.server.sessions) == 1


UNEXPECTED = [
    RecursionError("deep"),
    KeyError("missing"),
    AssertionError("broken invariant"),
    OverflowError("int too big"),
    ExceptionGroup("several", [ValueError("a"), TypeError("b")]),
]


@pytest.mark.parametrize("error", UNEXPECTED, ids=lambda e: type(e).__name__)
async def test_an_unexpected_error_in_the_handshake_ends_only_that_connection(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    gate = await start_gate(nursery)
    decide = TunnelServer._decide

    async def failing_for_victim(self: TunnelServer, edge_key: bytes, hello: Any, fd: int) -> Any:
        if hello.name == "victim":
            raise error
        return await decide(self, edge_key, hello, fd)

    monkeypatch.setattr(TunnelServer, "_decide", failing_for_victim)
    private, _ = gate.registry.enroll("victim")
    with trio.fail_after(10):
        victim = make_edge(gate, "victim", private_key=private)
        nursery.start_soon(victim.run)
        await until(lambda: gate.server.connection_errors >= 1)
        other = await start_edge(nursery, gate, "other")
        stream = await other.open_stream({"service": "echo"})
        assert await roundtrip(stream, b"served") == b"served"


@pytest.mark.parametrize("error", UNEXPECTED, ids=lambda e: type(e).__name__)
async def test_an_unexpected_error_handling_frames_ends_only_that_session(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    gate = await start_gate(nursery)
    on_data = TunnelStream.on_data

    def failing_at_the_gate(self: TunnelStream, payload: bytes) -> bool:
        session = self.session
        assert isinstance(session, session_module.Session)
        if not session.initiator and payload == b"poison":
            raise error
        return on_data(self, payload)

    monkeypatch.setattr(TunnelStream, "on_data", failing_at_the_gate)
    with trio.fail_after(10):
        victim = await start_edge(nursery, gate, "victim")
        other = await start_edge(nursery, gate, "other")
        bystander = await other.open_stream({"service": "echo"})
        poisoned = await victim.open_stream({"service": "echo"})
        (victim_session,) = gate.server.sessions_of("victim")
        await poisoned.send_all(b"poison")
        await until(lambda: victim_session.lost)
        with pytest.raises(StreamReset, match="internal error"):
            await poisoned.receive_some()
        assert await roundtrip(bystander, b"unharmed") == b"unharmed"
        # The victim edge recovers with a fresh session.
        await until(lambda: victim.session is not None and victim.session.id != victim_session.id)
        fresh = await victim.open_stream({"service": "echo"})
        assert await roundtrip(fresh, b"again") == b"again"


@pytest.mark.parametrize("error", UNEXPECTED, ids=lambda e: type(e).__name__)
async def test_an_unexpected_error_in_a_service_resets_only_its_stream(
    nursery: trio.Nursery, error: Exception
) -> None:
    async def broken(stream: TunnelStream) -> None:
        raise error

    gate = await start_gate(nursery, {"echo": echo_service, "broken": broken})
    edge = await start_edge(nursery, gate, "edge-a")
    with trio.fail_after(10):
        stream = await edge.open_stream({"service": "broken"})
        with pytest.raises(StreamReset, match="the service failed"):
            await stream.receive_some()
        good = await edge.open_stream({"service": "echo"})
        assert await roundtrip(good, b"unharmed") == b"unharmed"


async def test_streams_per_session_are_capped(nursery: trio.Nursery) -> None:
    held = trio.Event()

    async def hold(stream: TunnelStream) -> None:
        await held.wait()

    gate = await start_gate(
        nursery, {"echo": echo_service, "hold": hold}, fast_settings(max_streams_per_session=2)
    )
    edge = await start_edge(nursery, gate, "edge-a")
    with trio.fail_after(10):
        first = await edge.open_stream({"service": "hold"})
        second = await edge.open_stream({"service": "hold"})
        third = await edge.open_stream({"service": "echo"})
        with pytest.raises(StreamReset, match="too many open streams"):
            await third.receive_some()
        held.set()
        await first.aclose()
        await second.aclose()
        session = edge.session
        assert session is not None
        (gate_session,) = gate.server.sessions.values()
        await until(lambda: gate_session.stream_count == 0)
        again = await edge.open_stream({"service": "echo"})
        assert await roundtrip(again, b"room again") == b"room again"


async def test_sessions_per_identity_are_capped(nursery: trio.Nursery) -> None:
    gate = await start_gate(nursery, settings=fast_settings(max_sessions_per_identity=1))
    private, _ = gate.registry.enroll("edge-a")
    first = await start_edge(nursery, gate, "edge-a", private_key=private)
    await first.wait_connected()
    assert first.session is not None
    second = make_edge(gate, "edge-a", private_key=private)
    with trio.fail_after(10), pytest.raises(HandshakeRefused) as info:
        await second.run()
    assert info.value.code == "too_many_sessions"
    assert [s.id for s in gate.server.sessions_of("edge-a")] == [first.session.id]


async def test_a_detached_session_makes_room_for_a_new_one(nursery: trio.Nursery) -> None:
    gate = await start_gate(nursery, settings=fast_settings(max_sessions_per_identity=1))
    private, _ = gate.registry.enroll("edge-a")
    with trio.fail_after(10):
        async with trio.open_nursery() as first_run:
            first = await start_edge(first_run, gate, "edge-a", private_key=private)
            await first.wait_connected()
            assert first.session is not None
            old = first.session.id
            first_run.cancel_scope.cancel()
        # The edge process "restarted"; once the Gate has seen its old
        # connection go, that session is detached (or gone) and gives way.
        await until(lambda: not any(s.attached for s in gate.server.sessions_of("edge-a")))
        second = await start_edge(nursery, gate, "edge-a", private_key=private)
        await second.wait_connected()
        assert second.session is not None and second.session.id != old
        assert [s.id for s in gate.server.sessions_of("edge-a")] == [second.session.id]


async def test_handshakes_in_flight_are_capped(nursery: trio.Nursery) -> None:
    gate = await start_gate(nursery, settings=fast_settings(max_handshakes_in_flight=2))
    with trio.fail_after(10):
        silent = [await trio.open_tcp_stream("127.0.0.1", gate.port) for _ in range(2)]
        await until(lambda: gate.server._handshakes_in_flight == 2)
        shed = await trio.open_tcp_stream("127.0.0.1", gate.port)
        await wait_closed(shed)  # closed at once, long before the handshake timeout
        assert gate.server.handshakes_shed == 1
        for transport in silent:
            await transport.aclose()
        await until(lambda: gate.server._handshakes_in_flight == 0)
        edge = await start_edge(nursery, gate, "edge-a")
        stream = await edge.open_stream({"service": "echo"})
        assert await roundtrip(stream, b"admitted") == b"admitted"


async def test_services_are_open_by_role(nursery: trio.Nursery) -> None:
    private, public = keypair()
    gate = await start_gate(nursery)
    gate.server._services_by_role = {"minigate": frozenset({"echo"}), "daemon": frozenset()}
    gate.registry.edges[public] = ("gpu-1", "daemon")
    daemon = make_edge(gate, "gpu-1", private_key=private)
    await nursery.start(daemon.run)
    edge = await start_edge(nursery, gate, "edge-a")
    with trio.fail_after(10):
        refused = await daemon.open_stream({"service": "echo"})
        with pytest.raises(StreamReset, match="'echo' is not open to daemon edges"):
            await refused.receive_some()
        allowed = await edge.open_stream({"service": "echo"})
        assert await roundtrip(allowed, b"minigate") == b"minigate"


async def test_a_peer_that_answers_pings_but_never_acknowledges_loses_its_session(
    nursery: trio.Nursery,
) -> None:
    """A hostile edge that keeps the connection alive (PONG for every PING)
    but never acknowledges a frame would make the Gate retain them forever:
    it loses its session after ``dead_after_s`` without an acknowledgement."""
    from qmesh.tunnel import handshake
    from qmesh.tunnel.frames import FrameType

    gate = await start_gate(nursery)
    private, _ = gate.registry.enroll("no-acks")
    transport = await trio.open_tcp_stream("127.0.0.1", gate.port)
    hello = handshake.Hello(
        role="minigate", name="no-acks", session_id=None, recv_next=0, timestamp=clock_ns()
    )
    noise, _, leftover = await handshake.initiate(
        transport, local_private=private, gate_public=gate.public, hello=hello
    )
    encoder, decoder = noise.into_codec()
    decoder.feed(leftover)
    # One echo stream with a little data: the Gate's echo is reliable and
    # stays retained, since this peer sends no ACK (and never WINDOW either).
    await transport.send_all(
        encoder.encode(FrameType.OPEN, 1, b'{"service":"echo"}')
        + encoder.encode(FrameType.DATA, 1, b"ping me back")
    )
    (session,) = gate.server.sessions_of("no-acks")
    pongs = 0
    with trio.fail_after(20):
        while not session.lost:
            data = await transport.receive_some(65536)
            if not data:
                break
            decoder.feed(data)
            for frame_type, _stream, _seq, _flags, payload in decoder.next_frames():
                if frame_type == FrameType.PING:
                    pongs += 1
                    await transport.send_all(encoder.encode(FrameType.PONG, 0, payload))
        await until(lambda: session.lost)
    assert pongs >= 1  # it was alive the whole time, never silent
    assert gate.server.sessions_of("no-acks") == []
    await transport.aclose()


async def _welcome_for(gate: Any, private: bytes, preamble: bytes) -> dict[str, Any]:
    """The Gate's decrypted reply to a HELLO sent after ``preamble``."""
    from qmesh import _core

    noise = _core.NoiseHandshake.initiator(private, gate.public, preamble)
    message = noise.write_message(hello(name="edge-a"))
    transport = await trio.open_tcp_stream("127.0.0.1", gate.port)
    async with transport:
        await transport.send_all(preamble + len(message).to_bytes(2, "big") + message)
        received = b""
        while len(received) < 2 or len(received) < 2 + int.from_bytes(received[:2], "big"):
            data = await transport.receive_some(65536)
            assert data, "the Gate closed without a WELCOME"
            received += data
    reply: dict[str, Any] = json.loads(noise.read_message(received[2:]))
    return reply


async def test_versions_are_negotiated_and_a_mismatch_is_named(nursery: trio.Nursery) -> None:
    from qmesh.tunnel.handshake import NEWEST_VERSION, OLDEST_VERSION

    gate = await start_gate(nursery)
    private, _ = gate.registry.enroll("edge-a")
    with trio.fail_after(10):
        # An edge newer than the Gate that still speaks the Gate's version: accepted at it.
        newer = await _welcome_for(
            gate, private, b"QMSH" + bytes([NEWEST_VERSION + 1, NEWEST_VERSION, 0, 0])
        )
        assert newer["ok"] and newer["v"] == NEWEST_VERSION
        # An edge from before the oldest-version byte (0 there): its only version.
        legacy = await _welcome_for(gate, private, b"QMSH" + bytes([NEWEST_VERSION, 0, 0, 0]))
        assert legacy["ok"] and legacy["v"] == NEWEST_VERSION
        too_new = await _welcome_for(
            gate, private, b"QMSH" + bytes([NEWEST_VERSION + 2, NEWEST_VERSION + 2, 0, 0])
        )
        assert not too_new["ok"] and too_new["code"] == "version"
        assert too_new["error"] == (
            f"this Gate speaks tunnel protocol versions {OLDEST_VERSION}-{NEWEST_VERSION}, the "
            f"edge {NEWEST_VERSION + 2}-{NEWEST_VERSION + 2}: upgrade the Gate (Gates first, "
            "then edges)"
        )
        too_old = await _welcome_for(gate, private, b"QMSH" + bytes([0, 0, 0, 0]))
        assert not too_old["ok"] and "upgrade the edge" in too_old["error"]
        # The refusals cost the edge nothing else: it connects as usual.
        edge = await start_edge(nursery, gate, "edge-a", private_key=private)
        stream = await edge.open_stream({"service": "echo"})
        assert await roundtrip(stream, b"v") == b"v"
        assert edge.session is not None and edge.session.protocol_version == NEWEST_VERSION
