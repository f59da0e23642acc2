"""How the running Gate learns that trust changed: it watches its state store.

Trust-changing commands (``qmesh revoke``, ``qmesh apps disable``,
``qmesh apps rotate-key``, ``qmesh sessions kill``) run as separate processes
that write the state database and exit. The Gate polls
:meth:`StateStore.change_marker` (SQLite's ``PRAGMA data_version``: no table
is read) every ``interval_s``; when it moves, every subscriber re-reads what
it depends on and acts — ends a revoked edge's sessions, forgets cached app
keys, terminates a disabled app's Postgres sessions. A change therefore
bites within one interval plus the subscribers' own work, well under a
second. Polling, not a notification channel, because SQLite has none across
processes; a PostgreSQL backend would use LISTEN/NOTIFY behind the same
interface.

Not for: deciding anything. Subscribers own their policy; this only wakes
them, one at a time. A failing subscriber never stops the others or the
Gate: it is logged and called again, without another change, until it
succeeds (backing off to :data:`RETRY_MAX_S`) — what it failed on (a key
file it could not open while the process was out of descriptors) may pass
in a moment, and the change it missed will not come again.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable

import trio

from qmesh.state import StateStore

log = logging.getLogger(__name__)

Subscriber = Callable[[], Awaitable[None]]

DEFAULT_INTERVAL_S = 0.1
RETRY_MAX_S = 5.0


class StateWatcher:
    """Calls its subscribers after every change to the state store."""

    def __init__(self, store: StateStore, *, interval_s: float = DEFAULT_INTERVAL_S) -> None:
        self.store = store
        self.interval_s = interval_s
        self._subscribers: list[tuple[str, Subscriber]] = []
        self._poke = trio.Event()
        # One thread at a time reads the marker, so a slow store (a long
        # write holding its lock) delays this check and nothing else.
        self._limiter = trio.CapacityLimiter(1)
        self.changes_seen = 0

    def subscribe(self, name: str, callback: Subscriber) -> None:
        """Call ``callback()`` after each change; ``name`` is for the log."""
        self._subscribers.append((name, callback))

    def poke(self) -> None:
        """Check now instead of at the next interval (after a change made in
        this process through the admin API)."""
        self._poke.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        marker = await self._marker()
        task_status.started()
        failing: list[tuple[str, Subscriber]] = []
        retry_s = self.interval_s
        retry_at = math.inf
        while True:
            with trio.move_on_after(self.interval_s):
                await self._poke.wait()
            self._poke = trio.Event()
            current = await self._marker()
            if current != marker:
                marker = current
                self.changes_seen += 1
                failing = await self._call(self._subscribers, failing)
                retry_s = self.interval_s
            elif trio.current_time() >= retry_at:
                failing = await self._call(failing, failing)
                retry_s = min(RETRY_MAX_S, retry_s * 2)
            else:
                continue
            retry_at = trio.current_time() + retry_s if failing else math.inf

    async def _call(
        self, subscribers: list[tuple[str, Subscriber]], failing: list[tuple[str, Subscriber]]
    ) -> list[tuple[str, Subscriber]]:
        """Run each of ``subscribers`` once, in order; those that failed."""
        failed = []
        for subscriber in subscribers:
            name, callback = subscriber
            try:
                await callback()
            except Exception as exc:
                failed.append(subscriber)
                if subscriber not in failing:
                    log.warning(
                        "state change subscriber %s failed (%s: %s); it is called again until"
                        " it succeeds", name, type(exc).__name__, exc,
                    )  # fmt: skip
                log.debug("state change subscriber %s failed", name, exc_info=True)
            else:
                if subscriber in failing:
                    log.info("state change subscriber %s succeeded again", name)
        return failed

    async def _marker(self) -> tuple[int, int]:
        return await trio.to_thread.run_sync(self.store.change_marker, limiter=self._limiter)
