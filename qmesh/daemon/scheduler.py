"""Which models are resident, and who waits for what: swapping and queueing.

For: :class:`Scheduler`. Requests enter through :meth:`Scheduler.use`,
which (1) refuses with :class:`~qmesh.daemon.errors.Busy` when the model's
queue already holds ``queue_limit`` waiting requests — the Gate then sends
the work elsewhere; (2) makes the model resident: a model that is loading
is waited for, not failed; a model that does not fit the memory budget
evicts the least recently used idle models of memory-managed runtimes
(llama.cpp) until it fits, or waits for one to become idle; (3) limits
concurrent generations per model (``parallel``). :meth:`Scheduler.models`
is the per-model state the inventory reports: state, queue depth, active
requests, busy, loads and evictions. :meth:`Scheduler.stop` takes a model
out of service (new requests are refused at once with
:class:`~qmesh.daemon.errors.ModelStopped`, those already admitted finish,
then it is unloaded) until :meth:`Scheduler.start`.

Invariants: a model with requests running or waiting is never evicted;
memory is reserved (state ``loading``) before the load starts, so two loads
cannot both squeeze into the same free space; the budget counts only
runtimes whose memory this daemon controls (``Runtime.manages_memory``).

Not for: how a model is loaded (the runtimes) or what the node reports
(:mod:`qmesh.daemon.node`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

from qmesh.daemon.errors import (
    Busy,
    DaemonError,
    LoadFailed,
    ModelStopped,
    RuntimeFailed,
    UnknownModel,
)
from qmesh.daemon.runtimes.base import Health, Runtime, RuntimeModel

__all__ = ["Scheduler", "Slot"]

log = logging.getLogger(__name__)


@attrs.define(eq=False)
class Slot:
    """One model of one runtime, as the scheduler tracks it."""

    runtime: Runtime
    model: RuntimeModel
    limiter: trio.CapacityLimiter
    state: str = "available"
    error: str | None = None
    last_used: float = 0.0
    active: int = 0
    waiting: int = 0
    loads: int = 0
    evictions: int = 0
    load_seconds: float | None = None
    settled: trio.Event = attrs.field(factory=trio.Event)

    @property
    def id(self) -> str:
        return self.model.id

    @property
    def memory(self) -> int:
        return self.model.memory_bytes or 0

    @property
    def managed(self) -> bool:
        return self.runtime.manages_memory


class Scheduler:
    """Swapping under a memory budget, per-model queues, LRU eviction.

    ``budget`` is in bytes (None: no limit). ``on_change`` is called after
    every change the Gate should hear about at once: a model appears,
    disappears, starts or finishes loading, is evicted, or a queue turns
    busy or stops being busy.
    """

    def __init__(
        self,
        runtimes: Sequence[Runtime],
        *,
        budget: int | None,
        queue_limit: int = 4,
        parallel: int = 1,
        stopped: Iterable[str] = (),
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.runtimes = list(runtimes)
        self.budget = budget
        self.queue_limit = queue_limit
        self.parallel = parallel
        self.on_change = on_change
        self.slots: dict[str, Slot] = {}
        self.stopped: set[str] = set(stopped)
        """Model ids an operator stopped; kept by id, so a model that leaves
        and comes back (a rescan, a runtime restart) is still stopped."""
        self.health: dict[str, Health] = {}
        self._memory_lock = trio.Lock()
        self._changed = trio.Event()

    # -- bookkeeping ---------------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()
        self.on_change()

    def used_memory(self) -> int:
        return sum(
            s.memory
            for s in self.slots.values()
            if s.managed and s.state in ("loading", "loaded", "unloading")
        )

    def models(self) -> list[dict[str, Any]]:
        """Every model with its live state, for the inventory."""
        return [
            {
                **slot.model.to_json(),
                "runtime": slot.runtime.name,
                "runtime_kind": slot.runtime.kind,
                "state": slot.state,
                "stopped": slot.id in self.stopped,
                "error": slot.error,
                "active": slot.active,
                "queue_depth": slot.waiting,
                "busy": slot.waiting >= self.queue_limit,
                "last_used": slot.last_used or None,
                "loads": slot.loads,
                "evictions": slot.evictions,
                "load_seconds": slot.load_seconds,
            }
            for slot in self.slots.values()
        ]

    def load_report(self) -> dict[str, dict[str, Any]]:
        """The fast-changing part, sent with every heartbeat."""
        return {
            s.id: {
                "active": s.active,
                "queue_depth": s.waiting,
                "busy": s.waiting >= self.queue_limit,
            }
            for s in self.slots.values()
        }

    async def refresh(self) -> bool:
        """Re-read each runtime's models and resident set; True if anything changed."""
        changed = False
        seen: set[str] = set()
        for runtime in self.runtimes:
            try:
                listed = await runtime.list_models()
                resident = set(await runtime.loaded_models())
                health = await runtime.health()
            except DaemonError as exc:
                listed, resident, health = [], set(), Health(False, str(exc))
            if self.health.get(runtime.name) != health:
                self.health[runtime.name] = health
                changed = True
            for model in listed:
                if model.id in seen:
                    continue  # the first runtime that has a model serves it
                seen.add(model.id)
                slot = self.slots.get(model.id)
                if slot is None or slot.runtime is not runtime:
                    if slot is not None and (slot.active or slot.waiting):
                        continue
                    self.slots[model.id] = slot = Slot(
                        runtime, model, trio.CapacityLimiter(self.parallel)
                    )
                    changed = True
                elif slot.model != model:
                    slot.model = model
                    changed = True
                if slot.state in ("available", "loaded", "failed"):
                    # The runtime's own view wins: a crashed server or a model
                    # Ollama unloaded by itself is not resident any more.
                    state = slot.state
                    if model.id in resident:
                        state = "loaded"
                    elif slot.state == "loaded":
                        state = "available"
                    if state != slot.state:
                        slot.state = state
                        changed = True
        for model_id in list(self.slots):
            slot = self.slots[model_id]
            if model_id not in seen and not (slot.active or slot.waiting):
                del self.slots[model_id]
                changed = True
        if changed:
            self._notify()
        return changed

    # -- requests -------------------------------------------------------------

    @asynccontextmanager
    async def use(
        self, model_id: str, *, admitted: Callable[[Slot], Awaitable[None]] | None = None
    ) -> AsyncIterator[Slot]:
        """Admit a request for ``model_id``, make it resident and hold a
        generation slot while the block runs. Raises UnknownModel, Busy,
        LoadFailed. ``admitted`` is awaited once the request has a place in
        the queue, before any waiting for a load."""
        slot = self._slot(model_id)
        if model_id in self.stopped:
            raise ModelStopped(f"{model_id} is stopped on this node (qmesh models start)")
        if slot.waiting >= self.queue_limit:
            raise Busy(
                f"{model_id}: {slot.waiting} request(s) already wait "
                f"(queue limit {self.queue_limit})"
            )
        slot.waiting += 1
        if slot.waiting == self.queue_limit:
            self._notify()
        token = object()
        try:
            if admitted is not None:
                await admitted(slot)
            await self._ensure_loaded(slot)
            await slot.limiter.acquire_on_behalf_of(token)
        finally:
            slot.waiting -= 1
            if slot.waiting == self.queue_limit - 1:
                self._notify()
        slot.active += 1
        try:
            yield slot
        finally:
            slot.active -= 1
            slot.last_used = time.monotonic()
            slot.limiter.release_on_behalf_of(token)
            self._changed.set()
            self._changed = trio.Event()

    async def _ensure_loaded(self, slot: Slot) -> None:
        while True:
            if slot.state == "loaded":
                return
            if slot.state in ("loading", "unloading"):
                await slot.settled.wait()
                continue
            must_wait = False
            async with self._memory_lock:
                if slot.state not in ("available", "failed"):
                    continue
                if slot.managed and self.budget is not None:
                    if slot.memory > self.budget:
                        raise LoadFailed(
                            f"{slot.id} needs {slot.memory / 1e6:.0f} MB, more than the "
                            f"whole memory budget ({self.budget / 1e6:.0f} MB)"
                        )
                    while self.used_memory() + slot.memory > self.budget:
                        victim = self._lru_victim(exclude=slot)
                        if victim is None:
                            must_wait = True
                            break
                        await self._evict(victim, for_model=slot.id)
                if not must_wait:
                    slot.state = "loading"
                    slot.settled = trio.Event()
            if must_wait:
                # Every resident model is in use: wait until one finishes.
                log.info("%s waits for memory: every resident model is busy", slot.id)
                await self._changed.wait()
                continue
            await self._load(slot)

    async def _load(self, slot: Slot) -> None:
        self._notify()
        started = time.monotonic()
        try:
            await slot.runtime.load(slot.id)
        except DaemonError as exc:
            slot.state = "failed"
            slot.error = str(exc)
            log.warning("loading %s failed: %s", slot.id, exc)
            if isinstance(exc, LoadFailed | UnknownModel):
                raise
            raise LoadFailed(str(exc)) from None
        except BaseException:
            slot.state = "available"
            raise
        else:
            slot.state = "loaded"
            slot.error = None
            slot.loads += 1
            slot.last_used = time.monotonic()
            slot.load_seconds = round(slot.last_used - started, 3)
            log.info("loaded %s in %.2fs (%s)", slot.id, slot.load_seconds, slot.runtime.name)
        finally:
            slot.settled.set()
            self._notify()

    def _lru_victim(self, *, exclude: Slot) -> Slot | None:
        idle = [
            s
            for s in self.slots.values()
            if s is not exclude
            and s.managed
            and s.state == "loaded"
            and s.active == 0
            and s.waiting == 0
        ]
        return min(idle, key=lambda s: s.last_used) if idle else None

    async def _evict(self, victim: Slot, *, for_model: str) -> None:
        log.info("evicting %s (least recently used) to make room for %s", victim.id, for_model)
        victim.state = "unloading"
        victim.settled = trio.Event()
        self._notify()
        try:
            await victim.runtime.unload(victim.id)
        except RuntimeFailed as exc:
            log.warning("unloading %s failed: %s", victim.id, exc)
        finally:
            victim.state = "available"
            victim.evictions += 1
            victim.settled.set()
            self._notify()

    def _slot(self, model_id: str) -> Slot:
        slot = self.slots.get(model_id)
        if slot is None:
            raise UnknownModel(f"this node has no model {model_id!r}")
        return slot

    async def stop(self, model_id: str) -> Slot:
        """Take ``model_id`` out of service: new requests are refused from now
        on, the running and queued ones finish, then it is unloaded."""
        self._slot(model_id)
        if model_id not in self.stopped:
            self.stopped.add(model_id)
            log.info("%s stopped by the operator: no new requests", model_id)
            self._notify()
        return await self.unload(model_id)

    def start(self, model_id: str) -> Slot:
        """Put a stopped model back in service (it loads on its next request)."""
        slot = self._slot(model_id)
        if model_id in self.stopped:
            self.stopped.discard(model_id)
            log.info("%s started by the operator", model_id)
            self._notify()
        return slot

    async def unload(self, model_id: str) -> Slot:
        """Unload on request (an operator, or shutdown); waits for running requests."""
        slot = self._slot(model_id)
        while slot.active or slot.waiting:
            await self._changed.wait()
        async with self._memory_lock:
            if slot.state == "loaded":
                slot.state = "unloading"
                slot.settled = trio.Event()
                self._notify()
                try:
                    await slot.runtime.unload(slot.id)
                finally:
                    slot.state = "available"
                    slot.settled.set()
                    self._notify()
        return slot
