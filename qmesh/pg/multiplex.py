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
- **A broken server connection.** A connection that fails before any answer
  to the transaction it was given reached the client (a server restart, a
  ``pg_terminate_backend`` of an idle connection) is replaced, and the
  transaction's messages are sent again on the new one. Afterwards, the
  client gets the server's error or 08006, and its session ends.
- **Session state.** A statement that leaves state behind for the next
  transaction (a session-level ``SET``, ``LISTEN``, SQL ``PREPARE``,
  ``DECLARE … WITH HOLD``, a temporary table, a session advisory lock,
  ``LOAD``, ``set_config``) *pins* the session to its server connection for
  the rest of the session; when the client leaves, that connection is reset
  (``DISCARD ALL``) before anyone else gets it. ``DEALLOCATE ALL`` and
  ``DISCARD ALL`` (psycopg sends the first after a failed transaction) run
  on the server: the client's statements are forgotten, the connection's
  shared ones are prepared again as needed, and the connection is reset
  before it is lent again. Text inspection cannot see state
  built by dynamic SQL (``EXECUTE 'SET …'`` inside a function): that
  state leaks to the next transaction on the connection, as in every
  transaction-mode pooler.

Not for: the pool itself (:mod:`qmesh.pg.pool`), the guard and the audit
(:mod:`qmesh.pg.watch`, used here as in session mode), logins.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Final

import trio

from qmesh import _core
from qmesh.pg.guard import normalise
from qmesh.pg.login import PgSessionError
from qmesh.pg.pool import ServerConn, ServerPool
from qmesh.pg.relay import end_client
from qmesh.pg.watch import SessionOver, SessionWatch
from qmesh.tunnel.stream import TunnelStream

__all__ = ["PooledSession", "session_state_of"]

log = logging.getLogger(__name__)

RECEIVE_SIZE: Final = 64 * 1024
MAX_CLIENT_STATEMENTS: Final = 10_000
"""Named prepared statements one client may hold at once."""
MAX_REPLAY_BYTES: Final = 1024 * 1024
"""A transaction's first messages kept to be sent again on a new connection
if the server connection fails before answering them."""
SERVER_PREFIX: Final = b"qmesh_"

_Q, _P, _B, _D, _E, _C, _S, _F, _H, _X = (ord(c) for c in "QPBDECSFHX")
_PARSED, _BOUND, _CLOSED = (ord(c) for c in "123")
_ROWS, _NO_DATA, _DONE, _EMPTY, _SUSPENDED, _READY, _ERROR = (ord(c) for c in "TnCIsZE")

CLIENT_KINDS: Final = b"QPBDECSFHX"
"""Every client kind but COPY data: each is a request whose answers are tracked."""
SERVER_KINDS: Final = b"123TnCIsZE"
"""The server kinds that end a request's answers."""

# The tracked requests, in the order their answers will come.
_PARSE = 1  # a Parse sent on the client's behalf: ParseComplete, forwarded
_INJECTED = 2  # a Parse qmesh added: its ParseComplete is swallowed
_BIND = 3
_DESCRIBE = 4  # ends at RowDescription or NoData
_EXECUTE = 5  # ends at CommandComplete, EmptyQueryResponse or PortalSuspended
_CLOSE = 6
_SYNC = 7  # ends at ReadyForQuery (also a simple Query and a FunctionCall)
_FAKE_PARSED = 8  # a ParseComplete made here
_FAKE_CLOSED = 9  # a CloseComplete made here
_PARSE_COMPLETE: Final = _core.encode_message(_PARSED, b"")
_CLOSE_COMPLETE: Final = _core.encode_message(_CLOSED, b"")
_ENDS: Final = {_PARSE: b"1", _INJECTED: b"1", _BIND: b"2", _DESCRIBE: b"Tn",
                _EXECUTE: b"CIs", _CLOSE: b"3", _SYNC: b"Z"}  # fmt: skip

# -- session state -----------------------------------------------------------------

_STATE_WORDS: Final = (b"set", b"listen", b"prepare", b"hold", b"temp", b"advisory",
                       b"load", b"deallocate", b"discard")  # fmt: skip
_STATEMENT_START: Final = r"(?:^|;) ?"
_PINS: Final = re.compile(
    "|".join(
        (
            # SET and SET SESSION; not SET LOCAL, SET TRANSACTION, SET CONSTRAINTS
            _STATEMENT_START + r"set (?!local |transaction |constraints )",
            _STATEMENT_START + r"(?:listen|prepare|load) ",
            r"(?<![a-z0-9_])with hold(?![a-z0-9_])",
            r"(?<![a-z0-9_])(?:create (?:or replace )?(?:(?:global|local) )?|into )"
            r"(?:temp|temporary) ",
            r"(?<![a-z0-9_])pg_(?:try_)?advisory_lock(?:_shared)? ?\(",
            r"(?<![a-z0-9_])set_config ?\(",
            _STATEMENT_START + r"deallocate (?!all|prepare all)",
        )
    )
)
_RESETS: Final = re.compile(
    _STATEMENT_START + r"(?:deallocate (?:prepare )?all|discard all)(?![a-z0-9_])"
)


def session_state_of(sql: bytes) -> str | None:
    """``pin`` if ``sql`` leaves session state behind for the next
    transaction, ``reset`` if it drops the session's prepared statements
    (and so the ones the connection shares), None if it is
    transaction-scoped. False pins are possible (a literal that merely
    contains ``SET x``), and harmless: they only cost sharing."""
    lowered = sql.lower()
    if not any(word in lowered for word in _STATE_WORDS):
        return None  # the common case
    text = normalise(sql.decode("utf-8", "replace"))
    if _RESETS.search(text):
        return "reset"
    if _PINS.search(text):
        return "pin"
    return None


def server_name(sql: bytes, types: bytes) -> bytes:
    """The server-side name of a statement: the same for the same text and
    parameter types, whoever prepares it."""
    digest = hashlib.blake2b(sql + b"\0" + types, digest_size=12).hexdigest()
    return SERVER_PREFIX + digest.encode()


def _cstring_end(body: bytes, start: int) -> int:
    end = body.find(b"\0", start)
    if end < 0:
        raise _core.PgMalformed("a name without its terminator")
    return end


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
        self.conn: ServerConn | None = None
        self.pinned = False
        self.statements: dict[bytes, tuple[bytes, bytes]] = {}
        """The client's statement names → (server name, the Parse to send)."""
        self._requests: deque[tuple[int, bytes]] = deque()
        """(kind, server statement name or b"") of each request whose answers are due."""
        self._skipping = False
        self._status: int | None = None
        """The server's transaction status at its last ReadyForQuery; None while
        a request is on its way."""
        self._replay: list[tuple[int, bytes]] | None = None
        self._replay_bytes = 0
        self._server_fatal = False
        self._client_scanner = _core.PgScanner(frontend=True, full=CLIENT_KINDS, relay=True)
        kinds = SERVER_KINDS + (b"S" if watch.read_only else b"")
        self._server_kinds = kinds
        self._send_lock = trio.Lock()
        self._attached = trio.Event()
        self._attach_lock = trio.Lock()
        self.scope: trio.CancelScope | None = None
        self.ending: SessionOver | None = None
        self.transactions = 0

    # -- the session ---------------------------------------------------------------

    def end(self, ending: SessionOver) -> None:
        """End the session from outside (its key lost its standing)."""
        self.ending = self.ending or ending
        if self.scope is not None:
            self.scope.cancel()

    def server_key(self) -> tuple[int, bytes] | None:
        """The BackendKeyData of the connection running this client's
        transaction now, for a cancel request; None between transactions."""
        conn = self.conn
        return None if conn is None else conn.key

    async def run(self, client_leftover: bytes) -> None:
        """Relay until the client leaves, the server connection breaks
        beyond repair, or :meth:`end`; then send the client the reason, and
        give the connection back in the state it is in."""
        try:
            with trio.CancelScope() as self.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._ending_all, self._server_pump, nursery)
                    await self._ending_all(self._client_pump, nursery, client_leftover)
            self.scope = None
        finally:
            await self._give_back()
        ending = self.ending
        error = ending.error if ending is not None else None
        await end_client(self.client, error, self.watch.app_id, self.watch.alias)

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

    async def _give_back(self) -> None:
        conn, self.conn = self.conn, None
        if conn is None:
            return
        with trio.CancelScope(shield=True):
            if self._requests or self._status is None:
                # Answers still due: the connection is mid-request.
                self.pool.release(conn, reusable=False)
            elif self.pinned or conn.dirty or self._status != ord("I"):
                await self.pool.release_dirty(conn)
            else:
                self.pool.release(conn, reusable=True)

    # -- client → server -----------------------------------------------------------

    async def _client_pump(self, data: bytes) -> None:
        receive = self.client.receive_some
        while True:
            if not data:
                data = await receive(RECEIVE_SIZE)
                if not data:
                    return
            try:
                events = self._client_scanner.feed(data)
            except _core.PgWireError as exc:
                raise SessionOver(PgSessionError("08P01", f"qmesh: {exc}")) from None
            data = b""
            now = time.monotonic()
            out: list[bytes] = []
            for tag, raw in events:
                if tag == _X:
                    if out:
                        await self._send_server(out)
                    return
                if tag != 0:
                    raw = self.watch.frontend(tag, raw, now)
                    resets = (tag == _Q or tag == _P) and self._screen(tag, raw)
                conn = self.conn
                if conn is None:
                    if out:
                        await self._send_server(out)
                        out = []
                    conn = await self._attach()
                if self._replay is not None:
                    self._replay.append((tag, raw))
                    self._replay_bytes += len(raw)
                    if tag == 0 or self._replay_bytes > MAX_REPLAY_BYTES:
                        self._replay = None  # COPY data, or too much to keep
                piece = self._to_server(conn, tag, raw)
                if piece:
                    out.append(piece)
                if tag != 0 and resets:
                    # From this message on the server has none of them.
                    self.statements.clear()
                    conn.prepared.clear()
                    conn.dirty = True
            made = self._flush_fakes()
            if made:
                # Nothing is due before them: answer now (a client may wait
                # for its ParseComplete after a Flush).
                self._replay = None  # the client has seen an answer
                await self._send_client(made)
            if out:
                await self._send_server(out)

    async def _send_server(self, out: list[bytes]) -> None:
        conn = self.conn
        assert conn is not None
        try:
            await conn.stream.send_all(b"".join(out))
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            # The server pump sees the same failure and decides.
            await self._attached.wait()

    def _screen(self, tag: int, raw: bytes) -> bool:
        """Pin the session by what the statement leaves behind; whether it
        drops the session's prepared statements."""
        body = raw[5:]
        sql = _core.parse_query(body) if tag == _Q else _core.parse_parse(body)[1]
        state = session_state_of(sql)
        if state == "pin" and not self.pinned:
            self.pinned = True
            log.info("pg session of app %r pinned to its server connection (session state)",
                     self.watch.app_id)  # fmt: skip
        return state == "reset"

    async def _attach(self) -> ServerConn:
        """A server connection for the transaction that starts now."""
        async with self._attach_lock:
            if self.conn is None:
                self._begin(await self.pool.acquire())
            assert self.conn is not None
            return self.conn

    def _begin(self, conn: ServerConn) -> None:
        self.conn = conn
        self._replay = []
        self._replay_bytes = 0
        self._attached.set()

    def _to_server(self, conn: ServerConn, tag: int, raw: bytes) -> bytes:
        """What to send the server for one client message, renaming
        statements; tracks the answers due."""
        requests = self._requests
        if tag == 0:
            return raw  # COPY data: no answer of its own
        self._status = None
        if tag == _Q or tag == _F:
            self._expect(_SYNC)
            return raw
        if tag == _S:
            self._skipping = False
            requests.append((_SYNC, b""))
            return raw
        if tag == _E:
            self._expect(_EXECUTE)
            return raw
        if tag == _H:
            return raw
        body = raw[5:]
        if tag == _P:
            return self._parse(conn, body, raw)
        if tag == _B:
            portal_end = _cstring_end(body, 0)
            name_end = _cstring_end(body, portal_end + 1)
            name = body[portal_end + 1 : name_end]
            prefix, target = self._statement_for(conn, name)
            self._expect(_BIND)
            if target is None:
                return raw
            return prefix + _core.encode_message(
                _B, body[: portal_end + 1] + target + body[name_end:]
            )
        if tag == _D:
            kind, name = _core.parse_describe(body)
            prefix, target = (b"", None) if kind != "S" else self._statement_for(conn, name)
            self._expect(_DESCRIBE)
            if target is None:
                return raw
            return prefix + _core.encode_message(_D, b"S" + target + b"\0")
        if tag == _C:
            kind, name = _core.parse_close(body)
            if kind == "S" and name:
                # The server's copy stays, for this client's next Parse of the
                # same text and for the other clients.
                self.statements.pop(name, None)
                self._expect(_FAKE_CLOSED)
                return b""
            self._expect(_CLOSE)
            return raw
        raise SessionOver(PgSessionError("08P01", f"qmesh: unexpected client message {tag:#x}"))

    def _parse(self, conn: ServerConn, body: bytes, raw: bytes) -> bytes:
        name_end = _cstring_end(body, 0)
        name = body[:name_end]
        if not name:
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
        if len(self.statements) >= MAX_CLIENT_STATEMENTS:
            raise SessionOver(
                PgSessionError(
                    "53400",
                    f"qmesh: more than {MAX_CLIENT_STATEMENTS} prepared statements in one "
                    "session; close some",
                )
            )
        sql_end = _cstring_end(body, name_end + 1)
        target = server_name(body[name_end + 1 : sql_end], body[sql_end + 1 :])
        parse = _core.encode_message(_P, target + body[name_end:])
        self.statements[name] = (target, parse)
        if target in conn.prepared:
            self._expect(_FAKE_PARSED)
            return b""
        conn.prepared.add(target)
        self._expect(_PARSE, target)
        return parse

    def _statement_for(self, conn: ServerConn, name: bytes) -> tuple[bytes, bytes | None]:
        """(a Parse to send first, the server's name) for the client's
        statement ``name``; None for the unnamed statement or one the client
        never prepared (the server answers that one with 26000 itself)."""
        known = self.statements.get(name) if name else None
        if known is None:
            return b"", None
        target, parse = known
        if target in conn.prepared:
            return b"", target
        conn.prepared.add(target)
        self._expect(_INJECTED, target)
        return parse, target

    def _expect(self, kind: int, name: bytes = b"") -> None:
        """Track one request's answers; made-up answers go out when their
        turn comes (at once if nothing is due before them)."""
        if self._skipping:
            return  # the server skips to the next Sync: no answer will come
        self._requests.append((kind, name))

    # -- server → client -----------------------------------------------------------

    async def _server_pump(self) -> None:
        while True:
            await self._attached.wait()
            conn = self.conn
            assert conn is not None
            try:
                await self._relay_answers(conn)
            except ServerBroken as exc:
                await self._replace(conn, str(exc))

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
            try:
                events = scanner.feed(data)
            except _core.PgWireError as exc:
                raise SessionOver(
                    PgSessionError("08P01", f"qmesh: the server broke the protocol: {exc}")
                ) from None
            data = b""
            now = time.monotonic()
            out: list[bytes] = []
            for tag, raw in events:
                if tag != 0:
                    self.watch.backend(tag, raw, now)
                    piece = self._answer(conn, tag, raw)
                else:
                    piece = raw
                if piece:
                    self._replay = None  # the client has seen an answer
                    out.append(piece)
            if out:
                await self._send_client(b"".join(out))
            if not self._requests and self._status == ord("I") and not self.pinned:
                if scanner.in_message:
                    continue  # never: the server's ReadyForQuery is its last word
                self.conn = None
                self._attached = trio.Event()
                self.transactions += 1
                if conn.dirty:
                    await self.pool.release_dirty(conn)
                else:
                    self.pool.release(conn, reusable=True)
                return

    def _answer(self, conn: ServerConn, tag: int, raw: bytes) -> bytes:
        """What the client gets for one tracked server message."""
        requests = self._requests
        if tag == _ERROR:
            fields = _core.parse_error_fields(raw[5:])
            if fields.get("S") in ("FATAL", "PANIC"):
                if self._replay is not None:
                    raise ServerBroken(f"the server ended the connection ({fields.get('C')})")
                self._server_fatal = True  # the client is told why, by the server
            self._after_error(conn)
            return raw + self._flush_fakes()
        if tag == _READY:
            while requests:
                kind, _ = requests.popleft()
                if kind == _SYNC:
                    break
            self._status = raw[5]
            return raw + self._flush_fakes()
        if not requests:
            return raw
        kind = requests[0][0]
        if tag not in _ENDS.get(kind, b""):
            return raw  # within a request (rows of a query, a RowDescription of an Execute)
        requests.popleft()
        tail = self._flush_fakes()
        if kind == _INJECTED:
            return tail
        return raw + tail

    def _after_error(self, conn: ServerConn) -> None:
        """An ErrorResponse: in a simple Query or FunctionCall the server
        carries on to its ReadyForQuery; in the extended protocol it skips
        every message up to the next Sync, and so do the answers due."""
        requests = self._requests
        if requests and requests[0][0] == _SYNC:
            return
        while requests and requests[0][0] != _SYNC:
            kind, name = requests.popleft()
            if kind in (_PARSE, _INJECTED):
                conn.prepared.discard(name)  # not prepared after all
                if kind == _PARSE:
                    self._forget(name)
        if not requests:
            self._skipping = True

    def _forget(self, target: bytes) -> None:
        """A client's Parse failed: its name is free again, as on a server."""
        for name, (known, _) in list(self.statements.items()):
            if known == target:
                del self.statements[name]

    def _flush_fakes(self) -> bytes:
        requests = self._requests
        made = b""
        while requests and requests[0][0] in (_FAKE_PARSED, _FAKE_CLOSED):
            kind, _ = requests.popleft()
            made += _PARSE_COMPLETE if kind == _FAKE_PARSED else _CLOSE_COMPLETE
        return made

    async def _send_client(self, data: bytes) -> None:
        async with self._send_lock:
            await self.client.send_all(data)

    async def _replace(self, broken: ServerConn, why: str) -> None:
        """The server connection failed. Before any answer reached the
        client: a new connection, and the transaction's messages again.
        After: the client's session ends."""
        async with self._attach_lock:
            replay = self._replay
            self.pool.release(broken, reusable=False)
            self.conn = None
            self._attached = trio.Event()
            if replay is None:
                if self._server_fatal:
                    raise SessionOver(None)
                raise SessionOver(
                    PgSessionError(
                        "08006",
                        f"qmesh: the connection to the database server was lost ({why})",
                    )
                )
            log.info(
                "pooled pg session of app %r: server connection lost before it answered (%s); "
                "sending the transaction again",
                self.watch.app_id,
                why,
            )
            conn = await self.pool.acquire()
            self._requests.clear()
            self._skipping = False
            self._status = None
            for tag, raw in replay:
                if tag == _P:  # prepared again below, on the new connection
                    self.statements.pop(raw[5 : raw.index(b"\0", 5)], None)
            out = [self._to_server(conn, tag, raw) for tag, raw in replay]
            self._begin(conn)
            self._replay = replay
            try:
                await conn.stream.send_all(b"".join(out))
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the pump finds out
