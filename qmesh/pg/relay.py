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
from collections.abc import Callable
from typing import Any, Final

import attrs
import trio

from qmesh import _core
from qmesh.fastsocket import FastSocketStream, fast
from qmesh.pg.audit import AuditLog
from qmesh.pg.login import PgSessionError, Upstream, error_response
from qmesh.pg.policy import AppPolicy
from qmesh.pg.watch import SessionOver, SessionWatch
from qmesh.tls import TlsStream
from qmesh.tunnel.stream import TunnelStream

log = logging.getLogger(__name__)

RECEIVE_SIZE: Final = 64 * 1024

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
``default_transaction_read_only`` was turned off (Python's relay watches for
it; the engine, told the session is read-only, watches itself)."""


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


async def end_client(
    client: TunnelStream,
    error: PgSessionError | None,
    app_id: str,
    alias: str,
    *,
    can_send: bool = True,
) -> None:
    """The end of a relayed session: the client gets ``error`` (logged) if
    there is one and nothing is half-sent to it, else its stream's end."""
    if error is not None:
        log.warning("pg session of app %r (alias %r) ended: %s %s",
                    app_id, alias, error.sqlstate, error.message)  # fmt: skip
        if can_send:
            await send_quietly(client, error_response(error))
        return
    with trio.move_on_after(5):
        try:
            await client.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


@attrs.frozen
class Tap:
    """A native relay's tap (:class:`qmesh.tunnel.stream.NativeTap`): the
    engine's scanners for the session, and the relay that hears them."""

    spec: _core.TapSpec
    on_records: Callable[[list[_core.TapRecord]], bytes | None]


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
        *,
        session: str | None = None,
    ) -> None:
        self.client = client
        self.upstream = fast(upstream.stream)
        self.server_leftover = upstream.leftover
        self.app_id = app_id
        self.alias = alias
        self.watch = SessionWatch(audit, app_id, alias, policy, session=session)
        self.read_only = self.watch.read_only
        self.guard_timeout = self.watch.guard_timeout
        self.guard = self.watch.guard
        self.audit = self.watch.audit
        self.sending_to_client = False
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
        try:
            with trio.CancelScope() as self.scope:
                if self._native(client_leftover):
                    await self._run_native()
                else:
                    await self._run_in_python(client_leftover)
        finally:
            self.watch.close(time.monotonic())
        self.scope = None
        ending = self.ending
        await end_client(
            self.client,
            ending.error if ending is not None else None,
            self.app_id,
            self.alias,
            can_send=not self.sending_to_client,
        )

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
        checks the client's framing and limits and, with the audit on,
        records each statement with its outcome itself. With a statement
        guard it holds each Query, Parse and FunctionCall that its screen
        cannot clear (and what follows) until :meth:`_on_tap` says what to
        send in its place: one trip through Python for those statements,
        none per row or reply."""
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
        spec = self.watch.tap_spec(
            frontend=frontend,
            backend=AUDIT_OUTCOMES if audit else None,
            guard=GUARDED if self.guard else None,
        )
        outcome = await self.client.relay_native(
            upstream,
            # The session ends when the server's side ends.
            end_on_socket_eof=True,
            tap=Tap(spec, self._on_tap),
            tls=tls,
            # The engine follows the audit's statements itself: Python sees
            # only the messages the guard holds.
            audit=self.watch.hand_audit_to_engine(),
        )
        if outcome.ending == _core.RelayEnding.POSTGRES:
            self._end(SessionOver(PgSessionError("08P01", f"qmesh: {outcome.detail}")))
        elif outcome.ending == _core.RelayEnding.READ_ONLY_OFF:
            # The engine recorded the statements it ended on (error:25006).
            self._end(self.watch.read_only_lifted(time.monotonic()))
        elif outcome.failed:
            log.debug("pg relay for app %r ended: %s %s", self.app_id, outcome.ending,
                      outcome.detail)  # fmt: skip

    def _on_tap(self, records: list[_core.TapRecord]) -> bytes | None:
        """Guard the client's statements the engine held (it audits the
        session and watches the server's side itself); the replacement for
        a held message, which ends the batch."""
        replacement = None
        try:
            for at, _from_client, tag, raw, held in records:
                # Only held statements need the guard: the engine's screen
                # passed the others (they name nothing guarded).
                replacement = self.watch.frontend(tag, raw, at, check=held)
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
        on_event = self.watch.frontend
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

    async def server_to_client(self, data: bytes | bytearray) -> None:
        kinds = b""
        if self.audit is not None:
            kinds += AUDIT_OUTCOMES
        if self.read_only:
            kinds += READ_ONLY_WATCH
        scanner = _core.PgScanner(frontend=False, full=kinds) if kinds else None
        on_event = self.watch.backend
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
