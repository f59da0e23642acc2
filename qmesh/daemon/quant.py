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

The speed model, and why: :mod:`qmesh.daemon.speed`. Per token, every
device that holds part of the model pays for its matrices — for each
weight type, the slower of reading the bytes (bandwidth) and doing the
arithmetic (the FLOP/s the node's calibration measured for that type at
llama.cpp's thread count) — plus fixed work per layer and per token,
attention over the KV cache, choosing the token among the vocabulary and
the serving path's own per-token cost. Layers that do not fit in VRAM stay
in host RAM and llama.cpp computes them on the CPU; that, not the GPU, is
what makes a partial offload slow. The PCIe link enters where llama.cpp
actually uses it: the hidden state crosses it at every CPU↔GPU boundary
per token (small, latency-bound), prompt batches of 32+ tokens upload the
CPU-resident weights to the GPU once per batch (so a slow link makes
time-to-first-token long), and loading copies the GPU's share of the
weights across it. Those are reported per candidate. A node without a
calibration (a simulated one) gets the memory-bound ceiling, flagged.

Measured beats predicted: :func:`plan` takes what the node measured for
its files (:class:`~qmesh.daemon.speedbook.Measured`) and decides on those
figures where it has them, showing the prediction and its error beside.

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

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import attrs

from qmesh.daemon.catalog import ModelInfo, TypeRead
from qmesh.daemon.nodespec import NODE_PRESETS, GpuSpec, NodeSpec, PlanError, gb
from qmesh.daemon.speed import (
    CPU_EFFICIENCY,
    DECODE_POSITION,
    GPU_EFFICIENCY,
    TYPE_BITS,
    Breakdown,
    Share,
    decode_time,
    main_type,
    prompt_time,
)
from qmesh.daemon.speedbook import Measured

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
    "model_id",
    "place",
    "plan",
    "variants_for",
]

HEADROOM: Final = 0.10
"""Fraction of each device's free memory left unused (other processes, fragmentation)."""
COMPUTE_BUFFER_BYTES: Final = 128 * 1024 * 1024
PCIE_HOP_LATENCY_S: Final = 20e-6
PCIE_UPLOAD_MIN_BATCH: Final = 32
PROMPT_TOKENS: Final = 512
"""The prompt length the prompt-processing speed is predicted for."""

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
    vocab_size: int | None = None
    reads: tuple[TypeRead, ...] = ()
    """What a token multiplies by, per weight type (:class:`~qmesh.daemon.catalog.TypeRead`)."""
    layout: str | None = None
    """The block layout (:attr:`~qmesh.daemon.catalog.ModelInfo.layout`)."""

    @property
    def quality(self) -> int:
        return _QUALITY.get(self.quantization, 0)

    @property
    def id(self) -> str | None:
        """The model id a file variant is served under (its file name)."""
        return None if self.path is None else model_id(self.path)

    def type_reads(self) -> tuple[TypeRead, ...]:
        """:attr:`reads`, or — for an entry that has none — the bytes a token
        reads, all in the quantization's main type, head apart."""
        if self.reads:
            return self.reads
        kind = main_type(self.quantization)
        bits = TYPE_BITS.get(kind, QUANT_TYPES.get(self.quantization, 8.5))
        head = min(self.nonlayer_bytes, self.bytes_per_token)
        body = self.bytes_per_token - head
        return (TypeRead(kind, int(body * 8 / bits), body, int(head * 8 / bits), head),)

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
            vocab_size=model.vocab_size,
            reads=model.reads,
            layout=model.layout,
        )

    def quantized(self, target: str, parameters: int) -> Variant:
        """The estimated variant llama.cpp's quantize would produce from this one."""
        source_bpw = self.weights_bytes * 8 / parameters
        ratio = QUANT_TYPES[target] / source_bpw
        # The matrices become mostly the target's main type (quantize's mixes
        # keep a few tensors a little wider; the byte total above has them).
        layer_elements = sum(r.layer_elements for r in self.type_reads())
        other_elements = sum(r.other_elements for r in self.type_reads())
        return attrs.evolve(
            self,
            quantization=target,
            weights_bytes=int(self.weights_bytes * ratio),
            layer_bytes=int(self.layer_bytes * ratio),
            bytes_per_token=int(self.bytes_per_token * ratio),
            source="quantize",
            path=None,
            reads=(
                TypeRead(
                    main_type(target),
                    layer_elements,
                    int(sum(r.layer_bytes for r in self.type_reads()) * ratio),
                    other_elements,
                    int(sum(r.other_bytes for r in self.type_reads()) * ratio),
                ),
            ),
        )


def model_id(path: str) -> str:
    """The id the catalog gives a file: its name without ``.gguf``."""
    return Path(path).name.removesuffix(".gguf")


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
    breakdown: Breakdown = attrs.field(factory=Breakdown)
    """The predicted seconds per token, by cause."""
    prompt_tps: float | None = None
    """Predicted prompt tokens/s (a :data:`PROMPT_TOKENS` prompt); None uncalibrated."""
    calibrated: bool = False

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


def place(
    variant: Variant, node: NodeSpec, context: int, *, position: int = DECODE_POSITION
) -> Placement:
    """Where the layers go on ``node`` and how fast decoding will be (for a
    token at ``position`` of the context, capped at ``context``)."""
    kv_total = variant.kv_bytes_per_token * context
    kv_per_layer = kv_total // max(variant.layers, 1)
    overhead = _overhead(variant)
    ram_usable = int(node.ram_free * (1 - HEADROOM))
    usable = [int(g.vram_free * (1 - HEADROOM)) for g in node.gpus]
    position = min(position, context)

    def cpu_only() -> Placement:
        need = variant.weights_bytes + kv_total + overhead
        cpu = Share("cpu", variant.layers, True, _host_bandwidth(node), node.cpu_rates)
        breakdown, prompt_tps = _speed(variant, node, [cpu], position, 0.0, 0.0)
        return Placement(
            gpu_layers=(),
            cpu_layers=variant.layers,
            gpu_bytes=0,
            cpu_bytes=need,
            fits=need <= ram_usable,
            decode_tps=1 / breakdown.total,
            upload_s_per_batch=0.0,
            load_s=0.0,
            why_not="" if need <= ram_usable else f"needs {gb(need)} > {gb(ram_usable)} usable RAM",
            breakdown=breakdown,
            prompt_tps=prompt_tps,
            calibrated=node.calibration is not None,
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
            return _gpu_placement(variant, node, shares, 0, kv_per_layer, overhead, ram_usable,
                                  position)  # fmt: skip
    # Partial offload: as many layers as fit; the output head stays in RAM.
    room = [u - overhead for u in usable]
    fit_layers = min(variant.layers, int(sum(max(r, 0) for r in room) // max(layer_cost, 1)))
    shares = _split(fit_layers, [max(r, 0) for r in room], layer_cost)
    if sum(shares) == 0 or total_room <= 0:
        placement = cpu_only()
        note = "no layer fits in VRAM"
        return attrs.evolve(placement, why_not=f"{note}; {placement.why_not}".rstrip("; "))
    return _gpu_placement(variant, node, shares, variant.layers - sum(shares), kv_per_layer,
                          overhead, ram_usable, position)  # fmt: skip


def _host_bandwidth(node: NodeSpec) -> float:
    return node.host_bandwidth_gbps * CPU_EFFICIENCY


def _speed(
    variant: Variant,
    node: NodeSpec,
    shares: list[Share],
    position: int,
    transfer_s: float,
    upload_s: float,
) -> tuple[Breakdown, float | None]:
    """Seconds per decoded token, and prompt tokens/s, for ``shares``."""
    reads = variant.type_reads()
    breakdown = decode_time(
        reads,
        shares,
        layers=variant.layers,
        kv_bytes_per_token=variant.kv_bytes_per_token,
        vocab=variant.vocab_size,
        calibration=node.calibration,
        position=position,
        transfer_s=transfer_s,
        layout=variant.layout,
    )
    prompt = prompt_time(reads, shares, layers=variant.layers, tokens=PROMPT_TOKENS)
    if prompt is None:
        return breakdown, None
    batches = math.ceil(PROMPT_TOKENS / 512)  # llama-cpp-python's n_batch
    return breakdown, PROMPT_TOKENS / (prompt + batches * upload_s)


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
    kv_per_layer: int,
    overhead: int,
    ram_usable: int,
    position: int,
) -> Placement:
    gpu_bytes = 0
    load_s = 0.0
    work: list[Share] = []
    for i, (gpu, layers) in enumerate(zip(node.gpus, shares, strict=True)):
        if layers == 0:
            continue
        stored = layers * (variant.layer_bytes + kv_per_layer) + overhead
        head = i == 0 and cpu_layers == 0
        if head:
            stored += variant.nonlayer_bytes
        work.append(
            Share(f"gpu{i}", layers, head, gpu.bandwidth_gbps * GPU_EFFICIENCY, node.gpu_rates)
        )
        gpu_bytes += stored
        if gpu.pcie_gbps:
            load_s += stored / (gpu.pcie_gbps * 1e9)
    cpu_bytes = cpu_layers * (variant.layer_bytes + kv_per_layer)
    upload = transfer = 0.0
    link = min((g.pcie_gbps for g in node.gpus if g.pcie_gbps), default=None)
    if cpu_layers:
        cpu_bytes += variant.nonlayer_bytes
        work.append(Share("cpu", cpu_layers, True, _host_bandwidth(node), node.cpu_rates))
        hops = 2  # into the first GPU layer and back out to the CPU part
        if link:
            hop = variant.embedding_length * 4 / (link * 1e9) + PCIE_HOP_LATENCY_S
            transfer += hops * hop
            upload = cpu_bytes / (link * 1e9)
    # Layers on more than one GPU hand the hidden state on between them.
    used = sum(1 for s in shares if s)
    if used > 1 and link:
        transfer += (used - 1) * (variant.embedding_length * 4 / (link * 1e9) + PCIE_HOP_LATENCY_S)
    breakdown, prompt_tps = _speed(variant, node, work, position, transfer, upload)
    fits = cpu_bytes <= ram_usable
    return Placement(
        gpu_layers=tuple(shares),
        cpu_layers=cpu_layers,
        gpu_bytes=gpu_bytes,
        cpu_bytes=cpu_bytes,
        fits=fits,
        decode_tps=1 / breakdown.total if breakdown.total > 0 else float("inf"),
        upload_s_per_batch=upload,
        load_s=load_s,
        why_not=""
        if fits
        else f"{cpu_layers} layers need {gb(cpu_bytes)} > {gb(ram_usable)} usable RAM",
        breakdown=breakdown,
        prompt_tps=prompt_tps,
        calibrated=node.calibration is not None,
    )


# -- the plan -------------------------------------------------------------------


@attrs.frozen
class Candidate:
    variant: Variant
    placement: Placement
    meets_target: bool
    verdict: str
    """``chosen``, or why not: ``does not fit``, ``too slow``, ``lower quality``…"""
    measured: Measured | None = None
    """What the node measured for this file, when it has served it."""

    @property
    def tps(self) -> float:
        """The decode speed the choice rests on: measured if known, else predicted."""
        return self.measured.median if self.measured is not None else self.placement.decode_tps

    @property
    def error(self) -> float | None:
        """(predicted − measured) ÷ measured, for a file the node has measured."""
        if self.measured is None:
            return None
        return (self.placement.decode_tps - self.measured.median) / self.measured.median

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
            "decode_tps": round(self.tps, 2),
            "predicted_tps": round(p.decode_tps, 2),
            "measured": None if self.measured is None else self.measured.to_json(),
            "error": None if self.error is None else round(self.error, 4),
            "calibrated": p.calibrated,
            "ms_per_token": p.breakdown.to_json(),
            "prompt_tps": None if p.prompt_tps is None else round(p.prompt_tps, 1),
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
        calibration = self.node.calibration
        return {
            "model": self.model,
            "node": self.node.describe(),
            "context": self.context,
            "target_tps": self.target_tps,
            "choice": None if self.choice is None else self.choice.to_json(),
            "summary": self.summary,
            "candidates": [c.to_json() for c in self.candidates],
            "calibration": None if calibration is None else calibration.to_json(),
            "notes": list(self.node.notes),
        }

    def explain(self, *, detail: bool = False) -> str:
        """The plan as an operator reads it: node, table, choice, reason.
        ``detail`` adds the calibration and each candidate's cost per token."""
        lines = [f"model {self.model}, context {self.context} tokens, "
                 f"target {'none' if not self.target_tps else f'{self.target_tps:g} tok/s'}",
                 f"node  {self.node.describe()}"]  # fmt: skip
        lines += [f"note  {note}" for note in self.node.notes]
        calibration = self.node.calibration
        if calibration is None:
            lines.append(
                "note  uncalibrated node: tok/s is the memory-bound ceiling (no compute, "
                "per-token or serving costs); a daemon on the node calibrates itself"
            )
        elif detail:
            lines += [f"      {line}" for line in calibration.describe().splitlines()]
            lines += [f"note  {note}" for note in calibration.notes]
        lines.append("")
        measured = any(c.measured is not None for c in self.candidates)
        header = f"  {'quant':<8} {'source':<8} {'weights':>9} {'placement':<38} {'tok/s':>8}"
        if measured:
            header += f" {'measured':>16} {'error':>6}"
        lines.append(header + " verdict")
        for c in self.candidates:
            v, p = c.variant, c.placement
            mark = "→" if c is self.choice else " "
            tps = f"{p.decode_tps:8.1f}" if p.fits else f"{'-':>8}"
            if measured:
                if c.measured is not None and c.error is not None:
                    low, high = c.measured.spread
                    shown = f"{c.measured.median:.1f} [{low:.0f}–{high:.0f}]"
                    tps += f" {shown:>16} {c.error * 100:+5.0f}%"
                else:
                    tps += f" {'-':>16} {'':>6}"
            verdict = c.verdict if not p.why_not else f"{c.verdict}: {p.why_not}"
            lines.append(f"{mark} {v.quantization:<8} {v.source:<8} {gb(v.weights_bytes):>9} "
                         f"{p.where:<38} {tps} {verdict}")  # fmt: skip
            if detail and p.fits:
                prompt = "" if p.prompt_tps is None else f"; prompt {p.prompt_tps:.0f} tok/s"
                lines.append(f"             {p.breakdown.describe()}{prompt}")
                if c.measured is not None:
                    lines.append(
                        f"             measured {len(c.measured.samples)} request(s): median "
                        f"{c.measured.median:.1f} tok/s; predicted {p.decode_tps:.1f}"
                    )
        lines.append("")
        lines.append(self.summary)
        if measured:
            lines.append(
                "measured: decode tok/s of the node's own requests (median [min–max]); where "
                "there is one, the choice uses it instead of the prediction"
            )
        if self.choice is not None and self.choice.placement.cpu_layers and self.node.gpus:
            p = self.choice.placement
            lines.append(
                f"prompt batches of ≥{PCIE_UPLOAD_MIN_BATCH} tokens move {gb(p.cpu_bytes)} of "
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
    measured: Mapping[str, Measured] | None = None,
) -> Plan:
    """Choose a variant for ``node`` (see the module docstring for the rule).
    ``measured`` maps model ids to what the node measured for those files."""
    ordered = sorted(variants, key=lambda v: (-v.quality, v.weights_bytes))
    if not ordered:
        raise PlanError(f"no variants of {model} to plan for")
    seen = measured or {}
    placed = [
        (v, place(v, node, context), seen.get(v.id) if v.id is not None else None) for v in ordered
    ]

    def speed(entry: tuple[Variant, Placement, Measured | None]) -> float:
        _, p, m = entry
        return m.median if m is not None else p.decode_tps

    target = target_tps or None
    fitting = [e for e in placed if e[1].fits]
    meeting = [e for e in fitting if target is None or speed(e) >= target]
    chosen: tuple[Variant, Placement, Measured | None] | None = None
    how = ""
    if meeting:
        chosen = meeting[0]  # the list is best quality first
        how = "measured" if chosen[2] is not None else "predicted"
        summary = (
            f"chose {chosen[0].quantization}: the highest quality that fits"
            + (f" and reaches {target:g} tok/s" if target else "")
            + f" ({speed(chosen):.1f} tok/s {how}, {chosen[1].where})"
        )
    elif fitting:
        chosen = max(fitting, key=speed)
        how = "measured" if chosen[2] is not None else "predicted"
        summary = (
            f"no variant reaches {target:g} tok/s; chose the fastest that fits, "
            f"{chosen[0].quantization} ({speed(chosen):.1f} tok/s {how}, {chosen[1].where})"
        )
    else:
        summary = f"no variant of {model} fits this node at context {context}"
    candidates = []
    choice: Candidate | None = None
    for entry in placed:
        v, p, m = entry
        meets = p.fits and (target is None or speed(entry) >= target)
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
        candidate = Candidate(v, p, meets, verdict, m)
        if verdict == "chosen":
            choice = candidate
        candidates.append(candidate)
    return Plan(model, node, context, target, tuple(candidates), choice, summary)
