"""Host memory bandwidth, measured once with a copy benchmark and cached.

For: :func:`measure_bandwidth` (a few hundred milliseconds of large
``memmove`` copies on 1, 2, 4… threads; the best rate wins) and
:func:`cached_bandwidth`, which keeps the result in the data directory so a
restarted daemon does not pay for it again — unless the machine changed
(another host name, CPU count or RAM size in the same data directory).

The figure is STREAM's "copy" convention: bytes read plus bytes written per
second. Decoding a token reads the weights once, so the planner compares
this figure with bytes read per token; the copy rate is the closer stand-in
on small machines, where a single thread already saturates the memory bus
and writes cost about as much as reads.

Not for: GPU memory bandwidth (NVML gives bus width and clock; see
:mod:`qmesh.daemon.telemetry`) or anything run per request.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import platform
import threading
import time
from pathlib import Path
from typing import Any, Final

import attrs
import psutil

__all__ = ["BandwidthResult", "cached_bandwidth", "measure_bandwidth"]

log = logging.getLogger(__name__)

CACHE_NAME: Final = "membench.json"
BUFFER_BYTES: Final = 64 * 1024 * 1024
"""Per thread: far beyond any CPU cache, so the copy goes to DRAM."""
ROUNDS: Final = 3
COPIES_PER_ROUND: Final = 3


@attrs.frozen
class BandwidthResult:
    gbps: float
    """Copy bandwidth in GB/s (10⁹ bytes, read + written)."""
    threads: int
    """Thread count that reached it."""
    measured_at: float
    seconds: float
    """How long the measurement took."""
    cached: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "gbps": round(self.gbps, 3),
            "threads": self.threads,
            "measured_at": self.measured_at,
            "seconds": round(self.seconds, 3),
            "cached": self.cached,
            "method": "memmove copy, (read + written bytes) / s, best of threads",
        }


def _copy_rate(threads: int, size: int) -> float:
    """Best bytes/s over ROUNDS rounds of ``threads`` threads copying ``size`` bytes."""
    pairs = [(ctypes.create_string_buffer(size), ctypes.create_string_buffer(size))]
    pairs += [
        (ctypes.create_string_buffer(size), ctypes.create_string_buffer(size))
        for _ in range(threads - 1)
    ]
    for dst, src in pairs:  # touch every page first: first-touch faults are not bandwidth
        ctypes.memmove(dst, src, size)

    def work(dst: ctypes.Array[ctypes.c_char], src: ctypes.Array[ctypes.c_char]) -> None:
        # ctypes releases the GIL around foreign calls, so threads copy in parallel.
        for _ in range(COPIES_PER_ROUND):
            ctypes.memmove(dst, src, size)

    best = 0.0
    for _ in range(ROUNDS):
        workers = [threading.Thread(target=work, args=pair) for pair in pairs]
        start = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        elapsed = time.perf_counter() - start
        best = max(best, 2 * size * COPIES_PER_ROUND * threads / elapsed)
    return best


def measure_bandwidth(*, size: int = BUFFER_BYTES, max_threads: int | None = None) -> BandwidthResult:
    """Measure now (blocking: run it in a worker thread from Trio code)."""
    started = time.perf_counter()
    limit = max_threads or min(os.cpu_count() or 1, 8)
    best, best_threads, threads = 0.0, 1, 1
    while threads <= limit:
        rate = _copy_rate(threads, size)
        if rate > best:
            best, best_threads = rate, threads
        elif rate < best * 0.9:
            break  # more threads only fight over the bus from here on
        threads *= 2
    return BandwidthResult(
        gbps=best / 1e9,
        threads=best_threads,
        measured_at=time.time(),
        seconds=time.perf_counter() - started,
    )


def _fingerprint() -> dict[str, Any]:
    return {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "ram_total": psutil.virtual_memory().total,
    }


def cached_bandwidth(directory: Path, *, remeasure: bool = False) -> BandwidthResult:
    """The cached figure for this machine, measuring (and caching) it if needed."""
    path = directory / CACHE_NAME
    fingerprint = _fingerprint()
    if not remeasure:
        try:
            data = json.loads(path.read_text())
            if data.get("machine") == fingerprint and float(data["gbps"]) > 0:
                return BandwidthResult(
                    gbps=float(data["gbps"]),
                    threads=int(data["threads"]),
                    measured_at=float(data["measured_at"]),
                    seconds=float(data["seconds"]),
                    cached=True,
                )
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable %s (%s); measuring again", path, exc)
    result = measure_bandwidth()
    log.info(
        "host memory bandwidth: %.1f GB/s (copy, %d thread(s), %.2fs)",
        result.gbps,
        result.threads,
        result.seconds,
    )
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**result.to_json(), "machine": fingerprint}))
        tmp.replace(path)
    except OSError as exc:
        log.warning("cannot cache the memory bandwidth in %s: %s", path, exc)
    return result
