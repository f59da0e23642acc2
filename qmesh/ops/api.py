"""The Gate's operator pages: the dashboard, its live data, /metrics, discovery.

For:

- ``GET /`` — the dashboard page, and ``GET /static/{file}`` its assets,
  all served from the package (``qmesh/web/static/``): the page works with
  no internet. Both are the same for everyone and hold no data: the page
  asks for an operator key and keeps it in the tab's ``sessionStorage``;
- ``GET /api/dashboard`` — one snapshot (:class:`~qmesh.ops.overview.Overview`);
- ``GET /api/dashboard/stream`` — server-sent events, a snapshot whenever
  the inventory changes and at least every second, for up to
  ``STREAM_LIFETIME_S`` (the page then reconnects, which checks the key
  again);
- ``GET /metrics`` — Prometheus text format (:mod:`qmesh.ops.metrics`);
- ``GET /api/discovery`` — the scanner's state and targets;
  ``POST /api/discovery/scan`` — scan now and answer when it is done.

Everything but the page and its assets needs an operator key
(``Authorization: Bearer NAME:KEY``; 401 without one) whose role holds the
right (:mod:`qmesh.operator_roles`; 403 otherwise): ``metrics`` for
``/metrics`` — a Prometheus job sends a ``metrics`` operator's key with
``authorization: {type: Bearer, credentials: "NAME:KEY"}`` — ``view`` for the
dashboard and discovery's state, ``operate`` for a scan.

Not for: what the snapshot holds (:mod:`qmesh.ops.overview`) or the
inventory API (:mod:`qmesh.fleet.api`).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Sequence
from importlib import resources
from typing import TYPE_CHECKING, Final

import attrs
import trio

from qmesh.config import Config
from qmesh.fleet.discovery import Scanner
from qmesh.fleet.inventory import Inventory
from qmesh.llm.calls import sse
from qmesh.operator_roles import Right
from qmesh.ops.metrics import GateMetrics
from qmesh.ops.overview import Overview
from qmesh.tunnel import TunnelServer
from qmesh.web.auth import AppAuthenticator
from qmesh.web.http import HttpError, Request, Response, Router
from qmesh.web.prom import CONTENT_TYPE

if TYPE_CHECKING:
    from qmesh.llm.service import LlmService
    from qmesh.pg.audit import AuditLog
    from qmesh.pg.pool import PoolStats
    from qmesh.state import StateStore

__all__ = ["Ops", "add_ops_routes", "add_pool_route", "load_static", "start_ops"]

STREAM_INTERVAL_S: Final = 1.0
STREAM_POLL_S: Final = 0.1
"""How often the stream looks for an inventory change between snapshots."""
STREAM_MIN_GAP_S: Final = 0.4
"""Snapshots no closer than this: heartbeats change the inventory several
times a second on a busy mesh, and the page needs no more than this."""
STREAM_LIFETIME_S: Final = 300.0
_TYPES: Final = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
# Only our own files, no inline script or style, no framing: the page can
# neither load nor send anything elsewhere.
_PAGE_HEADERS: Final = (
    (
        "content-security-policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("x-frame-options", "DENY"),
)


@attrs.frozen
class Ops:
    """The Gate's observability parts, built by :func:`start_ops`; the
    caller runs ``metrics.run`` (the history sampler)."""

    metrics: GateMetrics
    overview: Overview


def start_ops(
    config: Config,
    router: Router,
    *,
    auth: AppAuthenticator,
    server: TunnelServer,
    inventory: Inventory,
    scanner: Scanner,
    llm: LlmService | None,
    store: StateStore | None,
    pg_pools: Callable[[], Sequence[PoolStats]] | None = None,
    pg_audit: AuditLog | None = None,
) -> Ops:
    """Build the metrics and the dashboard, hook the metrics into the router
    and the ledger, and add the routes."""
    metrics = GateMetrics(
        server=server,
        inventory=inventory,
        llm=llm,
        scanner=scanner,
        store=store,
        pg_pools=pg_pools,
        pg_audit=pg_audit,
    )
    metrics.attach(router)
    overview = Overview(
        name=config.gate.name,
        inventory=inventory,
        server=server,
        metrics=metrics,
        scanner=scanner,
        llm=llm,
    )
    add_ops_routes(router, auth=auth, overview=overview, metrics=metrics, scanner=scanner)
    if pg_pools is not None:
        add_pool_route(router, auth=auth, pg_pools=pg_pools)
    return Ops(metrics, overview)


def add_pool_route(
    router: Router, *, auth: AppAuthenticator, pg_pools: Callable[[], Sequence[PoolStats]]
) -> None:
    """``GET /api/pg/pools``: the Postgres pools of transaction mode, as
    ``qmesh pg pools`` prints them."""

    async def pools(request: Request) -> Response:
        await auth.require(request, Right.VIEW)
        return Response.json({"pools": [attrs.asdict(p) for p in pg_pools()]})

    router.add("GET", "/api/pg/pools", pools)


def load_static() -> dict[str, tuple[bytes, str]]:
    """The dashboard's files (name → bytes, content type), read once."""
    out: dict[str, tuple[bytes, str]] = {}
    folder = resources.files("qmesh.web").joinpath("static")
    for entry in folder.iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in _TYPES:
            out[entry.name] = (entry.read_bytes(), _TYPES[suffix])
    return out


def add_ops_routes(
    router: Router,
    *,
    auth: AppAuthenticator,
    overview: Overview,
    metrics: GateMetrics,
    scanner: Scanner | None = None,
) -> None:
    static = load_static()
    if "index.html" not in static:
        raise RuntimeError("qmesh/web/static/index.html is missing from the package")

    def asset(name: str, *, cache: str) -> Response:
        found = static.get(name)
        if found is None:
            raise HttpError(404, f"no such file: {name}", code="not_found")
        body, content_type = found
        headers = (("content-type", content_type), ("cache-control", cache), *_PAGE_HEADERS)
        return Response(200, body, headers)

    async def page(request: Request) -> Response:
        return asset("index.html", cache="no-cache")

    async def static_file(request: Request) -> Response:
        return asset(request.path_params["name"], cache="no-cache")

    async def snapshot(request: Request) -> Response:
        await auth.require(request, Right.VIEW)
        return Response.json(await overview.snapshot(), headers=(("cache-control", "no-store"),))

    async def stream(request: Request) -> Response:
        await auth.require(request, Right.VIEW)
        first = await overview.snapshot()  # errors become HTTP errors, before the 200
        return Response.event_stream(_events(first))

    async def _events(first: dict[str, object]) -> AsyncIterator[bytes]:
        yield sse(first)
        seen = overview.inventory.version
        ends = time.monotonic() + STREAM_LIFETIME_S
        sent = time.monotonic()
        while sent < ends:
            await trio.sleep(STREAM_POLL_S)
            quiet = time.monotonic() - sent
            changed = overview.inventory.version != seen
            if quiet < STREAM_INTERVAL_S and not (changed and quiet >= STREAM_MIN_GAP_S):
                continue
            seen = overview.inventory.version
            sent = time.monotonic()
            yield sse(await overview.snapshot())
        yield b"event: reconnect\ndata: {}\n\n"

    async def prometheus(request: Request) -> Response:
        await auth.require(request, Right.METRICS)
        return Response.text(metrics.render(), content_type=CONTENT_TYPE)

    async def discovery(request: Request) -> Response:
        await auth.require(request, Right.VIEW)
        if scanner is None:
            return Response.json({"enabled": False, "targets": 0, "addresses": []})
        view = scanner.view()
        view["addresses"] = [
            {"address": t.address, "configured": t.configured} for t in scanner.targets
        ]
        return Response.json(view)

    async def scan(request: Request) -> Response:
        await auth.require(request, Right.OPERATE)
        if scanner is None or not scanner.targets:
            raise HttpError(
                409, "discovery has no targets: list them in [gate.discovery]", code="disabled"
            )
        report = await scanner.scan_now()
        return Response.json({"scan": None if report is None else report.to_json()})

    router.add("GET", "/", page)
    router.add("GET", "/static/{name}", static_file)
    router.add("GET", "/api/dashboard", snapshot)
    router.add("GET", "/api/dashboard/stream", stream)
    router.add("GET", "/metrics", prometheus)
    router.add("GET", "/api/discovery", discovery)
    router.add("POST", "/api/discovery/scan", scan)
