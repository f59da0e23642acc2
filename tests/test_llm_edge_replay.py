"""The MiniGate's LLM port keeps a request until its answer begins: a tunnel
session lost before then (the Gate died, the edge moved on) costs the
application nothing, one lost after it ends the application's connection.

A real tunnel (Gate and edge in one Trio loop, over TCP) and the real LLM
port; the Gate's ``llm`` service is a stand-in that ends the edge's whole
session at the chosen moment, as a dying Gate would."""

from __future__ import annotations

import trio
from tunnelkit import Gate, start_edge, start_gate

from qmesh.llm.edge import serve_llm
from qmesh.tunnel import TunnelStream

REQUEST = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 11\r\n\r\nhello gates"
ANSWER = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"


class DyingGate:
    """The Gate's ``llm`` service: reads one request; the first ``deaths``
    times it ends the edge's session, after sending ``before_death`` of the
    answer; then it answers."""

    def __init__(self, deaths: int, before_death: bytes = b"") -> None:
        self.deaths = deaths
        self.before_death = before_death
        self.requests: list[bytes] = []
        self.gate: Gate | None = None
        self.answer_seen = trio.Event()
        """Set by the application when the first bytes of an answer reach it."""

    async def serve(self, stream: TunnelStream) -> None:
        received = b""
        while len(received) < len(REQUEST) and (data := await stream.receive_some()):
            received += data
        self.requests.append(received)
        if len(self.requests) <= self.deaths:
            assert self.gate is not None
            if self.before_death:
                await stream.send_all(self.before_death)
                await self.answer_seen.wait()
            for session in list(self.gate.server.sessions.values()):
                self.gate.server.end_session(session, "the gate is going away")
            return
        await stream.send_all(ANSWER)
        await stream.send_eof()


async def ask(port: int, seen: trio.Event | None = None) -> bytes:
    """Send the request on a new connection; everything that comes back
    (``seen`` is set when the first of it arrives)."""
    conn = await trio.open_tcp_stream("127.0.0.1", port)
    async with conn:
        await conn.send_all(REQUEST)
        received = b""
        with trio.fail_after(20):
            while data := await conn.receive_some():
                received += data
                if seen is not None:
                    seen.set()
    return received


async def start(nursery: trio.Nursery, gate_service: DyingGate) -> int:
    gate = await start_gate(nursery, {"llm": gate_service.serve})
    gate_service.gate = gate
    client = await start_edge(nursery, gate, "edge-1")
    port: int = await nursery.start(serve_llm, client, "127.0.0.1:0")
    return port


async def test_a_request_whose_gate_is_lost_before_answering_is_replayed(
    nursery: trio.Nursery,
) -> None:
    gate = DyingGate(deaths=2)
    port = await start(nursery, gate)
    assert await ask(port) == ANSWER
    # Sent three times, byte for byte: to two dying sessions, then answered.
    assert gate.requests == [REQUEST] * 3


async def test_an_answer_cut_short_ends_the_connection_without_a_replay(
    nursery: trio.Nursery,
) -> None:
    gate = DyingGate(deaths=1, before_death=b"HTTP/1.1 200 OK\r\n")
    port = await start(nursery, gate)
    assert await ask(port, gate.answer_seen) == b"HTTP/1.1 200 OK\r\n"
    assert gate.requests == [REQUEST]
    assert await ask(port) == ANSWER  # the next connection goes through


KEPT_ALIVE = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


class DrainingGate:
    """The Gate's ``llm`` service on keep-alive connections: answers every
    request; after the first answer has reached the application it ends the
    edge's session, saying (or not) that no answer was in progress, as a
    draining Gate does at its gap between requests."""

    def __init__(self, *, between_answers: bool) -> None:
        self.between_answers = between_answers
        self.gate: Gate | None = None
        self.answered = trio.Event()
        self.sent_away = trio.Event()
        self.carried_over = trio.Event()
        """Set when the edge opens a stream again (for the same connection)."""
        self.streams = self.requests = 0

    async def serve(self, stream: TunnelStream) -> None:
        self.streams += 1
        if self.streams == 2:
            self.carried_over.set()
        received = b""
        while data := await stream.receive_some():
            received += data
            while len(received) >= len(REQUEST):
                received = received[len(REQUEST) :]
                self.requests += 1
                await stream.send_all(KEPT_ALIVE)
                if self.requests == 1:
                    await self.answered.wait()
                    assert self.gate is not None
                    for session in list(self.gate.server.sessions.values()):
                        self.gate.server.end_session(
                            session, "draining", between_answers=self.between_answers
                        )
                    self.sent_away.set()
                    return


async def answered_once(nursery: trio.Nursery, service: DrainingGate) -> trio.SocketStream:
    """An application connection through a real edge whose first request
    has been answered (the Gate then ends the edge's session)."""
    service.gate = await start_gate(nursery, {"llm": service.serve})
    client = await start_edge(nursery, service.gate, "edge-1")
    port: int = await nursery.start(serve_llm, client, "127.0.0.1:0")
    conn = await trio.open_tcp_stream("127.0.0.1", port)
    await conn.send_all(REQUEST)
    assert await receive_exactly(conn, len(KEPT_ALIVE)) == KEPT_ALIVE
    service.answered.set()
    return conn


async def test_a_drain_between_answers_carries_idle_connections_over(
    nursery: trio.Nursery,
) -> None:
    """The application's keep-alive connection outlives its Gate session:
    the next request on it is answered through the edge's new session."""
    service = DrainingGate(between_answers=True)
    with trio.fail_after(20):
        async with await answered_once(nursery, service) as conn:
            # The edge has taken in the GOAWAY and moved the idle connection
            # to its new session before the application asks again: the
            # moment a connection used to be closed under its next request.
            await service.carried_over.wait()
            await conn.send_all(REQUEST)
            assert await receive_exactly(conn, len(KEPT_ALIVE)) == KEPT_ALIVE
    assert service.requests == 2


async def test_a_session_lost_otherwise_ends_idle_connections(nursery: trio.Nursery) -> None:
    """Without the Gate's word that no answer was in progress, a lost session
    ends the application's connection (it may have been mid-answer)."""
    service = DrainingGate(between_answers=False)
    with trio.fail_after(20):
        async with await answered_once(nursery, service) as conn:
            assert await conn.receive_some() == b""  # closed by the edge


async def receive_exactly(conn: trio.SocketStream, size: int) -> bytes:
    received = b""
    while len(received) < size and (data := await conn.receive_some(size - len(received))):
        received += data
    return received
