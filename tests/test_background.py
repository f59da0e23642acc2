"""The niced background thread the ledger writes from."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import trio
import trio.testing

from qmesh import _core
from qmesh.background import (
    NICENESS,
    SATURATED_S,
    TURNS_WINDOW_S,
    BackgroundThread,
    loop_takes_turns,
    make_way,
)


async def test_a_job_runs_in_a_thread_of_lower_priority_and_returns_its_result() -> None:
    worker = BackgroundThread("test worker")

    def where() -> tuple[int, int]:
        tid = threading.get_native_id()
        return tid, os.getpriority(os.PRIO_PROCESS, tid)

    tid, niceness = await worker.run(where)
    ours = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert tid != threading.get_native_id()
    assert niceness == min(19, ours + NICENESS)
    assert (await worker.run(where))[0] == tid, "one thread, kept"


async def test_the_thread_has_the_kernels_time_slice_not_its_starters() -> None:
    """The event loop's thread asks for a short time slice, so that woken it
    preempts bulk work; the thread it starts for that work gives it up."""
    if not _core.request_time_slice(0.0005):
        pytest.skip("the kernel keeps no time slice of a thread's own (Linux 6.12 on)")
    try:
        worker = BackgroundThread("test worker")

        def own_slice() -> int:
            sched = Path(f"/proc/self/task/{threading.get_native_id()}/sched").read_text()
            (line,) = (line for line in sched.splitlines() if line.startswith("se.slice"))
            return int(line.split(":")[1])

        assert own_slice() == 500_000
        assert await worker.run(own_slice) != 500_000
    finally:
        _core.request_time_slice(None)


async def test_a_jobs_exception_reaches_its_caller_and_the_thread_serves_on() -> None:
    worker = BackgroundThread("test worker")

    def fail() -> None:
        raise ValueError("no such row")

    with pytest.raises(ValueError, match="no such row"):
        await worker.run(fail)
    assert await worker.run(lambda: 42) == 42


async def test_a_cancelled_caller_still_waits_for_its_job_and_gets_its_result() -> None:
    worker = BackgroundThread("test worker")
    started, release = threading.Event(), threading.Event()
    finished: list[str] = []

    def slow() -> str:
        started.set()
        release.wait()
        finished.append("written")
        return "written"

    got: list[str] = []
    scope = trio.CancelScope()

    async def call() -> None:
        with scope:
            got.append(await worker.run(slow))
            await trio.lowlevel.checkpoint()  # where the cancellation lands
            got.append("not reached")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(call)
        await trio.to_thread.run_sync(started.wait)
        scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert not got, "it waits for the job, cancelled or not"
        release.set()
    assert scope.cancelled_caught
    assert got == ["written"] and finished == ["written"]


async def test_jobs_run_in_the_order_they_were_given() -> None:
    worker = BackgroundThread("test worker")
    order: list[int] = []

    async with trio.open_nursery() as nursery:
        for n in range(20):
            nursery.start_soon(worker.run, lambda n=n: order.append(n))
            await trio.lowlevel.checkpoint()
    assert order == list(range(20))


async def test_an_event_loop_makes_way_only_while_a_job_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A loop calls make_way between rounds: once it has worked a while
    without waiting, it hands the core on (sched_yield) while a background
    job runs, and costs nothing otherwise."""
    yields: list[bool] = []
    monkeypatch.setattr(os, "sched_yield", lambda: yields.append(True))
    worker = BackgroundThread("test worker")
    await worker.run(lambda: None)
    assert not worker.running
    make_way(SATURATED_S)
    assert yields == []
    assert loop_takes_turns(), "a loop made way just now"
    started, release = threading.Event(), threading.Event()

    def held() -> None:
        started.set()
        release.wait()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(worker.run, held)
        await trio.to_thread.run_sync(started.wait)
        assert worker.running
        make_way(SATURATED_S / 2)
        assert yields == [], "a loop that waited just now keeps the core"
        make_way(SATURATED_S)
        assert yields == [True]
        release.set()
    assert not worker.running
    make_way(SATURATED_S)
    assert yields == [True]


def test_a_job_takes_turns_only_while_a_loop_makes_way(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    make_way(SATURATED_S)
    assert loop_takes_turns()
    now[0] += TURNS_WINDOW_S
    assert not loop_takes_turns(), "no loop made way lately: the engine is on threads"
    make_way(SATURATED_S / 2)
    assert not loop_takes_turns(), "a loop that waits often takes no turns"
