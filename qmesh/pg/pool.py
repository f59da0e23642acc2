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

import itertools
import logging
import math
from collections.abc import Awaitable, Callable, Iterator
from typing import Final

import attrs
import trio

from qmesh import _core
from qmesh.config import PgPoolConfig
from qmesh.fastsocket import fast
from qmesh.pg.login import PgSessionError, Upstream
from qmesh.tls import TlsStream

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

    id: int
    """Its name on the pool's shelf."""
    stream: trio.abc.Stream
    key: tuple[int, bytes] | None = attrs.field(repr=False)
    """The server's BackendKeyData: where a client's cancel request goes."""
    opened_at: float
    prepared: _core.PreparedNames = attrs.field(factory=_core.PreparedNames)
    """Names of the statements qmesh prepared on it (see :mod:`qmesh.pg.multiplex`),
    shared with the engine that holds it while it is lent to one."""
    leftover: bytes = b""
    """Server bytes read past the login's ReadyForQuery (normally none)."""
    dirty: bool = False
    """A client changed its session state: reset before it is lent again."""
    unnamed_owner: object | None = None
    """The client session whose unnamed statement the server holds (None:
    nobody's, or none): see :mod:`qmesh.pg.multiplex`."""

    @property
    def socket(self) -> trio.socket.SocketType:
        """The TCP socket under the stream (and under its TLS, if any)."""
        stream = self.stream
        inner = getattr(stream, "transport", stream)
        sock = getattr(inner, "socket", None)
        assert isinstance(sock, trio.socket.SocketType), f"a connection over {type(inner)}"
        return sock

    @property
    def tls(self) -> _core.TlsSession | None:
        """Its TLS connection, if it has one: an engine it is lent to takes
        the connection along (``PoolShelf.give``)."""
        stream = self.stream
        return stream.tls if isinstance(stream, TlsStream) else None

    @property
    def unread(self) -> bool:
        """Its TLS layer holds plaintext nobody relayed: the server spoke
        past its last answer, and an engine reading the socket would never
        see it."""
        stream = self.stream
        return isinstance(stream, TlsStream) and bool(stream.buffered)

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
    engine_loans: int
    """Loans made by the tunnel engine itself, with no Python in between."""


@attrs.define(eq=False)
class _Waiter:
    """One of Python's clients in line (a session the engine does not relay)."""

    ticket: int
    event: trio.Event = attrs.field(factory=trio.Event)
    conn: ServerConn | None = None
    """What it was given; None with ``event`` set: look again (room to open)."""
    gone: bool = False
    """It left the line after its ticket was served: what comes is given back."""


Opener = Callable[[], Awaitable[Upstream]]


class ServerPool:
    """The server connections of one :class:`PoolKey`.

    Its idle connections and its line of waiting clients are on a shelf
    (``qmesh._core.PoolShelf``) shared with the tunnel engine, which lends
    and takes back connections for the sessions it relays without Python.
    The shelf tells this object (:meth:`serve`) what needs Python: a
    connection to check or close, a client of the engine waiting while the
    pool has room to open one, a connection for one of Python's waiters."""

    def __init__(
        self, key: PoolKey, opener: Opener, *, size: int, wait_s: float, settings: PgPoolConfig
    ) -> None:
        self.key = key
        self.shelf = _core.PoolShelf(settings.server_check_delay_s)
        self._size = size
        self._count = 0
        self.wait_s = wait_s
        self.settings = settings
        self.opener = opener
        """Logs in to the server; the newest login's credentials (a rotation)."""
        self.book: PoolBook | None = None
        """The Gate's pools, which share ``max_server_connections_per_alias``."""
        self._conns: dict[int, ServerConn] = {}
        """Every open connection, by id: idle, lent, or with Python."""
        self._ids = itertools.count(1)
        self._waiters: dict[int, _Waiter] = {}
        self._opening_for_engines = 0
        self.hello: list[bytes] | None = None
        """The ParameterStatus (and notice) messages of the pool's newest
        login: what a client is told at its own login."""
        self.timeouts = self.opened = self.closed = self.checks_failed = 0
        self.open_failure: PgSessionError | None = None
        """Why the newest login failed, if it did: what a client of the
        engine that waited in vain is told (the engine cannot log in)."""
        self._tell_shelf()

    @property
    def count(self) -> int:
        """Connections open or being opened."""
        return self._count

    @count.setter
    def count(self, value: int) -> None:
        self._count = value
        self._tell_shelf()

    @property
    def size(self) -> int:
        """The most connections the pool opens (a policy's ``pool_size``)."""
        return self._size

    @size.setter
    def size(self, value: int) -> None:
        self._size = value
        self._tell_shelf()

    def _tell_shelf(self) -> None:
        # A full pool's engine clients wait for a connection to come back,
        # without waking Python for one it could not open (a place coming
        # free wakes the line: wake_one).
        self.shelf.set_full(self._count >= self._size)

    def describe(self) -> str:
        return f'the pool of app "{self.key.app_id}" on database alias "{self.key.alias}"'

    def engine_spec(
        self,
        statements: list[tuple[bytes, bytes, bytes]],
        unnamed: bytes | None,
    ) -> _core.PooledSpec:
        """What the tunnel engine needs to relay a client's transactions on
        this pool's connections: the client's named statements (``(name,
        server name, Parse)`` each) and unnamed one (:class:`_core.PooledSpec`)."""
        return _core.PooledSpec(
            self.shelf,
            self.wait_s,
            self.settings.max_prepared_per_server,
            statements=statements,
            unnamed=unnamed,
        )

    def timed_out(self) -> PgSessionError:
        """A client waited ``wait_s`` in line: its error (the others wait on)."""
        self.timeouts += 1
        return PgSessionError(
            "53300",
            f"qmesh: no server connection became free within {self.wait_s:g} s in "
            f"{self.describe()} (pool_size = {self.size}); all are in use",
        )

    async def acquire(self) -> ServerConn:
        """A connection for one client: an idle one (checked on the way if it
        idled long), a new one while there is room, else the first one given
        back while this client is first in line. Raises PgSessionError 53300
        after ``wait_s``, or the login's error."""
        deadline = trio.current_time() + self.wait_s
        while True:
            idle = self.shelf.take()
            if idle is not None:
                return self.taken(*idle)
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
            lease, touched, ticket = self.shelf.take_or_wait()
            if lease is not None:
                return self.taken(lease, touched)
            waiter = self._waiters[ticket] = _Waiter(ticket)
            conn = await self._wait_in_line(waiter, deadline)
            if conn is not None:
                return conn

    def conn(self, lease: int) -> ServerConn | None:
        """The open connection ``lease``, wherever it is."""
        return self._conns.get(lease)

    def taken(self, lease: int, touched: bool) -> ServerConn:
        """The connection ``lease``, now Python's; ``touched``: the engine
        ran statements on it, which dropped any client's unnamed statement."""
        conn = self._conns[lease]
        if touched:
            conn.unnamed_owner = None
        if isinstance(conn.stream, TlsStream):
            conn.stream.take_back()
        return conn

    async def _new(self, *, wake: bool = True) -> ServerConn:
        """Open a connection in the place :meth:`acquire` took for it; if
        that fails, the place is given back (to the next in line if ``wake``)."""
        try:
            upstream = await self.opener()
        except BaseException as exc:
            if isinstance(exc, PgSessionError):
                self.open_failure = exc
            if wake:
                self._gone()
            else:
                self.count -= 1
                self.closed += 1
            raise
        self.open_failure = None
        self.opened += 1
        now = trio.current_time()
        # The newest login's: a server restarted with another version or
        # setting is described as it is now.
        self.hello = [*upstream.notices, *upstream.statuses]
        conn = ServerConn(
            id=next(self._ids),
            stream=fast(upstream.stream),
            key=upstream.key,
            opened_at=now,
            leftover=upstream.leftover,
        )
        self._conns[conn.id] = conn
        return conn

    async def _wait_in_line(self, waiter: _Waiter, deadline: float) -> ServerConn | None:
        """The connection handed over, or None when there is room to open one."""
        # Under a cap shared with other Gates, room they make is not
        # announced here: look again now and then (the count is asked at
        # most every CAP_RETRY_S per alias, however many wait).
        shared = self.book is not None and self.book.shares_a_cap
        wake = min(deadline, trio.current_time() + CAP_RETRY_S) if shared else deadline
        try:
            with trio.move_on_at(wake):
                await waiter.event.wait()
            if not waiter.event.is_set() and not self._leave_line(waiter):
                # Served as the wait ended: the connection is on its way.
                with trio.CancelScope(shield=True):
                    await waiter.event.wait()
        except BaseException:
            self._leave_line(waiter)  # cancelled: what it was given goes on
            raise
        if waiter.event.is_set():
            return waiter.conn
        if trio.current_time() < deadline:
            return None
        raise self.timed_out()

    def _leave_line(self, waiter: _Waiter) -> bool:
        """Take ``waiter`` out of line; False if its ticket was served (what
        it was given, now or when it comes, goes back)."""
        if self.shelf.cancel(waiter.ticket):
            self._waiters.pop(waiter.ticket, None)
            return True
        if waiter.conn is not None:
            self.release(waiter.conn, reusable=True)
            waiter.conn = None
        waiter.gone = True
        return False

    def release(self, conn: ServerConn, *, reusable: bool) -> None:
        """Give ``conn`` back; a connection that is not ``reusable`` (broken,
        or left mid-transaction) is closed. Never blocks."""
        now = trio.current_time()
        too_old = now - conn.opened_at > self.settings.server_lifetime_s
        too_many = len(conn.prepared) > self.settings.max_prepared_per_server
        if not reusable or too_old or too_many or conn.unread or self.count > self.size:
            self._close(conn)
            return
        expires_in = conn.opened_at + self.settings.server_lifetime_s - now
        self.shelf.give(conn.id, conn.socket.fileno(), expires_in, conn.prepared, tls=conn.tls)

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
        lease = self.shelf.take_oldest_idle()
        if lease is None:
            return False
        conn = self._conns.pop(lease)
        self.count -= 1
        self.closed += 1
        trio.lowlevel.spawn_system_task(conn.close)
        return True

    def _close(self, conn: ServerConn) -> None:
        """Close ``conn`` (Python's now); its place goes to the line."""
        self._conns.pop(conn.id, None)
        trio.lowlevel.spawn_system_task(conn.close)
        self._gone()

    def _gone(self) -> None:
        """A connection closed (or failed to open): its place under the cap
        is free, and the first waiter may open a new one (here, or in
        another pool of the alias when they share a cap)."""
        self.count -= 1
        self.closed += 1
        # Connections beyond a smaller size that engines still hold close
        # as they come back: only as many as are beyond it now.
        self.shelf.set_excess(max(0, self.count - self.size))
        if self.book is not None:
            self.book.closed_one(self)
        else:
            self.wake_one()

    def wake_one(self) -> bool:
        """Let the first waiter open a connection (one of Python's looks
        again; for the engine's, one is opened); whether one waited."""
        ticket = self.shelf.wake_python()
        if ticket is not None:
            waiter = self._waiters.pop(ticket)
            waiter.event.set()  # conn None: loop and open
            return True
        opening = self._opening_for_engines
        self._open_for_engines()
        return self._opening_for_engines > opening

    def _open_for_engines(self) -> None:
        """Open connections for the engine's clients in line, as many as
        wait (beyond those being opened) while the pool has room."""
        while self.shelf.engine_waiters() > self._opening_for_engines and self.count < self.size:
            self.count += 1
            self._opening_for_engines += 1
            self.spawn(self._open_spare)

    async def _open_spare(self) -> None:
        """Open a connection for the engine's clients in line, in a place
        taken (and counted in ``_opening_for_engines``) for it; under a cap,
        the place first needs room."""
        try:
            while self.book is not None and not await self.book.room_for(self):
                if not (self.book.shares_a_cap and self.shelf.engine_waiters()):
                    # The place is given back without waking anyone: they
                    # would only find the cap again (a close here wakes them).
                    self.count -= 1
                    return
                # Room other Gates make is not announced: look again.
                await trio.sleep(CAP_RETRY_S)
            try:
                # A failure wakes nobody: they would only fail the same way,
                # at once, again and again; the next client to come asks anew.
                conn = await self._new(wake=False)
            except Exception as exc:
                log.warning("%s: opening a server connection failed: %s", self.describe(), exc)
                return  # _new gave the place back
            self.release(conn, reusable=True)
        finally:
            self._opening_for_engines -= 1

    def spawn(self, fn: Callable[..., Awaitable[None]], *args: object) -> None:
        """Run ``fn(*args)`` beside the pool's clients, in its book's nursery."""
        if self.book is not None and self.book.nursery is not None:
            self.book.nursery.start_soon(fn, *args)
        else:
            trio.lowlevel.spawn_system_task(fn, *args)

    async def serve(self) -> None:
        """Do what the shelf asks of Python, as long as the pool lives."""
        shelf = self.shelf
        while True:
            await trio.lowlevel.wait_readable(shelf.notify_fd)
            for kind, lease, touched, ticket in shelf.take_events():
                if kind == "delivered":
                    conn = self.taken(lease, touched)
                    waiter = self._waiters.pop(ticket, None)
                    if waiter is None or waiter.gone:
                        self.release(conn, reusable=True)
                    else:
                        waiter.conn = conn
                        waiter.event.set()
                elif kind == "check":
                    self.spawn(self._check, self.taken(lease, touched))
                elif kind == "close":
                    self._close(self.taken(lease, touched))
                else:  # "wanted": an engine's client waits
                    self._open_for_engines()

    async def _check(self, conn: ServerConn) -> None:
        """Check an idle connection the shelf sent back (it idled long, or
        the server spoke while it idled); healthy, it goes back."""
        with trio.CancelScope(shield=True):  # bounded by the check's timeout
            healthy = await conn.settle(_EMPTY_QUERY, 1)
        if healthy:
            self.release(conn, reusable=True)
            return
        self.checks_failed += 1
        log.info("%s: an idle server connection failed its check; replaced", self.describe())
        self._close(conn)

    async def reap(self) -> None:
        """Close connections idle longer than ``server_idle_timeout_s``."""
        for lease, _touched in self.shelf.take_idle(self.settings.server_idle_timeout_s):
            await self._discard(self._conns.pop(lease))

    async def close_idle(self) -> None:
        for lease, _touched in self.shelf.take_idle(None):
            await self._discard(self._conns.pop(lease))

    async def _discard(self, conn: ServerConn) -> None:
        self._gone()  # first: a cancelled close must not keep its place
        await conn.close()

    def stats(self) -> PoolStats:
        idle, waiting, longest, engine_loans, waits, wait_total = self.shelf.stats()
        return PoolStats(
            app_id=self.key.app_id,
            alias=self.key.alias,
            size=self.size,
            open=self.count,
            idle=idle,
            lent=self.count - idle,
            waiting=waiting,
            longest_wait_s=longest,
            waits=waits,
            wait_s_total=wait_total,
            timeouts=self.timeouts,
            opened=self.opened,
            closed=self.closed,
            checks_failed=self.checks_failed,
            engine_loans=engine_loans,
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
        self.nursery: trio.Nursery | None = None
        """Where the pools' own tasks run (:meth:`run`)."""
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
            pool.spawn(pool.serve)
        else:
            pool.size, pool.wait_s = size, wait_s
            pool.opener = opener
            pool._open_for_engines()  # for those who waited while it was full
        pool.shelf.set_excess(max(0, pool.count - pool.size))
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
        period = min(self.settings.server_idle_timeout_s / 2, 30.0)
        try:
            async with trio.open_nursery() as self.nursery:
                task_status.started()
                while True:
                    await trio.sleep(period if math.isfinite(period) else 30.0)
                    for pool in self:
                        await pool.reap()
        finally:
            self.nursery = None
            with trio.CancelScope(shield=True):
                for pool in self:
                    await pool.close_idle()
