"""The nodes the quantization planner plans for: GPUs, host RAM, bandwidth, calibration.

For: :class:`NodeSpec` (and :class:`GpuSpec`), built from a daemon's live
telemetry (:meth:`NodeSpec.from_telemetry`), a telemetry file or an
inventory node (:meth:`NodeSpec.load`), or a simulated node — a preset of
:data:`NODE_PRESETS` or a ``key=value`` spec (:meth:`NodeSpec.parse`). A
node from this machine or from a daemon's report carries its
:class:`~qmesh.daemon.calibration.Calibration` and llama.cpp's thread
count; a simulated one has none, and the planner then predicts the
memory-bound ceiling and says so.

Not for: placing models (:mod:`qmesh.daemon.quant`) or reading hardware
(:mod:`qmesh.daemon.telemetry`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Final

import attrs

from qmesh.config import parse_size
from qmesh.daemon.calibration import Calibration, DeviceRates
from qmesh.daemon.telemetry import Telemetry, pcie_gbps

__all__ = ["DEFAULT_HOST_BANDWIDTH_GBPS", "NODE_PRESETS", "GpuSpec", "NodeSpec", "PlanError", "gb"]

DEFAULT_HOST_BANDWIDTH_GBPS: Final = 20.0
"""Used only when a node reports no measured bandwidth (said so in the plan)."""

NODE_PRESETS: Final = {
    "cpu": "ram=16GiB,ram_bw=40,cpus=8",
    "gpu4": "vram=4GiB,gpu_bw=192,pcie=3.0x16,ram=16GiB,ram_bw=40",
    "gpu4-pcie3x4": "vram=4GiB,gpu_bw=192,pcie=3.0x4,ram=16GiB,ram_bw=40",
    "gpu8": "vram=8GiB,gpu_bw=448,pcie=4.0x16,ram=32GiB,ram_bw=50",
    "gpu8-pcie3x4": "vram=8GiB,gpu_bw=448,pcie=3.0x4,ram=32GiB,ram_bw=50",
    "gpu24": "vram=24GiB,gpu_bw=1008,pcie=4.0x16,ram=64GiB,ram_bw=60",
    "gpu80": "vram=80GiB,gpu_bw=3350,pcie=5.0x16,ram=256GiB,ram_bw=200",
}
"""Simulated nodes for ``qmesh quant plan --node NAME`` and the table tests:
a 4 GB laptop GPU (GTX 1650 class), the same on an x4 riser, an 8 GB
card (RTX 3060 Ti/4060 Ti class), a 24 GB card (RTX 4090) and an 80 GB
H100 SXM; ``cpu`` is a CPU-only server."""


class PlanError(Exception):
    """The planner's input is unusable: a malformed node spec or telemetry
    file, or no variant of the model to plan for."""


# -- nodes ----------------------------------------------------------------------


@attrs.frozen
class GpuSpec:
    name: str
    vram_free: int
    bandwidth_gbps: float
    pcie_gbps: float | None


@attrs.frozen
class NodeSpec:
    name: str
    gpus: tuple[GpuSpec, ...]
    ram_free: int
    host_bandwidth_gbps: float
    """Read bandwidth at llama.cpp's thread count."""
    cpus: int = 1
    notes: tuple[str, ...] = ()
    calibration: Calibration | None = None
    threads: int | None = None
    """llama.cpp's generation threads (None: the calibration's)."""

    @property
    def cpu_only(self) -> bool:
        return not self.gpus

    @property
    def cpu_rates(self) -> DeviceRates | None:
        """The calibrated CPU figures at this node's thread count."""
        if self.calibration is None:
            return None
        return self.calibration.cpu.scaled(self.threads, self.cpus)

    @property
    def gpu_rates(self) -> DeviceRates | None:
        return None if self.calibration is None else self.calibration.gpu

    def describe(self) -> str:
        parts = [
            f"{g.name} {gb(g.vram_free)} free, {g.bandwidth_gbps:.0f} GB/s, "
            f"PCIe {'?' if g.pcie_gbps is None else f'{g.pcie_gbps:.1f} GB/s'}"
            for g in self.gpus
        ]
        parts.append(f"RAM {gb(self.ram_free)} free, {self.host_bandwidth_gbps:.1f} GB/s")
        if self.threads:
            parts[-1] += f", {self.threads} llama.cpp thread(s)"
        return f"{self.name}: " + "; ".join(parts)

    @classmethod
    def from_telemetry(
        cls,
        telemetry: Telemetry,
        *,
        name: str = "local",
        calibration: Calibration | None = None,
        threads: int | None = None,
    ) -> NodeSpec:
        notes: list[str] = []
        gpus = []
        for gpu in telemetry.gpus:
            bandwidth = gpu.memory_bandwidth_gbps
            if bandwidth is None:
                bandwidth = 300.0
                notes.append(f"{gpu.name}: NVML gave no memory clock; assuming 300 GB/s")
            gpus.append(GpuSpec(gpu.name, gpu.vram_free, bandwidth, gpu.pcie_max_gbps))
        host_bw = telemetry.host.memory_bandwidth_gbps
        if host_bw is None:
            host_bw = DEFAULT_HOST_BANDWIDTH_GBPS
            notes.append(f"host bandwidth not measured; assuming {host_bw:g} GB/s")
        return cls(
            name=name,
            gpus=tuple(gpus),
            ram_free=telemetry.host.ram_available,
            host_bandwidth_gbps=host_bw,
            cpus=telemetry.host.cpus_logical,
            notes=tuple(notes),
            calibration=calibration,
            threads=threads,
        )

    @classmethod
    def parse(cls, text: str, *, name: str | None = None) -> NodeSpec:
        """A preset name, or ``key=value,…`` with keys ``vram`` (per GPU),
        ``gpus`` (count, default 1 when vram is given), ``gpu_bw`` (GB/s),
        ``pcie`` (``4.0x16``), ``ram``, ``ram_bw`` (GB/s), ``cpus``."""
        spec = NODE_PRESETS.get(text, text)
        values: dict[str, str] = {}
        for part in spec.split(","):
            key, sep, value = part.partition("=")
            if not sep or not key.strip() or not value.strip():
                known = ", ".join(NODE_PRESETS)
                raise PlanError(
                    f"bad node spec {text!r}: expected a preset ({known}) or key=value,…"
                )
            values[key.strip()] = value.strip()
        unknown = values.keys() - {"vram", "gpus", "gpu_bw", "pcie", "ram", "ram_bw", "cpus"}
        if unknown:
            raise PlanError(f"bad node spec {text!r}: unknown key {sorted(unknown)[0]!r}")
        orphans = values.keys() & {"gpus", "gpu_bw", "pcie"}
        if orphans and "vram" not in values:
            raise PlanError(f"bad node spec {text!r}: {sorted(orphans)[0]} needs vram (per GPU)")
        try:
            gpus: tuple[GpuSpec, ...] = ()
            if "vram" in values:
                link = None
                if "pcie" in values:
                    match = re.fullmatch(r"(\d)(?:\.0)?x(\d+)", values["pcie"])
                    if match is None:
                        raise ValueError(
                            f"pcie {values['pcie']!r}: expected GEN.0xWIDTH, e.g. 4.0x16"
                        )
                    link = pcie_gbps(int(match.group(1)), int(match.group(2)))
                count = int(values.get("gpus", "1"))
                gpu = GpuSpec(
                    name="GPU",
                    vram_free=parse_size(values["vram"]),
                    bandwidth_gbps=float(values.get("gpu_bw", "300")),
                    pcie_gbps=link,
                )
                gpus = tuple(attrs.evolve(gpu, name=f"GPU{i}") for i in range(count))
            return cls(
                name=name or text,
                gpus=gpus,
                ram_free=parse_size(values.get("ram", "16GiB")),
                host_bandwidth_gbps=float(values.get("ram_bw", str(DEFAULT_HOST_BANDWIDTH_GBPS))),
                cpus=int(values.get("cpus", "8")),
            )
        except ValueError as exc:
            raise PlanError(f"bad node spec {text!r}: {exc}") from None

    @classmethod
    def load(cls, path: Path) -> NodeSpec:
        """A telemetry JSON file: a daemon's ``telemetry`` object, an
        inventory node (``{"telemetry": …}``) from the Gate's ``GET
        /api/inventory``, or a daemon's own ``GET /api/node`` — which also
        carries its calibration (the Gate keeps no calibration)."""
        try:
            data = json.loads(path.read_text())
            if isinstance(data.get("inventory"), dict):
                data = data["inventory"]
            calibration = None
            found = data.get("calibration") or data.get("extra", {}).get("calibration")
            if isinstance(found, dict) and found.get("cpu"):
                calibration = Calibration.from_json(found)
            if "telemetry" in data:
                data = data["telemetry"]
            return cls.from_telemetry(
                Telemetry.from_json(data), name=path.stem, calibration=calibration
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            raise PlanError(f"cannot read node telemetry from {path}: {exc}") from None


def gb(n: float) -> str:
    """A byte count as GB (MB under a GB), for people."""
    if n >= 1e9:
        return f"{n / 1e9:.1f} GB"
    return f"{n / 1e6:.0f} MB"
