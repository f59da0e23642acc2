"""Starts llama.cpp's OpenAI-compatible server so that it dies with its daemon.

For: ``python -m qmesh.daemon.runtimes.model_server DAEMON_PID ARGS…``, run
by :class:`~qmesh.daemon.runtimes.llamacpp.LlamaCppRuntime` for each model.
On Linux it asks the kernel to SIGKILL this process when the daemon dies
(``prctl(PR_SET_PDEATHSIG)``), then runs ``llama_cpp.server`` with ARGS. A
daemon killed with ``kill -9`` cannot stop its model servers itself, and an
orphaned server would hold the model's memory forever; this way the memory
comes back with the daemon's death. If the daemon is already gone by the
time this runs, it exits at once.

Not for: anything else — it imports only the standard library before
handing over, so it starts as fast as the server itself.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import runpy
import signal
import sys

PR_SET_PDEATHSIG = 1


def main() -> None:
    parent, args = int(sys.argv[1]), sys.argv[2:]
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    # Checked after prctl: a daemon that died before it would never signal us.
    if os.getppid() != parent:
        sys.exit("the daemon exited before its model server started")
    sys.argv = ["llama_cpp.server", *args]
    runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
