"""The Gate's inventory: every compute node it knows, its models and whether it is alive.

For: :class:`Inventory`, a plain in-memory table of :class:`Node` records
fed by whatever reports nodes (the daemons' ``inventory`` streams,
:mod:`qmesh.fleet.daemons`, and the Gate's scans of configured addresses,
:mod:`qmesh.fleet.discovery`, through :meth:`Inventory.observe` and
:meth:`Inventory.missed`), with liveness derived from
heartbeats: a node is ``fresh`` while heartbeats arrive, ``stale`` once it
has missed ``stale_after_missed`` of them (at the interval the node itself
announced), ``gone`` after ``gone_after_missed`` — or at once when its
session ends for good. Every state change records a human-readable
``reason`` and the time it happened. A node that reports again is fresh.

Sans-IO: no sockets, no tasks, and the time is passed in (``now``), so the
state table is tested without sleeping. The Gate's sweeper task calls
:meth:`Inventory.sweep` periodically; queries sweep first, so what they
return is exact at the moment of the call.

The data model is deliberately general (``kind``, ``source``, ``address``,
``version``, models with free-form metadata) so other node kinds and
sources fit without changing it. The router (:mod:`qmesh.llm`) reads
:meth:`Inventory.nodes` and :attr:`Node.models`.

Not for: talking to nodes (:mod:`qmesh.fleet.daemons`), HTTP
(:mod:`qmesh.fleet.api`) or persistence (it is rebuilt from reports
after a Gate restart: daemons reconnect and report in full).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Final

import attrs

__all__ = ["NODE_STATES", "Inventory", "InventoryModel", "Node", "Transition"]

log = logging.getLogger(__name__)

NODE_STATES: Final = ("fresh", "stale", "gone")
STALL_SLACK_S: Final = 0.25
"""The Gate's sweeper running later than this is the Gate held up, not the nodes."""


@attrs.frozen
class InventoryModel:
    """One model on one node. ``metadata`` is everything the node said about it."""

    id: str
    runtime: str
    state: str
    """``available`` (on disk), ``loading``, ``loaded``, ``unloading``, ``failed``."""
    stopped: bool = False
    """An operator took it out of service on its node (``qmesh models stop``)."""
    error: str | None = None
    """Why it is ``failed``, as the node said."""
    family: str | None = None
    size_class: str | None = None
    equivalence: str | None = None
    quantization: str | None = None
    parameters: int | None = None
    context_length: int | None = None
    chat_template: bool | None = None
    queue_depth: int = 0
    active: int = 0
    busy: bool = False
    predicted_tps: float | None = None
    metadata: Mapping[str, Any] = attrs.field(factory=dict)

    @classmethod
    def from_report(cls, data: Mapping[str, Any]) -> InventoryModel:
        def opt(key: str, kind: type | tuple[type, ...]) -> Any:
            value = data.get(key)
            if kind is bool:
                return value if isinstance(value, bool) else None
            # bool is an int in Python; a true/false is never a count here.
            return value if isinstance(value, kind) and not isinstance(value, bool) else None

        return cls(
            id=str(data.get("id", "")),
            runtime=str(data.get("runtime", "")),
            state=str(data.get("state", "available")),
            stopped=data.get("stopped") is True,
            error=opt("error", str),
            family=opt("family", str),
            size_class=opt("size_class", str),
            equivalence=opt("equivalence", str),
            quantization=opt("quantization", str),
            parameters=opt("parameters", int),
            context_length=opt("context_length", int),
            chat_template=opt("chat_template", bool),
            queue_depth=int(data.get("queue_depth") or 0),
            active=int(data.get("active") or 0),
            busy=bool(data.get("busy")),
            predicted_tps=opt("predicted_tps", (int, float)),
            metadata=dict(data),
        )

    def with_load(self, load: Mapping[str, Any]) -> InventoryModel:
        return attrs.evolve(
            self,
            queue_depth=int(load.get("queue_depth") or 0),
            active=int(load.get("active") or 0),
            busy=bool(load.get("busy")),
        )

    def to_json(self) -> dict[str, Any]:
        data = attrs.asdict(self)
        data["metadata"] = dict(self.metadata)
        return data


@attrs.define(eq=False)
class Node:
    name: str
    kind: str
    """``daemon`` today; the field is for other kinds of worker."""
    source: str
    """Who told the Gate about it: ``tunnel`` for a daemon's own report."""
    address: str | None = None
    """Where the node connects from (its host name and the peer address the Gate sees)."""
    version: str | None = None
    first_seen: float = 0.0
    last_seen: float = 0.0
    state: str = "fresh"
    reason: str = ""
    state_since: float = 0.0
    heartbeat_interval_s: float = 5.0
    models: dict[str, InventoryModel] = attrs.field(factory=dict)
    telemetry: dict[str, Any] | None = None
    runtimes: list[dict[str, Any]] = attrs.field(factory=list)
    extra: dict[str, Any] = attrs.field(factory=dict)
    reports: int = 0
    gate: str | None = None
    """The Gate of the cluster the node is attached to, when not this one
    (its reports and requests go through that Gate: qmesh.cluster.fabric)."""
    connection: object | None = None
    """The report stream's owner (the tunnel session); not serialized."""

    def to_json(self, *, now: float) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "source": self.source,
            "address": self.address,
            "version": self.version,
            "state": self.state,
            "reason": self.reason,
            "state_since": self.state_since,
            "first_seen": self.first_seen,
            "last_seen": self.last_seen,
            "seconds_since_seen": round(max(0.0, now - self.last_seen), 3),
            "heartbeat_interval_s": self.heartbeat_interval_s,
            "models": [m.to_json() for m in self.models.values()],
            "telemetry": self.telemetry,
            "runtimes": self.runtimes,
            "reports": self.reports,
            "gate": self.gate,
            **({"extra": self.extra} if self.extra else {}),
        }


@attrs.frozen
class Transition:
    node: str
    old: str
    new: str
    reason: str


class Inventory:
    """Nodes by name. Every method takes ``now`` (seconds, wall clock)."""

    def __init__(self, *, stale_after_missed: int = 3, gone_after_missed: int = 12) -> None:
        if not 1 <= stale_after_missed < gone_after_missed:
            raise ValueError("need 1 <= stale_after_missed < gone_after_missed")
        self.stale_after_missed = stale_after_missed
        self.gone_after_missed = gone_after_missed
        self._nodes: dict[str, Node] = {}
        self.version = 0
        """Bumped on every change, so pollers (the router) can skip rebuilding."""
        self.models_version = 0
        """Bumped when a node changes state or its models (ids, states,
        stopped) change — not by a heartbeat's load figures: cheap enough for
        the router to check before every decision."""
        self.listening: tuple[float, float] | None = None
        """``(when, interval)``: the Gate's sweeper last ran at ``when`` and runs
        every ``interval`` s (None: no sweeper; every sweep then applies)."""

    # -- reports --------------------------------------------------------------

    def hello(
        self,
        name: str,
        *,
        now: float,
        kind: str,
        source: str,
        connection: object | None,
        address: str | None = None,
        version: str | None = None,
        heartbeat_interval_s: float = 5.0,
        extra: Mapping[str, Any] | None = None,
        gate: str | None = None,
    ) -> Node:
        """A node (re)introduced itself: it is fresh, and its report channel
        is ``connection`` (at the Gate ``gate``, when not this one)."""
        node = self._nodes.get(name)
        if node is None:
            node = Node(name=name, kind=kind, source=source, first_seen=now, state_since=now)
            node.state = "new"  # replaced below; lets _set log the first transition
            self._nodes[name] = node
        node.kind, node.source = kind, source
        node.address, node.version = address, version
        node.heartbeat_interval_s = max(heartbeat_interval_s, 0.001)
        node.extra = dict(extra or {})
        if node.gate != gate:
            node.gate = gate
            self.models_version += 1  # the same models, reached another way
        node.connection = connection
        node.last_seen = now
        self._set(node, "fresh", "reported in", now)
        self.version += 1
        return node

    def report(
        self,
        name: str,
        *,
        now: float,
        models: list[Mapping[str, Any]] | None = None,
        telemetry: dict[str, Any] | None = None,
        runtimes: list[dict[str, Any]] | None = None,
        load: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> Node | None:
        """A full inventory (``models`` given) or a heartbeat (``load`` only)."""
        node = self._nodes.get(name)
        if node is None:
            return None
        node.last_seen = now
        node.reports += 1
        if models is not None:
            before = _model_states(node)
            node.models = {m.id: m for m in map(InventoryModel.from_report, models) if m.id}
            if _model_states(node) != before:
                self.models_version += 1
        if load:
            for model_id, figures in load.items():
                model = node.models.get(model_id)
                if model is not None:
                    node.models[model_id] = model.with_load(figures)
        if telemetry is not None:
            node.telemetry = telemetry
        if runtimes is not None:
            node.runtimes = runtimes
        if node.state != "fresh":
            self._set(node, "fresh", "heartbeats resumed", now)
        self.version += 1
        return node

    def model_changed(self, name: str, model_id: str, *, state: str, stopped: bool) -> None:
        """A node confirmed an operator's change to one model (stop, start,
        unload): true at once, before its next full report says so too."""
        node = self._nodes.get(name)
        model = None if node is None else node.models.get(model_id)
        if node is None or model is None:
            return
        node.models[model_id] = attrs.evolve(model, state=state, stopped=stopped)
        self.version += 1
        self.models_version += 1

    def disconnected(
        self, name: str, connection: object | None, *, now: float, reason: str
    ) -> None:
        """The report channel ``connection`` ended for good. Ignored if the
        node has since reported on a newer one."""
        node = self._nodes.get(name)
        if node is None or node.connection is not connection:
            return
        node.connection = None
        if node.state != "gone":
            self._set(node, "gone", reason, now)
            self.version += 1

    # -- scans (qmesh.fleet.discovery) ---------------------------------------------

    def observe(
        self,
        name: str,
        *,
        now: float,
        kind: str,
        source: str,
        address: str,
        reason: str,
        interval_s: float,
        version: str | None = None,
        models: list[Mapping[str, Any]] | None = None,
        extra: Mapping[str, Any] | None = None,
        telemetry: dict[str, Any] | None = None,
        answered: bool = True,
    ) -> Node:
        """A scan checked ``name``. ``answered``: something is there (fresh,
        ``last_seen`` moves); otherwise the entry is recorded as gone — a
        configured address where nothing ever answered. ``interval_s``
        (the scan period) plays the heartbeat's part in :meth:`sweep`."""
        node = self._nodes.get(name)
        if node is None:
            node = Node(name=name, kind=kind, source=source, first_seen=now, state_since=now)
            node.state = "new"  # replaced below; lets _set log the first transition
            node.last_seen = now
            self._nodes[name] = node
        node.kind, node.source, node.address, node.version = kind, source, address, version
        node.heartbeat_interval_s = max(interval_s, 0.001)
        node.extra = dict(extra or {})
        if models is not None:
            node.models = {m.id: m for m in map(InventoryModel.from_report, models) if m.id}
        if telemetry is not None:
            node.telemetry = telemetry
        node.reports += 1
        if answered:
            node.last_seen = now
        self._set(node, "fresh" if answered else "gone", reason, now)
        self.version += 1
        return node

    def missed(self, name: str, *, now: float, gone: bool, reason: str) -> Transition | None:
        """A scan no longer finds ``name``: stale (or ``gone``) with the reason;
        ``last_seen`` stays when it last answered. Returns the change, if any."""
        node = self._nodes.get(name)
        if node is None:
            return None
        target = "gone" if gone or node.state == "gone" else "stale"
        old = node.state
        self._set(node, target, reason, now)
        self.version += 1
        return None if old == target else Transition(name, old, target, reason)

    # -- liveness ---------------------------------------------------------------

    def excuse(self, seconds: float, *, now: float) -> None:
        """The Gate itself did not run for ``seconds`` (its machine was
        overloaded, its process stopped): heartbeats that arrived then are
        still unread in its sockets, so that time is not the nodes' silence.
        Called by the sweeper, which notices it woke up late."""
        for node in self._nodes.values():
            node.last_seen = min(now, node.last_seen + seconds)

    def sweep(self, now: float) -> list[Transition]:
        """Apply the missed-heartbeat thresholds; returns what changed.

        Skipped while the sweeper is overdue (see :attr:`listening`): the
        Gate has just been held up and has not read the heartbeats waiting
        for it yet; judging now would turn a slow, connected node stale or
        gone — dropped by the router, every request on it failing — until
        its next heartbeat. The sweeper excuses the stall when it runs.
        """
        if self.listening is not None:
            when, interval = self.listening
            if now - when > interval + STALL_SLACK_S:
                return []
        changes: list[Transition] = []
        for node in self._nodes.values():
            silent = now - node.last_seen
            missed = silent / node.heartbeat_interval_s
            if missed >= self.gone_after_missed:
                target, limit = "gone", self.gone_after_missed
            elif missed >= self.stale_after_missed:
                target, limit = "stale", self.stale_after_missed
            else:
                continue  # fresh nodes turn fresh again only by reporting
            # A node that left on purpose stays gone; a gone node never goes back to stale.
            if node.state == target or (node.state == "gone" and target == "stale"):
                continue
            old = node.state
            why = (
                f"no heartbeat for {silent:.1f}s "
                f"({limit} missed at {node.heartbeat_interval_s:g}s intervals)"
            )
            self._set(node, target, why, now)
            changes.append(Transition(node.name, old, target, why))
        if changes:
            self.version += 1
        return changes

    def _set(self, node: Node, state: str, reason: str, now: float) -> None:
        if node.state != state:
            log.info("node %s: %s → %s (%s)", node.name, node.state, state, reason)
            node.state = state
            node.state_since = now
            self.models_version += 1
        node.reason = reason

    # -- queries ------------------------------------------------------------------

    def get(self, name: str, *, now: float) -> Node | None:
        self.sweep(now)
        return self._nodes.get(name)

    def nodes(
        self,
        *,
        now: float,
        kind: str | None = None,
        state: str | None = None,
        model: str | None = None,
    ) -> list[Node]:
        """Nodes matching every filter given; ``model`` matches a model id or
        an equivalence key (``gemma3:270m``)."""
        self.sweep(now)
        found = []
        for node in sorted(self._nodes.values(), key=lambda n: n.name):
            if kind is not None and node.kind != kind:
                continue
            if state is not None and node.state != state:
                continue
            if model is not None and not any(
                m.id == model or m.equivalence == model for m in node.models.values()
            ):
                continue
            found.append(node)
        return found

    def forget(self, name: str) -> bool:
        """Drop a node entirely (an operator decommissioned it)."""
        self.version += 1
        return self._nodes.pop(name, None) is not None


def _model_states(node: Node) -> list[tuple[str, str, bool]]:
    return [(m.id, m.state, m.stopped) for m in node.models.values()]
