"""Server connections kept open at the Gate and lent to client sessions.

For: the pools of transaction mode (:mod:`qmesh.pg.multiplex`). A pool
holds the logged-in server connections of one app on one database alias
with one set of startup parameters, since a connection's startup
parameters (the read-only flag, the policy's statement_timeout, the
client's own settings) are part of what it is. A client borrows a
connection for one transaction and gives it back at ReadyForQuery idle.

- **Bounded**: at most ``size`` connections exist (open or being opened);
  a client that finds them all lent waits in line, first come first
  served, and gets SQLSTATE 53300 naming the pool after ``wait_s``. A
  returned connection goes straight to the head of the line.
- **Hygiene**: a connection that outlived ``server_lifetime_s`` is closed
  when it comes back, one idle longer than ``server_idle_timeout_s`` is
  closed by the reaper, and one idle longer than ``server_check_delay_s``
  answers an empty query before it is lent (a server restart or a
  ``pg_terminate_backend`` is found there, not by the client's statement).
- **Reset**: a connection that a client left in a state another client
  must not inherit (a session-level SET, LISTEN, a temporary table...) is
  given back with ``dirty``: it is rolled back and reset with ``DISCARD
  ALL`` (which also drops its prepared statements) before it is lent again.

Not for: which messages go where (:mod:`qmesh.pg.multiplex`), the login
itself (:mod:`qmesh.pg.login`).
"""

from __future__ import annotations

import logging
import math
import select
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from typing import Final

import attrs
import trio

from qmesh import _core
from qmesh.config import PgPoolConfig
from qmesh.fastsocket import fast
from qmesh.pg.login import PgSessionError, Upstream

__all__ = ["PoolBook", "PoolKey", "PoolStats", "ServerConn", "ServerPool"]

log = logging.getLogger(__name__)

CAP_RETRY_S: Final = 0.1
"""How often a client waiting under a cap shared with other Gates looks again."""
CHECK_TIMEOUT_S: Final = 5.0
"""The empty query of a health check, and the reset of a dirty connection."""
RECEIVE_SIZE: Final = 64 * 1024

_EMPTY_QUERY: Final = _core.encode_query(";")
_RESET: Final = _core.encode_query("ROLLBACK") + _core.encode_query("DISCARD ALL")
_READY: Final = ord("Z")
_ERROR: Final = ord("E")


@attrs.frozen
class PoolKey:
    """What makes two server connections interchangeable."""

    app_id: str
    alias: str
    params: tuple[tuple[str, str], ...]
    """The startup parameters the Gate logs in with (the password is not one)."""


@attrs.define(eq=False)
class ServerConn:
    """One logged-in server connection, lent to one client at a time."""

    stream: trio.abc.Stream
    key: tuple[int, bytes] | None = attrs.field(repr=False)
    """The server's BackendKeyData: where a client's cancel request goes."""
    opened_at: float
    last_used: float
    prepared: set[bytes] = attrs.field(factory=set)
    """Names of the statements qmesh prepared on it (see :mod:`qmesh.pg.multiplex`)."""
    leftover: bytes = b""
    """Server bytes read past the login's ReadyForQuery (normally none)."""
    dirty: bool = False
    """A client changed its session state: reset before it is lent again."""
    unnamed_owner: object | None = None
    """The client session whose unnamed statement the server holds (None:
    nobody's, or none): see :mod:`qmesh.pg.multiplex`."""

    def spoke_while_idle(self) -> bool:
        """Whether the server sent something (or closed) while nobody was
        talking to it: a FATAL from ``pg_terminate_backend`` or a shutdown,
        or a TLS record. Never blocks."""
        stream = self.stream
        sock = getattr(stream, "socket", None) or getattr(
            getattr(stream, "transport", None), "socket", None
        )
        if sock is None:
            return False
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN | select.POLLHUP | select.POLLERR)
        return bool(poller.poll(0))

    async def close(self) -> None:
        await trio.aclose_forcefully(self.stream)

    async def settle(self, queries: bytes, ready_count: int) -> bool:
        """Send ``queries`` and read until the ``ready_count``-th
        ReadyForQuery, idle; False (the connection is unusable) on an
        error, a broken connection or a slow server."""
        scanner = _core.PgScanner(frontend=False, full=b"EZ")
        readies = 0
        with trio.move_on_after(CHECK_TIMEOUT_S):
            try:
                await self.stream.send_all(queries)
                while True:
                    data = await self.stream.receive_some(RECEIVE_SIZE)
                    if not data:
                        return False
                    for tag, raw in scanner.feed(data):
                        if tag == _ERROR:  # the check or the reset did not do its job
                            return False
                        if tag == _READY:
                            readies += 1
                            if readies == ready_count:
                                idle = _core.parse_ready_for_query(raw[5:]) == "I"
                                return idle and not scanner.in_message
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, _core.PgWireError):
                return False
        return False


@attrs.frozen
class PoolStats:
    """One pool, as ``/metrics`` and ``qmesh pg pools`` show it."""

    app_id: str
    alias: str
    size: int
    open: int
    idle: int
    lent: int
    waiting: int
    longest_wait_s: float
    """How long the client first in line has waited (0: none waits)."""
    waits: int
    """Clients that had to wait, since the pool was created."""
    wait_s_total: float
    timeouts: int
    """Clients refused with 53300 after waiting ``wait_s``."""
    opened: int
    closed: int
    checks_failed: int


@attrs.define(eq=False)
class _Waiter:
    since: float
    event: trio.Event = attrs.field(factory=trio.Event)
    conn: ServerConn | None = None


Opener = Callable[[], Awaitable[Upstream]]


class ServerPool:
    """The server connections of one :class:`PoolKey`."""

    def __init__(
        self, key: PoolKey, opener: Opener, *, size: int, wait_s: float, settings: PgPoolConfig
    ) -> None:
        self.key = key
        self.size = size
        self.wait_s = wait_s
        self.settings = settings
        self.opener = opener
        """Logs in to the server; the newest login's credentials (a rotation)."""
        self.book: PoolBook | None = None
        """The Gate's pools, which share ``max_server_connections_per_alias``."""
        self._idle: deque[ServerConn] = deque()
        self._waiters: deque[_Waiter] = deque()
        self.count = 0
        """Connections open or being opened."""
        self.hello: list[bytes] | None = None
        """The ParameterStatus (and notice) messages of the pool's newest
        login: what a client is told at its own login."""
        self.waits = self.timeouts = self.opened = self.closed = self.checks_failed = 0
        self.wait_s_total = 0.0

    def describe(self) -> str:
        return f'the pool of app "{self.key.app_id}" on database alias "{self.key.alias}"'

    async def acquire(self) -> ServerConn:
        """A connection for one client: an idle one (checked if it idled
        long), a new one while there is room, else the first one given back
        while this client is first in line. Raises PgSessionError 53300
        after ``wait_s``, or the login's error."""
        started = trio.current_time()
        waited = False
        try:
            while True:
                conn = await self._take_idle()
                if conn is not None:
                    return conn
                if self.count < self.size:
                    self.count += 1  # this place is taken while the cap is asked
                    try:
                        room = self.book is None or await self.book.room_for(self)
                    except BaseException:
                        self.count -= 1
                        raise
                    if room:
                        return await self._new()
                    self.count -= 1
                if not waited:
                    waited = True
                    self.waits += 1
                conn = await self._wait_in_line(started)
                if conn is not None:
                    return conn
        finally:
            if waited:
                self.wait_s_total += trio.current_time() - started

    async def _take_idle(self) -> ServerConn | None:
        while self._idle:
            conn = self._idle.pop()  # the most recently used: its caches are warm
            idled = trio.current_time() - conn.last_used
            if idled > self.settings.server_check_delay_s or conn.spoke_while_idle():
                # Checked before it is lent: a server that restarted or ended
                # the connection is found here, not by the client's statement.
                with trio.CancelScope(shield=True):  # bounded by the check's timeout
                    healthy = await conn.settle(_EMPTY_QUERY, 1)
                    if not healthy:
                        self.checks_failed += 1
                        log.info("%s: an idle server connection failed its check; replaced",
                                 self.describe())  # fmt: skip
                        await self._discard(conn)
                        continue
            return conn
        return None

    async def _new(self) -> ServerConn:
        """Open a connection in the place :meth:`acquire` took for it."""
        try:
            upstream = await self.opener()
        except BaseException:
            self._gone()
            raise
        self.opened += 1
        now = trio.current_time()
        # The newest login's: a server restarted with another version or
        # setting is described as it is now.
        self.hello = [*upstream.notices, *upstream.statuses]
        return ServerConn(
            stream=fast(upstream.stream),
            key=upstream.key,
            opened_at=now,
            last_used=now,
            leftover=upstream.leftover,
        )

    async def _wait_in_line(self, started: float) -> ServerConn | None:
        """The connection handed over, or None when there is room to open one."""
        waiter = _Waiter(started)
        self._waiters.append(waiter)
        deadline = started + self.wait_s
        # Under a cap shared with other Gates, room they make is not
        # announced here: look again now and then (the count is asked at
        # most every CAP_RETRY_S per alias, however many wait).
        shared = self.book is not None and self.book.shares_a_cap
        wake = min(deadline, trio.current_time() + CAP_RETRY_S) if shared else deadline
        try:
            with trio.move_on_at(wake):
                await waiter.event.wait()
        except BaseException:
            self._leave_line(waiter)  # cancelled: what it was given goes on
            raise
        if waiter.event.is_set():
            return waiter.conn
        self._waiters.remove(waiter)
        if trio.current_time() < deadline:
            return None
        self.timeouts += 1
        raise PgSessionError(
            "53300",
            f"qmesh: no server connection became free within {self.wait_s:g} s in "
            f"{self.describe()} (pool_size = {self.size}); all are in use",
        )

    def _leave_line(self, waiter: _Waiter) -> None:
        if not waiter.event.is_set():
            self._waiters.remove(waiter)
        elif waiter.conn is not None:
            self.release(waiter.conn, reusable=True)
        else:
            self.wake_one()  # it was told to open a connection: the next one may

    def release(self, conn: ServerConn, *, reusable: bool) -> None:
        """Give ``conn`` back; a connection that is not ``reusable`` (broken,
        or left mid-transaction) is closed. Never blocks."""
        now = trio.current_time()
        conn.last_used = now
        too_old = now - conn.opened_at > self.settings.server_lifetime_s
        too_many = len(conn.prepared) > self.settings.max_prepared_per_server
        if not reusable or too_old or too_many or self.count > self.size:
            trio.lowlevel.spawn_system_task(conn.close)
            self._gone()
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.event.is_set():
                waiter.conn = conn
                waiter.event.set()
                return
        self._idle.append(conn)

    async def release_dirty(self, conn: ServerConn) -> None:
        """Roll back and reset ``conn`` (``DISCARD ALL``), then give it back;
        close it if that fails."""
        ok = await conn.settle(_RESET, 2)
        conn.prepared.clear()  # DISCARD ALL deallocated them
        conn.unnamed_owner = None
        conn.dirty = False
        self.release(conn, reusable=ok)

    def close_one_idle(self) -> bool:
        """Close the least recently used idle connection, to make room for
        another pool of the alias, which takes over its place under the
        cap; whether there was one."""
        if not self._idle:
            return False
        conn = self._idle.popleft()
        self.count -= 1
        self.closed += 1
        trio.lowlevel.spawn_system_task(conn.close)
        return True

    async def _discard(self, conn: ServerConn) -> None:
        self._gone()  # first: a cancelled close must not keep its place
        await conn.close()

    def _gone(self) -> None:
        """A connection closed (or failed to open): its place under the cap
        is free, and the first waiter may open a new one (here, or in
        another pool of the alias when they share a cap)."""
        self.count -= 1
        self.closed += 1
        if self.book is not None:
            self.book.closed_one(self)
        else:
            self.wake_one()

    def wake_one(self) -> bool:
        """Tell the first waiter to look again (and open a connection if it
        may); whether there was one."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.event.is_set():
                waiter.event.set()  # conn None: loop and open
                return True
        return False

    async def reap(self) -> None:
        """Close connections idle longer than ``server_idle_timeout_s``."""
        limit = self.settings.server_idle_timeout_s
        now = trio.current_time()
        keep = deque(c for c in self._idle if now - c.last_used <= limit)
        stale = [c for c in self._idle if now - c.last_used > limit]
        self._idle = keep
        for conn in stale:
            await self._discard(conn)

    async def close_idle(self) -> None:
        while self._idle:
            await self._discard(self._idle.pop())

    def stats(self) -> PoolStats:
        now = trio.current_time()
        return PoolStats(
            app_id=self.key.app_id,
            alias=self.key.alias,
            size=self.size,
            open=self.count,
            idle=len(self._idle),
            lent=self.count - len(self._idle),
            waiting=len(self._waiters),
            longest_wait_s=now - self._waiters[0].since if self._waiters else 0.0,
            waits=self.waits,
            wait_s_total=self.wait_s_total,
            timeouts=self.timeouts,
            opened=self.opened,
            closed=self.closed,
            checks_failed=self.checks_failed,
        )


class PoolBook:
    """Every pool of the Gate, by key."""

    def __init__(
        self,
        settings: PgPoolConfig,
        *,
        claim: Callable[[str, int], Awaitable[bool]] | None = None,
        release: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self.settings = settings
        self._claim = claim
        """Count one more connection to an alias across the Gates, unless
        they hold the cap already (``StateStore.claim_server_connection``)."""
        self._release = release
        self._pools: dict[PoolKey, ServerPool] = {}
        self._refused_at: dict[str, float] = {}
        """When the count last said an alias was at its cap."""

    @property
    def shares_a_cap(self) -> bool:
        return bool(self.settings.max_server_connections_per_alias) and self._claim is not None

    def pool(self, key: PoolKey, opener: Opener, *, size: int, wait_s: float) -> ServerPool:
        """The pool of ``key``, created on first use. A policy change of its
        size or wait applies from now on (connections beyond a smaller size
        close as they come back)."""
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = ServerPool(
                key, opener, size=size, wait_s=wait_s, settings=self.settings
            )
            pool.book = self
        else:
            pool.size, pool.wait_s = size, wait_s
            pool.opener = opener
        return pool

    def _siblings(self, pool: ServerPool) -> list[ServerPool]:
        return [p for p in self._pools.values() if p.key.alias == pool.key.alias]

    async def room_for(self, pool: ServerPool) -> bool:
        """Whether ``pool`` may open one more connection under the alias's
        cap: counted across the Gates when they share the state, else at
        this Gate; at the cap, an idle connection of another pool of the
        alias here is closed and ``pool`` takes its place."""
        cap = self.settings.max_server_connections_per_alias
        if not cap:
            return True
        siblings = self._siblings(pool)
        alias = pool.key.alias
        if self._claim is not None:
            asked_lately = trio.current_time() - self._refused_at.get(alias, -math.inf)
            if asked_lately >= CAP_RETRY_S:
                if await self._claim(alias, cap):
                    return True
                self._refused_at[alias] = trio.current_time()
        elif sum(p.count for p in siblings) <= cap:  # ``pool``'s new place counted
            return True
        return any(p.close_one_idle() for p in siblings if p is not pool)

    def closed_one(self, pool: ServerPool) -> None:
        """A connection of ``pool`` closed: its place under the cap is given
        back, and a waiter of any pool of the alias may use it (without a
        cap, one of ``pool``'s own)."""
        if not self.settings.max_server_connections_per_alias:
            pool.wake_one()
            return
        if self._release is not None:
            trio.lowlevel.spawn_system_task(self._release, pool.key.alias)
            self._refused_at.pop(pool.key.alias, None)  # a place is free: ask at once
        for sibling in sorted(self._siblings(pool), key=lambda p: p is not pool):
            if sibling.wake_one():
                return

    def __iter__(self) -> Iterator[ServerPool]:
        return iter(list(self._pools.values()))

    def stats(self) -> list[PoolStats]:
        return sorted((p.stats() for p in self), key=lambda s: (s.alias, s.app_id))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The reaper: idle connections past their idle timeout are closed;
        at the end, every idle connection."""
        task_status.started()
        period = min(self.settings.server_idle_timeout_s / 2, 30.0)
        try:
            while True:
                await trio.sleep(period if math.isfinite(period) else 30.0)
                for pool in self:
                    await pool.reap()
        finally:
            with trio.CancelScope(shield=True):
                for pool in self:
                    await pool.close_idle()
