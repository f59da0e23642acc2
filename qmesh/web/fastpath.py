"""The HTTP engine's fast path, Python's side: routes it installs and the
requests the engine relayed by them.

For: :class:`FastRoutes`, one per :class:`~qmesh.web.native.NativeHttpServer`.
A handler that decided a request installs a route for the requests that
would be decided the same way (:meth:`FastRoutes.install`, with a
:class:`FastOwner` that books them); the engine then relays those without
Python and reports each when done, and the owner books it. A request whose
upstream fails before a byte reached the client comes back to Python as an
ordinary request, its failed attempt told to the owner first
(:meth:`FastOwner.failed`).

Not for: what a route rests on (the LLM path decides that) or the engine's
matching of requests to routes (``fastroute.rs``).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol, TypeAlias

import attrs

from qmesh import _core

__all__ = ["FastOwner", "FastRelayed", "FastRoutes", "RouteSpec"]

log = logging.getLogger(__name__)

FastRelayed: TypeAlias = tuple[float, int, int, int, int]
"""A request a route relayed whole: ``(started_at, body_len, tokens_in,
tokens_out, bytes_out)``, as :class:`qmesh._core.HttpFastBatch` has it."""

Observe = Callable[[str, str, int, Sequence[float]], None]
"""``(method, route, status, seconds)``: the server's request metrics, for
requests answered alike (:attr:`qmesh.web.http.Router.observe_many`)."""


class FastOwner(Protocol):
    """Books the requests relayed by one route."""

    def done(self, event: _core.HttpFastDone) -> bytes | None:
        """Book a relayed request whose answer broke off. For one that
        waits for its end (``event.outcome.open``): the words that close
        it, sent before it ends, if any."""

    def done_many(self, requests: Sequence[FastRelayed], now: float) -> None:
        """Book requests relayed whole (:class:`qmesh._core.HttpFastBatch`),
        ``now`` on ``time.monotonic()``'s clock."""

    def failed(self, outcome: _core.HttpProxied) -> list[dict[str, object]]:
        """The route's upstream failed before a byte reached the client;
        the request goes to Python next. The hops to start its record with."""


@attrs.frozen
class RouteSpec:
    """What a route's requests carry and where the engine sends them (see
    :meth:`qmesh._core.HttpEngine.route`)."""

    authorization: str
    path: str
    model: str
    stream: bool
    app: str
    host: str
    port: int
    request_head: bytes
    upstream_model: str
    headers: bytes
    first_byte_timeout_s: float
    chunk_timeout_s: float
    max_body: int
    max_tokens: int
    max_in_flight: int
    ttl_s: float
    tls: _core.TlsClientConfig | None = None
    server_name: str | None = None


class FastRoutes:
    """The routes of one engine, and who books each."""

    def __init__(
        self, engine: _core.HttpEngine, observer: Callable[[], Observe | None] = lambda: None
    ) -> None:
        """``observer`` gives the server's request metrics when there are any."""
        self.engine = engine
        self.observer = observer
        self._owners: dict[int, tuple[FastOwner, str]] = {}
        self._ids = itertools.count(1)
        self.relayed = 0
        """Requests relayed by the fast path so far."""

    def install(self, spec: RouteSpec, owner: FastOwner) -> None:
        """Relay the requests that fit ``spec`` as ``owner`` decided. Every
        install is a new route (it replaces the key's last one), so that a
        late report of an old one never reaches a new owner."""
        route = next(self._ids)
        self._owners[route] = (owner, spec.path)
        self.engine.route(
            spec.authorization.encode("latin-1"), spec.path, spec.model, spec.stream,
            route=route, app=spec.app, host=spec.host, port=spec.port,
            request_head=spec.request_head, upstream_model=spec.upstream_model,
            headers=spec.headers, first_byte_timeout=spec.first_byte_timeout_s,
            chunk_timeout=spec.chunk_timeout_s, max_body=spec.max_body,
            max_tokens=spec.max_tokens, max_in_flight=spec.max_in_flight, ttl=spec.ttl_s,
            tls=spec.tls, server_name=spec.server_name,
        )  # fmt: skip

    def forget_all(self) -> None:
        """What decisions rest on changed: no request takes an old route."""
        self.engine.forget_routes()

    def released(self, route: int) -> None:
        self._owners.pop(route, None)

    def done(self, event: _core.HttpFastDone) -> bytes | None:
        owner = self._observed(event.route, (event.started_at,), time.monotonic())
        return None if owner is None else owner.done(event)

    def done_many(self, batch: _core.HttpFastBatch) -> None:
        now = time.monotonic()
        requests = batch.requests
        owner = self._observed(batch.route, [request[0] for request in requests], now)
        if owner is not None:
            owner.done_many(requests, now)

    def _observed(self, route: int, started: Sequence[float], now: float) -> FastOwner | None:
        """Count and observe requests relayed by ``route``; who books them."""
        owned = self._owners.get(route)
        if owned is None:  # cannot happen: a route outlives its requests
            log.error("fast path: a report for unknown route %d", route)
            return None
        owner, path = owned
        self.relayed += len(started)
        observe = self.observer()
        if observe is not None:
            observe("POST", path, 200, [now - at for at in started])
        return owner

    def failed(self, route: int, outcome: _core.HttpProxied) -> list[dict[str, object]]:
        owned = self._owners.get(route)
        return [] if owned is None else owned[0].failed(outcome)
