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
them, one at a time, and a failing subscriber is logged and never stops the
others or the Gate.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from qmesh.state import StateStore

log = logging.getLogger(__name__)

Subscriber = Callable[[], Awaitable[None]]

DEFAULT_INTERVAL_S = 0.1


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
        while True:
            with trio.move_on_after(self.interval_s):
                await self._poke.wait()
            self._poke = trio.Event()
            current = await self._marker()
            if current != marker:
                marker = current
                self.changes_seen += 1
                await self.notify()

    async def notify(self) -> None:
        """Run every subscriber once, in the order they subscribed."""
        for name, callback in self._subscribers:
            try:
                await callback()
            except Exception:
                log.exception("state change subscriber %s failed", name)

    async def _marker(self) -> tuple[int, int]:
        return await trio.to_thread.run_sync(self.store.change_marker, limiter=self._limiter)
