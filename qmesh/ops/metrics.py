"""What the Gate counts, for ``/metrics`` and the dashboard's charts.

For: :class:`GateMetrics`, which owns a :class:`~qmesh.web.prom.Registry`
and is fed by two hooks set up in :mod:`qmesh.gate.role` — every HTTP
request (:meth:`GateMetrics.observe_http`, the router's ``observe``) and
every request-ledger entry (:meth:`GateMetrics.observe_entries`, the
ledger's ``observers``: tokens, cost, outcome, latency, failover hops) —
and which reads everything else at scrape time from where it already
lives: the tunnel server (sessions, resumptions), the inventory (entries
by kind and state, per-node telemetry, queue depths), the capability
router (decisions, failovers), the budget book and the scanner.

It also keeps the short history the dashboard draws (:class:`History`:
one sample of the counters per second for 15 minutes, turned into rates)
and each budget's burn-down over its period (:class:`BurnDown`: seeded
once from the ledger table, then kept up to date by the same hook, so a
dashboard refresh never rescans the ledger).

Not for: the text format (:mod:`qmesh.web.prom`) or HTTP
(:mod:`qmesh.ops.api`).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio

from qmesh import __version__, _core
from qmesh.finops.ledger import Hop, LedgerEntry
from qmesh.fleet.inventory import NODE_STATES, Inventory
from qmesh.tunnel import TunnelServer
from qmesh.web.http import Router
from qmesh.web.prom import CounterCell, Family, HistogramSeries, Registry, gauge_family

if TYPE_CHECKING:
    from qmesh.finops.budgets import Budget
    from qmesh.fleet.discovery import Scanner
    from qmesh.llm.service import LlmService
    from qmesh.pg.audit import AuditLog
    from qmesh.pg.pool import PoolStats
    from qmesh.state import StateStore

__all__ = ["BurnDown", "GateMetrics", "History"]

log = logging.getLogger(__name__)

HISTORY_STEP_S: Final = 1.0
HISTORY_POINTS: Final = 900
"""15 minutes at one sample a second."""
RECENT_FAILOVERS: Final = 50
BURN_BUCKETS: Final = 96
LLM_BUCKETS: Final = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_FAILED_HOPS: Final = frozenset({"failed", "busy", "stream_broken"})
Rows = list[tuple[dict[str, str], float]]

_NODE_FAMILIES: Final = (
    ("qmesh_node_up", "1 when the inventory entry is fresh, else 0."),
    ("qmesh_node_last_seen_age_seconds", "Seconds since the entry last reported or answered."),
    ("qmesh_node_cpu_percent", "Host CPU use of the node."),
    ("qmesh_node_load1", "One-minute load average of the node."),
    ("qmesh_node_memory_total_bytes", "Host RAM of the node."),
    ("qmesh_node_memory_available_bytes", "Host RAM available on the node."),
    ("qmesh_node_gpu_utilization_percent", "GPU utilisation."),
    ("qmesh_node_gpu_memory_total_bytes", "GPU memory (VRAM)."),
    ("qmesh_node_gpu_memory_used_bytes", "GPU memory in use."),
    ("qmesh_node_gpu_temperature_celsius", "GPU temperature."),
    ("qmesh_node_gpu_power_watts", "GPU power draw."),
    ("qmesh_node_model_queue_depth", "Requests waiting for a model on a node."),
)
_GPU_FIELDS: Final = (
    ("qmesh_node_gpu_utilization_percent", "utilization_pct"),
    ("qmesh_node_gpu_memory_total_bytes", "vram_total"),
    ("qmesh_node_gpu_memory_used_bytes", "vram_used"),
    ("qmesh_node_gpu_temperature_celsius", "temperature_c"),
    ("qmesh_node_gpu_power_watts", "power_w"),
)
BUDGET_STATES: Final = ("ok", "shift", "block")
_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


# -- history ---------------------------------------------------------------------------------


class History:
    """Counter samples at a fixed step, and the rates between them."""

    def __init__(self, maxlen: int = HISTORY_POINTS) -> None:
        self.times: deque[float] = deque(maxlen=maxlen)
        self.values: dict[str, deque[float]] = {}
        self.maxlen = maxlen

    def add(self, now: float, counters: dict[str, float]) -> None:
        self.times.append(now)
        for name, value in counters.items():
            series = self.values.get(name)
            if series is None:
                # A series that starts late is padded so indexes line up.
                series = self.values[name] = deque(
                    [value] * (len(self.times) - 1), maxlen=self.maxlen
                )
            series.append(value)

    def rates(self, name: str, *, points: int = 300) -> list[tuple[float, float]]:
        """``(time, per-second rate since the previous sample)``, newest last."""
        series = self.values.get(name)
        if series is None or len(series) < 2:
            return []
        times = list(self.times)[-points - 1 :]
        values = list(series)[-points - 1 :]
        out = []
        for i in range(1, len(values)):
            step = times[i] - times[i - 1]
            delta = values[i] - values[i - 1]
            out.append((times[i], max(delta, 0.0) / step if step > 0 else 0.0))
        return out

    def rate(self, name: str, *, window: int = 10) -> float:
        """Mean per-second rate over the last ``window`` samples."""
        series = self.values.get(name)
        if series is None or len(series) < 2:
            return 0.0
        n = min(window, len(series) - 1)
        span = self.times[-1] - self.times[-1 - n]
        return max(series[-1] - series[-1 - n], 0.0) / span if span > 0 else 0.0


# -- budgets' burn-down ----------------------------------------------------------------------


@attrs.define
class BurnDown:
    """Spend per time bucket over one budget's current period."""

    name: str
    start: float
    end: float
    buckets: list[float]
    seeded: bool = False

    @classmethod
    def for_period(cls, name: str, start: float, end: float) -> BurnDown:
        return cls(name, start, end, [0.0] * BURN_BUCKETS)

    @property
    def step(self) -> float:
        return (self.end - self.start) / len(self.buckets)

    def add(self, ts: float, cost: float) -> None:
        if self.start <= ts < self.end and cost:
            self.buckets[min(int((ts - self.start) / self.step), len(self.buckets) - 1)] += cost

    def points(self, limit: float, now: float) -> list[tuple[float, float]]:
        """``(time, remaining)`` at the end of each elapsed bucket, then now."""
        remaining = limit
        out = [(self.start, limit)]
        for i, spent in enumerate(self.buckets):
            t = self.start + (i + 1) * self.step
            remaining -= spent
            out.append((min(t, now), round(remaining, 6)))
            if t >= now:
                break
        return out


def _seed_burn(
    store: StateStore, name: str, start: float, step: float, before: float
) -> list[float]:
    """Ledger spend per bucket for ``name`` from ``start`` up to ``before``."""
    with store._read() as conn:
        rows = conn.execute(
            "SELECT CAST((ts - ?) / ? AS INTEGER), SUM(cost_usd) FROM qg_ledger"
            " WHERE budget = ? AND ts >= ? AND ts < ? GROUP BY 1",
            (start, step, name, start, before),
        ).fetchall()
    buckets = [0.0] * BURN_BUCKETS
    for index, total in rows:
        if index is not None and 0 <= int(index) < BURN_BUCKETS:
            buckets[int(index)] += float(total or 0.0)
    return buckets


# -- the Gate's metrics -------------------------------------------------------------------------


@attrs.frozen
class _LlmSeries:
    """What one kind of worker's entries with one outcome update."""

    requests: CounterCell
    tokens_in: CounterCell
    tokens_out: CounterCell
    cost: CounterCell
    latency: HistogramSeries


class GateMetrics:
    def __init__(
        self,
        *,
        server: TunnelServer,
        inventory: Inventory,
        llm: LlmService | None = None,
        scanner: Scanner | None = None,
        store: StateStore | None = None,
        pg_pools: Callable[[], Sequence[PoolStats]] | None = None,
        pg_audit: AuditLog | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.server = server
        self.inventory = inventory
        self.llm = llm
        self.scanner = scanner
        self.store = store
        self.pg_pools = pg_pools
        self.pg_audit = pg_audit
        self.clock = clock
        self.started_at = clock()
        self.history = History()
        self.failovers: deque[dict[str, Any]] = deque(maxlen=RECENT_FAILOVERS)
        self.burn: dict[str, BurnDown] = {}
        # The series the hooks update, looked up once per label set: the
        # hooks run for every request.
        self._http_series: dict[tuple[str, str, int], tuple[CounterCell, HistogramSeries]] = {}
        self._llm_series: dict[tuple[str, str], _LlmSeries] = {}
        r = self.registry = Registry()
        self.http_requests = r.counter(
            "qmesh_http_requests_total",
            "HTTP requests answered by the Gate, by route as registered and status.",
            ("method", "route", "status"),
        )
        self.http_latency = r.histogram(
            "qmesh_http_request_duration_seconds",
            "Time until the Gate's HTTP response was ready (for a stream: its head).",
            ("route",),
        )
        self.llm_requests = r.counter(
            "qmesh_llm_requests_total",
            "Routed model requests by the kind of worker that answered and outcome.",
            ("kind", "outcome"),
        )
        self.llm_latency = r.histogram(
            "qmesh_llm_request_duration_seconds",
            "Time the answering worker took for a routed request, by kind.",
            ("kind",),
            buckets=LLM_BUCKETS,
        )
        self.llm_tokens = r.counter(
            "qmesh_llm_tokens_total", "Tokens of routed requests.", ("kind", "direction")
        )
        self.llm_cost = r.counter(
            "qmesh_llm_cost_usd_total", "Cost of routed requests in USD, by kind.", ("kind",)
        )
        self.llm_avoided = r.counter(
            "qmesh_llm_avoided_usd_total",
            "What budget shifts to local workers saved against the paid candidate, in USD.",
        )
        self.failover_hops = r.counter(
            "qmesh_llm_failover_hops_total",
            "Attempts that failed over to another candidate, by why.",
            ("outcome",),
        )
        for collect in (
            self._collect_gate,
            self._collect_tunnel,
            self._collect_inventory,
            self._collect_nodes,
            self._collect_router,
            self._collect_budgets,
            self._collect_discovery,
            self._collect_pg_pools,
            self._collect_pg_audit,
        ):
            r.collector(collect)

    # -- hooks --------------------------------------------------------------------------------

    def _http_cells(
        self, method: str, route: str, status: int
    ) -> tuple[CounterCell, HistogramSeries]:
        # Clients choose the method: an unknown one must not mint new series.
        key = (method if method in _METHODS else "other", route, status)
        series = self._http_series.get(key)
        if series is None:
            series = self._http_series[key] = (
                self.http_requests.cell(key[0], route, str(status)),
                self.http_latency.series(route),
            )
        return series

    def observe_http(self, method: str, route: str, status: int, seconds: float) -> None:
        requests, latency = self._http_cells(method, route, status)
        requests.inc()
        latency.observe(seconds)

    def observe_http_many(
        self, method: str, route: str, status: int, seconds: Sequence[float]
    ) -> None:
        requests, latency = self._http_cells(method, route, status)
        requests.inc(len(seconds))
        for value in seconds:
            latency.observe(value)

    def observe_entries(
        self, entries: Sequence[LedgerEntry], hops: Sequence[Sequence[Hop]]
    ) -> None:
        for entry, entry_hops in zip(entries, hops, strict=True):
            self._observe_entry(entry, entry_hops)

    def _observe_entry(self, entry: LedgerEntry, hops: Sequence[Hop]) -> None:
        kind = entry.kind or "none"
        series = self._llm_series.get((kind, entry.outcome))
        if series is None:
            series = self._llm_series[kind, entry.outcome] = _LlmSeries(
                self.llm_requests.cell(kind, entry.outcome),
                self.llm_tokens.cell(kind, "in"),
                self.llm_tokens.cell(kind, "out"),
                self.llm_cost.cell(kind),
                self.llm_latency.series(kind),
            )
        # The cells' values directly, as this runs for every request: only
        # positive amounts, so no counter goes down.
        series.requests.value += 1
        if entry.tokens_in > 0:
            series.tokens_in.value += entry.tokens_in
        if entry.tokens_out > 0:
            series.tokens_out.value += entry.tokens_out
        if entry.cost_usd > 0:
            series.cost.value += entry.cost_usd
        if entry.avoided_usd > 0:
            self.llm_avoided.inc(amount=entry.avoided_usd)
        if entry.budget is not None:
            burn = self.burn.get(entry.budget)
            if burn is not None:
                burn.add(entry.ts, entry.cost_usd)
        failed = []
        for hop in hops:
            outcome = hop.get("outcome")
            if outcome == "ok" and entry.outcome == "ok":
                ms = hop.get("ms")
                series.latency.observe((ms if isinstance(ms, int | float) else 0.0) / 1000)
            elif outcome in _FAILED_HOPS:
                self.failover_hops.inc(str(outcome))
                failed.append(hop)
        if failed:
            self.failovers.append(
                {
                    "ts": entry.ts,
                    "request_id": entry.request_id,
                    "app": entry.app,
                    "task": entry.task,
                    "from": [h.get("candidate") for h in failed],
                    "errors": [str(h.get("error") or h.get("outcome")) for h in failed],
                    "to": entry.candidate or None,
                    "outcome": entry.outcome,
                }
            )

    def attach(self, router: Router) -> None:
        """Hook into the Gate's HTTP router and the request ledger."""
        router.observe = self.observe_http
        router.observe_many = self.observe_http_many
        if self.llm is not None:
            self.llm.ledger.observers.append(self.observe_entries)

    # -- running -------------------------------------------------------------------------------

    def counters(self) -> dict[str, float]:
        out = {
            "http_requests": self.http_requests.total(),
            "llm_requests": self.llm_requests.total(),
            "tokens": self.llm_tokens.total(),
            "cost_usd": self.llm_cost.total(),
        }
        if self.llm is not None:
            out["decisions"] = float(self.llm.router.decisions)
            out["failovers"] = float(self.llm.executor.failovers)
        return out

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Sample the history every second; seed the budgets' burn-downs."""
        task_status.started()
        await self.seed_burn_downs()
        while True:
            self.history.add(self.clock(), self.counters())
            await trio.sleep(HISTORY_STEP_S)

    async def seed_burn_downs(self) -> None:
        if self.llm is None:
            return
        for budget in self.llm.book.budgets.values():
            await self._burn_for(budget)

    async def _burn_for(self, budget: Budget) -> BurnDown:
        burn = self.burn.get(budget.name)
        if burn is not None and burn.start == budget.period_start:
            return burn
        # A new period (or the first look): entries from now on arrive
        # through observe_entries; the ledger table has the ones before.
        burn = BurnDown.for_period(budget.name, budget.period_start, budget.period_end)
        self.burn[budget.name] = burn
        if self.store is not None:
            cutoff = self.started_at if burn.start < self.started_at else burn.start
            try:
                seeded = await trio.to_thread.run_sync(
                    _seed_burn, self.store, budget.name, burn.start, burn.step, cutoff
                )
            except Exception:
                log.exception("reading the ledger for budget %s's burn-down failed", budget.name)
            else:
                for i, value in enumerate(seeded):
                    burn.buckets[i] += value
                burn.seeded = True
        return burn

    async def budget_views(self) -> list[dict[str, Any]]:
        """Each budget's figures, state and burn-down, for the dashboard."""
        if self.llm is None:
            return []
        book = self.llm.book
        now = self.clock()
        out = []
        views = {str(v["budget"]): v for v in book.views()}
        for budget in book.budgets.values():
            burn = await self._burn_for(budget)
            view = dict(views.get(budget.name, {}))
            view["state"] = book.state(budget)
            view["burn"] = burn.points(budget.config.limit_usd, now)
            view["ideal"] = [(burn.start, budget.config.limit_usd), (burn.end, 0.0)]
            out.append(view)
        return out

    def render(self) -> str:
        return self.registry.render()

    # -- collectors (scrape time) ------------------------------------------------------------

    def _collect_gate(self) -> Iterable[Family]:
        yield gauge_family("qmesh_info", "qmesh version.", [({"version": __version__}, 1)])
        yield gauge_family(
            "qmesh_gate_start_time_seconds",
            "When this Gate started (Unix time).",
            [({}, self.started_at)],
        )

    def _collect_pg_pools(self) -> Iterable[Family]:
        pools = self.pg_pools() if self.pg_pools is not None else []
        gauges = (
            ("qmesh_pg_pool_size", "Server connections a pool may hold (the app's pool_size).",
             "size"),
            ("qmesh_pg_pool_server_connections", "Server connections open or being opened.",
             "open"),
            ("qmesh_pg_pool_idle_connections", "Server connections waiting in the pool.", "idle"),
            ("qmesh_pg_pool_waiting_clients", "Clients waiting for a server connection.",
             "waiting"),
            ("qmesh_pg_pool_longest_wait_seconds",
             "How long the client first in line has waited.", "longest_wait_s"),
        )  # fmt: skip
        counters = (
            ("qmesh_pg_pool_waits_total", "Clients that had to wait for a connection.", "waits"),
            ("qmesh_pg_pool_wait_seconds_total", "Time clients spent waiting.", "wait_s_total"),
            ("qmesh_pg_pool_timeouts_total", "Clients refused with 53300 after waiting.",
             "timeouts"),
            ("qmesh_pg_pool_connections_opened_total", "Server logins made by the pool.",
             "opened"),
            ("qmesh_pg_pool_connections_closed_total", "Server connections closed.", "closed"),
            ("qmesh_pg_pool_checks_failed_total",
             "Idle connections that failed their check before reuse.", "checks_failed"),
            ("qmesh_pg_pool_engine_loans_total",
             "Connections the tunnel engine lent and took back itself, without Python.",
             "engine_loans"),
        )  # fmt: skip
        for kind, families in (("gauge", gauges), ("counter", counters)):
            for name, help_text, field in families:
                yield gauge_family(
                    name,
                    help_text,
                    [({"app": p.app_id, "alias": p.alias}, getattr(p, field)) for p in pools],
                    kind=kind,
                )

    def _collect_pg_audit(self) -> Iterable[Family]:
        audit = self.pg_audit
        if audit is None:
            return
        yield gauge_family(
            "qmesh_pg_audit_records_total",
            "Statement audit records: written to the state, dropped (the queue was full),"
            " failed (the database refused their batch), pruned (past the retention).",
            [
                ({"outcome": "written"}, audit.written),
                ({"outcome": "dropped"}, audit.dropped),
                ({"outcome": "failed"}, audit.failed),
                ({"outcome": "pruned"}, audit.pruned),
            ],
            kind="counter",
        )
        yield gauge_family(
            "qmesh_pg_audit_queued_records",
            "Audit records waiting for the writer.",
            [({}, audit.queue.queued)],
        )

    def _collect_tunnel(self) -> Iterable[Family]:
        server = self.server
        sessions = list(server.sessions.values())
        rows: dict[tuple[str, str], int] = {}
        for session in sessions:
            key = (session.peer_role or "?", "true" if session.attached else "false")
            rows[key] = rows.get(key, 0) + 1
        yield gauge_family(
            "qmesh_tunnel_sessions",
            "Tunnel sessions the Gate holds, by peer role and whether a connection is attached.",
            [
                ({"role": role, "attached": attached}, n)
                for (role, attached), n in sorted(rows.items())
            ],
        )
        yield gauge_family(
            "qmesh_tunnel_resumptions_total",
            "Sessions resumed on a new connection after a drop.",
            [({}, server.resumptions)],
            kind="counter",
        )
        yield gauge_family(
            "qmesh_tunnel_handshake_failures_total",
            "Tunnel handshakes refused or failed.",
            [({}, server.handshake_failures)],
            kind="counter",
        )
        yield gauge_family(
            "qmesh_tunnel_session_rtt_seconds",
            "Measured round-trip time per tunnel session.",
            [
                ({"peer": s.peer, "role": s.peer_role or "?"}, s.rtt)
                for s in sessions
                if s.rtt is not None
            ],
        )

        caught, missed = _core.engine_polls()
        yield gauge_family(
            "qmesh_engine_poll_window_seconds",
            "The longest the engine threads poll for work before they sleep"
            " (tunnel.engine_poll_us; 0: they never poll).",
            [({}, _core.engine_poll())],
        )
        yield gauge_family(
            "qmesh_engine_polls_total",
            "Engine threads' polls, by whether they found work or ran out and slept.",
            [({"outcome": "caught"}, caught), ({"outcome": "missed"}, missed)],
            kind="counter",
        )

    def _collect_inventory(self) -> Iterable[Family]:
        nodes = self.inventory.nodes(now=self.clock())
        counts: dict[tuple[str, str], int] = {}
        for kind in {n.kind for n in nodes}:
            for state in NODE_STATES:
                counts[(kind, state)] = 0
        for node in nodes:
            counts[(node.kind, node.state)] = counts.get((node.kind, node.state), 0) + 1
        yield gauge_family(
            "qmesh_inventory_entries",
            "Inventory entries (daemons and discovered services) by kind and state.",
            [({"kind": k, "state": s}, n) for (k, s), n in sorted(counts.items())],
        )
        models: dict[tuple[str, str], int] = {}
        for node in nodes:
            for model in node.models.values():
                key = (node.name, model.state)
                models[key] = models.get(key, 0) + 1
        yield gauge_family(
            "qmesh_inventory_models",
            "Models per inventory entry, by model state (loaded, available, …).",
            [({"node": n, "state": s}, c) for (n, s), c in sorted(models.items())],
        )

    def _collect_nodes(self) -> Iterable[Family]:
        now = self.clock()
        rows: dict[str, Rows] = {name: [] for name, _ in _NODE_FAMILIES}
        for node in self.inventory.nodes(now=now):
            n = {"node": node.name}
            rows["qmesh_node_up"].append(({**n, "kind": node.kind}, node.state == "fresh"))
            rows["qmesh_node_last_seen_age_seconds"].append((n, max(0.0, now - node.last_seen)))
            telemetry = node.telemetry or {}
            host = telemetry.get("host")
            if isinstance(host, dict):
                average = host.get("load_avg")
                for family, value in (
                    ("qmesh_node_cpu_percent", host.get("cpu_percent")),
                    (
                        "qmesh_node_load1",
                        average[0] if isinstance(average, list) and average else None,
                    ),
                    ("qmesh_node_memory_total_bytes", host.get("ram_total")),
                    ("qmesh_node_memory_available_bytes", host.get("ram_available")),
                ):
                    _maybe(rows[family], n, value)
            for gpu in telemetry.get("gpus") or ():
                if not isinstance(gpu, dict):
                    continue
                g = {**n, "gpu": str(gpu.get("index", "?")), "name": str(gpu.get("name", ""))}
                for family, key in _GPU_FIELDS:
                    _maybe(rows[family], g, gpu.get(key))
            for model in node.models.values():
                if node.kind == "daemon" or model.queue_depth:
                    rows["qmesh_node_model_queue_depth"].append(
                        ({**n, "model": model.id}, model.queue_depth)
                    )
        for name, help_text in _NODE_FAMILIES:
            yield gauge_family(name, help_text, rows[name])

    def _collect_router(self) -> Iterable[Family]:
        if self.llm is None:
            return
        yield gauge_family(
            "qmesh_route_decisions_total",
            "Routing decisions made by the capability router.",
            [({}, self.llm.router.decisions)],
            kind="counter",
        )
        yield gauge_family(
            "qmesh_route_failovers_total",
            "Attempts that failed and moved to another candidate.",
            [({}, self.llm.executor.failovers)],
            kind="counter",
        )
        ledger = self.llm.ledger
        yield gauge_family(
            "qmesh_ledger_pending_rows",
            "Request ledger rows, control audit events and kept prompts waiting for the"
            " writer: from 8192 the Gate paces new requests to the writer; at 100000 it"
            " refuses them (503 ledger_unavailable).",
            [({}, ledger.pending)],
        )
        yield gauge_family(
            "qmesh_ledger_written_rows_total",
            "Request ledger rows written to the state.",
            [({}, ledger.written)],
            kind="counter",
        )
        yield gauge_family(
            "qmesh_route_candidates",
            "Candidates the router can choose from, by kind.",
            [
                ({"kind": k}, n)
                for k, n in sorted(_count(c.kind for c in self.llm.router.candidates).items())
            ],
        )

    def _collect_budgets(self) -> Iterable[Family]:
        if self.llm is None:
            return
        book = self.llm.book
        now = self.clock()
        limit, spent, reserved, projected, state, blocked, shifted = [], [], [], [], [], [], []
        for view in book.views():
            name = str(view["budget"])
            budget = book.budgets[name]
            b = {"budget": name}
            limit.append(
                (
                    {**b, "period": str(view["period"]), "mode": str(view["mode"])},
                    budget.config.limit_usd,
                )
            )
            spent.append((b, budget.spent))
            reserved.append((b, budget.reserved))
            projected.append((b, budget.projected(now)))
            current = book.state(budget)
            for s in BUDGET_STATES:
                state.append(({**b, "state": s}, 1 if s == current else 0))
            blocked.append((b, budget.blocked))
            shifted.append((b, budget.shifted))
        yield gauge_family("qmesh_budget_limit_usd", "Budget limit per period.", limit)
        yield gauge_family("qmesh_budget_spent_usd", "Spent this period.", spent)
        yield gauge_family("qmesh_budget_reserved_usd", "Held for requests in flight.", reserved)
        yield gauge_family(
            "qmesh_budget_projected_usd",
            "Spend projected to the period's end at the burn rate so far.",
            projected,
        )
        yield gauge_family(
            "qmesh_budget_state", "1 for the budget's current state (ok, shift, block).", state
        )
        yield gauge_family(
            "qmesh_budget_blocked_total",
            "Paid requests a hard budget refused this period.",
            blocked,
            kind="counter",
        )
        yield gauge_family(
            "qmesh_budget_shifted_total",
            "Requests shifted to local workers this period.",
            shifted,
            kind="counter",
        )

    def _collect_discovery(self) -> Iterable[Family]:
        scanner = self.scanner
        if scanner is None:
            return
        yield gauge_family(
            "qmesh_discovery_targets", "Addresses the scanner probes.", [({}, len(scanner.targets))]
        )
        yield gauge_family(
            "qmesh_discovery_scans_total", "Completed scans.", [({}, scanner.scans)], kind="counter"
        )
        last = scanner.last
        if last is not None and last.duration_s is not None:
            yield gauge_family(
                "qmesh_discovery_last_scan_duration_seconds",
                "How long the last scan took.",
                [({}, last.duration_s)],
            )


def _maybe(rows: Rows, labels: dict[str, str], value: object) -> None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        rows.append((labels, float(value)))


def _count(items: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return out
