"""The tunnel over real loopback sockets: streams, flow control, identity, resumption."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import struct
from collections.abc import Callable

import attrs
import pytest
import trio
from faultproxy import FaultProxy, Faults
from processkit import free_port
from tunnelkit import (
    echo_service,
    fast_settings,
    keypair,
    make_edge,
    roundtrip,
    start_edge,
    start_gate,
    until,
)

from qmesh import _core
from qmesh.tunnel import HandshakeRefused, StreamReset, TunnelStream
from qmesh.tunnel.frames import INITIAL_WINDOW
from qmesh.tunnel.session import Session


async def test_streams_echo_and_close_cleanly(nursery: trio.Nursery) -> None:
    gate = await start_gate(nursery)
    edge = await start_edge(nursery, gate, "edge-a")
    with trio.fail_after(10):
        payloads = [b"", b"x", os.urandom(70_000), b"json " * 100_000]
        streams = [await edge.open_stream({"service": "echo"}) for _ in payloads]
        results: dict[int, bytes] = {}

        async def run(i: int) -> None:
            results[i] = await roundtrip(streams[i], payloads[i])
            await streams[i].aclose()

        async with trio.open_nursery() as inner:
            for i in range(len(payloads)):
                inner.start_soon(run, i)
    assert [results[i] for i in range(len(payloads))] == payloads
    session = edge.session
    assert session is not None
    (gate_session,) = gate.server.sessions.values()
    # The Gate forgets a stream when the edge's close reaches it.
    with trio.fail_after(5):
        await until(lambda: session.stream_count == 0 and gate_session.stream_count == 0)


async def test_unknown_service_is_reset(nursery: trio.Nursery) -> None:
    gate = await start_gate(nursery)
    edge = await start_edge(nursery, gate, "edge-a")
    stream = await edge.open_stream({"service": "nope"})
    with trio.fail_after(5), pytest.raises(StreamReset, match="unknown service 'nope'"):
        await stream.receive_some()


async def test_slow_consumer_stalls_only_its_own_stream(nursery: trio.Nursery) -> None:
    never_read = trio.Event()

    async def hold(stream: TunnelStream) -> None:
        await never_read.wait()

    gate = await start_gate(nursery, {"echo": echo_service, "hold": hold})
    edge = await start_edge(nursery, gate, "edge-a")
    stalled = await edge.open_stream({"service": "hold"})
    sent = 0

    async def flood() -> None:
        nonlocal sent
        chunk = os.urandom(16384)
        while True:
            await stalled.send_all(chunk)
            sent += len(chunk)

    nursery.start_soon(flood)
    window = gate.server.settings.stream_window
    with trio.fail_after(5):
        await until(lambda: sent >= window)
    # The sender is blocked by the receiver's window, not by the connection:
    # another stream flows, and all the while the flood stays where it stopped.
    assert sent <= window + 16384 * 2
    other = await edge.open_stream({"service": "echo"})
    with trio.fail_after(5):
        assert await roundtrip(other, b"still flowing" * 1000) == b"still flowing" * 1000
    assert window <= sent <= window + 16384 * 2
    never_read.set()


async def test_unenrolled_edge_is_refused(nursery: trio.Nursery) -> None:
    gate = await start_gate(nursery)
    stranger, _ = keypair()
    edge = make_edge(gate, "stranger", private_key=stranger)
    with trio.fail_after(5), pytest.raises(HandshakeRefused) as info:
        await edge.run()
    assert info.value.code == "not_enrolled"
    assert not gate.server.sessions


async def test_revoked_edge_is_refused_at_next_handshake(nursery: trio.Nursery) -> None:
    gate = await start_gate(nursery)
    proxy = FaultProxy(("127.0.0.1", gate.port), Faults())
    proxy_port = await nursery.start(proxy.serve)
    edge = make_edge(gate, "edge-r", port=proxy_port)
    refusal: HandshakeRefused | None = None

    async def run_edge() -> None:
        nonlocal refusal
        with pytest.raises(HandshakeRefused) as info:
            await edge.run()
        refusal = info.value

    with trio.fail_after(10):
        async with trio.open_nursery() as inner:
            inner.start_soon(run_edge)
            stream = await edge.open_stream({"service": "echo"})
            assert await roundtrip(stream, b"before") == b"before"
            gate.registry.revoked.add("edge-r")
            proxy.reset_all()  # the edge reconnects, and must be refused
    assert refusal is not None and refusal.code == "revoked"
    assert not gate.server.sessions_of("edge-r") or all(
        s.lost or not s.attached for s in gate.server.sessions_of("edge-r")
    )


async def test_wrong_gate_key_never_connects(nursery: trio.Nursery) -> None:
    gate = await start_gate(nursery)
    private, _ = gate.registry.enroll("edge-w")
    _, wrong_public = keypair()
    edge = await start_edge(nursery, gate, "edge-w", private_key=private, gate_public=wrong_public)
    with trio.fail_after(10):  # it keeps trying, with backoff
        await until(lambda: gate.server.handshake_failures >= 2)
    assert not edge.connected
    assert not gate.server.sessions


async def test_garbage_and_silence_do_not_hurt_the_gate(nursery: trio.Nursery) -> None:
    gate = await start_gate(nursery, settings=fast_settings(handshake_timeout_s=0.5))
    edge = await start_edge(nursery, gate, "edge-ok")
    garbage = await trio.open_tcp_stream("127.0.0.1", gate.port)
    await garbage.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    silent = await trio.open_tcp_stream("127.0.0.1", gate.port)
    with trio.fail_after(5):
        assert await garbage.receive_some() == b""  # closed by the gate
        assert await silent.receive_some() == b""  # handshake timeout
    stream = await edge.open_stream({"service": "echo"})
    assert await roundtrip(stream, b"fine") == b"fine"


async def test_session_resumes_after_connection_reset(nursery: trio.Nursery) -> None:
    gate = await start_gate(nursery)
    proxy = FaultProxy(("127.0.0.1", gate.port), Faults(reset_every=200_000))
    proxy_port = await nursery.start(proxy.serve)
    edge = await start_edge(nursery, gate, "edge-s", port=proxy_port)
    payload = os.urandom(3_000_000)
    stream = await edge.open_stream({"service": "echo"})
    with trio.fail_after(60):
        echoed = await roundtrip(stream, payload)
    assert echoed == payload
    assert proxy.resets >= 10
    assert edge.resumptions >= 10 and edge.sessions_lost == 0
    assert gate.server.resumptions == edge.resumptions


async def test_an_edge_shutting_down_ends_its_session_at_the_gate(nursery: trio.Nursery) -> None:
    """A cancelled edge says GOAWAY: the Gate forgets the session at once
    instead of keeping it detached for the resume grace."""
    gate = await start_gate(nursery, settings=fast_settings(resume_grace_s=3600.0))
    edge = make_edge(gate, "leaving")
    scope = trio.CancelScope()

    async def run_edge() -> None:
        with scope:
            await edge.run()

    nursery.start_soon(run_edge)
    with trio.fail_after(10):
        await edge.wait_connected()
        assert [s.peer for s in gate.server.sessions.values()] == ["leaving"]
        scope.cancel()
        await until(lambda: not gate.server.sessions)


async def test_silent_peer_is_detected_and_the_session_resumes(nursery: trio.Nursery) -> None:
    settings = fast_settings(heartbeat_interval_s=0.2, dead_after_s=0.8)
    gate = await start_gate(nursery, settings=settings)
    proxy = FaultProxy(("127.0.0.1", gate.port), Faults())
    proxy_port = await nursery.start(proxy.serve)
    edge = await start_edge(nursery, gate, "edge-p", port=proxy_port, settings=settings)
    stream = await edge.open_stream({"service": "echo"})
    await stream.send_all(b"before ")
    assert await stream.receive_some() == b"before "
    proxy.blackhole_all()  # packets vanish; nobody closes anything
    await stream.send_all(b"during the partition")
    with trio.fail_after(5):
        received = b""
        while received != b"during the partition":
            received += await stream.receive_some()
    assert edge.resumptions == 1 and edge.sessions_lost == 0


async def beating(nursery: trio.Nursery, name: str, interval_s: float) -> tuple[Session, Session]:
    """A Gate's and an edge's ends of one session beating every
    ``interval_s``, once both have timed a heartbeat's round trip."""
    settings = fast_settings(heartbeat_interval_s=interval_s, dead_after_s=2.0)
    gate = await start_gate(nursery, settings=settings)
    edge = await start_edge(nursery, gate, name, settings=settings)
    await edge.wait_connected()
    (gate_side,) = gate.server.sessions.values()
    edge_side = edge.session
    assert edge_side is not None
    await until(lambda: gate_side.rtt is not None and edge_side.rtt is not None, timeout_s=10)
    assert edge.resumptions == 0  # beating is not resuming
    return gate_side, edge_side


async def test_both_ends_time_their_heartbeats(nursery: trio.Nursery) -> None:
    gate_side, edge_side = await beating(nursery, "edge-rtt", 0.05)
    assert 0 < (gate_side.rtt or 0) < 2 and 0 < (edge_side.rtt or 0) < 2


async def test_an_idle_session_beats_without_python(nursery: trio.Nursery) -> None:
    """Heartbeats are the engines' own: while idle, neither end's Python is
    woken to take anything, however many PINGs and PONGs go by."""
    gate_side, edge_side = await beating(nursery, "edge-idle", 0.02)
    takes = {"gate": 0, "edge": 0}
    for name, session in (("gate", gate_side), ("edge", edge_side)):

        def counted(name: str = name, take: Callable[[], None] = session._take) -> None:
            takes[name] += 1
            take()

        session._take = counted  # type: ignore[method-assign]
    received = gate_side.bytes_received, edge_side.bytes_received
    # Several beats' worth of PINGs and PONGs each way (a sealed one is 40-odd bytes).
    await until(
        lambda: (
            gate_side.bytes_received > received[0] + 600
            and edge_side.bytes_received > received[1] + 600
        ),
        timeout_s=10,
    )
    assert takes == {"gate": 0, "edge": 0}


async def test_forward_policy_and_unreachable_targets(nursery: trio.Nursery) -> None:
    from qmesh.forward.service import ForwardService

    closed_port = free_port()
    gate = await start_gate(nursery, {"forward": ForwardService([f"127.0.0.1:{closed_port}"])})
    edge = await start_edge(nursery, gate, "edge-f")
    for target, reason in [
        ("10.1.2.3:5432", "not allowed"),
        (f"127.0.0.1:{closed_port + 1}", "not allowed"),
        ("no-port", "bad forward target"),
        (f"127.0.0.1:{closed_port}", "cannot connect"),
    ]:
        stream = await edge.open_stream({"service": "forward", "target": target})
        with trio.fail_after(15), pytest.raises(StreamReset, match=reason):
            await stream.receive_some()


async def test_expired_session_resets_streams(nursery: trio.Nursery) -> None:
    settings = fast_settings(resume_grace_s=0.2)
    gate = await start_gate(nursery, settings=settings)
    proxy = FaultProxy(("127.0.0.1", gate.port), Faults())
    proxy_port = await nursery.start(proxy.serve)
    edge = await start_edge(nursery, gate, "edge-x", port=proxy_port, settings=settings)
    stream = await edge.open_stream({"service": "echo"})
    assert await roundtrip(stream, b"a") == b"a"
    stream2 = await edge.open_stream({"service": "echo"})
    await stream2.send_all(b"pending")
    session = edge.session
    assert session is not None
    with trio.fail_after(5):  # the Gate has the stream and its bytes
        await until(lambda: not session.retained_frames)
    # Keep the edge away longer than the grace period: the Gate ends the session.
    proxy.blocked = True
    proxy.reset_all()
    with trio.fail_after(10):
        await until(lambda: not gate.server.sessions)
    proxy.blocked = False
    with trio.fail_after(5), pytest.raises(StreamReset):
        while True:
            await stream2.receive_some()
    await edge.wait_connected()
    assert edge.sessions_lost == 1
    fresh = await edge.open_stream({"service": "echo"})
    assert await roundtrip(fresh, b"new session") == b"new session"


@pytest.mark.slow
async def test_100_mib_through_resets_delays_stalls_and_split_writes(
    nursery: trio.Nursery,
) -> None:
    """Acceptance: client → MiniGate forward → Gate → echo server, byte-exact
    through ≥ 50 resets, with the application's connection never failing."""
    from qmesh.forward.edge import serve_forward
    from qmesh.forward.service import ForwardService

    async def echo_tcp(sock: trio.SocketStream) -> None:
        try:
            while data := await sock.receive_some(262144):
                await sock.send_all(data)
            await sock.send_eof()
        finally:
            await sock.aclose()

    echo_listeners = await nursery.start(trio.serve_tcp, echo_tcp, 0)
    echo_port = echo_listeners[0].socket.getsockname()[1]
    target = f"127.0.0.1:{echo_port}"
    gate = await start_gate(nursery, {"forward": ForwardService([f"127.0.0.1:{echo_port}"])})
    total = 100 * 1024 * 1024
    faults = Faults(
        reset_every=3 * 1024 * 1024,
        delay=0.002,
        delay_probability=0.01,
        stall_every=8 * 1024 * 1024,
        stall_for=0.2,
        split_first=64,
    )
    proxy = FaultProxy(("127.0.0.1", gate.port), faults)
    proxy_port = await nursery.start(proxy.serve)
    edge = await start_edge(nursery, gate, "edge-big", port=proxy_port)
    local_port = await nursery.start(serve_forward, edge, "127.0.0.1:0", target)

    app = await trio.open_tcp_stream("127.0.0.1", local_port)
    sent_hash, recv_hash = hashlib.sha256(), hashlib.sha256()
    received = 0

    async def send() -> None:
        block = os.urandom(1024 * 1024)
        for i in range(total // len(block)):
            # Vary each block so a resent or duplicated block cannot hide.
            piece = i.to_bytes(8, "big") + block[8:]
            sent_hash.update(piece)
            await app.send_all(piece)
        await app.send_eof()

    async def receive() -> None:
        nonlocal received
        while data := await app.receive_some(262144):
            recv_hash.update(data)
            received += len(data)

    with trio.fail_after(600):
        async with trio.open_nursery() as inner:
            inner.start_soon(send)
            inner.start_soon(receive)
    await app.aclose()
    print(f"100 MiB echoed: {proxy.resets} resets, {edge.resumptions} resumptions")
    assert received == total
    assert recv_hash.digest() == sent_hash.digest()
    assert proxy.resets >= 50
    assert edge.sessions_lost == 0


def mute_the_gate(monkeypatch: pytest.MonkeyPatch) -> None:
    """Give the Gate's sessions an engine that never sends an ACK on its own.

    Only on its own: every frame an engine seals still carries an ACK of all
    it has received (engine.rs, ``seal``), so the Gate acknowledges the moment
    it sends anything at all.
    """
    from qmesh.tunnel import session as session_module

    original = session_module.Session._new_engine

    def mute_gate(self: session_module.Session) -> _core.TunnelEngine:
        if self.initiator:
            return original(self)
        return original(self, ack_every=2**40, ack_delay=3600.0)

    monkeypatch.setattr(session_module.Session, "_new_engine", mute_gate)


async def test_a_peer_that_never_acknowledges_loses_its_session(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qmesh.tunnel import session as session_module

    monkeypatch.setattr(session_module, "MAX_UNACKED_BYTES", 2_000_000)
    mute_the_gate(monkeypatch)
    hold = trio.Event()

    async def hold_service(stream: TunnelStream) -> None:
        await hold.wait()  # never reads, so no WINDOW frame for consumed bytes

    # The Gate must send nothing at all, since any frame would carry an ACK:
    # no heartbeat in the test's time (nor a PING from the edge to answer),
    # and streams whose window is the protocol's initial credit, so that
    # accepting one grants nothing (a larger window is granted with a WINDOW
    # frame at once). With the default 1 MiB window, this test once failed:
    # each stream the Gate accepted sent a WINDOW that acknowledged all data
    # received so far; on a busy machine the Gate took the OPENs late, that
    # ACK covered up to 7 of the 12 streams' data, the rest stayed under the
    # limit and the session, acknowledged after all, rightly lived on
    # (test_any_frame_from_the_gate_acknowledges_what_it_received).
    quiet = fast_settings(
        heartbeat_interval_s=60.0, dead_after_s=120.0, stream_window=INITIAL_WINDOW
    )
    gate = await start_gate(nursery, {"hold": hold_service}, settings=quiet)
    edge = await start_edge(nursery, gate, "edge-n", settings=quiet)
    await edge.wait_connected()
    session = edge.session
    assert session is not None
    # Now: once the edge has lost this session it starts another one.
    (gate_session,) = gate.server.sessions.values()

    async def fill(stream: TunnelStream) -> None:
        with contextlib.suppress(StreamReset):
            await stream.send_all(os.urandom(INITIAL_WINDOW))  # its whole initial credit

    # 12 × 256 KiB = 3 MiB, over the 2 MB limit with nothing acknowledged.
    streams = [await edge.open_stream({"service": "hold"}) for _ in range(12)]
    with trio.fail_after(10):
        async with trio.open_nursery() as inner:
            for stream in streams:
                inner.start_soon(fill, stream)
        await until(lambda: session.lost)
    with pytest.raises(StreamReset, match="unacknowledged"):
        await streams[0].receive_some()
    # What makes it fail every time: the Gate never wrote one frame.
    assert gate_session.bytes_sent == 0
    hold.set()


async def test_any_frame_from_the_gate_acknowledges_what_it_received(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Why that test once failed, made deterministic: an engine that never sends
    a lone ACK still acknowledges with every frame it sends, here the WINDOW
    that grants a new stream its larger window."""
    mute_the_gate(monkeypatch)
    hold = trio.Event()

    async def hold_service(stream: TunnelStream) -> None:
        await hold.wait()

    # The Gate's streams have the default window (1 MiB), larger than the
    # initial credit: it grants the rest with a WINDOW when it accepts one.
    # The edge's have just the initial credit, so that it sends OPEN and DATA
    # only (a WINDOW from the edge, sealed after the Gate's last frame, would
    # stay unacknowledged by this Gate for good).
    quiet = fast_settings(heartbeat_interval_s=60.0, dead_after_s=120.0)
    assert quiet.stream_window > INITIAL_WINDOW
    gate = await start_gate(nursery, {"hold": hold_service}, settings=quiet)
    edge_settings = attrs.evolve(quiet, stream_window=INITIAL_WINDOW)
    edge = await start_edge(nursery, gate, "edge-w", settings=edge_settings)
    await edge.wait_connected()
    session = edge.session
    assert session is not None
    (gate_session,) = gate.server.sessions.values()
    with trio.fail_after(10):
        first = await edge.open_stream({"service": "hold"})
        # The Gate's WINDOW for it acknowledged the OPEN.
        await until(lambda: gate_session.stream_count == 1 and not session.retained_frames)
        data_frames = INITIAL_WINDOW // quiet.chunk_size
        sealed = session.send_next + data_frames
        await first.send_all(os.urandom(INITIAL_WINDOW))
        # Everything is sealed (not only queued), in the Gate's engine, and
        # nothing of it is acknowledged...
        await until(lambda: gate_session.recv_next == session.send_next == sealed)
        assert session.retained_frames == data_frames
        # ...until the Gate accepts another stream: its WINDOW carries the ACK.
        await edge.open_stream({"service": "hold"})
        await until(lambda: not session.retained_frames)
    assert gate_session.stream_count == 2
    hold.set()


async def test_one_way_traffic_is_acknowledged_without_data_going_back(
    nursery: trio.Nursery,
) -> None:
    # Nothing flows from the Gate on this stream, so no ACK can ride along:
    # the ACK timer must send one alone, also after parking when idle.
    async def sink(stream: TunnelStream) -> None:
        while await stream.receive_some():
            pass

    # No heartbeat in the test's time: a PONG would carry an ACK too.
    quiet = fast_settings(heartbeat_interval_s=60.0, dead_after_s=120.0)
    gate = await start_gate(nursery, {"sink": sink}, settings=quiet)
    edge = await start_edge(nursery, gate, "edge-q", settings=quiet)
    await edge.wait_connected()
    stream = await edge.open_stream({"service": "sink"})
    session = edge.session
    assert session is not None
    for _ in range(3):
        sent_before = session.send_next

        def sent_and_acknowledged(sent_before: int = sent_before) -> bool:
            return session.send_next > sent_before and not session.retained_frames

        await stream.send_all(b"one small message")
        # ACK_DELAY is 10 ms; without the timer, only a PONG, a minute
        # away, would carry the ACK.
        with trio.fail_after(10):
            await until(sent_and_acknowledged)
        await trio.sleep(0.1)  # long enough for the timer to park
    for _ in range(200):  # past ACK_EVERY frames in one burst
        await stream.send_all(b"x")
    with trio.fail_after(10):
        await until(lambda: not session.retained_frames)


async def test_a_native_relay_whose_socket_fails_resets_only_its_stream(
    nursery: trio.Nursery,
) -> None:
    from qmesh.forward.service import ForwardService

    async def abort_after_first_bytes(sock: trio.SocketStream) -> None:
        await sock.receive_some()
        # Close with RST: the Gate's native relay meets ECONNRESET.
        sock.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.socket.close()

    listeners = await nursery.start(trio.serve_tcp, abort_after_first_bytes, 0)
    port = listeners[0].socket.getsockname()[1]
    forward = ForwardService([f"127.0.0.1:{port}"])
    gate = await start_gate(nursery, {"forward": forward, "echo": echo_service})
    edge = await start_edge(nursery, gate, "edge-s")
    victim = await edge.open_stream({"service": "forward", "target": f"127.0.0.1:{port}"})
    bystander = await edge.open_stream({"service": "echo"})
    with trio.fail_after(10):
        await victim.send_all(b"hello")
        with pytest.raises(StreamReset):
            while await victim.receive_some():
                pass
        assert await roundtrip(bystander, b"still here") == b"still here"
        (gate_session,) = gate.server.sessions.values()
        await until(lambda: gate_session.native_streams == 0)
    assert edge.session is not None and not edge.session.lost


async def test_native_relays_keep_each_streams_bytes_and_flow_control(
    nursery: trio.Nursery,
) -> None:
    """Several native relays at once, one of them with a reader that stalls:
    every stream is byte-exact and the stall holds back only its own stream."""
    from qmesh.forward.edge import serve_forward
    from qmesh.forward.service import ForwardService

    async def echo_tcp(sock: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError):
            while data := await sock.receive_some(65536):
                await sock.send_all(data)
            await sock.send_eof()
        await sock.aclose()

    listeners = await nursery.start(trio.serve_tcp, echo_tcp, 0)
    target = f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"
    gate = await start_gate(nursery, {"forward": ForwardService([target])})
    edge = await start_edge(nursery, gate, "edge-r")
    local_port = await nursery.start(serve_forward, edge, "127.0.0.1:0", target)
    stalled = await trio.open_tcp_stream("127.0.0.1", local_port)
    results: dict[int, bool] = {}

    async def exchange(i: int) -> None:
        payload = os.urandom(3 * 1024 * 1024 + i)
        app = await trio.open_tcp_stream("127.0.0.1", local_port)
        received = bytearray()

        async def send() -> None:
            await app.send_all(payload)
            await app.send_eof()

        async with trio.open_nursery() as inner:
            inner.start_soon(send)
            while data := await app.receive_some(65536):
                received.extend(data)
        await app.aclose()
        results[i] = bytes(received) == payload

    async with trio.open_nursery() as background:
        # Echoed back into a reader that never reads: every buffer and
        # window on this stream's path fills up, and this send never ends.
        background.start_soon(stalled.send_all, os.urandom(64 * 1024 * 1024))
        with trio.fail_after(60):
            async with trio.open_nursery() as inner:
                for i in range(4):
                    inner.start_soon(exchange, i)
        background.cancel_scope.cancel()
    assert results == {0: True, 1: True, 2: True, 3: True}
    session = edge.session
    assert session is not None and session.native_streams == 1  # the stalled one
    await stalled.aclose()
    with trio.fail_after(10):
        await until(lambda: session.native_streams == 0)
