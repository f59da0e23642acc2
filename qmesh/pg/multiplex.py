"""Transaction pooling: one client session on whichever server connection
is free, one transaction at a time.

For: a client session of an app whose policy says ``pool_mode =
"transaction"``. The session borrows a server connection from its
:class:`~qmesh.pg.pool.ServerPool` when it sends the first message of a
transaction, and gives it back when the server reports ReadyForQuery
*idle* with no request of the client outstanding. Between transactions it
holds nothing, so thousands of clients share the few connections a server
allows.

What the client does not notice:

- **Prepared statements.** A named Parse is sent to the server under a name
  derived from its text and parameter types (``qmesh_`` and a hash), so
  clients that prepare the same statement share one server-side copy. The
  session remembers its own names; a Bind or Describe of a statement the
  current server connection lacks is preceded by a Parse qmesh injects,
  whose ParseComplete the client never sees. A Parse the connection
  already has is answered with a ParseComplete here, and a Close of a
  statement with a CloseComplete here (the server's copy stays for other
  clients). Answers made here are put in their place in the answer stream:
  every request whose answers are still to come is tracked in order, and
  after an error the server skips to the next Sync, and so does this
  tracking.
- **A broken server connection.** One broken while idle in the pool (a
  server restart, a ``pg_terminate_backend``) is found by the pool's check
  before it is lent. One that fails while lent ends that client's session
  with the server's error (or 08006); its messages are never sent again
  elsewhere, since the server may have run them.
- **The unnamed statement**, which PostgreSQL keeps across transactions,
  stays with its client: each connection knows whose it holds, and another
  client's Bind of the unnamed statement is preceded by that client's own
  Parse (or by a Close, for a client that has none).
- **Session state.** A statement that leaves state behind for the next
  transaction (:mod:`qmesh.pg.session_state`) *pins* the session to its
  connection, which is reset (``DISCARD ALL``) when the client leaves.
  ``DEALLOCATE ALL`` and ``DISCARD ALL`` run on the server, and the
  client's statements are forgotten. State built by dynamic SQL leaks to
  the next transaction, as in every transaction-mode pooler.

Where it runs: in the tunnel engine, without Python per transaction,
while the client sends what the engine follows (simple Queries and the
extended protocol with the unnamed portal, of statements that cannot leave
session state; see ``rust/qmesh-relay/src/pooled.rs``); from the first
message it does not (a named portal, a FunctionCall, COPY, a statement that
may pin), here, with the engine's statements and the answers it still
awaits, until the session stands unpinned between transactions again: then
back in the engine. With a statement guard, a statement that names one of
the guard's words moves the session here too, where the guard judges it.

Not for: the pool itself (:mod:`qmesh.pg.pool`), the guard and the audit
(:mod:`qmesh.pg.watch`, used here as in session mode), logins.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Final

import trio

from qmesh import _core
from qmesh._core import RelayEnding
from qmesh.pg.login import PgSessionError
from qmesh.pg.pool import ServerConn, ServerPool
from qmesh.pg.relay import Tap, end_client
from qmesh.pg.session_state import session_state_of
from qmesh.pg.watch import SessionOver, SessionWatch
from qmesh.tunnel.stream import TunnelStream

__all__ = ["PooledSession"]

log = logging.getLogger(__name__)

RECEIVE_SIZE: Final = 64 * 1024
MAX_CLIENT_STATEMENTS: Final = 10_000
"""Named prepared statements one client may hold at once."""
MAX_STATEMENT_BYTES: Final = 16 * 1024 * 1024
"""The Parse messages one client's named statements take, together: each is
kept to be prepared again on whichever connection serves the client."""
MAX_REQUESTS: Final = 100_000
"""Requests of one client whose answers are due at once (a pipeline longer
than this ends the session: answers made up here have no back-pressure)."""
SERVER_PREFIX: Final = b"qmesh_"

_Q, _P, _B, _D, _E, _C, _S, _F, _H, _X = (ord(c) for c in "QPBDECSFHX")
_COPY_DONE, _COPY_FAIL = ord("c"), ord("f")
_PARSED, _BOUND, _CLOSED = (ord(c) for c in "123")
_READY, _ERROR, _COPY_IN = ord("Z"), ord("E"), ord("G")

CLIENT_KINDS: Final = b"QPBDECSFHXcf"
"""Every client kind but COPY data: each is a request whose answers are
tracked, or (CopyDone, CopyFail) the end of a COPY FROM STDIN."""
SERVER_KINDS: Final = b"123TnCIsZEG"
"""The server kinds that end a request's answers, and CopyInResponse."""

# The tracked requests, in the order their answers will come: (kind, server
# statement name, client statement name, the client's statement before a Close
# made up here), what to undo if the server skips the request after an error.
_Request = tuple[int, bytes, bytes, "tuple[bytes, bytes] | None"]
_PARSE = 1  # a Parse sent on the client's behalf: ParseComplete, forwarded
_INJECTED = 2  # a Parse qmesh added: its ParseComplete is swallowed
_BIND = 3
_DESCRIBE = 4  # ends at RowDescription or NoData
_EXECUTE = 5  # ends at CommandComplete, EmptyQueryResponse or PortalSuspended
_CLOSE = 6
_SYNC = 7  # ends at ReadyForQuery
_QUERY = 8  # a simple Query or a FunctionCall: ends at ReadyForQuery
_FAKE_PARSED = 9  # a ParseComplete made here
_FAKE_CLOSED = 10  # a CloseComplete made here
_INJECTED_CLOSE = 11  # a Close of the unnamed statement qmesh added: swallowed
_COPY_END = 12  # the client ended a COPY FROM STDIN: no answer of its own
_PARSE_STAND_IN = 13  # the engine's Close for a Parse made nothing: answered ParseComplete
_PARSE_COMPLETE: Final = _core.encode_message(_PARSED, b"")
_CLOSE_COMPLETE: Final = _core.encode_message(_CLOSED, b"")
_CLOSE_UNNAMED: Final = _core.encode_message(_C, b"S\0")
_ENDS: Final = {_PARSE: b"1", _INJECTED: b"1", _BIND: b"2", _DESCRIBE: b"Tn",
                _EXECUTE: b"CIs", _CLOSE: b"3", _INJECTED_CLOSE: b"3", _SYNC: b"Z",
                _QUERY: b"Z", _PARSE_STAND_IN: b"3"}  # fmt: skip
_SWALLOWED: Final = frozenset({_INJECTED, _INJECTED_CLOSE})
# The answers the engine's relay left owed, by their kind (see PooledEnd.owed);
# its Close standing in for a client's Close is a Close of no server statement.
_OWED: Final = {"Q": _QUERY, "P": _PARSE, "B": _BIND, "D": _DESCRIBE, "E": _EXECUTE,
                "C": _CLOSE, "S": _SYNC, "i": _INJECTED, "p": _PARSE_STAND_IN,
                "c": _CLOSE}  # fmt: skip
_MADE_HERE: Final = frozenset({_FAKE_PARSED, _FAKE_CLOSED, _COPY_END})


def server_name(statement: bytes) -> bytes:
    """The server-side name of a statement, from what follows the name in
    its Parse (its text and parameter types): the same whoever prepares it."""
    return SERVER_PREFIX + hashlib.blake2b(statement, digest_size=12).hexdigest().encode()


class ServerBroken(Exception):
    """The server connection failed (closed, reset, or a FATAL error)."""


class PooledSession:
    """One client session in transaction mode."""

    def __init__(
        self,
        client: TunnelStream,
        pool: ServerPool,
        watch: SessionWatch,
    ) -> None:
        self.client = client
        self.pool = pool
        self.watch = watch
        self._conn: ServerConn | None = None
        """The connection this relay holds (the engine's: see :attr:`conn`)."""
        self.pinned = False
        self.statements: dict[bytes, tuple[bytes, bytes]] = {}
        """The client's statement names → (server name, the Parse to send)."""
        self._statement_bytes = 0
        self._unnamed: bytes | None = None
        """The client's unnamed statement (its Parse), to prepare again on a
        connection where another client's is: PostgreSQL keeps one across
        transactions, and a pooled connection must not lend it out."""
        self._requests: deque[_Request] = deque()
        self._skipping = False
        """After an error in the extended protocol the server skips to the
        next Sync: messages sent meanwhile get no answer and have no effect."""
        self._copy_in = False
        """In COPY FROM STDIN: the server ignores Sync and Flush until the
        client's CopyDone or CopyFail."""
        self._status: str | None = None
        """The server's transaction status at its last ReadyForQuery; None while
        a request is on its way."""
        self._server_fatal = False
        self._sending_to_client = False
        self._client_scanner = _core.PgScanner(frontend=True, full=CLIENT_KINDS, relay=True)
        self._server_kinds = SERVER_KINDS + (b"S" if watch.read_only else b"")
        self._send_lock = trio.Lock()
        self._attached = trio.Event()
        self.scope: trio.CancelScope | None = None
        self.ending: SessionOver | None = None
        self._in_engine = False
        self._back_to_engine = False  # this relay stopped for the engine to carry on
        self._done_here = 0  # transactions this relay ended since it (re)started
        self._backoff = 0  # ... and those it ends before the engine takes over again
        self._waiting = trio.CancelScope()  # the client pump's wait for the client's bytes

    # -- the session ---------------------------------------------------------------

    def end(self, ending: SessionOver) -> None:
        """End the session from outside (its key lost its standing)."""
        self.ending = self.ending or ending
        if self.scope is not None:
            self.scope.cancel()

    @property
    def conn(self) -> ServerConn | None:
        """The server connection running this client's transaction now
        (None between transactions), whether the engine or this relay holds it."""
        if self._in_engine:
            lease = self.client.pooled_lease()
            return None if lease is None else self.pool.conn(lease)
        return self._conn

    def server_key(self) -> tuple[int, bytes] | None:
        """The BackendKeyData of the connection running this client's
        transaction now, for a cancel request; None between transactions."""
        conn = self.conn
        return None if conn is None else conn.key

    async def run(self, client_leftover: bytes) -> None:
        """Relay until the client leaves, the server connection breaks, or
        :meth:`end`; then send the client the reason, and give the
        connection back in the state it is in."""
        try:
            with trio.CancelScope() as self.scope:
                engine = not client_leftover
                while not engine or await self._run_in_engine():
                    self._back_to_engine, self._done_here = False, 0
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._ending_all, self._server_pump, nursery)
                        await self._ending_all(self._client_pump, nursery, client_leftover)
                    if not self._back_to_engine:
                        break
                    engine, client_leftover = True, b""
            self.scope = None
        finally:
            self.watch.close(time.monotonic())
            await self._give_back()
        ending = self.ending
        error = ending.error if ending is not None else None
        await end_client(
            self.client,
            error,
            self.watch.app_id,
            self.watch.alias,
            can_send=not self._sending_to_client,  # never inside a half-sent message
        )

    async def _run_in_engine(self) -> bool:
        """Relay in the tunnel engine until the session ends there (False)
        or the client sends what only this relay follows (True: carry on
        here, with the connection of an open transaction block, if any)."""
        # With an author, the engine records each statement with its outcome
        # itself; those still running when its part ends come up the tap.
        self._in_engine = True
        # The client's statements are the engine's now; they come back in its outcome.
        statements = [(name, *statement) for name, statement in self.statements.items()]
        self.statements.clear()
        self._statement_bytes = 0
        try:
            outcome = await self.client.relay_native(
                None,
                tap=Tap(self.watch.tap_spec(), self._on_tap),
                pooled=self.pool.engine_spec(statements, self._unnamed),
                audit=self.watch.author(),
            )
        except BaseException:
            late = self.client.native_outcome
            if late is not None and late.pooled is not None:
                self._take_over(late.pooled)  # given back in run()'s finally
            raise
        finally:
            self._in_engine = False
        pooled = outcome.pooled
        if pooled is None:
            # The tunnel session was lost: the engine gave any connection
            # the client held back to the pool, to be closed.
            return False
        self._skipping = pooled.skipping
        self._unnamed = pooled.unnamed  # to parse again where it is not
        for name, target, parse in pooled.statements:
            self._remember(name, (target, parse))
            self.watch.engine_prepared(name, _core.parse_parse(parse[5:])[1])
        self._take_over(pooled)
        ending = outcome.ending
        if ending == RelayEnding.HANDBACK:
            # An engine part that ended no transaction bounced: end more here first.
            self._backoff = 0 if pooled.transactions else min(2 * self._backoff + 1, 63)
            return True
        if ending == RelayEnding.POOL_TIMEOUT:
            error = self.pool.open_failure or self.pool.timed_out()
            self.ending = self.ending or SessionOver(error)
        elif ending in (RelayEnding.SOCKET_EOF, RelayEnding.SOCKET, RelayEnding.READ_ONLY_OFF):
            # Broken, or keeping a setting (read-only turned off) no other client may get.
            conn, self._conn = self._conn, None
            if conn is not None:
                self.pool.release(conn, reusable=False)
            if ending == RelayEnding.READ_ONLY_OFF:
                self.ending = self.ending or self.watch.read_only_lifted(time.monotonic())
            lost = PgSessionError(
                "08006", f"qmesh: the connection to the database server was lost ({outcome.detail})"
            )
            # After a FATAL the server has told the client why.
            self.ending = self.ending or SessionOver(None if pooled.server_fatal else lost)
        elif ending == RelayEnding.POSTGRES:
            error = PgSessionError("08P01", f"qmesh: {outcome.detail}")
            self.ending = self.ending or SessionOver(error)
        return False

    def _take_over(self, pooled: _core.PooledEnd) -> None:
        """The engine's state at its end: the connection the client held, in
        the state it is in."""
        if pooled.lease is None:
            return
        self._conn = conn = self.pool.taken(pooled.lease, pooled.touched)
        if pooled.unnamed_held:
            conn.unnamed_owner = self
        # Each answer still owed ends as if its message had been sent here.
        self._requests.extend(
            (_OWED[kind], target, name, saved) for kind, target, name, saved in pooled.owed
        )
        # Cut inside an answer (the session ends): _give_back closes it.
        self._status = None if pooled.owed or pooled.server_mid_message else pooled.status
        self._attached.set()

    def _on_tap(self, records: list[_core.TapRecord]) -> bytes | None:
        """The audit's statements still running when the engine's part ended."""
        self.watch.engine_statements(records)
        return None

    async def _ending_all(
        self, pump: Callable[..., Awaitable[None]], nursery: trio.Nursery, *args: bytes
    ) -> None:
        """Run one direction; when it ends, for whatever reason, the session ends."""
        try:
            await pump(*args)
        except SessionOver as exc:
            self.ending = self.ending or exc
        except PgSessionError as exc:  # no server connection to be had
            self.ending = self.ending or SessionOver(exc)
        except (_core.PgWireError, ValueError) as exc:
            error = PgSessionError("08P01", f"qmesh: malformed client message: {exc}")
            self.ending = self.ending or SessionOver(error)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.debug("pooled pg session of app %r ended: %s", self.watch.app_id, exc)
        nursery.cancel_scope.cancel()

    def _may_go_back(self) -> bool:
        """Whether the engine may carry the session on from here (unpinned, idle)."""
        return (
            self._done_here > self._backoff
            and self._conn is None
            and not self.pinned
            and not self._requests
            and not self._skipping
            and not self._copy_in
            and not self._client_scanner.in_message
            and self.ending is None
        )

    def _idle_between_transactions(self) -> bool:
        """Whether the connection may serve another client now: nothing due,
        the server idle outside a transaction block, and the client not in
        the middle of a message (part of which the server may have seen)."""
        return not self._requests and self._status == "I" and not self._client_scanner.in_message

    async def _give_back(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        with trio.CancelScope(shield=True):
            if self._requests or self._status is None or self._client_scanner.in_message:
                # Answers still due, or a message cut short: mid-request.
                self.pool.release(conn, reusable=False)
            elif self.pinned or conn.dirty or self._status != "I":
                await self.pool.release_dirty(conn)
            else:
                self.pool.release(conn, reusable=True)

    # -- client → server -----------------------------------------------------------

    async def _client_pump(self, data: bytes) -> None:
        receive = self.client.receive_some
        while True:
            if not data:
                if self._may_go_back():
                    self._back_to_engine = True
                    return
                with trio.CancelScope() as self._waiting:
                    data = await receive(RECEIVE_SIZE)
                if self._waiting.cancelled_caught:
                    continue  # nothing was taken: look again whether to go back
                if not data:
                    return
            try:
                events = self._client_scanner.feed(data)
            except _core.PgWireError as exc:
                raise SessionOver(PgSessionError("08P01", f"qmesh: {exc}")) from None
            data, now, out = b"", time.monotonic(), list[bytes]()
            for tag, raw in events:
                if tag == _X:
                    if out:
                        await self._send_server(out)
                    return
                resets = False
                if tag != 0:
                    raw = self.watch.frontend(tag, raw, now)
                    resets = self._screen(tag, raw)
                conn = self._conn
                if conn is None:
                    if out:
                        await self._send_server(out)
                        out = []
                    conn = await self._attach()
                piece = self._to_server(conn, tag, raw)
                if piece:
                    out.append(piece)
                if resets:
                    # From this message on the server has none of them.
                    self.statements.clear()
                    self._statement_bytes = 0
                    conn.prepared.clear()
                    conn.dirty = True
            made = self._flush_made()
            if made:
                # Nothing is due before them: answer now (a client may wait
                # for its ParseComplete after a Flush).
                await self._send_client(made)
            if out:
                await self._send_server(out)

    async def _send_server(self, out: list[bytes]) -> None:
        conn = self._conn
        assert conn is not None
        try:
            await conn.stream.send_all(b"".join(out))
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise SessionOver(
                PgSessionError(
                    "08006", f"qmesh: the connection to the database server failed: {exc}"
                )
            ) from None

    def _screen(self, tag: int, raw: bytes) -> bool:
        """Pin the session by what a message leaves behind; whether it drops
        the session's prepared statements."""
        if tag == _F:
            # A fast-path call can be anything (set_config, a session
            # advisory lock, large-object descriptors): pin.
            self._pin("a fast-path function call")
            return False
        if tag != _Q and tag != _P:
            return False
        body = raw[5:]
        sql = _core.parse_query(body) if tag == _Q else _core.parse_parse(body)[1]
        state = session_state_of(sql)
        if state == "pin":
            self._pin("a statement that leaves session state")
        return state == "reset"

    def _pin(self, why: str) -> None:
        if not self.pinned:
            self.pinned = True
            log.info("pg session of app %r pinned to its server connection (%s)",
                     self.watch.app_id, why)  # fmt: skip

    async def _attach(self) -> ServerConn:
        """A server connection for the transaction that starts now."""
        conn = await self.pool.acquire()
        self._conn = conn
        self._attached.set()
        return conn

    def _to_server(self, conn: ServerConn, tag: int, raw: bytes) -> bytes:
        """What to send the server for one client message, renaming
        statements; tracks the answers due."""
        if tag == 0:
            return raw  # COPY data: no answer of its own
        if tag == _COPY_DONE or tag == _COPY_FAIL:
            self._copy_in = False
            self._expect(_COPY_END)
            return raw
        if tag == _H:
            return raw
        self._status = None
        if tag == _S:
            if self._copy_in:
                return raw  # ignored by the server in COPY FROM STDIN
            self._skipping = False
            self._expect(_SYNC)
            return raw
        if self._skipping:
            return raw  # discarded by the server until the next Sync
        if tag == _Q or tag == _F:
            if tag == _Q:  # a simple Query drops the unnamed statement
                self._unnamed = None
                conn.unnamed_owner = None
            self._expect(_QUERY)
            return raw
        if tag == _E:
            self._expect(_EXECUTE)
            return raw
        body = raw[5:]
        if tag == _P:
            return self._parse(conn, body, raw)
        if tag == _B:
            names = _core.parse_bind_names(body)
            if names is None:
                raise _core.PgMalformed("a Bind cut inside its names")
            portal, name = names
            prefix, target = self._statement_for(conn, name)
            self._expect(_BIND)
            if target is None:
                return prefix + raw
            rest = body[len(portal) + len(name) + 2 :]
            return prefix + _core.encode_message(_B, portal + b"\0" + target + b"\0" + rest)
        if tag == _D:
            kind, name = _core.parse_describe(body)
            prefix, target = (b"", None) if kind != "S" else self._statement_for(conn, name)
            self._expect(_DESCRIBE)
            if target is None:
                return prefix + raw
            return prefix + _core.encode_message(_D, b"S" + target + b"\0")
        if tag == _C:
            kind, name = _core.parse_close(body)
            if kind == "S" and name:
                saved = self._forget(name)
                if (
                    saved is not None
                    and saved[0] in conn.prepared
                    and len(conn.prepared) > self.pool.settings.max_prepared_per_server
                ):
                    # A connection held long (a pinned session, a long
                    # transaction) would gather statements without bound.
                    conn.prepared.discard(saved[0])
                    self._expect(_CLOSE, saved[0], client_name=name, saved=saved)
                    return _core.encode_message(_C, b"S" + saved[0] + b"\0")
                # The server's copy stays, for this client's next Parse of the
                # same text and for the other clients.
                self._expect(_FAKE_CLOSED, client_name=name, saved=saved)
                return b""
            if kind == "S":
                self._unnamed = None
                conn.unnamed_owner = self
            self._expect(_CLOSE)
            return raw
        raise SessionOver(PgSessionError("08P01", f"qmesh: unexpected client message {tag:#x}"))

    def _parse(self, conn: ServerConn, body: bytes, raw: bytes) -> bytes:
        name = _core.parse_parse(body)[0]  # checks the whole message
        if not name:
            self._unnamed = raw if len(raw) <= MAX_STATEMENT_BYTES else None
            conn.unnamed_owner = self
            self._expect(_PARSE)
            return raw
        if name in self.statements:
            raise SessionOver(
                PgSessionError(
                    "42P05",
                    f'qmesh: prepared statement "{name.decode("utf-8", "replace")}" already '
                    "exists (a pooled session cannot re-prepare a name it has not closed)",
                )
            )
        if (
            len(self.statements) >= MAX_CLIENT_STATEMENTS
            or self._statement_bytes + len(raw) > MAX_STATEMENT_BYTES
        ):
            raise SessionOver(
                PgSessionError(
                    "53400",
                    f"qmesh: a pooled session holds at most {MAX_CLIENT_STATEMENTS} prepared "
                    f"statements of {MAX_STATEMENT_BYTES // (1024 * 1024)} MiB in all; close some",
                )
            )
        statement = body[len(name) :]  # the name's terminator, the text, the types
        target = server_name(statement[1:])
        parse = _core.encode_message(_P, target + statement)
        self._remember(name, (target, parse))
        if target in conn.prepared:
            self._expect(_FAKE_PARSED, client_name=name)
            return b""
        conn.prepared.add(target)
        self._expect(_PARSE, target, client_name=name)
        return parse

    def _remember(self, name: bytes, statement: tuple[bytes, bytes]) -> None:
        self.statements[name] = statement
        self._statement_bytes += len(statement[1])

    def _forget(self, name: bytes) -> tuple[bytes, bytes] | None:
        statement = self.statements.pop(name, None)
        if statement is not None:
            self._statement_bytes -= len(statement[1])
        return statement

    def _statement_for(self, conn: ServerConn, name: bytes) -> tuple[bytes, bytes | None]:
        """(what to send first, the server's name) for the client's
        statement ``name``. The server's name is None where the client's
        stands: the unnamed statement (prepared here again if another
        client's is on the connection, or closed if the client has none),
        or a name the client never prepared (the server answers 26000)."""
        if not name:
            if conn.unnamed_owner is self:
                return b"", None
            conn.unnamed_owner = self
            if self._unnamed is None:
                self._expect(_INJECTED_CLOSE)
                return _CLOSE_UNNAMED, None
            self._expect(_INJECTED)
            return self._unnamed, None
        known = self.statements.get(name)
        if known is None:
            return b"", None
        target, parse = known
        if target in conn.prepared:
            return b"", target
        conn.prepared.add(target)
        self._expect(_INJECTED, target)
        return parse, target

    def _expect(
        self,
        kind: int,
        target: bytes = b"",
        *,
        client_name: bytes = b"",
        saved: tuple[bytes, bytes] | None = None,
    ) -> None:
        """Track one request's answers; made-up answers go out when their
        turn comes (at once if nothing is due before them)."""
        if len(self._requests) >= MAX_REQUESTS:
            raise SessionOver(
                PgSessionError(
                    "54000",
                    f"qmesh: more than {MAX_REQUESTS} requests of one session await their "
                    "answers; read the answers before sending more",
                )
            )
        self._requests.append((kind, target, client_name, saved))

    # -- server → client -----------------------------------------------------------

    async def _server_pump(self) -> None:
        while True:
            if self._may_go_back():
                # Only the client pump decides: bytes it was handed already stay its.
                self._waiting.cancel()
            await self._attached.wait()
            conn = self._conn
            assert conn is not None
            try:
                await self._relay_answers(conn)
            except ServerBroken as exc:
                self._conn = None
                self.pool.release(conn, reusable=False)
                if self._server_fatal:
                    raise SessionOver(None) from None  # the server told the client why
                raise SessionOver(
                    PgSessionError(
                        "08006", f"qmesh: the connection to the database server was lost ({exc})"
                    )
                ) from None

    async def _relay_answers(self, conn: ServerConn) -> None:
        """Pass the server's answers on until the transaction ends (the
        connection goes back to the pool) or the connection breaks."""
        scanner = _core.PgScanner(frontend=False, full=self._server_kinds, relay=True)
        data: bytes | bytearray = conn.leftover
        conn.leftover = b""
        receive = conn.stream.receive_some
        while True:
            if not data:
                try:
                    data = await receive(RECEIVE_SIZE)
                except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    raise ServerBroken(f"the connection failed: {exc}") from None
                if not data:
                    raise ServerBroken("the server closed the connection")
            now = time.monotonic()
            out: list[bytes] = []
            try:
                for tag, raw in scanner.feed(data):
                    if tag != 0:
                        self.watch.backend(tag, raw, now)
                        piece = self._answer(conn, tag, raw)
                    else:
                        piece = raw
                    if piece:
                        out.append(piece)
            except _core.PgWireError as exc:  # the server's bytes: its fault, not the client's
                raise SessionOver(
                    PgSessionError("08P01", f"qmesh: the server broke the protocol: {exc}")
                ) from None
            data = b""
            if out:
                await self._send_client(b"".join(out))
            if self._idle_between_transactions() and not self.pinned and not scanner.in_message:
                self._conn, self._attached = None, trio.Event()
                self._done_here += 1
                if conn.dirty:
                    with trio.CancelScope(shield=True):  # bounded by the reset's own timeout
                        await self.pool.release_dirty(conn)
                else:
                    self.pool.release(conn, reusable=True)
                return

    def _answer(self, conn: ServerConn, tag: int, raw: bytes) -> bytes:
        """What the client gets for one tracked server message."""
        requests = self._requests
        if tag == _ERROR:
            if _core.parse_error_fields(raw[5:]).get("S") in ("FATAL", "PANIC"):
                self._server_fatal = True  # the connection ends; the client is told why
            self._after_error(conn)
            return raw + self._flush_made()
        if tag == _READY:
            while requests:
                kind = requests.popleft()[0]
                if kind == _SYNC or kind == _QUERY:
                    break
            self._status = _core.parse_ready_for_query(raw[5:])
            return raw + self._flush_made()
        if tag == _COPY_IN:
            self._entered_copy_in()
            return raw
        if not requests:
            return raw
        kind = requests[0][0]
        if tag not in _ENDS.get(kind, b""):
            return raw  # within a request (rows of a query, a RowDescription of an Execute)
        requests.popleft()
        tail = self._flush_made()
        if kind in _SWALLOWED:
            return tail
        return (_PARSE_COMPLETE if kind == _PARSE_STAND_IN else raw) + tail

    def _entered_copy_in(self) -> None:
        """CopyInResponse: until the client's CopyDone or CopyFail the server
        ignores Sync (and Flush), so the Syncs the client sent meanwhile get
        no answer of their own."""
        requests = self._requests
        kept: deque[_Request] = deque()
        ended = False
        for i, request in enumerate(requests):
            if i and not ended and request[0] == _SYNC:
                continue
            ended = ended or request[0] == _COPY_END
            kept.append(request)
        self._requests = kept
        self._copy_in = not ended

    def _after_error(self, conn: ServerConn) -> None:
        """An ErrorResponse: in a simple Query or FunctionCall the server
        carries on to its ReadyForQuery; in the extended protocol it skips
        every message up to the next Sync, and so do the answers due, undoing
        what was booked for them: last first, so that each undo restores the
        state the request before it left (a Close and a Parse of the same
        server statement, undone in order, would leave it forgotten)."""
        self._copy_in = False
        requests = self._requests
        if requests and requests[0][0] in (_SYNC, _QUERY):
            return
        skipped: list[_Request] = []
        while requests and requests[0][0] != _SYNC:
            skipped.append(requests.popleft())
        for request in reversed(skipped):
            self._undo(conn, request)
        if not requests:
            self._skipping = True

    def _undo(self, conn: ServerConn, request: _Request) -> None:
        """A request the server failed or skipped: its effects did not happen."""
        kind, target, client_name, saved = request
        if kind in (_PARSE, _INJECTED):
            if target:
                conn.prepared.discard(target)
            else:  # the unnamed statement: none is left after a failed Parse
                conn.unnamed_owner = None
                if kind == _PARSE:
                    self._unnamed = None
        if kind in (_PARSE, _FAKE_PARSED, _PARSE_STAND_IN) and client_name:
            known = self.statements.get(client_name)
            if known is not None and (not target or known[0] == target):
                self._forget(client_name)
        elif kind in (_FAKE_CLOSED, _CLOSE) and saved is not None:
            self._remember(client_name, saved)
            if kind == _CLOSE and target:
                conn.prepared.add(target)
        elif kind == _INJECTED_CLOSE:
            conn.unnamed_owner = None

    def _flush_made(self) -> bytes:
        """The answers made here that are next in line."""
        requests = self._requests
        made = b""
        while requests and requests[0][0] in _MADE_HERE:
            kind = requests.popleft()[0]
            if kind == _FAKE_PARSED:
                made += _PARSE_COMPLETE
            elif kind == _FAKE_CLOSED:
                made += _CLOSE_COMPLETE
        return made

    async def _send_client(self, data: bytes) -> None:
        async with self._send_lock:
            self._sending_to_client = True
            await self.client.send_all(data)
            self._sending_to_client = False
