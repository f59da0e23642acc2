"""A fault-injecting TCP proxy for tests and benchmarks (loopback only).

Between a tunnel's edge and its Gate it can:
- reset the connection after every ``reset_every`` bytes relayed (both
  directions counted together), with SO_LINGER 0 so the peers see a real RST;
- delay chunks (``delay`` seconds with probability ``delay_probability``);
- stall a direction for ``stall_for`` seconds every ``stall_every`` bytes;
- split writes into 1-byte pieces for the first ``split_first`` bytes of every
  connection and direction (where the handshake and first frames travel), and
  into random small pieces after that when ``split_random`` is set.
"""

from __future__ import annotations

import random
import socket
import struct

import attrs
import trio


@attrs.define
class Faults:
    reset_every: int | None = None
    delay: float = 0.0
    delay_probability: float = 0.0
    stall_every: int | None = None
    stall_for: float = 0.0
    split_first: int = 0
    split_random: bool = False
    seed: int = 1


class FaultProxy:
    def __init__(self, target: tuple[str, int], faults: Faults) -> None:
        self.target = target
        self.faults = faults
        self.port = 0
        self.resets = 0
        self.connections = 0
        self.bytes_relayed = 0
        self._rng = random.Random(faults.seed)
        self._next_reset = faults.reset_every
        self._enabled = True
        self._scopes: set[trio.CancelScope] = set()
        self._frozen: set[trio.CancelScope] = set()
        self.blocked = False

    def disable(self) -> None:
        """Stop injecting faults (connections then pass bytes untouched)."""
        self._enabled = False

    def blackhole_all(self) -> None:
        """Silently drop every byte of the connections open now, forever,
        without closing them: a network partition, not a reset."""
        self._frozen.update(self._scopes)

    def reset_all(self) -> None:
        """Reset every open connection now."""
        for scope in self._scopes:
            scope.cancel()
        self.resets += len(self._scopes)

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        self.connections += 1
        if self.blocked:  # the network is down: refuse with a reset
            _abort(client)
            return
        try:
            upstream = await trio.open_tcp_stream(*self.target)
        except OSError:
            _abort(client)
            return
        try:
            async with trio.open_nursery() as nursery:
                self._scopes.add(nursery.cancel_scope)
                nursery.start_soon(self._pump, client, upstream, nursery.cancel_scope)
                nursery.start_soon(self._pump, upstream, client, nursery.cancel_scope)
        finally:
            self._scopes.discard(nursery.cancel_scope)
            _abort(client)
            _abort(upstream)

    async def _pump(
        self, source: trio.SocketStream, sink: trio.SocketStream, scope: trio.CancelScope
    ) -> None:
        faults = self.faults
        sent = 0
        next_stall = faults.stall_every
        try:
            while data := await source.receive_some(65536):
                if scope in self._frozen:
                    continue
                if self._enabled and faults.reset_every is not None:
                    assert self._next_reset is not None
                    if self.bytes_relayed + len(data) >= self._next_reset:
                        # Deliver part of the data, then reset mid-stream.
                        cut = max(0, self._next_reset - self.bytes_relayed)
                        await self._write(sink, data[:cut], sent)
                        self.bytes_relayed += cut
                        self._next_reset += faults.reset_every
                        self.resets += 1
                        scope.cancel()
                        return
                if self._enabled and faults.delay and self._rng.random() < faults.delay_probability:
                    await trio.sleep(faults.delay)
                if self._enabled and next_stall is not None and sent + len(data) >= next_stall:
                    await trio.sleep(faults.stall_for)
                    next_stall += faults.stall_every or 0
                await self._write(sink, data, sent)
                sent += len(data)
                self.bytes_relayed += len(data)
            await sink.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            scope.cancel()

    async def _write(self, sink: trio.SocketStream, data: bytes, sent: int) -> None:
        faults = self.faults
        if not self._enabled or not (faults.split_first or faults.split_random):
            await sink.send_all(data)
            return
        view = memoryview(data)
        while view:
            if sent < faults.split_first:
                n = 1
            elif faults.split_random:
                n = self._rng.randint(1, 4096)
            else:
                n = len(view)
            await sink.send_all(view[:n])
            view = view[n:]
            sent += n


def _abort(stream: trio.SocketStream) -> None:
    """Close with RST rather than FIN, as a broken network would."""
    try:
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    stream.socket.close()
