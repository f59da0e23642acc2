"""qmesh's Rust core: the sealed frame codec, the Noise handshake, the tunnel
protocol's frame types, reset codes and reason codec, the Postgres wire
parser, and the tunnel engine.

The codec, the handshake and the Postgres parser are sans-IO: bytes in,
bytes or events out, no socket, no clock. :class:`TunnelEngine` is the one
exception: it owns a session's sockets on the per-message path, on a thread
of its own, while Trio code in :mod:`qmesh.tunnel` keeps control (handshakes,
which streams exist, policy) and hands it the sockets.

Wire format (see docs/protocol.md): every frame is a 20-byte header followed
by an AES-256-GCM ciphertext of ``length`` bytes (the tag included)::

    0  u8   version      (1)
    1  u8   frame type   (0x00-0x0F reliable, 0x10-0x1F control)
    2  u8   flags        (bit 0: payload is zstd-compressed; other bits 0)
    3  u8   reserved     (0)
    4  u32  stream id    (big-endian)
    8  u64  sequence     (big-endian; per direction and per class)
    16 u32  length       (big-endian; ciphertext bytes incl. the 16-byte tag)

The header is the AEAD associated data. The 12-byte nonce is
``class (1 byte: 0 reliable, 1 control) || 3 zero bytes || sequence (u64 BE)``.
Reliable sequences continue across reconnects of one session; control
sequences restart at 0 on every connection. Keys are fresh per connection.
"""

import sqlite3
from collections.abc import Iterable, Sequence
from typing import ClassVar, Final, Literal, Self, TypeAlias, final

__all__ = [
    "AUDIT_BLOCK_RECORDS",
    "CONTROL_TYPE_MIN",
    "FLAG_COMPRESSED",
    "FRAME_TYPES",
    "HEADER_LEN",
    "MAX_PAYLOAD_LIMIT",
    "MAX_REASON",
    "NOISE_PATTERN",
    "PG_BACKEND_TAGS",
    "PG_DEFAULT_MAX_MESSAGE",
    "PG_FRONTEND_TAGS",
    "PG_GSSENC_REQUEST",
    "PG_HEADER_LEN",
    "PG_MAX_MESSAGE_LIMIT",
    "PG_MAX_STARTUP_PACKET",
    "PG_PROTOCOL_3_0",
    "PG_SSL_REQUEST",
    "PROTOCOL_VERSION",
    "RESET_CODES",
    "STATEMENT_RUNNING",
    "TAG_LEN",
    "AuditAuthor",
    "AuditBlockError",
    "AuditQueue",
    "BufferLike",
    "EngineNotifier",
    "EngineStats",
    "Frame",
    "FrameDecoder",
    "FrameEncoder",
    "FrameError",
    "FrameTooLarge",
    "HandshakeError",
    "HttpEngine",
    "HttpFastBatch",
    "HttpFastDone",
    "HttpNotice",
    "HttpProxied",
    "HttpRequest",
    "HttpRouteReleased",
    "Malformed",
    "NoiseHandshake",
    "PeerClosed",
    "PeerSilent",
    "PgEvent",
    "PgMalformed",
    "PgMessageTooLarge",
    "PgScanner",
    "PgStartup",
    "PgTruncated",
    "PgWireError",
    "PoolShelf",
    "PooledEnd",
    "PooledSpec",
    "PreparedNames",
    "ProtocolViolation",
    "RelayEnding",
    "RelayOutcome",
    "Reordered",
    "Replayed",
    "Tampered",
    "TapRecord",
    "TapSpec",
    "TlsClientConfig",
    "TlsError",
    "TlsServerConfig",
    "TlsSession",
    "Truncated",
    "TunnelEngine",
    "audit_block_records",
    "canonical_row",
    "decode_reason",
    "encode_authentication",
    "encode_backend_key_data",
    "encode_cancel_request",
    "encode_error_response",
    "encode_message",
    "encode_negotiate_protocol_version",
    "encode_parameter_status",
    "encode_parse",
    "encode_query",
    "encode_ready_for_query",
    "encode_reason",
    "encode_sasl_initial_response",
    "encode_startup",
    "engine_poll",
    "engine_polls",
    "engine_threads",
    "insert_sealed",
    "json_nesting_depth",
    "native_sqlite",
    "parse_authentication",
    "parse_backend_key_data",
    "parse_bind",
    "parse_bind_names",
    "parse_close",
    "parse_command_complete",
    "parse_copy_response",
    "parse_data_row",
    "parse_describe",
    "parse_error_fields",
    "parse_execute",
    "parse_function_call",
    "parse_negotiate_protocol_version",
    "parse_notification",
    "parse_parameter_status",
    "parse_parse",
    "parse_password",
    "parse_query",
    "parse_ready_for_query",
    "parse_row_description",
    "parse_sasl_initial_response",
    "parse_sasl_mechanisms",
    "parse_startup",
    "request_time_slice",
    "seal_row",
    "seal_rows",
    "set_engine_poll",
]

BufferLike: TypeAlias = bytes | bytearray | memoryview

PROTOCOL_VERSION: Final[int]
"""Wire protocol version carried in every header (1)."""
HEADER_LEN: Final[int]
"""Bytes in a frame header (20)."""
TAG_LEN: Final[int]
"""Bytes of the AES-GCM tag at the end of every ciphertext (16)."""
MAX_PAYLOAD_LIMIT: Final[int]
"""Absolute cap on a frame's plaintext payload (16 MiB); ``max_payload`` may not exceed it."""
FLAG_COMPRESSED: Final[int]
"""Header flag bit: the payload was zstd-compressed before sealing."""
CONTROL_TYPE_MIN: Final[int]
"""Frame types below this (0x10) are reliable; 0x10..0x1F are control; above is malformed."""
NOISE_PATTERN: Final[str]
"""The Noise protocol name used by :class:`NoiseHandshake`."""
FRAME_TYPES: Final[dict[str, int]]
"""Every frame type of the protocol by name (``"OPEN"``: 0x01, ...), in
order: the one definition :class:`qmesh.tunnel.frames.FrameType` takes its
values from."""
RESET_CODES: Final[dict[str, int]]
"""Every RESET code by name (``"CANCEL"``: 0, ...), in order; see
:class:`qmesh.tunnel.frames.ResetCode`."""
MAX_REASON: Final[int]
"""Bytes of reason text a RESET or GOAWAY carries at most (1024)."""

def encode_reason(code: int, reason: str) -> bytes:
    """The payload of a RESET or GOAWAY: ``code`` (u16, big-endian), then
    ``reason`` as UTF-8 (lone surrogates as ``?``), cut at :data:`MAX_REASON`
    bytes, even inside a character."""

def decode_reason(payload: bytes) -> tuple[int, str]:
    """``(code, reason)`` of a RESET or GOAWAY payload: the reason's first
    :data:`MAX_REASON` bytes, decoded as UTF-8 with U+FFFD for what is not.
    Raises :class:`Malformed` when the payload cannot hold the code."""

Frame: TypeAlias = tuple[int, int, int, int, bytes]
"""A decoded frame: ``(frame_type, stream_id, sequence, flags, payload)``."""

class FrameError(Exception):
    """The peer's byte stream is not a valid frame stream; tear the connection down."""

class Tampered(FrameError):
    """The AEAD tag did not verify: header or payload altered, or the wrong key."""

class Replayed(FrameError):
    """An authentic frame whose sequence number was already received."""

class Reordered(FrameError):
    """An authentic frame whose sequence number is ahead of the next expected one."""

class Truncated(FrameError):
    """The byte stream ended inside a frame (raised by ``FrameDecoder.eof``)."""

class FrameTooLarge(FrameError):
    """A header announced more bytes than the decoder's limit; nothing was allocated."""

class Malformed(FrameError):
    """A bad version, frame type, flag or reserved bits, or an undecodable payload."""

class HandshakeError(Exception):
    """The Noise handshake failed: bad message, failed decryption, or misuse."""

class PeerClosed(Exception):
    """The peer closed the tunnel connection between frames; the session may resume."""

class PeerSilent(PeerClosed):
    """Nothing arrived on the tunnel connection past the heartbeat's
    ``dead_after``: the peer is hung or cut off. The session may resume."""

class ProtocolViolation(Exception):
    """The peer broke the tunnel protocol in authentic frames; the session cannot go on.

    A malformed ACK, WINDOW or RESET payload, an acknowledgement of frames
    never sent, a resumption at frames it had already acknowledged, or more
    unacknowledged bytes than the engine keeps: resending the same frames
    would break the same rule again."""

@final
class FrameEncoder:
    """Seals frames for one direction of one connection.

    Sequence numbers are assigned here, from two counters: reliable frames
    (type < 0x10) continue from ``reliable_seq``; control frames start at 0.
    """

    def __new__(
        cls,
        key: bytes,
        *,
        reliable_seq: int = 0,
        level: int = 3,
        max_payload: int = ...,
        min_compress: int = 64,
    ) -> Self:
        """``key``: 32 bytes. ``level``: zstd level (1-19). Payloads shorter
        than ``min_compress`` bytes are never compressed; others are sent
        compressed only when that makes them smaller."""

    @property
    def next_reliable_seq(self) -> int: ...
    @property
    def next_control_seq(self) -> int: ...
    def encode(self, frame_type: int, stream_id: int, payload: BufferLike) -> bytes:
        """One frame, header and ciphertext. Raises ValueError for a bad type
        or a payload over ``max_payload``."""

    def encode_batch(self, frames: Sequence[tuple[int, int, BufferLike]]) -> bytes:
        """Many frames ``(frame_type, stream_id, payload)`` concatenated in one
        buffer, in order. Validation happens before anything is encoded, so a
        ValueError leaves the counters untouched."""

@final
class FrameDecoder:
    """Opens frames for one direction of one connection (h11 style: ``feed``
    buffers, ``next_frames`` returns what is complete).

    After the first error the decoder is poisoned: every later call raises
    the same error kind again.
    """

    def __new__(
        cls,
        key: bytes,
        *,
        reliable_seq: int = 0,
        max_payload: int = ...,
    ) -> Self: ...
    @property
    def next_reliable_seq(self) -> int: ...
    @property
    def next_control_seq(self) -> int: ...
    @property
    def buffered(self) -> int:
        """Bytes held that do not yet make a complete frame."""

    def feed(self, data: BufferLike) -> None: ...
    def next_frames(self, limit: int = 0) -> list[Frame]:
        """All complete frames (at most ``limit`` when > 0). If a bad frame
        follows good ones, the good ones are returned and the error is raised
        by the next call."""

    def eof(self) -> None:
        """The transport ended: raises :class:`Truncated` if bytes of a partial
        frame are buffered."""

TapRecord: TypeAlias = tuple[float, bool, int, bytes, bool]
"""A message a native stream's scanner reported: ``(time.monotonic() when
seen, came from the tunnel, type byte, the message with its header (a prefix
for a peeked kind), held for a verdict)``."""

@final
class TapSpec:
    """The scanners of a native relay (:meth:`TunnelEngine.attach_native`):
    which Postgres message kinds the engine reports as :data:`TapRecord` and
    which client kinds it holds for a verdict. Built by the code that knows the
    bytes are Postgres; the tunnel passes it through."""

    def __new__(
        cls,
        *,
        frontend: tuple[bytes, bytes] | None = None,
        backend: bytes | None = None,
        guard: bytes | None = None,
        read_only: bool = False,
        farewell: bytes | None = None,
        guard_screen: list[bytes] | None = None,
    ) -> Self:
        """``frontend=(full, peek)`` scans the bytes from the tunnel as a
        Postgres client's and reports those kinds (whole, or a prefix);
        ``backend=full`` scans the socket's bytes as a server's. Framing and
        size are checked even when nothing is reported. ``guard`` kinds (with
        ``frontend``) are held: each is reported whole, as a record with
        ``held`` set, and nothing more reaches the socket until
        :meth:`TunnelEngine.verdict`. With ``guard_screen``, a held Query or
        Parse (the kinds that carry SQL text) is only held if it contains one
        of those words (ASCII letters in any case); one that names none is
        relayed at once and reported unheld if its kind is in ``frontend``
        (a pooled stream's goes to Python's relay if it names one).
        ``read_only``: the server reporting ``default_transaction_read_only``
        off ends the stream (:attr:`RelayEnding.READ_ONLY_OFF`) before the
        client gets anything more of that answer; its ``backend`` reports
        ErrorResponse and NoticeResponse by their first 1024 body bytes when
        longer (their texts have no bound, and the engine passes on what it
        reports only once it is all in). A ``farewell`` (a server
        message of the relay's own, for the MiniGate's side, where the tunnel
        brings a server's messages) is written to the socket if the session
        is lost while the socket stands between two messages: the engine
        follows the framing of what it writes there to know. ValueError for a
        guard without its scanner."""

@final
class RelayEnding:
    """How a native relay ended (:attr:`RelayOutcome.ending`)."""

    CLEAN: ClassVar[RelayEnding]
    """Both directions closed, everything delivered."""
    SOCKET_EOF: ClassVar[RelayEnding]
    """The socket reached end of stream on a relay asked to end there."""
    RESET: ClassVar[RelayEnding]
    """The peer reset the stream (``code`` and ``detail`` say why)."""
    PROTOCOL: ClassVar[RelayEnding]
    """The peer broke flow control; the engine sent RESET."""
    SOCKET: ClassVar[RelayEnding]
    """The socket failed."""
    POSTGRES: ClassVar[RelayEnding]
    """A Postgres scanner rejected the bytes; nothing of them was relayed."""
    ABORTED: ClassVar[RelayEnding]
    """Python took the stream back, or the session ended."""
    HANDBACK: ClassVar[RelayEnding]
    """A pooled stream's client sent what the engine does not relay: the
    outcome's ``pooled`` says where Python's relay takes over."""
    POOL_TIMEOUT: ClassVar[RelayEnding]
    """A pooled stream's client waited its pool's limit for a connection."""
    READ_ONLY_OFF: ClassVar[RelayEnding]
    """A read-only session's server reported the read-only setting turned
    off: the session ends, and its connection must be closed."""
    def __int__(self) -> int: ...
    def __eq__(self, other: object, /) -> bool: ...
    def __ne__(self, other: object, /) -> bool: ...
    def __hash__(self) -> int: ...

@final
class RelayOutcome:
    """A native relay's end, with what the stream needs to carry on."""

    def __new__(
        cls,
        ending: RelayEnding,
        *,
        code: int = 0,
        detail: str = ...,
        credit: int = 0,
        eof_sent: bool = False,
        eof_received: bool = False,
    ) -> Self: ...
    @property
    def ending(self) -> RelayEnding: ...
    @property
    def code(self) -> int:
        """The peer's reset code, for ``RESET``; else 0."""
    @property
    def detail(self) -> str:
        """The peer's reason, or what went wrong; empty for a clean end."""
    @property
    def credit(self) -> int:
        """Send credit left."""
    @property
    def eof_sent(self) -> bool:
        """CLOSE was sent (the socket reached end of stream)."""
    @property
    def eof_received(self) -> bool:
        """CLOSE was received."""
    @property
    def pooled(self) -> PooledEnd | None:
        """A pooled stream's state at its end."""
    @property
    def failed(self) -> bool:
        """Whether the relay ended other than by its ends closing."""

STATEMENT_RUNNING: Final[int]
"""A pooled native stream's tap record kind: a statement still running when
the engine's part ended (or the text of its unnamed statement or portal),
which Python's relay follows from there (see
:func:`qmesh.pg.watch.statement_record`)."""

@final
class PooledEnd:
    """A pooled stream's state at its end: what Python's relay carries on
    from, or cleans up."""

    @property
    def lease(self) -> int | None:
        """The connection the client held (the pool's id), or None."""
    @property
    def touched(self) -> bool:
        """The engine ran statements on ``lease`` since Python last had it."""
    @property
    def owed(self) -> list[tuple[str, bytes, bytes, tuple[bytes, bytes] | None]]:
        """The answers the server still owes, in order: ``(kind, target,
        name, saved)`` each. ``kind`` is the client message's type byte
        (``Q``, ``P``, ``B``, ``D``, ``E``, ``C``, ``S``) or what the engine
        sent in its stead: ``i`` a Parse it added (its ParseComplete is not
        the client's), ``p`` a Close standing in for a Parse of a statement
        the connection has (the client gets a ParseComplete for its
        CloseComplete), ``c`` a Close standing in for the client's Close.
        ``target`` is the server's name a Parse (``P``, ``i``) prepares or a
        Close (``C``) closes, ``name`` the client's (``P``, ``p``, ``c``,
        ``C``), ``saved`` the client's statement a Close forgot (``(server
        name, Parse)``); empty or None where they do not apply."""
    @property
    def statements(self) -> list[tuple[bytes, bytes, bytes]]:
        """The client's named statements: ``(name, server name, Parse)`` each."""
    @property
    def unnamed(self) -> bytes | None:
        """The client's unnamed statement: its Parse message, or None."""
    @property
    def unnamed_held(self) -> bool:
        """Whether the connection the client holds has its unnamed statement."""
    @property
    def skipping(self) -> bool:
        """The server discards the client's messages until its next Sync (an
        error in the extended protocol, no Sync sent since)."""
    @property
    def status(self) -> str | None:
        """The server's status at its last ReadyForQuery (``I``, ``T``,
        ``E``), or None while a query was on its way."""
    @property
    def server_mid_message(self) -> bool:
        """The server's bytes stopped inside a message."""
    @property
    def server_fatal(self) -> bool:
        """The server sent a FATAL error (relayed to the client)."""
    @property
    def leftover(self) -> bytes:
        """Client bytes the engine did not relay, from the first message it
        does not relay natively on."""
    @property
    def consumed(self) -> int:
        """Client bytes consumed but not yet granted back."""
    @property
    def transactions(self) -> int:
        """Transactions the engine relayed to their end in this part of the session."""

@final
class PooledSpec:
    """What makes a native stream a transaction-mode client session: its
    pool's ``shelf``, the longest wait in line (``wait_s``), the most
    statements a connection keeps prepared (``max_prepared``: one that comes
    back with more goes to Python to be closed), and what the client
    prepared so far (a session back from Python's relay): its named
    ``statements``, ``(name, server name, Parse)`` each, and its
    ``unnamed`` statement's Parse. Its guard's words and read-only flag are
    its :class:`TapSpec`'s."""

    def __new__(
        cls,
        shelf: PoolShelf,
        wait_s: float,
        max_prepared: int,
        *,
        statements: list[tuple[bytes, bytes, bytes]] = ...,
        unnamed: bytes | None = None,
    ) -> Self: ...

@final
class PreparedNames:
    """The names of the statements prepared on one server connection, under
    their server names: a set of ``bytes``, shared with the engine that
    holds the connection while it is lent to one."""

    def __new__(cls) -> Self: ...
    def __contains__(self, name: bytes, /) -> bool: ...
    def __len__(self) -> int: ...
    def add(self, name: bytes) -> None: ...
    def discard(self, name: bytes) -> None:
        """Remove ``name`` if it is there."""
    def clear(self) -> None: ...

@final
class PoolShelf:
    """The idle connections of one transaction-mode pool and its line of
    waiting clients, shared by the engine threads and Python. Connections
    are named by Python's ids; the shelf borrows their descriptors while
    they are idle here or lent to an engine."""

    def __new__(cls, check_after: float) -> Self: ...
    @property
    def notify_fd(self) -> int:
        """Readable while :meth:`take_events` has something."""
    def give(
        self,
        lease: int,
        fd: int,
        expires_in: float,
        prepared: PreparedNames,
        *,
        tls: TlsSession | None = None,
    ) -> None:
        """Connection ``lease`` (socket ``fd``, its statements ``prepared``,
        its TLS connection ``tls`` if it has one: an engine takes that along
        while it holds the connection), ready for use, to the first in line
        or idle; closed when it comes back after ``expires_in`` s."""
    def take(self) -> tuple[int, bool] | None:
        """``(lease, touched)`` of an idle connection if one is here and
        nobody waits, else None."""
    def take_or_wait(self) -> tuple[int | None, bool, int]:
        """``(lease, touched, 0)`` for an idle connection now, else ``(None,
        False, ticket)``: a place in line, served by a ``"delivered"`` event."""
    def cancel(self, ticket: int) -> bool:
        """Leave the line; False if the ticket was served already."""
    def wake_python(self) -> int | None:
        """The ticket of the first of Python's waiters, taken out of line to
        look again (a place came free); None if none waits."""
    def take_events(self) -> list[tuple[str, int, bool, int]]:
        """``(kind, lease, touched, ticket)`` in order: ``"delivered"``,
        ``"check"``, ``"close"`` or ``"wanted"``."""
    def take_idle(self, idle_for: float | None = None) -> list[tuple[int, bool]]:
        """Idle connections that idled longer than ``idle_for`` seconds
        (every one with None), taken off the shelf: ``(lease, touched)``."""
    def take_oldest_idle(self) -> int | None:
        """The least recently used idle connection, taken off the shelf."""
    def set_excess(self, excess: int) -> None:
        """Close this many connections as they come back from engines."""
    def set_full(self, full: bool) -> None:
        """Whether the pool holds all the connections it may: an engine's
        client then waits in line without a ``"wanted"`` event."""
    def stats(self) -> tuple[int, int, float, int, int, float]:
        """``(idle, waiting, longest_wait_s, engine_loans, waits,
        wait_s_total)``: waits are of the clients that had to wait in line."""
    def engine_waiters(self) -> int:
        """Engines' clients waiting in line."""

AUDIT_BLOCK_RECORDS: Final[int]
"""Records an audit block holds at most (:meth:`AuditQueue.take_blocks`)."""

@final
class AuditQueue:
    """The bounded queue of statement audit records (see ``qmesh.pg.audit``):
    pushes never wait, and records past ``max_records`` or ``max_bytes`` of
    statements are dropped and counted."""

    def __new__(cls, max_records: int, max_bytes: int, max_statement_chars: int) -> Self: ...
    @property
    def notify_fd(self) -> int:
        """Readable once a record arrives in an empty queue, until :meth:`take`."""
    @property
    def recorded(self) -> int:
        """Records accepted since the queue was made."""
    @property
    def dropped(self) -> int:
        """Records dropped because the queue was full."""
    @property
    def queued(self) -> int:
        """Records waiting for the writer."""
    def push(
        self,
        app: str,
        alias: str,
        session: str | None,
        keep_text: bool,
        statements: list[tuple[bytes, float, int | None, str]],
    ) -> None:
        """Queue ``(statement, duration_s, rows, outcome)`` of one session,
        ended now; those that do not fit are dropped."""
    def author(self, app: str, alias: str, session: str | None, keep_text: bool) -> AuditAuthor:
        """What an engine's pooled stream records its statements with."""
    def take_blocks(
        self, max_records: int
    ) -> tuple[int, list[tuple[str, str, float, float, int, bytes]]]:
        """``(count, blocks)``: up to ``max_records`` records, oldest first,
        encoded as the stored blocks, ``(app, alias, first_ts, last_ts,
        records, body)`` each: one per (app, alias) and batch, unless it
        holds more than :data:`AUDIT_BLOCK_RECORDS`. Hashed, encoded and
        compressed without the GIL."""

def audit_block_records(
    body: bytes,
) -> list[tuple[float, str | None, str, float, int | None, str, str | None]]:
    """The records of a block :meth:`AuditQueue.take_blocks` made, in the
    order they were recorded: ``(ts, statement (None where only the hash
    is kept), statement_sha256, duration_ms, rows, outcome, session)``
    each. Raises :class:`AuditBlockError` for a body that is not such a
    block."""

class AuditBlockError(Exception):
    """A stored statement-audit block that cannot be read: damaged, or not
    one the audit wrote."""

@final
class AuditAuthor:
    """One client session's way into an :class:`AuditQueue`, for the engine."""

@final
class EngineStats:
    """A snapshot of a :class:`TunnelEngine`'s counters, all from one moment."""

    @property
    def recv_next(self) -> int:
        """Sequence of the next reliable frame expected from the peer."""
    @property
    def send_next(self) -> int:
        """Sequence the next reliable frame sent will get."""
    @property
    def retained_frames(self) -> int:
        """Reliable frames sent and not yet acknowledged."""
    @property
    def retained_bytes(self) -> int:
        """Their payload bytes."""
    @property
    def bytes_sent(self) -> int:
        """Bytes written to tunnel connections."""
    @property
    def bytes_received(self) -> int:
        """Bytes read from tunnel connections."""
    @property
    def native_streams(self) -> int:
        """Streams the engine relays natively now."""
    @property
    def attached(self) -> bool:
        """Whether a connection is attached."""
    @property
    def rtt(self) -> float | None:
        """The latest heartbeat's round trip in seconds (None before the first PONG)."""

def engine_threads() -> int:
    """How many engine threads run in this process (0 before the first
    :class:`TunnelEngine`): about one per core, each serving the sessions of
    many engines, so a Gate with thousands of edges holds a few threads."""

def set_engine_poll(seconds: float) -> None:
    """Let the engine threads poll for work for up to ``seconds`` (at most
    1 ms) before they sleep, each sizing its window from its own idle
    spells; 0: never (the default). Trades CPU for the wake-up of a sleeping
    thread; see ``tunnel.engine_poll_us``. ValueError outside 0–1 ms."""

def engine_poll() -> float:
    """The longest poll window the engine threads use now, in seconds."""

def engine_polls() -> tuple[int, int]:
    """``(caught, missed)``: the engine threads' polls that found work, and
    those that ran out of their window and slept."""

def request_time_slice(seconds: float | None) -> bool:
    """Ask the kernel for a time slice of ``seconds`` for the calling thread
    (Linux 6.12 on, clamped to 0.1–100 ms), or its own again (None): woken,
    a thread with a shorter slice than the running one preempts it at once.
    A thread inherits the slice of the one that started it. False where the
    kernel keeps no slice per thread; OSError if it refused."""

@final
class EngineNotifier:
    """One descriptor for the wake-ups of many engines: ``fd`` turns readable
    when an engine created with this notifier has something to take, and
    :meth:`take` names them by the ``key`` each was given."""

    def __new__(cls) -> Self: ...
    @property
    def fd(self) -> int: ...
    def take(self) -> list[int]:
        """The keys of the engines that posted since the last take, each once."""

@final
class TunnelEngine:
    """The per-message path of one tunnel session, run by one of the
    process's engine threads (:func:`engine_threads`).

    Owns, while attached, the connection's socket (Python keeps the socket
    object and closes it after :meth:`detach`), the codec, retention of
    unacknowledged frames, ACKs and PONGs, and the sockets of native streams.
    With ``heartbeat_interval`` and ``dead_after`` (both or neither), also the
    heartbeat: a PING every ``min(heartbeat_interval, dead_after / 3)`` (at
    most an hour; a step of 1/1024 of it late at most, so that the beats of
    many sessions share an engine thread's wake-up), its round trip in
    :meth:`stats`, and at each PING the connection's end when
    nothing arrived for longer than ``dead_after`` (:class:`PeerSilent`) or the
    oldest unacknowledged frame stayed so that long (:class:`ProtocolViolation`).
    Everything else arrives through :meth:`take`. With a ``notifier``, the
    engine posts ``key`` to it when there is something to take (many
    sessions, one descriptor); without, ``notify_fd`` is its own and becomes
    readable when there is something to take.
    """

    def __new__(
        cls,
        *,
        ack_every: int = 32,
        ack_delay: float = 0.01,
        max_unacked: int = 268435456,
        read_size: int = 262144,
        chunk_size: int = 65536,
        tap_delay: float = 0.02,
        tap_batch: int = 256,
        heartbeat_interval: float | None = None,
        dead_after: float | None = None,
        notifier: EngineNotifier | None = None,
        key: int = 0,
    ) -> Self: ...
    @property
    def notify_fd(self) -> int: ...
    def stats(self) -> EngineStats:
        """The counters, all from one moment."""

    def acknowledge(self, peer_recv_next: int) -> None:
        """Apply the peer's ``recv_next`` from a handshake
        (:class:`ProtocolViolation` if it does not fit what was sent)."""

    def attach(self, fd: int, encoder: FrameEncoder, decoder: FrameDecoder, initial: bytes) -> None:
        """Carry the session over the connected socket ``fd``. Takes the codec
        (the Python objects are unusable afterwards); resends what the peer
        has not acknowledged; ``initial`` is what was read past the handshake.
        ValueError if a connection is attached, or the encoder does not
        start at the oldest unacknowledged frame, or the decoder at the next
        frame to receive."""

    def detach(self) -> None:
        """Stop using the current connection's socket (safe to close after this)."""

    def send(self, frames: Sequence[tuple[int, int, bytes]]) -> None:
        """Seal and send ``(frame_type, stream_id, payload)`` frames, or keep the
        reliable ones for the next connection while none is attached."""

    def take(
        self,
    ) -> tuple[
        list[tuple[int, int, bytes]],
        list[tuple[int, list[TapRecord]]],
        list[tuple[int, RelayOutcome]],
        BaseException | None,
    ]:
        """``(frames, taps, ended, error)``: frames for Python to dispatch,
        ``(stream_id, records)`` from native streams' scanners, ``(stream_id,
        outcome)`` of native streams that ended, and why the current
        connection failed, as an exception (not raised): :class:`PeerClosed`
        (:class:`PeerSilent`: nothing arrived past ``dead_after``);
        an ``OSError`` (with ``errno``) from the socket; a :class:`FrameError`
        subclass for bad bytes (the connection's fault: the session may
        resume); :class:`ProtocolViolation` (the peer's: the session is over);
        ``ValueError`` for frames given to :meth:`send` that cannot be sealed.
        Handle taps, then endings, then frames (a frame for a stream can
        follow the stream's ending)."""

    def attach_native(
        self,
        stream_id: int,
        fd: int,
        *,
        credit: int,
        window: int,
        to_socket: bytes = ...,
        consumed: int = 0,
        eof_received: bool = False,
        end_on_socket_eof: bool = False,
        tap: TapSpec | None = None,
        tls: TlsSession | None = None,
        pooled: PooledSpec | None = None,
        audit: AuditAuthor | None = None,
    ) -> None:
        """Relay stream ``stream_id`` natively between the tunnel and the
        connected, non-blocking socket ``fd`` until it ends (reported by
        :meth:`take`). The other arguments carry the stream's state over;
        ``tap`` says what the stream's scanners report and hold; ``tls``, a
        connection whose handshake is done, is the socket's TLS layer from
        now on (the object is spent: :attr:`TlsSession.handed_over`).
        With ``pooled`` (a :class:`PooledSpec`) the stream is a
        transaction-mode client: ``fd`` is ignored, and it borrows server
        connections from the spec's shelf per transaction; its ``tap``
        (required) gives its guard's words and read-only flag. With ``audit``
        the engine records each finished statement there itself, with its
        rows and outcome; a stream that is not pooled then needs a ``tap``
        whose scanners report what the audit reads (a message its guard
        holds is followed once the verdict is in).
        ValueError if the stream is native already, for such an ``audit``
        without such a ``tap``, or for ``pooled`` without one."""

    def verdict(self, stream_id: int, replacement: bytes) -> None:
        """The verdict on the client message a native stream holds: relay
        ``replacement`` in its place (the message itself, or another), then
        carry on."""

    def pooled_lease(self, stream_id: int) -> int | None:
        """The connection a pooled stream holds now (its pool's id), or None."""
    def abort_native(self, stream_id: int) -> RelayOutcome | None:
        """Take a native stream back: its socket is unwatched when this returns.
        None if it had already ended (its ending is, or was, in :meth:`take`)."""

    def lose(self) -> None:
        """The session is over: drop retained frames and every native stream
        (after writing its :class:`TapSpec` farewell)."""

    def close(self) -> None:
        """Stop the engine's thread (also happens when the object is collected)."""

@final
class NoiseHandshake:
    """``Noise_IK_25519_AESGCM_SHA256``: the initiator knows the responder's
    static key in advance; the responder learns and authenticates the
    initiator's static key from the first message. Two messages, one round
    trip, forward secrecy from ephemeral keys."""

    @staticmethod
    def initiator(
        local_private: bytes, remote_public: bytes, prologue: bytes
    ) -> NoiseHandshake: ...
    @staticmethod
    def responder(local_private: bytes, prologue: bytes) -> NoiseHandshake: ...
    @property
    def is_finished(self) -> bool: ...
    def write_message(self, payload: bytes) -> bytes:
        """The next handshake message carrying ``payload`` (encrypted where the
        pattern allows; at most 65,000 bytes)."""

    def read_message(self, message: bytes) -> bytes:
        """Process the peer's handshake message; return its payload."""

    def remote_static(self) -> bytes | None:
        """The peer's static public key (32 bytes) once known."""

    def handshake_hash(self) -> bytes:
        """The handshake transcript hash: public, unique per connection."""

    def into_codec(
        self,
        *,
        send_reliable_seq: int = 0,
        recv_reliable_seq: int = 0,
        level: int = 3,
        max_payload: int = ...,
        min_compress: int = 64,
    ) -> tuple[FrameEncoder, FrameDecoder]:
        """After the handshake: the encoder and decoder for this side, keyed
        from the Noise split. The keys never leave Rust. Consumes the
        handshake (a second call raises HandshakeError)."""

# ---------------------------------------------------------------------------
# Postgres wire protocol (rust/qmesh-pg, bound in rust/qmesh-py/src/pg.rs)
#
# Sans-IO like the frame codec: the MiniGate's Postgres listener and the
# Gate's relay own the sockets and feed bytes in. Message bodies passed to
# the ``parse_*`` functions are without the 5-byte header (``raw[5:]``).
# The names and SQL of the client's statement messages (Query, Parse, Bind,
# Execute, Close, Describe) are returned as the client's bytes; other strings
# are decoded as UTF-8 with replacement characters, for reading: forward the
# original bytes, never these.

PG_PROTOCOL_3_0: Final[int]
"""The protocol version of a 3.0 StartupMessage (196608)."""
PG_HEADER_LEN: Final[int]
"""Bytes in a typed message header: the type byte and the i32 length (5)."""
PG_MAX_STARTUP_PACKET: Final[int]
"""PostgreSQL's own cap on a startup packet (10000 bytes)."""
PG_DEFAULT_MAX_MESSAGE: Final[int]
"""Default cap on a message's length field (256 MiB): room for a 64 MiB bytea sent as hex."""
PG_MAX_MESSAGE_LIMIT: Final[int]
"""The largest ``max_message`` accepted (2**31 - 1: the length field is an i32)."""
PG_FRONTEND_TAGS: Final[bytes]
"""Type bytes a client may send after the startup packet."""
PG_BACKEND_TAGS: Final[bytes]
"""Type bytes a server may send."""
PG_SSL_REQUEST: Final[bytes]
"""The 8-byte SSLRequest packet."""
PG_GSSENC_REQUEST: Final[bytes]
"""The 8-byte GSSENCRequest packet."""

class PgWireError(Exception):
    """The peer's bytes are not valid Postgres protocol; end the connection."""

class PgMalformed(PgWireError):
    """An unknown message type, a bad length or a field that does not parse."""

class PgMessageTooLarge(PgWireError):
    """A length field announced more than the limit; nothing was allocated for it."""

class PgTruncated(PgWireError):
    """The stream ended inside a message (raised by ``PgScanner.eof``)."""

class TlsError(OSError):
    """TLS with a server failed: its certificate, its handshake or a record
    (an OSError, as Python's ssl.SSLError is)."""

@final
class TlsServerConfig:
    """A TLS server's certificate chain and private key, loaded once and
    shared by its connections (:meth:`TlsSession.server`)."""

    def __new__(
        cls, certificate_chain: bytes, private_key: bytes, *, alpn: list[bytes] | None = None
    ) -> Self:
        """PEM; ``alpn``: the protocols offered (a client that offers others
        is refused). TlsError for unusable files."""

@final
class TlsClientConfig:
    """A TLS client's trust, loaded once and shared by its connections
    (parsing a bundle of a hundred roots takes most of a millisecond).
    ``verify``: ``"full"`` (the chain up to ``root_certificates``, PEM, and
    the name the server is reached by), ``"ca"`` (the chain only) or
    ``"none"`` (only the handshake's signatures: the server holds the key of
    the certificate it sent; ``root_certificates`` is ignored). ``alpn``:
    the protocols offered. TlsError when no root is usable, ValueError for a
    bad ``verify``."""

    def __new__(
        cls,
        root_certificates: bytes,
        *,
        verify: str = "full",
        alpn: list[bytes] | None = None,
    ) -> Self: ...

@final
class TlsSession:
    """A TLS connection (rustls, TLS 1.2 and 1.3), client or server,
    sans-IO: the caller moves ciphertext between it and the socket. Python
    drives the handshake and what precedes the relay with it (a login, a
    startup packet), then hands it to a native relay
    (:meth:`TunnelEngine.attach_native`), which carries on with the same
    connection; after that every method but :attr:`handed_over` raises
    ValueError. A pooled server connection's is lent instead, with the
    connection (:meth:`PoolShelf.give`): while an engine holds it, the same."""

    @staticmethod
    def client(server_name: str, *, config: TlsClientConfig) -> TlsSession:
        """A client trusting as ``config`` says. ``server_name`` is a DNS name
        (sent as SNI) or an IP address; TlsError when it is neither."""
    @staticmethod
    def server(config: TlsServerConfig) -> TlsSession:
        """A server, with ``config``'s certificate."""
    def receive(self, data: bytes) -> bytes:
        """Ciphertext from the peer; the plaintext it completed, after any a
        pooled connection's engine left inside (``b""`` takes only that).
        TlsError when it is not acceptable (a bad certificate, a bad record,
        an alert)."""
    def send(self, data: bytes) -> None:
        """Plaintext for the peer, sealed with the next :meth:`outgoing`."""
    def outgoing(self) -> bytes:
        """The ciphertext to write to the socket now (handshake or records)."""
    def close(self) -> None:
        """Queue close_notify."""
    @property
    def handshaking(self) -> bool: ...
    @property
    def peer_certificate(self) -> bytes | None:
        """The peer's certificate (DER), once the handshake has it."""
    @property
    def protocol_version(self) -> str | None:
        """``"TLSv1.3"`` or ``"TLSv1.2"``, once negotiated."""
    @property
    def alpn_protocol(self) -> bytes | None:
        """The protocol agreed by ALPN, if any."""
    @property
    def handed_over(self) -> bool:
        """The connection belongs to a native relay now (or, lent with a
        pooled connection, to the engine that holds that)."""

PgEvent: TypeAlias = tuple[int, bytes]
"""What :meth:`PgScanner.feed` reports: ``(tag, raw)`` for a message of a kind
asked for (``raw`` starts with the header; it is a *prefix* when shorter than
the header's length + 1), or ``(0, raw)`` for a run of bytes to forward as
they are (relay mode only)."""

@final
class PgScanner:
    """Finds Postgres message boundaries in one direction of one connection.

    ``feed`` returns, in order, the messages of the kinds in ``full`` (whole,
    up to ``max_message``) and ``peek`` (the header and the first
    ``peek_max`` body bytes; the whole message when shorter); other kinds
    are never copied or buffered, whatever their size. In ``relay`` mode it
    also returns the bytes to forward, so that concatenating every ``raw``
    gives back the input exactly; the caller may send something else in
    place of a complete message. Without ``relay`` the caller forwards its
    input itself.

    A length field is checked against ``max_message`` from the header
    alone. The first error (:class:`PgWireError`) poisons the scanner: later
    calls raise it again. Events found before the error in the same feed are
    lost with it; the connection is to be ended anyway.
    """

    def __new__(
        cls,
        *,
        frontend: bool,
        full: bytes | None = None,
        peek: bytes | None = None,
        relay: bool = False,
        max_message: int = 268435456,
        peek_max: int = 1024,
    ) -> Self: ...
    @property
    def full(self) -> bytes:
        """Kinds reported whole. Setting it applies from the next message header."""
    @full.setter
    def full(self, tags: bytes) -> None: ...
    @property
    def peek(self) -> bytes:
        """Kinds reported by a prefix. Setting it applies from the next message header."""
    @peek.setter
    def peek(self, tags: bytes) -> None: ...
    @property
    def relay(self) -> bool: ...
    @property
    def messages(self) -> int:
        """Messages scanned to their last byte."""
    @property
    def buffered(self) -> int:
        """Bytes held (a partial header, a message being collected)."""
    @property
    def in_message(self) -> bool:
        """Whether the scanner stopped inside a message or its header."""
    def feed(self, data: BufferLike) -> list[PgEvent]: ...
    def eof(self) -> None:
        """The transport ended: raises :class:`PgTruncated` inside a message."""

@final
class PgStartup:
    """A startup-phase packet, from :func:`parse_startup`."""

    @property
    def kind(self) -> str:
        """``"startup"``, ``"ssl"``, ``"gssenc"`` or ``"cancel"``."""
    @property
    def length(self) -> int:
        """Bytes the packet took."""
    @property
    def version(self) -> int:
        """A StartupMessage's protocol version (``major << 16 | minor``), else 0."""
    @property
    def params(self) -> list[tuple[str, str]]:
        """A StartupMessage's parameters, in the order sent."""
    @property
    def pid(self) -> int:
        """A CancelRequest's process id, else 0."""
    @property
    def secret(self) -> bytes:
        """A CancelRequest's secret key (4 bytes in protocol 3.0), else empty."""

def parse_startup(data: BufferLike, max_length: int = 10000) -> PgStartup | None:
    """The packet at the front of ``data``, or None if it is incomplete.
    Raises :class:`PgMessageTooLarge` from the first four bytes when the length
    exceeds ``max_length``, :class:`PgMalformed` for a bad length, an unknown
    request code, a protocol other than 3.x or a broken parameter list."""

def encode_message(tag: int, body: BufferLike) -> bytes: ...
def encode_startup(params: Sequence[tuple[str, str]], version: int = 196608) -> bytes: ...
def encode_cancel_request(pid: int, secret: bytes) -> bytes: ...
def encode_error_response(fields: Sequence[tuple[str, str]], *, notice: bool = False) -> bytes:
    """ErrorResponse (or NoticeResponse) from ``(code, value)`` pairs, e.g.
    ``[("S", "FATAL"), ("V", "FATAL"), ("C", "28P01"), ("M", "...")]``."""

def encode_query(sql: str) -> bytes: ...
def encode_parse(name: bytes, sql: str, param_types: Sequence[int] = ...) -> bytes: ...
def encode_authentication(code: int, data: bytes = ...) -> bytes: ...
def encode_sasl_initial_response(mechanism: str, data: bytes) -> bytes: ...
def encode_backend_key_data(pid: int, secret: bytes) -> bytes: ...
def encode_parameter_status(name: str, value: str) -> bytes: ...
def encode_ready_for_query(status: str) -> bytes: ...
def encode_negotiate_protocol_version(newest_minor: int, unrecognized: Sequence[str]) -> bytes: ...
def parse_query(body: bytes) -> bytes:
    """The SQL text, without its terminating NUL."""

def parse_parse(body: bytes) -> tuple[bytes, bytes, list[int]]:
    """``(statement name, query, parameter type oids)``."""

def parse_bind(
    body: bytes,
) -> tuple[bytes, bytes, list[int], list[bytes | None], list[int]]:
    """``(portal, statement, parameter formats, parameters, result formats)``."""

def parse_bind_names(body: bytes) -> tuple[bytes, bytes] | None:
    """``(portal, statement)`` from the front of a Bind body; works on a peek
    prefix; None when the names themselves are cut off."""

def parse_execute(body: bytes) -> tuple[bytes, int]:
    """``(portal, row limit)``."""

def parse_close(body: bytes) -> tuple[str, bytes]:
    """``(kind, name)``: kind ``"S"`` for a statement, ``"P"`` for a portal."""

def parse_describe(body: bytes) -> tuple[str, bytes]:
    """``(kind, name)``, as for :func:`parse_close`."""

def parse_function_call(body: bytes) -> int:
    """The function OID of a fast-path FunctionCall."""

def parse_sasl_initial_response(body: bytes) -> tuple[str, bytes | None]: ...
def parse_password(body: bytes) -> bytes: ...
def parse_authentication(body: bytes) -> tuple[int, bytes]:
    """``(request code, the rest)``; the shape is checked for known codes."""

def parse_sasl_mechanisms(body: bytes) -> list[str]:
    """The mechanisms of an AuthenticationSASL body (code 10)."""

def parse_parameter_status(body: bytes) -> tuple[str, str]: ...
def parse_backend_key_data(body: bytes) -> tuple[int, bytes]: ...
def parse_ready_for_query(body: bytes) -> str:
    """The transaction status: ``"I"`` idle, ``"T"`` in a transaction, ``"E"`` failed."""

def parse_command_complete(body: bytes) -> tuple[str, int | None]:
    """``(command tag, rows)``; rows is None for tags without a count."""

def parse_error_fields(body: bytes) -> dict[str, str]:
    """ErrorResponse/NoticeResponse fields by code (``"C"`` is the SQLSTATE)."""

def parse_notification(body: bytes) -> tuple[int, str, str]:
    """``(process id, channel, payload)``."""

def parse_row_description(body: bytes) -> list[tuple[str, int, int, int, int, int, int]]:
    """Per column: name, table oid, column number, type oid, size, modifier, format."""

def parse_data_row(body: bytes) -> list[bytes | None]: ...
def parse_copy_response(body: bytes) -> tuple[int, list[int]]:
    """``(overall format, per-column formats)`` of CopyIn/Out/BothResponse."""

def parse_negotiate_protocol_version(body: bytes) -> tuple[int, list[str]]: ...
def json_nesting_depth(data: bytes) -> int:
    """The deepest nesting of arrays and objects in a JSON document, without
    parsing it: brackets in strings do not count; a string left open runs to
    the end; unbalanced input gives some number."""

# -- the ledger's hash chain (qmesh-chain) -----------------------------------------

def seal_rows(
    key: bytes,
    prev: bytes,
    first_id: int,
    rows: Sequence[Sequence[bool | int | float | str | None]],
) -> tuple[list[bool | int | float | str | bytearray | None], bytes]:
    """Consecutive rows with ids from ``first_id``, sealed and laid out for
    one INSERT: each row's id, its values, the seal before it and its own,
    end to end; and the last seal (``prev`` without rows). A seal is the
    HMAC-SHA256 of the one before's (``prev``, 32 bytes, for the first) and
    the row's canonical JSON (:func:`canonical_row`); the GIL is released
    while sealing. Seals are bytearrays, which sqlite3 binds without looking
    for an adapter. Another value type is a ``TypeError``, an int outside
    i64 an ``OverflowError``, a ``prev`` not 32 bytes long a ``ValueError``."""

def seal_row(
    key: bytes, prev: bytes, row_id: int, values: Iterable[bool | int | float | str | None]
) -> bytes:
    """The seal of one row (see :func:`seal_rows`)."""

def insert_sealed(
    conn: sqlite3.Connection,
    insert: str,
    key: bytes,
    prev: bytes,
    first_id: int,
    rows: Iterable[Sequence[bool | int | float | str | None]],
    *,
    take_turns: bool = False,
) -> bytes:
    """Seal ``rows`` as :func:`seal_rows` does (ids from ``first_id``, the
    first chained to ``prev``) and insert them with ``insert`` (``INSERT
    INTO table (columns)``: an id, the values, the seal before and the row's
    own) on ``conn``, inside a transaction the caller began and keeps to
    itself; the last seal. Only reading the rows holds the GIL: the
    statements (64 rows each) run on the connection's own SQLite handle,
    through the library the ``sqlite3`` module loaded; with ``take_turns``
    the thread yields the core after each (to an event loop that makes way
    between its rounds, :func:`qmesh.background.make_way`). Values are stored as
    the module binds them (a bool as an int). Database errors are the
    module's (``IntegrityError``, ``OperationalError``); rows of differing
    lengths a ``ValueError``; outside a transaction, on a closed connection
    or where :func:`native_sqlite` is false, ``RuntimeError``."""

def native_sqlite() -> bool:
    """Whether :func:`insert_sealed` works in this interpreter (CPython 3.11
    to 3.14, whose ``sqlite3.Connection`` starts with its handle)."""

def canonical_row(row_id: int, values: Iterable[bool | int | float | str | None]) -> bytes:
    """``json.dumps([row_id, *values], separators=(",", ":"),
    ensure_ascii=False).encode()``, byte for byte."""

# -- the HTTP engine (qmesh-relay's http.rs, qmesh-http) ---------------------------

@final
class HttpRequest:
    """A whole request the engine read; answer it by ``exchange``."""

    exchange: int
    method: str
    target: str
    headers: list[tuple[str, str]]
    """Lower-case names, values as sent (latin-1), in order."""
    body: bytes
    peer: str
    """``host:port`` the engine was given at :meth:`HttpEngine.adopt`."""
    failed_route: int | None
    """The fast path's route this request took before its upstream failed
    (nothing reached the client); ``failed`` says how."""
    failed: HttpProxied | None

@final
class HttpProxied:
    """What came of :meth:`HttpEngine.proxy`.

    ``kind`` is ``"failed"`` (nothing reached the client: ``reason``, and
    ``timeout`` when the upstream was silent), ``"refused"`` (the upstream
    answered ``status``, not 200; ``body`` is the start of its answer;
    nothing reached the client) or ``"relayed"`` (the 200 answer went to the
    client: whole, or cut short with ``reason`` set, or ``client_gone``).
    With ``open`` the answer's end waits for :meth:`HttpEngine.finish`
    (after closing writes if it broke): a held answer
    is released, a chunked one gets its last chunk — so that its cost is
    booked before the client has it all."""

    exchange: int
    kind: Literal["failed", "refused", "relayed"]
    reason: str | None
    timeout: bool
    status: int
    body: bytes
    content_type: str | None
    client_gone: bool
    open: bool
    tokens_in: int
    tokens_out: int
    """The last ``prompt_tokens`` / ``completion_tokens`` seen in the answer (0: none)."""
    bytes_out: int
    first_byte_at: float
    """When the answer's head came (``time.monotonic()``'s clock)."""

@final
class HttpFastBatch:
    """The requests one fast-path route (:meth:`HttpEngine.route`) relayed
    whole since the last poll, for booking together: each is
    ``(started_at, body_len, tokens_in, tokens_out, bytes_out)`` — when
    it was read (``time.monotonic()``'s clock), the request body's size and
    the answer's usage as :class:`HttpProxied` gives it. Answers that broke
    off come one by one, as :class:`HttpFastDone`."""

    route: int
    requests: list[tuple[float, int, int, int, int]]

@final
class HttpFastDone:
    """A request the fast path relayed (:meth:`HttpEngine.route`), for
    booking: its ``route``, what came of it (``outcome``, always
    ``"relayed"``), the request body's size and when it was read
    (``time.monotonic()``'s clock). A whole answer is already out; one that
    broke off (``outcome.reason``) and is ``outcome.open`` waits for closing
    writes and :meth:`HttpEngine.finish`."""

    exchange: int
    route: int
    outcome: HttpProxied
    body_len: int
    started_at: float

@final
class HttpRouteReleased:
    """No request will name ``route`` any more: forgotten or expired, and
    none of its requests in flight."""

    route: int

@final
class HttpNotice:
    """``drained``: a produced answer's backlog fell below the low-water
    mark; ``gone``: the client left before its answer ended."""

    exchange: int
    kind: Literal["drained", "gone"]

@final
class HttpEngine:
    """HTTP/1.1 connections served on the engine threads.

    The engine owns each adopted socket: it reads and checks requests
    (heads up to ``max_header_bytes``: 431; bodies up to ``max_body_bytes``:
    413; length or chunked, ambiguous framing refused; ``request_timeout``
    from a request's first byte to its end: 408; ``idle_timeout`` between
    requests), reports each as an :class:`HttpRequest` through :meth:`take`
    (``notify_fd`` turns readable), and writes the answer Python gives by
    one of :meth:`respond`, :meth:`start`/:meth:`write`/:meth:`finish` or
    :meth:`proxy`. A write that makes no progress for ``request_timeout``
    ends the connection. Keep-alive and pipelining as HTTP/1.1 says.
    """

    def __new__(
        cls,
        *,
        max_header_bytes: int,
        max_body_bytes: int,
        idle_timeout: float,
        request_timeout: float,
        max_idle_per_upstream: int = 64,
        upstream_idle: float = 30.0,
        inline: bool = False,
        max_fast_reports: int = 256,
    ) -> Self:
        """On the process's engine threads, or with ``inline`` on none: its
        owner then calls :meth:`poll` when ``poll_fd`` is readable (which it
        also is when one of its timeouts is due). On the engine threads,
        at most ``max_fast_reports`` fast-path requests' reports wait for
        :meth:`take`; past that, whole requests wait in the engine until
        the next :meth:`take`, so the fast path never runs ahead of its
        bookkeeping by more."""

    @property
    def notify_fd(self) -> int:
        """Readable when there is something to :meth:`take`."""

    @property
    def poll_fd(self) -> int:
        """Readable when an inline engine has work for :meth:`poll` (else
        ``notify_fd``)."""

    def poll(
        self,
    ) -> list[
        HttpRequest | HttpProxied | HttpFastBatch | HttpFastDone | HttpRouteReleased | HttpNotice
    ]:
        """Run an inline engine's ready work and due timeouts, then :meth:`take`."""

    def adopt(self, fd: int, peer: str, *, tls: TlsServerConfig | None = None) -> None:
        """Serve the connected socket ``fd``; the engine owns (and closes) it.
        With ``tls`` it is a TLS server there (the handshake bounded by the
        request timeout)."""

    def respond(
        self, exchange: int, status: int, headers: bytes, body: bytes, *, close: bool = False
    ) -> bool:
        """A whole answer (``headers``: ``name: value\\r\\n`` lines; framing
        and ``server`` are added). False if the client is gone."""

    def start(self, exchange: int, status: int, headers: bytes) -> bool:
        """The head of a chunked answer. False if the client is gone."""

    def write(self, exchange: int, data: bytes) -> int | None:
        """One chunk: the bytes now waiting for the client (at 256 KiB or
        more, wait for a ``drained`` notice), or None if it is gone."""

    def finish(self, exchange: int) -> bool:
        """End a chunked answer, or release a held relayed one. False if the
        client is gone (or nothing waits for it)."""

    def abort(self, exchange: int) -> None:
        """End the exchange's connection now."""

    def proxy(
        self,
        exchange: int,
        host: str,
        port: int,
        request: bytes,
        headers: bytes,
        first_byte_timeout: float,
        chunk_timeout: float,
        *,
        hold: bool = False,
        tls: TlsClientConfig | None = None,
        server_name: str | None = None,
    ) -> bool:
        """Send ``request`` (a whole HTTP/1.1 request) to ``host`` (an IP
        address) ``:port`` on a pooled keep-alive connection, and relay a
        200 answer to the client with ``headers`` added; an
        :class:`HttpProxied` reports the result. With ``hold`` the answer
        goes to the client only once whole (up to 8 MiB; a larger one is
        relayed as it comes), so one cut short is ``"failed"``. With ``tls``
        the upstream is spoken to over TLS, verified for ``server_name``
        (pooled connections are kept per name). False if the client is gone."""

    def route(
        self,
        authorization: bytes,
        path: str,
        model: str,
        stream: bool,
        *,
        route: int,
        app: str,
        host: str,
        port: int,
        request_head: bytes,
        upstream_model: str,
        headers: bytes,
        first_byte_timeout: float,
        chunk_timeout: float,
        max_body: int,
        max_tokens: int,
        max_in_flight: int,
        ttl: float,
        tls: TlsClientConfig | None = None,
        server_name: str | None = None,
    ) -> None:
        """The fast path: relay a ``POST path`` with this ``Authorization``
        value whose JSON body asks for ``model`` (streamed or not) to
        ``host:port`` without asking Python, for ``ttl`` seconds, while the
        body is at most ``max_body`` bytes, its ``max_tokens`` at most
        ``max_tokens`` and ``app`` has fewer than ``max_in_flight`` such
        requests in flight. The upstream request is ``request_head`` (request
        line and headers) with its length and the body, renamed to
        ``upstream_model`` (a stream asks for usage); ``headers`` are added
        to the answer's head. Each is reported for booking: in an
        :class:`HttpFastBatch` with the others its route relayed whole since
        the last poll, or as an :class:`HttpFastDone` when it broke off; one
        whose upstream fails before a byte reached the client comes as an
        :class:`HttpRequest` with ``failed`` set. Replaces the key's
        route (an :class:`HttpRouteReleased` says when ``route`` is done
        with). A body the engine might read otherwise than Python is left
        to Python."""

    def forget_routes(self) -> None:
        """Forget every route (their requests in flight finish)."""

    def fast_in_flight(self, app: str) -> int:
        """Requests of ``app`` in flight on the fast path."""

    def take(
        self,
    ) -> list[
        HttpRequest | HttpProxied | HttpFastBatch | HttpFastDone | HttpRouteReleased | HttpNotice
    ]: ...
    def stats(self) -> tuple[int, int, int, int, int, int, int, int]:
        """``(clients, upstreams, idle_upstreams, requests, proxied, reused, fast,
        held_back)``: ``held_back`` counts upstream silences past their deadline
        not held against the upstream, since its client was not reading."""

    def close(self) -> None:
        """Close every connection; the engine serves nothing more."""
