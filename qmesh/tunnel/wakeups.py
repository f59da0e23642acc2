"""Wake-ups from the tunnel engines: one descriptor and one task per Trio run,
however many sessions there are.

Each session's engine posts its key to the run's shared
:class:`qmesh._core.EngineNotifier` when it has frames or endings for Python;
the dispatcher task reads the keys and wakes those sessions' pumps. A
descriptor per session would double what each idle session costs against
the process's descriptor limit (the socket is the other one).
"""

from __future__ import annotations

import itertools

import trio

from qmesh import _core


class Wakeup:
    """An auto-resetting flag one task waits on."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = trio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self) -> None:
        """Return once set since the last wait returned."""
        await self._event.wait()
        # No checkpoint between the wait returning and the reset: a set()
        # cannot fall in between and be lost.
        self._event = trio.Event()


class EngineWakeups:
    """The run's notifier and who waits on each key."""

    def __init__(self) -> None:
        self.notifier = _core.EngineNotifier()
        self._waiting: dict[int, Wakeup] = {}
        self._keys = itertools.count(1)

    def register(self) -> tuple[int, Wakeup]:
        """A key for a new engine, and the flag its posts set."""
        key = next(self._keys)
        wakeup = Wakeup()
        self._waiting[key] = wakeup
        return key, wakeup

    def unregister(self, key: int) -> None:
        self._waiting.pop(key, None)

    async def dispatch(self) -> None:
        fd = self.notifier.fd
        while True:
            await trio.lowlevel.wait_readable(fd)
            for key in self.notifier.take():
                wakeup = self._waiting.get(key)
                if wakeup is not None:  # else the session ended meanwhile
                    wakeup.set()


_RUN_WAKEUPS: trio.lowlevel.RunVar[EngineWakeups] = trio.lowlevel.RunVar("qmesh_engine_wakeups")


def engine_wakeups() -> EngineWakeups:
    """This Trio run's wake-ups, started on first use. The dispatcher is a
    system task: it outlives every nursery of the run, as engines may."""
    try:
        return _RUN_WAKEUPS.get()
    except LookupError:
        wakeups = EngineWakeups()
        _RUN_WAKEUPS.set(wakeups)
        trio.lowlevel.spawn_system_task(wakeups.dispatch, name="qmesh engine wake-ups")
        return wakeups
