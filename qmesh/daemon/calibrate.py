"""Timing llama.cpp on synthetic models: the measuring half of the node calibration.

For: ``python -m qmesh.daemon.calibrate --out FILE --threads T
--threads-batch B [--gpu] [--cache DIR --key JSON] [--remeasure]``, which
:mod:`qmesh.daemon.calibration` runs as a subprocess, and :func:`measure`,
the timings themselves. What is timed, with the runtime the daemon uses
(llama-cpp-python; in this process for the engine, through the daemon's
own llama.cpp runtime — a model server process — for the serving path):

- *fixed costs*: two small F16 models of 1 and 8 layers; the difference is
  the cost of a layer, the rest the cost of a token;
- *matrix rates*: for each weight type of :data:`CALIBRATED_TYPES`, a model
  whose every matrix is of that type (:data:`TYPE_SHAPE`: two layers of
  widths 1024 and 2816, matrices the size of a small real model's, 14-51
  MB: the matrices dominate the token) — tokens decoded one at a time, and
  one prompt batch of :data:`PROMPT_TOKENS`;
- *sampling*: llama.cpp's greedy sampler over vocabularies of 512 and
  65 536 entries;
- *streaming*: the bandwidth llama.cpp itself reaches reading weights from
  memory — its token less the fixed costs, on a model far bigger than the
  caches. On the CPU an F32 model four times the last-level cache
  (:func:`stream_shape`): two FLOPs per four bytes keep any core waiting
  on memory, and llama.cpp's reading, not a generic scan, is what bounds
  its tokens (membench's ``memchr`` reached 17 GB/s on one thread of this
  development VM, llama.cpp 23 GB/s). With ``--gpu``, a 2 GiB F16 model of
  8B-sized blocks, offloaded;
- *overlap*, on the CPU: a Q8_0 model of the same size, whose arithmetic
  and reading take about as long as each other. Neither hides the other
  whole (measured here: 1.16× the slower of the two), and how much they
  add up is what prices a real model, whose weights stream from memory
  while the matrix rates above were timed on models the caches mostly hold;
- *serving*: tokens streamed through a model server (the daemon's own
  llama.cpp runtime), less what the same model costs in this process, in
  CPU time (the model server's, from psutil, against this process's: the
  difference of two wall-clock times on a shared machine is mostly noise) —
  on a CPU with the overlap model: a model that streams through the caches
  every token also evicts the server's Python from them, which then costs
  it several times what it costs next to a tiny model.

Rounds alternate the models (a noisy moment hits all of them alike) and
medians are kept. With ``--gpu`` everything is timed a second time with
every layer offloaded (``n_gpu_layers=-1``). A whole calibration takes a
few seconds on a small machine, most of it the model server's start.

Not for: fitting or caching (:mod:`qmesh.daemon.calibration`).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import json
import math
import os
import select
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import attrs

from qmesh.daemon.calibration import Calibration, CalibrationKey, fit, runtime_version
from qmesh.daemon.synth import (
    Shape,
    clone_layer_elements,
    matmul_elements,
    writable,
    write_clone,
    write_model,
)

__all__ = [
    "CALIBRATED_TYPES", "PROMPT_TOKENS", "SCRATCH_PREFIX", "TIMED_OUT", "TYPE_SHAPE", "main",
    "measure",
]  # fmt: skip

SCRATCH_PREFIX: Final = "qmesh-calibrate-"
"""The synthetic models' directory in the temporary one is
``qmesh-calibrate-PID-…``: a later calibration removes a dead one's."""
TIMED_OUT: Final = 124
"""The exit status past ``--timeout``."""
ENDING_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

CALIBRATED_TYPES: Final = (
    "F16", "Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_0", "Q3_K", "Q2_K",
)  # fmt: skip
"""The types llama.cpp's quantize produces for the planner's menu, and the
ones its k-quant mixes put in the rest of a file (Q5_0/Q5_1 where a row
is not a multiple of 256). Others (BF16, Q4_1, the IQ types) are priced
at the nearest of these (:func:`qmesh.daemon.speed.rate_for`)."""
TYPE_SHAPE: Final = Shape(layers=2, dim=1024, ffn=2816, heads=8, kv_heads=8, vocab=512)
STREAM_TYPE: Final = "F32"
OVERLAP_TYPE: Final = "Q8_0"
STREAM_LAYER: Final = Shape(layers=1, dim=1024, ffn=2816, heads=8, kv_heads=8, vocab=512)
STREAM_MIN_BYTES: Final = 128 * 1024 * 1024
STREAM_MAX_BYTES: Final = 1024 * 1024 * 1024
_BYTES_PER_32: Final = {"F32": 128, "F16": 64, "Q8_0": 34}
BIG_MODELS: Final = frozenset({"stream-cpu", "overlap-cpu", "stream-gpu"})
GPU_STREAM_TYPE: Final = "F16"
GPU_STREAM_LAYER: Final = Shape(layers=1, dim=4096, ffn=14336, heads=32, kv_heads=8, vocab=512)
"""An 8B model's block (436 MB in F16): few launches for many bytes."""
GPU_STREAM_BYTES: Final = 2 * 1024**3
"""The GPU's streaming model: big enough that reading it takes longer than
the launches around it, so its token time gives the bandwidth llama.cpp's
kernels reach (the figure NVML's peak × 0.75 only guesses)."""
OVERHEAD_SHAPES: Final = (Shape(1, 128, 256, 2, 2, 512), Shape(8, 128, 256, 2, 2, 512))
VOCAB_SIZES: Final = (512, 65536)
ROUNDS: Final = 5
TOKENS: Final = 16
PROMPT_TOKENS: Final = 64
SERVE_TOKENS: Final = 96
SERVE_ROUNDS: Final = 5
FIRST_TOKEN: Final = 300
"""Token ids evaluated: ordinary word pieces of the synthetic vocabulary."""

Timer = Callable[[], float]


def last_level_cache() -> int:
    """Bytes of the CPU's largest cache (sysfs), or 32 MiB if unknown."""
    best = 0
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip().upper()
        except OSError:
            continue
        units = {"K": 1024, "M": 1024**2, "G": 1024**3}
        try:
            size = int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
        except (ValueError, IndexError):
            continue
        best = max(best, size)
    return best or 32 * 1024**2


def stream_shape(cache_bytes: int, type_name: str = STREAM_TYPE) -> Shape:
    """A CPU model beyond the caches: layers of ``type_name`` adding up to
    four times ``cache_bytes``."""
    target = min(max(4 * cache_bytes, STREAM_MIN_BYTES), STREAM_MAX_BYTES)
    per_layer = STREAM_LAYER.layer_elements() * _BYTES_PER_32[type_name] // 32
    return attrs.evolve(STREAM_LAYER, layers=max(1, -(-target // per_layer)))


def gpu_stream_shape() -> Shape:
    """The GPU's streaming model: 8B-sized F16 blocks adding up to GPU_STREAM_BYTES."""
    per_layer = GPU_STREAM_LAYER.layer_elements() * 2
    return attrs.evolve(GPU_STREAM_LAYER, layers=max(1, GPU_STREAM_BYTES // per_layer))


def _stream_bytes(shape: Shape, type_name: str) -> int:
    """Matrix bytes a token of the streaming model reads."""
    return matmul_elements(shape) * _BYTES_PER_32[type_name] // 32


class _Engine:
    """One synthetic model loaded in this process, with its timing loops."""

    def __init__(self, path: Path, *, threads: int, threads_batch: int, gpu: bool) -> None:
        from llama_cpp import Llama

        self.llm = Llama(
            str(path), n_ctx=256, n_batch=128, n_threads=threads, n_threads_batch=threads_batch,
            n_gpu_layers=-1 if gpu else 0, verbose=False,
        )  # fmt: skip
        self.vocab = self.llm.n_vocab()

    def _token(self, i: int) -> int:
        return FIRST_TOKEN + i % (self.vocab - FIRST_TOKEN)

    def decode_s(self, clock: Timer) -> float:
        """Median seconds to decode one token after a short prompt."""
        llm = self.llm
        llm.reset()  # type: ignore[no-untyped-call]
        llm.eval([1, self._token(0), self._token(1)])
        times = []
        for i in range(TOKENS):
            start = clock()
            llm.eval([self._token(i + 2)])
            times.append(clock() - start)
        return float(statistics.median(times))

    def prompt_s(self, clock: Timer) -> float:
        """Seconds to process a prompt of PROMPT_TOKENS tokens in one batch."""
        llm = self.llm
        llm.reset()  # type: ignore[no-untyped-call]
        tokens = [1] + [self._token(i) for i in range(PROMPT_TOKENS - 1)]
        start = clock()
        llm.eval(tokens)
        return clock() - start

    def sample_s(self, clock: Timer) -> float:
        """Median seconds of llama.cpp's greedy sampler over the whole vocabulary."""
        llm = self.llm
        sampler = llm._init_sampler(temp=0.0)
        times = []
        for _ in range(8):
            start = clock()
            sampler.sample(llm._ctx, -1)
            times.append(clock() - start)
        return float(statistics.median(times))


def _rounds(
    engines: dict[str, _Engine], work: Callable[[_Engine], float], rounds: int
) -> dict[str, float]:
    """``work`` on every engine for ``rounds`` rounds, each round starting
    one model further on; the median per engine."""
    names = list(engines)
    seen: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            seen[name].append(work(engines[name]))
    return {name: float(statistics.median(values)) for name, values in seen.items()}


def _device(
    models: dict[str, Path],
    types: Sequence[str],
    *,
    threads: int,
    threads_batch: int,
    gpu: bool,
    rounds: int,
    clock: Timer,
    big: Mapping[str, tuple[str, Shape, str]],
    probes: dict[str, dict[str, Any]],
) -> tuple[dict[str, Any], dict[str, _Engine]]:
    """Timings on one device; ``big`` names its models beyond the caches
    (``stream``, ``overlap``: model name, shape, weight type); ``probes``
    the layout probes."""
    mine = {name for name, _, _ in big.values()}
    engines = {
        name: _Engine(path, threads=threads, threads_batch=threads_batch, gpu=gpu)
        for name, path in models.items()
        if name not in BIG_MODELS or name in mine
    }
    decode = _rounds(engines, lambda e: e.decode_s(clock), rounds)
    typed = {t: engines[f"type-{t}"] for t in types}
    prompt = _rounds(typed, lambda e: e.prompt_s(clock), rounds)
    elements = matmul_elements(TYPE_SHAPE)
    streamed = {
        key: {
            "type": kind,
            "elements": matmul_elements(shape),
            "bytes": _stream_bytes(shape, kind),
            "layers": shape.layers,
            "decode_s": decode.pop(name),
        }
        for key, (name, shape, kind) in big.items()
    }
    layouts = {
        layout: {
            **{k: v for k, v in probe.items() if k != "files"},
            "seconds": [decode[name] for name in probe["files"]],
        }
        for layout, probe in probes.items()
    }
    return {
        "layouts": layouts,
        "stream": streamed.get("stream"),
        "overlap": streamed.get("overlap"),
        "threads": threads,
        "threads_batch": threads_batch,
        "overhead": {
            "layers": [s.layers for s in OVERHEAD_SHAPES],
            "seconds": [decode[f"overhead-{s.layers}"] for s in OVERHEAD_SHAPES],
            "matmul_elements": [matmul_elements(s) for s in OVERHEAD_SHAPES],
        },
        "types": {
            t: {
                "elements": elements,
                "bytes": models[f"type-{t}"].stat().st_size,
                "layers": TYPE_SHAPE.layers,
                "decode_s": decode[f"type-{t}"],
                "prompt_tokens": PROMPT_TOKENS,
                "prompt_s": prompt[t],
            }
            for t in types
        },
    }, engines


def _serve(
    model: Path, *, threads: int, gpu: bool, between: Callable[[], object]
) -> tuple[float, float]:
    """Medians, per token of ``model`` streamed through the daemon's
    llama.cpp runtime (a model server process): seconds between tokens, and
    CPU seconds the model server spent. ``between`` runs after each round
    (the in-process timing of the same model, interleaved so that a noisy
    moment hits both alike)."""
    import psutil
    import trio

    from qmesh.daemon.catalog import Catalog
    from qmesh.daemon.runtimes.base import Delta, Finished, GenerationRequest
    from qmesh.daemon.runtimes.llamacpp import LlamaCppRuntime

    async def run() -> tuple[float, float]:
        catalog = Catalog([model.parent])
        catalog.scan()
        runtime = LlamaCppRuntime(
            "calibration", catalog, log_dir=model.parent / "logs", context_length=256,
            threads=threads, gpu_layers=lambda _m: -1 if gpu else 0, load_timeout_s=120,
        )  # fmt: skip
        gaps: list[float] = []
        cpu: list[float] = []
        async with trio.open_nursery() as nursery:
            await nursery.start(runtime.run)
            model_id = model.name.removesuffix(".gguf")
            await runtime.load(model_id)
            server = psutil.Process(runtime.servers[model_id].pid)
            for i in range(SERVE_ROUNDS + 1):  # the first warms the server up
                before = sum(server.cpu_times()[:2])
                request = GenerationRequest.from_openai(
                    "completions",
                    {"prompt": f"w{i}", "max_tokens": SERVE_TOKENS, "temperature": 0},
                )
                stamps: list[float] = []
                tokens = None
                async for event in runtime.generate(model_id, request):
                    if isinstance(event, Delta):
                        stamps.append(time.perf_counter())
                    elif isinstance(event, Finished):
                        tokens = event.completion_tokens
                spent = sum(server.cpu_times()[:2]) - before
                if i and len(stamps) > 8 and (tokens is None or len(stamps) >= 0.9 * tokens):
                    gaps.append((stamps[-1] - stamps[0]) / (len(stamps) - 1))
                    cpu.append(spent / (tokens or len(stamps)))
                between()
            await runtime.unload(model_id)
            nursery.cancel_scope.cancel()
        if not gaps:
            raise RuntimeError("the model server streamed no usable tokens")
        return float(statistics.median(gaps)), float(statistics.median(cpu))

    return trio.run(run)


def measure(
    workdir: Path,
    *,
    threads: int,
    threads_batch: int,
    gpu: bool = False,
    types: Sequence[str] = CALIBRATED_TYPES,
    rounds: int = ROUNDS,
    serve: bool = True,
    stream: bool = True,
    layouts: Sequence[Path] = (),
    clock: Timer = time.perf_counter,
) -> dict[str, Any]:
    """Time llama.cpp on synthetic models written into ``workdir``; the raw
    figures :func:`qmesh.daemon.calibration.fit` takes. ``layouts``: model
    files whose block layouts to probe (their headers only are read)."""
    started = time.perf_counter()
    types = [t for t in types if writable(t)]
    models: dict[str, Path] = {}
    probes = _write_probes(workdir, layouts, models)
    for shape in OVERHEAD_SHAPES:
        models[f"overhead-{shape.layers}"] = write_model(
            workdir / f"overhead-{shape.layers}.gguf", shape
        )
    for t in types:
        models[f"type-{t}"] = write_model(workdir / f"type-{t}.gguf", TYPE_SHAPE, weight_type=t)
    cpu_big: dict[str, tuple[str, Shape, str]] = {}
    gpu_big: dict[str, tuple[str, Shape, str]] = {}
    if stream:
        for key, kind in (("stream", STREAM_TYPE), ("overlap", OVERLAP_TYPE)):
            shape = stream_shape(last_level_cache(), kind)
            name = f"{key}-cpu"
            models[name] = write_model(workdir / f"{name}.gguf", shape, weight_type=kind)
            cpu_big[key] = (name, shape, kind)
    if stream and gpu:
        shape = gpu_stream_shape()
        models["stream-gpu"] = write_model(workdir / "stream-gpu.gguf", shape)
        gpu_big["stream"] = ("stream-gpu", shape, GPU_STREAM_TYPE)
    small = OVERHEAD_SHAPES[0]
    vocab_model = write_model(
        workdir / "vocab.gguf",
        Shape(1, small.dim, small.ffn, small.heads, small.kv_heads, VOCAB_SIZES[1]),
    )
    devices: dict[str, Any] = {}
    cpu, engines = _device(
        models, types, threads=threads, threads_batch=threads_batch, gpu=False, rounds=rounds,
        clock=clock, big=cpu_big, probes=probes,
    )  # fmt: skip
    devices["cpu"] = cpu
    primary = engines
    if gpu:
        del engines
        devices["gpu"], primary = _device(
            models, types, threads=threads, threads_batch=threads_batch, gpu=True, rounds=rounds,
            clock=clock, big=gpu_big, probes=probes,
        )  # fmt: skip
    tiny = primary[f"overhead-{small.layers}"]
    wide = _Engine(vocab_model, threads=threads, threads_batch=threads_batch, gpu=gpu)
    wide.decode_s(clock)
    tiny.decode_s(clock)
    sampled = _rounds({"small": tiny, "big": wide}, lambda e: e.sample_s(clock), rounds)
    raw: dict[str, Any] = {
        "runtime": runtime_version(),
        "devices": devices,
        "sample": {"vocab": list(VOCAB_SIZES), "seconds": [sampled["small"], sampled["big"]]},
    }
    del wide
    if serve:
        # On a CPU the serving path is timed on the overlap model: decoding
        # a model bigger than the caches evicts the server's Python from them
        # between tokens, and that is what a real model costs it (three times
        # what it costs next to a tiny model on this machine).
        name = "overlap-cpu" if not gpu and "overlap-cpu" in primary else f"overhead-{small.layers}"
        engine = primary[name]
        serve_dir = workdir / "serve"
        serve_dir.mkdir(exist_ok=True)
        served = serve_dir / f"calibration-{name}.gguf"
        os.link(models[name], served)
        engine_times: list[float] = []
        engine_cpu: list[float] = []

        def engine_round() -> None:
            engine_times.append(engine.decode_s(clock))
            engine_cpu.append(engine.decode_s(time.process_time))

        token_s, cpu_token_s = _serve(served, threads=threads, gpu=gpu, between=engine_round)
        raw["serve"] = {
            "model": name,
            "token_s": token_s,
            "engine_s": statistics.median(engine_times) + sampled["small"],
            "cpu_token_s": cpu_token_s,
            "cpu_engine_s": statistics.median(engine_cpu) + sampled["small"],
        }
    raw["measured_at"] = time.time()
    raw["seconds"] = time.perf_counter() - started
    return raw


PROBE_LAYERS: Final = (1, 4)
PROBE_MAX_LAYER_ELEMENTS: Final = 32_000_000
"""Layouts with bigger blocks (past ~3B parameters) are not probed: their
matrices dwarf the per-block costs, which the llama-shaped probes give."""


def _write_probes(
    workdir: Path, files: Sequence[Path], models: dict[str, Path]
) -> dict[str, dict[str, Any]]:
    """Clones of each distinct block layout among ``files`` (headers only),
    with :data:`PROBE_LAYERS` blocks, added to ``models``."""
    from qmesh.daemon.catalog import layout_of
    from qmesh.daemon.gguf_scan import GgufError, scan_gguf

    probes: dict[str, dict[str, Any]] = {}
    for file in files:
        try:
            header = scan_gguf(file)
        except (GgufError, OSError):
            continue
        layout = layout_of(header)
        if layout is None or layout in probes:
            continue
        per_layer = clone_layer_elements(header)
        if sum(per_layer.values()) > PROBE_MAX_LAYER_ELEMENTS:
            continue
        names = []
        for layers in PROBE_LAYERS:
            name = f"layout-{layout}-{layers}"
            try:
                models[name] = write_clone(workdir / f"{name}.gguf", header, layers)
            except (KeyError, ValueError, TypeError) as exc:  # an exotic header
                print(f"cannot probe {layout}: {exc}", file=sys.stderr)
                break
            names.append(name)
        else:
            dim = next((t.shape[0] for t in header.tensors if t.name == "token_embd.weight"), 0)
            probes[layout] = {
                "files": names,
                "layers": list(PROBE_LAYERS),
                "layer_elements": per_layer,
                "head_elements": {"Q8_0" if dim % 32 == 0 else "F16": dim * 512},
            }
    return probes


def _layouts(files: Sequence[Path]) -> set[str]:
    from qmesh.daemon.catalog import layout_of
    from qmesh.daemon.gguf_scan import GgufError, scan_gguf

    found = set()
    for file in files:
        try:
            layout = layout_of(scan_gguf(file))
        except (GgufError, OSError):
            continue
        if layout is not None:
            found.add(layout)
    return found


def _quiet_llama() -> Any:
    """Silence llama.cpp's loading chatter; the callback must outlive every model."""
    import llama_cpp

    callback = llama_cpp.llama_log_callback(lambda level, text, data: None)
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    return callback


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qmesh.daemon.calibrate", description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--threads-batch", type=int, required=True)
    parser.add_argument("--gpu", action="store_true", help="time the GPU too (layers offloaded)")
    parser.add_argument("--cache", type=Path, help="the machine's calibration cache")
    parser.add_argument("--key", default="{}", help="what the calibration is for (JSON)")
    parser.add_argument("--remeasure", action="store_true")
    parser.add_argument("--no-serve", action="store_true", help="skip the serving path")
    parser.add_argument("--timeout", type=_seconds, help="give up after this many seconds")
    parser.add_argument(
        "--layout", type=Path, action="append", default=[], metavar="GGUF",
        help="probe this file's block layout (its header only is read); repeatable",
    )  # fmt: skip
    args = parser.parse_args(argv)
    with _scratch_directory(args.timeout) as scratch:
        _sweep_scratch(scratch.parent)
        return _calibrate(args, scratch)


@contextlib.contextmanager
def _scratch_directory(timeout: float | None) -> Iterator[Path]:
    """A directory for the synthetic models (gigabytes) that goes with this
    process however it ends but SIGKILL: with the block, on SIGTERM, SIGINT
    or SIGHUP (status 128 + the signal), or past ``timeout`` seconds
    (:data:`TIMED_OUT`).

    A thread of its own ends the process on a signal or the timeout: the
    main thread may be inside llama.cpp for seconds, and an exception
    raised in it can land in a ctypes callback (llama.cpp's log), which
    ignores it — the calibration would go on."""
    scratch = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-"))
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)

    def wake(signum: int, frame: object) -> None:
        with contextlib.suppress(OSError):
            os.write(wake_write, bytes([signum]))

    def reap() -> None:
        ready, _, _ = select.select([wake_read], [], [], timeout)
        signum = os.read(wake_read, 1)[0] if ready else None
        if signum == 0:
            return  # the block is over
        # Moved away first: a model the main thread goes on writing there
        # fails instead of outliving the removal.
        gone = scratch.with_name(f"{scratch.name}.gone")
        with contextlib.suppress(OSError):
            scratch.rename(gone)
        shutil.rmtree(gone, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)
        os._exit(TIMED_OUT if signum is None else 128 + signum)

    previous = {signum: signal.signal(signum, wake) for signum in ENDING_SIGNALS}
    reaper = threading.Thread(target=reap, name="calibration reaper", daemon=True)
    reaper.start()
    try:
        yield scratch
    finally:
        os.write(wake_write, b"\0")
        reaper.join()  # forever, when it is ending the process
        shutil.rmtree(scratch, ignore_errors=True)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        os.set_blocking(wake_read, False)
        try:
            late = os.read(wake_read, len(ENDING_SIGNALS))
        except BlockingIOError:
            late = b""
        os.close(wake_read)
        os.close(wake_write)
        for number in late:
            signal.raise_signal(number)  # too late for the reaper: to whoever handles it now


def _seconds(text: str) -> float:
    seconds = float(text)
    if not (math.isfinite(seconds) and seconds > 0):
        raise argparse.ArgumentTypeError(f"a timeout is a positive number of seconds, not {text}")
    return seconds


def _sweep_scratch(directory: Path) -> None:
    """Remove what calibrations killed outright (SIGKILL) left: the scratch
    directories of processes that are gone."""
    for path in directory.glob(f"{SCRATCH_PREFIX}*-*"):
        pid = path.name.removeprefix(SCRATCH_PREFIX).partition("-")[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass  # alive: another user's


def _calibrate(args: argparse.Namespace, scratch: Path) -> int:
    key = json.loads(args.key)
    lock = None
    cached_file = None
    if args.cache:
        args.cache.mkdir(parents=True, exist_ok=True)
        lock = (args.cache / ".lock").open("w")
        fcntl.flock(lock, fcntl.LOCK_EX)  # one calibration at a time on this machine
        digest = CalibrationKey(**{**key, "gpus": tuple(key.get("gpus", ()))}).digest()
        cached_file = args.cache / f"{digest}.json"
        if not args.remeasure and cached_file.is_file():
            try:
                data = json.loads(cached_file.read_text())
                found = Calibration.from_json(data) if data.get("key") == key else None
            except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
                found = None  # an unreadable cache entry: measure again
            if found is not None and found.covers(_layouts(args.layout)):
                args.out.write_text(json.dumps({**data, "cached": True}))
                return 0
    keep = _quiet_llama()
    raw = measure(
        scratch, threads=args.threads, threads_batch=args.threads_batch, gpu=args.gpu,
        serve=not args.no_serve, layouts=args.layout,
    )  # fmt: skip
    raw["key"] = key
    calibration: Calibration = fit(raw)
    text = json.dumps({**calibration.to_json(), "raw": raw})
    if cached_file is not None:  # first: whoever asked may be gone (see obtain_async)
        tmp_file = cached_file.with_suffix(".tmp")
        tmp_file.write_text(text)
        tmp_file.replace(cached_file)
    args.out.write_text(text)
    del keep, lock
    return 0


if __name__ == "__main__":
    sys.exit(main())
