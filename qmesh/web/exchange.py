"""One request's answer through the HTTP engine (``_core.HttpEngine``).

For: :class:`NativeExchange`, what a handler holds to answer a request the
engine parsed — a whole answer, a chunked one with back-pressure, or an
upstream's answer that the engine relays itself (:meth:`NativeExchange.proxy`,
given a :class:`ProxyTarget`) — and :class:`ClientGone` when the client is
no longer there to answer.

Not for: serving (:mod:`qmesh.web.native`) or deciding what to answer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Final

import trio

from qmesh import _core
from qmesh.web.fastpath import FastRoutes

__all__ = ["HIGH_WATER", "ClientGone", "NativeExchange", "ProxyTarget", "encode_headers"]

HIGH_WATER: Final = 256 * 1024
"""Bytes of a produced answer waiting for the client above which the
producer waits (the engine's own mark)."""


class ClientGone(Exception):
    """The client's connection ended before its answer did."""


def encode_headers(headers: tuple[tuple[str, str], ...]) -> bytes:
    """``name: value`` lines; ValueError for a name or value that would
    split the head (a handler's bug, answered 500 before anything is sent)."""
    lines = []
    for name, value in headers:
        if not name or any(c in name for c in ":\r\n ") or "\r" in value or "\n" in value:
            raise ValueError(f"a response header cannot be sent: {name!r}")
        lines.append(f"{name}: {value}\r\n")
    return "".join(lines).encode("latin-1")


class ProxyTarget:
    """Where and what the engine sends for a relayed request."""

    __slots__ = ("head", "host", "model", "port", "request", "server_name", "tls", "who")

    def __init__(
        self,
        host: str,
        port: int,
        request: bytes,
        who: str,
        *,
        head: bytes = b"",
        model: str = "",
        tls: _core.TlsClientConfig | None = None,
        server_name: str | None = None,
    ) -> None:
        self.host = host  # an IP address
        self.port = port
        self.request = request  # a whole HTTP/1.1 request
        self.who = who  # the upstream, as errors name it
        # An https upstream: the trust, and the name its certificate must carry.
        self.tls = tls
        self.server_name = server_name
        # For a fast-path route: the request's line and headers without its
        # length, and the model's name at the upstream.
        self.head = head
        self.model = model


class NativeExchange:
    """One request's answer through the engine."""

    __slots__ = (
        "_drained", "_engine", "_outcome", "_proxied", "earlier_hops", "gone", "id", "routes",
    )  # fmt: skip

    def __init__(
        self, engine: _core.HttpEngine, exchange: int, routes: FastRoutes | None = None
    ) -> None:
        self._engine = engine
        self.id = exchange
        self.routes = routes
        """The server's fast-path routes, where a handler may install one."""
        self.earlier_hops: list[dict[str, object]] = []
        """Attempts the fast path made for this request before it came to Python."""
        self.gone = False
        self._proxied: trio.Event | None = None
        self._outcome: _core.HttpProxied | None = None
        self._drained: trio.Event | None = None

    async def proxy(
        self,
        target: ProxyTarget,
        headers: bytes,
        *,
        first_byte_timeout_s: float,
        chunk_timeout_s: float,
        hold: bool,
    ) -> _core.HttpProxied:
        """Have the engine send ``target.request`` and relay a 200 answer to
        the client (``headers`` added to its head; with ``hold``, once it is
        whole); what came of it."""
        ready = self._proxied = trio.Event()
        self._outcome = None
        sent = self._engine.proxy(
            self.id, target.host, target.port, target.request, headers,
            first_byte_timeout_s, chunk_timeout_s, hold=hold,
            tls=target.tls, server_name=target.server_name,
        )  # fmt: skip
        if not sent:
            raise ClientGone
        await ready.wait()
        outcome = self._outcome
        assert outcome is not None
        return outcome

    def respond(self, status: int, headers: bytes, body: bytes) -> None:
        """A whole answer (``headers`` from :func:`encode_headers`)."""
        if not self._engine.respond(self.id, status, headers, body):
            raise ClientGone

    def start(self, status: int, headers: bytes) -> None:
        """The head of a chunked answer; :meth:`write` its chunks, then :meth:`finish`."""
        if not self._engine.start(self.id, status, headers):
            raise ClientGone

    async def write_all(self, chunks: AsyncIterator[bytes], write_timeout_s: float) -> None:
        """Each chunk, with back-pressure."""
        async for chunk in chunks:
            await self.write(chunk, write_timeout_s)

    async def write(self, chunk: bytes, write_timeout_s: float) -> None:
        """One chunk; waits while the client is behind, and a client that
        stops reading for ``write_timeout_s`` loses its connection."""
        if not chunk:
            return
        waiting = self._engine.write(self.id, chunk)
        if waiting is None:
            raise ClientGone
        if waiting >= HIGH_WATER:
            drained = self._drained = trio.Event()
            with trio.move_on_after(write_timeout_s):
                await drained.wait()
            self._drained = None
            if not drained.is_set():
                self.abort()
                raise ClientGone
            if self.gone:
                raise ClientGone

    def finish(self) -> None:
        if not self._engine.finish(self.id):
            raise ClientGone

    def abort(self) -> None:
        """End the client's connection now, whatever was written."""
        self._engine.abort(self.id)

    # -- reports from the server's dispatcher -----------------------------------

    def deliver(self, outcome: _core.HttpProxied) -> None:
        self._outcome = outcome
        if self._proxied is not None:
            self._proxied.set()

    def notice(self, kind: str) -> None:
        if kind == "gone":
            self.gone = True
        if self._drained is not None:
            self._drained.set()
