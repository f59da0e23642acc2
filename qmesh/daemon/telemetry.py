"""What this node's hardware is and how busy it is: NVML for GPUs, psutil for the host.

For: :class:`Telemetry` (one snapshot, JSON-able, what the daemon heartbeats
to the Gate and what the quantization planner reads) and
:class:`TelemetryReader`, which takes snapshots. GPUs come from NVML through
``pynvml`` (the ``nvidia-ml-py`` package): name, VRAM, utilisation,
temperature, power, the PCIe link (generation × width → GB/s, see
:func:`pcie_gbps`) and memory bandwidth from bus width × memory clock. The
host comes from psutil plus the measured bandwidth of
:mod:`qmesh.daemon.membench`.

CPU-only nodes are first-class: when ``pynvml`` is missing, ``nvmlInit()``
fails (no driver, as on a machine without a GPU) or no GPU is found, the
snapshot has no GPUs, ``nvml`` says why, and model memory is host RAM. A
query that one GPU does not support (temperature or power on some boards)
leaves that field ``None``; nothing here raises for missing hardware.

Not for: deciding where a model goes (:mod:`qmesh.daemon.quant`) or timing
(the role calls :meth:`TelemetryReader.read` at its heartbeat interval, in a
worker thread: NVML and psutil calls block).
"""

from __future__ import annotations

import logging
import os
import platform
import time
from types import ModuleType
from typing import Any, Final

import attrs
import psutil

__all__ = [
    "GpuTelemetry",
    "HostTelemetry",
    "Telemetry",
    "TelemetryReader",
    "pcie_gbps",
]

log = logging.getLogger(__name__)

# Usable GB/s per lane after line encoding: 8b/10b for gen 1-2, 128b/130b for
# 3-5, and gen 6's FLIT mode (PAM4, 242/256 payload).
PCIE_LANE_GBPS: Final = {1: 0.25, 2: 0.5, 3: 0.985, 4: 1.969, 5: 3.938, 6: 7.563}


def pcie_gbps(generation: int | None, width: int | None) -> float | None:
    """One direction's bandwidth of a PCIe link in GB/s, e.g. 4.0 x16 → 31.5."""
    if not generation or not width or generation not in PCIE_LANE_GBPS:
        return None
    return round(PCIE_LANE_GBPS[generation] * width, 3)


@attrs.frozen
class GpuTelemetry:
    index: int
    name: str
    uuid: str | None
    vram_total: int
    vram_used: int
    vram_free: int
    utilization_pct: int | None = None
    memory_utilization_pct: int | None = None
    temperature_c: int | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    pcie_gen: int | None = None
    pcie_width: int | None = None
    pcie_max_gen: int | None = None
    pcie_max_width: int | None = None
    memory_bandwidth_gbps: float | None = None
    """Peak VRAM bandwidth: bus width / 8 × memory clock × 2 (double data rate)."""

    @property
    def pcie_gbps(self) -> float | None:
        """The link as it runs now (GPUs drop to a lower generation when idle)."""
        return pcie_gbps(self.pcie_gen, self.pcie_width)

    @property
    def pcie_max_gbps(self) -> float | None:
        """What the link can do with this device in this slot: the planner's figure."""
        return pcie_gbps(self.pcie_max_gen, self.pcie_max_width)

    def to_json(self) -> dict[str, Any]:
        data = attrs.asdict(self)
        data["pcie_gbps"] = self.pcie_gbps
        data["pcie_max_gbps"] = self.pcie_max_gbps
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GpuTelemetry:
        names = {f.name for f in attrs.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@attrs.frozen
class HostTelemetry:
    hostname: str
    cpus_logical: int
    cpus_physical: int | None
    load_avg: tuple[float, float, float]
    cpu_percent: float
    ram_total: int
    ram_available: int
    memory_bandwidth_gbps: float | None
    """Measured copy bandwidth (see :mod:`qmesh.daemon.membench`); None until measured."""

    def to_json(self) -> dict[str, Any]:
        data = attrs.asdict(self)
        data["load_avg"] = list(self.load_avg)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HostTelemetry:
        names = {f.name for f in attrs.fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        values["load_avg"] = tuple(values.get("load_avg") or (0.0, 0.0, 0.0))
        return cls(**values)


@attrs.frozen
class Telemetry:
    host: HostTelemetry
    gpus: tuple[GpuTelemetry, ...]
    nvml: str
    """``"ok"``, or why there is no GPU view, e.g. ``"nvmlInit failed: NVML Shared
    Library Not Found"``."""
    driver_version: str | None
    taken_at: float

    @property
    def cpu_only(self) -> bool:
        return not self.gpus

    @property
    def model_memory_free(self) -> int:
        """Bytes free for model weights: VRAM on GPU nodes, RAM on CPU-only ones."""
        if self.gpus:
            return sum(g.vram_free for g in self.gpus)
        return self.host.ram_available

    def to_json(self) -> dict[str, Any]:
        return {
            "host": self.host.to_json(),
            "gpus": [g.to_json() for g in self.gpus],
            "nvml": self.nvml,
            "driver_version": self.driver_version,
            "cpu_only": self.cpu_only,
            "model_memory_free": self.model_memory_free,
            "taken_at": self.taken_at,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Telemetry:
        return cls(
            host=HostTelemetry.from_json(data["host"]),
            gpus=tuple(GpuTelemetry.from_json(g) for g in data.get("gpus", ())),
            nvml=str(data.get("nvml", "unknown")),
            driver_version=data.get("driver_version"),
            taken_at=float(data.get("taken_at", 0.0)),
        )


def _import_pynvml() -> ModuleType | str:
    try:
        import pynvml
    except ImportError:
        return "pynvml is not installed (pip install nvidia-ml-py)"
    module: ModuleType = pynvml
    return module


class TelemetryReader:
    """Takes :class:`Telemetry` snapshots; owns the NVML session.

    ``nvml`` is the NVML binding (the real ``pynvml`` module by default);
    tests pass a fake with the same functions. :meth:`start` calls
    ``nvmlInit`` once; if that fails the reader stays CPU-only for its life
    and says why. Every method blocks: call from a worker thread.
    """

    def __init__(
        self,
        *,
        nvml: ModuleType | Any | None = None,
        host_bandwidth_gbps: float | None = None,
    ) -> None:
        self._nvml_module: Any = nvml
        self._nvml: Any = None
        self.nvml_status = "not started"
        self.driver_version: str | None = None
        self.host_bandwidth_gbps = host_bandwidth_gbps
        # The first cpu_percent(None) call only sets a baseline.
        psutil.cpu_percent(None)

    def start(self) -> None:
        module = self._nvml_module if self._nvml_module is not None else _import_pynvml()
        if isinstance(module, str):
            self.nvml_status = module
            log.info("no GPU telemetry: %s; this node is CPU-only", module)
            return
        try:
            module.nvmlInit()
        except module.NVMLError as exc:
            self.nvml_status = f"nvmlInit failed: {exc}"
            log.info("no GPU telemetry (%s); this node is CPU-only", self.nvml_status)
            return
        self._nvml = module
        self.nvml_status = "ok"
        self.driver_version = _text(_optional(module, module.nvmlSystemGetDriverVersion))
        count = _optional(module, module.nvmlDeviceGetCount) or 0
        if count == 0:
            self.nvml_status = "ok (no GPU found)"
        log.info("NVML: driver %s, %d GPU(s)", self.driver_version, count)

    def close(self) -> None:
        if self._nvml is not None:
            _optional(self._nvml, self._nvml.nvmlShutdown)
            self._nvml = None

    def read(self) -> Telemetry:
        return Telemetry(
            host=self._read_host(),
            gpus=self._read_gpus(),
            nvml=self.nvml_status,
            driver_version=self.driver_version,
            taken_at=time.time(),
        )

    def _read_host(self) -> HostTelemetry:
        memory = psutil.virtual_memory()
        try:
            load = os.getloadavg()
        except OSError:
            load = (0.0, 0.0, 0.0)
        return HostTelemetry(
            hostname=platform.node(),
            cpus_logical=psutil.cpu_count(logical=True) or os.cpu_count() or 1,
            cpus_physical=psutil.cpu_count(logical=False),
            load_avg=(round(load[0], 2), round(load[1], 2), round(load[2], 2)),
            cpu_percent=psutil.cpu_percent(None),
            ram_total=memory.total,
            ram_available=memory.available,
            memory_bandwidth_gbps=self.host_bandwidth_gbps,
        )

    def _read_gpus(self) -> tuple[GpuTelemetry, ...]:
        nvml = self._nvml
        if nvml is None:
            return ()
        count = _optional(nvml, nvml.nvmlDeviceGetCount)
        if count is None:
            return ()
        gpus = []
        for index in range(count):
            handle = _optional(nvml, nvml.nvmlDeviceGetHandleByIndex, index)
            if handle is None:
                continue
            memory = _optional(nvml, nvml.nvmlDeviceGetMemoryInfo, handle)
            if memory is None:
                continue  # a GPU we cannot size is no use for models
            util = _optional(nvml, nvml.nvmlDeviceGetUtilizationRates, handle)
            power_mw = _optional(nvml, nvml.nvmlDeviceGetPowerUsage, handle)
            limit_mw = _optional(nvml, nvml.nvmlDeviceGetEnforcedPowerLimit, handle)
            bus_bits = _optional(nvml, nvml.nvmlDeviceGetMemoryBusWidth, handle)
            mem_mhz = _optional(nvml, nvml.nvmlDeviceGetMaxClockInfo, handle, nvml.NVML_CLOCK_MEM)
            bandwidth = None
            if bus_bits and mem_mhz:
                # NVML reports the memory clock such that ×2 gives the transfer
                # rate for GDDR and HBM alike (RTX 3090: 9751 MHz × 2 × 384/8 =
                # 936 GB/s; A100 40GB: 1215 MHz × 2 × 5120/8 = 1555 GB/s).
                bandwidth = round(bus_bits / 8 * mem_mhz * 1e6 * 2 / 1e9, 1)
            gpus.append(
                GpuTelemetry(
                    index=index,
                    name=_text(_optional(nvml, nvml.nvmlDeviceGetName, handle)) or f"GPU {index}",
                    uuid=_text(_optional(nvml, nvml.nvmlDeviceGetUUID, handle)),
                    vram_total=int(memory.total),
                    vram_used=int(memory.used),
                    vram_free=int(memory.free),
                    utilization_pct=None if util is None else int(util.gpu),
                    memory_utilization_pct=None if util is None else int(util.memory),
                    temperature_c=_optional(
                        nvml, nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU
                    ),
                    power_w=None if power_mw is None else round(power_mw / 1000, 1),
                    power_limit_w=None if limit_mw is None else round(limit_mw / 1000, 1),
                    pcie_gen=_optional(nvml, nvml.nvmlDeviceGetCurrPcieLinkGeneration, handle),
                    pcie_width=_optional(nvml, nvml.nvmlDeviceGetCurrPcieLinkWidth, handle),
                    pcie_max_gen=_optional(nvml, nvml.nvmlDeviceGetMaxPcieLinkGeneration, handle),
                    pcie_max_width=_optional(nvml, nvml.nvmlDeviceGetMaxPcieLinkWidth, handle),
                    memory_bandwidth_gbps=bandwidth,
                )
            )
        return tuple(gpus)


def _optional(nvml: Any, function: Any, *args: Any) -> Any:
    """``function(*args)``, or None when NVML says the query failed or is
    unsupported on this device (logged at debug: it is normal on many boards)."""
    try:
        return function(*args)
    except nvml.NVMLError as exc:
        log.debug("NVML %s failed: %s", getattr(function, "__name__", function), exc)
        return None


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)
