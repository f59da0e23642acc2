"""The Gate's state watcher (qmesh.state.watch): subscribers run once per
change made by another process, and one that fails is called again without
another change until it succeeds, with one warning and no traceback.

A real SQLite state store, changed through a second connection as ``qmesh``
commands change it; waits are on events, with generous deadlines.
"""

from __future__ import annotations

import errno
import logging
from pathlib import Path

import pytest
import trio

from qmesh.state import StateStore
from qmesh.state.watch import StateWatcher

DEADLINE_S = 20.0


async def test_a_subscriber_that_failed_is_called_again_until_it_succeeds(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="qmesh.state.watch")
    store = StateStore.open(tmp_path / "state.db")
    watcher = StateWatcher(store, interval_s=0.01)
    calls = {"keys": 0, "apps": 0}
    succeeded = trio.Event()

    async def reload_keys() -> None:
        calls["keys"] += 1
        if calls["keys"] <= 2:  # a process out of descriptors, twice
            raise OSError(errno.EMFILE, "Too many open files")
        succeeded.set()

    async def refresh_apps() -> None:
        calls["apps"] += 1

    watcher.subscribe("keys", reload_keys)
    watcher.subscribe("apps", refresh_apps)
    async with trio.open_nursery() as nursery:
        await nursery.start(watcher.run)
        other = StateStore.open(tmp_path / "state.db")  # `qmesh apps add` in a shell
        other.add_app("billing")
        other.close()
        with trio.fail_after(DEADLINE_S):
            await succeeded.wait()
        nursery.cancel_scope.cancel()
    store.close()

    # One change: the subscriber that succeeded ran once, the other till it did.
    assert (calls["apps"], calls["keys"], watcher.changes_seen) == (1, 3, 1)
    records = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert [(r.levelname, r.getMessage()) for r in records] == [
        (
            "WARNING",
            "state change subscriber keys failed (OSError: [Errno 24] Too many open files);"
            " it is called again until it succeeds",
        ),
        ("INFO", "state change subscriber keys succeeded again"),
    ]
    assert all(r.exc_info is None for r in records)
