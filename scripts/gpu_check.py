"""The Python half of scripts/gpu-check.sh: a test model, and the daemon's GPU path for real.

For: ``make-model OUT [--shape tiny|1b|8b]``, which writes a Llama-shaped
GGUF with random weights and a byte-fallback SentencePiece vocabulary
(:mod:`qmesh.daemon.synth`: any text tokenizes; the weights make nonsense,
which is fine for timing — the real Gemma file is 253 MB, more than a
device call may carry); and ``test MODEL``, which runs the daemon's own
code on this machine: telemetry through the real NVML, the measured host
bandwidth, a fresh node calibration with every layer offloaded (synthetic
models only: the prediction is made before MODEL has ever run here), the
quantization planner's plan for the model on this node — its predicted
tokens/s by cause — then the llama.cpp runtime (a supervised model server,
``--n_gpu_layers`` from the plan) streaming completions, with measured
decode tokens/s against the prediction (and against the old memory-bound
ceiling) and the VRAM NVML sees in use against the planner's memory
estimate. It prints a report and writes it as JSON to
``$OUT/gpu-check.json`` when ``OUT`` is set.

Decode rate of a round: completion tokens after the first over the time
from the first to the last streamed piece — when the pieces were about one
per token; when the runtime coalesced them (fewer pieces than tokens: the
first piece then comes late and the last two close together, which once
gave "3235.7 tok/s"), completion tokens over the end-to-end time less the
time to first token of the well-streamed rounds.

Not for: CI (there is no GPU there), or anything the unit tests cover.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_model(out: Path, shape: str) -> None:
    from qmesh.daemon.synth import SHAPES, write_model

    write_model(out, SHAPES[shape], name=f"qmesh gpu-check {shape} (random weights)")
    print(f"wrote {out} ({out.stat().st_size / 1e9:.2f} GB, shape {shape})")


STREAMED_SHARE = 0.9
"""Pieces per token from which a round counts as streamed token by token."""


def decode_rate(
    tokens: int, start: float, stamps: list[float], end: float, ttft_ref: float | None
) -> tuple[float | None, bool]:
    """(decode tok/s of one round, whether it streamed token by token)."""
    if tokens < 2 or not stamps:
        return None, False
    if len(stamps) >= STREAMED_SHARE * tokens and len(stamps) > 1 and stamps[-1] > stamps[0]:
        return (tokens - 1) / (stamps[-1] - stamps[0]), True
    ttft = ttft_ref if ttft_ref is not None else 0.0
    span = end - start - ttft
    if span <= 0:
        span = end - start
    return tokens / span, False


def _vram_used() -> int | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return None


async def _run_model(
    model_path: Path, gpu_layers: int, context: int, rounds: int, tokens: int
) -> dict[str, Any]:
    import trio

    from qmesh.daemon.catalog import Catalog
    from qmesh.daemon.runtimes.base import Delta, Finished, GenerationRequest
    from qmesh.daemon.runtimes.llamacpp import LlamaCppRuntime

    catalog = Catalog([model_path.parent])
    catalog.scan()
    model_id = model_path.name.removesuffix(".gguf")
    logs = Path(tempfile.mkdtemp(prefix="gpu-check-logs-"))
    runtime = LlamaCppRuntime(
        "llama.cpp",
        catalog,
        log_dir=logs,
        context_length=context,
        gpu_layers=lambda _model: gpu_layers,
        load_timeout_s=300,
    )
    result: dict[str, Any] = {"gpu_layers": gpu_layers}
    async with trio.open_nursery() as nursery:
        await nursery.start(runtime.run)
        before = _vram_used()
        started = time.perf_counter()
        await runtime.load(model_id)
        result["load_s"] = round(time.perf_counter() - started, 2)
        loaded = _vram_used()
        if before is not None and loaded is not None:
            result["vram_used_by_model"] = loaded - before
        result["loaded_models"] = await runtime.loaded_models()
        rounds_seen: list[tuple[int, float, list[float], float]] = []
        for i in range(rounds + 1):  # the first is a warm-up
            request = GenerationRequest.from_openai(
                "completions",
                {"prompt": f"Round {i}: the", "max_tokens": tokens, "temperature": 0},
            )
            start = time.perf_counter()
            stamps: list[float] = []
            finished = None
            async for event in runtime.generate(model_id, request):
                if isinstance(event, Delta):
                    stamps.append(time.perf_counter())
                elif isinstance(event, Finished):
                    finished = event
            end = time.perf_counter()
            if i == 0 or finished is None:
                continue
            rounds_seen.append((finished.completion_tokens or len(stamps), start, stamps, end))
        streamed = [
            stamps[0] - start
            for count, start, stamps, _ in rounds_seen
            if stamps and len(stamps) >= STREAMED_SHARE * count
        ]
        ttft_ref = statistics.median(streamed) if streamed else None
        speeds, per_token = [], []
        for count, start, stamps, end in rounds_seen:
            rate, token_by_token = decode_rate(count, start, stamps, end, ttft_ref)
            if rate is not None:
                speeds.append(rate)
                per_token.append(token_by_token)
        result["decode_tps"] = [round(s, 1) for s in speeds]
        result["token_by_token"] = per_token
        result["pieces_and_tokens"] = [(len(st), c) for c, _, st, _ in rounds_seen]
        result["decode_tps_median"] = round(statistics.median(speeds), 1) if speeds else None
        result["ttft_ms_median"] = None if ttft_ref is None else round(ttft_ref * 1000, 1)
        result["model_server_log"] = str(logs)
        await runtime.unload(model_id)
        after = _vram_used()
        if loaded is not None and after is not None:
            result["vram_freed_by_unload"] = loaded - after
        nursery.cancel_scope.cancel()
    return result


def test(model_path: Path, *, context: int, rounds: int, tokens: int) -> dict[str, Any]:
    import attrs
    import trio

    from qmesh.daemon.calibration import CalibrationKey, default_threads, obtain
    from qmesh.daemon.catalog import describe_gguf
    from qmesh.daemon.membench import cached_bandwidth
    from qmesh.daemon.quant import NodeSpec, Variant, memory_need, place, plan, variants_for
    from qmesh.daemon.telemetry import TelemetryReader

    report: dict[str, Any] = {}
    directory = Path(tempfile.gettempdir()) / "qmesh-gpu-check"
    bandwidth = cached_bandwidth(directory)
    reader = TelemetryReader(host_bandwidth_gbps=bandwidth.gbps)
    reader.start()
    telemetry = reader.read()
    reader.close()
    report["telemetry"] = telemetry.to_json()
    report["host_bandwidth"] = bandwidth.to_json()
    print("== telemetry (the daemon's TelemetryReader, real NVML)")
    print(f"NVML: {telemetry.nvml}; driver {telemetry.driver_version}")
    for gpu in telemetry.gpus:
        print(
            f"GPU {gpu.index}: {gpu.name} ({gpu.uuid}); VRAM {gpu.vram_used / 2**30:.1f} / "
            f"{gpu.vram_total / 2**30:.1f} GiB used; util {gpu.utilization_pct}% (mem "
            f"{gpu.memory_utilization_pct}%); {gpu.temperature_c} °C; {gpu.power_w} W of "
            f"{gpu.power_limit_w} W; PCIe now {gpu.pcie_gen}.0 x{gpu.pcie_width} = "
            f"{gpu.pcie_gbps} GB/s, max {gpu.pcie_max_gen}.0 x{gpu.pcie_max_width} = "
            f"{gpu.pcie_max_gbps} GB/s; memory bandwidth {gpu.memory_bandwidth_gbps} GB/s"
        )
    host = telemetry.host
    print(
        f"host: {host.cpus_logical} CPUs, RAM {host.ram_available / 1e9:.0f} / "
        f"{host.ram_total / 1e9:.0f} GB free, read bandwidth {bandwidth.gbps:.1f} GB/s "
        f"({bandwidth.threads} threads)"
    )
    # The node calibration the daemon makes at its first start: synthetic
    # models only, CPU and every layer offloaded, the serving path through
    # a model server. Fresh: nothing of MODEL has run here yet.
    threads = default_threads()[0]
    key = CalibrationKey.local(threads=None, gpus=[g.name for g in telemetry.gpus])
    print("\n== node calibration (synthetic models, CPU and GPU)")
    started = time.perf_counter()
    calibration = (
        None if key is None else obtain(directory, key, models=[model_path], remeasure=True)
    )
    if calibration is None:
        print("calibration FAILED (see the log above); predicting the memory-bound ceiling")
    else:
        print(f"{calibration.describe()}\n  ({time.perf_counter() - started:.1f}s wall)")
        for note in calibration.notes:
            print(f"  note: {note}")
        report["calibration"] = calibration.to_json()
    model = describe_gguf(model_path)
    node = NodeSpec.from_telemetry(
        telemetry, name="this-node", calibration=calibration, threads=threads
    )
    node = attrs.evolve(node, host_bandwidth_gbps=bandwidth.at_threads(threads))
    result = plan(model.equivalence, variants_for([model]), node, context=context)
    print("\n== plan (qmesh quant plan --explain)")
    print(result.explain(detail=True))
    report["plan"] = result.to_json()
    variant = Variant.from_model(model)
    placement = place(variant, node, context)
    ceiling = place(variant, attrs.evolve(node, calibration=None), context)
    gpu_layers = -1 if node.gpus and placement.cpu_layers == 0 else sum(placement.gpu_layers)
    print(f"\n== llama.cpp runtime: {model.id}, --n_gpu_layers {gpu_layers}, context {context}")
    measured = trio.run(_run_model, model_path, gpu_layers, context, rounds, tokens)
    report["run"] = measured
    predicted = placement.decode_tps
    report["predicted_tps"] = round(predicted, 1)
    report["predicted_ms_per_token"] = placement.breakdown.to_json()
    report["ceiling_tps"] = round(ceiling.decode_tps, 1)
    report["memory_estimate"] = memory_need(variant, context)
    got = measured.get("decode_tps_median")
    print(f"load {measured['load_s']} s; resident: {measured['loaded_models']}")
    print(
        f"decode tok/s per round: {measured['decode_tps']} (token by token: "
        f"{measured['token_by_token']}; pieces/tokens {measured['pieces_and_tokens']}); "
        f"TTFT {measured['ttft_ms_median']} ms"
    )
    print(f"predicted: {placement.breakdown.describe()}")
    if got:
        for name, value in (("predicted", predicted), ("memory-bound ceiling", ceiling.decode_tps)):
            print(
                f"{name} {value:.1f} tok/s, measured {got} tok/s: error "
                f"{(value - got) / got * 100:+.0f}% (measured ÷ {name} {got / value:.2f})"
            )
    if "vram_used_by_model" in measured:
        print(
            f"VRAM taken by the model server: {measured['vram_used_by_model'] / 1e9:.2f} GB; "
            f"planner's estimate {report['memory_estimate'] / 1e9:.2f} GB; freed by unload "
            f"{measured.get('vram_freed_by_unload', 0) / 1e9:.2f} GB"
        )
    out = os.environ.get("OUT")
    if out:
        Path(out, "gpu-check.json").write_text(json.dumps(report, indent=2))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("make-model")
    make.add_argument("out", type=Path)
    make.add_argument("--shape", choices=("tiny", "1b", "8b"), default="tiny")
    run = commands.add_parser("test")
    run.add_argument("model", type=Path)
    run.add_argument("--context", type=int, default=2048)
    run.add_argument("--rounds", type=int, default=3)
    run.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    if args.command == "make-model":
        make_model(args.out, args.shape)
    else:
        test(args.model, context=args.context, rounds=args.rounds, tokens=args.tokens)


if __name__ == "__main__":
    main()
