"""What the benchmarks share: stopping the processes they start.

Not for: measuring anything; each benchmark is its own script.
"""

from __future__ import annotations

import signal
import subprocess
from typing import Any

__all__ = ["stop"]


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
