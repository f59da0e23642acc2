"""One compute node's parts, put together: telemetry, catalog, runtimes, scheduler.

For: :class:`DaemonNode`, which builds the parts from a :class:`Config`
(:meth:`DaemonNode.prepare`: NVML or CPU-only, the cached memory-bandwidth
figure, the first catalog scan, a runtime per configured server), runs
their background work (:meth:`DaemonNode.run`: model-server supervision,
catalog rescans, runtime refreshes), and writes what the Gate is told:
:meth:`DaemonNode.inventory` (everything) and :meth:`DaemonNode.heartbeat`
(telemetry and queue depths). :attr:`DaemonNode.changed` wakes the
reporter when something the Gate should hear at once has changed.

Not for: the tunnel (:mod:`qmesh.daemon.role`, :mod:`qmesh.daemon.reporter`)
or serving requests (:mod:`qmesh.daemon.infer`).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Iterable
from typing import Any

import attrs
import trio

from qmesh import __version__
from qmesh.config import Config
from qmesh.daemon.catalog import Catalog, ModelInfo
from qmesh.daemon.membench import BandwidthResult, cached_bandwidth
from qmesh.daemon.quant import HEADROOM, NodeSpec, Variant, place
from qmesh.daemon.runtimes.base import Runtime
from qmesh.daemon.runtimes.llamacpp import LlamaCppRuntime
from qmesh.daemon.runtimes.ollama import OllamaRuntime
from qmesh.daemon.runtimes.openai import OpenAICompatRuntime
from qmesh.daemon.scheduler import Scheduler
from qmesh.daemon.telemetry import Telemetry, TelemetryReader
from qmesh.daemon.wire import WIRE_VERSION

__all__ = ["DaemonNode"]

log = logging.getLogger(__name__)


class DaemonNode:
    def __init__(self, config: Config, name: str, *, reader: TelemetryReader | None = None) -> None:
        self.config = config
        self.name = name
        self.settings = config.daemon
        self.data_dir = config.data_dir / "daemon"
        self.stopped_file = self.data_dir / "stopped-models.json"
        self.reader = reader or TelemetryReader()
        self.catalog = Catalog(self.settings.model_dirs)
        self.runtimes: list[Runtime] = []
        self.llama: LlamaCppRuntime | None = None
        self.scheduler: Scheduler | None = None
        self.telemetry: Telemetry | None = None
        self.bandwidth: dict[str, Any] = {}
        self._bandwidth: BandwidthResult | None = None
        self.changed = trio.Event()
        self.started_at = time.time()
        self._refresh_wanted = trio.Event()

    def mark_changed(self) -> None:
        self.changed.set()

    # -- set-up -------------------------------------------------------------

    async def prepare(self) -> None:
        """Measure (or read the cached) bandwidth, start NVML, scan models, build runtimes."""
        result = await trio.to_thread.run_sync(cached_bandwidth, self.data_dir)
        self.bandwidth = result.to_json()
        self._bandwidth = result
        self.reader.host_bandwidth_gbps = result.gbps
        await trio.to_thread.run_sync(self.reader.start)
        self.telemetry = await trio.to_thread.run_sync(self.reader.read)
        await trio.to_thread.run_sync(self.catalog.scan)
        if self.settings.llama_cpp:
            self.llama = LlamaCppRuntime(
                "llama.cpp",
                self.catalog,
                log_dir=self.data_dir / "logs",
                context_length=self.settings.context_length,
                threads=self.settings.threads,
                gpu_layers=self._gpu_layers,
                load_timeout_s=self.settings.load_timeout_s,
            )
            self.llama.on_change = self._runtime_changed
            self.runtimes.append(self.llama)
        for runtime in self.settings.runtimes:
            if runtime.kind == "ollama":
                self.runtimes.append(
                    OllamaRuntime(runtime.name, runtime.url, keep_alive=runtime.keep_alive)
                )
            else:
                self.runtimes.append(
                    OpenAICompatRuntime(runtime.name, runtime.url, api_key_env=runtime.api_key_env)
                )
        budget = self.settings.memory_budget
        if budget is None:
            budget = int(self.telemetry.model_memory_free * (1 - HEADROOM))
        self.scheduler = Scheduler(
            self.runtimes,
            budget=budget,
            queue_limit=self.settings.queue_limit,
            parallel=self.settings.parallel,
            stopped=await trio.to_thread.run_sync(self._read_stopped),
            on_change=self.mark_changed,
        )
        log.info(
            "node %s: %s, %d GGUF model(s), budget %.0f MB, runtimes: %s",
            self.name,
            "CPU-only" if self.telemetry.cpu_only else f"{len(self.telemetry.gpus)} GPU(s)",
            len(self.catalog.models),
            budget / 1e6,
            ", ".join(r.name for r in self.runtimes) or "none",
        )

    # -- models an operator stopped: kept across restarts ------------------------

    def _read_stopped(self) -> list[str]:
        try:
            with open(self.stopped_file, encoding="utf-8") as file:
                ids = json.load(file)
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            log.warning("ignoring %s: %s", self.stopped_file, exc)
            return []
        if not isinstance(ids, list):
            return []
        stopped = [i for i in ids if isinstance(i, str)]
        if stopped:
            log.info("models stopped by an operator: %s", ", ".join(stopped))
        return stopped

    def save_stopped(self, ids: Iterable[str]) -> None:
        """Write the stopped models' ids (a restart keeps them stopped)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        temporary = self.stopped_file.with_suffix(".tmp")
        temporary.write_text(json.dumps(sorted(ids)) + "\n", encoding="utf-8")
        os.replace(temporary, self.stopped_file)

    def _gpu_layers(self, model: ModelInfo) -> int:
        if self.settings.gpu_layers is not None:
            return self.settings.gpu_layers
        if self.telemetry is None or self.telemetry.cpu_only:
            return 0
        placement = place(
            Variant.from_model(model),
            self.node_spec(),
            self.llama.context_for(model) if self.llama else self.settings.context_length,
        )
        return -1 if placement.cpu_layers == 0 else sum(placement.gpu_layers)

    def _runtime_changed(self) -> None:
        self._refresh_wanted.set()

    def request_refresh(self) -> None:
        """Re-read the runtimes' state soon (after a runtime failure)."""
        self._refresh_wanted.set()

    # -- background work -------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Runtimes' supervision, rescans and refreshes, until cancelled."""
        assert self.scheduler is not None, "prepare() first"
        try:
            async with trio.open_nursery() as nursery:
                for runtime in self.runtimes:
                    await nursery.start(runtime.run)
                await self.scheduler.refresh()
                nursery.start_soon(self._refresh_loop)
                task_status.started()
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self.reader.close)

    async def _refresh_loop(self) -> None:
        assert self.scheduler is not None
        next_scan = trio.current_time() + self.settings.rescan_interval_s
        while True:
            with trio.move_on_at(next_scan):
                await self._refresh_wanted.wait()
            self._refresh_wanted = trio.Event()
            if trio.current_time() >= next_scan:
                change = await trio.to_thread.run_sync(self.catalog.scan)
                if change:
                    log.info(
                        "catalog: +%s -%s ~%s",
                        list(change.added),
                        list(change.removed),
                        list(change.changed),
                    )
                next_scan = trio.current_time() + self.settings.rescan_interval_s
            await self.scheduler.refresh()

    async def read_telemetry(self) -> Telemetry:
        self.telemetry = await trio.to_thread.run_sync(self.reader.read)
        return self.telemetry

    # -- what the Gate is told ----------------------------------------------------

    def hello(self) -> dict[str, Any]:
        return {
            "type": "hello",
            "wire": WIRE_VERSION,
            "node": self.name,
            "kind": "daemon",
            "version": f"qmesh/{__version__}",
            "host": platform.node(),
            "heartbeat_interval_s": self.settings.heartbeat_interval_s,
            "queue_limit": self.settings.queue_limit,
            "started_at": self.started_at,
        }

    def node_spec(self) -> NodeSpec:
        """This node for the planner, with the host bandwidth llama.cpp's
        threads get (llama-cpp-python uses half the CPUs unless told)."""
        assert self.telemetry is not None
        spec = NodeSpec.from_telemetry(self.telemetry, name=self.name)
        if self._bandwidth is not None:
            threads = self.settings.threads or max((os.cpu_count() or 2) // 2, 1)
            spec = attrs.evolve(spec, host_bandwidth_gbps=self._bandwidth.at_threads(threads))
        return spec

    def _predicted_tps(self, model: dict[str, Any]) -> float | None:
        if self.telemetry is None or "bytes_per_token" not in model:
            return None
        try:
            info = ModelInfo.from_json(model)
        except TypeError:
            return None
        context = self.llama.context_for(info) if self.llama else self.settings.context_length
        placement = place(Variant.from_model(info), self.node_spec(), context)
        return round(placement.decode_tps, 2)

    def inventory(self) -> dict[str, Any]:
        assert self.scheduler is not None
        models = self.scheduler.models()
        for model in models:
            model["predicted_tps"] = self._predicted_tps(model)
        return {
            "type": "inventory",
            "models": models,
            "runtimes": [self._runtime_report(r) for r in self.runtimes],
            "memory": {"budget": self.scheduler.budget, "used": self.scheduler.used_memory()},
            "bandwidth": self.bandwidth,
            "telemetry": None if self.telemetry is None else self.telemetry.to_json(),
        }

    def _runtime_report(self, runtime: Runtime) -> dict[str, Any]:
        assert self.scheduler is not None
        health = self.scheduler.health.get(runtime.name)
        return {
            **runtime.describe(),
            "healthy": None if health is None else health.ok,
            "health": None if health is None else health.detail,
        }

    def heartbeat(self) -> dict[str, Any]:
        assert self.scheduler is not None
        return {
            "type": "heartbeat",
            "load": self.scheduler.load_report(),
            "memory": {"budget": self.scheduler.budget, "used": self.scheduler.used_memory()},
            "telemetry": None if self.telemetry is None else self.telemetry.to_json(),
        }
