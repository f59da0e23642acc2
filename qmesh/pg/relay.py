"""Both directions of one logged-in Postgres session at the Gate.

For: relaying between the client's tunnel stream and the real server, in
the tunnel engine (no Python per message, TLS to the server included) where
it can, in Python where bytes were read ahead during the login. Only the messages that the
policy needs are looked at: Query/Parse/FunctionCall text (the read-only and
statement-timeout guard, :mod:`qmesh.pg.guard`), Bind/Execute/Close/Sync
(audit bookkeeping), CommandComplete/ErrorResponse/ReadyForQuery (audit
outcomes), ParameterStatus (the read-only watch). DataRows and COPY data are
never copied or buffered.

Not for: login (:mod:`qmesh.pg.login`), admission and live-session control
(:mod:`qmesh.pg.service`).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final

import attrs
import trio

from qmesh import _core
from qmesh.fastsocket import FastSocketStream, fast
from qmesh.pg.audit import AuditLog
from qmesh.pg.guard import (
    Refusal,
    check_statement,
    parameter_count,
    refusal_sql,
    screen_words,
)
from qmesh.pg.login import PgSessionError, Upstream, error_response
from qmesh.pg.policy import AppPolicy
from qmesh.tls import TlsStream
from qmesh.tunnel.stream import TunnelStream

log = logging.getLogger(__name__)

RECEIVE_SIZE: Final = 64 * 1024
MAX_TRACKED_STATEMENTS: Final = 10_000
"""Prepared statement and portal names remembered per session for the audit."""


_Q, _P, _B, _E, _C, _S, _F = (ord(c) for c in "QPBECSF")
_Z, _I, _SUSPENDED = (ord(c) for c in "ZIs")
_ERROR = ord("E")
_PSTATUS = ord("S")

# The message kinds each scanner reports, by what looks at them. A scanner
# copies only the kinds it is asked for (DataRows and COPY data never), so
# each set is as small as its reader allows.

GUARDED: Final = b"QPF"
"""Client kinds the statement guard holds, whole, until checked: each can run
SQL (Query, Parse) or call a function directly (FunctionCall), and a refused
one is replaced before any of it reaches the server."""
AUDIT_STATEMENTS: Final = b"QP"
"""Client kinds the audit needs whole: the statement text of Query and Parse."""
AUDIT_NAMES: Final = b"BECS"
"""Client kinds the audit follows by their front only (a peek): Bind and
Execute name a portal, Close a statement or portal; Sync ends a batch."""
AUDIT_FASTPATH: Final = b"F"
"""FunctionCall: the audit only counts it (a peek); the guard holds it whole."""
AUDIT_OUTCOMES: Final = b"CEIZs"
"""Server kinds that end a statement for the audit: CommandComplete,
ErrorResponse, EmptyQueryResponse, ReadyForQuery, PortalSuspended."""
READ_ONLY_WATCH: Final = b"S"
"""ParameterStatus: a read-only session is ended if the server reports that
``default_transaction_read_only`` was turned off."""
_SET_CONFIG_OID: Final = 2078  # pg_catalog.set_config(text, text, boolean)
# A FunctionCall of OID 0: the server answers "function with OID 0 does not
# exist" and ReadyForQuery; sent in place of a refused fast-path call.
_NO_FUNCTION_CALL: Final = _core.encode_message(_F, b"\0\0\0\0\0\0\0\0\0\0")
_UNKNOWN_STATEMENT: Final = b"<statement prepared before the audit could see it>"


async def send_quietly(stream: TunnelStream, data: bytes) -> None:
    """Send ``data`` (an error) to the client and end the stream, giving up
    after 5 s and ignoring a broken stream."""
    try:
        with trio.move_on_after(5):
            await stream.send_all(data)
            await stream.send_eof()
            # Wait for the client to hang up, so the error is delivered
            # before the RESET that closing early would send.
            while await stream.receive_some():
                pass
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
        pass


@attrs.define(slots=True)
class _Pending:
    """One statement (or a Sync/FunctionCall) waiting for its results."""

    kind: int  # _Q (simple query), _E (execute), _S (sync or function call)
    text: bytes
    started: float
    rows: int | None = None
    error: str | None = None


@attrs.frozen
class _Tap:
    """A native relay's tap (:class:`qmesh.tunnel.stream.NativeTap`): the
    engine's scanners for the session, and the relay that hears them."""

    spec: _core.TapSpec
    on_records: Callable[[list[_core.TapRecord]], bytes | None]


class SessionOver(Exception):
    """The relay must end; ``error`` (if any) is sent to the client first."""

    def __init__(self, error: PgSessionError | None) -> None:
        super().__init__(error.message if error else "session over")
        self.error = error


class Relay:
    """Both directions of one logged-in session."""

    def __init__(
        self,
        audit: AuditLog | None,
        client: TunnelStream,
        upstream: Upstream,
        app_id: str,
        alias: str,
        policy: AppPolicy,
    ) -> None:
        self.client = client
        self.upstream = fast(upstream.stream)
        self.server_leftover = upstream.leftover
        self.app_id = app_id
        self.alias = alias
        self.read_only = policy.read_only
        self.guard_timeout = policy.statement_timeout_ms is not None
        self.audit_mode = policy.audit_statements
        self.audit = audit if self.audit_mode != "off" else None
        self.pending: deque[_Pending] = deque()
        self.statements: dict[bytes, bytes] = {}
        self.portals: dict[bytes, bytes] = {}
        self.sending_to_client = False
        self.guard = self.read_only or self.guard_timeout
        self.client_scanner = self._client_scanner()
        self.ending: SessionOver | None = None
        self.scope: trio.CancelScope | None = None

    def _client_scanner(self) -> _core.PgScanner:
        if self.guard:
            # Relay mode: the guarded kinds are collected whole, so a refused
            # one can be replaced before any of it reaches the server.
            peek = AUDIT_NAMES if self.audit is not None else b""
            return _core.PgScanner(frontend=True, full=GUARDED, peek=peek, relay=True)
        if self.audit is not None:
            # Observe mode: the input is forwarded as it is; the scanner
            # reports the messages the audit needs.
            peek = AUDIT_NAMES + AUDIT_FASTPATH
            return _core.PgScanner(frontend=True, full=AUDIT_STATEMENTS, peek=peek)
        return _core.PgScanner(frontend=True)  # framing and size checks only

    def end(self, ending: SessionOver) -> None:
        """End the session from outside (its key lost its standing)."""
        self._end(ending)

    def _end(self, ending: SessionOver | None) -> None:
        """End the session (both directions); the first reason given wins."""
        self.ending = self.ending or ending
        if self.scope is not None:
            self.scope.cancel()

    async def run(self, client_leftover: bytes) -> None:
        with trio.CancelScope() as self.scope:
            if self._native(client_leftover):
                await self._run_native()
            else:
                await self._run_in_python(client_leftover)
        self.scope = None
        ending = self.ending
        if ending is not None and ending.error is not None:
            exc = ending.error
            log.warning("pg session of app %r (alias %r) ended: %s %s",
                        self.app_id, self.alias, exc.sqlstate, exc.message)  # fmt: skip
            if not self.sending_to_client:
                await send_quietly(self.client, error_response(exc))
        else:
            with trio.move_on_after(5):
                try:
                    await self.client.send_eof()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass

    def _native(self, client_leftover: bytes) -> bool:
        """Whether the session's engine can relay this session: with nothing
        read ahead on either side (rare: clients wait for ReadyForQuery
        before their first query)."""
        if client_leftover or self.server_leftover:
            return False
        if isinstance(self.upstream, TlsStream):
            return not self.upstream.buffered
        return isinstance(self.upstream, FastSocketStream | trio.SocketStream)

    async def _run_native(self) -> None:
        """Relay in the tunnel engine: no Python per message. The engine
        checks the client's framing and limits and, with the audit on, hands
        the messages the audit needs to :meth:`_on_tap` in batches. With a
        statement guard it holds each Query, Parse and FunctionCall (and what
        follows) until :meth:`_on_tap` says what to send in its place: one
        trip through Python per statement, none per row or reply."""
        tls: _core.TlsSession | None = None
        if isinstance(self.upstream, TlsStream):
            upstream: trio.abc.Stream = self.upstream.transport
            tls = self.upstream.tls
        else:
            upstream = self.upstream
        assert isinstance(upstream, FastSocketStream | trio.SocketStream)
        audit = self.audit is not None
        if self.guard:
            # The engine collects the guarded kinds whole itself; the audit
            # still needs the statements the guard's screen lets through.
            frontend = (AUDIT_STATEMENTS, AUDIT_NAMES) if audit else (b"", b"")
        elif audit:
            frontend = (AUDIT_STATEMENTS, AUDIT_NAMES + AUDIT_FASTPATH)
        else:
            frontend = (b"", b"")
        # A read-only session's ParameterStatus reports are held until
        # checked: a session that got its read-only setting turned off is
        # ended before the client sees the statement succeed.
        spec = _core.TapSpec(
            frontend=frontend,
            backend=AUDIT_OUTCOMES if audit else (b"" if self.read_only else None),
            guard=GUARDED if self.guard else None,
            backend_guard=READ_ONLY_WATCH if self.read_only else None,
            guard_screen=screen_words(read_only=self.read_only, guard_timeout=self.guard_timeout),
        )
        outcome = await self.client.relay_native(
            upstream,
            # The session ends when the server's side ends.
            end_on_socket_eof=True,
            tap=_Tap(spec, self._on_tap),
            tls=tls,
        )
        if outcome.ending == _core.RelayEnding.POSTGRES:
            self._end(SessionOver(PgSessionError("08P01", f"qmesh: {outcome.detail}")))
        elif outcome.failed:
            log.debug("pg relay for app %r ended: %s %s", self.app_id, outcome.ending,
                      outcome.detail)  # fmt: skip

    def _on_tap(self, records: list[_core.TapRecord]) -> bytes | None:
        """Audit (and guard) what the engine saw, in order; the replacement
        for a held message, which ends the batch."""
        replacement = None
        try:
            for at, from_client, tag, raw, held in records:
                if from_client:
                    # Only held statements need the guard: the engine's
                    # screen passed the others (they name nothing guarded).
                    replacement = self._frontend_event(tag, raw, at, check=held)
                else:
                    self._backend_event(tag, raw, at)
                    replacement = raw if held else None
        except SessionOver as exc:
            self._end(exc)
            return None
        return replacement

    async def _run_in_python(self, client_leftover: bytes) -> None:
        async def guarded(pump: Any, data: bytes) -> None:
            # The session ends when the server's side ends, or on any error.
            # A client that hangs up cleanly has its EOF passed to the server,
            # which then closes its side.
            try:
                await pump(data)
                if pump != self.server_to_client:
                    return
                self._end(None)
            except SessionOver as exc:
                self._end(exc)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                log.debug("pg relay for app %r ended: %s", self.app_id, exc)
                self._end(None)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(guarded, self.client_to_server, client_leftover)
            nursery.start_soon(guarded, self.server_to_client, self.server_leftover)

    # -- client → server ---------------------------------------------------------

    async def client_to_server(self, data: bytes | bytearray) -> None:
        receive = self.client.receive_some
        send = self.upstream.send_all
        while True:
            if not data:
                data = await receive(RECEIVE_SIZE)
                if not data:
                    break
            data = self._from_client(data)
            if data:
                await send(data)
            data = b""
        try:
            self.client_scanner.eof()
        except _core.PgTruncated:
            raise SessionOver(
                PgSessionError("08P01", "qmesh: the client's stream ended inside a message")
            ) from None
        # The client hung up (after Terminate, normally): let the server know.
        if isinstance(self.upstream, trio.abc.HalfCloseableStream):
            await self.upstream.send_eof()
        else:
            await trio.aclose_forcefully(self.upstream)

    def _from_client(self, data: bytes | bytearray) -> bytes | bytearray:
        """Scan client bytes; what to send the server in their place.
        Raises SessionOver for input that must end the session."""
        on_event = self._frontend_event
        try:
            events = self.client_scanner.feed(data)
        except _core.PgWireError as exc:
            raise SessionOver(PgSessionError("08P01", f"qmesh: {exc}")) from None
        now = time.monotonic()
        if self.guard:
            return b"".join([raw if tag == 0 else on_event(tag, raw, now) for tag, raw in events])
        for tag, raw in events:
            on_event(tag, raw, now)
        return data

    def _frontend_event(self, tag: int, raw: bytes, now: float, *, check: bool = True) -> bytes:
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
                    self._remember(self.statements, name, sql)
            elif tag == _B:
                names = _core.parse_bind_names(raw[5:])
                if names is not None and self.audit is not None:
                    portal, statement = names
                    text = self.statements.get(statement, _UNKNOWN_STATEMENT)
                    self._remember(self.portals, portal, text)
            elif tag == _E:
                if self.audit is not None:
                    portal, _ = _core.parse_execute(raw[5:])
                    text = self.portals.get(portal, _UNKNOWN_STATEMENT)
                    self.pending.append(_Pending(_E, text, now))
            elif tag == _C:
                if self.audit is not None:
                    kind, name = _core.parse_close(raw[5:])
                    (self.statements if kind == "S" else self.portals).pop(name, None)
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

    def _remember(self, names: dict[bytes, bytes], name: bytes, text: bytes) -> None:
        if name not in names and len(names) >= MAX_TRACKED_STATEMENTS:
            names.pop(next(iter(names)))  # oldest first; only the audit text is lost
        names[name] = text

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

    async def server_to_client(self, data: bytes | bytearray) -> None:
        kinds = b""
        if self.audit is not None:
            kinds += AUDIT_OUTCOMES
        if self.read_only:
            kinds += READ_ONLY_WATCH
        scanner = _core.PgScanner(frontend=False, full=kinds) if kinds else None
        on_event = self._backend_event
        receive = self.upstream.receive_some
        send = self.client.send_all
        while True:
            if not data:
                data = await receive(RECEIVE_SIZE)
                if not data:
                    return
            if scanner is not None:
                now = time.monotonic()
                for tag, raw in scanner.feed(data):
                    on_event(tag, raw, now)
            self.sending_to_client = True
            await send(data)
            self.sending_to_client = False
            data = b""

    def _backend_event(self, tag: int, raw: bytes, now: float) -> None:
        if tag == _PSTATUS:
            if self.read_only:
                name, value = _core.parse_parameter_status(raw[5:])
                if name == "default_transaction_read_only" and value != "on":
                    raise SessionOver(
                        PgSessionError(
                            "25006",
                            "qmesh: this application's sessions are read-only and the session "
                            "tried to turn that off; it has been ended",
                        )
                    )
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
        )
