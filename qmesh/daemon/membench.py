"""Host memory bandwidth, measured once with a read benchmark and cached.

For: :func:`measure_bandwidth` (about a second of scanning 256 MiB buffers
with libc's ``memchr`` on 1, 2, 4… threads; the median of three rounds per
thread count, the best thread count wins, and the rate at each thread count
is kept) and :func:`cached_bandwidth`, which
keeps the result in the data directory so a restarted daemon does not pay
for it again — unless the machine changed (another host name, CPU count or
RAM size in the same data directory).

Why reads: decoding a token reads every weight once and writes almost
nothing, so the planner divides *read* bandwidth by bytes read per token.
``memchr`` over a zero-filled buffer is a SIMD scan that only reads, and
ctypes releases the GIL around it, so threads scan in parallel the way
llama.cpp's threads stream weights.

Not for: GPU memory bandwidth (NVML gives bus width and clock; see
:mod:`qmesh.daemon.telemetry`) or anything run per request.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import os
import platform
import statistics
import threading
import time
from pathlib import Path
from typing import Any, Final

import attrs
import psutil

__all__ = ["BandwidthResult", "cached_bandwidth", "measure_bandwidth"]

log = logging.getLogger(__name__)

CACHE_NAME: Final = "membench.json"
BUFFER_BYTES: Final = 256 * 1024 * 1024
"""Per thread. Server L3 caches reach hundreds of MiB (this development VM
reports 300 MiB); with two or more threads the scans leave the cache and
read DRAM. Smaller when RAM is short (a quarter of what is available)."""
ROUNDS: Final = 3
SCANS_PER_ROUND: Final = 2


@attrs.frozen
class BandwidthResult:
    gbps: float
    """Read bandwidth in GB/s (10⁹ bytes), the best over thread counts."""
    threads: int
    """Thread count that reached it."""
    by_threads: dict[int, float]
    """GB/s at each thread count tried."""
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
            "by_threads": {str(k): round(v, 3) for k, v in self.by_threads.items()},
            "method": "memchr scans of 256 MiB per thread (bytes read / s), median of 3 "
            "rounds, best thread count",
        }

    def at_threads(self, threads: int | None) -> float:
        """GB/s with ``threads`` threads (the nearest count measured), or the best."""
        if not threads or not self.by_threads:
            return self.gbps
        nearest = min(self.by_threads, key=lambda k: (abs(k - threads), -k))
        return self.by_threads[nearest]


def _libc_memchr() -> Any:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
    memchr = libc.memchr
    memchr.restype = ctypes.c_void_p
    memchr.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    return memchr


def _read_rate(threads: int, size: int) -> float:
    """Median bytes/s over ROUNDS rounds of ``threads`` threads each scanning
    ``size`` bytes: on a shared machine a lucky round (a neighbour idle, the
    buffer still in cache) must not become the node's figure."""
    memchr = _libc_memchr()
    buffers = [ctypes.create_string_buffer(size) for _ in range(threads)]
    for buffer in buffers:  # fault every page in first: page faults are not bandwidth
        ctypes.memset(buffer, 0, size)

    def work(buffer: ctypes.Array[ctypes.c_char]) -> None:
        for _ in range(SCANS_PER_ROUND):
            # Looking for a byte that is not there reads the whole buffer.
            memchr(buffer, 1, size)

    rates = []
    for _ in range(ROUNDS):
        workers = [threading.Thread(target=work, args=(b,)) for b in buffers]
        start = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        elapsed = time.perf_counter() - start
        rates.append(size * SCANS_PER_ROUND * threads / elapsed)
    return statistics.median(rates)


def measure_bandwidth(
    *, size: int = BUFFER_BYTES, max_threads: int | None = None
) -> BandwidthResult:
    """Measure now (blocking: run it in a worker thread from Trio code)."""
    started = time.perf_counter()
    limit = max_threads or min(os.cpu_count() or 1, 8)
    size = min(size, max(psutil.virtual_memory().available // (4 * limit), 16 * 1024 * 1024))
    best, best_threads, threads = 0.0, 1, 1
    by_threads: dict[int, float] = {}
    while threads <= limit:
        rate = _read_rate(threads, size)
        by_threads[threads] = rate / 1e9
        if rate > best:
            best, best_threads = rate, threads
        elif rate < best * 0.9:
            break  # more threads only fight over the bus from here on
        threads *= 2
    return BandwidthResult(
        gbps=best / 1e9,
        threads=best_threads,
        by_threads=by_threads,
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
                    by_threads={int(k): float(v) for k, v in data["by_threads"].items()},
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
        "host memory bandwidth: %.1f GB/s (read, %d thread(s), measured in %.2fs)",
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
