"""What the benchmarks share: stopping the processes they start, and the
CPU time they used.

Not for: measuring anything else; each benchmark is its own script.
"""

from __future__ import annotations

import signal
import subprocess
from typing import Any

__all__ = ["cpu_seconds", "stop"]


def cpu_seconds(pid: int | None, *, children: bool = False) -> float:
    """User + system CPU seconds a running process used so far, all its
    threads; with ``children``, its descendants' too (a server that forks
    workers). 0.0 for None or a process that is gone."""
    if pid is None:
        return 0.0
    import psutil

    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)] if children else [root]
        total = 0.0
        for process in processes:
            times = process.cpu_times()
            total += times.user + times.system
        return total
    except psutil.Error:
        return 0.0


def stop(
    process: subprocess.Popen[Any], *, sig: int = signal.SIGTERM, timeout: float = 15.0
) -> None:
    """Ask ``process`` to stop with ``sig`` (SIGTERM, as systemd stops a role:
    SIGINT is ignored by a process started from a non-interactive shell's
    background job); kill -9 if it has not stopped in ``timeout``."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
