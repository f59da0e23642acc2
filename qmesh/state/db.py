"""Where the Gate's state lives: one SQLite file (the default) or PostgreSQL.

For: :func:`open_database`, which gives a :class:`Database` for a file path
or a ``postgresql://`` URL, and the one interface the stores use on either:
``read()`` and ``write()`` context managers yielding a :class:`Connection`
(``execute`` and ``executemany`` with ``?`` placeholders; rows are tuples),
``change_marker()`` (moves after any commit, by any process or Gate) and
``close()``.

Each backend is its own implementation of what correctness rests on:

- **SQLite**: one connection in WAL mode, shared by the process's threads
  under a lock. A write transaction is ``BEGIN IMMEDIATE``: the database's
  single write lock, taken up front, so a read-then-write (the next link of
  a hash chain, a key rotation) cannot interleave with another writer, in
  this process or another. Other processes' commits show in ``PRAGMA
  data_version``.
- **PostgreSQL**: a pool of psycopg connections in autocommit mode, used
  from worker threads, so reads run in parallel. A write transaction takes
  a transaction-scoped advisory lock first — the same single-writer rule as
  SQLite's, now across every Gate on the database, so the same invariants
  hold — and ends with ``NOTIFY qmesh_state``, which PostgreSQL delivers
  only if it commits; a listening connection counts those notifications for
  ``change_marker()``. Connections the server dropped are replaced by the
  pool: checked before reuse when they sat idle; a call that finds its
  connection broken fails, and has every idle one checked.

The SQL text is shared where the two dialects agree (standard SQL, ``ON
CONFLICT`` upserts, ``RETURNING``): the PostgreSQL connection rewrites the
``?`` placeholders to psycopg's ``%s`` once per distinct statement. Where
they disagree — the schema's types, full-text search, a row's insertion
order — each backend has its own statements, chosen by ``dialect``.

Not for: the tables (:mod:`qmesh.state.migrations`,
:mod:`qmesh.state.pg_schema`) or what is stored (:mod:`qmesh.state.store`
and the capabilities' stores).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final, Literal, Protocol

import psycopg
import psycopg.conninfo
import psycopg_pool

from qmesh.logs import register_secret
from qmesh.state.errors import StateUnavailable

__all__ = [
    "DATABASE_ERRORS",
    "INTEGRITY_ERRORS",
    "Connection",
    "Cursor",
    "Database",
    "Dialect",
    "PostgresDatabase",
    "SqliteDatabase",
    "WriteScope",
    "describe_url",
    "is_database_url",
    "open_database",
]

log = logging.getLogger(__name__)

Dialect = Literal["sqlite", "postgresql"]

DATABASE_ERRORS: Final = (sqlite3.Error, psycopg.Error)
"""What a statement on either backend raises when the database refuses it."""
INTEGRITY_ERRORS: Final = (sqlite3.IntegrityError, psycopg.errors.IntegrityError)
"""A constraint refused the statement (on PostgreSQL: at the statement or at COMMIT)."""

_BUSY_TIMEOUT_S: Final = 5.0
_CHECK_AFTER_IDLE_S: Final = 2.0
"""A pooled PostgreSQL connection idle longer than this is checked before use."""
CONNECT_TIMEOUT_S: Final = 10
"""How long opening a PostgreSQL state database may take before it is unreachable."""
POOL_SIZE: Final = 8
"""PostgreSQL connections per Gate: enough for the worker threads that use
the store at once (key checks, ledger and audit batches, the admin API)."""
WriteScope = Literal["state", "memory", "all"]
"""Which writers a write transaction excludes on PostgreSQL: ``state``
(every table but the graph memory's), ``memory`` (the graph memory's
tables, written by ingests that may take a while and touch nothing else)
or ``all`` (both, in that order: a copy of the whole state). On SQLite every
write transaction excludes every other."""
_WRITE_LOCKS: Final[dict[WriteScope, tuple[int, ...]]] = {
    "state": (0x716D657368_01,),  # "qmesh" + 1
    "memory": (0x716D657368_02,),
    "all": (0x716D657368_01, 0x716D657368_02),
}
"""``pg_advisory_xact_lock`` keys of the single-writer rule, per scope."""
NOTIFY_CHANNEL: Final = "qmesh_state"


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    @property
    def description(self) -> Any: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def fetchmany(self, size: int) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Connection(Protocol):
    """What a store's statements run on, inside ``read()`` or ``write()``."""

    def execute(self, sql: str, parameters: Sequence[Any] = ()) -> Cursor: ...

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> Any: ...


class Database(Protocol):
    dialect: Dialect
    location: str
    """Where it is, for messages: a path, or the URL without its password."""

    def read(self) -> contextlib.AbstractContextManager[Connection]: ...

    def snapshot(self) -> contextlib.AbstractContextManager[Connection]: ...

    def write(
        self, *, announce: bool = True, scope: WriteScope = "state"
    ) -> contextlib.AbstractContextManager[Connection]: ...

    def change_marker(self) -> tuple[int, int]: ...

    def close(self) -> None: ...


ROWS_PER_INSERT: Final = 64
"""Rows one INSERT carries at most (64 × a chain's 20-odd columns stays far
below SQLite's 32,766 parameters)."""


def insert_many(conn: Connection, insert: str, values: Sequence[object], width: int) -> None:
    """``insert … VALUES`` for the rows laid end to end in ``values``, a few
    statements of many rows each (sizes halving from
    :data:`ROWS_PER_INSERT`, so a handful of statement texts serve any
    count).

    Why not ``executemany``: SQLite steps it row by row, and the sqlite3
    module takes the GIL back after every step. From a writer thread that
    is one GIL hand-over per row, each of which stalls the event loop's
    thread (the ledger under wrk, 64 connections, the Gate on one core,
    paired rounds: p99 7.2–7.9 ms with rows inserted one by one, 6.4–7.0 ms
    with these statements; 4.3–4.9 ms with no ledger writes at all). The
    ledger on SQLite now binds in Rust with the GIL released instead
    (``_core.insert_sealed``); this serves PostgreSQL, and SQLite under an
    interpreter that path does not know."""
    one = "(" + ", ".join(["?"] * width) + ")"
    rows = len(values) // width
    done = 0
    size = ROWS_PER_INSERT
    while done < rows:
        while size > rows - done:
            size //= 2
        conn.execute(
            f"{insert} VALUES {', '.join([one] * size)}",
            values[done * width : (done + size) * width],
        )
        done += size


def is_database_url(location: object) -> bool:
    return isinstance(location, str) and location.startswith(("postgresql://", "postgres://"))


def open_database(location: Path | str) -> Database:
    """The database at ``location``: a ``postgresql://`` URL, else a SQLite file
    (created 0600, with its directory, if missing). Raises StateUnavailable."""
    if is_database_url(location):
        return PostgresDatabase(str(location))
    return SqliteDatabase(Path(location))


# -- SQLite -------------------------------------------------------------------------


class SqliteDatabase:
    dialect: Dialect = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.location = str(path)
        self._lock = threading.Lock()
        self._commits = 0
        try:
            if not path.parent.exists():
                path.parent.mkdir(mode=0o700, parents=True)
            with contextlib.suppress(FileExistsError):
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except OSError as exc:
            raise StateUnavailable(f"cannot create state database {path}: {exc}") from exc
        try:
            conn = sqlite3.connect(
                path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise StateUnavailable(f"cannot open state database {path}: {exc}") from exc
        try:
            conn.execute("PRAGMA foreign_keys = ON")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StateUnavailable(f"state database {path}: cannot use WAL mode (got {mode!r})")
            # NORMAL is durable across application crashes in WAL mode; only
            # a power cut can lose the last transactions, never corrupt the file.
            conn.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.Error as exc:
            conn.close()
            raise StateUnavailable(f"cannot use state database {path}: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        self._conn: sqlite3.Connection | None = conn

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            # Using a closed store is a bug in the caller, not a state problem.
            raise RuntimeError("the state store is closed")
        return self._conn

    @contextlib.contextmanager
    def read(self) -> Iterator[Connection]:
        with self._lock:
            yield self._connection()

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[Connection]:
        """A read transaction: every statement sees the same committed state."""
        with self._lock:
            conn = self._connection()
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                conn.execute("ROLLBACK")

    @contextlib.contextmanager
    def write(self, *, announce: bool = True, scope: WriteScope = "state") -> Iterator[Connection]:
        """A write transaction. IMMEDIATE takes the write lock up front, so
        two processes never both read and then fail to upgrade: one lock for
        every ``scope``. Without ``announce`` it does not move this
        process's change marker."""
        with self._lock:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            try:
                conn.execute("COMMIT")
                if announce:
                    self._commits += 1
            except BaseException:
                # A deferred constraint that fails at COMMIT (or a busy
                # database) leaves the transaction open; without this
                # rollback every later BEGIN on the connection would fail.
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def change_marker(self) -> tuple[int, int]:
        """SQLite's ``PRAGMA data_version`` moves only for other connections'
        commits, so this connection's own are counted beside it. Cheap: no
        table is read."""
        with self._lock:
            version: int = self._connection().execute("PRAGMA data_version").fetchone()[0]
            return version, self._commits

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


# -- PostgreSQL ---------------------------------------------------------------------

_PLACEHOLDER: Final = re.compile(r"'[^']*'|\?|%")


@functools.lru_cache(maxsize=1024)
def _psycopg_sql(sql: str) -> str:
    """``?`` → ``%s`` outside string literals, and every ``%`` → ``%%``
    (psycopg reads ``%`` as a placeholder even inside a literal)."""

    def replace(match: re.Match[str]) -> str:
        token = match.group(0)
        return "%s" if token == "?" else token.replace("%", "%%")

    return _PLACEHOLDER.sub(replace, sql)


class _PgConnection:
    """A pooled psycopg connection behind the stores' interface."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    def execute(self, sql: str, parameters: Sequence[Any] = ()) -> Cursor:
        return self._conn.execute(_psycopg_sql(sql), parameters)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> Any:
        with self._conn.cursor() as cursor:
            cursor.executemany(_psycopg_sql(sql), rows)


def describe_url(url: str) -> str:
    """``url`` for messages and logs: host, port, database and user; never a password."""
    try:
        parts = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://(an unparsable URL)"
    user = f"{parts['user']}@" if parts.get("user") else ""
    host = str(parts.get("host") or "localhost")
    port = f":{parts['port']}" if parts.get("port") else ""
    return f"postgresql://{user}{host}{port}/{parts.get('dbname') or ''}"


class PostgresDatabase:
    dialect: Dialect = "postgresql"

    def __init__(
        self, url: str, *, pool_size: int = POOL_SIZE, connect_timeout_s: int = CONNECT_TIMEOUT_S
    ) -> None:
        self.location = describe_url(url)
        try:
            parts = psycopg.conninfo.conninfo_to_dict(url)
        except psycopg.ProgrammingError as exc:
            raise StateUnavailable(f"gate.database_url is not a PostgreSQL URL: {exc}") from None
        if parts.get("password"):
            # psycopg and its pool log connection problems; never the password.
            register_secret(str(parts["password"]))
        parts.setdefault("connect_timeout", connect_timeout_s)
        parts.setdefault("application_name", "qmesh-gate")
        self._conninfo = psycopg.conninfo.make_conninfo("", **parts)
        self._commits = 0
        self._notifications = 0
        self._closed = False
        self._listen_lock = threading.Lock()
        self._returned_at: weakref.WeakKeyDictionary[psycopg.Connection[Any], float] = (
            weakref.WeakKeyDictionary()
        )
        # One direct connection first: its error says why (refused, password,
        # no such database), where a pool would only time out.
        self._listener: psycopg.Connection[Any] | None = self._listen()
        self._pool = psycopg_pool.ConnectionPool(
            self._conninfo,
            min_size=1,
            max_size=pool_size,
            kwargs={"autocommit": True},
            check=self._check_if_idle,
            reset=self._returned,
            name="qmesh-state",
            timeout=float(connect_timeout_s),
            open=False,
        )
        try:
            self._pool.open(wait=True, timeout=float(connect_timeout_s))
        except psycopg_pool.PoolTimeout as exc:
            self._close_listener()
            raise StateUnavailable(f"cannot connect to {self.location}: {exc}") from None

    def _returned(self, conn: psycopg.Connection[Any]) -> None:
        self._returned_at[conn] = time.monotonic()

    def _check_if_idle(self, conn: psycopg.Connection[Any]) -> None:
        """The pool's check before lending a connection (a round trip), only
        for one that sat idle: a connection in steady use proves itself, and
        the check would cost every state call one more round trip. A server
        that went away meanwhile fails the call that finds out
        (DATABASE_ERRORS), which has every idle connection checked
        (:meth:`_checkout`)."""
        if time.monotonic() - self._returned_at.get(conn, 0.0) > _CHECK_AFTER_IDLE_S:
            psycopg_pool.ConnectionPool.check_connection(conn)

    def _listen(self) -> psycopg.Connection[Any]:
        try:
            conn = psycopg.connect(self._conninfo, autocommit=True)
        except psycopg.Error as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise StateUnavailable(
                f"cannot connect to {self.location}: {reason} (check gate.database_url: "
                "is the server up, and are its address and credentials right?)"
            ) from None
        try:
            conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
            read_only = conn.execute("SHOW transaction_read_only").fetchone()
        except psycopg.Error as exc:
            conn.close()
            raise StateUnavailable(f"cannot use {self.location}: {exc}") from None
        if read_only is not None and read_only[0] == "on":
            conn.close()
            raise StateUnavailable(
                f"{self.location} is read-only (a standby?): the Gate's state needs the "
                "primary; list every host with target_session_attrs=read-write"
            )
        return conn

    def _close_listener(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    @contextlib.contextmanager
    def read(self) -> Iterator[Connection]:
        with self._checkout() as conn:
            yield _PgConnection(conn)

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[Connection]:
        """A read-only transaction on one snapshot (REPEATABLE READ)."""
        with self._checkout() as conn, conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            yield _PgConnection(conn)

    @contextlib.contextmanager
    def write(self, *, announce: bool = True, scope: WriteScope = "state") -> Iterator[Connection]:
        """A write transaction under the single-writer advisory lock of
        ``scope``; its NOTIFY (unless not ``announce``) is delivered if, and
        only if, it commits."""
        with self._checkout() as conn, conn.transaction():
            for key in _WRITE_LOCKS[scope]:
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (key,))
            yield _PgConnection(conn)
            if announce:
                conn.execute(f"NOTIFY {NOTIFY_CHANNEL}")
        if announce:
            self._commits += 1

    @contextlib.contextmanager
    def _checkout(self) -> Iterator[psycopg.Connection[Any]]:
        if self._closed:
            raise RuntimeError("the state store is closed")
        try:
            with self._pool.connection() as conn:
                try:
                    yield conn
                except psycopg.OperationalError:
                    if conn.broken:
                        # The server ended this connection (a restart, a
                        # failover, pg_terminate_backend): the idle ones are
                        # likely dead too, and are checked and replaced now,
                        # so that this call is the only one to fail.
                        self._pool.check()
                    raise
        except psycopg_pool.PoolTimeout as exc:
            raise StateUnavailable(f"{self.location}: no connection available: {exc}") from None

    def change_marker(self) -> tuple[int, int]:
        """Notifications received (every Gate's and every command's commits)
        and this process's own commits. A lost listening connection is
        re-opened, and counts as a change: something may have been missed."""
        with self._listen_lock:
            try:
                if self._listener is None or self._listener.closed:
                    self._listener = self._listen()
                    self._notifications += 1
                for _ in self._listener.notifies(timeout=0):
                    self._notifications += 1
            except (psycopg.Error, StateUnavailable) as exc:
                log.warning("state change notifications from %s: %s", self.location, exc)
                self._close_listener()
            return self._notifications, self._commits

    def close(self) -> None:
        self._closed = True
        with self._listen_lock:
            self._close_listener()
        self._pool.close()
