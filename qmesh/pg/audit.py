"""The statement audit log of the Gate's Postgres path.

For: one record per statement an application runs through the Gate (app,
alias, the statement's text or only its SHA-256, duration, rows, outcome),
written to the state store without ever making the relay wait, and read back
for ``qmesh audit``.

:meth:`AuditLog.record` only appends to a bounded in-memory queue; the
service :meth:`AuditLog.run` writes what has queued up in batches, one
transaction each, in a worker thread. When the queue is full (the disk is
slower than the traffic) records are dropped, counted and reported in a
rate-limited warning: an audit log that stalls the database path would turn
a slow disk into an outage. That trade is deliberate; a deployment that
must never lose a record needs a synchronous log, which this is not.

Not for: the tamper-evident audit chain of the Gate's own actions, log
lines, or deciding what counts as a statement (the relay calls
:meth:`~AuditLog.record` for each Query and each Execute).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Final

import attrs
import trio

from qmesh.config import AUDIT_MODES
from qmesh.state import DATABASE_ERRORS, StateError, StateStore
from qmesh.state.db import insert_many

__all__ = ["AUDIT_MODES", "AuditLog", "AuditRecord", "list_audit"]

logger = logging.getLogger("qmesh.pg.audit")

DEFAULT_MAX_QUEUE: Final = 10_000
DEFAULT_MAX_QUEUE_CHARS: Final = 64 * 1024 * 1024
DEFAULT_BATCH: Final = 1_000
DEFAULT_MAX_STATEMENT_CHARS: Final = 8_192
"""Longer statements are stored truncated in ``text`` mode; the hash is of the whole."""
_DROP_REPORT_INTERVAL_S: Final = 10.0
# How long the writer waits for more records before a transaction.
LINGER_S = 0.05
_CLOSE_TIMEOUT_S: Final = 5.0


@attrs.frozen
class AuditRecord:
    """One stored audit record."""

    id: int
    ts: float
    """When the statement finished (Unix time)."""
    app: str
    alias: str
    statement: str | None
    """The text (possibly truncated); None in ``hash`` mode."""
    statement_sha256: str
    """Hex SHA-256 of the statement's UTF-8 bytes, always present."""
    duration_ms: float
    rows: int | None
    outcome: str
    session: str | None = None
    """The client session: its edge and the process id the client was told
    (BackendKeyData: ``pg_backend_pid()`` in session mode, libpq's
    ``PQbackendPID``); None in records written before sessions were kept."""


@attrs.frozen
class _Pending:
    ts: float
    app: str
    alias: str
    statement: str | bytes
    keep_text: bool
    duration_ms: float
    rows: int | None
    outcome: str
    session: str | None


class AuditLog:
    """Queues audit records and writes them in batches; see the module docstring.

    ``mode`` is the default of :meth:`record`'s ``mode``: ``text`` keeps the
    statement (truncated at ``max_statement_chars``) and its hash, ``hash``
    only the hash, ``off`` nothing.
    """

    def __init__(
        self,
        store: StateStore,
        mode: str = "text",
        *,
        max_queue: int = DEFAULT_MAX_QUEUE,
        max_queue_chars: int = DEFAULT_MAX_QUEUE_CHARS,
        batch_size: int = DEFAULT_BATCH,
        max_statement_chars: int = DEFAULT_MAX_STATEMENT_CHARS,
    ) -> None:
        if mode not in AUDIT_MODES:
            raise ValueError(f"audit mode must be one of {', '.join(AUDIT_MODES)}; got {mode!r}")
        self.store = store
        self.mode = mode
        self.max_queue = max_queue
        self.max_queue_chars = max_queue_chars
        self.batch_size = batch_size
        self.max_statement_chars = max_statement_chars
        self._queue: deque[_Pending] = deque()
        self._queued_chars = 0
        self._lock = threading.Lock()  # record() may be called from worker threads too
        self.recorded = 0
        """Records accepted into the queue."""
        self.written = 0
        self.dropped = 0
        """Records refused because the queue was full."""
        self.failed = 0
        """Records lost because the database refused a batch."""
        self._reported_drops = 0
        self._reported_at = -_DROP_REPORT_INTERVAL_S
        self._wakeup = trio.Event()
        self._progress = trio.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._trio_thread: int | None = None

    # -- the producer side: must never block -------------------------------------------

    def record(
        self,
        *,
        app: str,
        alias: str,
        statement: str | bytes,
        duration_s: float,
        rows: int | None,
        outcome: str,
        mode: str | None = None,
        session: str | None = None,
    ) -> None:
        """Queue one record; return at once. ``mode`` overrides the log's
        default for this record (the app's ``audit_statements`` policy).

        Safe from the Trio thread and from other threads. Keeps a reference
        to ``statement``, never a copy; hashing and truncation happen in the
        writer's thread.
        """
        self.record_many(
            app=app,
            alias=alias,
            statements=[(statement, duration_s, rows, outcome)],
            mode=mode,
            session=session,
        )

    def record_many(
        self,
        *,
        app: str,
        alias: str,
        statements: Sequence[tuple[str | bytes, float, int | None, str]],
        mode: str | None = None,
        session: str | None = None,
    ) -> None:
        """:meth:`record` for several statements of one session at once:
        ``(statement, duration_s, rows, outcome)`` each."""
        mode = self.mode if mode is None else mode
        if mode == "off":
            return
        if mode not in AUDIT_MODES:
            raise ValueError(f"audit mode must be one of {', '.join(AUDIT_MODES)}; got {mode!r}")
        ts, keep_text = time.time(), mode == "text"
        with self._lock:
            for statement, duration_s, rows, outcome in statements:
                size = len(statement)
                if (
                    len(self._queue) >= self.max_queue
                    or self._queued_chars + size > self.max_queue_chars
                ):
                    self.dropped += 1
                    continue
                self._queue.append(
                    _Pending(
                        ts,
                        app,
                        alias,
                        statement,
                        keep_text,
                        duration_s * 1000.0,
                        rows,
                        outcome,
                        session,
                    )
                )
                self._queued_chars += size
                self.recorded += 1
        self._wake()

    def _wake(self) -> None:
        if self._token is None:
            return  # run() has not started; it looks at the queue when it does
        if threading.get_ident() == self._trio_thread:
            self._wakeup.set()
        else:
            try:
                self._token.run_sync_soon(self._wakeup_in_trio)
            except trio.RunFinishedError:
                pass

    def _wakeup_in_trio(self) -> None:
        # Looked up when it runs, in the Trio thread: the current event.
        self._wakeup.set()

    # -- the writer --------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write queued records until cancelled; then write what is left
        (for at most a few seconds, shielded) and return."""
        self._token = trio.lowlevel.current_trio_token()
        self._trio_thread = threading.get_ident()
        task_status.started()
        try:
            while True:
                # A fresh event before looking at the queue: a record that
                # arrives after the look sets this event, so none is missed.
                self._wakeup = trio.Event()
                if not self._queue:
                    await self._wakeup.wait()
                # Let records gather, also under steady load: one worker
                # thread hand-off and one transaction (and fsync) per linger,
                # not per statement, keeps the audit off the relay's CPU and
                # latency. A full batch is written at once.
                if len(self._queue) < self.batch_size:
                    await trio.sleep(LINGER_S)
                await self._write_some()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_TIMEOUT_S):
                while await self._write_some():
                    pass
            self._token = None
            self._report_drops(force=True)

    async def _write_some(self) -> bool:
        """Write one batch if any is queued; False if the queue was empty."""
        with self._lock:
            batch = [self._queue.popleft() for _ in range(min(self.batch_size, len(self._queue)))]
            self._queued_chars -= sum(len(item.statement) for item in batch)
        if not batch:
            return False
        # Shielded: a batch taken off the queue is written, not lost to a
        # cancellation (to_thread checks for one before it starts the thread).
        # The write is bounded by the store's busy timeout.
        with trio.CancelScope(shield=True):
            written = await trio.to_thread.run_sync(self._write_batch, batch)
        self.written += written
        self.failed += len(batch) - written
        self._report_drops()
        progress, self._progress = self._progress, trio.Event()
        progress.set()
        return True

    def _write_batch(self, batch: list[_Pending]) -> int:
        rows: list[object] = []
        for item in batch:
            statement = item.statement
            # surrogatepass: a str decoded with surrogateescape still hashes.
            raw = (
                statement
                if isinstance(statement, bytes)
                else statement.encode("utf-8", "surrogatepass")
            )
            digest = hashlib.sha256(raw)
            text = None
            if item.keep_text:
                # From the bytes, so what is stored is always valid UTF-8.
                text = raw.decode("utf-8", errors="replace")
                if len(text) > self.max_statement_chars:
                    text = (
                        f"{text[: self.max_statement_chars]}… "
                        f"[truncated: {len(text)} characters in all]"
                    )
            rows += (
                item.ts,
                item.app,
                item.alias,
                text,
                digest.hexdigest(),
                item.duration_ms,
                item.rows,
                item.outcome,
                item.session,
            )
        try:
            with self.store._write(announce=False) as conn:
                insert_many(
                    conn,
                    "INSERT INTO pg_audit (ts, app, alias, statement, statement_sha256,"
                    " duration_ms, rows, outcome, session)",
                    rows,
                    9,
                )
        except (*DATABASE_ERRORS, StateError) as exc:
            logger.error("audit: could not write %d records: %s", len(batch), exc)
            return 0
        return len(batch)

    def _report_drops(self, *, force: bool = False) -> None:
        new = self.dropped - self._reported_drops
        now = time.monotonic()
        if new and (force or now - self._reported_at >= _DROP_REPORT_INTERVAL_S):
            logger.warning(
                "audit: queue full, dropped %d records (%d in all since start)",
                new,
                self.dropped,
            )
            self._reported_drops = self.dropped
            self._reported_at = now

    async def flush(self) -> None:
        """Wait until every record queued before this call is written (or
        failed). :meth:`run` must be running."""
        if self._token is None:
            raise RuntimeError("AuditLog.flush() needs AuditLog.run() running")
        target = self.recorded
        while self.written + self.failed < target:
            await self._progress.wait()


def list_audit(
    store: StateStore,
    *,
    app: str | None = None,
    alias: str | None = None,
    since: float | None = None,
    limit: int = 100,
) -> list[AuditRecord]:
    """Stored records, newest first, optionally only one app's, one alias's,
    or those at or after ``since``."""
    where: list[str] = []
    params: list[object] = []
    for column, value in (("app", app), ("alias", alias)):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    if since is not None:
        where.append("ts >= ?")
        params.append(since)
    sql = (
        "SELECT id, ts, app, alias, statement, statement_sha256, duration_ms, rows, outcome,"
        " session FROM pg_audit"
    )
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY ts DESC, id DESC LIMIT ?"
    params.append(max(0, limit))
    with store._read() as conn:
        rows = conn.execute(sql, params).fetchall()
    return [
        AuditRecord(
            id=row[0],
            ts=row[1],
            app=row[2],
            alias=row[3],
            statement=row[4],
            statement_sha256=row[5],
            duration_ms=row[6],
            rows=row[7],
            outcome=row[8],
            session=row[9],
        )
        for row in rows
    ]
