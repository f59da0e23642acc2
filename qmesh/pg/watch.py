"""What the Gate watches in a Postgres session's messages: the statement
guard and the audit.

For: one session's bookkeeping, whichever relay carries its bytes (the
Rust engine's tap, the Python relay of :mod:`qmesh.pg.relay`, or a
transaction-mode session of :mod:`qmesh.pg.multiplex`): the statement guard
on Query, Parse and FunctionCall (read-only and statement-timeout
policies, :mod:`qmesh.pg.guard`), the audit's statement texts, portal and
statement names, and the outcomes that end each statement, and the
read-only watch of the server's ParameterStatus reports.

Not for: finding message boundaries (the scanners) or moving bytes.
"""

from __future__ import annotations

import logging
import struct
from collections import deque
from typing import Final

import attrs

from qmesh import _core
from qmesh.pg.audit import AuditLog
from qmesh.pg.guard import (
    READ_ONLY_SQLSTATE,
    Refusal,
    check_statement,
    parameter_count,
    refusal_sql,
    screen_words,
)
from qmesh.pg.login import PgSessionError
from qmesh.pg.policy import AppPolicy

__all__ = ["MAX_TRACKED_BYTES", "MAX_TRACKED_STATEMENTS", "SessionOver", "SessionWatch"]

log = logging.getLogger(__name__)

MAX_TRACKED_STATEMENTS: Final = 10_000
"""Prepared statement and portal names remembered per session for the audit."""
MAX_TRACKED_BYTES: Final = 16 << 20
"""Bytes of those names and their texts, statements and portals apart (a
text shared by a statement and its portals counted for each): the engine's
bounds (``statements.rs``), so a session audits alike on either path."""
UNANSWERED: Final = "unanswered"
"""The audit's outcome for a statement that had no answer when the session
ended: it may have reached the server and run."""

_Q, _P, _B, _E, _C, _S, _F = (ord(c) for c in "QPBECSF")
_Z, _I, _SUSPENDED = (ord(c) for c in "ZIs")
_ERROR = ord("E")
_PSTATUS = ord("S")
_SET_CONFIG_OID: Final = 2078  # pg_catalog.set_config(text, text, boolean)
# A FunctionCall of OID 0: the server answers "function with OID 0 does not
# exist" and ReadyForQuery; sent in place of a refused fast-path call.
_NO_FUNCTION_CALL: Final = _core.encode_message(_F, b"\0\0\0\0\0\0\0\0\0\0")
_UNKNOWN_STATEMENT: Final = b"<statement prepared before the audit could see it>"


class SessionOver(Exception):
    """The relay must end; ``error`` (if any) is sent to the client first."""

    def __init__(self, error: PgSessionError | None) -> None:
        super().__init__(error.message if error else "session over")
        self.error = error


@attrs.define(slots=True)
class _Pending:
    """One statement (or a Sync/FunctionCall) waiting for its results."""

    kind: int  # _Q (simple query), _E (execute), _S (sync or function call)
    text: bytes
    started: float
    rows: int | None = None
    error: str | None = None


_STATEMENT_HEAD: Final = struct.Struct(">dq5s")


def statement_record(raw: bytes) -> _Pending:
    """A statement record of the engine's: when it started (``f64``), its
    rows (``i64``, -1 for none), its SQLSTATE (5 bytes, zeros for none), its
    kind (``Q``, ``E`` or ``S``, or ``P`` and ``B`` for the texts of the
    unnamed statement and portal), then its text, as the client sent it."""
    started, rows, state = _STATEMENT_HEAD.unpack_from(raw)
    kind, text = raw[_STATEMENT_HEAD.size], raw[_STATEMENT_HEAD.size + 1 :]
    error = None if state == b"\0" * 5 else state.decode("ascii", "replace")
    return _Pending(kind, text, started, None if rows < 0 else rows, error)


class _Names:
    """The texts behind one kind of the client's names (statements, or
    portals). Past either bound the oldest is forgotten for each new one:
    only its text for the audit is lost; the server still has it."""

    __slots__ = ("bytes", "texts")

    def __init__(self) -> None:
        self.texts: dict[bytes, bytes] = {}
        self.bytes = 0

    def text(self, name: bytes) -> bytes:
        """The text behind ``name``, or a marker for one the audit never saw."""
        return self.texts.get(name, _UNKNOWN_STATEMENT)

    def forget(self, name: bytes) -> None:
        text = self.texts.pop(name, None)
        if text is not None:
            self.bytes -= len(name) + len(text)

    def remember(self, name: bytes, text: bytes) -> None:
        """``name`` stands for ``text`` from now on; one larger than the
        whole bound is forgotten instead."""
        self.forget(name)
        size = len(name) + len(text)
        if size > MAX_TRACKED_BYTES:
            return
        while self.texts and (
            len(self.texts) >= MAX_TRACKED_STATEMENTS or self.bytes + size > MAX_TRACKED_BYTES
        ):
            self.forget(next(iter(self.texts)))  # oldest first
        self.texts[name] = text
        self.bytes += size


class SessionWatch:
    """The guard and the audit of one session."""

    def __init__(
        self,
        audit: AuditLog | None,
        app_id: str,
        alias: str,
        policy: AppPolicy,
        *,
        session: str | None = None,
    ) -> None:
        self.app_id = app_id
        self.alias = alias
        self.session = session
        """Named in each audit record: the edge and the process id the client was told."""
        self.read_only = policy.read_only
        self.guard_timeout = policy.statement_timeout_ms is not None
        self.guard = self.read_only or self.guard_timeout
        self.audit_mode = policy.audit_statements
        self.audit = audit if self.audit_mode != "off" else None
        self.pending: deque[_Pending] = deque()
        self.statements = _Names()
        self.portals = _Names()

    def tap_spec(
        self,
        *,
        frontend: tuple[bytes, bytes] | None = None,
        backend: bytes | None = None,
        guard: bytes | None = None,
    ) -> _core.TapSpec:
        """The relay engine's scanners for this session, reporting these
        kinds: with the words a statement must name for the guard to judge
        it (the engine lets the others through itself), and the read-only
        watch of the server's side, decided in the engine."""
        return _core.TapSpec(
            frontend=frontend,
            backend=backend,
            guard=guard,
            guard_screen=screen_words(read_only=self.read_only, guard_timeout=self.guard_timeout),
            read_only=self.read_only,
        )

    def frontend(self, tag: int, raw: bytes, now: float, *, check: bool = True) -> bytes:
        """Look at one reported client message, seen at ``now``
        (``time.monotonic()``); return the bytes to send in its place (relay
        mode uses them; observe mode ignores them). ``check``: whether the
        statement guard (if the session has one) must look at it."""
        guard = self.guard and check
        # Query, Parse and (under the guard) FunctionCall arrive whole. Bind,
        # Execute and Close may come as a peek, the first 1024 bytes of the
        # body: room for any name Postgres tells apart (it compares only the
        # first 63 bytes).
        try:
            if tag == _Q:
                sql = _core.parse_query(raw[5:])
                if guard:
                    raw = self._guard_query(sql, raw)
                if self.audit is not None:
                    self.pending.append(_Pending(_Q, sql, now))
            elif tag == _P:
                name, sql, declared = _core.parse_parse(raw[5:])
                if guard:
                    raw = self._guard_parse(name, sql, len(declared), raw)
                if self.audit is not None:
                    self.statements.remember(name, sql)
            elif tag == _B:
                names = _core.parse_bind_names(raw[5:])
                if names is not None and self.audit is not None:
                    portal, statement = names
                    text = self.statements.text(statement)
                    self.portals.remember(portal, text)
            elif tag == _E:
                if self.audit is not None:
                    portal, _ = _core.parse_execute(raw[5:])
                    text = self.portals.text(portal)
                    self.pending.append(_Pending(_E, text, now))
            elif tag == _C:
                if self.audit is not None:
                    kind, name = _core.parse_close(raw[5:])
                    (self.statements if kind == "S" else self.portals).forget(name)
            elif tag == _S:
                if self.audit is not None:
                    self.pending.append(_Pending(_S, b"", now))
            elif tag == _F:
                # Only the guard needs the function; observe mode sees a peek.
                if guard and _core.parse_function_call(raw[5:]) == _SET_CONFIG_OID:
                    log.warning("refused a fast-path set_config call of app %r", self.app_id)
                    raw = _NO_FUNCTION_CALL
                if self.audit is not None:
                    self.pending.append(_Pending(_S, b"", now))
        except (ValueError, _core.PgWireError) as exc:
            raise SessionOver(
                PgSessionError("08P01", f"qmesh: malformed client message: {exc}")
            ) from None
        return raw

    def _refusal(self, text: str, what: str) -> Refusal | None:
        """The guard's refusal of statement ``text`` (logged), or None."""
        refusal = check_statement(text, read_only=self.read_only, guard_timeout=self.guard_timeout)
        if refusal is not None:
            log.warning("refused %s of app %r: %s", what, self.app_id, refusal.message)
        return refusal

    def _guard_query(self, sql: bytes, raw: bytes) -> bytes:
        refusal = self._refusal(sql.decode("utf-8", "replace"), "a statement")
        if refusal is None:
            return raw
        return _core.encode_query(refusal_sql(refusal))

    def _guard_parse(self, name: bytes, sql: bytes, declared: int, raw: bytes) -> bytes:
        """``raw`` (a Parse of ``sql`` as ``name`` with ``declared``
        parameter types), or what to send in its place."""
        text = sql.decode("utf-8", "replace")
        refusal = self._refusal(text, "a prepared statement")
        if refusal is None:
            return raw
        # bytea accepts any parameter bytes, in text or binary format, so
        # the client's Bind still fits and Execute is what fails.
        types = [17] * parameter_count(text, declared)
        return _core.encode_parse(name, refusal_sql(refusal), types)

    # -- server → client ---------------------------------------------------------

    def backend(self, tag: int, raw: bytes, now: float) -> None:
        if tag == _PSTATUS:
            if self.read_only:
                name, value = _core.parse_parameter_status(raw[5:])
                if name == "default_transaction_read_only" and value != "on":
                    raise self.read_only_lifted(now)
            return
        pending = self.pending
        if tag == _Z:
            self._ready(now)
            return
        if not pending:
            return
        head = pending[0]
        if tag == _C:
            _, rows = _core.parse_command_complete(raw[5:])
            if rows is not None:
                head.rows = (head.rows or 0) + rows
            if head.kind == _E:
                self._finish(pending.popleft(), "ok", now)
        elif tag == _ERROR:
            sqlstate = _core.parse_error_fields(raw[5:]).get("C", "XX000")
            if head.kind == _Q:
                head.error = head.error or sqlstate
            elif head.kind == _E:
                self._finish(pending.popleft(), f"error:{sqlstate}", now)
        elif tag in (_I, _SUSPENDED) and head.kind == _E:
            self._finish(pending.popleft(), "ok", now)

    def author(self) -> _core.AuditAuthor | None:
        """Where the engine records this session's statements itself (each
        simple Query with its rows and outcome, no Python on the way); None
        with the audit off."""
        if self.audit is None:
            return None
        return self.audit.author(
            app=self.app_id, alias=self.alias, mode=self.audit_mode, session=self.session
        )

    def hand_audit_to_engine(self) -> _core.AuditAuthor | None:
        """The author through which the session's engine records its
        statements itself from now on (None with the audit off); this watch
        then only guards."""
        author = self.author()
        self.audit = None
        return author

    def engine_statements(self, records: list[_core.TapRecord]) -> None:
        """Statements that were still running when the engine's part ended,
        and the texts of the client's unnamed statement and portal
        (``_core.STATEMENT_RUNNING``, each ``raw`` as :func:`statement_record`
        reads it): followed here from now on."""
        if self.audit is None:
            return
        for _at, _from_client, kind, raw, _held in records:
            if kind != _core.STATEMENT_RUNNING:
                continue
            item = statement_record(raw)
            if item.kind == _P:
                self.statements.remember(b"", item.text)
            elif item.kind == _B:
                self.portals.remember(b"", item.text)
            else:
                self.pending.append(item)

    def engine_prepared(self, name: bytes, text: bytes) -> None:
        """A named statement the client prepared while the engine relayed
        its session: followed here from now on."""
        if self.audit is not None:
            self.statements.remember(name, text)

    def read_only_lifted(self, now: float) -> SessionOver:
        """The server reported this read-only session's setting turned off:
        the statement being answered is recorded as ended by it (25006),
        and the session ends with the reason (those behind it: :meth:`close`)."""
        if self.audit is not None and self.pending and self.pending[0].kind != _S:
            self._finish(self.pending.popleft(), f"error:{READ_ONLY_SQLSTATE}", now)
        return SessionOver(
            PgSessionError(
                READ_ONLY_SQLSTATE,
                "qmesh: this application's sessions are read-only and the session "
                "tried to turn that off; it has been ended",
            )
        )

    def close(self, now: float) -> None:
        """The session is over: the statements that had no answer are
        recorded as ``unanswered`` (they may have reached the server and run)."""
        if self.audit is not None:
            for item in self.pending:
                if item.kind != _S:
                    self._finish(item, UNANSWERED, now)
        self.pending.clear()

    def _ready(self, now: float) -> None:
        """ReadyForQuery ends a simple query, or everything up to a Sync."""
        pending = self.pending
        while pending:
            item = pending.popleft()
            if item.kind == _Q:
                self._finish(item, f"error:{item.error}" if item.error else "ok", now)
                break
            if item.kind == _S:
                break
            # An Execute the server skipped after an earlier error.
            self._finish(item, "skipped", now)

    def _finish(self, item: _Pending, outcome: str, now: float) -> None:
        assert self.audit is not None
        self.audit.record(
            app=self.app_id,
            alias=self.alias,
            statement=item.text,
            duration_s=now - item.started,
            rows=item.rows,
            outcome=outcome,
            mode=self.audit_mode,
            session=self.session,
        )
