"""A thread of its own, at a lower CPU priority, for bookkeeping that must
not compete with the event loop.

For: :class:`BackgroundThread`, whose :meth:`~BackgroundThread.run` runs a
blocking function there and waits for it, as ``trio.to_thread.run_sync``
would. The Gate's ledger writes its batches there: on a Gate with one core,
a batch of hundreds of rows written at the event loop's priority took the
core from requests in flight for milliseconds at a time (measured with
``bench/gateway.py``, paired rounds: at 64 connections, 14,000 req/s and
p99 10.6 ms with the writes in Trio's worker threads, about 18,000 req/s
and 7.8 ms with them niced). Niced, the writes take the time the loop
leaves idle, and the loop's requests go first. If they fall behind all the
same (the HTTP fast path relays faster than the writer's share of a
saturated core writes), the HTTP server waits for the ledger's next batch
before taking more requests (``Ledger.backlog``; an inline engine's rounds
for a moment each). And
:func:`make_way`, which an event loop that never sleeps calls between
rounds of its work, so that a job running here gets the core in short
turns rather than the kernel's ticks.

Not for: work a request waits on (it would wait longer), or anything that
must run at a given time.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Final, TypeVar

import outcome
import trio

from qmesh import _core

__all__ = ["BackgroundThread", "loop_takes_turns", "make_way"]

log = logging.getLogger(__name__)

T = TypeVar("T")

NICENESS: Final = 5
"""How much lower its priority is than the process's. Linux gives a thread
5 nice levels below another about a quarter of a core they both want: the
ledger's writer needs about a seventh at 18,000 requests a second, so it
keeps up; at 10 (a tenth) it fell behind in a sustained run until the
ledger was full and refused requests."""


SATURATED_S: Final = 0.001
"""How long an event loop must have worked without waiting for its turns
to start (:func:`make_way`): a loop that waits more often than that gives
a job the core while it waits, and wakes it with a short time slice that
preempts the job (``qmesh/cli/runner.py``)."""
TURNS_WINDOW_S: Final = 0.1
"""How recently an event loop must have made way for a job to count on
getting the core between its rounds (:func:`loop_takes_turns`)."""

_THREADS: Final[list[BackgroundThread]] = []


class _Turns:
    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last = -math.inf
        """When an event loop last made way (``time.monotonic()``)."""


_TURNS: Final = _Turns()


def make_way(busy_s: float) -> None:
    """Give up the core once if a background thread is running a job: for
    an event loop between two rounds of its work, ``busy_s`` since it last
    waited for work; before :data:`SATURATED_S`, it keeps the core (a
    request that just woke it is not held up behind a job's turn).

    Why: a kernel that ticks at 250 Hz (this project's test machines') does
    not preempt a thread that never sleeps between ticks, so a niced thread
    beside a saturated loop ran up to 4 ms at a time (measured with ``perf
    sched timehist``), and every request in flight waited it out. A job
    that hands the core back after each short piece of work (the ledger's
    inserts, a statement at a time, while :func:`loop_takes_turns`) runs one
    piece here, between rounds."""
    if busy_s < SATURATED_S:
        return
    _TURNS.last = time.monotonic()
    for thread in _THREADS:
        if thread.running:
            os.sched_yield()
            return


def loop_takes_turns() -> bool:
    """Whether a saturated event loop made way lately: a job may then hand the core
    back after each short piece of its work and get the next piece between
    the loop's rounds. Without one (the HTTP engine on threads of its own,
    which never make way), a job that hands the core back waits for the
    kernel's next tick each time, falls behind and holds requests up longer
    (paired wrk runs on the engine threads: p99 15.3 ms against 13.4)."""
    return time.monotonic() - _TURNS.last < TURNS_WINDOW_S


class BackgroundThread:
    """One daemon thread running jobs in order; started on first use and
    kept for the life of the process (jobs of any Trio run may use it)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.running = False
        """A job is running (written by the thread, read by :func:`make_way`)."""
        _THREADS.append(self)
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        # A forked child has no such thread: it starts its own when it needs one.
        os.register_at_fork(after_in_child=self._forget)

    async def run(self, fn: Callable[[], T]) -> T:
        """``fn()`` in the thread; its result or exception. Like
        ``trio.to_thread.run_sync``, it is not abandoned when cancelled: it
        returns once ``fn`` is done, and a cancellation reaches the caller
        at its next checkpoint (so a caller can record what ``fn`` did)."""
        self._start()
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        result: list[outcome.Outcome[T]] = []

        def job() -> None:
            self.running = True
            result.append(outcome.capture(fn))
            self.running = False  # before its caller hears of it
            try:
                token.run_sync_soon(done.set)
            except trio.RunFinishedError:
                pass  # its caller's Trio run ended: nobody waits for it now

        self._jobs.put(job)
        with trio.CancelScope(shield=True):
            await done.wait()
        return result[0].unwrap()

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name=self.name, daemon=True)
                self._thread.start()

    def _forget(self) -> None:
        self.running = False
        self._jobs = queue.SimpleQueue()
        self._thread = None
        self._lock = threading.Lock()

    def _serve(self) -> None:
        tid = threading.get_native_id()
        try:
            # Relative to the process's own: a Gate started niced stays below.
            niceness = min(19, os.getpriority(os.PRIO_PROCESS, tid) + NICENESS)
            os.setpriority(os.PRIO_PROCESS, tid, niceness)
        except OSError as exc:  # a platform without per-thread priorities
            log.debug("%s: could not lower its priority: %s", self.name, exc)
        try:
            # Not the event loop's short time slice, which the thread
            # inherits from it: bulk work is what the loop's preempts.
            _core.request_time_slice(None)
        except OSError as exc:  # a kernel without sched_setattr
            log.debug("%s: could not take the kernel's time slice: %s", self.name, exc)
        while True:
            self._jobs.get()()
