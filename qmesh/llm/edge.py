"""The MiniGate's LLM port: the Gate's OpenAI-compatible API on localhost.

An application on the edge box points its OpenAI client at
``http://127.0.0.1:11435/v1`` (``minigate.llm_listen``) with its app key as
the API key (``APP_ID:APP_KEY``). Each connection becomes one ``llm``
tunnel stream that the Gate serves with its own HTTP router
(:mod:`qmesh.llm.relay`), so keep-alive, SSE streaming and every
error pass through unchanged, sealed and compressed by the tunnel.

A request survives the loss of its Gate. The relay keeps the bytes the
application sent since the Gate last answered (the request in flight) until
the first byte of the answer arrives. If the tunnel session is lost before
then — the Gate died and the edge moved to another Gate of the cluster, or
the Gate restarted — those bytes are sent again on a new stream, and the
application sees one answer, late. Once an answer has begun, a lost session
ends the application's connection, as a broken stream ends anywhere —
unless the Gate ended the session with its word that no answer was in
progress (a drain's GOAWAY "between answers"): then every answer was whole,
and the connection carries on over a new stream, so an application's
keep-alive connection is not closed under its next request. No
HTTP is parsed for this: a connection alternates between the application's
request and the Gate's answer, so the first byte of an answer is where the
request stops being replayable, and the application's next bytes start the
next request. (A request that reached the dead Gate may so run twice: the
price of never losing one. A request larger than :data:`MAX_REPLAY_BYTES`
is not kept, and is not replayed.)

Not for: parsing HTTP here: the MiniGate relays bytes and holds no
secrets, so authentication, routing and accounting all stay at the Gate.
"""

from __future__ import annotations

import enum
import logging
from typing import Final

import trio

from qmesh.boundary import guarded
from qmesh.config import parse_hostport
from qmesh.fastsocket import open_listeners, serve_listeners
from qmesh.tunnel.client import TunnelClient
from qmesh.tunnel.errors import StreamReset, TunnelError
from qmesh.tunnel.frames import ResetCode
from qmesh.tunnel.stream import TunnelStream

__all__ = ["MAX_REPLAY_BYTES", "serve_llm"]

log = logging.getLogger(__name__)

MAX_REPLAY_BYTES: Final = 8 * 1024 * 1024
"""The largest request kept for a replay (a chat with long documents fits)."""
_REPLAY_WAIT_S: Final = 30.0
"""How long a request in flight waits for the edge to reach a Gate again."""
_CHUNK: Final = 65536

_BODY = (
    b'{"error":{"message":"the qmesh gate is unreachable","type":"server_error","code":"no_gate"}}'
)
_UNAVAILABLE = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
    b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(_BODY), _BODY)
)


async def serve_llm(
    client: TunnelClient,
    listen: str,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on ``listen`` ("host:port"); ``task_status.started`` gets the bound port."""
    host, port = parse_hostport(listen)
    listeners = await open_listeners(host, port, purpose="the MiniGate's LLM API")
    bound: int = listeners[0].socket.getsockname()[1]
    log.info("LLM API on %s:%d (relayed to the gate)", host, bound)

    async def relay(local: trio.SocketStream) -> None:
        try:
            await _Connection(client, local).run()
        finally:
            await trio.aclose_forcefully(local)

    task_status.started(bound)
    await serve_listeners(
        guarded(relay, "LLM client connection", log), listeners, what="llm listener"
    )


class _Ending(enum.Enum):
    DONE = "done"  # both directions ended, or the application left
    LOST = "lost"  # the tunnel session was lost
    MOVED = "moved"  # the Gate sent the edge away between answers (a drain)


def _lost_how(reset: StreamReset) -> _Ending:
    if reset.code != ResetCode.SESSION_LOST:
        return _Ending.DONE
    return _Ending.MOVED if reset.between_answers else _Ending.LOST


class _Connection:
    """One application connection, relayed over as many streams as it takes."""

    def __init__(self, client: TunnelClient, local: trio.SocketStream) -> None:
        self.client = client
        self.local = local
        self.pending = bytearray()
        """What the application sent since the Gate last answered."""
        self.kept = True
        """Whether ``pending`` holds all of it (false past MAX_REPLAY_BYTES)."""
        self.answering = False
        """The Gate has begun answering the application's last request."""
        self.app_done = False

    async def run(self) -> None:
        try:
            stream = await self.client.open_stream({"service": "llm"})
        except TunnelError as exc:
            log.warning("cannot reach the gate for an LLM request: %s", exc)
            await self._unavailable()
            return
        while (ending := await self._relay(stream)) is not _Ending.DONE:
            in_flight = bool(self.pending) and not self.answering
            if (ending is _Ending.LOST and not in_flight) or (in_flight and not self.kept):
                # An answer had begun (and may have been cut), or nothing was
                # in flight, or too much to send again: as any broken
                # connection, this one ends. After a drain's GOAWAY every
                # answer was whole, so an idle connection carries on.
                return
            if in_flight:
                log.info("gate lost with an LLM request in flight; replaying it (%d bytes)",
                         len(self.pending))  # fmt: skip
            with trio.move_on_after(_REPLAY_WAIT_S):
                try:
                    stream = await self.client.open_stream({"service": "llm"})
                except TunnelError as exc:
                    log.warning("cannot reach another gate for an LLM connection: %s", exc)
                else:
                    continue
            if in_flight:
                await self._unavailable()
            return

    async def _relay(self, stream: TunnelStream) -> _Ending:
        ending = _Ending.DONE

        def end(how: _Ending) -> None:
            nonlocal ending
            ending = how
            nursery.cancel_scope.cancel()

        async def guard(direction: str) -> None:
            try:
                await (self._to_gate(stream) if direction == "up" else self._from_gate(stream))
            except StreamReset as exc:
                end(_lost_how(exc))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                log.debug("LLM relay ended: %s", exc)
                end(_Ending.DONE)

        try:
            try:
                if self.pending:  # a replay
                    await stream.send_all(bytes(self.pending))
                if self.app_done:
                    await stream.send_eof()
            except StreamReset as exc:  # the new session is gone too
                return _lost_how(exc)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(guard, "up")
                nursery.start_soon(guard, "down")
        finally:
            await trio.aclose_forcefully(stream)
        return ending

    async def _to_gate(self, stream: TunnelStream) -> None:
        if self.app_done:
            return
        while data := await self.local.receive_some(_CHUNK):
            if self.answering:  # the application's next request begins
                self.answering = False
                self.pending.clear()
                self.kept = True
            if self.kept:
                self.pending += data
                if len(self.pending) > MAX_REPLAY_BYTES:
                    self.kept = False
                    self.pending.clear()
            await stream.send_all(data)
        self.app_done = True
        await stream.send_eof()

    async def _from_gate(self, stream: TunnelStream) -> None:
        while data := await stream.receive_some(_CHUNK):
            self.answering = True
            self.pending.clear()
            await self.local.send_all(data)
        await self.local.send_eof()

    async def _unavailable(self) -> None:
        """Answer the request in flight with 503: no Gate can be reached."""
        try:
            await self.local.send_all(_UNAVAILABLE)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
