"""The request ledger: one hash-chained row per routed request.

For: :class:`LedgerEntry` (who asked, what ran where, tokens, cost, what a
budget shift avoided paying, every failover hop and the router's reason),
and :class:`Ledger`, which takes entries on the request path without
waiting (a list append) and writes them in batches from one background
task (``run``) in a niced thread of its own: one transaction per batch
keeps the per-request cost to microseconds. Also the audit events
(``audit``) on the same path, and the reads FinOps needs (spend per budget
since a time, rows for a report).

Not for: budgets' arithmetic (:mod:`qmesh.finops.budgets`; the in-memory
book is updated at settlement, before the row is written) or the chain
itself (:mod:`qmesh.finops.chain`).

Durability: a batch is written at most ``FLUSH_INTERVAL_S`` after its
requests finished; a crash loses at most that much of the ledger (the
budgets re-read the ledger at start-up, so they under-count by the same).
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Final, TypeAlias

import attrs
import trio

from qmesh.background import BackgroundThread, loop_takes_turns
from qmesh.finops.chain import Column, append_rows, load_chain_key
from qmesh.state import DATABASE_ERRORS, StateError, StateStore
from qmesh.state.db import Connection

__all__ = [
    "BACKLOG_ROWS",
    "FLUSH_INTERVAL_S",
    "AuditEvent",
    "Hop",
    "KeptPrompt",
    "Ledger",
    "LedgerEntry",
    "Observer",
    "read_prompts",
    "read_rows",
    "spent_since",
]

log = logging.getLogger(__name__)

FLUSH_INTERVAL_S: Final = 0.05
MAX_BATCH: Final = 1024
MAX_PENDING: Final = 100_000
"""Ledger rows a Gate keeps waiting for its database (a few tens of MB);
past it, new LLM requests are refused until they are written."""
BACKLOG_ROWS: Final = 8 * MAX_BATCH
"""Rows waiting past which the writer is behind (:meth:`Ledger.backlog`)."""
_WRITER: Final = BackgroundThread("qmesh ledger writer")
"""Where every ledger of the process writes its batches: one thread at a
lower priority, so that a batch takes the time requests leave idle."""


Hop: TypeAlias = Mapping[str, object]
"""One attempt of a request: ``{"candidate", "outcome", "ms", ...}``."""


@attrs.define
class LedgerEntry:
    """One request's row. Not frozen, only because a frozen class's
    constructor costs three times as much (2 µs, once per request on the
    event loop): nothing changes an entry once it is recorded."""

    ts: float
    request_id: str
    app: str
    budget: str | None
    task: str
    candidate: str
    kind: str
    model: str
    provider: str | None
    tokens_in: int
    tokens_out: int
    cost_usd: float
    shifted_from: str | None
    avoided_usd: float
    """What the paid candidate the budget shifted away from would have cost."""
    outcome: str
    """``ok``, ``error``, ``stream_broken``, ``refused``."""
    hops: str
    """JSON list of ``{"candidate", "outcome", "ms"}``."""
    reason: str

    def values(self) -> tuple[Column, ...]:
        # The fields by hand: attrs.astuple costs more than the rest of a
        # row's write.
        return (
            self.ts, self.request_id, self.app, self.budget, self.task, self.candidate,
            self.kind, self.model, self.provider, self.tokens_in, self.tokens_out,
            self.cost_usd, self.shifted_from, self.avoided_usd, self.outcome, self.hops,
            self.reason,
        )  # fmt: skip


Observer: TypeAlias = Callable[[Sequence[LedgerEntry], Sequence[Sequence[Hop]]], None]
"""Told of entries as they are recorded (:attr:`Ledger.observers`): the
entries, and each one's hops as objects."""


@attrs.frozen
class AuditEvent:
    ts: float
    actor: str
    action: str
    detail: str  # JSON

    def values(self) -> tuple[Column, ...]:
        return (self.ts, self.actor, self.action, self.detail)


@attrs.frozen
class KeptPrompt:
    """What the ledger keeps of one request's prompt and answer, for an app
    whose policy asks (``llm.keep``): their SHA-256 (``hash``) or the text."""

    ts: float
    request_id: str
    app: str
    kept: str
    """``hash`` or ``text``."""
    prompt: str
    answer: str

    def values(self) -> tuple[Column, ...]:
        return (self.ts, self.request_id, self.app, self.kept, self.prompt, self.answer)


class Ledger:
    """Buffered, chained writes of ledger rows, audit events and kept prompts."""

    def __init__(self, store: StateStore, *, master_key: bytes | None = None) -> None:
        """``master_key``: the vault's, which seals the chain key on PostgreSQL."""
        self.store = store
        self._key = load_chain_key(store, master_key=master_key)
        self._entries: list[LedgerEntry] = []
        self._events: list[AuditEvent] = []
        self._prompts: list[KeptPrompt] = []
        self._wakeup = trio.Event()
        self._buffered = trio.Event()
        """Set by the first row after an empty buffer: an idle Gate's ledger
        task sleeps on it instead of waking every ``FLUSH_INTERVAL_S``."""
        # One flush at a time: a caller's flush() must not return while the
        # background flush still has rows in a worker thread.
        self._flush_lock = trio.Lock()
        self.written = 0
        self._uncertain = False
        """The last write failed: it may have committed all the same."""
        self._progress = trio.Event()
        """Set when a batch is written (then replaced)."""
        self.observers: list[Observer] = []
        """Told of every entry as it is recorded, with its hops as objects
        (the Gate's metrics and dashboard): called on the request path, so
        they must be cheap."""

    def record(self, entry: LedgerEntry, hops: Sequence[Hop] | None = None) -> None:
        """Buffer ``entry``. ``hops``: what its ``hops`` column says, as
        objects, when the caller has them (else observers get them parsed)."""
        if hops is None and self.observers:
            hops = _parse_hops(entry.hops)
        self.record_many((entry,), (hops or (),))

    def record_many(self, entries: Sequence[LedgerEntry], hops: Sequence[Sequence[Hop]]) -> None:
        """Buffer ``entries``, ``hops`` holding each one's as objects."""
        if not entries:
            return
        self._entries.extend(entries)
        self._buffered.set()
        for observer in self.observers:
            observer(entries, hops)
        if len(self._entries) >= MAX_BATCH:
            self._wakeup.set()

    def audit(self, actor: str, action: str, detail: dict[str, Any]) -> None:
        self._events.append(
            AuditEvent(time.time(), actor, action, json.dumps(detail, sort_keys=True))
        )
        self._buffered.set()

    def keep(self, prompt: KeptPrompt) -> None:
        """Buffer what is kept of a request's prompt and answer."""
        self._prompts.append(prompt)
        self._buffered.set()

    @property
    def pending(self) -> int:
        return len(self._entries) + len(self._events) + len(self._prompts)

    def backlog(self) -> Awaitable[None] | None:
        """What to await before serving more requests while the writer is
        behind: the next batch written. None while it keeps up, and while
        its writes fail (the database is away: :attr:`full` then refuses
        requests, where waiting would only hold them).

        Why: under a load that saturates the Gate's cores, the writer (at
        a lower priority, see :mod:`qmesh.background`) gets less time than
        its rows need. Waiting here slows the requests to what the books
        can keep, rather than refusing them once :data:`MAX_PENDING` rows
        wait."""
        if self.pending < BACKLOG_ROWS or self._uncertain:
            return None
        return self._progress.wait()

    @property
    def full(self) -> bool:
        """As many rows wait for the database as a Gate keeps: new requests
        are refused until they are written (:data:`MAX_PENDING`)."""
        return self.pending >= MAX_PENDING

    def _write(
        self,
        entries: Sequence[LedgerEntry],
        events: Sequence[AuditEvent],
        prompts: Sequence[KeptPrompt],
    ) -> None:
        with self.store._write(announce=False) as conn:
            if self._uncertain:
                # The last write failed, perhaps after it committed (the
                # answer to COMMIT lost with the connection, as when the
                # database fails over): rows it stored are not stored twice.
                entries, events = _not_yet_written(conn, entries, events)
                prompts = _prompts_not_yet_written(conn, prompts)
            # Short turns on the core, when an event loop makes way for them.
            turns = loop_takes_turns()
            for chain, rows in (("ledger", entries), ("audit", events), ("prompts", prompts)):
                if rows:
                    values = [row.values() for row in rows]
                    append_rows(conn, self._key, chain, values, take_turns=turns)

    async def flush(self) -> None:
        """Write everything buffered now; rows leave the buffer only once
        written, so a failed write is retried by the next flush."""
        async with self._flush_lock:
            while self._entries or self._events or self._prompts:
                entries, events = self._entries[:MAX_BATCH], self._events[:]
                prompts = self._prompts[:MAX_BATCH]
                try:
                    await _WRITER.run(functools.partial(self._write, entries, events, prompts))
                except BaseException:
                    self._uncertain = True
                    raise
                self._uncertain = False
                # Only flush removes, only record/audit append (at the end):
                # the prefix written is still the prefix.
                del self._entries[: len(entries)]
                del self._events[: len(events)]
                del self._prompts[: len(prompts)]
                self.written += len(entries)
                progress, self._progress = self._progress, trio.Event()
                progress.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Flush ``FLUSH_INTERVAL_S`` after rows arrive in an empty buffer
        (sooner when a batch fills) until cancelled; the last flush on the way
        out is shielded."""
        task_status.started()
        try:
            while True:
                if not self.pending:
                    self._buffered = trio.Event()
                    await self._buffered.wait()
                with trio.move_on_after(FLUSH_INTERVAL_S):
                    await self._wakeup.wait()
                self._wakeup = trio.Event()
                try:
                    await self.flush()
                except (StateError, *DATABASE_ERRORS) as exc:
                    log.warning("writing the ledger failed (%s); will retry", exc)
                except Exception:
                    log.exception("writing the ledger failed; will retry")
        finally:
            with trio.CancelScope(shield=True):
                try:
                    await self.flush()
                except Exception:
                    log.exception("final ledger flush failed")


def _parse_hops(column: str) -> list[Hop]:
    try:
        hops = json.loads(column) if column else []
    except ValueError:
        return []
    return [hop for hop in hops if isinstance(hop, dict)] if isinstance(hops, list) else []


def _not_yet_written(
    conn: Connection, entries: Sequence[LedgerEntry], events: Sequence[AuditEvent]
) -> tuple[list[LedgerEntry], list[AuditEvent]]:
    """The entries and events not in the books yet (each found by its time
    and its own fields; rows since the oldest of them, a few seconds' worth)."""
    since = min([e.ts for e in entries] + [e.ts for e in events], default=0.0)
    stored_entries = {
        (row[0], row[1])
        for row in conn.execute(
            "SELECT ts, request_id FROM qg_ledger WHERE ts >= ?", (since,)
        ).fetchall()
    }
    stored_events = {
        (row[0], row[1], row[2])
        for row in conn.execute(
            "SELECT ts, actor, action FROM qg_audit WHERE ts >= ?", (since,)
        ).fetchall()
    }
    return (
        [e for e in entries if (e.ts, e.request_id) not in stored_entries],
        [e for e in events if (e.ts, e.actor, e.action) not in stored_events],
    )


def _prompts_not_yet_written(conn: Connection, prompts: Sequence[KeptPrompt]) -> list[KeptPrompt]:
    since = min((p.ts for p in prompts), default=0.0)
    stored = {
        (row[0], row[1])
        for row in conn.execute(
            "SELECT ts, request_id FROM qg_prompts WHERE ts >= ?", (since,)
        ).fetchall()
    }
    return [p for p in prompts if (p.ts, p.request_id) not in stored]


def read_prompts(store: StateStore, *, app: str | None = None, limit: int = 50) -> list[KeptPrompt]:
    """The newest ``limit`` kept prompts (of ``app``), oldest first."""
    where, args = ("WHERE app = ?", (app,)) if app is not None else ("", ())
    with store._read() as conn:
        rows = conn.execute(
            "SELECT ts, request_id, app, kept, prompt, answer FROM qg_prompts"
            f" {where} ORDER BY id DESC LIMIT ?",
            (*args, max(1, limit)),
        ).fetchall()
    return [KeptPrompt(*row) for row in reversed(rows)]


def spent_since(store: StateStore, since: float) -> dict[str | None, float]:
    """Cost per budget name of ledger rows at or after ``since``."""
    with store._read() as conn:
        rows = conn.execute(
            "SELECT budget, SUM(cost_usd) FROM qg_ledger WHERE ts >= ? GROUP BY budget", (since,)
        ).fetchall()
    return {row[0]: float(row[1] or 0.0) for row in rows}


def read_rows(store: StateStore, since: float = 0.0) -> list[dict[str, Any]]:
    """Ledger rows at or after ``since`` as dicts, oldest first."""
    with store._read() as conn:
        cursor = conn.execute(
            "SELECT id, ts, request_id, app, budget, task, candidate, kind, model, provider,"
            " tokens_in, tokens_out, cost_usd, shifted_from, avoided_usd, outcome, hops, reason"
            " FROM qg_ledger WHERE ts >= ? ORDER BY id",
            (since,),
        )
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
