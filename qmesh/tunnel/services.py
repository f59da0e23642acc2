"""Routing incoming streams to named services, and relaying bytes between streams."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection, Mapping

import trio

from qmesh.fastsocket import FastSocketStream, fast
from qmesh.tunnel.frames import ResetCode
from qmesh.tunnel.stream import TunnelStream

log = logging.getLogger(__name__)

ServiceHandler = Callable[[TunnelStream], Awaitable[None]]
"""Serves one incoming stream; ``stream.request`` is the peer's OPEN request."""


def dispatcher(
    services: Mapping[str, ServiceHandler], *, role: str = "", withheld: Collection[str] = ()
) -> ServiceHandler:
    """A stream handler that hands each stream to ``services[request["service"]]``.

    ``withheld`` names services that exist but are not open to this peer's
    ``role``; they are refused as such rather than as unknown.
    """

    async def dispatch(stream: TunnelStream) -> None:
        name = stream.request["service"]
        service = services.get(name)
        if service is None:
            shown = repr(name[:64])
            if name in withheld:
                stream.reset(ResetCode.REFUSED, f"service {shown} is not open to {role} edges")
            else:
                stream.reset(ResetCode.REFUSED, f"unknown service {shown}")
            return
        await service(stream)

    return dispatch


async def splice(a: trio.abc.Stream, b: trio.abc.Stream, *, chunk: int = 65536) -> None:
    """Relay bytes both ways until both directions end, passing half-closes on.

    When one side ends, the other is half-closed if it can be (a
    ``HalfCloseableStream``), else closed: a stream without half-close (TLS)
    that is done receiving is done with the connection.

    If either side fails, both are closed at once (a tunnel stream closed early
    sends RESET, so the far end learns of the failure instead of a clean EOF).
    Closes both streams before returning; never raises for a broken stream.

    A tunnel stream spliced to a plain TCP socket is relayed by the session's
    engine (:meth:`TunnelStream.relay_native`): no Python per message.
    """
    try:
        pair = _native_pair(a, b)
        if pair is not None:
            stream, sock = pair
            outcome = await stream.relay_native(sock)
            if outcome.failed:
                log.debug("relay ended: %s %s", outcome.ending, outcome.detail)
            return
        await _pump_both(fast(a), fast(b), chunk)
    finally:
        await trio.aclose_forcefully(a)
        await trio.aclose_forcefully(b)


def _native_pair(
    a: trio.abc.Stream, b: trio.abc.Stream
) -> tuple[TunnelStream, trio.SocketStream | FastSocketStream] | None:
    for stream, sock in ((a, b), (b, a)):
        if isinstance(stream, TunnelStream) and isinstance(
            sock, trio.SocketStream | FastSocketStream
        ):
            return stream, sock
    return None


async def _pump_both(a: trio.abc.Stream, b: trio.abc.Stream, chunk: int) -> None:
    async def pump(source: trio.abc.Stream, sink: trio.abc.Stream) -> None:
        try:
            while data := await source.receive_some(chunk):
                await sink.send_all(data)
            if isinstance(sink, trio.abc.HalfCloseableStream):
                await sink.send_eof()
            else:
                await sink.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.debug("relay ended: %s", exc)
            nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pump, a, b)
        nursery.start_soon(pump, b, a)
