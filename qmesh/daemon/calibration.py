"""A node's measured speed figures for the planner: fitted, cached, obtained.

For: :class:`Calibration` (what :mod:`qmesh.daemon.speed` prices a token
with: matrix-vector and batch FLOP/s per weight type, fixed costs per token
and per layer, for the CPU at the runtime's thread count and for the GPU
with every layer offloaded; the sampler's cost per vocabulary entry; the
serving path's cost per token), :func:`fit`, which turns the raw timings of
:mod:`qmesh.daemon.calibrate` into one (pure: unit-tested on made-up
timings), and the cache: :func:`load_cached` / :func:`obtain` /
:func:`obtain_async`, which keep one calibration per node, runtime version
and thread count in ``DATA_DIR/daemon/calibration.json`` and, for the other
daemons and commands on the same machine, in ``~/.cache/qmesh/calibration``
(:data:`CACHE_ENV` moves it).

Why a subprocess: the measuring side loads llama.cpp, and llama.cpp aborts
the process on a failed assertion; a daemon must not die of its own
calibration (docs/daemon.md, the model-server decision). :func:`obtain`
runs ``python -m qmesh.daemon.calibrate`` and reads the JSON it writes; the
subprocess takes a file lock in the machine cache, so daemons that start
together measure once and do not disturb each other's figures.

Never the model being predicted: the calibration times small synthetic
models (:mod:`qmesh.daemon.synth`), so a prediction for a model is made
before that model has ever run on the node.

Not for: the cost model itself (:mod:`qmesh.daemon.speed`) or the timing
loops (:mod:`qmesh.daemon.calibrate`).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Final

import attrs
import psutil

__all__ = [
    "CACHE_ENV",
    "Calibration",
    "CalibrationKey",
    "DeviceRates",
    "blend",
    "fit",
    "load_cached",
    "machine_cache",
    "obtain",
    "obtain_async",
    "overlap_exponent",
]

log = logging.getLogger(__name__)

SCHEMA: Final = 2
"""Bumped when the method changes: an older calibration is measured again."""
CACHE_NAME: Final = "calibration.json"
CACHE_ENV: Final = "QMESH_CALIBRATION_CACHE"
TIMEOUT_S: Final = 180.0
"""A calibration takes seconds; a stuck one is abandoned (the planner then
falls back to the memory-bound ceiling)."""
KILL_GRACE_S: Final = 10.0
"""How long past its own timeout a calibration subprocess is waited for
before it is killed."""
RELIABLE_SHARE: Final = 0.25
"""A type's matrix time must be at least this share of its token time to
give a rate: below it the fixed costs swamp it (a GPU doing a small model)."""


STREAM_SHARE: Final = 0.10
"""Likewise for a streaming model: its bytes' share of its token."""
MAX_OVERLAP: Final = 16.0
"""The overlap exponent past which the blend is the slower term alone."""


def runtime_version() -> str | None:
    """``llama-cpp-python X.Y.Z``, or None when it is not installed."""
    try:
        return f"llama-cpp-python {importlib.metadata.version('llama-cpp-python')}"
    except importlib.metadata.PackageNotFoundError:
        return None


def default_threads(cpus: int | None = None) -> tuple[int, int]:
    """llama-cpp-python's own defaults: half the CPUs for generation, all for prompts."""
    cpus = cpus or os.cpu_count() or 1
    return max(cpus // 2, 1), max(cpus, 1)


@attrs.frozen
class CalibrationKey:
    """What a calibration is valid for: this machine, this runtime, these threads, these GPUs."""

    host: str
    cpus: int
    ram_total: int
    runtime: str
    threads: int
    threads_batch: int
    gpus: tuple[str, ...] = ()
    schema: int = SCHEMA

    @classmethod
    def local(
        cls, *, threads: int | None, threads_batch: int | None = None, gpus: Sequence[str] = ()
    ) -> CalibrationKey | None:
        runtime = runtime_version()
        if runtime is None:
            return None
        default, default_batch = default_threads()
        threads = threads or default
        return cls(
            host=platform.node(),
            cpus=os.cpu_count() or 1,
            ram_total=psutil.virtual_memory().total,
            runtime=runtime,
            threads=threads,
            threads_batch=threads_batch or (threads if threads != default else default_batch),
            gpus=tuple(gpus),
        )

    def to_json(self) -> dict[str, Any]:
        data = attrs.asdict(self)
        data["gpus"] = list(self.gpus)
        return data

    def digest(self) -> str:
        text = json.dumps(self.to_json(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@attrs.frozen
class DeviceRates:
    """One compute device as measured: the CPU at a thread count, or a GPU."""

    kind: str
    """``cpu`` or ``gpu``."""
    threads: int
    token_s: float
    """Fixed work per token (graph, output, synchronisation), seconds."""
    layer_s: float
    """Fixed work per layer per token (norms, rope, small ops), seconds."""
    matvec_gflops: dict[str, float] = attrs.field(factory=dict, hash=False)
    """Decode: matrix × vector GFLOP/s (2 per weight) for each weight type."""
    prompt_gflops: dict[str, float] = attrs.field(factory=dict, hash=False)
    """Prompt batches: matrix × matrix GFLOP/s for each weight type."""
    layouts: dict[str, tuple[float, float]] = attrs.field(factory=dict, hash=False)
    """Per block layout probed (:attr:`qmesh.daemon.catalog.ModelInfo.layout`):
    (token_s, layer_s) in place of the llama-shaped figures above."""
    stream_gbps: float | None = None
    """The bandwidth llama.cpp reaches reading a model far bigger than the
    caches (a GPU: its kernels on a 2 GiB model; a CPU: an F32 model at
    :attr:`threads`), which bounds a token instead of NVML's peak ×
    efficiency or membench's scan. None when not measured, or on a CPU at
    another thread count (the bandwidth does not scale with threads as the
    arithmetic does: membench's figure at that count stands)."""
    overlap: float | None = None
    """How far a matrix's arithmetic and its reading from memory hide each
    other: the exponent p of ``(memory^p + arithmetic^p)^(1/p)``, 1 when
    they add up, None when the slower one alone is the time. Fitted on the
    CPU's overlap model (Q8_0, beyond the caches)."""

    def scaled(self, threads: int | None, cores: int | None) -> DeviceRates:
        """The CPU's rates at another thread count (linear up to the cores)."""
        if self.kind != "cpu" or not threads or threads == self.threads:
            return self
        usable = min(threads, cores or threads)
        factor = usable / max(min(self.threads, cores or self.threads), 1)
        return attrs.evolve(
            self,
            threads=threads,
            matvec_gflops={k: v * factor for k, v in self.matvec_gflops.items()},
            prompt_gflops={k: v * factor for k, v in self.prompt_gflops.items()},
            stream_gbps=None,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "threads": self.threads,
            "token_s": self.token_s,
            "layer_s": self.layer_s,
            "matvec_gflops": {k: round(v, 3) for k, v in self.matvec_gflops.items()},
            "prompt_gflops": {k: round(v, 3) for k, v in self.prompt_gflops.items()},
            "stream_gbps": None if self.stream_gbps is None else round(self.stream_gbps, 3),
            "overlap": None if self.overlap is None else round(self.overlap, 4),
            "layouts": {k: list(v) for k, v in self.layouts.items()},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DeviceRates:
        return cls(
            kind=str(data["kind"]),
            threads=int(data["threads"]),
            token_s=float(data["token_s"]),
            layer_s=float(data["layer_s"]),
            matvec_gflops={str(k): float(v) for k, v in data.get("matvec_gflops", {}).items()},
            prompt_gflops={str(k): float(v) for k, v in data.get("prompt_gflops", {}).items()},
            stream_gbps=None if data.get("stream_gbps") is None else float(data["stream_gbps"]),
            overlap=None if data.get("overlap") is None else float(data["overlap"]),
            layouts={
                str(k): (float(v[0]), float(v[1])) for k, v in data.get("layouts", {}).items()
            },
        )


@attrs.frozen
class Calibration:
    runtime: str
    cpu: DeviceRates
    gpu: DeviceRates | None
    sample_s: float
    """Choosing a token, the part that does not grow with the vocabulary."""
    sample_s_per_vocab: float
    serve_s: float
    """Per token, the serving path beyond the engine: llama-cpp-python's
    completion loop, its HTTP server and the stream to the daemon."""
    measured_at: float
    seconds: float
    key: dict[str, Any] = attrs.field(factory=dict, hash=False)
    cached: bool = False
    notes: tuple[str, ...] = ()

    def covers(self, layouts: set[str]) -> bool:
        """Whether every one of ``layouts`` was probed."""
        return layouts <= set(self.cpu.layouts)

    def to_json(self) -> dict[str, Any]:
        return {
            "runtime": self.runtime,
            "cpu": self.cpu.to_json(),
            "gpu": None if self.gpu is None else self.gpu.to_json(),
            "sample_s": self.sample_s,
            "sample_s_per_vocab": self.sample_s_per_vocab,
            "serve_s": self.serve_s,
            "measured_at": self.measured_at,
            "seconds": round(self.seconds, 3),
            "key": self.key,
            "cached": self.cached,
            "notes": list(self.notes),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Calibration:
        gpu = data.get("gpu")
        return cls(
            runtime=str(data["runtime"]),
            cpu=DeviceRates.from_json(data["cpu"]),
            gpu=None if gpu is None else DeviceRates.from_json(gpu),
            sample_s=float(data["sample_s"]),
            sample_s_per_vocab=float(data["sample_s_per_vocab"]),
            serve_s=float(data["serve_s"]),
            measured_at=float(data["measured_at"]),
            seconds=float(data["seconds"]),
            key=dict(data.get("key") or {}),
            cached=bool(data.get("cached", False)),
            notes=tuple(str(n) for n in data.get("notes", ())),
        )

    def describe(self) -> str:
        def rates(device: DeviceRates) -> str:
            shown = ", ".join(f"{k} {v:.0f}" for k, v in sorted(device.matvec_gflops.items()))
            stream = "" if device.stream_gbps is None else (
                f"; reads a model beyond the caches at {device.stream_gbps:.0f} GB/s"
            )  # fmt: skip
            if device.overlap is not None:
                stream += f", overlapping its arithmetic with p = {device.overlap:.1f}"
            return (
                f"{device.kind} ({device.threads} thread(s)): {device.token_s * 1e3:.2f} ms/token "
                f"+ {device.layer_s * 1e6:.0f} µs/layer; matvec GFLOP/s {shown or 'n/a'}{stream}"
            )

        lines = [
            f"calibrated {time.strftime('%Y-%m-%d %H:%M', time.localtime(self.measured_at))} "
            f"({self.runtime}, {self.seconds:.1f}s{', cached' if self.cached else ''}): "
            f"sampling {self.sample_s * 1e3:.3f} ms + {self.sample_s_per_vocab * 1e9:.2f} ns × "
            f"vocab, serving {self.serve_s * 1e3:.2f} ms per token",
            "  " + rates(self.cpu),
        ]
        if self.gpu is not None:
            lines.append("  " + rates(self.gpu))
        return "\n".join(lines)


# -- fitting raw timings --------------------------------------------------------


def _device(raw: Mapping[str, Any], kind: str, notes: list[str]) -> DeviceRates:
    """Rates for one device from its timings (see :mod:`qmesh.daemon.calibrate`
    for what is timed). The fixed costs and the F16 rate depend on each
    other (the overhead models multiply a few small F16 matrices too), so
    they are solved by a few rounds of substitution."""
    over = raw["overhead"]
    (l1, l2), (t1, t2), (e1, e2) = over["layers"], over["seconds"], over["matmul_elements"]
    types: Mapping[str, Mapping[str, Any]] = raw["types"]
    f16: float | None = None
    layer_s = token_s = 0.0
    matvec: dict[str, float] = {}
    prompt: dict[str, float] = {}
    for _ in range(4):
        scale = 2 / (f16 * 1e9) if f16 else 0.0  # seconds per matrix weight at F16
        layer_s = max(0.0, (t2 - t1 - scale * (e2 - e1)) / (l2 - l1))
        token_s = max(0.0, t1 - l1 * layer_s - scale * e1)
        matvec.clear()
        prompt.clear()
        for name, timing in types.items():
            fixed = token_s + timing["layers"] * layer_s
            net = timing["decode_s"] - fixed
            if net >= RELIABLE_SHARE * timing["decode_s"]:
                matvec[name] = 2 * timing["elements"] / net / 1e9
            tokens = timing.get("prompt_tokens") or 0
            prompt_net = (timing.get("prompt_s") or 0.0) - fixed
            if tokens and prompt_net >= RELIABLE_SHARE * (timing.get("prompt_s") or 0.0):
                prompt[name] = 2 * timing["elements"] * tokens / prompt_net / 1e9
        f16 = matvec.get("F16")
    skipped = sorted(set(types) - set(matvec))
    if skipped:
        notes.append(
            f"{kind}: the fixed costs swamp the matrix time of {', '.join(skipped)}: "
            "bounded by memory bandwidth only"
        )
    stream_gbps = None
    stream = raw.get("stream")
    if stream:
        # Memory-bound (an offloaded F16 model, an F32 one on a CPU): the
        # token less its fixed costs is the bytes' time.
        net = stream["decode_s"] - token_s - stream["layers"] * layer_s
        if net >= STREAM_SHARE * stream["decode_s"]:
            stream_gbps = stream["bytes"] / net / 1e9
        else:
            notes.append(f"{kind}: the streaming model's bytes hide behind its fixed costs")
    overlap = None
    both = raw.get("overlap")
    rate = matvec.get(both["type"]) if both else None
    if both and rate and stream_gbps:
        net = both["decode_s"] - token_s - both["layers"] * layer_s
        memory = both["bytes"] / (stream_gbps * 1e9)
        overlap = overlap_exponent(memory, 2 * both["elements"] / (rate * 1e9), net)
    layouts: dict[str, tuple[float, float]] = {}
    for layout, probe in (raw.get("layouts") or {}).items():
        (n1, n2), (p1, p2) = probe["layers"], probe["seconds"]

        def matrices(elements: Mapping[str, int]) -> float:
            seconds = 0.0
            for kind_name, count in elements.items():
                rate = matvec.get(kind_name)
                seconds += 2 * count / (rate * 1e9) if rate else 0.0
            return seconds

        per_layer = (p2 - p1) / (n2 - n1)
        probe_layer = max(0.0, per_layer - matrices(probe["layer_elements"]))
        probe_token = max(0.0, p1 - n1 * per_layer - matrices(probe["head_elements"]))
        layouts[layout] = (probe_token, probe_layer)
    return DeviceRates(
        kind=kind,
        threads=int(raw["threads"]),
        token_s=token_s,
        layer_s=layer_s,
        matvec_gflops=matvec,
        prompt_gflops=prompt,
        stream_gbps=stream_gbps,
        overlap=overlap,
        layouts=layouts,
    )


def blend(memory: float, arithmetic: float, overlap: float | None) -> float:
    """Seconds for a matrix whose reading takes ``memory`` and whose
    arithmetic ``arithmetic``, given the device's :attr:`DeviceRates.overlap`."""
    slow, fast = max(memory, arithmetic), min(memory, arithmetic)
    if overlap is None or slow <= 0:
        return slow
    return float(slow * (1 + (fast / slow) ** overlap) ** (1 / overlap))


def overlap_exponent(memory: float, arithmetic: float, seconds: float) -> float | None:
    """The p for which :func:`blend` of ``memory`` and ``arithmetic`` is
    ``seconds`` (bisection: the blend falls from their sum at p = 1 to the
    slower of them as p grows); None when ``seconds`` is within 1 % of the
    slower, or closer to it than p = :data:`MAX_OVERLAP` comes."""
    if min(memory, arithmetic) <= 0 or seconds <= max(memory, arithmetic) * 1.01:
        return None
    if seconds >= memory + arithmetic:
        return 1.0
    if blend(memory, arithmetic, MAX_OVERLAP) >= seconds:
        return None
    low, high = 1.0, MAX_OVERLAP
    for _ in range(60):
        middle = (low + high) / 2
        if blend(memory, arithmetic, middle) > seconds:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def fit(raw: Mapping[str, Any]) -> Calibration:
    """A calibration from the timings ``python -m qmesh.daemon.calibrate`` measured."""
    notes: list[str] = []
    devices = raw["devices"]
    cpu = _device(devices["cpu"], "cpu", notes)
    gpu = _device(devices["gpu"], "gpu", notes) if devices.get("gpu") else None
    (v1, v2), (s1, s2) = raw["sample"]["vocab"], raw["sample"]["seconds"]
    per_vocab = max(0.0, (s2 - s1) / (v2 - v1)) if v2 != v1 else 0.0
    sample_s = max(0.0, s1 - per_vocab * v1)
    serve = raw.get("serve")
    serve_s = 0.0
    if serve and serve.get("cpu_token_s") is not None:
        # CPU seconds the model server spends per token beyond the engine's:
        # its Python runs between tokens, so it adds to every token.
        serve_s = max(0.0, serve["cpu_token_s"] - serve["cpu_engine_s"])
    elif serve:
        serve_s = max(0.0, serve["token_s"] - serve["engine_s"])
    else:
        notes.append("the serving path was not measured: its per-token cost is left out")
    return Calibration(
        runtime=str(raw["runtime"]),
        cpu=cpu,
        gpu=gpu,
        sample_s=sample_s,
        sample_s_per_vocab=per_vocab,
        serve_s=serve_s,
        measured_at=float(raw.get("measured_at", time.time())),
        seconds=float(raw.get("seconds", 0.0)),
        key=dict(raw.get("key") or {}),
        notes=tuple(notes),
    )


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


# -- the cache --------------------------------------------------------------------


def machine_cache(environ: Mapping[str, str] = os.environ) -> Path:
    """Where calibrations are shared by every daemon and command on this machine."""
    configured = environ.get(CACHE_ENV)
    if configured:
        return Path(configured).expanduser()
    base = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "qmesh" / "calibration"


def _read(path: Path, key: CalibrationKey) -> Calibration | None:
    try:
        data = json.loads(path.read_text())
        if data.get("key") != key.to_json():
            return None
        return attrs.evolve(Calibration.from_json(data), cached=True)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        log.warning("ignoring unreadable calibration %s (%s)", path, exc)
        return None


def _write(path: Path, calibration: Calibration) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**calibration.to_json(), "cached": False}))
        tmp.replace(path)
    except OSError as exc:
        log.warning("cannot cache the calibration in %s: %s", path, exc)


def load_cached(
    directory: Path, key: CalibrationKey, layouts: set[str] | frozenset[str] = frozenset()
) -> Calibration | None:
    """The node's calibration for ``key`` that probed every one of ``layouts``:
    its data directory's copy, else the machine's (copied into the data
    directory). None if neither."""
    own = directory / CACHE_NAME
    found = _read(own, key)
    if found is None or not found.covers(set(layouts)):
        found = _read(machine_cache() / f"{key.digest()}.json", key)
        if found is None or not found.covers(set(layouts)):
            return None
        _write(own, found)
    return found


def command(
    key: CalibrationKey,
    out: Path,
    *,
    timeout_s: float,
    remeasure: bool = False,
    models: Sequence[Path] = (),
) -> list[str]:
    """The subprocess that measures (or finds in the machine cache) a
    calibration, probing the block layouts of ``models``, and gives up
    (removing its synthetic models) after ``timeout_s``."""
    args = [
        sys.executable, "-m", "qmesh.daemon.calibrate", "--out", str(out),
        "--threads", str(key.threads), "--threads-batch", str(key.threads_batch),
        "--cache", str(machine_cache()), "--key", json.dumps(key.to_json()),
        "--timeout", str(timeout_s),
    ]  # fmt: skip
    if key.gpus:
        args.append("--gpu")
    if remeasure:
        args.append("--remeasure")
    for model in models:
        args += ["--layout", str(model)]
    return args


def _finish(directory: Path, key: CalibrationKey, out: Path) -> Calibration | None:
    try:
        calibration = Calibration.from_json(json.loads(out.read_text()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        log.warning("the calibration wrote no usable result (%s)", exc)
        return None
    finally:
        out.unlink(missing_ok=True)
    if calibration.key != key.to_json():
        log.warning("the calibration answered for another key: %s", calibration.key)
        return None
    _write(directory / CACHE_NAME, attrs.evolve(calibration, cached=False))
    return calibration


def obtain(
    directory: Path,
    key: CalibrationKey,
    *,
    models: Sequence[Path] = (),
    layouts: set[str] | frozenset[str] = frozenset(),
    remeasure: bool = False,
    timeout_s: float = TIMEOUT_S,
) -> Calibration | None:
    """The cached calibration, or a new one (blocking: seconds) that probes
    the block layouts of ``models`` (``layouts``: theirs, which the cached
    one must cover). None when it cannot be had (llama-cpp-python missing,
    the measurement failed)."""
    if not remeasure:
        found = load_cached(directory, key, layouts)
        if found is not None:
            return found
    with tempfile.TemporaryDirectory(prefix="qmesh-calibration-") as tmp:
        out = Path(tmp) / "calibration.json"
        try:
            done = subprocess.run(
                command(key, out, timeout_s=timeout_s, remeasure=remeasure, models=models),
                capture_output=True,
                text=True,
                # Its own timeout first: a SIGKILL leaves its models behind
                # until the next calibration sweeps them.
                timeout=timeout_s + KILL_GRACE_S,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("node calibration failed: %s", exc)
            return None
        if done.returncode != 0:
            log.warning("node calibration failed: %s", done.stderr.strip()[-2000:])
            return None
        return _finish(directory, key, out)


async def obtain_async(
    directory: Path,
    key: CalibrationKey,
    *,
    models: Sequence[Path] = (),
    layouts: set[str] | frozenset[str] = frozenset(),
    timeout_s: float = TIMEOUT_S,
) -> Calibration | None:
    """:func:`obtain` for Trio code: the subprocess is awaited, not blocked on.

    Cancelling this (the daemon stopping) does not kill the subprocess: it
    finishes on its own — seconds, bounded by its timeout — and leaves its
    result in the machine's cache, so a daemon that lives shorter than a
    calibration (a test's, a restart loop's) does not throw the work away
    and pay it again next time."""
    import trio

    found = await trio.to_thread.run_sync(load_cached, directory, key, layouts)
    if found is not None:
        return found
    started = time.monotonic()
    await trio.to_thread.run_sync(partial(directory.mkdir, parents=True, exist_ok=True))
    out = directory / "calibration.out.json"
    with (directory / "calibration.log").open("ab") as log_file:
        process = await trio.lowlevel.open_process(
            command(key, out, timeout_s=timeout_s, models=models),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    with trio.move_on_after(timeout_s) as scope:
        code = await process.wait()
    if scope.cancelled_caught:
        log.warning("node calibration abandoned after %.0fs", timeout_s)
        return None
    if code != 0:
        log.warning("node calibration failed (status %s): see %s", code, log_file.name)
        return None
    calibration = await trio.to_thread.run_sync(_finish, directory, key, out)
    if calibration is not None:
        log.info(
            "node calibrated in %.1fs%s", time.monotonic() - started,
            " (from the machine's cache)" if calibration.cached else "",
        )  # fmt: skip
    return calibration
