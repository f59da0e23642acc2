"""The registry of the Gates that share one state.

Each Gate owns one row of ``gates``, keyed by ``gate.name``: where its
tunnel and HTTP API listen, the host it runs on, when it started, its last
heartbeat, how many edge sessions it holds, and the silence after which it
counts as gone (its own ``gate.cluster.gone_after_s``, so that every reader
applies the same deadline). A row is never deleted: a Gate that stopped
cleanly says so (``stopped_at``), and one that died (``kill -9``, a lost
host) is *gone* as soon as its heartbeat is older than its deadline — a
state computed by whoever reads, so it needs no survivor to notice.

A name belongs to one running Gate. A second Gate that starts with the name
of a live Gate listening elsewhere is refused with a message that says so;
the same Gate restarted (same host, same tunnel address) takes its row
back, even before its old heartbeat has gone stale, as a restart after
``kill -9`` does. Each process holds a random ``instance`` id, so a Gate
whose row was taken while it was silent notices and says so.

Heartbeats do not wake the other Gates' state watchers (they change nothing
a Gate reacts to); registering and stopping do.

Not for: edges choosing a Gate (:mod:`qmesh.tunnel.client`) or serving
requests through another Gate.
"""

from __future__ import annotations

import logging
import secrets
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any, Final, Literal

import attrs
import trio

from qmesh import __version__
from qmesh.cluster.errors import GateNameInUse
from qmesh.config import ClusterConfig
from qmesh.state import DATABASE_ERRORS, StateError, StateStore

__all__ = ["GateRecord", "GateRegistry", "GateState", "list_gates", "request_drain"]

log = logging.getLogger(__name__)

GateState = Literal["live", "draining", "gone", "stopped"]

_COLUMNS: Final = (
    "name, instance, tunnel, http, host, version, started_at, heartbeat_at, gone_after_s,"
    " sessions, stopped_at"
)
_READ_COLUMNS: Final = _COLUMNS + ", drain_requested_at"
_STOP_TIMEOUT_S: Final = 2.0
"""How long a stopping Gate tries to mark its row stopped (the database
may be why it stops)."""


@attrs.frozen
class GateRecord:
    name: str
    instance: str
    tunnel: str
    http: str
    host: str
    version: str
    started_at: float
    heartbeat_at: float
    gone_after_s: float
    sessions: int
    stopped_at: float | None
    drain_requested_at: float | None = None

    def state(self, now: float) -> GateState:
        if self.stopped_at is not None:
            return "stopped"
        if now - self.heartbeat_at > self.gone_after_s:
            return "gone"
        return "draining" if self.drain_requested_at is not None else "live"

    def to_json(self, now: float) -> dict[str, object]:
        return {
            "name": self.name,
            "state": self.state(now),
            "tunnel": self.tunnel,
            "http": self.http,
            "host": self.host,
            "version": self.version,
            "started_at": self.started_at,
            "heartbeat_at": self.heartbeat_at,
            "heartbeat_age_s": round(max(0.0, now - self.heartbeat_at), 3),
            "gone_after_s": self.gone_after_s,
            "sessions": self.sessions,
            "stopped_at": self.stopped_at,
            "drain_requested_at": self.drain_requested_at,
        }


def list_gates(store: StateStore) -> list[GateRecord]:
    """Every Gate that ever registered in ``store``, by name."""
    with store._read() as conn:
        rows = conn.execute(f"SELECT {_READ_COLUMNS} FROM gates ORDER BY name").fetchall()
    return [_record(row) for row in rows]


def _record(row: Sequence[Any]) -> GateRecord:
    name, instance, tunnel, http, host, version, started, beat, gone, sessions, stopped = row[:11]
    drain = row[11] if len(row) > 11 else None
    return GateRecord(
        name, instance, tunnel, http, host, version, float(started), float(beat), float(gone),
        int(sessions), None if stopped is None else float(stopped),
        None if drain is None else float(drain),
    )  # fmt: skip


def request_drain(store: StateStore, name: str) -> bool:
    """Ask the live Gate ``name`` to drain (it sees it at its next
    heartbeat); False when no live Gate has that name."""
    with store._write() as conn:
        row = conn.execute(f"SELECT {_READ_COLUMNS} FROM gates WHERE name = ?", (name,)).fetchone()
        if row is None or _record(row).state(time.time()) not in ("live", "draining"):
            return False
        conn.execute("UPDATE gates SET drain_requested_at = ? WHERE name = ?", (time.time(), name))
        store._record(conn, "gates.drain", {"gate": name})
    return True


class GateRegistry:
    """One Gate's row: :meth:`run` registers it, heartbeats, and marks it stopped."""

    def __init__(
        self,
        store: StateStore,
        settings: ClusterConfig,
        *,
        name: str,
        tunnel: str,
        http: str,
        sessions: Callable[[], int],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.settings = settings
        self.name = name
        self.tunnel = tunnel
        self.http = http
        self.host = socket.gethostname()
        self.instance = secrets.token_hex(8)
        self._sessions = sessions
        self._clock = clock
        self._displaced = False
        self.drain_requested = trio.Event()
        """Set when ``qmesh gates drain`` asked this Gate to drain."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Register (GateNameInUse if another live Gate holds the name), then
        heartbeat until cancelled; a clean stop marks the row stopped."""
        await trio.to_thread.run_sync(self._register)
        log.info("gate %r registered in the cluster (%s)", self.name, self.store.location)
        task_status.started()
        try:
            while True:
                await trio.sleep(self.settings.heartbeat_interval_s)
                sessions = self._sessions()
                try:
                    if await trio.to_thread.run_sync(self._beat, sessions):
                        self.drain_requested.set()
                except (StateError, *DATABASE_ERRORS) as exc:
                    # The database may be failing over: keep serving, keep trying.
                    log.warning("gate heartbeat not written: %s", exc)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(_STOP_TIMEOUT_S):
                try:
                    await trio.to_thread.run_sync(self._stopped)
                except (StateError, *DATABASE_ERRORS) as exc:
                    log.warning("cannot mark gate %r stopped: %s", self.name, exc)

    def _register(self) -> None:
        now = self._clock()
        with self.store._write() as conn:
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM gates WHERE name = ?", (self.name,)
            ).fetchone()
            if row is not None:
                other = _record(row)
                restarted = other.host == self.host and other.tunnel == self.tunnel
                if other.state(now) == "live" and not restarted:
                    raise GateNameInUse(
                        f"gate name {self.name!r} is held by a live Gate at {other.tunnel} on "
                        f"{other.host} (heartbeat {max(0.0, now - other.heartbeat_at):.1f} s ago); "
                        "give each Gate its own gate.name"
                    )
            conn.execute(
                "INSERT INTO gates (" + _COLUMNS + ") VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 0, NULL)"
                " ON CONFLICT (name) DO UPDATE SET instance = excluded.instance,"
                " tunnel = excluded.tunnel, http = excluded.http, host = excluded.host,"
                " version = excluded.version, started_at = excluded.started_at,"
                " heartbeat_at = excluded.heartbeat_at, gone_after_s = excluded.gone_after_s,"
                " sessions = 0, stopped_at = NULL, drain_requested_at = NULL",
                (self.name, self.instance, self.tunnel, self.http, self.host, __version__, now,
                 now, self.settings.gone_after_s),
            )  # fmt: skip
            # Sessions and connections counted by an earlier run of this Gate
            # ended with it.
            conn.execute("DELETE FROM app_sessions WHERE gate = ?", (self.name,))
            conn.execute("DELETE FROM pool_connections WHERE gate = ?", (self.name,))

    def _beat(self, sessions: int) -> bool:
        """Write the heartbeat; whether a drain was asked for."""
        with self.store._write(announce=False) as conn:
            updated = conn.execute(
                "UPDATE gates SET heartbeat_at = ?, sessions = ? WHERE name = ? AND instance = ?",
                (self._clock(), sessions, self.name, self.instance),
            ).rowcount
            drain = conn.execute(
                "SELECT drain_requested_at FROM gates WHERE name = ? AND instance = ?",
                (self.name, self.instance),
            ).fetchone()
        if updated == 0 and not self._displaced:
            self._displaced = True
            log.error(
                "gate name %r was taken by another Gate while this one was silent; "
                "give each Gate its own gate.name",
                self.name,
            )
        return drain is not None and drain[0] is not None

    def _stopped(self) -> None:
        with self.store._write() as conn:
            conn.execute(
                "UPDATE gates SET stopped_at = ?, sessions = 0 WHERE name = ? AND instance = ?",
                (self._clock(), self.name, self.instance),
            )
