"""Stopping gracefully: what a process does between SIGTERM and its end.

For: :func:`on_drain`, by which a role registers how it drains (a Gate:
refuse new sessions and requests, send its edges to the cluster's other
Gates, let requests in flight finish up to ``gate.drain_timeout_s``), and
:func:`drain`, which the command line's runner awaits when SIGTERM arrives,
before it cancels everything (a second SIGTERM cancels at once). A role
that registers nothing stops as before.

Not for: what a role does to drain (its own package) or signals
(:mod:`qmesh.cli.runner`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

__all__ = ["drain", "on_drain"]

_steps: list[Callable[[], Awaitable[None]]] = []


def on_drain(step: Callable[[], Awaitable[None]]) -> Callable[[], None]:
    """Run ``step`` when the process is asked to stop; the returned function
    unregisters it (a role that ended must not be drained)."""
    _steps.append(step)
    return lambda: _steps.remove(step) if step in _steps else None


async def drain() -> None:
    """Every registered step, at once; returns when all are done."""
    async with trio.open_nursery() as nursery:
        for step in list(_steps):
            nursery.start_soon(step)
