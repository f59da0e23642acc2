"""What the router chooses between: a :class:`Candidate` per (who, model).

For: the one shape the router sees for every kind of worker — an internal
skill, a model on a daemon, a remote provider's model — with its static
facts (tasks, context, price, privacy class, quality tier, equivalence
group) and its live telemetry (queue depth, latency EWMA, tokens/s, free
memory, health, cool-down). Telemetry is updated in place by whoever
observes it (the inventory, the executor after each request).

Not for: running anything (a candidate holds an opaque ``backend`` the
executor knows how to call) or scoring (:mod:`qmesh.qg.router`).
"""

from __future__ import annotations

from typing import Any, Final

import attrs

__all__ = ["DAEMON", "INTERNAL", "PROVIDER", "SIZE_TIERS", "Candidate"]

INTERNAL: Final = "internal"
DAEMON: Final = "daemon"
PROVIDER: Final = "provider"

SIZE_TIERS: Final = {"xs": 1, "s": 2, "m": 3, "l": 4, "xl": 5}
"""Size class → quality tier. Internal skills are tier 0: fast, not clever."""

EWMA_ALPHA: Final = 0.2


@attrs.define(eq=False, slots=True)
class Candidate:
    """One routable (worker, model). Identity is ``id``; compare by it."""

    id: str
    """``skill:summarize``, ``node:gpu-1/gemma3-270m``, ``provider:acme/gpt-x``."""
    kind: str
    """:data:`INTERNAL`, :data:`DAEMON` or :data:`PROVIDER`."""
    model: str
    """The model id a client may name (``/v1/models`` lists it)."""
    tasks: frozenset[str]
    family: str | None = None
    size_class: str | None = None
    equivalence: str | None = None
    """Group of interchangeable models: config's, else ``family:size_class``."""
    node: str | None = None
    """The daemon or provider name: a cool-down applies to all its candidates."""
    local: bool = True
    """This site's hardware (internal skills, this site's daemons): ``privacy=local``."""
    private: bool = True
    """Never leaves the operator's control: ``privacy=private`` allows it."""
    context: int = 8192
    price_in: float = 0.0
    """USD per 1M input tokens (providers)."""
    price_out: float = 0.0
    local_rate: float = 0.0
    """USD per 1M tokens for local work, when a flat rate is configured."""
    power_w: float = 0.0
    """Power drawn while it works: local cost is power × time × electricity price."""
    quality: int = 0
    """Tier: 0 internal skill, 1..5 by size class; config may set it for providers."""
    latency_ms: float = 1.0
    """Expected latency of one request: configured, then the measured EWMA."""
    tokens_per_s: float = 0.0
    queue_depth: int = 0
    queue_limit: int = 0
    """0: no limit known."""
    free_memory_mb: float | None = None
    min_free_memory_mb: float = 0.0
    busy: bool = False
    """The node says this model cannot take more work now."""
    healthy: bool = True
    """False while the inventory says stale or gone."""
    out_of_service: str | None = None
    """Why its node will not run it at all now (an operator stopped it, it
    failed to load); None when it may be chosen."""
    cool_until: float = 0.0
    """Monotonic time before which it is not chosen (failed recently)."""
    order: int = 0
    """Configuration order: the last tie-breaker, so decisions are stable."""
    upstream_model: str = ""
    """The worker's own name for the model, when it differs from ``model``."""
    backend: Any = attrs.field(default=None, repr=False)
    """What the executor calls: a Skill, a provider client, a daemon handle."""
    # Derived, set by refresh(); read on the hot path.
    paid: bool = False
    names: frozenset[str] = frozenset()

    def __attrs_post_init__(self) -> None:
        self.refresh()

    def refresh(self) -> None:
        """Recompute the derived fields after a static field changed."""
        self.paid = self.kind == PROVIDER and (self.price_in > 0 or self.price_out > 0)
        names = {self.model, self.id}
        if self.family:
            names.add(self.family)
        if self.equivalence:
            names.add(f"equiv:{self.equivalence}")
        self.names = frozenset(names)

    # -- estimates ---------------------------------------------------------

    def cost(self, tokens_in: int, tokens_out: int) -> float:
        """USD for a request of this size."""
        if self.kind == PROVIDER:
            return (self.price_in * tokens_in + self.price_out * tokens_out) / 1e6
        return self.local_rate * (tokens_in + tokens_out) / 1e6

    def expected_latency_ms(self) -> float:
        """Latency of a request queued now: the EWMA, once per request ahead."""
        return self.latency_ms * (1 + self.queue_depth)

    def busy_reason(self) -> str | None:
        if self.busy:
            return f"busy: its node reports it full (queue {self.queue_depth})"
        if self.queue_limit and self.queue_depth >= self.queue_limit:
            return f"busy: queue {self.queue_depth}/{self.queue_limit}"
        if self.free_memory_mb is not None and self.free_memory_mb < self.min_free_memory_mb:
            return (
                f"busy: {self.free_memory_mb:.0f} MB free, needs {self.min_free_memory_mb:.0f} MB"
            )
        return None

    def observe_latency(self, latency_ms: float) -> None:
        self.latency_ms += EWMA_ALPHA * (latency_ms - self.latency_ms)
