"""Hardware-aware choice of a model's quantization: fit, speed, quality.

For: :func:`plan`, which takes the variants of one model (GGUF files that
exist, and those llama.cpp's quantize could produce from a Q8_0-or-better
file), a node (:class:`NodeSpec`: GPUs with free VRAM, memory bandwidth and
PCIe link; host RAM and measured bandwidth) and a context length and target
speed, and returns a :class:`Plan`: every candidate with its placement,
predicted decode speed and the reason it was or was not chosen. Pure
functions on plain data: the daemon feeds it live telemetry, ``qmesh quant
plan`` feeds it telemetry or a simulated node, tests feed it tables.

The rule: the highest-quality variant whose weights plus KV cache
for the requested context fit in free memory with headroom, and whose
predicted decode speed meets the target. If none meets the target, the
fastest variant that fits, flagged. If none fits, no choice.

The speed model, and why. Generating one token reads every weight it uses
once (:attr:`~qmesh.daemon.catalog.ModelInfo.bytes_per_token`) plus the KV
cache, so decode is memory-bound: time per token = Σ over devices of bytes
read there ÷ (bandwidth × efficiency). Layers that do not fit in VRAM stay in
host RAM and llama.cpp computes them on the CPU, at *host* bandwidth; that,
not the GPU, is what makes a partial offload slow. The PCIe link enters
where llama.cpp actually uses it: the hidden state crosses it at every
CPU↔GPU boundary per token (small, latency-bound), prompt batches of 32+
tokens upload the CPU-resident weights to the GPU once per batch (so a slow
link makes time-to-first-token long), and loading copies the GPU's share of
the weights across it. Those are reported per candidate.

Memory model: weights + KV cache (f16, all layers, the full requested
context — llama.cpp's sliding-window caches are smaller, so this errs on
the safe side) + a compute buffer (:data:`COMPUTE_BUFFER_BYTES` + 5 % of the
weights) must fit in free memory less :data:`HEADROOM` of it. On a GPU node,
layers go to the GPUs first (split in proportion to free VRAM, as
llama.cpp's default tensor split does), the rest to RAM.

Not for: running quantize or loading models (the runtimes do), or reading
telemetry (:mod:`qmesh.daemon.telemetry`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Final

import attrs

from qmesh.config import parse_size
from qmesh.daemon.catalog import ModelInfo
from qmesh.daemon.telemetry import Telemetry, pcie_gbps

__all__ = [
    "NODE_PRESETS",
    "QUANT_TYPES",
    "Candidate",
    "GpuSpec",
    "NodeSpec",
    "Placement",
    "Plan",
    "PlanError",
    "Variant",
    "memory_need",
    "place",
    "plan",
    "variants_for",
]

HEADROOM: Final = 0.10
"""Fraction of each device's free memory left unused (other processes, fragmentation)."""
COMPUTE_BUFFER_BYTES: Final = 128 * 1024 * 1024
GPU_EFFICIENCY: Final = 0.75
"""Share of peak VRAM bandwidth llama.cpp's CUDA decode reaches (typically 70-85 %)."""
CPU_EFFICIENCY: Final = 1.0
"""Decode rate vs the *measured copy* bandwidth of membench (read + write
counted): decode reads weights and writes little, so it gets about the full
copy figure; checked against the real model by ``bench/inference.py``."""
PCIE_HOP_LATENCY_S: Final = 20e-6
PCIE_UPLOAD_MIN_BATCH: Final = 32
DEFAULT_HOST_BANDWIDTH_GBPS: Final = 20.0
"""Used only when a node reports no measured bandwidth (said so in the plan)."""

QUANT_TYPES: Final = {
    # name: nominal bits per weight (llama.cpp's figures for a 7B model),
    # listed best quality first (llama.cpp's perplexity ranking).
    "F32": 32.0, "BF16": 16.0, "F16": 16.0, "Q8_0": 8.5, "Q6_K": 6.56,
    "Q5_K_M": 5.69, "Q5_1": 6.0, "Q5_K_S": 5.54, "Q5_0": 5.5, "Q4_K_M": 4.85,
    "Q4_1": 5.0, "Q4_K_S": 4.58, "IQ4_NL": 4.5, "IQ4_XS": 4.25, "Q4_0": 4.5,
    "Q3_K_L": 4.27, "Q3_K_M": 3.91, "IQ3_M": 3.66, "IQ3_S": 3.44, "Q3_K_S": 3.5,
    "IQ3_XS": 3.3, "IQ3_XXS": 3.06, "Q2_K": 3.35, "Q2_K_S": 2.96, "IQ2_M": 2.7,
    "IQ2_S": 2.5, "IQ2_XS": 2.31, "IQ2_XXS": 2.06, "IQ1_M": 1.75, "IQ1_S": 1.56,
}  # fmt: skip
_QUALITY: Final = {name: len(QUANT_TYPES) - i for i, name in enumerate(QUANT_TYPES)}
QUANTIZE_MENU: Final = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K")
"""What ``llama_model_quantize`` is offered to produce. Only from a Q8_0 or
better source: requantizing an already-small file compounds the loss."""
_QUANTIZE_SOURCES: Final = frozenset({"F32", "BF16", "F16", "Q8_0"})

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
    cpus: int = 1
    notes: tuple[str, ...] = ()

    @property
    def cpu_only(self) -> bool:
        return not self.gpus

    def describe(self) -> str:
        parts = [
            f"{g.name} {_gb(g.vram_free)} free, {g.bandwidth_gbps:.0f} GB/s, "
            f"PCIe {'?' if g.pcie_gbps is None else f'{g.pcie_gbps:.1f} GB/s'}"
            for g in self.gpus
        ]
        parts.append(f"RAM {_gb(self.ram_free)} free, {self.host_bandwidth_gbps:.1f} GB/s")
        return f"{self.name}: " + "; ".join(parts)

    @classmethod
    def from_telemetry(cls, telemetry: Telemetry, *, name: str = "local") -> NodeSpec:
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
        """A telemetry JSON file: a daemon's ``telemetry`` object, or an
        inventory node (``{"telemetry": …}``) from ``GET /api/inventory``."""
        try:
            data = json.loads(path.read_text())
            if "telemetry" in data:
                data = data["telemetry"]
            return cls.from_telemetry(Telemetry.from_json(data), name=path.stem)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise PlanError(f"cannot read node telemetry from {path}: {exc}") from None


# -- variants -------------------------------------------------------------------


@attrs.frozen
class Variant:
    quantization: str
    weights_bytes: int
    layer_bytes: int
    bytes_per_token: int
    kv_bytes_per_token: int
    layers: int
    embedding_length: int
    source: str
    """``file`` (exists, ``path``) or ``quantize`` (llama.cpp could make it; sizes estimated)."""
    path: str | None = None

    @property
    def quality(self) -> int:
        return _QUALITY.get(self.quantization, 0)

    @property
    def nonlayer_bytes(self) -> int:
        return max(0, self.weights_bytes - self.layer_bytes * self.layers)

    @classmethod
    def from_model(cls, model: ModelInfo) -> Variant:
        return cls(
            quantization=model.quantization,
            weights_bytes=model.weights_bytes,
            layer_bytes=model.layer_bytes,
            bytes_per_token=model.bytes_per_token,
            kv_bytes_per_token=model.kv_bytes_per_token,
            layers=model.layers,
            embedding_length=model.embedding_length or 4096,
            source="file",
            path=model.path,
        )

    def quantized(self, target: str, parameters: int) -> Variant:
        """The estimated variant llama.cpp's quantize would produce from this one."""
        source_bpw = self.weights_bytes * 8 / parameters
        ratio = QUANT_TYPES[target] / source_bpw
        return attrs.evolve(
            self,
            quantization=target,
            weights_bytes=int(self.weights_bytes * ratio),
            layer_bytes=int(self.layer_bytes * ratio),
            bytes_per_token=int(self.bytes_per_token * ratio),
            source="quantize",
            path=None,
        )


def variants_for(models: Sequence[ModelInfo], *, produce: bool = True) -> list[Variant]:
    """The variants of one model: its files and, when one is Q8_0 or better,
    what quantize could make from the best of them (one per quantization;
    a file beats an estimate of the same type)."""
    if not models:
        raise PlanError("no model files to plan for")
    found: dict[str, Variant] = {}
    for model in models:
        variant = Variant.from_model(model)
        if variant.quantization not in found or variant.source == "file":
            found.setdefault(variant.quantization, variant)
    if produce:
        best = max(models, key=lambda m: (_QUALITY.get(m.quantization, 0), m.weights_bytes))
        if best.quantization in _QUANTIZE_SOURCES:
            source = Variant.from_model(best)
            for target in QUANTIZE_MENU:
                if _QUALITY[target] < source.quality and target not in found:
                    found[target] = source.quantized(target, best.parameters)
    return sorted(found.values(), key=lambda v: (-v.quality, v.weights_bytes))


# -- placement and speed --------------------------------------------------------


@attrs.frozen
class Placement:
    gpu_layers: tuple[int, ...]
    """Layers on each GPU, in node order."""
    cpu_layers: int
    gpu_bytes: int
    """Weights + KV + compute buffer placed in VRAM, all GPUs."""
    cpu_bytes: int
    fits: bool
    decode_tps: float
    """Predicted tokens/s."""
    upload_s_per_batch: float
    """Prompt processing: seconds to move CPU-resident weights over PCIe per batch."""
    load_s: float
    """Seconds to copy the GPUs' share of the weights over PCIe at load."""
    why_not: str = ""

    @property
    def where(self) -> str:
        total = sum(self.gpu_layers) + self.cpu_layers
        if not self.gpu_layers:
            return "CPU (all layers in RAM)"
        if self.cpu_layers == 0:
            return f"GPU (all {total} layers)"
        return f"split: {sum(self.gpu_layers)}/{total} layers on GPU, {self.cpu_layers} in RAM"


def _overhead(variant: Variant) -> int:
    return COMPUTE_BUFFER_BYTES + variant.weights_bytes // 20


def memory_need(variant: Variant, context: int) -> int:
    """Bytes a loaded variant holds: weights + KV cache for ``context`` + compute buffer."""
    return variant.weights_bytes + variant.kv_bytes_per_token * context + _overhead(variant)


def place(variant: Variant, node: NodeSpec, context: int) -> Placement:
    """Where the layers go on ``node`` and how fast decoding will be."""
    kv_total = variant.kv_bytes_per_token * context
    kv_per_layer = kv_total // max(variant.layers, 1)
    overhead = _overhead(variant)
    ram_usable = int(node.ram_free * (1 - HEADROOM))
    host_bw = node.host_bandwidth_gbps * 1e9 * CPU_EFFICIENCY
    per_token_layer = variant.bytes_per_token - variant.nonlayer_bytes
    read_per_layer = max(per_token_layer, 0) / max(variant.layers, 1)
    read_nonlayer = variant.bytes_per_token - read_per_layer * variant.layers
    usable = [int(g.vram_free * (1 - HEADROOM)) for g in node.gpus]

    def cpu_only() -> Placement:
        need = variant.weights_bytes + kv_total + overhead
        seconds = (variant.bytes_per_token + kv_total) / host_bw
        return Placement(
            gpu_layers=(),
            cpu_layers=variant.layers,
            gpu_bytes=0,
            cpu_bytes=need,
            fits=need <= ram_usable,
            decode_tps=1 / seconds,
            upload_s_per_batch=0.0,
            load_s=0.0,
            why_not=""
            if need <= ram_usable
            else f"needs {_gb(need)} > {_gb(ram_usable)} usable RAM",
        )

    if not node.gpus:
        return cpu_only()
    # Everything on the GPUs? The non-layer part (output head) and compute
    # buffer go to the first GPU, layers split in proportion to free VRAM.
    full_need = variant.weights_bytes + kv_total + overhead * len(node.gpus)
    layer_cost = variant.layer_bytes + kv_per_layer
    room = [u - overhead for u in usable]
    room[0] -= variant.nonlayer_bytes
    total_room = sum(max(r, 0) for r in room)
    if full_need <= sum(usable) and all(r >= 0 for r in room):
        shares = _split(variant.layers, [max(r, 0) for r in room], layer_cost)
        if sum(shares) == variant.layers:
            return _gpu_placement(variant, node, shares, 0, kv_total, kv_per_layer, overhead,
                                  read_per_layer, read_nonlayer, host_bw, ram_usable)  # fmt: skip
    # Partial offload: as many layers as fit; the output head stays in RAM.
    room = [u - overhead for u in usable]
    fit_layers = min(variant.layers, int(sum(max(r, 0) for r in room) // max(layer_cost, 1)))
    shares = _split(fit_layers, [max(r, 0) for r in room], layer_cost)
    if sum(shares) == 0 or total_room <= 0:
        placement = cpu_only()
        note = "no layer fits in VRAM"
        return attrs.evolve(placement, why_not=f"{note}; {placement.why_not}".rstrip("; "))
    return _gpu_placement(variant, node, shares, variant.layers - sum(shares), kv_total,
                          kv_per_layer, overhead, read_per_layer, read_nonlayer, host_bw,
                          ram_usable)  # fmt: skip


def _split(layers: int, rooms: list[int], layer_cost: int) -> list[int]:
    """``layers`` spread over devices in proportion to room, none past its room."""
    capacity = [r // max(layer_cost, 1) for r in rooms]
    total_room = sum(rooms) or 1
    shares = [
        min(c, math.floor(layers * r / total_room)) for c, r in zip(capacity, rooms, strict=True)
    ]
    # Hand out what rounding left over to devices that still have room.
    left = layers - sum(shares)
    for i in sorted(range(len(rooms)), key=lambda i: -rooms[i]):
        extra = min(left, capacity[i] - shares[i])
        shares[i] += extra
        left -= extra
    return shares


def _gpu_placement(
    variant: Variant,
    node: NodeSpec,
    shares: list[int],
    cpu_layers: int,
    kv_total: int,
    kv_per_layer: int,
    overhead: int,
    read_per_layer: float,
    read_nonlayer: float,
    host_bw: float,
    ram_usable: int,
) -> Placement:
    seconds = 0.0
    gpu_bytes = 0
    load_s = 0.0
    for i, (gpu, layers) in enumerate(zip(node.gpus, shares, strict=True)):
        if layers == 0:
            continue
        read = layers * (read_per_layer + kv_per_layer)
        stored = layers * (variant.layer_bytes + kv_per_layer) + overhead
        if i == 0 and cpu_layers == 0:
            read += read_nonlayer
            stored += variant.nonlayer_bytes
        seconds += read / (gpu.bandwidth_gbps * 1e9 * GPU_EFFICIENCY)
        gpu_bytes += stored
        if gpu.pcie_gbps:
            load_s += stored / (gpu.pcie_gbps * 1e9)
    cpu_read = cpu_layers * (read_per_layer + kv_per_layer)
    cpu_bytes = cpu_layers * (variant.layer_bytes + kv_per_layer)
    upload = 0.0
    link = min((g.pcie_gbps for g in node.gpus if g.pcie_gbps), default=None)
    if cpu_layers:
        cpu_read += read_nonlayer
        cpu_bytes += variant.nonlayer_bytes
        seconds += cpu_read / host_bw
        hops = 2  # into the first GPU layer and back out to the CPU part
        if link:
            hop = variant.embedding_length * 4 / (link * 1e9) + PCIE_HOP_LATENCY_S
            seconds += hops * hop
            upload = cpu_bytes / (link * 1e9)
    # Layers on more than one GPU hand the hidden state on between them.
    used = sum(1 for s in shares if s)
    if used > 1 and link:
        seconds += (used - 1) * (variant.embedding_length * 4 / (link * 1e9) + PCIE_HOP_LATENCY_S)
    fits = cpu_bytes <= ram_usable
    return Placement(
        gpu_layers=tuple(shares),
        cpu_layers=cpu_layers,
        gpu_bytes=gpu_bytes,
        cpu_bytes=cpu_bytes,
        fits=fits,
        decode_tps=1 / seconds if seconds > 0 else float("inf"),
        upload_s_per_batch=upload,
        load_s=load_s,
        why_not=""
        if fits
        else f"{cpu_layers} layers need {_gb(cpu_bytes)} > {_gb(ram_usable)} usable RAM",
    )


# -- the plan -------------------------------------------------------------------


@attrs.frozen
class Candidate:
    variant: Variant
    placement: Placement
    meets_target: bool
    verdict: str
    """``chosen``, or why not: ``does not fit``, ``too slow``, ``lower quality``…"""

    def to_json(self) -> dict[str, Any]:
        p = self.placement
        return {
            "quantization": self.variant.quantization,
            "source": self.variant.source,
            "path": self.variant.path,
            "weights_bytes": self.variant.weights_bytes,
            "where": p.where,
            "gpu_layers": list(p.gpu_layers),
            "cpu_layers": p.cpu_layers,
            "gpu_bytes": p.gpu_bytes,
            "cpu_bytes": p.cpu_bytes,
            "fits": p.fits,
            "decode_tps": round(p.decode_tps, 2),
            "upload_s_per_batch": round(p.upload_s_per_batch, 4),
            "load_s": round(p.load_s, 3),
            "meets_target": self.meets_target,
            "verdict": self.verdict,
            "why_not": p.why_not,
        }


@attrs.frozen
class Plan:
    model: str
    node: NodeSpec
    context: int
    target_tps: float | None
    candidates: tuple[Candidate, ...]
    choice: Candidate | None
    summary: str

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "node": self.node.describe(),
            "context": self.context,
            "target_tps": self.target_tps,
            "choice": None if self.choice is None else self.choice.to_json(),
            "summary": self.summary,
            "candidates": [c.to_json() for c in self.candidates],
            "notes": list(self.node.notes),
        }

    def explain(self) -> str:
        """The plan as an operator reads it: node, table, choice, reason."""
        lines = [f"model {self.model}, context {self.context} tokens, "
                 f"target {'none' if not self.target_tps else f'{self.target_tps:g} tok/s'}",
                 f"node  {self.node.describe()}"]  # fmt: skip
        lines += [f"note  {note}" for note in self.node.notes]
        lines.append("")
        header = (
            f"  {'quant':<8} {'source':<8} {'weights':>9} {'placement':<38} {'tok/s':>8} verdict"
        )
        lines.append(header)
        for c in self.candidates:
            v, p = c.variant, c.placement
            mark = "→" if c is self.choice else " "
            tps = f"{p.decode_tps:8.1f}" if p.fits else f"{'-':>8}"
            verdict = c.verdict if not p.why_not else f"{c.verdict}: {p.why_not}"
            lines.append(f"{mark} {v.quantization:<8} {v.source:<8} {_gb(v.weights_bytes):>9} "
                         f"{p.where:<38} {tps} {verdict}")  # fmt: skip
        lines.append("")
        lines.append(self.summary)
        if self.choice is not None and self.choice.placement.cpu_layers and self.node.gpus:
            p = self.choice.placement
            lines.append(
                f"prompt batches of ≥{PCIE_UPLOAD_MIN_BATCH} tokens move {_gb(p.cpu_bytes)} of "
                f"RAM-resident weights over PCIe: ≈{p.upload_s_per_batch * 1000:.0f} ms per batch"
            )
        return "\n".join(lines)


def plan(
    model: str,
    variants: Iterable[Variant],
    node: NodeSpec,
    *,
    context: int = 4096,
    target_tps: float | None = None,
) -> Plan:
    """Choose a variant for ``node`` (see the module docstring for the rule)."""
    ordered = sorted(variants, key=lambda v: (-v.quality, v.weights_bytes))
    if not ordered:
        raise PlanError(f"no variants of {model} to plan for")
    placed = [(v, place(v, node, context)) for v in ordered]
    target = target_tps or None
    fitting = [(v, p) for v, p in placed if p.fits]
    meeting = [(v, p) for v, p in fitting if target is None or p.decode_tps >= target]
    chosen: tuple[Variant, Placement] | None = None
    if meeting:
        chosen = meeting[0]  # the list is best quality first
        summary = (
            f"chose {chosen[0].quantization}: the highest quality that fits"
            + (f" and reaches {target:g} tok/s" if target else "")
            + f" ({chosen[1].decode_tps:.1f} tok/s predicted, {chosen[1].where})"
        )
    elif fitting:
        chosen = max(fitting, key=lambda vp: vp[1].decode_tps)
        summary = (
            f"no variant reaches {target:g} tok/s; chose the fastest that fits, "
            f"{chosen[0].quantization} ({chosen[1].decode_tps:.1f} tok/s predicted, "
            f"{chosen[1].where})"
        )
    else:
        summary = f"no variant of {model} fits this node at context {context}"
    candidates = []
    choice: Candidate | None = None
    for v, p in placed:
        meets = p.fits and (target is None or p.decode_tps >= target)
        if chosen is not None and v is chosen[0]:
            verdict = "chosen"
        elif not p.fits:
            verdict = "does not fit"
        elif not meets:
            verdict = "too slow"
        elif chosen is not None and v.quality < chosen[0].quality:
            verdict = "lower quality"
        else:
            verdict = "not chosen"
        candidate = Candidate(v, p, meets, verdict)
        if verdict == "chosen":
            choice = candidate
        candidates.append(candidate)
    return Plan(model, node, context, target, tuple(candidates), choice, summary)


def _gb(n: float) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.1f} GB"
    return f"{n / 1e6:.0f} MB"
