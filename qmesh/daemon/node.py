"""One compute node's parts, put together: telemetry, catalog, runtimes, scheduler.

For: :class:`DaemonNode`, which builds the parts from a :class:`Config`
(:meth:`DaemonNode.prepare`: NVML or CPU-only, the cached memory-bandwidth
figure and node calibration, the first catalog scan, a runtime per
configured server), runs their background work (:meth:`DaemonNode.run`:
model-server supervision, catalog rescans, runtime refreshes, the node
calibration when none is cached — a few seconds in a subprocess, after
which the predictions are re-sent), and writes what the Gate is told:
:meth:`DaemonNode.inventory` (everything) and :meth:`DaemonNode.heartbeat`
(telemetry and queue depths). :attr:`DaemonNode.changed` wakes the
reporter when something the Gate should hear at once has changed.

Each model's ``predicted_tps`` is the planner's best figure for it on this
node: the median decode speed its own requests measured
(:meth:`DaemonNode.record_speed`, kept in a
:class:`~qmesh.daemon.speedbook.SpeedBook`) once there is one, else the
calibrated prediction; ``model_tps``, ``measured_tps`` and
``prediction_error`` show both.

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
from pathlib import Path
from typing import Any

import attrs
import trio

from qmesh import __version__
from qmesh.config import Config
from qmesh.daemon.calibration import (
    Calibration,
    CalibrationKey,
    default_threads,
    load_cached,
    obtain_async,
)
from qmesh.daemon.catalog import Catalog, ModelInfo
from qmesh.daemon.membench import BandwidthResult, cached_bandwidth
from qmesh.daemon.quant import HEADROOM, NodeSpec, Variant, place
from qmesh.daemon.runtimes.base import Runtime
from qmesh.daemon.runtimes.llamacpp import LlamaCppRuntime
from qmesh.daemon.runtimes.ollama import OllamaRuntime
from qmesh.daemon.runtimes.openai import OpenAICompatRuntime
from qmesh.daemon.scheduler import Scheduler
from qmesh.daemon.speedbook import MIN_TOKENS, SpeedBook
from qmesh.daemon.telemetry import Telemetry, TelemetryReader
from qmesh.daemon.wire import WIRE_VERSION

__all__ = ["DaemonNode"]

log = logging.getLogger(__name__)

SAVE_SPEEDS_EVERY_S = 2.0


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
        self.calibration: Calibration | None = None
        self.calibration_state = "none"
        """``none`` (no llama.cpp), ``measuring``, ``ready`` or ``failed``."""
        self._calibration_key: CalibrationKey | None = None
        self._calibrating = False
        self._nursery: trio.Nursery | None = None
        self.speeds = SpeedBook()
        self._speeds_saved = trio.Event()
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
        self.speeds = await trio.to_thread.run_sync(SpeedBook.load, self.data_dir)
        if self.settings.llama_cpp:
            self._calibration_key = CalibrationKey.local(
                threads=self.settings.threads,
                threads_batch=self.settings.threads,
                gpus=[g.name for g in self.telemetry.gpus],
            )
            if self._calibration_key is not None:
                self.calibration = await trio.to_thread.run_sync(
                    load_cached, self.data_dir, self._calibration_key, self._layouts()
                )
                self.calibration_state = "ready" if self.calibration else "measuring"
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
                nursery.start_soon(self._save_speeds_loop)
                self._nursery = nursery
                self._calibrate_if_needed()
                task_status.started()
        finally:
            self._nursery = None
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
                    self._calibrate_if_needed()
                next_scan = trio.current_time() + self.settings.rescan_interval_s
            await self.scheduler.refresh()

    def _layouts(self) -> set[str]:
        return {m.layout for m in self.catalog.models.values() if m.layout}

    def _calibrate_if_needed(self) -> None:
        """Start a calibration when there is none, or when the catalog has a
        block layout the one there is did not probe (a new architecture)."""
        key, nursery = self._calibration_key, self._nursery
        if key is None or nursery is None or self._calibrating:
            return
        if self.calibration is not None and self.calibration.covers(self._layouts()):
            return
        self._calibrating = True
        nursery.start_soon(self._calibrate, key)

    async def _calibrate(self, key: CalibrationKey) -> None:
        """Measure this node for the planner (or take the machine's cached
        figures), then tell the Gate the calibrated predictions."""
        models = [Path(m.path) for m in self.catalog.models.values() if m.layout]
        try:
            calibration = await obtain_async(
                self.data_dir, key, models=models, layouts=self._layouts()
            )
        finally:
            self._calibrating = False
        if calibration is None:
            self.calibration_state = "failed"
            log.warning("no node calibration: predictions stay as they were")
        else:
            self.calibration = calibration
            self.calibration_state = "ready"
        self.mark_changed()

    async def _save_speeds_loop(self) -> None:
        while True:
            await self._speeds_saved.wait()
            self._speeds_saved = trio.Event()
            await trio.to_thread.run_sync(self.speeds.save)
            await trio.sleep(SAVE_SPEEDS_EVERY_S)

    def record_speed(self, model: str, tps: float, completion_tokens: int) -> None:
        """One request's measured decode speed for ``model`` (from the infer
        service). Kept only when the request ran alone on the node and was
        long enough; the Gate hears of it when the median moves."""
        if self.scheduler is None or completion_tokens < MIN_TOKENS:
            return
        if sum(slot.active for slot in self.scheduler.slots.values()) > 1:
            return  # another generation shared the hardware
        slot = self.scheduler.slots.get(model)
        info = None if slot is None else slot.model.info
        predicted = None if info is None else self._model_tps(info)
        quantization = None if info is None else info.quantization
        if self.speeds.record(model, tps, predicted_tps=predicted, quantization=quantization):
            self.mark_changed()
        self._speeds_saved.set()

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
        """This node for the planner: the host bandwidth llama.cpp's threads
        get (llama-cpp-python uses half the CPUs unless told), and the
        node's calibration once there is one."""
        assert self.telemetry is not None
        threads = self.settings.threads or default_threads(os.cpu_count())[0]
        spec = NodeSpec.from_telemetry(
            self.telemetry, name=self.name, calibration=self.calibration, threads=threads
        )
        if self._bandwidth is not None:
            spec = attrs.evolve(spec, host_bandwidth_gbps=self._bandwidth.at_threads(threads))
        return spec

    def _model_tps(self, info: ModelInfo) -> float | None:
        """The planner's prediction for ``info`` on this node (never a measurement)."""
        if self.telemetry is None:
            return None
        context = self.llama.context_for(info) if self.llama else self.settings.context_length
        placement = place(Variant.from_model(info), self.node_spec(), context)
        return round(placement.decode_tps, 2)

    def _speed_report(self, model: dict[str, Any]) -> dict[str, Any]:
        """``predicted_tps`` (measured when known, else the prediction) and
        the figures behind it, for one inventory model."""
        predicted = None
        if "bytes_per_token" in model:
            try:
                predicted = self._model_tps(ModelInfo.from_json(model))
            except TypeError:
                pass
        layout = model.get("layout")
        report: dict[str, Any] = {
            "model_tps": predicted,
            "calibrated": self.calibration is not None,
            "layout_probed": bool(
                self.calibration is not None and layout in self.calibration.cpu.layouts
            ),
            "measured_tps": None,
            "prediction_error": None,
        }
        measured = self.speeds.get(str(model.get("id")))
        if measured is not None:
            low, high = measured.spread
            report.update(
                measured_tps=round(measured.median, 2),
                measured_min=round(low, 2),
                measured_max=round(high, 2),
                measured_samples=len(measured.samples),
                predicted_at_measurement=measured.predicted_tps,
            )
            if predicted:
                error = (predicted - measured.median) / measured.median
                report["prediction_error"] = round(error, 4)
        report["predicted_tps"] = (
            report["measured_tps"] if report["measured_tps"] is not None else predicted
        )
        return report

    def inventory(self) -> dict[str, Any]:
        assert self.scheduler is not None
        models = self.scheduler.models()
        for model in models:
            model.update(self._speed_report(model))
        calibration: dict[str, Any] = {"state": self.calibration_state}
        if self.calibration is not None:
            calibration.update(self.calibration.to_json())
        return {
            "type": "inventory",
            "models": models,
            "runtimes": [self._runtime_report(r) for r in self.runtimes],
            "memory": {"budget": self.scheduler.budget, "used": self.scheduler.used_memory()},
            "bandwidth": self.bandwidth,
            "calibration": calibration,
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
