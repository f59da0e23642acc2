"""How fast a model decodes and reads its prompt on a node: the planner's cost model.

For: :func:`decode_time` (seconds per generated token, itemised as a
:class:`Breakdown`) and :func:`prompt_time` (seconds to process a prompt),
given what each device of the node holds (:class:`Share`: layers, whether
the output head is there, its bandwidth and measured rates) and the
node's :class:`~qmesh.daemon.calibration.Calibration`. Pure functions;
:mod:`qmesh.daemon.quant` places the layers and calls them.

The model. One token costs, per device that holds part of the model::

    Σ over weight types τ  blend(B_τ / BW, 2·E_τ / F_τ)    the matrices
  + layers × layer_s + token_s                             fixed work per layer and per token
  + KV cache read at the decode position                   attention, priced like a matrix

and, once per token, ``sample_s + vocab × sample_s_per_vocab`` (choosing
the token among the whole vocabulary) and ``serve_s`` (the serving path:
llama-cpp-python's per-token Python work, its HTTP server, the stream to
the daemon). E_τ and B_τ are the elements and bytes of type τ the token
multiplies by (:class:`~qmesh.daemon.catalog.TypeRead`), F_τ the matrix-
vector FLOP/s the calibration measured for τ at the runtime's thread count
(dequantizing a Q5_0 block costs more than a Q4_0 one: the rates differ by
2× between types), BW the memory bandwidth: what the calibration measured
llama.cpp itself reaching on a model far bigger than the caches (on the host
an F32 model at the calibrated thread count, on a GPU a 2 GiB F16 model);
without that, membench's read rate at the runtime's thread count for the
host, NVML's peak × :data:`GPU_EFFICIENCY` for a GPU. The slower of
arithmetic and memory bounds each type — a 270M model on one CPU thread
is bound by arithmetic (its F16 variant by memory), an 8B model on a GPU
by memory — but where they take about as long, neither hides the other
whole: the CPU's time is their blend ``(M^p + A^p)^(1/p)``
(:func:`~qmesh.daemon.calibration.blend`) with the p the calibration
fitted on a Q8_0 model beyond the caches (about 3 here: 1.16× the slower
where both are equal). Adding them (p = 1) predicted this machine 30 %
slow; the slower alone 15-30 % fast. Without a calibration the rates are
unbounded and the fixed terms zero: the memory-bound ceiling the planner
used before, and the plan says so.

Prompt processing is batched matrix-matrix work: ``2·E_τ·n / P_τ`` with P_τ
the calibrated batch FLOP/s, the output head once (only the last prompt
token's logits are computed).

Not for: where layers go (:mod:`qmesh.daemon.quant`) or measuring
(:mod:`qmesh.daemon.calibrate`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Final

import attrs

from qmesh.daemon.calibration import blend
from qmesh.daemon.catalog import TypeRead

if TYPE_CHECKING:
    from qmesh.daemon.calibration import Calibration, DeviceRates

__all__ = [
    "DECODE_POSITION",
    "GPU_EFFICIENCY",
    "TYPE_BITS",
    "Breakdown",
    "Share",
    "decode_time",
    "main_type",
    "prompt_time",
    "rate_for",
]

GPU_EFFICIENCY: Final = 0.75
"""Share of peak VRAM bandwidth llama.cpp's CUDA decode reaches (typically 70-85 %)."""
CPU_EFFICIENCY: Final = 1.0
"""Decode's share of the measured read bandwidth (membench's scan is what
decoding does: it streams weights and writes almost nothing)."""
DECODE_POSITION: Final = 256
"""The context position the decode speed is predicted at: a token a few
hundred tokens into a conversation. Attention reads the KV cache of the
positions before it; llama.cpp reads only the filled cells."""

TYPE_BITS: Final = {
    "F32": 32.0, "F16": 16.0, "BF16": 16.0, "Q8_0": 8.5, "Q6_K": 6.5625, "Q5_1": 6.0,
    "Q5_K": 5.5, "Q5_0": 5.5, "Q4_1": 5.0, "Q4_K": 4.5, "Q4_0": 4.5, "IQ4_NL": 4.5,
    "MXFP4": 4.25, "IQ4_XS": 4.25, "Q3_K": 3.4375, "IQ3_S": 3.4375, "IQ3_XXS": 3.0625,
    "Q2_K": 2.625, "IQ2_S": 2.5, "IQ2_XS": 2.3125, "IQ2_XXS": 2.0625, "TQ2_0": 2.0625,
    "IQ1_M": 1.75, "TQ1_0": 1.6875, "IQ1_S": 1.5625,
}  # fmt: skip
"""Bits per weight of each ggml type (block size and bytes, from ggml)."""

_MAIN_TYPES: Final = {
    "Q5_K_M": "Q5_K", "Q5_K_S": "Q5_K", "Q4_K_M": "Q4_K", "Q4_K_S": "Q4_K", "Q3_K_L": "Q3_K",
    "Q3_K_M": "Q3_K", "Q3_K_S": "Q3_K", "Q2_K_S": "Q2_K", "IQ3_M": "IQ3_S", "IQ3_XS": "IQ3_XXS",
    "IQ2_M": "IQ2_S",
}  # fmt: skip


def main_type(quantization: str) -> str:
    """The ggml type most of a file of ``quantization`` (a file type such as
    ``Q4_K_M``) is stored in: ``Q4_K``."""
    return _MAIN_TYPES.get(quantization, quantization)


def rate_for(rates: Mapping[str, float], type_name: str) -> float | None:
    """The calibrated rate for ``type_name``, or for the measured type
    closest to it in bits per weight (same family first: k-quants, legacy
    quants, floats); None when nothing was measured."""
    if type_name in rates:
        return rates[type_name]
    if not rates:
        return None
    bits = TYPE_BITS.get(type_name, 8.5)

    def family(name: str) -> int:
        return 0 if name.startswith("F") or name == "BF16" else 1 if "_K" in name else 2

    def distance(name: str) -> tuple[bool, float]:
        return family(name) != family(type_name), abs(TYPE_BITS.get(name, 8.5) - bits)

    return rates[min(rates, key=distance)]


@attrs.frozen
class Share:
    """The part of one token's work that one device does."""

    device: str
    """``cpu`` or ``gpu0``, ``gpu1``…"""
    layers: int
    head: bool
    """Whether the output head (and the work outside the blocks) runs here."""
    bandwidth_gbps: float
    """Effective memory bandwidth for this device's weights."""
    rates: DeviceRates | None = None


@attrs.frozen
class Breakdown:
    """Seconds per generated token, by cause."""

    weights: float = 0.0
    arithmetic: float = 0.0
    """The part of :attr:`weights` spent computing (the rest is moving bytes)."""
    attention: float = 0.0
    fixed: float = 0.0
    sampling: float = 0.0
    serving: float = 0.0
    transfer: float = 0.0

    @property
    def total(self) -> float:
        return (
            self.weights + self.attention + self.fixed + self.sampling + self.serving
            + self.transfer
        )  # fmt: skip

    def to_json(self) -> dict[str, float]:
        data = {k: round(v * 1000, 4) for k, v in attrs.asdict(self).items()}
        data["total"] = round(self.total * 1000, 4)
        return data

    def describe(self) -> str:
        parts = [
            f"weights {self.weights * 1000:.2f}"
            + (f" (arithmetic {self.arithmetic * 1000:.2f})" if self.arithmetic else ""),
            f"attention {self.attention * 1000:.2f}",
            f"fixed {self.fixed * 1000:.2f}",
            f"sampling {self.sampling * 1000:.2f}",
            f"serving {self.serving * 1000:.2f}",
        ]
        if self.transfer:
            parts.append(f"PCIe {self.transfer * 1000:.2f}")
        return f"{self.total * 1000:.2f} ms/token = " + " + ".join(parts)


def _portion(read: TypeRead, share: Share, layers: int) -> tuple[float, float]:
    """(elements, bytes) of ``read`` that ``share`` multiplies by per token."""
    fraction = share.layers / layers if layers else 0.0
    elements = read.layer_elements * fraction
    size = read.layer_bytes * fraction
    if share.head:
        elements += read.other_elements
        size += read.other_bytes
    return elements, size


def decode_time(
    reads: Sequence[TypeRead],
    shares: Sequence[Share],
    *,
    layers: int,
    kv_bytes_per_token: int,
    vocab: int | None,
    calibration: Calibration | None,
    position: int = DECODE_POSITION,
    transfer_s: float = 0.0,
    layout: str | None = None,
) -> Breakdown:
    """Seconds to generate one token with the model's work split as ``shares``;
    ``layout`` (the model's block layout) picks the fixed costs its probe
    measured, where the calibration has one."""
    weights = arithmetic = attention = fixed = 0.0

    def cost(rates: DeviceRates | None, bandwidth: float, elements: float, size: float,
             kind: str) -> tuple[float, float]:  # fmt: skip
        """(seconds, of which arithmetic) for ``elements`` weights in ``size`` bytes."""
        flops = None if rates is None else rate_for(rates.matvec_gflops, kind)
        compute = 2 * elements / (flops * 1e9) if flops else 0.0
        if rates is not None and rates.stream_gbps:
            bandwidth = rates.stream_gbps * 1e9  # what llama.cpp's own reading reached
        memory = size / bandwidth
        seconds = blend(memory, compute, None if rates is None else rates.overlap)
        return seconds, compute if compute > memory else 0.0

    for share in shares:
        if share.layers == 0 and not share.head:
            continue
        bandwidth = share.bandwidth_gbps * 1e9
        for read in reads:
            elements, size = _portion(read, share, layers)
            seconds, part = cost(share.rates, bandwidth, elements, size, read.type)
            weights += seconds
            arithmetic += part
        # Attention reads K and V (f16) of every earlier position, per layer
        # here: kv bytes are kv/2 elements.
        kv = kv_bytes_per_token * position * (share.layers / layers if layers else 0.0)
        attention += cost(share.rates, bandwidth, kv / 2, kv, "F16")[0]
        if share.rates is not None:
            token_s, layer_s = share.rates.token_s, share.rates.layer_s
            if layout is not None and layout in share.rates.layouts:
                token_s, layer_s = share.rates.layouts[layout]
            fixed += share.layers * layer_s + (token_s if share.head else 0.0)
    sampling = serving = 0.0
    if calibration is not None:
        sampling = calibration.sample_s + (vocab or 0) * calibration.sample_s_per_vocab
        serving = calibration.serve_s
    return Breakdown(
        weights=weights,
        arithmetic=arithmetic,
        attention=attention,
        fixed=fixed,
        sampling=sampling,
        serving=serving,
        transfer=transfer_s,
    )


def prompt_time(
    reads: Sequence[TypeRead], shares: Sequence[Share], *, layers: int, tokens: int
) -> float | None:
    """Seconds to process a prompt of ``tokens`` in batches (matrix-matrix
    work at the calibrated batch rates); None without calibrated rates."""
    seconds = 0.0
    for share in shares:
        if share.layers == 0 and not share.head:
            continue
        if share.rates is None:
            return None
        for read in reads:
            # The output head runs for the last token only (no logits for the rest).
            body, _ = _portion(attrs.evolve(read, other_elements=0, other_bytes=0), share, layers)
            head = read.other_elements if share.head else 0
            flops = rate_for(share.rates.prompt_gflops, read.type)
            decode = rate_for(share.rates.matvec_gflops, read.type)
            if flops is None or (head and decode is None):
                return None
            seconds += 2 * body * tokens / (flops * 1e9)
            if head and decode:
                seconds += 2 * head / (decode * 1e9)
    return seconds
