"""The planner's predicted decode speed against what llama.cpp does, per quantization;
and inference through qmesh (client → Gate → daemon → llama.cpp) vs llama-cpp-python direct.

Usage (from the repository root, after scripts/setup.sh; on a shared
machine under the benchmark lock)::

    flock /tmp/qmesh-bench.lock .venv/bin/python bench/inference.py
    ... bench/inference.py --rounds 7 --tokens 64 --quants Q8_0,Q4_0,Q5_K_M,F16
    ... bench/inference.py --model PATH.gguf --threads 2

Steps:

1. Quantizations. Besides the test model (Gemma 3 270M Q4_K_M), the
   variants of ``--quants`` are made from it with llama.cpp's own quantize
   (``llama_cpp.llama_model_quantize``, requantizing: fine for speed, not
   for quality) into ``--quant-dir`` (default ``~/.cache/qmesh/bench-quants``;
   made once, never committed).
2. A fresh node calibration (``qmesh.daemon.calibration``, synthetic
   models only — none of these files) and a fresh bandwidth measurement;
   again before each round (``--no-calibrate-each-round`` for once): on a
   shared machine the speed drifts by a third over minutes, so a prediction
   from one moment is graded against measurements of another. A calibration
   never sees these files run: the predictions stay made without them.
3. The planner's prediction for every variant, made before any of them has
   run: decode tok/s as the daemon serves it, and the cost per token by
   cause.
4. A Gate and a daemon as separate ``qmesh --role`` processes (throwaway
   data directory) serving all the variants through the daemon's llama.cpp
   model servers; the daemon's inventory is read before any request (its
   ``predicted_tps`` is the same prediction, made by the daemon).
5. Interleaved paired rounds: each round runs every variant (the order
   rotating) on both sides, qmesh (``POST /api/daemons/NODE/v1/completions``,
   streamed) and direct (``llama_cpp.Llama.create_completion(stream=True)``
   in this process with the same file, context, threads, prompt and greedy
   sampling; ``repeat_penalty`` 1.0 on both sides), each round a prompt of
   its own. Decode tok/s = tokens after the first ÷ time after the first.
6. Per variant: predicted (median [min–max] over the calibrations),
   measured median [min–max] on each side, and the
   prediction's error ((predicted − measured) ÷ measured; target |error| ≤
   25 %), then qmesh ÷ direct, and the daemon's inventory after the runs
   (what it measured, and the error it reports).

These figures are noisy on a shared machine (±15 % run to run): read the
medians and the spread, never one run. Nothing is asserted; this is not a
test, and not for CI.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DEFAULT_MODEL = Path.home() / ".cache" / "qmesh" / "models" / "gemma-3-270m-q4_k_m.gguf"
DEFAULT_QUANT_DIR = Path.home() / ".cache" / "qmesh" / "bench-quants"
TARGET_ERROR = 0.25
TARGET_RATIO = 0.95
FTYPES = {"F16": 1, "Q8_0": 7, "Q6_K": 18, "Q5_K_M": 17, "Q4_K_M": 15, "Q4_0": 2, "Q3_K_M": 12,
          "Q2_K": 10}  # fmt: skip
PROMPTS = [
    "The history of the city of Paris begins",
    "A recipe for bread needs flour, water and",
    "In the year 1905, Albert Einstein published",
    "The three largest oceans on Earth are",
    "To repair a bicycle tyre, first remove",
    "Photosynthesis is the process by which",
    "The rules of chess say that a knight",
    "Volcanoes form where tectonic plates",
    "A good night's sleep helps the brain",
    "The Roman Empire's roads connected",
    "Honey bees communicate with one another by",
]

Figures = tuple[float, float, int, str]
"""(TTFT s, decode tok/s, tokens, text) of one streamed completion."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def make_quantizations(model: Path, quants: list[str], directory: Path) -> dict[str, Path]:
    """The test model requantized to each of ``quants`` (made once, then reused)."""
    import llama_cpp

    directory.mkdir(parents=True, exist_ok=True)
    stem = model.name.removesuffix(".gguf").rsplit("-", 1)[0]  # gemma-3-270m
    made: dict[str, Path] = {}
    for quant in quants:
        out = directory / f"{stem}-{quant.lower()}.gguf"
        if not out.is_file():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = FTYPES[quant]
            params.allow_requantize = True  # from Q4_K_M: speed, not quality, is measured
            params.nthread = os.cpu_count() or 1
            tmp = out.with_suffix(".tmp")
            started = time.perf_counter()
            code = llama_cpp.llama_model_quantize(str(model).encode(), str(tmp).encode(), params)
            if code != 0:
                raise SystemExit(f"bench: quantizing to {quant} failed ({code})")
            tmp.replace(out)
            print(f"made {out} ({out.stat().st_size / 1e6:.0f} MB) in "
                  f"{time.perf_counter() - started:.1f}s")  # fmt: skip
        made[quant] = out
    return made


def fresh_predictions(
    files: dict[str, Path], threads: int, context: int, data_dir: Path
) -> tuple[dict[str, Any], str]:
    """A fresh calibration and bandwidth, then the planner's figures per
    variant: {quant: placement}, and a description of the calibration."""
    import attrs

    from qmesh.daemon.calibration import CalibrationKey, obtain
    from qmesh.daemon.catalog import describe_gguf
    from qmesh.daemon.membench import cached_bandwidth
    from qmesh.daemon.quant import NodeSpec, Variant, place
    from qmesh.daemon.telemetry import TelemetryReader

    key = CalibrationKey.local(threads=threads, threads_batch=threads)
    if key is None:
        raise SystemExit("bench: llama-cpp-python is not installed")
    started = time.perf_counter()
    # The files' block layouts are probed from their headers (synthetic
    # clones of a few blocks); none of the files is loaded or run.
    calibration = obtain(data_dir, key, models=list(files.values()), remeasure=True)
    if calibration is None:
        raise SystemExit("bench: the node calibration failed (see the log above)")
    took = time.perf_counter() - started
    bandwidth = cached_bandwidth(data_dir, remeasure=True)
    reader = TelemetryReader(host_bandwidth_gbps=bandwidth.gbps)
    reader.start()
    node = NodeSpec.from_telemetry(reader.read(), calibration=calibration, threads=threads)
    reader.close()
    node = attrs.evolve(node, host_bandwidth_gbps=bandwidth.at_threads(threads))
    placements = {
        quant: place(Variant.from_model(describe_gguf(path)), node, context)
        for quant, path in files.items()
    }
    text = (
        f"{calibration.describe()}\n  (calibration {took:.1f}s wall; read bandwidth "
        f"{bandwidth.at_threads(threads):.1f} GB/s at {threads} thread(s))"
    )
    return placements, text


class Mesh:
    """A Gate and one daemon as processes, in a temporary directory."""

    def __init__(self, models: list[Path], threads: int, context: int) -> None:
        from qmesh.identity import GateKeys, enroll, write_private_file
        from qmesh.masterkey import ensure_master_key
        from qmesh.state import StateStore

        self.tmp = Path(tempfile.mkdtemp(prefix="qmesh-bench-inference-"))
        gate_dir = self.tmp / "gate"
        keys = GateKeys.create(gate_dir)
        ensure_master_key(gate_dir, env={})
        self.tunnel, self.http = free_port(), free_port()
        with StateStore.open(gate_dir / "state.db") as store:
            self.bearer = f"admin:{store.add_app('admin')}"
            credential = enroll(store, keys, "daemon", "bench-node", f"127.0.0.1:{self.tunnel}")
        cred_file = self.tmp / "node.cred"
        write_private_file(cred_file, (credential.encode() + "\n").encode())
        directory = self.tmp / "models"
        directory.mkdir()
        for model in models:
            os.symlink(model, directory / model.name)
        self.node_dir = self.tmp / "node"
        (self.tmp / "gate.toml").write_text(
            f'data_dir = "{gate_dir}"\n[gate]\ntunnel_listen = "127.0.0.1:{self.tunnel}"\n'
            f'http_listen = "127.0.0.1:{self.http}"\n'
        )
        (self.tmp / "daemon.toml").write_text(
            f'data_dir = "{self.node_dir}"\n[daemon]\ngate = "127.0.0.1:{self.tunnel}"\n'
            f'credential_file = "{cred_file}"\nhealth_listen = "127.0.0.1:0"\n'
            f'model_dirs = ["{directory}"]\ncontext_length = {context}\nthreads = {threads}\n'
            "heartbeat_interval_s = 2.0\n"
        )
        self.processes: list[subprocess.Popen[bytes]] = []
        for role in ("gate", "daemon"):
            log = (self.tmp / f"{role}.log").open("wb")
            command = [sys.executable, "-m", "qmesh", "--role", role, "--config",
                       str(self.tmp / f"{role}.toml")]  # fmt: skip
            self.processes.append(
                subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
            )
            if role == "gate":
                self._wait(lambda: self._get("/healthz"), "the gate", 60)
        self._wait(self._calibrated, "the daemon, calibrated, in the inventory", 120)

    def _get(self, path: str) -> Any:
        url = f"http://127.0.0.1:{self.http}{path}"
        request = urllib.request.Request(url, headers={"authorization": f"Bearer {self.bearer}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)

    def _calibrated(self) -> bool:
        models = self.models()
        return bool(models) and all(m["metadata"].get("calibrated") for m in models.values())

    def _wait(self, check: Any, what: str, seconds: float) -> None:
        end = time.monotonic() + seconds
        while True:
            try:
                if check():
                    return
            except (OSError, IndexError, KeyError):
                pass
            if time.monotonic() > end:
                raise SystemExit(f"bench: {what} did not come up; logs in {self.tmp}")
            time.sleep(0.1)

    def models(self) -> dict[str, dict[str, Any]]:
        """The node's models as the Gate's inventory has them (what the
        daemon said about each is under ``metadata``)."""
        nodes = self._get("/api/inventory?state=fresh")["nodes"]
        return {m["id"]: m for m in nodes[0]["models"]}

    def stream(self, model: str, prompt: str, tokens: int) -> Figures:
        body = json.dumps(
            {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0,
             "repeat_penalty": 1.0, "stream": True}
        ).encode()  # fmt: skip
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http}/api/daemons/bench-node/v1/completions",
            data=body,
            headers={"authorization": f"Bearer {self.bearer}", "content-type": "application/json"},
        )
        start = time.perf_counter()
        stamps: list[float] = []
        text: list[str] = []
        with urllib.request.urlopen(request, timeout=300) as response:
            for raw in response:
                line = raw.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                event = json.loads(line[6:])
                piece = event["choices"][0]["text"] if "choices" in event else ""
                if piece:
                    stamps.append(time.perf_counter())
                    text.append(piece)
        return (*_figures(start, stamps), "".join(text))

    def close(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _figures(start: float, stamps: list[float]) -> tuple[float, float, int]:
    if not stamps:
        return float("nan"), float("nan"), 0
    ttft = stamps[0] - start
    tps = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")
    return ttft, tps, len(stamps)


class Direct:
    def __init__(self, model: Path, threads: int, context: int) -> None:
        from llama_cpp import Llama

        self.llm = Llama(
            str(model), n_ctx=context, n_threads=threads, n_threads_batch=threads, verbose=False
        )

    def stream(self, prompt: str, tokens: int) -> Figures:
        start = time.perf_counter()
        stamps: list[float] = []
        text: list[str] = []
        for chunk in self.llm.create_completion(
            prompt, max_tokens=tokens, temperature=0, repeat_penalty=1.0, stream=True
        ):
            piece = chunk["choices"][0]["text"]  # type: ignore[index]
            if piece:
                stamps.append(time.perf_counter())
                text.append(piece)
        return (*_figures(start, stamps), "".join(text))


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):6.1f} [{min(values):.1f}–{max(values):.1f}]"


def _error(predicted: float, measured: float) -> str:
    error = (predicted - measured) / measured
    return f"{error * 100:+5.0f}%{'' if abs(error) <= TARGET_ERROR else ' !'}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--quants", default="Q8_0,Q4_0,Q5_K_M,F16",
                        help="variants to make from the model ('' for none)")  # fmt: skip
    parser.add_argument("--quant-dir", type=Path, default=DEFAULT_QUANT_DIR)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=max((os.cpu_count() or 2) // 2, 1),
                        help="llama.cpp threads on both sides (default: half the CPUs, "
                        "llama-cpp-python's own default)")  # fmt: skip
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--calibrate-each-round", action=argparse.BooleanOptionalAction,
                        default=True, help="a fresh node calibration before each round: the "
                        "machine's speed drifts over minutes here")  # fmt: skip
    args = parser.parse_args()
    if not args.model.is_file():
        raise SystemExit(f"bench: no model at {args.model} (scripts/setup.sh assembles it)")
    from qmesh.daemon.catalog import describe_gguf

    base = describe_gguf(args.model)
    quants = [q.strip().upper() for q in args.quants.split(",") if q.strip()]
    files = {base.quantization: args.model}
    files.update(make_quantizations(args.model, quants, args.quant_dir))
    print(f"model {base.name}: {', '.join(files)}; {args.tokens} tokens per request, "
          f"{args.rounds} rounds, {args.threads} llama.cpp thread(s), context {args.context}, "
          f"{os.cpu_count()} CPUs")  # fmt: skip

    def calibrate() -> tuple[dict[str, Any], str]:
        scratch = Path(tempfile.mkdtemp(prefix="qmesh-bench-calibration-"))
        try:
            return fresh_predictions(files, args.threads, args.context, scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    placements, calibration = calibrate()
    print(calibration)
    print("\npredicted before any of these files has run on this node:")
    for quant, placement in placements.items():
        print(f"  {quant:<7} {placement.decode_tps:6.1f} tok/s  {placement.breakdown.describe()}")
    predictions: dict[str, list[float]] = {q: [] for q in files}

    ids = {quant: path.name.removesuffix(".gguf") for quant, path in files.items()}
    mesh = Mesh(list(files.values()), args.threads, args.context)
    results: dict[str, dict[str, list[Figures]]] = {q: {"direct": [], "qmesh": []} for q in files}
    try:
        before = mesh.models()
        direct = {quant: Direct(path, args.threads, args.context) for quant, path in files.items()}
        for quant in files:  # warm-up: loads the daemon's servers, faults pages in
            mesh.stream(ids[quant], "Hello", 8)
            direct[quant].stream("Hello", 8)
        order = list(files)
        for i in range(args.rounds):
            if i and args.calibrate_each_round:
                placements, _ = calibrate()
            for quant, placement in placements.items():
                predictions[quant].append(placement.decode_tps)
            prompt = PROMPTS[i % len(PROMPTS)]
            for quant in order[i % len(order) :] + order[: i % len(order)]:
                sides = [("direct", direct[quant].stream), ("qmesh", None)]
                if i % 2:
                    sides.reverse()
                for side, run in sides:
                    if run is None:
                        figures = mesh.stream(ids[quant], prompt, args.tokens)
                    else:
                        figures = run(prompt, args.tokens)
                    results[quant][side].append(figures)
        after = mesh.models()
    finally:
        mesh.close()

    every = "each round's" if args.calibrate_each_round else "the first"
    print(f"\npredicted: median [min–max] of {every} calibration; inventory: the daemon's own, "
          "made at its start")  # fmt: skip
    print(f"{'quant':<7} {'predicted':>22} {'inventory':>9}   {'qmesh tok/s':>22} {'error':>6}   "
          f"{'direct tok/s':>22} {'error':>6}  {'qmesh/direct':>12}")  # fmt: skip
    worst = 0.0
    for quant in files:
        predicted = statistics.median(predictions[quant])
        inventory = before[ids[quant]].get("predicted_tps")
        q = [r[1] for r in results[quant]["qmesh"]]
        d = [r[1] for r in results[quant]["direct"]]
        worst = max(worst, abs(predicted - statistics.median(q)) / statistics.median(q))
        print(f"{quant:<7} {_spread(predictions[quant]):>22} {inventory or float('nan'):9.1f}   "
              f"{_spread(q):>22} {_error(predicted, statistics.median(q)):>6}   {_spread(d):>22} "
              f"{_error(predicted, statistics.median(d)):>6}  "
              f"{statistics.median(q) / statistics.median(d):12.3f}")  # fmt: skip
    verdict = "met" if worst <= TARGET_ERROR else "NOT met"
    print(f"largest |error| against qmesh: {worst * 100:.0f}% (target ≤ "
          f"{TARGET_ERROR * 100:.0f}%: {verdict}); '!' marks a miss")  # fmt: skip
    print(f"{'quant':<7} {'TTFT direct ms':>15} {'TTFT qmesh ms':>14} {'identical text':>15}")
    for quant in files:
        td = statistics.median(r[0] for r in results[quant]["direct"]) * 1000
        tq = statistics.median(r[0] for r in results[quant]["qmesh"]) * 1000
        same = sum(
            a[3] == b[3]
            for a, b in zip(results[quant]["direct"], results[quant]["qmesh"], strict=True)
        )
        print(f"{quant:<7} {td:15.1f} {tq:14.1f} {same:>9}/{args.rounds}")
    print("\nthe daemon's inventory after the runs (it learns from its own requests):")
    for quant in files:
        m = {**after[ids[quant]]["metadata"], "predicted_tps": after[ids[quant]]["predicted_tps"]}
        error = m.get("prediction_error")
        print(f"  {ids[quant]:<26} model {m.get('model_tps')}, measured {m.get('measured_tps')} "
              f"[{m.get('measured_min')}–{m.get('measured_max')}] over "
              f"{m.get('measured_samples')} request(s), error "
              f"{'-' if error is None else f'{error * 100:+.0f}%'}; predicted_tps now "
              f"{m.get('predicted_tps')}")  # fmt: skip
    ratio = statistics.median(
        statistics.median(r[1] for r in results[q]["qmesh"])
        / statistics.median(r[1] for r in results[q]["direct"])
        for q in files
    )
    paired = statistics.median(
        a[1] / b[1]
        for q in files
        for a, b in zip(results[q]["qmesh"], results[q]["direct"], strict=True)
    )
    verdict = "met" if ratio >= TARGET_RATIO else "NOT met"
    print(f"qmesh / direct decode tok/s (median over variants): {ratio:.3f} "
          f"(target ≥ {TARGET_RATIO}: {verdict}); median of the paired runs' ratios "
          f"{paired:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
