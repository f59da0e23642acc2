"""The Python half of scripts/gpu-check.sh: a test model, and the daemon's GPU path for real.

For: ``make-model OUT [--shape tiny|8b]``, which writes a Llama-shaped GGUF
with random weights and a byte-fallback SentencePiece vocabulary (any text
tokenizes; the weights make nonsense, which is fine for timing — the real
Gemma file is 253 MB, more than a device call may carry); and ``test
MODEL``, which runs the daemon's own code on this machine: telemetry through
the real NVML, the measured host bandwidth, the quantization planner's plan
for the model on this node, then the llama.cpp runtime (a supervised
model server, ``--n_gpu_layers`` from the plan) streaming completions, with
measured decode tokens/s against the planner's prediction and the VRAM NVML
sees in use against the planner's memory estimate. It prints a report and
writes it as JSON to ``$OUT/gpu-check.json`` when ``OUT`` is set.

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

SHAPES = {
    # name: (layers, dim, ffn, heads, kv_heads, vocab)
    "tiny": (2, 256, 512, 4, 2, 512),
    "1b": (16, 2048, 8192, 16, 8, 32000),
    "8b": (32, 4096, 14336, 32, 8, 32000),  # Llama 3 8B's body, a smaller vocabulary
}


def make_model(out: Path, shape: str) -> None:
    import gguf
    import numpy as np

    layers, dim, ffn, heads, kv_heads, vocab = SHAPES[shape]
    kv_dim = dim // heads * kv_heads
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_name(f"qmesh gpu-check {shape} (random weights)")
    writer.add_basename("qmesh-gpucheck")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_context_length(4096)
    writer.add_embedding_length(dim)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(dim // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    # SentencePiece with byte fallback: <unk> <s> </s>, the 256 bytes, then
    # filler pieces. Any text tokenizes to bytes; EOS is 1 token in `vocab`,
    # so random weights rarely stop a generation early.
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"▁w{i}" for i in range(vocab - len(tokens))]
    types = [2, 3, 3] + [6] * 256 + [1] * (vocab - 259)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    rng = np.random.default_rng(7)
    pool = (rng.standard_normal(1 << 22, dtype=np.float32) * 0.02).astype(np.float16)

    def weight(rows: int, cols: int) -> Any:
        # Values do not matter; filling from a pool is a memcpy, not an RNG call.
        flat = np.empty(rows * cols, dtype=np.float16)
        for start in range(0, flat.size, pool.size):
            piece = flat[start : start + pool.size]
            piece[:] = pool[: piece.size]
        return flat.reshape(rows, cols)

    def norm() -> Any:
        return np.ones(dim, dtype=np.float32)

    writer.add_tensor("token_embd.weight", weight(vocab, dim))
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", norm())
        writer.add_tensor(f"blk.{i}.attn_q.weight", weight(dim, dim))
        writer.add_tensor(f"blk.{i}.attn_k.weight", weight(kv_dim, dim))
        writer.add_tensor(f"blk.{i}.attn_v.weight", weight(kv_dim, dim))
        writer.add_tensor(f"blk.{i}.attn_output.weight", weight(dim, dim))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", norm())
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", weight(ffn, dim))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", weight(ffn, dim))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", weight(dim, ffn))
    writer.add_tensor("output_norm.weight", norm())
    writer.add_tensor("output.weight", weight(vocab, dim))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    print(f"wrote {out} ({out.stat().st_size / 1e9:.2f} GB, shape {shape})")


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
        speeds, ttfts = [], []
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
            if i == 0 or len(stamps) < 2 or finished is None:
                continue
            count = finished.completion_tokens or len(stamps)
            speeds.append((count - 1) / (stamps[-1] - stamps[0]))
            ttfts.append(stamps[0] - start)
        result["decode_tps"] = [round(s, 1) for s in speeds]
        result["decode_tps_median"] = round(statistics.median(speeds), 1) if speeds else None
        result["ttft_ms_median"] = round(statistics.median(ttfts) * 1000, 1) if ttfts else None
        result["model_server_log"] = str(logs)
        await runtime.unload(model_id)
        after = _vram_used()
        if loaded is not None and after is not None:
            result["vram_freed_by_unload"] = loaded - after
        nursery.cancel_scope.cancel()
    return result


def test(model_path: Path, *, context: int, rounds: int, tokens: int) -> dict[str, Any]:
    import trio

    from qmesh.daemon.catalog import describe_gguf
    from qmesh.daemon.membench import cached_bandwidth
    from qmesh.daemon.quant import NodeSpec, Variant, memory_need, place, plan, variants_for
    from qmesh.daemon.telemetry import TelemetryReader

    report: dict[str, Any] = {}
    bandwidth = cached_bandwidth(Path(tempfile.gettempdir()) / "qmesh-gpu-check")
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
    model = describe_gguf(model_path)
    node = NodeSpec.from_telemetry(telemetry, name="this-node")
    result = plan(model.equivalence, variants_for([model]), node, context=context)
    print("\n== plan (qmesh quant plan)")
    print(result.explain())
    report["plan"] = result.to_json()
    variant = Variant.from_model(model)
    placement = place(variant, node, context)
    gpu_layers = -1 if node.gpus and placement.cpu_layers == 0 else sum(placement.gpu_layers)
    print(f"\n== llama.cpp runtime: {model.id}, --n_gpu_layers {gpu_layers}, context {context}")
    measured = trio.run(_run_model, model_path, gpu_layers, context, rounds, tokens)
    report["run"] = measured
    predicted = placement.decode_tps
    report["predicted_tps"] = round(predicted, 1)
    report["memory_estimate"] = memory_need(variant, context)
    got = measured.get("decode_tps_median")
    print(f"load {measured['load_s']} s; resident: {measured['loaded_models']}")
    print(f"decode tok/s per round: {measured['decode_tps']}; TTFT {measured['ttft_ms_median']} ms")
    if got:
        print(
            f"predicted {predicted:.1f} tok/s, measured {got} tok/s: prediction error "
            f"{(predicted - got) / got * 100:+.0f}% (measured ÷ predicted {got / predicted:.2f})"
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
    make.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
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
