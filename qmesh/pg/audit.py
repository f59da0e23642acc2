"""The statement audit log of the Gate's Postgres path.

For: one record per statement an application runs through the Gate (app,
alias, the statement's text or only its SHA-256, duration, rows, outcome),
written to the state store without ever making the relay wait, and read back
for ``qmesh audit``.

:meth:`AuditLog.record` only appends to a bounded in-memory queue; the
service :meth:`AuditLog.run` writes what has queued up in batches, one
transaction each, in a worker thread. A batch is stored as compressed
blocks, one per (app, alias), not a row per statement: a row cost SQLite
more CPU than the Gate's engine spends relaying the statement, and 230
bytes of disk (``_core.AuditQueue.take_blocks`` encodes them, without the
GIL). Records written by earlier versions, a row each, stay in
``pg_audit`` and are read with the rest. When the queue is full (the disk is
slower than the traffic) records are dropped, counted and reported in a
rate-limited warning: an audit log that stalls the database path would turn
a slow disk into an outage. That trade is deliberate; a deployment that
must never lose a record needs a synchronous log, which this is not.

With a retention (``[gate.pg_audit] retention_days``) the service also
deletes what is older, a block at a time once its newest record is that
old, in short transactions that let the writer in between.

Not for: the tamper-evident audit chain of the Gate's own actions, log
lines, or deciding what counts as a statement (the relay calls
:meth:`~AuditLog.record` for each Query and each Execute).
"""

from __future__ import annotations

import heapq
import logging
import time
from collections.abc import Sequence
from typing import Final

import attrs
import trio

from qmesh import _core
from qmesh.config import AUDIT_MODES, PgAuditConfig
from qmesh.state import DATABASE_ERRORS, StateError, StateStore
from qmesh.state.db import Connection

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
_MAX_ROWS: Final = 2**63 - 1
_BLOCKS_A_FETCH: Final = 16
PRUNE_EVERY_S: Final = 600.0
"""How often the retention is applied: records live at most this much past it."""
_PRUNE_CHUNK: Final = 500
"""Blocks (or rows of earlier versions) deleted in one write transaction."""


@attrs.frozen
class AuditRecord:
    """One stored audit record."""

    id: int
    """Unique; later records have larger ids. A record stored in a block
    has its block's id times ``_core.AUDIT_BLOCK_RECORDS`` plus its place."""
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
        retention_s: float | None = None,
        prune_every_s: float = PRUNE_EVERY_S,
    ) -> None:
        _check_mode(mode)
        if retention_s is not None and retention_s <= 0:
            raise ValueError(f"an audit retention must be > 0 s, got {retention_s}")
        self.store = store
        self.mode = mode
        self.retention_s = retention_s
        """Records older than this many seconds are deleted; None: kept for ever."""
        self.prune_every_s = prune_every_s
        self.pruned = 0
        """Records deleted for their age since the start."""
        self.max_queue = max_queue
        self.batch_size = batch_size
        self.queue = _core.AuditQueue(max_queue, max_queue_chars, max_statement_chars)
        """Where records wait for the writer; the engine threads record
        into it too (:meth:`author`)."""
        self.written = 0
        self.failed = 0
        """Records lost because the database refused a batch."""
        self._reported_drops = 0
        self._reported_at = -_DROP_REPORT_INTERVAL_S
        self._progress = trio.Event()
        self._running = False

    @classmethod
    def for_gate(cls, store: StateStore, config: PgAuditConfig) -> AuditLog:
        """The Gate's audit, as its ``[gate.pg_audit]`` says."""
        days = config.retention_days
        return cls(store, retention_s=days * 86_400 if days else None)

    @property
    def recorded(self) -> int:
        """Records accepted into the queue."""
        return self.queue.recorded

    @property
    def dropped(self) -> int:
        """Records refused because the queue was full."""
        return self.queue.dropped

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
        Safe from the Trio thread and from other threads; hashing and
        truncation happen in the writer's thread."""
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
        mode = self.mode if mode is None else _check_mode(mode)
        if mode == "off":
            return
        self.queue.push(
            app,
            alias,
            session,
            mode == "text",
            [
                # surrogatepass: a str decoded with surrogateescape still hashes.
                # Rows are the server's word, summed: held to a column's range.
                (text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"),
                 duration_s, None if rows is None else min(rows, _MAX_ROWS), outcome)
                for text, duration_s, rows, outcome in statements
            ],
        )  # fmt: skip

    def author(
        self, *, app: str, alias: str, mode: str | None = None, session: str | None = None
    ) -> _core.AuditAuthor | None:
        """What an engine's stream records one session's statements with;
        None when ``mode`` (else the log's) is ``off``."""
        mode = self.mode if mode is None else _check_mode(mode)
        if mode == "off":
            return None
        return self.queue.author(app, alias, session, mode == "text")

    # -- the writer --------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write queued records until cancelled; then write what is left
        (for at most a few seconds, shielded) and return."""
        self._running = True
        task_status.started()
        try:
            async with trio.open_nursery() as nursery:
                if self.retention_s is not None:
                    nursery.start_soon(self._prune_forever, self.retention_s)
                await self._write_forever()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_TIMEOUT_S):
                while await self._write_some():
                    pass
            self._running = False
            self._report_drops(force=True)

    async def _write_forever(self) -> None:
        while True:
            if not self.queue.queued:
                # Readable once a record arrives in the empty queue.
                await trio.lowlevel.wait_readable(self.queue.notify_fd)
            # Let records gather, also under steady load: one worker
            # thread hand-off and one transaction (and fsync) per linger,
            # not per statement, keeps the audit off the relay's CPU and
            # latency. A full batch is written at once.
            if self.queue.queued < self.batch_size:
                await trio.sleep(LINGER_S)
            await self._write_some()

    async def _prune_forever(self, retention_s: float) -> None:
        while True:
            before, pruned, more = time.time() - retention_s, 0, True
            try:
                while more:
                    # A chunk a thread hand-off: cancellable between chunks.
                    deleted, more = await trio.to_thread.run_sync(self.prune_some, before)
                    pruned += deleted
            except (*DATABASE_ERRORS, StateError) as exc:
                logger.error("audit: could not delete records past the retention: %s", exc)
            if pruned:
                logger.info(
                    "audit: deleted %d records older than %.1f days", pruned, retention_s / 86_400
                )
            await trio.sleep(self.prune_every_s)

    def prune_some(self, before: float) -> tuple[int, bool]:
        """Delete some of the blocks whose newest record ended before
        ``before`` (a Unix time), and of the rows of earlier versions that
        did, in one short write transaction (the writer, and every other
        writer of the state, waits little): the records deleted, and whether
        there may be more."""
        with self.store._write(announce=False) as conn:
            blocks = conn.execute(
                "DELETE FROM pg_audit_blocks WHERE id IN (SELECT id FROM pg_audit_blocks"
                " WHERE last_ts < ? ORDER BY last_ts LIMIT ?) RETURNING records",
                (before, _PRUNE_CHUNK),
            ).fetchall()
            rows = conn.execute(
                "DELETE FROM pg_audit WHERE id IN (SELECT id FROM pg_audit"
                " WHERE ts < ? ORDER BY ts LIMIT ?) RETURNING id",
                (before, _PRUNE_CHUNK),
            ).fetchall()
        deleted = sum(records for (records,) in blocks) + len(rows)
        self.pruned += deleted
        return deleted, len(blocks) == _PRUNE_CHUNK or len(rows) == _PRUNE_CHUNK

    async def _write_some(self) -> bool:
        """Write one batch if any is queued; False if the queue was empty."""
        # Shielded: a batch taken off the queue is written, not lost to a
        # cancellation. The write is bounded by the store's busy timeout.
        with trio.CancelScope(shield=True):
            written, taken = await trio.to_thread.run_sync(self._write_batch)
        if not taken:
            return False
        self.written += written
        self.failed += taken - written
        self._report_drops()
        progress, self._progress = self._progress, trio.Event()
        progress.set()
        return True

    def _write_batch(self) -> tuple[int, int]:
        """(written, taken): one batch off the queue, into the store."""
        taken, blocks = self.queue.take_blocks(self.batch_size)
        if not taken:
            return 0, 0
        try:
            with self.store._write(announce=False) as conn:
                conn.executemany(
                    "INSERT INTO pg_audit_blocks (app, alias, first_ts, last_ts, records, body)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    blocks,
                )
        except (*DATABASE_ERRORS, StateError) as exc:
            logger.error("audit: could not write %d records: %s", taken, exc)
            return 0, taken
        return taken, taken

    def _report_drops(self, *, force: bool = False) -> None:
        dropped = self.dropped
        new = dropped - self._reported_drops
        now = time.monotonic()
        if new and (force or now - self._reported_at >= _DROP_REPORT_INTERVAL_S):
            logger.warning(
                "audit: queue full, dropped %d records (%d in all since start)", new, dropped
            )
            self._reported_drops = dropped
            self._reported_at = now

    async def flush(self) -> None:
        """Wait until every record queued before this call is written (or
        failed). :meth:`run` must be running."""
        if not self._running:
            raise RuntimeError("AuditLog.flush() needs AuditLog.run() running")
        target = self.recorded
        while self.written + self.failed < target:
            await self._progress.wait()


def _check_mode(mode: str) -> str:
    if mode not in AUDIT_MODES:
        raise ValueError(f"audit mode must be one of {', '.join(AUDIT_MODES)}; got {mode!r}")
    return mode


def list_audit(
    store: StateStore,
    *,
    app: str | None = None,
    alias: str | None = None,
    since: float | None = None,
    limit: int = 100,
) -> list[AuditRecord]:
    """Stored records, newest first (by end time, then id), optionally only
    one app's, one alias's, or those at or after ``since``. A block that
    cannot be read is skipped with a logged error naming it: the rest of
    the audit stays readable."""
    limit = max(0, limit)
    if not limit:
        return []
    with store._read() as conn:
        found = _from_blocks(conn, app, alias, since, limit)
        found += _from_rows(conn, app, alias, since, limit)
    return heapq.nlargest(limit, found, key=_newest_first)


def _newest_first(record: AuditRecord) -> tuple[float, int]:
    return record.ts, record.id


def _filters(
    app: str | None, alias: str | None, since: float | None, ts_column: str
) -> tuple[str, list[object]]:
    """`` WHERE …`` (or nothing) and its parameters."""
    where: list[str] = []
    params: list[object] = []
    for column, value in (("app", app), ("alias", alias)):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    if since is not None:
        where.append(f"{ts_column} >= ?")
        params.append(since)
    return (" WHERE " + " AND ".join(where) if where else ""), params


def _from_blocks(
    conn: Connection, app: str | None, alias: str | None, since: float | None, limit: int
) -> list[AuditRecord]:
    """The newest ``limit`` records of the blocks. Blocks are read newest
    end first, and no further once one ends before the records kept."""
    where, params = _filters(app, alias, since, "last_ts")
    cursor = conn.execute(
        f"SELECT id, app, alias, last_ts, body FROM pg_audit_blocks{where}"
        " ORDER BY last_ts DESC, id DESC",
        params,
    )
    kept: list[tuple[tuple[float, int], AuditRecord]] = []  # a heap, oldest first
    while blocks := cursor.fetchmany(_BLOCKS_A_FETCH):
        for block_id, block_app, block_alias, last_ts, body in blocks:
            if len(kept) == limit and last_ts < kept[0][0][0]:
                return [record for _, record in kept]
            try:
                records = _core.audit_block_records(bytes(body))
            except _core.AuditBlockError as exc:
                logger.error("audit: block %d skipped: %s", block_id, exc)
                continue
            first_id = block_id * _core.AUDIT_BLOCK_RECORDS
            for place, (ts, statement, sha256, duration_ms, rows, outcome, session) in enumerate(
                records
            ):
                if since is not None and ts < since:
                    continue
                record = AuditRecord(
                    id=first_id + place,
                    ts=ts,
                    app=block_app,
                    alias=block_alias,
                    statement=statement,
                    statement_sha256=sha256,
                    duration_ms=duration_ms,
                    rows=rows,
                    outcome=outcome,
                    session=session,
                )
                entry = (_newest_first(record), record)
                if len(kept) < limit:
                    heapq.heappush(kept, entry)
                elif entry[0] > kept[0][0]:
                    heapq.heapreplace(kept, entry)
    return [record for _, record in kept]


def _from_rows(
    conn: Connection, app: str | None, alias: str | None, since: float | None, limit: int
) -> list[AuditRecord]:
    """The newest ``limit`` records of earlier versions, a row each."""
    where, params = _filters(app, alias, since, "ts")
    rows = conn.execute(
        "SELECT id, ts, app, alias, statement, statement_sha256, duration_ms, rows, outcome,"
        f" session FROM pg_audit{where} ORDER BY ts DESC, id DESC LIMIT ?",
        [*params, limit],
    ).fetchall()
    # The columns in AuditRecord's order.
    return [AuditRecord(*row) for row in rows]
