"""The quantization planner on simulated nodes (table tests) and
``qmesh quant plan`` on the real Gemma file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import attrs
import pytest
from daemonkit import gemma_path

from qmesh.daemon.calibration import (
    CACHE_ENV,
    TIMEOUT_S,
    Calibration,
    CalibrationKey,
    DeviceRates,
)
from qmesh.daemon.catalog import ModelInfo, describe_gguf
from qmesh.daemon.quant import NodeSpec, PlanError, Variant, place, plan, variants_for
from qmesh.daemon.speedbook import Measured, SpeedBook


def f16_model(name: str, parameters: int, layers: int, embedding: int, vocab: int,
              kv_heads: int, size_label: str) -> ModelInfo:  # fmt: skip
    """An F16 GGUF as the catalog would describe it (Llama 3 shapes: untied
    embeddings, 128-wide heads, grouped-query attention)."""
    weights = parameters * 2
    embeddings = vocab * embedding * 2
    return ModelInfo(
        id=f"{name}-f16", path=f"/models/{name}-f16.gguf", runtime="llama.cpp",
        architecture="llama", family="llama3", name=name, size_label=size_label,
        size_class="m", finetune="instruct", parameters=parameters, quantization="F16",
        bits_per_weight=16.0, context_length=8192, file_size=weights, chat_template=True,
        layers=layers, embedding_length=embedding, weights_bytes=weights,
        layer_bytes=(weights - 2 * embeddings) // layers, bytes_per_token=weights - embeddings,
        kv_bytes_per_token=2 * layers * kv_heads * 256,
    )  # fmt: skip


LLAMA_8B = f16_model("llama-3-8b", 8_030_000_000, 32, 4096, 128_256, 8, "8B")
LLAMA_70B = f16_model("llama-3-70b", 70_550_000_000, 80, 8192, 128_256, 8, "70B")

# (model, node preset, target tok/s) → (chosen quantization or None, where it runs)
TABLE = [
    (LLAMA_8B, "cpu", 15, "Q2_K", "CPU"),  # nothing reaches 15 tok/s: the fastest that fits
    (LLAMA_8B, "cpu", 10, "Q3_K_M", "CPU"),
    (LLAMA_8B, "gpu4", 10, "Q5_K_M", "split"),
    (LLAMA_8B, "gpu4-pcie3x4", 10, "Q5_K_M", "split"),
    (LLAMA_8B, "gpu4", 30, "Q2_K", "split"),
    (LLAMA_8B, "gpu8", 10, "Q8_0", "split"),  # quality first while fast enough
    (LLAMA_8B, "gpu8", 30, "Q6_K", "GPU"),  # a higher target keeps it on the GPU
    (LLAMA_8B, "gpu8-pcie3x4", 30, "Q6_K", "GPU"),
    (LLAMA_8B, "gpu24", 10, "F16", "GPU"),
    (LLAMA_8B, "gpu80", 30, "F16", "GPU"),
    (LLAMA_70B, "cpu", 10, None, ""),  # 16 GB of RAM: no variant fits at all
    (LLAMA_70B, "gpu4", 10, None, ""),
    (LLAMA_70B, "gpu24", 10, "Q2_K", "split"),
    (LLAMA_70B, "gpu80", 10, "Q8_0", "split"),
    (LLAMA_70B, "gpu80", 30, "Q6_K", "GPU"),
]


@pytest.mark.parametrize(("model", "node", "target", "quant", "where"), TABLE)
def test_plan_table(
    model: ModelInfo, node: str, target: float, quant: str | None, where: str
) -> None:
    result = plan(
        model.equivalence, variants_for([model]), NodeSpec.parse(node), context=8192,
        target_tps=target,
    )  # fmt: skip
    if quant is None:
        assert result.choice is None
        assert "fits this node" in result.summary
        assert all(c.verdict == "does not fit" for c in result.candidates)
        return
    assert result.choice is not None, result.explain()
    assert result.choice.variant.quantization == quant, result.explain()
    assert result.choice.placement.where.startswith(where)
    assert result.choice.placement.fits
    chosen = result.choice.variant
    for candidate in result.candidates:
        better = candidate.variant.quality > chosen.quality
        if better:  # every higher-quality variant was ruled out, and says why
            assert candidate.verdict in ("does not fit", "too slow")
    if result.choice.meets_target:
        assert result.choice.placement.decode_tps >= target
        assert f"reaches {target:g} tok/s" in result.summary
    else:
        assert "no variant reaches" in result.summary
        fitting = [c.placement.decode_tps for c in result.candidates if c.placement.fits]
        assert result.choice.placement.decode_tps == max(fitting)
    text = result.explain()
    assert f"→ {quant}" in text and node in text


def test_pcie_matters_for_split_models_only() -> None:
    """A slower link slows loading and prompt batches of a split model; the
    decode of a model wholly in VRAM does not cross it."""
    q6 = next(v for v in variants_for([LLAMA_8B]) if v.quantization == "Q6_K")
    q8 = next(v for v in variants_for([LLAMA_8B]) if v.quantization == "Q8_0")
    fast, slow = NodeSpec.parse("gpu8"), NodeSpec.parse("gpu8-pcie3x4")
    full_fast, full_slow = place(q6, fast, 8192), place(q6, slow, 8192)
    assert full_fast.cpu_layers == 0 and full_fast.upload_s_per_batch == 0
    assert full_fast.decode_tps == pytest.approx(full_slow.decode_tps)
    assert full_slow.load_s == pytest.approx(full_fast.load_s * 31.504 / 3.94, rel=1e-3)
    split_fast, split_slow = place(q8, fast, 8192), place(q8, slow, 8192)
    assert split_fast.cpu_layers > 0
    assert split_slow.upload_s_per_batch == pytest.approx(
        split_fast.upload_s_per_batch * 31.504 / 3.94, rel=1e-3
    )
    assert split_slow.decode_tps < split_fast.decode_tps  # the per-token hops, a little


def test_more_vram_never_lowers_the_quality() -> None:
    variants = variants_for([LLAMA_8B])
    previous = -1
    for gigabytes in (2, 4, 6, 8, 12, 16, 24, 48, 80):
        node = NodeSpec.parse(f"vram={gigabytes}GiB,gpu_bw=500,pcie=4.0x16,ram=64GiB,ram_bw=50")
        result = plan("llama3:8b", variants, node, context=4096, target_tps=20)
        assert result.choice is not None
        assert result.choice.variant.quality >= previous
        previous = result.choice.variant.quality


def test_context_length_moves_the_choice() -> None:
    """The KV cache is part of the fit: a long context pushes a model off the GPU."""
    node = NodeSpec.parse("gpu8")
    short = plan("llama3:8b", variants_for([LLAMA_8B]), node, context=2048, target_tps=30)
    long = plan("llama3:8b", variants_for([LLAMA_8B]), node, context=65536, target_tps=30)
    assert short.choice is not None and long.choice is not None
    assert long.choice.variant.quality < short.choice.variant.quality


def test_variants_come_from_files_and_quantize() -> None:
    variants = {v.quantization: v for v in variants_for([LLAMA_8B])}
    assert variants["F16"].source == "file"
    assert {"Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K"} <= set(variants)
    assert variants["Q4_K_M"].source == "quantize" and variants["Q4_K_M"].path is None
    assert variants["Q4_K_M"].weights_bytes == pytest.approx(8.03e9 * 4.85 / 8, rel=0.01)
    # A Q4_K_M file is not requantized into smaller, worse files.
    q4 = attrs.evolve(LLAMA_8B, quantization="Q4_K_M")
    assert [v.quantization for v in variants_for([q4])] == ["Q4_K_M"]
    with pytest.raises(PlanError):
        variants_for([])


def test_node_specs() -> None:
    node = NodeSpec.parse("vram=12GiB,gpus=2,gpu_bw=360,pcie=4.0x8,ram=64GB,ram_bw=55,cpus=16")
    assert [g.name for g in node.gpus] == ["GPU0", "GPU1"]
    assert node.gpus[0].vram_free == 12 * 2**30 and node.gpus[0].pcie_gbps == 15.752
    assert node.ram_free == 64_000_000_000 and node.host_bandwidth_gbps == 55.0
    assert NodeSpec.parse("cpu").cpu_only
    for bad in ("vram", "vram=lots", "pcie=4x16", "colour=blue", "vram=8GiB,pcie=fast"):
        with pytest.raises(PlanError, match="bad node spec"):
            NodeSpec.parse(bad)


def test_two_gpus_split_the_layers() -> None:
    node = NodeSpec.parse("vram=12GiB,gpus=2,gpu_bw=360,pcie=4.0x16,ram=64GiB,ram_bw=50")
    f16 = variants_for([LLAMA_8B])[0]
    placement = place(f16, node, 4096)
    assert placement.cpu_layers == 0 and sum(placement.gpu_layers) == 32
    # Both GPUs carry layers; the first also holds the output head, so fewer.
    assert 0 < placement.gpu_layers[0] <= placement.gpu_layers[1]


def test_gemma_on_this_machine() -> None:
    model = describe_gguf(gemma_path())
    local = plan(model.equivalence, variants_for([model]), NodeSpec.parse("cpu"), context=2048)
    assert local.choice is not None and local.choice.variant.quantization == "Q4_K_M"
    assert local.choice.variant == Variant.from_model(model)
    # What a token multiplies by, per type: the blocks' mix and the tied
    # 262 144 × 640 Q8_0 embedding as the output head; norms aside.
    reads = {r.type: r for r in model.reads}
    assert set(reads) == {"Q4_K", "Q5_0", "Q6_K", "Q8_0"}
    assert reads["Q8_0"].other_elements == 262_144 * 640
    assert sum(r.layer_bytes + r.other_bytes for r in model.reads) == pytest.approx(
        model.bytes_per_token, rel=0.01
    )
    assert model.vocab_size == 262_144 and model.layout and model.layout.startswith("gemma3-")


def test_measured_speeds_decide_and_show_their_error() -> None:
    """A file the node has served is chosen on what it measured: predicted
    fast enough, measured too slow, it gives way to the next variant."""
    variants = variants_for([LLAMA_8B])
    measured = {"llama-3-8b-f16": Measured("llama-3-8b-f16", (2.0, 2.5, 3.0), predicted_tps=40.0)}
    node = NodeSpec.parse("gpu24")
    before = plan("llama3:8b", variants, node, context=8192, target_tps=10)
    assert before.choice is not None and before.choice.variant.quantization == "F16"
    after = plan("llama3:8b", variants, node, context=8192, target_tps=10, measured=measured)
    assert after.choice is not None and after.choice.variant.quantization == "Q8_0"
    f16 = after.candidates[0]
    assert (f16.verdict, f16.tps) == ("too slow", 2.5) and f16.error is not None
    assert f16.error == pytest.approx((f16.placement.decode_tps - 2.5) / 2.5)
    text = after.explain(detail=True)
    assert "2.5 [2–3]" in text and f"{f16.error * 100:+5.0f}%" in text
    assert "measured 3 request(s): median 2.5 tok/s" in text
    data = after.to_json()["candidates"][0]
    assert data["decode_tps"] == 2.5 and data["measured"]["samples"] == [2.0, 2.5, 3.0]
    assert data["predicted_tps"] == round(f16.placement.decode_tps, 2)


def fake_calibration(key: CalibrationKey, layout: str | None) -> Calibration:
    cpu = DeviceRates(
        "cpu", key.threads, token_s=2e-5, layer_s=1e-5,
        matvec_gflops={"Q8_0": 30.0, "Q5_0": 25.0, "Q4_K": 50.0, "Q6_K": 40.0, "F16": 20.0},
        prompt_gflops={"Q8_0": 150.0, "Q5_0": 100.0, "Q4_K": 150.0, "Q6_K": 150.0, "F16": 160.0},
        layouts={} if layout is None else {layout: (1e-4, 5e-5)},
    )  # fmt: skip
    return Calibration(
        "llama-cpp-python 0.3.36", cpu, None, sample_s=1e-6, sample_s_per_vocab=1e-9,
        serve_s=8e-4, measured_at=0.0, seconds=9.0, key=key.to_json(),
    )  # fmt: skip


def qmesh(
    *args: str, data_dir: Path, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qmesh", "--data-dir", str(data_dir), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=None if env is None else {**os.environ, **env},
    )


def test_quant_plan_explains_calibrated_and_measured_figures(tmp_path: Path) -> None:
    """``--explain`` on this machine: the node calibration (here one put in
    the machine's cache, so nothing is timed), the cost per token by cause,
    and what the daemon of the same data directory measured."""
    gguf = gemma_path()
    model = describe_gguf(gguf)
    key = CalibrationKey.local(threads=None, gpus=[])
    if key is None:
        pytest.skip("llama-cpp-python is not installed: no calibration key")
    cache = tmp_path / "machine"
    cache.mkdir()
    (cache / f"{key.digest()}.json").write_text(
        json.dumps(fake_calibration(key, model.layout).to_json())
    )
    book = SpeedBook(tmp_path / "data" / "daemon")
    book.record(model.id, 30.0, predicted_tps=40.0)
    book.record(model.id, 34.0)
    book.save()
    result = qmesh("quant", "plan", str(gguf), "--explain", "--target-tps", "1",
                   data_dir=tmp_path / "data", env={CACHE_ENV: str(cache)})  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "calibrated" in out and "serving 0.80 ms per token" in out, out
    assert "ms/token = weights" in out and "fixed 1.00" in out, out  # the layout's own costs
    assert "measured 2 request(s): median 32.0 tok/s" in out, out
    assert "32.0 [30–34]" in out


def test_quant_plan_cli(tmp_path: Path) -> None:
    gguf = str(gemma_path())
    result = qmesh("quant", "plan", gguf, "--node", "gpu4-pcie3x4", "--context", "8192",
                   data_dir=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "model gemma3:270m, context 8192 tokens, target 10 tok/s" in out
    assert "→ Q4_K_M" in out and "GPU (all 18 layers)" in out and "chose Q4_K_M" in out
    # Local: this machine's telemetry, CPU-only, bandwidth measured and cached.
    # The first local plan on a machine calibrates it (minutes on a busy
    # 2-core runner, bounded by the calibration's own timeout).
    result = qmesh("quant", "plan", gguf, "--json", "--target-tps", "1", data_dir=tmp_path,
                   timeout=TIMEOUT_S + 120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["choice"]["quantization"] == "Q4_K_M"
    assert data["choice"]["where"] == "CPU (all layers in RAM)"
    assert data["choice"]["decode_tps"] > 1
    assert (tmp_path / "daemon" / "membench.json").exists()
    # A node from a telemetry file (what GET /api/inventory returns for a node).
    node_file = tmp_path / "node.json"
    telemetry = {
        "host": {"hostname": "n", "cpus_logical": 8, "cpus_physical": 4, "load_avg": [0, 0, 0],
                 "cpu_percent": 0, "ram_total": 32e9, "ram_available": 30e9,
                 "memory_bandwidth_gbps": 40.0},
        "gpus": [{"index": 0, "name": "RTX", "uuid": None, "vram_total": 8e9, "vram_used": 0,
                  "vram_free": 8e9, "pcie_max_gen": 4, "pcie_max_width": 16,
                  "memory_bandwidth_gbps": 448.0}],
        "nvml": "ok", "driver_version": "550", "taken_at": 0,
    }  # fmt: skip
    node_file.write_text(json.dumps({"name": "gpu-1", "telemetry": telemetry}))
    result = qmesh("quant", "plan", gguf, "--node", f"@{node_file}", data_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "RTX 8.0 GB free, 448 GB/s, PCIe 31.5 GB/s" in result.stdout
    # Mistakes are one line and exit status 2.
    bad = qmesh("quant", "plan", gguf, "--node", "vram=huge", data_dir=tmp_path)
    assert bad.returncode == 2 and "bad node spec" in bad.stderr and "Traceback" not in bad.stderr
    missing = qmesh("quant", "plan", "no-such-model", data_dir=tmp_path)
    assert missing.returncode == 2 and "no model 'no-such-model'" in missing.stderr
