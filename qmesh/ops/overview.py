"""What the dashboard shows: one JSON snapshot of the whole mesh.

For: :class:`Overview`, which assembles the single pane of glass from the
parts that hold the facts — nodes (the daemons connected to this Gate)
with CPU, GPUs, memory, load and their models; services found by scans;
every model in one list with where it runs and its quantization; routing
(decisions and requests per second from :class:`~qmesh.ops.metrics.History`,
recent decisions, recent failovers); budgets with their burn-down;
tunnel sessions; the scanner's state; and an overall health verdict with
the reasons behind it. It copies figures out and never changes anything.

Where a part is missing (no capability service, no budgets configured,
no discovery targets) its section says so in ``note`` instead of being
absent, so the page can explain an empty panel.

Not for: HTTP, auth or streaming (:mod:`qmesh.ops.api`), or the
page itself (``qmesh/web/static/``).
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from qmesh import __version__
from qmesh.cluster.fabric import edge_sessions
from qmesh.fleet.inventory import Inventory, InventoryModel, Node
from qmesh.ops.metrics import GateMetrics
from qmesh.tunnel import TunnelServer

if TYPE_CHECKING:
    from qmesh.fleet.discovery import Scanner
    from qmesh.llm.service import LlmService

__all__ = ["Overview"]

RECENT_DECISIONS: Final = 12
SERIES_POINTS: Final = 300
"""Five minutes of per-second rates for the charts."""
NOT_SERVICES: Final = frozenset({"absent", "unknown"})


def _model_view(model: InventoryModel, node: Node) -> dict[str, Any]:
    meta = model.metadata
    size = meta.get("file_size") or meta.get("size")
    return {
        "id": model.id,
        "node": node.name,
        "node_kind": node.kind,
        "node_state": node.state,
        "runtime": model.runtime,
        "state": model.state,
        "quantization": model.quantization,
        "parameters": model.parameters,
        "context_length": model.context_length,
        "family": model.family,
        "size_class": model.size_class,
        "size_bytes": size if isinstance(size, int) else None,
        "active": model.active,
        "queue_depth": model.queue_depth,
        "busy": model.busy,
        "predicted_tps": model.predicted_tps,
        "served_as": meta.get("served_as"),
    }


def _node_view(node: Node, now: float) -> dict[str, Any]:
    telemetry = node.telemetry or {}
    raw_host = telemetry.get("host")
    host: dict[str, Any] = raw_host if isinstance(raw_host, dict) else {}
    gpus = [
        {
            "index": g.get("index"),
            "name": g.get("name"),
            "utilization_pct": g.get("utilization_pct"),
            "vram_total": g.get("vram_total"),
            "vram_used": g.get("vram_used"),
            "temperature_c": g.get("temperature_c"),
            "power_w": g.get("power_w"),
            "power_limit_w": g.get("power_limit_w"),
        }
        for g in telemetry.get("gpus") or ()
        if isinstance(g, dict)
    ]
    return {
        "name": node.name,
        "kind": node.kind,
        "source": node.source,
        "gate": node.gate,
        "state": node.state,
        "reason": node.reason,
        "state_since": node.state_since,
        "address": node.address,
        "version": node.version,
        "age_s": round(max(0.0, now - node.last_seen), 2),
        "heartbeat_interval_s": node.heartbeat_interval_s,
        "cpu": {
            "percent": host.get("cpu_percent"),
            "cores": host.get("cpus_logical"),
            "load": host.get("load_avg"),
        },
        "ram": {"total": host.get("ram_total"), "available": host.get("ram_available")},
        "bandwidth_gbps": host.get("memory_bandwidth_gbps"),
        "gpus": gpus,
        "cpu_only": telemetry.get("cpu_only", not gpus),
        "nvml": telemetry.get("nvml"),
        "model_memory": node.extra.get("memory"),
        "runtimes": [
            {k: r.get(k) for k in ("name", "kind", "healthy", "health", "url")}
            for r in node.runtimes
            if isinstance(r, dict)
        ],
        "health_port": node.extra.get("health"),
        "models": [_model_view(m, node) for m in node.models.values()],
    }


def _service_view(node: Node, now: float) -> dict[str, Any]:
    extra = node.extra
    return {
        "name": node.name,
        "kind": node.kind,
        "server": extra.get("server"),
        "version": node.version,
        "source": node.source,
        "state": node.state,
        "reason": node.reason,
        "state_since": node.state_since,
        "first_seen": node.first_seen,
        "last_seen": node.last_seen,
        "age_s": round(max(0.0, now - node.last_seen), 2),
        "managed_by": extra.get("managed_by"),
        "probe_ms": extra.get("probe_ms"),
        "models": [_model_view(m, node) for m in node.models.values()],
    }


class Overview:
    def __init__(
        self,
        *,
        name: str,
        inventory: Inventory,
        server: TunnelServer,
        metrics: GateMetrics,
        scanner: Scanner | None = None,
        llm: LlmService | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self.inventory = inventory
        self.server = server
        self.metrics = metrics
        self.scanner = scanner
        self.llm = llm
        self.clock = clock
        self.hostname = platform.node()

    async def snapshot(self) -> dict[str, Any]:
        now = self.clock()
        everything = self.inventory.nodes(now=now)
        daemons = [n for n in everything if n.kind == "daemon"]
        found = [n for n in everything if n.kind != "daemon"]
        nodes = [_node_view(n, now) for n in daemons]
        services = [_service_view(n, now) for n in found]
        models = [m for n in nodes for m in n["models"]]
        models += [m for s in services for m in s["models"]]
        models.sort(key=lambda m: (m["state"] != "loaded", m["id"], m["node"]))
        budgets = await self._budgets()
        routing = self._routing(now)
        discovery = None if self.scanner is None else self.scanner.view()
        return {
            "gate": {
                "name": self.name,
                "version": __version__,
                "host": self.hostname,
                "now": now,
                "uptime_s": round(now - self.metrics.started_at, 1),
            },
            "health": _health(daemons, found, budgets["items"], self.server),
            "summary": _summary(daemons, found, models, self.server),
            "nodes": nodes,
            "services": services,
            "models": models,
            "routing": routing,
            "budgets": budgets,
            "tunnel": {
                "sessions": [
                    {
                        "peer": s.peer,
                        "role": s.peer_role,
                        "attached": s.attached,
                        "streams": s.stream_count,
                        "rtt_ms": None if s.rtt is None else round(s.rtt * 1000, 2),
                    }
                    for s in self.server.sessions.values()
                ],
                "resumptions": self.server.resumptions,
                "handshake_failures": self.server.handshake_failures,
            },
            "discovery": discovery,
            "thresholds": {
                "stale_after_missed": self.inventory.stale_after_missed,
                "gone_after_missed": self.inventory.gone_after_missed,
            },
            "version": self.inventory.version,
        }

    def _routing(self, now: float) -> dict[str, Any]:
        history = self.metrics.history
        out: dict[str, Any] = {
            "available": self.llm is not None,
            "note": None,
            "http_requests_per_s": round(history.rate("http_requests"), 3),
            "series": {
                "requests": history.rates("llm_requests", points=SERIES_POINTS),
                "http": history.rates("http_requests", points=SERIES_POINTS),
            },
            "recent_failovers": list(self.metrics.failovers)[-10:][::-1],
            "tokens_total": self.metrics.llm_tokens.total(),
            "cost_usd_total": round(self.metrics.llm_cost.total(), 6),
            "llm_requests_total": self.metrics.llm_requests.total(),
        }
        if self.llm is None:
            out["note"] = "The capability router is not running on this Gate."
            return out
        router = self.llm.router
        out["decisions_total"] = router.decisions
        out["decisions_per_s"] = round(history.rate("decisions"), 3)
        out["failovers_total"] = self.llm.executor.failovers
        out["series"]["decisions"] = history.rates("decisions", points=SERIES_POINTS)
        out["series"]["failovers"] = history.rates("failovers", points=SERIES_POINTS)
        out["candidates"] = len(router.candidates)
        recent = list(router.recent)[-RECENT_DECISIONS:][::-1]
        out["recent_decisions"] = [
            {
                "dsn": d.dsn.format(),
                "chosen": d.chosen.id,
                "model": d.chosen.model,
                "kind": d.chosen.kind,
                "reason": d.reason,
                "fallbacks": len(d.fallbacks),
                "decision_us": round(d.elapsed_us, 1),
            }
            for d in recent
        ]
        if not router.decisions:
            out["note"] = "No routed requests yet: decisions appear here as /v1/* calls arrive."
        return out

    async def _budgets(self) -> dict[str, Any]:
        if self.llm is None:
            return {"items": [], "note": "The capability router is not running on this Gate."}
        items = await self.metrics.budget_views()
        note = None
        if not items:
            note = (
                "No budgets configured: add [[gate.budgets]] to the Gate's config "
                "(limit_usd, period, apps) to see burn-down here."
            )
        return {"items": items, "note": note}


def _summary(
    daemons: list[Node], found: list[Node], models: list[dict[str, Any]], server: TunnelServer
) -> dict[str, Any]:
    states = {state: 0 for state in ("fresh", "stale", "gone")}
    for node in daemons:
        states[node.state] = states.get(node.state, 0) + 1
    services = [n for n in found if n.kind not in NOT_SERVICES]
    gpus = sum(len((n.telemetry or {}).get("gpus") or ()) for n in daemons if n.state != "gone")
    return {
        "nodes": states,
        "services": len(services),
        "services_fresh": sum(1 for n in services if n.state == "fresh"),
        "unreachable": sum(1 for n in found if n.kind in NOT_SERVICES),
        "gpus": gpus,
        "models": len(models),
        "models_loaded": sum(1 for m in models if m["state"] == "loaded"),
        "sessions": edge_sessions(server),
    }


def _health(
    daemons: list[Node], found: list[Node], budgets: list[dict[str, Any]], server: TunnelServer
) -> dict[str, Any]:
    """``ok``, ``warn`` or ``bad`` with what made it so."""
    problems: list[dict[str, str]] = []
    for node in daemons:
        if node.state != "fresh":
            level = "bad" if node.state == "gone" else "warn"
            problems.append({"level": level, "what": f"node {node.name} is {node.state}",
                             "why": node.reason})  # fmt: skip
    for node in found:
        if node.kind not in NOT_SERVICES and node.state != "fresh":
            problems.append({"level": "warn", "what": f"{node.kind} at {node.name} is "
                             f"{node.state}", "why": node.reason})  # fmt: skip
    for budget in budgets:
        if budget.get("state") == "block":
            problems.append({"level": "bad", "what": f"budget {budget.get('budget')} is spent",
                             "why": "paid providers are blocked"})  # fmt: skip
        elif budget.get("state") == "shift":
            problems.append({"level": "warn", "what": f"budget {budget.get('budget')} is burning "
                             "fast", "why": "work shifts to local workers"})  # fmt: skip
    levels = {p["level"] for p in problems}
    status = "bad" if "bad" in levels else "warn" if levels else "ok"
    if not daemons and not found:
        status = "warn"
        problems.append({"level": "warn", "what": "no nodes yet",
                         "why": "no daemon has reported and no scan found a service"})  # fmt: skip
    return {"status": status, "problems": problems}
