"""Starts llama.cpp's OpenAI-compatible server so that it dies with its daemon.

For: ``python -m qmesh.daemon.runtimes.model_server DAEMON_PID ARGS…``, run
by :class:`~qmesh.daemon.runtimes.llamacpp.LlamaCppRuntime` for each model.
It starts a thread that waits for the daemon *process* to exit (a pidfd on
Linux; elsewhere, or where pidfds are refused, it watches for this process
being re-parented) and then kills this process, and runs
:func:`~qmesh.daemon.runtimes.llama_server.serve` with ARGS (``llama_cpp.server``'s
command line). A daemon killed with ``kill -9`` cannot stop
its model servers itself, and an orphaned server would hold the model's
memory forever; this way the memory comes back with the daemon's death. If
the daemon is already gone by the time this runs, it exits at once.

Not ``prctl(PR_SET_PDEATHSIG)``: that signal follows the *thread* that
forked, not the process, and the daemon forks from a Trio worker thread
(``trio.lowlevel.open_process`` runs ``Popen`` there), which exits after
10 s idle — killing a healthy model server in the middle of a request.

Not for: serving (:mod:`~qmesh.daemon.runtimes.llama_server`) — the watch
starts before llama.cpp is imported, so a daemon that dies while a large
model loads still takes the server with it.
"""

from __future__ import annotations

import os
import select
import sys
import threading
import time

REPARENT_POLL_S = 0.5
"""Without a pidfd there is no event for a parent's death: how often to look."""


def _watch(parent: int) -> None:
    """Exit this process (and every thread of it) once ``parent`` has exited."""
    try:
        pidfd: int | None = os.pidfd_open(parent)
    except (AttributeError, OSError):  # not Linux ≥ 5.3, or refused (seccomp)
        pidfd = None
    # Checked after opening: while the daemon is still our parent its pid
    # cannot have been reused, so the pidfd is the daemon's.
    if os.getppid() != parent:
        sys.exit("the daemon exited before its model server started")

    def wait_then_exit() -> None:
        if pidfd is not None:
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)  # readable once the process has exited
            poller.poll()
        else:
            while os.getppid() == parent:
                time.sleep(REPARENT_POLL_S)
        os._exit(1)  # now, whatever llama.cpp's threads are doing

    threading.Thread(target=wait_then_exit, name="qmesh-daemon-watch", daemon=True).start()


def main() -> None:
    parent, args = int(sys.argv[1]), sys.argv[2:]
    _watch(parent)
    from qmesh.daemon.runtimes.llama_server import serve  # after the watch: imports llama_cpp

    serve(args)


if __name__ == "__main__":
    main()
