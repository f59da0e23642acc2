"""The planner's cost model and the node calibration behind it.

Deterministic and fast: the fit is checked on timings made from known
figures (a fake runner at the measuring boundary), the cost model on
hand-computed cases, the cache and the measured-speed book on files. One
test times the real llama.cpp on two tiny synthetic models (a few seconds),
the way a daemon calibrates itself."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from daemonkit import require_llama, wait_until

from qmesh.daemon import calibrate, calibration
from qmesh.daemon.calibrate import OVERHEAD_SHAPES, PROMPT_TOKENS, TYPE_SHAPE, gpu_stream_shape
from qmesh.daemon.calibration import (
    Calibration,
    CalibrationKey,
    DeviceRates,
    blend,
    fit,
    load_cached,
    overlap_exponent,
)
from qmesh.daemon.catalog import ModelInfo, TypeRead, describe_gguf
from qmesh.daemon.infer import _end
from qmesh.daemon.quant import NodeSpec, Variant, place
from qmesh.daemon.runtimes.base import Finished
from qmesh.daemon.speed import GPU_EFFICIENCY, Share, decode_time, prompt_time, rate_for
from qmesh.daemon.speedbook import KEEP, Measured, SpeedBook
from qmesh.daemon.synth import Shape, matmul_elements, write_model

# -- the fit, on timings made from known figures ----------------------------------

TRUTH: dict[str, Any] = {
    "token_s": 60e-6, "layer_s": 25e-6, "sample_s": 3e-6, "per_vocab": 1.4e-9, "serve_s": 6e-4,
    "stream_gbps": 12.0, "overlap": 3.0,
    "matvec": {"F16": 20.0, "Q8_0": 28.0, "Q4_K": 40.0, "Q5_0": 14.0},
    "prompt": {"F16": 160.0, "Q8_0": 140.0, "Q4_K": 150.0, "Q5_0": 90.0},
}  # fmt: skip


def fake_timings(truth: dict[str, Any], *, gpu: dict[str, Any] | None = None) -> dict[str, Any]:
    """What :func:`qmesh.daemon.calibrate.measure` would report on a machine
    whose costs are exactly ``truth`` (the fake runner)."""

    def device(t: dict[str, Any]) -> dict[str, Any]:
        f16 = t["matvec"]["F16"] * 1e9
        elements = matmul_elements(TYPE_SHAPE)
        fixed = t["token_s"] + TYPE_SHAPE.layers * t["layer_s"]
        big = gpu_stream_shape()
        big_elements = matmul_elements(big)
        both = calibrate.stream_shape(32 * 1024**2, "Q8_0")
        both_elements = matmul_elements(both)
        both_memory = both_elements * 34 / 32 / (t["stream_gbps"] * 1e9)
        both_arithmetic = 2 * both_elements / (t["matvec"]["Q8_0"] * 1e9)
        return {
            "overlap": {  # arithmetic and memory of about the same time
                "type": "Q8_0",
                "elements": both_elements,
                "bytes": both_elements * 34 // 32,
                "layers": both.layers,
                "decode_s": t["token_s"]
                + both.layers * t["layer_s"]
                + blend(both_memory, both_arithmetic, t["overlap"]),
            },
            "stream": {  # memory-bound: what a streaming model does
                "type": "F16",
                "elements": big_elements,
                "bytes": big_elements * 2,
                "layers": big.layers,
                "decode_s": t["token_s"]
                + big.layers * t["layer_s"]
                + big_elements * 2 / (t["stream_gbps"] * 1e9),
            },
            "threads": 2,
            "threads_batch": 2,
            "overhead": {
                "layers": [s.layers for s in OVERHEAD_SHAPES],
                "seconds": [
                    t["token_s"] + s.layers * t["layer_s"] + 2 * matmul_elements(s) / f16
                    for s in OVERHEAD_SHAPES
                ],
                "matmul_elements": [matmul_elements(s) for s in OVERHEAD_SHAPES],
            },
            "types": {
                name: {
                    "elements": elements,
                    "bytes": elements,
                    "layers": TYPE_SHAPE.layers,
                    "decode_s": fixed + 2 * elements / (rate * 1e9),
                    "prompt_tokens": PROMPT_TOKENS,
                    "prompt_s": fixed + 2 * elements * PROMPT_TOKENS / (t["prompt"][name] * 1e9),
                }
                for name, rate in t["matvec"].items()
            },
        }

    layouts = {}
    if "layout" in truth:  # a probed block layout: (token_s, layer_s) of its own
        token_s, layer_s = truth["layout"]
        q8 = truth["matvec"]["Q8_0"] * 1e9
        layouts["gemma3-abc"] = {
            "layers": [1, 4],
            "seconds": [token_s + n * (layer_s + 2 * 5e6 / q8) + 2 * 3e5 / q8 for n in (1, 4)],
            "layer_elements": {"Q8_0": 5_000_000},
            "head_elements": {"Q8_0": 300_000},
        }
    sample = [truth["sample_s"] + v * truth["per_vocab"] for v in (512, 65536)]
    engine = device(truth)["overhead"]["seconds"][0] + sample[0]
    cpu = {**device(truth), "layouts": layouts}
    return {
        "runtime": "llama-cpp-python 9.9.9",
        "devices": {"cpu": cpu, **({"gpu": device(gpu)} if gpu else {})},
        "sample": {"vocab": [512, 65536], "seconds": sample},
        "serve": {"token_s": engine + truth["serve_s"], "engine_s": engine},
        "measured_at": 1.0,
        "seconds": 4.2,
        "key": {"host": "h"},
    }


def test_the_fit_recovers_the_figures_the_timings_were_made_from() -> None:
    result = fit(fake_timings(TRUTH))
    cpu = result.cpu
    assert cpu.kind == "cpu" and cpu.threads == 2 and result.gpu is None
    assert cpu.token_s == pytest.approx(TRUTH["token_s"], rel=1e-3)
    assert cpu.layer_s == pytest.approx(TRUTH["layer_s"], rel=1e-3)
    for name, rate in TRUTH["matvec"].items():
        assert cpu.matvec_gflops[name] == pytest.approx(rate, rel=1e-3), name
        assert cpu.prompt_gflops[name] == pytest.approx(TRUTH["prompt"][name], rel=1e-3), name
    assert result.sample_s == pytest.approx(TRUTH["sample_s"], rel=1e-6)
    assert result.sample_s_per_vocab == pytest.approx(TRUTH["per_vocab"], rel=1e-6)
    assert result.serve_s == pytest.approx(TRUTH["serve_s"], rel=1e-6)
    # llama.cpp's own reading of a model beyond the caches, not membench's scan,
    # bounds the CPU's tokens; at another thread count membench's figure stands.
    assert cpu.stream_gbps == pytest.approx(TRUTH["stream_gbps"], rel=1e-3)
    assert cpu.scaled(1, 2).stream_gbps is None and cpu.scaled(2, 2) is cpu
    assert cpu.overlap == pytest.approx(TRUTH["overlap"], rel=1e-3)
    assert result.notes == ()
    again = Calibration.from_json(json.loads(json.dumps(result.to_json())))
    assert again.cpu.matvec_gflops == pytest.approx(result.cpu.matvec_gflops, rel=1e-3)
    assert (again.serve_s, again.key) == (result.serve_s, {"host": "h"})


def test_the_overlap_of_arithmetic_and_memory_between_adding_up_and_the_slower() -> None:
    """The blend runs from the sum (p = 1) to the slower alone; the fit
    inverts it, and says None where a token took no longer than the slower."""
    assert blend(3.0, 4.0, 1.0) == pytest.approx(7.0)
    assert blend(3.0, 4.0, 2.0) == pytest.approx(5.0)
    assert blend(3.0, 4.0, None) == 4.0 and blend(0.0, 4.0, 3.0) == 4.0
    for seconds in (4.3, 4.64, 5.0, 6.9):
        p = overlap_exponent(3.0, 4.0, seconds)
        assert p is not None and blend(3.0, 4.0, p) == pytest.approx(seconds, rel=1e-6)
    assert overlap_exponent(3.0, 4.0, 7.5) == 1.0  # slower than the sum: they add up
    assert overlap_exponent(3.0, 4.0, 4.01) is None  # the slower alone
    assert overlap_exponent(3.0, 4.0, 3.5) is None  # faster than it could be: noise
    assert overlap_exponent(0.0, 4.0, 5.0) is None


def test_a_gpu_whose_fixed_costs_swamp_the_matrices_gets_no_rates() -> None:
    """A small model on a GPU is launch-bound: the matrix time cannot be
    told from the noise, so those types are bounded by bandwidth alone —
    the bandwidth the big streaming model measured."""
    gpu = {**TRUTH, "token_s": 3e-3, "layer_s": 0.2e-3, "stream_gbps": 3000.0,
           "matvec": {k: 20_000.0 for k in TRUTH["matvec"]}}  # fmt: skip
    result = fit(fake_timings(TRUTH, gpu=gpu))
    assert result.gpu is not None and result.gpu.matvec_gflops == {}
    assert result.gpu.stream_gbps == pytest.approx(3000.0, rel=1e-3)
    assert result.gpu.token_s == pytest.approx(3e-3, rel=0.01)
    assert result.gpu.layer_s == pytest.approx(0.2e-3, rel=0.01)
    assert any("gpu: the fixed costs swamp" in note for note in result.notes)


def test_a_probed_block_layout_gets_fixed_costs_of_its_own() -> None:
    """Gemma 3's block costs llama.cpp more than a Llama block with the
    same matrices: the probe of its layout (a clone of a few blocks) says
    how much, once the matrices' own time is taken out."""
    result = fit(fake_timings({**TRUTH, "layout": (0.4e-3, 0.3e-3)}))
    token_s, layer_s = result.cpu.layouts["gemma3-abc"]
    assert token_s == pytest.approx(0.4e-3, rel=1e-3)
    assert layer_s == pytest.approx(0.3e-3, rel=1e-3)
    assert result.covers({"gemma3-abc"}) and not result.covers({"gemma3-abc", "qwen2-def"})
    reads = (TypeRead("Q8_0", 1_000_000, 1_062_500),)
    share = Share("cpu", 10, True, 20.0, result.cpu)
    probed = decode_time(reads, [share], layers=10, kv_bytes_per_token=0, vocab=0,
                         calibration=result, layout="gemma3-abc")  # fmt: skip
    generic = decode_time(reads, [share], layers=10, kv_bytes_per_token=0, vocab=0,
                          calibration=result, layout="llama-unprobed")  # fmt: skip
    assert probed.fixed == pytest.approx(0.4e-3 + 10 * 0.3e-3)
    assert generic.fixed == pytest.approx(result.cpu.token_s + 10 * result.cpu.layer_s)


def test_without_the_serving_path_the_fit_says_so() -> None:
    raw = fake_timings(TRUTH)
    del raw["serve"]
    result = fit(raw)
    assert result.serve_s == 0 and "serving path was not measured" in result.notes[0]


# -- the cost model ---------------------------------------------------------------


def rates(**matvec: float) -> DeviceRates:
    return DeviceRates("cpu", 1, token_s=1e-4, layer_s=1e-5, matvec_gflops=matvec,
                       prompt_gflops={k: v * 5 for k, v in matvec.items()})  # fmt: skip


def cal(cpu: DeviceRates, gpu: DeviceRates | None = None) -> Calibration:
    return Calibration(
        "llama-cpp-python 9.9.9", cpu, gpu, sample_s=2e-5, sample_s_per_vocab=1e-9,
        serve_s=5e-4, measured_at=0.0, seconds=1.0,
    )  # fmt: skip


READS = (TypeRead("Q8_0", 100_000_000, 106_250_000, 0, 0),
         TypeRead("Q4_K", 0, 0, 50_000_000, 28_125_000))  # fmt: skip


def test_each_type_costs_the_slower_of_its_arithmetic_and_its_bytes() -> None:
    calibrated = cal(rates(Q8_0=20.0, Q4_K=50.0))
    share = Share("cpu", 10, True, bandwidth_gbps=20.0, rates=calibrated.cpu)
    got = decode_time(READS, [share], layers=10, kv_bytes_per_token=1000, vocab=100_000,
                      calibration=calibrated, position=100)  # fmt: skip
    q8 = max(2 * 100e6 / 20e9, 106.25e6 / 20e9)  # arithmetic: 10 ms > 5.3 ms of reading
    q4 = max(2 * 50e6 / 50e9, 28.125e6 / 20e9)  # 2 ms of arithmetic > 1.4 ms of reading
    assert got.weights == pytest.approx(q8 + q4)
    assert got.arithmetic == pytest.approx(q8 + q4)
    assert got.fixed == pytest.approx(1e-4 + 10 * 1e-5)
    assert got.sampling == pytest.approx(2e-5 + 100_000 * 1e-9)  # grows with the vocabulary
    assert got.serving == pytest.approx(5e-4)
    # 1,000 positions × 100 KV bytes each, read at 20 GB/s: 5 µs.
    assert got.attention == pytest.approx(5e-6)
    assert got.total == pytest.approx(q8 + q4 + 2e-4 + 1.2e-4 + 5e-4 + 5e-6)
    # Slow memory makes Q8_0 memory-bound instead.
    slow = attrs.evolve(share, bandwidth_gbps=5.0)
    got = decode_time(READS, [slow], layers=10, kv_bytes_per_token=0, vocab=0,
                      calibration=calibrated)  # fmt: skip
    assert got.weights == pytest.approx(106.25e6 / 5e9 + 28.125e6 / 5e9)
    assert got.arithmetic == 0
    assert "ms/token = weights" in got.describe()


def test_uncalibrated_is_the_memory_bound_ceiling() -> None:
    share = Share("cpu", 10, True, bandwidth_gbps=20.0, rates=None)
    got = decode_time(READS, [share], layers=10, kv_bytes_per_token=0, vocab=262_144,
                      calibration=None)  # fmt: skip
    assert got.total == pytest.approx((106.25e6 + 28.125e6) / 20e9)
    assert prompt_time(READS, [share], layers=10, tokens=512) is None


def test_prompt_batches_run_the_output_head_once() -> None:
    cpu = rates(Q8_0=20.0, Q4_K=50.0)
    share = Share("cpu", 10, True, 20.0, cpu)
    seconds = prompt_time(READS, [share], layers=10, tokens=512)
    assert seconds == pytest.approx(2 * 100e6 * 512 / 100e9 + 2 * 50e6 / 50e9)


def test_an_unmeasured_type_is_priced_at_its_nearest_measured_kin() -> None:
    measured = {"F16": 16.0, "Q8_0": 20.0, "Q4_K": 40.0, "Q6_K": 30.0, "Q4_0": 45.0}
    assert rate_for(measured, "Q4_K") == 40.0
    assert rate_for(measured, "Q5_K") == 40.0  # a k-quant, 5.5 bits: Q4_K (4.5) before Q6_K
    assert rate_for(measured, "Q5_1") == 45.0  # legacy family: Q4_0 is the closer in bits
    assert rate_for(measured, "BF16") == 16.0
    assert rate_for({}, "Q4_K") is None


def test_more_threads_scale_the_cpu_rates_up_to_the_cores() -> None:
    one = rates(Q8_0=20.0)
    assert one.scaled(2, cores=8).matvec_gflops["Q8_0"] == pytest.approx(40.0)
    assert one.scaled(16, cores=4).matvec_gflops["Q8_0"] == pytest.approx(80.0)
    assert one.scaled(None, cores=4) is one


def model(reads: tuple[TypeRead, ...], **extra: Any) -> ModelInfo:
    body = sum(r.layer_bytes for r in reads)
    head = sum(r.other_bytes for r in reads)
    return ModelInfo(
        id="m-q8_0", path="/models/m-q8_0.gguf", runtime="llama.cpp", architecture="llama",
        family="m", name="m", size_label="150M", size_class="xs", finetune=None,
        parameters=150_000_000, quantization="Q8_0", bits_per_weight=8.5, context_length=4096,
        file_size=body + head, chat_template=False, layers=10, embedding_length=1024,
        weights_bytes=body + head, layer_bytes=body // 10, bytes_per_token=body + head,
        kv_bytes_per_token=2048, vocab_size=32000, reads=reads, **extra,
    )  # fmt: skip


def test_place_prices_a_model_with_the_node_calibration() -> None:
    calibrated = cal(rates(Q8_0=20.0, Q4_K=50.0))
    node = NodeSpec.parse("cpu", name="n")
    node = attrs.evolve(node, calibration=calibrated, threads=1, host_bandwidth_gbps=20.0)
    variant = Variant.from_model(model(READS))
    placement = place(variant, node, 4096, position=128)
    expected = decode_time(
        READS, [Share("cpu", 10, True, 20.0, calibrated.cpu)], layers=10,
        kv_bytes_per_token=2048, vocab=32000, calibration=calibrated, position=128,
    )  # fmt: skip
    assert placement.calibrated and placement.decode_tps == pytest.approx(1 / expected.total)
    assert placement.prompt_tps is not None and placement.prompt_tps > placement.decode_tps
    # Where membench's scan is slower than llama.cpp's own reading, the reading
    # the calibration measured bounds the tokens, at the calibrated threads.
    slow_scan = attrs.evolve(node, host_bandwidth_gbps=5.0)
    assert place(variant, slow_scan, 4096, position=128).decode_tps < placement.decode_tps
    read = attrs.evolve(slow_scan, calibration=cal(attrs.evolve(calibrated.cpu, stream_gbps=20.0)))
    assert place(variant, read, 4096, position=128).decode_tps == pytest.approx(
        placement.decode_tps
    )
    # Arithmetic and reading that do not hide each other whole add up (p = 1).
    adding = cal(attrs.evolve(calibrated.cpu, overlap=1.0))
    slower = place(variant, attrs.evolve(node, calibration=adding), 4096, position=128)
    q8_memory, q8_arithmetic = 106.25e6 / 20e9, 2 * 100e6 / 20e9
    assert 1 / slower.decode_tps - 1 / placement.decode_tps == pytest.approx(
        min(q8_memory, q8_arithmetic) + 28.125e6 / 20e9 + 2048 * 128 / 20e9, rel=1e-6
    )  # the Q8_0 and Q4_K matrices' faster terms, and the KV cache's
    # The same model on a GPU node: the GPU's fixed costs, its bandwidth × efficiency.
    gpu_rates = DeviceRates("gpu", 1, token_s=2e-3, layer_s=5e-5)
    gpu_node = attrs.evolve(NodeSpec.parse("gpu8"), calibration=cal(calibrated.cpu, gpu_rates))
    on_gpu = place(variant, gpu_node, 4096, position=128)
    assert on_gpu.cpu_layers == 0
    memory = (106.25e6 + 28.125e6 + 2048 * 128) / (448 * GPU_EFFICIENCY * 1e9)
    fixed = 2e-3 + 10 * 5e-5
    assert 1 / on_gpu.decode_tps == pytest.approx(memory + fixed + 2e-5 + 32000e-9 + 5e-4)
    # ... or the bandwidth its streaming model measured, when it has one.
    measured = attrs.evolve(gpu_rates, stream_gbps=200.0)
    gpu_node = attrs.evolve(gpu_node, calibration=cal(calibrated.cpu, measured))
    on_gpu = place(variant, gpu_node, 4096, position=128)
    memory = (106.25e6 + 28.125e6 + 2048 * 128) / 200e9
    assert 1 / on_gpu.decode_tps == pytest.approx(memory + fixed + 2e-5 + 32000e-9 + 5e-4)
    # Without a calibration: the ceiling, flagged.
    assert not place(variant, attrs.evolve(node, calibration=None), 4096).calibrated


def test_a_variant_without_type_reads_is_priced_in_its_main_type() -> None:
    variant = Variant.from_model(model(READS))
    bare = attrs.evolve(variant, reads=(), quantization="Q4_K_M")
    (read,) = bare.type_reads()
    assert read.type == "Q4_K" and read.layer_bytes + read.other_bytes == variant.bytes_per_token
    made = variant.quantized("Q4_K_M", 150_000_000)
    (read,) = made.reads
    assert read.type == "Q4_K" and read.layer_elements == 100_000_000


# -- the cache ---------------------------------------------------------------------


def key(**changes: Any) -> CalibrationKey:
    base = CalibrationKey(host="h", cpus=2, ram_total=8, runtime="llama-cpp-python 9.9.9",
                          threads=1, threads_batch=2)  # fmt: skip
    return attrs.evolve(base, **changes)


def test_a_calibration_is_cached_per_node_runtime_and_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    machine = tmp_path / "machine"
    monkeypatch.setenv(calibration.CACHE_ENV, str(machine))
    data = tmp_path / "data"
    assert load_cached(data, key()) is None
    made = attrs.evolve(fit(fake_timings(TRUTH)), key=key().to_json())
    machine.mkdir()
    (machine / f"{key().digest()}.json").write_text(json.dumps(made.to_json()))
    found = load_cached(data, key())
    assert found is not None and found.cached and found.serve_s == pytest.approx(made.serve_s)
    assert (data / "calibration.json").is_file()  # the node keeps its own copy
    (machine / f"{key().digest()}.json").unlink()
    assert load_cached(data, key()) is not None
    # Another runtime version, thread count or GPU: measured again.
    for other in (key(runtime="llama-cpp-python 9.9.10"), key(threads=2), key(gpus=("H200",))):
        assert load_cached(data, other) is None
    # So is a node whose models have a block layout the calibration did not probe.
    assert load_cached(data, key(), {"gemma3-new"}) is None
    (data / "calibration.json").write_text("{not json")
    assert load_cached(data, key()) is None


def test_the_measuring_subprocess_answers_from_the_machine_cache(tmp_path: Path) -> None:
    """``python -m qmesh.daemon.calibrate`` takes the machine's lock and
    finds what another daemon measured (no llama.cpp needed)."""
    made = attrs.evolve(fit(fake_timings(TRUTH)), key=key().to_json())
    (tmp_path / f"{key().digest()}.json").write_text(json.dumps(made.to_json()))
    out = tmp_path / "out.json"
    argv = ["--out", str(out), "--threads", "1", "--threads-batch", "2", "--cache",
            str(tmp_path), "--key", json.dumps(key().to_json())]  # fmt: skip
    assert calibrate.main(argv) == 0
    answer = json.loads(out.read_text())
    assert answer["cached"] is True and answer["key"] == key().to_json()


def test_synthetic_quantized_blocks_have_scales_as_spread_as_real_ones(tmp_path: Path) -> None:
    """The fp16 scales of a synthetic Q8_0 tensor span octaves and table lines
    as a real model's do (Gemma 3 270M: five octaves, 220-380 lines of 64
    bytes in the 256 KiB conversion table). Weights of one normal scale span
    under two octaves and about 80 lines, which llama.cpp keeps in L1 and
    so ran a real layout 25 % fast."""
    require_llama()
    import gguf
    import numpy as np

    path = write_model(tmp_path / "q8.gguf", Shape(1, 640, 2048, 4, 1, 512), weight_type="Q8_0")
    (tensor,) = [t for t in gguf.GGUFReader(path).tensors if t.name == "blk.0.ffn_up.weight"]
    blocks = np.asarray(tensor.data).view(np.uint8).reshape(-1, 34)
    scales = blocks[:, :2].copy().view(np.uint16).ravel()
    octaves = np.log2(scales.view(np.float16).astype(np.float64))
    assert octaves.max() - octaves.min() >= 4.0
    assert len(np.unique(scales >> 4)) >= 150  # 16 four-byte entries to a line


def test_the_real_runtime_on_two_synthetic_models(tmp_path: Path) -> None:
    """A reduced calibration with the real llama.cpp: two types, one round,
    no model server, and the probe of a model file's block layout — a clone
    of its first block written from its header (a few seconds)."""
    require_llama()
    keep = calibrate._quiet_llama()
    other = write_model(tmp_path / "other.gguf", Shape(3, 256, 768, 4, 2, 600), weight_type="F16")
    work = tmp_path / "work"
    work.mkdir()
    raw = calibrate.measure(work, threads=1, threads_batch=1, types=("Q8_0", "Q4_0"),
                            rounds=1, serve=False, stream=False, layouts=[other])  # fmt: skip
    del keep
    result = fit(raw)
    assert set(result.cpu.matvec_gflops) == {"Q8_0", "Q4_0"}
    assert all(0.5 < v < 10_000 for v in result.cpu.matvec_gflops.values())
    assert all(v > 0 for v in result.cpu.prompt_gflops.values())
    assert result.sample_s_per_vocab > 0 and result.runtime.startswith("llama-cpp-python")
    layout = describe_gguf(other).layout
    assert layout is not None and result.covers({layout})
    assert not list(work.glob("serve"))


# -- what the node measured ----------------------------------------------------------


def test_the_speed_book_keeps_recent_measurements_and_says_when_they_move(
    tmp_path: Path,
) -> None:
    book = SpeedBook(tmp_path)
    assert book.record("m", 30.0, predicted_tps=36.0, quantization="Q8_0", now=1.0)  # first
    assert not book.record("m", 30.5, now=2.0)  # the median barely moved
    assert not book.record("m", 40.0, now=3.0)  # one fast request: the median is 30.5
    assert book.record("m", 41.0, now=4.0)  # now it moved by more than 5 %
    assert not book.record("m", 0.0)  # nothing measured
    measured = book.get("m")
    assert measured is not None and measured.median == 35.25 and measured.spread == (30.0, 41.0)
    assert measured.predicted_tps == 36.0 and measured.error == pytest.approx(0.75 / 35.25)
    for i in range(KEEP + 5):
        book.record("m", 20.0 + i)
    assert len(book.models["m"].samples) == KEEP
    book.save()
    again = SpeedBook.load(tmp_path)
    assert again.get("m") == book.get("m")
    again.forget(["other"])
    assert again.get("m") is None and again.dirty
    (tmp_path / "speeds.json").write_text("[1, 2")
    assert SpeedBook.load(tmp_path).models == {}
    assert Measured.from_json({"model": "x", "samples": [1, 2, 3]}).median == 2


def test_a_stream_that_coalesced_its_tokens_gives_no_per_token_speed() -> None:
    """Deltas that each carry one token time the decode; a runtime that sent
    many tokens per piece (the first piece late) must not produce a rate
    from the gap between its last two pieces."""
    finished = Finished("length", prompt_tokens=5, completion_tokens=101)
    streamed = _end(finished, 0.0, 0.0, 0.1, 100, 2.1)["timings"]
    assert streamed["per_token"] is True and streamed["decode_tps"] == pytest.approx(50.0)
    coalesced = _end(finished, 0.0, 0.0, 1.99, 3, 2.0)["timings"]
    assert coalesced["per_token"] is False
    assert coalesced["decode_tps"] == pytest.approx(101 / 2.0)  # never 10 000 tok/s


async def start_calibrator(temp: Path, *options: str) -> trio.Process:
    """The measuring subprocess, its temporary directory ``temp``."""
    require_llama()
    return await trio.lowlevel.open_process(
        [sys.executable, "-m", "qmesh.daemon.calibrate", "--out", str(temp / "out.json"),
         "--threads", "1", "--threads-batch", "1", *options],
        env={**os.environ, "TMPDIR": str(temp)}, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip


def scratch_in(temp: Path) -> list[str]:
    return sorted(p.name for p in temp.iterdir() if p.name.startswith(calibrate.SCRATCH_PREFIX))


async def test_a_calibration_past_its_timeout_leaves_no_models_behind(tmp_path: Path) -> None:
    # Its synthetic models take gigabytes: calibrations that daemons gave
    # up on used to leave them in /tmp, and dozens filled a disk.
    process = await start_calibrator(tmp_path, "--timeout", "1")
    with trio.fail_after(120):
        assert await process.wait() == calibrate.TIMED_OUT
    assert scratch_in(tmp_path) == []


@pytest.mark.parametrize("timeout", ["0", "-5", "nan"])
def test_a_timeout_that_is_no_time_is_refused(
    timeout: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Once ``--timeout 0`` meant none; taken as a time, it would end the
    # calibration at once.
    argv = ["--out", str(tmp_path / "out.json"), "--threads", "1", "--threads-batch", "1",
            "--timeout", timeout]  # fmt: skip
    with pytest.raises(SystemExit) as exited:
        calibrate.main(argv)
    assert exited.value.code == 2
    assert f"a timeout is a positive number of seconds, not {timeout}" in capsys.readouterr().err


async def test_a_calibration_ended_by_sigterm_leaves_no_models_behind(tmp_path: Path) -> None:
    # And what one killed outright (SIGKILL) left, the next one removes: a
    # scratch directory of a pid past Linux's largest.
    dead = tmp_path / f"{calibrate.SCRATCH_PREFIX}999999999-abc"
    dead.mkdir()
    (dead / "stream-cpu.gguf").write_bytes(b"GGUF")
    process = await start_calibrator(tmp_path)
    own = f"{calibrate.SCRATCH_PREFIX}{process.pid}-"

    def writing_models() -> bool:
        assert process.poll() is None
        names = scratch_in(tmp_path)  # the dead one's is swept first
        return (
            len(names) == 1
            and names[0].startswith(own)
            and any((tmp_path / names[0]).glob("*.gguf"))
        )

    await wait_until(writing_models, seconds=120)
    process.terminate()
    with trio.fail_after(120):
        assert await process.wait() == 128 + signal.SIGTERM
    assert scratch_in(tmp_path) == []
