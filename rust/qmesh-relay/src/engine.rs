//! The tunnel engine: the per-message path of one session, run by one of the
//! process's engine threads (`reactor.rs`: about one per core, each serving
//! many sessions).
//!
//! Python (Trio) keeps the session's meaning: handshakes, which streams exist,
//! services, policy. The engine keeps what every message touches, and what
//! every idle session needs:
//!
//! * the tunnel socket of the current connection (reads, opens, dispatches;
//!   seals and writes, batching everything that became ready in one round);
//! * the reliable counters: retention of sealed frames until acknowledged,
//!   `recv_next`, and ACKs (piggybacked, or alone after `ack_delay`);
//! * PING → PONG, and the heartbeat: a PING of its own every period while
//!   attached (the round-trip time comes back in the PONG), and the end of
//!   the connection when the peer went silent, or kept talking but stopped
//!   acknowledging ([`Heartbeat`]). A Gate holding thousands of idle edges
//!   runs no Python for them;
//! * **native streams**: a tunnel stream whose other end is a plain socket
//!   (a relayed Postgres connection, a TCP forward). Their DATA, WINDOW,
//!   CLOSE and RESET frames never reach Python: bytes go from the tunnel to
//!   the socket and back with per-stream credit flow control exactly as
//!   `qmesh/tunnel/stream.py` does it. A stream may carry Postgres scanners
//!   (`qmesh-pg`) that check framing and collect the messages an audit needs
//!   ("taps", delivered to Python in batches, stamped with the time seen).
//!
//! Every other frame goes up to Python as an [`Event`], with a wake-up
//! through a [`Notifier`] (one eventfd Trio waits on, shared by sessions). The invariants of `qmesh/tunnel/session.py` hold
//! unchanged: a reliable frame is retained from sealing until acknowledged;
//! `recv_next` moves only once a frame has been dispatched (to a socket, or
//! into the event queue, which belongs to the session and outlives the
//! connection); control frames belong to one connection.
//!
//! Locking: all state sits behind one mutex, taken by the engine thread for a
//! round (one batch of this session's events, or its timers) and by Python's
//! thread for a call. The engine thread never touches
//! the GIL, so a Python thread blocking on the mutex while holding the GIL
//! cannot deadlock against it.
//!
//! Sockets are borrowed, never owned: Python keeps each socket object alive
//! and closes it only after the engine has stopped watching it
//! ([`Engine::detach`], a native stream's end or [`Engine::abort_native`]).

// Foldhash, not SipHash: `natives` is looked up for every message of a
// native stream; its keys are stream ids, at most a session's
// `max_streams_per_session`, so even keys chosen to collide cost little.
use foldhash::{HashMap, HashMapExt};

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use qmesh_pg as pg;
use qmesh_wire::frame_type::{ACK, CLOSE, DATA, PING, PONG, RESET, WINDOW};
use qmesh_wire::{reset_code, FrameDecoder, FrameEncoder, FrameRef, CONTROL_TYPE_MIN};

use crate::audit::AuditAuthor;
use crate::error::{Error, PgError, Result, Side, SocketError, Violation};
use crate::notify::Notifier;
use crate::pool::{Lease, LeaseTaker, ReturnWhy, Shelf};
use crate::pooled::{self, Pooled, PooledEnd, PooledSpec};
use crate::reactor::{self, Driven, Registration, Roaming};
use crate::readonly::{self, AnswerCut};
use crate::statements::SessionStatements;
use crate::sys::{self, BROKEN, READABLE, WRITABLE};
use crate::tls::TlsLink;

const TOKEN_TUNNEL: u64 = 1;
const TOKEN_FIRST_STREAM: u64 = 2;

/// While this much sealed data waits for the tunnel socket, native streams
/// stop reading their sockets (credit alone would allow a window per stream).
const UNSENT_HIGH_WATER: usize = 4 * 1024 * 1024;
/// Payload bytes one round decodes from the tunnel: the rest waits in the
/// decoder (and the socket is not read) for the next round, so that a
/// peer's compressed frames cannot make one round hold, or spend the
/// engine thread on, more than this (a frame that decompresses to 1 MiB
/// can be under 100 bytes on the wire).
const DECODED_PER_ROUND: usize = 4 * 1024 * 1024;
/// While frames for Python hold this many bytes, the engine decodes no
/// more of the tunnel: Python's taking them is the tunnel's pace.
const EVENTS_HIGH_WATER: usize = 16 * 1024 * 1024;
/// What an event costs beyond its payload, counted against
/// [`EVENTS_HIGH_WATER`] (so that empty frames count too).
const EVENT_OVERHEAD: usize = 64;
/// Statements awaiting their answers that a session's audit follows: each
/// is a record (some 100 bytes), and a client that pipelines without
/// reading the answers is otherwise bounded only by the sockets' buffers
/// (millions of 5-byte Syncs). Past it the session ends.
const MAX_UNANSWERED: usize = 100_000;
/// Bytes read from one native socket per round, so one busy stream cannot
/// delay the others' turns.
const NATIVE_READS_PER_ROUND: usize = 4;

/// The server's kinds whose texts have no bound (ErrorResponse,
/// NoticeResponse). A relay-mode scanner passes on a message it reports
/// whole only once all of it is in, and one longer than the stream's credit
/// never would be: it reads these by their first bytes (a peek), where
/// PostgreSQL puts the severity and the SQLSTATE.
const LONG_SERVER_KINDS: &[u8] = b"EN";

/// Tuning, fixed for an engine's life.
#[derive(Debug, Clone)]
pub struct Config {
    /// Acknowledge at once when this many reliable frames are unacknowledged...
    pub ack_every: u64,
    /// ...else at most this long after the first one arrived.
    pub ack_delay: Duration,
    /// A peer leaving more than this many bytes unacknowledged is broken.
    pub max_unacked: usize,
    /// Bytes asked of the tunnel socket per read.
    pub read_size: usize,
    /// Largest DATA payload a native stream sends.
    pub chunk_size: usize,
    /// Tap records wait at most this long before Python is woken for them...
    pub tap_delay: Duration,
    /// ...or until this many are waiting.
    pub tap_batch: usize,
    /// Liveness of attached connections; none: the caller's business.
    pub heartbeat: Option<Heartbeat>,
}

/// The engine's watch over an attached connection.
#[derive(Debug, Clone, Copy)]
pub struct Heartbeat {
    /// A PING this often...
    pub every: Duration,
    /// ...and the connection fails ([`Error::Silent`]) when nothing arrived
    /// for longer than this, or ([`Violation::NeverAcknowledged`]) when the
    /// oldest unacknowledged frame stayed so for longer than this (a peer
    /// that answers PINGs but never acknowledges would have its frames
    /// retained forever: like TCP's user timeout). Checked at each PING.
    pub dead_after: Duration,
}

impl Heartbeat {
    /// Time between checks: at least three within `dead_after`, and at
    /// least one an hour (so that no setting, however large, overflows a
    /// deadline).
    fn period(&self) -> Duration {
        self.every.min(self.dead_after / 3).min(MAX_BEAT_PERIOD)
    }

    /// When the beat after one at `now` is due: a period later, rounded up
    /// to a grid of 1/[`BEAT_GRID_SHARE`] of the period, the same for every
    /// engine of the process. An engine thread then fires the beats of many
    /// idle sessions in one wake-up, not one wake-up each (thousands a
    /// second at a Gate with many edges).
    fn next_after(&self, now: Instant) -> Instant {
        static EPOCH: OnceLock<Instant> = OnceLock::new();
        let epoch = *EPOCH.get_or_init(Instant::now);
        let period = self.period();
        let grid = (period / BEAT_GRID_SHARE).as_nanos().max(1);
        let since = (now + period).saturating_duration_since(epoch).as_nanos();
        epoch + Duration::from_nanos((since.div_ceil(grid) * grid) as u64)
    }
}

/// See [`Heartbeat::next_after`]: beats come at most this share of a
/// period late (5 s: 4.9 ms). A coarser grid saves few more wake-ups but
/// fires larger bursts: at 10,000 edges and 1/64 (78 ms), 150 PINGs at once,
/// and a request that came during one waited for it.
const BEAT_GRID_SHARE: u32 = 1024;
/// See [`Heartbeat::period`].
const MAX_BEAT_PERIOD: Duration = Duration::from_secs(3600);

/// The heartbeat's state on one connection.
#[derive(Debug)]
struct Beat {
    next: Instant,
    /// The latest PING's id and when it was sent.
    ping: Option<(u64, Instant)>,
    /// The oldest unacknowledged frame at a check, and since when.
    oldest_unacked: Option<(u64, Instant)>,
}

/// A Postgres message a native stream's scanner reported.
#[derive(Debug, Clone, PartialEq)]
pub struct TapRecord {
    /// `time.monotonic()` when the engine saw it.
    pub at: f64,
    /// Arrived from the tunnel (the client), else from the socket (the server).
    pub from_tunnel: bool,
    pub tag: u8,
    /// The message, header included (a prefix for a peek kind).
    pub raw: Vec<u8>,
    /// A guarded message held back: nothing more of the stream reaches the
    /// socket until Python gives its verdict ([`Engine::verdict`]).
    pub hold: bool,
}

/// How a native stream ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// Both directions closed, everything delivered.
    Clean,
    /// The socket reached end of stream on a stream asked to end there.
    SocketEof,
    /// The peer reset the stream.
    Reset { code: u16, reason: String },
    /// The peer broke flow control; the engine sent RESET.
    Protocol(Violation),
    /// The socket failed.
    Socket(SocketError),
    /// A Postgres scanner rejected the bytes (framing, size, truncation).
    /// The chunk holding the bad message was neither relayed nor reported
    /// (so the audit never lists a statement the server did not get).
    Postgres(PgError),
    /// Python took the stream back ([`Engine::abort_native`]) or the session ended.
    Aborted,
    /// A pooled stream's client sent what the engine does not relay: Python's
    /// relay carries on ([`PooledEnd`]).
    Handback,
    /// A pooled stream's client waited its pool's limit for a connection.
    PoolTimeout,
    /// A read-only session's server reported the read-only setting turned
    /// off ([`PgTap::read_only`]): the connection holds a session setting
    /// no other client may get, and the client's session ends.
    ReadOnlyOff,
}

/// A native stream's end, with what Python needs to carry on with the stream.
#[derive(Debug, PartialEq, Eq)]
pub struct Outcome {
    pub ending: Ending,
    /// Send credit left.
    pub credit: u64,
    /// CLOSE was sent (the socket reached end of stream).
    pub eof_sent: bool,
    /// CLOSE was received.
    pub eof_received: bool,
    /// A pooled stream's state.
    pub pooled: Option<PooledEnd>,
}

/// What the engine hands up to Python.
#[derive(Debug)]
pub enum Event {
    /// A frame for Python to dispatch.
    Frame {
        frame_type: u8,
        stream_id: u32,
        payload: Bytes,
    },
    /// Postgres messages a native stream's scanners reported, in order.
    Tap {
        stream_id: u32,
        records: Vec<TapRecord>,
    },
    /// A native stream ended; its socket is no longer watched.
    Ended { stream_id: u32, outcome: Outcome },
}

/// Postgres scanning for a native stream (the Gate's side of a session).
#[derive(Debug, Clone, Default)]
pub struct PgTap {
    /// Scan the client's messages (tunnel → socket): `Some((full, peek))`
    /// kinds to report; framing and limits are checked even when both are empty.
    pub frontend: Option<(Vec<u8>, Vec<u8>)>,
    /// Scan the server's messages (socket → tunnel), reporting these kinds whole.
    pub backend: Option<Vec<u8>>,
    /// Client message kinds held for a verdict (a statement guard): each is
    /// reported (with `hold`) as soon as it is complete, and it and all that
    /// follows wait until Python sends what to relay in its place. Needs
    /// `frontend`.
    pub guard: Vec<u8>,
    /// The session is read-only: the server's side is watched for the
    /// setting turned off (see [`crate::readonly`]), which ends the stream
    /// ([`Ending::ReadOnlyOff`]) before the client gets that answer.
    pub read_only: bool,
    /// Words that a held Query or Parse (the kinds that carry SQL text) must
    /// contain, one of them at least (ASCII letters in any case), to be held:
    /// a statement that names none of them cannot touch what the guard
    /// protects, so it is relayed at once and reported like any tapped
    /// message. Empty: every guarded message is held.
    pub guard_screen: Vec<Vec<u8>>,
    /// A server message of the relay's own (an ErrorResponse), for a
    /// socket that gets a server's messages (the MiniGate's side): if the
    /// session is lost while the socket stands between two messages, it is
    /// written there (without blocking, TLS included) before the socket is
    /// given back. The engine follows the framing of what it writes to the
    /// socket to know. Empty: nothing is followed or written.
    pub farewell: Vec<u8>,
}

/// A stream to relay natively, with the state Python had for it.
#[derive(Debug)]
pub struct NativeSpec {
    pub stream_id: u32,
    pub fd: RawFd,
    /// Bytes that arrived for the stream before; written to the socket first.
    pub to_socket: Vec<u8>,
    /// Send credit the stream has.
    pub credit: u64,
    /// Receive window the stream granted.
    pub window: u64,
    /// Bytes consumed but not yet reported in a WINDOW frame.
    pub consumed: u64,
    /// The peer has already sent CLOSE.
    pub eof_received: bool,
    /// End the stream (sending CLOSE) as soon as the socket reaches end of
    /// stream, instead of waiting for the peer's CLOSE too.
    pub end_on_socket_eof: bool,
    pub tap: PgTap,
    /// The socket's TLS connection, its handshake done: the engine reads and
    /// writes records itself from now on.
    pub tls: Option<TlsHandover>,
    /// A transaction-mode client: `fd` is ignored, the stream borrows its
    /// server connections from the spec's shelf (see [`crate::pooled`]).
    pub pooled: Option<PooledSpec>,
    /// Where the stream records each finished statement itself, with its
    /// rows and outcome, instead of reporting the messages to Python (see
    /// [`crate::statements`]). A stream that is not pooled needs both
    /// scanners, reporting the kinds the audit reads; with a guard, a held
    /// message is followed as the client sent it once its verdict is in.
    pub audit: Option<AuditAuthor>,
}

/// A TLS connection handed to the engine (see [`crate::tls`]).
pub struct TlsHandover(pub rustls::Connection);

impl std::fmt::Debug for TlsHandover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsHandover")
    }
}

struct Conn {
    fd: RawFd,
    encoder: FrameEncoder,
    decoder: FrameDecoder,
    /// Sealed bytes not yet written, from `written` on.
    unsent: Vec<u8>,
    written: usize,
    interest: u32,
    /// Why the connection cannot carry the session any more.
    error: Option<Error>,
}

impl Conn {
    fn backlog(&self) -> usize {
        self.unsent.len() - self.written
    }
}

struct Retained {
    seq: u64,
    frame_type: u8,
    stream_id: u32,
    payload: Bytes,
}

struct Native {
    fd: RawFd,
    credit: u64,
    window: u64,
    /// Input bytes consumed (written, or replaced) but not yet reported in a
    /// WINDOW frame.
    consumed: u64,
    /// Input bytes received from the tunnel and not yet consumed: what the
    /// peer's credit covers.
    unconsumed: usize,
    to_socket: VecDeque<Chunk>,
    socket_eof: bool,
    eof_received: bool,
    shut: bool,
    end_on_socket_eof: bool,
    interest: u32,
    frontend: Option<pg::Scanner>,
    backend: Option<pg::Scanner>,
    /// Kinds the frontend scanner reports for the tap (not held).
    tapped: pg::TagSet,
    guard: pg::TagSet,
    /// Waiting for a verdict on a held client message (its length); `held`
    /// is what followed it.
    awaiting: Option<usize>,
    held: VecDeque<Segment>,
    /// The message awaiting a verdict, for the stream's own audit: it
    /// follows the message as the client sent it, once the verdict is in.
    awaiting_statement: Option<TapRecord>,
    /// The server kinds the tap asks for.
    back_tapped: pg::TagSet,
    /// The session is read-only (see [`crate::readonly`])...
    read_only: bool,
    /// ...and its server reported the setting turned off: the stream ends.
    read_only_off: bool,
    /// See [`PgTap::guard_screen`].
    guard_screen: Vec<Vec<u8>>,
    records: Vec<TapRecord>,
    /// The framing of what was written to the socket, with the farewell
    /// to write after a whole message (see [`PgTap::farewell`]).
    written: Option<(pg::MessageCursor, Vec<u8>)>,
    /// The socket's TLS layer, if it has one.
    tls: Option<TlsLink>,
    /// A pooled stream's state; `fd` is its lease's, or -1 without one.
    pooled: Option<Pooled>,
    /// The audit of a stream that records its statements itself (the
    /// scanners' reports go there, not to Python).
    audit: Option<SessionStatements>,
    /// Bytes inside the frontend scanner (a guarded message being
    /// collected) already counted consumed...
    credited_inside: usize,
    /// ...and those of them that have left it, not to be counted again
    /// when they are queued for the socket.
    discount: usize,
}

/// A pooled server connection's TLS goes back into `lease`'s slot, for
/// its next holder. True if plaintext the server sent is still inside it:
/// the server spoke past its last answer, and the connection is not to be
/// lent again.
fn tls_back_to(tls: &mut Option<TlsLink>, lease: &Lease) -> bool {
    let (Some(link), Some(slot)) = (tls.take(), lease.tls.as_ref()) else {
        return false;
    };
    let spoke = link.has_pending();
    slot.put(link.into_connection());
    spoke
}

/// Bytes for the socket, and how many input bytes they stand for (a
/// guard's replacement differs in length from what it replaces).
struct Chunk {
    data: Bytes,
    input: usize,
}

/// Scanned client input, in order, in guard mode.
enum Segment {
    Data(Bytes),
    Record(TapRecord),
    Hold(TapRecord),
}

impl Native {
    /// Where this stream's reported messages go.
    fn reports(&mut self) -> Reports<'_> {
        Reports {
            records: &mut self.records,
            audit: self.audit.as_mut(),
        }
    }

    /// Bytes read from the socket: scan them (if asked) and return what to
    /// send now, in DATA frames. On a scan error nothing of `data` is sent
    /// or recorded.
    fn outbound(&mut self, data: &[u8]) -> Result<Vec<Bytes>, PgError> {
        let side = Side::Server;
        let (read_only, off) = (self.read_only, self.read_only_off);
        let cut =
            if let (Some(pooled), Some(scanner)) = (self.pooled.as_mut(), self.backend.as_mut()) {
                // Statements the server finished before an error stay
                // recorded: they ran.
                let at = sys::monotonic();
                let cut = AnswerCut::new(data.len(), read_only, off);
                let mut sink = pooled::Back { pooled, at, cut };
                scanner
                    .feed(data, &mut sink)
                    .map_err(|error| PgError { side, error })?;
                sink.cut
            } else {
                let Some(scanner) = self.backend.as_mut() else {
                    return Ok(vec![Bytes::copy_from_slice(data)]);
                };
                let reports = Reports {
                    records: &mut self.records,
                    audit: self.audit.as_mut(),
                };
                if !read_only {
                    observe(scanner, reports, data, side, None)?;
                    return Ok(vec![Bytes::copy_from_slice(data)]);
                }
                let mut cut = AnswerCut::new(data.len(), true, off);
                let watch = Some((&mut cut, self.back_tapped));
                observe(scanner, reports, data, side, watch)?;
                cut
            };
        // Read bytes were paid for with the client's credit; those it does
        // not get are not its to count.
        self.credit += cut.swallowed as u64;
        self.read_only_off = cut.off;
        Ok(if cut.out.is_empty() {
            Vec::new()
        } else {
            vec![Bytes::from(cut.out)]
        })
    }

    /// Take bytes from the tunnel: scan them (if asked) and queue them for
    /// the socket, or hold them behind a message awaiting its verdict. On a
    /// scan error nothing of `data` is queued or recorded. Returns the
    /// record of a message that now awaits a verdict.
    fn inbound(&mut self, data: Bytes) -> Result<Option<TapRecord>, PgError> {
        let Some(scanner) = self.frontend.as_mut() else {
            self.queue(data.clone(), data.len());
            return Ok(None);
        };
        if self.guard.is_empty() {
            // Observe mode: the input is relayed as it is.
            let reports = Reports {
                records: &mut self.records,
                audit: self.audit.as_mut(),
            };
            observe(scanner, reports, &data, Side::Client, None)?;
            let input = data.len();
            self.queue(data, input);
            return Ok(None);
        }
        let mut sink = Splitter::new(self.tapped, self.guard, &self.guard_screen);
        let before = scanner.buffered();
        scanner.feed(&data, &mut sink).map_err(|error| PgError {
            side: Side::Client,
            error,
        })?;
        sink.flush();
        // A guarded message is collected whole before anything of it is
        // sent: its bytes are counted consumed as they come in, or one
        // larger than the stream's window would never be complete. They are
        // not counted again when the message is sent.
        let after = scanner.buffered();
        if before + data.len() - after >= self.credited_inside {
            self.discount += self.credited_inside; // the message is out
            self.credited_inside = 0;
        }
        let newly = after - self.credited_inside;
        self.consumed += newly as u64;
        self.unconsumed -= newly;
        self.credited_inside = after;
        Ok(self.release(sink.segments))
    }

    /// A pooled stream's client bytes: the Queries the engine relays are
    /// queued for the server; the rest waits for Python (see
    /// [`crate::pooled`]). On a scan error nothing of `data` is queued or
    /// recorded.
    fn inbound_pooled(&mut self, data: &[u8]) -> Result<(), PgError> {
        let scanner = self
            .frontend
            .as_mut()
            .expect("a pooled stream scans its client");
        let mut sink = pooled::Front::new(self.pooled.as_mut().expect("a pooled stream"));
        let result = scanner.feed(data, &mut sink);
        let buffered = scanner.buffered() as u64;
        let (out, input, dropped) = sink.into_parts();
        result.map_err(|error| PgError {
            side: Side::Client,
            error,
        })?;
        self.queue_front(out, input, dropped);
        // A message collected whole holds its bytes unconsumed until it is
        // complete: one larger than the stream's window would never be. Past
        // half the window, the session goes to Python's relay, which reads
        // such a message as it comes.
        let pooled = self.pooled.as_mut().expect("a pooled stream");
        if buffered > self.window / 2 && pooled.handback.is_none() {
            pooled.handback = Some(Vec::new());
        }
        Ok(())
    }

    /// What a pooled stream's client messages came to: bytes for the
    /// server, standing for `input` client bytes; `dropped` client bytes
    /// consumed with nothing sent.
    fn queue_front(&mut self, out: Vec<u8>, input: usize, dropped: usize) {
        self.consumed += dropped as u64;
        self.unconsumed -= dropped;
        if input > 0 || !out.is_empty() {
            self.queue(Bytes::from(out), input);
        }
    }

    /// A pooled stream's client messages that waited for a connection,
    /// relayed now that it holds one.
    fn replay_deferred(&mut self) {
        let pooled = self.pooled.as_mut().expect("a pooled stream");
        if pooled.deferred.is_empty() {
            return;
        }
        let mut sink = pooled::Front::new(pooled);
        sink.replay_deferred();
        let (out, input, dropped) = sink.into_parts();
        self.queue_front(out, input, dropped);
    }

    /// The socket of the lease this pooled stream holds, if it holds one.
    fn roaming(&self) -> Option<&Roaming> {
        let lease = self.pooled.as_ref()?.lease.as_ref()?;
        Some(&lease.roaming)
    }

    /// The engine thread no longer watches the socket when this returns.
    fn unwatch(&mut self, registration: &Registration) {
        match self.roaming() {
            Some(roaming) => roaming.release(),
            None if self.interest != 0 => registration.unwatch(self.fd),
            None => {}
        }
        self.interest = 0;
    }

    /// The stream is dropped without an outcome (the session is over): a
    /// connection it holds goes to Python to be closed (it may be inside a
    /// transaction), its place in line is given up.
    fn give_up_lease(&mut self) {
        if let Some(end) = self.pooled_end(false) {
            if let (Some(lease), Some(pooled)) = (end.lease, self.pooled.as_ref()) {
                pooled.shelf.return_to_python(lease, ReturnWhy::Close);
            }
        }
    }

    /// A pooled stream's state as it ends; its lease (if any) goes with it.
    /// The audit's statements still running go up to Python's relay if it
    /// `carries_on` with the session, else they are recorded unanswered.
    fn pooled_end(&mut self, carries_on: bool) -> Option<PooledEnd> {
        let pooled = self.pooled.as_mut()?;
        if let Some((ticket, _)) = pooled.waiting.take() {
            // Served meanwhile: the connection in the mailbox goes back.
            pooled.shelf.cancel(ticket);
        }
        if carries_on {
            self.records.extend(pooled.running());
        } else {
            pooled.statements.end_unanswered(sys::monotonic());
        }
        // Messages waiting for a connection came first; then those from
        // the first the engine does not relay.
        let mut leftover = std::mem::take(&mut pooled.deferred);
        leftover.extend(pooled.handback.take().unwrap_or_default());
        if let Some(scanner) = self.frontend.as_mut() {
            // Every kind is collected whole, so what is inside is a message
            // boundary's worth of bytes, never a message half passed on.
            leftover.extend(scanner.take_partial().unwrap_or_default());
        }
        let lease = pooled.lease.take();
        if let Some(lease) = &lease {
            tls_back_to(&mut self.tls, lease);
        }
        Some(PooledEnd {
            unnamed_held: pooled.unnamed_here && lease.is_some(),
            lease,
            owed: pooled.owed.drain(..).map(pooled::Owed::answer).collect(),
            statements: pooled.take_named(),
            skipping: pooled.skipping,
            unnamed: pooled.unnamed.take().map(|u| u.parse),
            // Inside a pipeline not synced the server is in an implicit
            // transaction, whatever its last ReadyForQuery said.
            status: if pooled.open_pipeline {
                0
            } else {
                pooled.status
            },
            server_mid_message: self.backend.as_ref().is_some_and(pg::Scanner::in_message),
            server_fatal: pooled.server_fatal,
            leftover,
            consumed: self.consumed,
            transactions: pooled.transactions,
        })
    }

    /// Queue scanned segments for the socket until one must be held.
    fn release(&mut self, segments: impl IntoIterator<Item = Segment>) -> Option<TapRecord> {
        let mut hold = None;
        for segment in segments {
            if self.awaiting.is_some() {
                self.held.push_back(segment);
                continue;
            }
            match segment {
                Segment::Data(data) => {
                    let input = data.len();
                    self.queue(data, input);
                }
                Segment::Record(record) => self.reports().keep(record),
                Segment::Hold(record) => {
                    self.awaiting = Some(record.raw.len());
                    if self.audit.is_some() {
                        self.awaiting_statement = Some(record.clone());
                    }
                    hold = Some(record);
                }
            }
        }
        hold
    }

    /// Read from the socket (through its TLS layer, if any).
    fn read_socket(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self.tls.as_mut() {
            None => sys::read(self.fd, buf),
            Some(tls) => tls.read(self.fd, buf),
        }
    }

    /// Whether the socket must be watched for room to write.
    fn wants_write(&self) -> bool {
        !self.to_socket.is_empty() || self.tls.as_ref().is_some_and(TlsLink::wants_write)
    }

    /// Plaintext waits inside the TLS layer: a read must be tried without
    /// a socket event once credit (or a verdict) allows it.
    fn tls_pending(&self) -> bool {
        self.tls.as_ref().is_some_and(TlsLink::has_pending)
    }

    /// The session is lost: write the farewell if the socket stands
    /// between two messages. Best effort: a socket without room gets what
    /// fits, and a client cut inside a message gets nothing.
    fn say_farewell(&mut self) {
        let Some((cursor, farewell)) = self.written.take() else {
            return;
        };
        if !cursor.between_messages() {
            return;
        }
        match self.tls.as_mut() {
            None => {
                let _ = sys::send(self.fd, &farewell);
            }
            Some(tls) => {
                let _ = tls.write(&farewell);
                tls.close();
                let _ = tls.flush(self.fd);
            }
        }
    }

    fn queue(&mut self, data: Bytes, input: usize) {
        let counted = self.discount.min(input);
        self.discount -= counted;
        let input = input - counted;
        if data.is_empty() {
            self.consumed += input as u64;
            self.unconsumed -= input;
        } else {
            self.to_socket.push_back(Chunk { data, input });
        }
    }

    /// Write queued bytes to the socket until it would block; then, once
    /// everything is written and the peer has closed, half-close the socket.
    fn write_out(&mut self) -> Result<(), SocketError> {
        if self.fd < 0 {
            return Ok(()); // a pooled stream between connections
        }
        let send_error = |err: &std::io::Error| SocketError::new("send", err);
        while let Some(front) = self.to_socket.front_mut() {
            let sent = match self.tls.as_mut() {
                None => sys::send(self.fd, &front.data),
                Some(tls) => {
                    // Sealed into records; the layer holds a bounded amount,
                    // written out when it is full and once after the loop,
                    // so that queued chunks leave in one write.
                    match tls.write(&front.data) {
                        Ok(0) => {
                            tls.flush(self.fd).map_err(|e| send_error(&e))?;
                            match tls.write(&front.data) {
                                Ok(0) => Err(std::io::ErrorKind::WouldBlock.into()),
                                other => other,
                            }
                        }
                        other => other,
                    }
                }
            };
            match sent {
                Ok(n) if n == front.data.len() => {
                    if let Some((cursor, _)) = &mut self.written {
                        cursor.advance(&front.data);
                    }
                    self.consumed += front.input as u64;
                    self.unconsumed -= front.input;
                    self.to_socket.pop_front();
                }
                Ok(n) => {
                    if let Some((cursor, _)) = &mut self.written {
                        cursor.advance(&front.data[..n]);
                    }
                    // A plain chunk's bytes are its input, one for one; a
                    // replacement counts as consumed once all of it is written.
                    if front.input == front.data.len() {
                        front.input -= n;
                        self.consumed += n as u64;
                        self.unconsumed -= n;
                    }
                    let _ = front.data.split_to(n);
                }
                Err(err) if sys::would_block(&err) => return Ok(()),
                Err(err) => return Err(send_error(&err)),
            }
        }
        if let Some(tls) = self.tls.as_mut() {
            tls.flush(self.fd).map_err(|e| send_error(&e))?;
        }
        // A pooled stream's connection is the pool's: never half-closed.
        if self.eof_received
            && !self.shut
            && self.awaiting.is_none()
            && self.held.is_empty()
            && self.pooled.is_none()
        {
            if let Some(tls) = self.tls.as_mut() {
                tls.close();
                tls.flush(self.fd).map_err(|e| send_error(&e))?;
                if tls.wants_write() {
                    return Ok(()); // the rest when the socket has room
                }
            }
            self.shut = true;
            sys::shutdown_write(self.fd).map_err(|err| SocketError::new("shutdown", &err))?;
        }
        Ok(())
    }
}

/// Where a stream's reported messages go: its own audit (see
/// [`crate::statements`]), else up to Python as tap records.
struct Reports<'a> {
    records: &'a mut Vec<TapRecord>,
    audit: Option<&'a mut SessionStatements>,
}

impl Reports<'_> {
    /// A message (`raw`, type `tag`) seen at `at`, from the client when
    /// `from_tunnel`.
    fn note(&mut self, tag: u8, raw: &[u8], at: f64, from_tunnel: bool) {
        match self.audit.as_deref_mut() {
            Some(audit) if from_tunnel => audit.client(tag, raw, at),
            Some(audit) => audit.statements.server(tag, raw, at),
            None => self.records.push(TapRecord {
                at,
                from_tunnel,
                tag,
                raw: raw.to_vec(),
                hold: false,
            }),
        }
    }

    /// A relay-mode scanner's record, released in order.
    fn keep(&mut self, record: TapRecord) {
        if self.audit.is_some() {
            self.note(record.tag, &record.raw, record.at, record.from_tunnel);
        } else {
            self.records.push(record);
        }
    }
}

/// Scan `data` in observe mode, noting the reports; on error the chunk is
/// not relayed, so nothing it reported is kept (the statements it started
/// are forgotten). With a `cut` (a read-only session's server bytes, the
/// scanner in relay mode, reporting [`readonly::WATCHED`] too), the bytes
/// for the client are gathered there, and only the kinds it names are noted.
fn observe(
    scanner: &mut pg::Scanner,
    mut reports: Reports<'_>,
    data: &[u8],
    side: Side,
    cut: Option<(&mut AnswerCut, pg::TagSet)>,
) -> Result<(), PgError> {
    let records = reports.records.len();
    let statements = reports.audit.as_ref().map(|audit| audit.statements.len());
    let mut sink = Observer {
        reports: &mut reports,
        at: sys::monotonic(),
        from_tunnel: side == Side::Client,
        cut,
    };
    let result = scanner.feed(data, &mut sink).and_then(|()| {
        match reports.audit.as_ref().map(|audit| audit.statements.len()) {
            Some(waiting) if waiting > MAX_UNANSWERED => Err(pg::Error::Unanswered {
                waiting,
                limit: MAX_UNANSWERED,
            }),
            _ => Ok(()),
        }
    });
    result.map_err(|error| {
        reports.records.truncate(records);
        if let (Some(audit), Some(len)) = (reports.audit.as_deref_mut(), statements) {
            audit.statements.truncate(len);
        }
        PgError { side, error }
    })
}

/// Notes an observe-mode scanner's reports.
struct Observer<'a, 'r> {
    reports: &'a mut Reports<'r>,
    at: f64,
    from_tunnel: bool,
    cut: Option<(&'a mut AnswerCut, pg::TagSet)>,
}

impl pg::Sink for Observer<'_, '_> {
    fn pass(&mut self, bytes: &[u8]) {
        if let Some((cut, _)) = self.cut.as_mut() {
            cut.pass(bytes);
        }
    }

    fn message(&mut self, tag: u8, raw: &[u8], _complete: bool) {
        if let Some((cut, tapped)) = self.cut.as_mut() {
            let was_off = cut.off;
            if !cut.withheld(tag, raw) {
                cut.push(tag, raw);
            } else if !was_off {
                if let Some(audit) = self.reports.audit.as_deref_mut() {
                    audit.statements.ends_on_front(readonly::SQLSTATE);
                }
            }
            if !tapped.contains(tag) {
                return; // scanned for the cut alone
            }
        }
        self.reports.note(tag, raw, self.at, self.from_tunnel);
    }
}

/// A guarded client's relay-mode scanner output as segments: bytes to
/// forward, records for the tap, and guarded messages to hold.
struct Splitter<'s> {
    segments: Vec<Segment>,
    pending: Vec<u8>,
    tapped: pg::TagSet,
    guard: pg::TagSet,
    screen: &'s [Vec<u8>],
    at: f64,
}

/// The message kinds that carry SQL text (Query, Parse): the ones a guard
/// screen applies to.
const SQL_TEXT_KINDS: &[u8] = b"QP";

/// Whether `raw` contains one of `words`, ASCII letters compared in any case.
pub(crate) fn mentions_any(raw: &[u8], words: &[Vec<u8>]) -> bool {
    words.iter().any(|word| {
        !word.is_empty()
            && raw
                .windows(word.len())
                .any(|window| window.eq_ignore_ascii_case(word))
    })
}

impl<'s> Splitter<'s> {
    fn new(tapped: pg::TagSet, guard: pg::TagSet, screen: &'s [Vec<u8>]) -> Splitter<'s> {
        Splitter {
            segments: Vec::new(),
            pending: Vec::new(),
            tapped,
            guard,
            screen,
            at: sys::monotonic(),
        }
    }

    /// A guarded message to hold: a SQL text that passes the screen is not.
    fn holds(&self, tag: u8, raw: &[u8]) -> bool {
        self.guard.contains(tag)
            && (self.screen.is_empty()
                || !SQL_TEXT_KINDS.contains(&tag)
                || mentions_any(raw, self.screen))
    }

    fn flush(&mut self) {
        if !self.pending.is_empty() {
            let data = Bytes::from(std::mem::take(&mut self.pending));
            self.segments.push(Segment::Data(data));
        }
    }

    fn record(&self, tag: u8, raw: &[u8], hold: bool) -> TapRecord {
        TapRecord {
            at: self.at,
            from_tunnel: true,
            tag,
            raw: raw.to_vec(),
            hold,
        }
    }
}

impl pg::Sink for Splitter<'_> {
    fn pass(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
    }

    fn message(&mut self, tag: u8, raw: &[u8], complete: bool) {
        if complete && self.holds(tag, raw) {
            self.flush();
            let record = self.record(tag, raw, true);
            self.segments.push(Segment::Hold(record));
            return;
        }
        self.pending.extend_from_slice(raw);
        if self.tapped.contains(tag) {
            let record = self.record(tag, raw, false);
            self.segments.push(Segment::Record(record));
        }
    }
}

type OutFrame = (u8, u32, Bytes);

struct State {
    config: Config,
    conn: Option<Conn>,
    retained: VecDeque<Retained>,
    retained_bytes: usize,
    send_next: u64,
    recv_next: u64,
    ack_sent: u64,
    ack_deadline: Option<Instant>,
    /// Frames the engine made this round (and reliable ones waiting for a
    /// connection), sealed together at the end of the round.
    out: Vec<OutFrame>,
    events: VecDeque<Event>,
    /// What the frames among `events` hold ([`EVENTS_HIGH_WATER`]).
    events_bytes: usize,
    /// Whole frames may wait in the decoder: a round stopped decoding at
    /// [`DECODED_PER_ROUND`] or [`EVENTS_HIGH_WATER`]. The tunnel socket
    /// is not read meanwhile.
    undecoded: bool,
    notified: bool,
    /// The connection failed and Python has not been told.
    error_unreported: bool,
    natives: HashMap<u32, Native>,
    /// Native streams whose socket interest may have changed this round.
    dirty: Vec<u32>,
    /// Natives stopped reading (no usable connection, or a backlog).
    reading_paused: bool,
    tap_deadline: Option<Instant>,
    tap_waiting: usize,
    /// The earliest deadline handed to the engine thread's timers (None:
    /// none pending), so that only an earlier one is handed over again.
    scheduled: Option<Instant>,
    bytes_sent: u64,
    bytes_received: u64,
    last_heard: Instant,
    /// While attached with a heartbeat.
    beat: Option<Beat>,
    /// PINGs sent over the engine's life (their ids).
    pings: u64,
    /// The latest PING's round trip.
    rtt: Option<Duration>,
    closed: bool,
    /// Natives whose TLS layer holds plaintext that a read may now take
    /// (credit came back, or a verdict): read at the end of the round, not
    /// in the middle of reading the tunnel.
    tls_resume: Vec<u32>,
    /// When pooled streams waiting in line give up: (deadline, stream, ticket).
    pool_deadlines: BinaryHeap<Reverse<(Instant, u32, u64)>>,
    /// This engine, for the shelves that hand its streams connections.
    me: Weak<Shared>,
}

struct Shared {
    state: Mutex<State>,
    /// Connections shelves handed to this engine's waiting streams:
    /// (stream, ticket, lease, shelf), taken at the next round's end.
    mailbox: Mutex<Vec<Delivery>>,
    registration: Registration,
    notifier: Arc<Notifier>,
    /// What this session posts to `notifier`.
    key: u64,
    /// The notifier is this engine's alone: its `take` drains it.
    own_notifier: bool,
}

type Delivery = (u32, u64, Lease, Arc<Shelf>);

impl LeaseTaker for Shared {
    fn deliver(&self, shelf: Arc<Shelf>, sid: u32, ticket: u64, lease: Lease) {
        self.mailbox
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((sid, ticket, lease, shelf));
        // Taken at the end of this engine's next round, which this makes
        // happen now if nothing else does.
        self.registration.schedule(Instant::now());
    }
}

impl Shared {
    fn take_mailbox(&self) -> Vec<Delivery> {
        std::mem::take(&mut *self.mailbox.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock is a bug; the state may still be
        // used to shut down cleanly, so take it anyway.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The engine of one session; see the module documentation.
pub struct Engine {
    shared: Arc<Shared>,
}

/// Counters for operators and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub recv_next: u64,
    pub send_next: u64,
    pub retained_frames: usize,
    pub retained_bytes: usize,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub native_streams: usize,
    pub attached: bool,
    /// The latest heartbeat's round trip (none before the first PONG).
    pub rtt: Option<Duration>,
}

impl Engine {
    /// An engine that posts `key` to `notifier` when it has something for
    /// Python; with no notifier, it gets one of its own (whose
    /// [`Engine::notify_fd`] only it makes readable).
    pub fn new(config: Config, notifier: Option<(Arc<Notifier>, u64)>) -> std::io::Result<Engine> {
        reactor::start_pool()?;
        let own_notifier = notifier.is_none();
        let (notifier, key) = match notifier {
            Some(shared) => shared,
            None => (Arc::new(Notifier::new()?), 0),
        };
        let shared = Arc::new_cyclic(|me: &Weak<Shared>| Shared {
            registration: Registration::new(me.clone() as Weak<dyn Driven>),
            notifier,
            key,
            own_notifier,
            mailbox: Mutex::new(Vec::new()),
            state: Mutex::new(State {
                pool_deadlines: BinaryHeap::new(),
                me: me.clone(),
                config,
                conn: None,
                retained: VecDeque::new(),
                retained_bytes: 0,
                send_next: 0,
                recv_next: 0,
                ack_sent: 0,
                ack_deadline: None,
                out: Vec::new(),
                events: VecDeque::new(),
                events_bytes: 0,
                undecoded: false,
                notified: false,
                error_unreported: false,
                natives: HashMap::new(),
                dirty: Vec::new(),
                reading_paused: false,
                tap_deadline: None,
                scheduled: None,
                tap_waiting: 0,
                bytes_sent: 0,
                bytes_received: 0,
                last_heard: Instant::now(),
                beat: None,
                pings: 0,
                rtt: None,
                closed: false,
                tls_resume: Vec::new(),
            }),
        });
        Ok(Engine { shared })
    }

    /// Readable whenever [`Engine::take`] has something (for a shared
    /// notifier: whenever any of its engines has).
    pub fn notify_fd(&self) -> RawFd {
        self.shared.notifier.fd()
    }

    pub fn stats(&self) -> Stats {
        let st = self.shared.lock();
        Stats {
            recv_next: st.recv_next,
            send_next: st.send_next,
            retained_frames: st.retained.len(),
            retained_bytes: st.retained_bytes,
            bytes_sent: st.bytes_sent,
            bytes_received: st.bytes_received,
            native_streams: st.natives.len(),
            attached: st.conn.is_some(),
            rtt: st.rtt,
        }
    }

    /// Apply the peer's `recv_next` from a handshake; the encoder for the
    /// next connection must start at it.
    /// [`Error::Protocol`] if it does not fit what was sent.
    pub fn acknowledge(&self, peer_recv_next: u64) -> Result<()> {
        let mut st = self.shared.lock();
        st.on_ack(peer_recv_next)?;
        // After on_ack, nothing below peer_recv_next is held: a mismatch
        // means the peer wants frames it had already acknowledged.
        let oldest = st.retained.front().map_or(st.send_next, |r| r.seq);
        if oldest != peer_recv_next {
            return Err(Violation::ResumeBehind {
                resume: peer_recv_next,
                oldest,
            }
            .into());
        }
        Ok(())
    }

    /// Carry the session over a new connection: resend every unacknowledged
    /// frame, then whatever waited for a connection, then process `initial`
    /// (bytes read past the handshake).
    pub fn attach(
        &self,
        fd: RawFd,
        encoder: FrameEncoder,
        decoder: FrameDecoder,
        initial: &[u8],
    ) -> Result<()> {
        let mut st = self.shared.lock();
        if st.conn.is_some() {
            return Err(invalid("a connection is already attached"));
        }
        if encoder.next_reliable_seq() != st.retained.front().map_or(st.send_next, |r| r.seq) {
            return Err(invalid(
                "the encoder does not start at the oldest unacknowledged frame",
            ));
        }
        // Else the peer's resent frames would be delivered twice, or skipped.
        if decoder.next_reliable_seq() != st.recv_next {
            return Err(invalid(
                "the decoder does not start at the next frame to receive",
            ));
        }
        st.conn = Some(Conn {
            fd,
            encoder,
            decoder,
            unsent: Vec::new(),
            written: 0,
            interest: 0,
            error: None,
        });
        st.ack_sent = st.recv_next; // the handshake told the peer
        st.ack_deadline = None;
        st.undecoded = false;
        let now = Instant::now();
        st.last_heard = now;
        st.beat = st.config.heartbeat.map(|heartbeat| Beat {
            next: heartbeat.next_after(now),
            ping: None,
            oldest_unacked: None,
        });
        st.out.retain(|(t, _, _)| *t < CONTROL_TYPE_MIN);
        st.resend();
        if !initial.is_empty() {
            st.bytes_received += initial.len() as u64;
            st.on_tunnel_bytes(initial);
        }
        st.mark_all_dirty();
        st.finish(&self.shared);
        Ok(())
    }

    /// Stop using the current connection; once this returns the engine no
    /// longer touches its socket.
    pub fn detach(&self) {
        let mut st = self.shared.lock();
        if let Some(conn) = st.conn.take() {
            if conn.interest != 0 {
                self.shared.registration.unwatch(conn.fd);
            }
        }
        st.beat = None;
        st.ack_deadline = None;
        st.mark_all_dirty();
        st.finish(&self.shared);
    }

    /// Seal and send `frames` now (or keep the reliable ones for the next
    /// connection while none is attached).
    pub fn send(&self, frames: Vec<OutFrame>) {
        let mut st = self.shared.lock();
        st.out.extend(frames);
        st.finish(&self.shared);
    }

    /// Everything waiting for Python, and the current connection's error.
    pub fn take(&self) -> (Vec<Event>, Option<Error>) {
        let mut st = self.shared.lock();
        if self.shared.own_notifier {
            self.shared.notifier.take();
        }
        st.notified = false;
        st.error_unreported = false;
        let events = st.events.drain(..).collect();
        st.events_bytes = 0;
        let error = st.conn.as_ref().and_then(|c| c.error.clone());
        if st.undecoded {
            // The frames Python's pace held back are decoded next.
            st.finish(&self.shared);
        }
        (events, error)
    }

    /// Relay a stream natively from now on. Frames for it that are still
    /// waiting in the event queue are taken over (they are newer than
    /// `spec.to_socket`).
    pub fn attach_native(&self, spec: NativeSpec) -> Result<()> {
        let mut st = self.shared.lock();
        if st.natives.contains_key(&spec.stream_id) {
            return Err(invalid(format!(
                "stream {} is already native",
                spec.stream_id
            )));
        }
        let scanner = |direction, full: &[u8], peek: &[u8], relay: bool| {
            let mut config = pg::ScannerConfig::new(direction);
            config.full = pg::TagSet::from_bytes(full);
            config.peek = pg::TagSet::from_bytes(peek);
            if relay && direction == pg::Direction::Backend {
                let (long, short): (Vec<u8>, Vec<u8>) = full
                    .iter()
                    .partition(|kind| LONG_SERVER_KINDS.contains(kind));
                config.full = pg::TagSet::from_bytes(&short);
                config.peek = pg::TagSet::from_bytes(&[peek, &long].concat());
            }
            config.relay = relay;
            pg::Scanner::new(config).map_err(|e| invalid(e.to_string()))
        };
        let guard = &spec.tap.guard;
        let (frontend, tapped) = match &spec.tap.frontend {
            Some((full, peek)) => {
                // A guard needs its kinds whole, and the bytes handed back
                // in order (relay mode) so it can hold what follows.
                let all_full = [full.as_slice(), guard].concat();
                let relay = !guard.is_empty();
                let tapped = pg::TagSet::from_bytes(&[full.as_slice(), peek].concat());
                (
                    Some(scanner(pg::Direction::Frontend, &all_full, peek, relay)?),
                    tapped,
                )
            }
            None if guard.is_empty() => (None, pg::TagSet::EMPTY),
            None => return Err(invalid("a guard needs the frontend scanner")),
        };
        // A read-only session's server side is scanned for the setting's
        // reports too, in relay mode: what the client gets is cut there.
        let read_only = spec.tap.read_only;
        let back_tapped = pg::TagSet::from_bytes(spec.tap.backend.as_deref().unwrap_or_default());
        let backend = match (&spec.tap.backend, read_only) {
            (None, false) => None,
            (kinds, _) => {
                let mut full = kinds.clone().unwrap_or_default();
                if read_only {
                    full.extend_from_slice(readonly::WATCHED);
                }
                Some(scanner(pg::Direction::Backend, &full, &[], read_only)?)
            }
        };
        let sid = spec.stream_id;
        if spec.pooled.is_some() && !guard.is_empty() {
            return Err(invalid("a pooled stream holds nothing for a verdict"));
        }
        let audit = match (&spec.pooled, spec.audit) {
            (_, None) => None,
            (Some(_), author) => author,
            (None, Some(author)) => {
                if frontend.is_none() || backend.is_none() {
                    return Err(invalid("a stream's own audit needs both scanners"));
                }
                Some(author)
            }
        };
        let (pooled, audit) = match spec.pooled {
            Some(pooled) => {
                let screen = spec.tap.guard_screen.clone();
                (Some(Pooled::new(pooled, audit, screen)), None)
            }
            None => (None, audit.map(SessionStatements::new)),
        };
        let (frontend, backend) = match pooled {
            None => (frontend, backend),
            Some(_) => {
                // Every client kind whole (the engine decides per message);
                // the server's in relay mode, following the ends of the
                // answers owed, errors and (for the audit's records) rows,
                // and answering for what the engine sent in the client's stead.
                // A read-only session's ParameterStatus reports too.
                let frontend = scanner(pg::Direction::Frontend, pg::FRONTEND_TAGS, &[], true)?;
                let kinds: &[u8] = if read_only {
                    b"ZECIs123nS"
                } else {
                    b"ZECIs123n"
                };
                let backend = scanner(pg::Direction::Backend, kinds, b"T", true)?;
                (Some(frontend), Some(backend))
            }
        };
        let native = Native {
            fd: if pooled.is_some() { -1 } else { spec.fd },
            credit: spec.credit,
            window: spec.window,
            consumed: spec.consumed,
            unconsumed: 0,
            to_socket: VecDeque::new(),
            socket_eof: false,
            eof_received: spec.eof_received,
            shut: false,
            end_on_socket_eof: spec.end_on_socket_eof,
            interest: 0,
            frontend,
            backend,
            tapped,
            guard: pg::TagSet::from_bytes(guard),
            awaiting: None,
            held: VecDeque::new(),
            awaiting_statement: None,
            back_tapped,
            read_only,
            read_only_off: false,
            guard_screen: spec.tap.guard_screen,
            records: Vec::new(),
            written: (!spec.tap.farewell.is_empty())
                .then(|| (pg::MessageCursor::new(), spec.tap.farewell)),
            tls: spec.tls.map(|handover| TlsLink::new(handover.0)),
            pooled,
            audit,
            credited_inside: 0,
            discount: 0,
        };
        st.natives.insert(sid, native);
        // What Python held already goes first, through the same path.
        if !spec.to_socket.is_empty() {
            st.inbound(sid, Bytes::from(spec.to_socket));
        }
        // Frames for the stream that Python has not taken yet are the
        // engine's now, in the order they arrived.
        let (mine, rest): (VecDeque<Event>, VecDeque<Event>) = st.events.drain(..).partition(|e| {
            matches!(e, Event::Frame { stream_id, frame_type, .. }
                    if *stream_id == sid && (DATA..=WINDOW).contains(frame_type))
        });
        st.events = rest;
        st.events_bytes -= mine.iter().map(event_bytes).sum::<usize>();
        for event in mine {
            if let Event::Frame {
                frame_type,
                payload,
                ..
            } = event
            {
                if let Err(violation) = st.native_frame(sid, frame_type, payload) {
                    st.fail(violation.into());
                }
            }
        }
        if st.natives.contains_key(&sid) {
            st.write_native(sid);
            st.check_done(sid);
        }
        st.dirty.push(sid);
        st.finish(&self.shared);
        Ok(())
    }

    /// Python's verdict on a held client message: relay `replacement` in
    /// its place (the message itself, or something else), then carry on.
    pub fn verdict(&self, stream_id: u32, replacement: Vec<u8>) -> Result<()> {
        let mut st = self.shared.lock();
        let result = st.verdict(stream_id, Bytes::from(replacement));
        st.finish(&self.shared);
        result
    }

    /// The connection a pooled stream holds now (its pool's id for it).
    pub fn pooled_lease(&self, stream_id: u32) -> Option<u64> {
        let st = self.shared.lock();
        let pooled = st.natives.get(&stream_id)?.pooled.as_ref()?;
        pooled.lease.as_ref().map(|lease| lease.id)
    }

    /// Take a native stream back (its relay task was cancelled): the engine
    /// stops watching its socket before this returns. `None` if it had
    /// already ended (its `Ended` event is queued or taken).
    pub fn abort_native(&self, stream_id: u32) -> Option<Outcome> {
        let mut st = self.shared.lock();
        let outcome = st.remove_native(stream_id, Ending::Aborted);
        st.finish(&self.shared);
        outcome
    }

    /// The session is over: forget retained frames and every native stream
    /// (their sockets are no longer watched when this returns), after
    /// writing each one's farewell ([`PgTap::farewell`]).
    pub fn lose(&self) {
        let mut st = self.shared.lock();
        st.retained.clear();
        st.retained_bytes = 0;
        st.out.clear();
        for (_, mut native) in std::mem::take(&mut st.natives) {
            native.unwatch(&self.shared.registration);
            native.say_farewell();
            native.give_up_lease();
        }
    }

    /// Stop: the engine thread no longer watches any of its sockets when
    /// this returns (also done on drop).
    pub fn close(&mut self) {
        let mut st = self.shared.lock();
        st.closed = true;
        if let Some(conn) = st.conn.take() {
            self.shared.registration.unwatch(conn.fd);
        }
        for (_, mut native) in std::mem::take(&mut st.natives) {
            native.unwatch(&self.shared.registration);
            native.give_up_lease();
        }
        drop(st);
        for (_, _, lease, shelf) in self.shared.take_mailbox() {
            shelf.give_back(lease);
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.close();
    }
}

impl Driven for Shared {
    fn ready(&self, events: &[(u64, u32)]) {
        let mut st = self.lock();
        if st.closed {
            return;
        }
        for &(token, flags) in events {
            match token {
                TOKEN_TUNNEL => st.tunnel_ready(flags),
                token => st.native_ready((token - TOKEN_FIRST_STREAM) as u32, flags),
            }
        }
        st.on_timers(Instant::now());
        st.finish(self);
    }

    fn timer(&self, now: Instant) {
        let mut st = self.lock();
        if st.closed {
            return;
        }
        st.scheduled = None;
        if st.may_decode() {
            st.decode_tunnel();
        }
        st.on_timers(now);
        st.finish(self);
    }
}

thread_local! {
    /// Read buffers of the threads that run engines (engine threads, and
    /// Python's when a call reads): a few per thread rather than one per
    /// session, whose 256 KiB would be most of a session's memory.
    static READ_BUFFERS: std::cell::RefCell<Vec<Vec<u8>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A read buffer of at least `size` bytes (hand it back with [`give_back`]).
fn take_buffer(size: usize) -> Vec<u8> {
    let buf = READ_BUFFERS.with(|pool| pool.borrow_mut().pop());
    match buf {
        Some(buf) if buf.len() >= size => buf,
        _ => vec![0; size],
    }
}

fn give_back(buf: Vec<u8>) {
    READ_BUFFERS.with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.len() < 4 {
            pool.push(buf);
        }
    });
}

fn invalid(why: impl Into<String>) -> Error {
    Error::InvalidArgument(why.into())
}

/// What an event counts against [`EVENTS_HIGH_WATER`].
fn event_bytes(event: &Event) -> usize {
    match event {
        Event::Frame { payload, .. } => EVENT_OVERHEAD + payload.len(),
        _ => 0,
    }
}

/// The fixed-size integer payload of an ACK, WINDOW, PING or PONG frame.
fn int_payload<const N: usize>(payload: &[u8], frame_type: u8) -> Result<[u8; N], Violation> {
    <[u8; N]>::try_from(payload).map_err(|_| Violation::PayloadSize {
        frame_type,
        expected: N,
        got: payload.len(),
    })
}

impl State {
    fn conn_usable(&self) -> bool {
        self.conn.as_ref().is_some_and(|c| c.error.is_none())
    }

    fn mark_all_dirty(&mut self) {
        self.dirty.extend(self.natives.keys().copied());
    }

    fn fail(&mut self, error: Error) {
        if let Some(conn) = self.conn.as_mut() {
            if conn.error.is_none() {
                conn.error = Some(error);
                self.error_unreported = true;
                self.mark_all_dirty();
            }
        }
    }

    fn on_ack(&mut self, recv_next: u64) -> Result<(), Violation> {
        if recv_next > self.send_next {
            return Err(Violation::AckBeyondSent {
                acked: recv_next,
                sent: self.send_next,
            });
        }
        while self.retained.front().is_some_and(|r| r.seq < recv_next) {
            let frame = self.retained.pop_front().expect("checked above");
            self.retained_bytes -= frame.payload.len();
        }
        Ok(())
    }

    // -- sending ----------------------------------------------------------

    /// Reseal every retained frame on the new connection, oldest first.
    fn resend(&mut self) {
        let frames: Vec<OutFrame> = self
            .retained
            .iter()
            .map(|r| (r.frame_type, r.stream_id, r.payload.clone()))
            .collect();
        let seq = self.retained.front().map_or(self.send_next, |r| r.seq);
        self.retained.clear();
        self.retained_bytes = 0;
        self.send_next = seq;
        if !frames.is_empty() {
            self.seal(frames);
        }
    }

    /// Seal `frames` (with an ACK in front when one is owed) onto the
    /// connection's unsent bytes and retain the reliable ones.
    fn seal(&mut self, frames: Vec<OutFrame>) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        let ack = self.recv_next.to_be_bytes();
        let owe_ack = self.recv_next > self.ack_sent;
        let mut refs = Vec::with_capacity(frames.len() + 1);
        if owe_ack {
            refs.push(FrameRef {
                frame_type: ACK,
                stream_id: 0,
                payload: &ack,
            });
        }
        refs.extend(frames.iter().map(|(t, sid, payload)| FrameRef {
            frame_type: *t,
            stream_id: *sid,
            payload,
        }));
        let mut seq = conn.encoder.next_reliable_seq();
        let prepared = match conn.encoder.prepare(&refs) {
            Ok(prepared) => prepared,
            Err(err) => {
                self.fail(Error::Seal(err));
                return;
            }
        };
        let start = conn.unsent.len();
        conn.unsent.resize(start + prepared.encoded_len(), 0);
        if let Err(err) = prepared.write_into(&mut conn.unsent[start..]) {
            conn.unsent.truncate(start);
            self.fail(Error::Seal(err));
            return;
        }
        if owe_ack {
            self.ack_sent = self.recv_next;
            self.ack_deadline = None;
        }
        for (frame_type, stream_id, payload) in frames {
            if frame_type < CONTROL_TYPE_MIN {
                self.retained_bytes += payload.len();
                self.retained.push_back(Retained {
                    seq,
                    frame_type,
                    stream_id,
                    payload,
                });
                seq += 1;
            }
        }
        self.send_next = seq;
        if self.retained_bytes > self.config.max_unacked {
            let bytes = self.retained_bytes;
            self.fail(Violation::Unacknowledged { bytes }.into());
        }
    }

    /// Write unsent bytes until the socket would block.
    fn flush(&mut self) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        if conn.error.is_some() {
            return;
        }
        while conn.written < conn.unsent.len() {
            match sys::send(conn.fd, &conn.unsent[conn.written..]) {
                Ok(n) => {
                    conn.written += n;
                    self.bytes_sent += n as u64;
                }
                Err(err) if sys::would_block(&err) => break,
                Err(err) => {
                    self.fail(SocketError::new("send", &err).into());
                    return;
                }
            }
        }
        if conn.written == conn.unsent.len() {
            conn.unsent.clear();
            if conn.unsent.capacity() > 1 << 20 {
                conn.unsent.shrink_to(64 * 1024);
            }
            conn.written = 0;
        }
    }

    /// End of a round: seal what was made, write, adjust what the sockets
    /// are watched for, wake Python if it has something to take.
    fn finish(&mut self, shared: &Shared) {
        loop {
            let delivered = shared.take_mailbox();
            if delivered.is_empty() {
                break;
            }
            for (sid, ticket, lease, shelf) in delivered {
                self.pooled_delivered(sid, ticket, lease, &shelf);
            }
        }
        for sid in std::mem::take(&mut self.tls_resume) {
            if self.natives.get(&sid).is_some_and(Native::tls_pending) {
                self.read_native(sid);
            }
        }
        if self.conn.is_some() {
            let ack_now = self.recv_next > self.ack_sent
                && (self.recv_next - self.ack_sent >= self.config.ack_every
                    || self.ack_deadline.is_some_and(|d| d <= Instant::now()));
            if !self.out.is_empty() || ack_now {
                let frames = std::mem::take(&mut self.out);
                self.seal(frames);
            }
            self.flush();
        } else {
            // Control frames belong to a connection; reliable ones wait.
            self.out.retain(|(t, _, _)| *t < CONTROL_TYPE_MIN);
        }
        self.update_interests(&shared.registration);
        self.prune_pool_deadlines();
        if let Some(deadline) = self.next_deadline() {
            if self.scheduled.is_none_or(|pending| deadline < pending) {
                self.scheduled = Some(deadline);
                shared.registration.schedule(deadline);
            }
        }
        if (!self.events.is_empty() || self.error_unreported) && !self.notified {
            self.notified = true;
            shared.notifier.post(shared.key);
        }
    }

    fn update_interests(&mut self, watch: &Registration) {
        let (usable, backlog) = match &self.conn {
            Some(conn) if conn.error.is_none() => (true, conn.backlog()),
            _ => (false, 0),
        };
        if let Some(conn) = self.conn.as_mut() {
            // While frames wait in the decoder the socket is not watched:
            // the rounds that decode them watch it again.
            let want = match &conn.error {
                None if self.undecoded => 0,
                None if backlog > 0 => READABLE | WRITABLE,
                None => READABLE,
                Some(_) => 0,
            };
            watch.set_interest(conn.fd, TOKEN_TUNNEL, &mut conn.interest, want);
        }
        let may_read = usable && backlog < UNSENT_HIGH_WATER;
        if may_read && self.reading_paused {
            // Natives that lost READABLE while reading was paused get it back.
            self.reading_paused = false;
            self.mark_all_dirty();
        }
        for sid in std::mem::take(&mut self.dirty) {
            if let Some(native) = self.natives.get_mut(&sid) {
                if native.fd < 0 {
                    continue; // a pooled stream between connections
                }
                let mut want = 0;
                if may_read && !native.socket_eof && native.credit > 0 {
                    want |= READABLE;
                }
                if native.wants_write() {
                    want |= WRITABLE;
                }
                let token = TOKEN_FIRST_STREAM + u64::from(sid);
                match native.pooled.as_ref().and_then(|p| p.lease.as_ref()) {
                    Some(lease) => watch.hold(&lease.roaming, token, &mut native.interest, want),
                    None => watch.set_interest(native.fd, token, &mut native.interest, want),
                }
            }
        }
        if !may_read && !self.natives.is_empty() {
            self.reading_paused = true;
        }
    }

    // -- receiving --------------------------------------------------------

    fn tunnel_ready(&mut self, flags: u32) {
        if !self.conn_usable() {
            return;
        }
        // Not while frames wait in the decoder (an event from before the
        // socket stopped being watched): they are decoded first.
        if flags & (READABLE | BROKEN) != 0 && !self.undecoded {
            self.read_tunnel();
        }
        if flags & WRITABLE != 0 {
            self.flush();
            // Draining a backlog may let natives read again.
            self.mark_all_dirty();
        }
    }

    fn read_tunnel(&mut self) {
        let size = self.config.read_size;
        let mut buf = take_buffer(size);
        let fd = self.conn.as_ref().map(|c| c.fd).expect("usable connection");
        match sys::read(fd, &mut buf[..size]) {
            Ok(0) => {
                let conn = self.conn.as_mut().expect("usable connection");
                let error = match conn.decoder.eof() {
                    Err(err) => Error::Frame(err),
                    Ok(()) => Error::Lost,
                };
                self.fail(error);
            }
            Ok(n) => {
                self.bytes_received += n as u64;
                self.on_tunnel_bytes(&buf[..n]);
            }
            Err(err) if sys::would_block(&err) => {}
            Err(err) => self.fail(SocketError::new("receive", &err).into()),
        }
        give_back(buf);
    }

    fn on_tunnel_bytes(&mut self, data: &[u8]) {
        self.last_heard = Instant::now();
        let conn = self.conn.as_mut().expect("attached");
        if let Err(err) = conn.decoder.feed(data) {
            self.fail(Error::Frame(err));
            return;
        }
        self.decode_tunnel();
    }

    /// Whether frames held back in the decoder may be decoded now.
    fn may_decode(&self) -> bool {
        self.undecoded && self.events_bytes < EVENTS_HIGH_WATER && self.conn_usable()
    }

    /// Decode and dispatch the frames the decoder holds, one at a time (a
    /// payload is handed on or dropped before the next is decompressed),
    /// until none is whole, or this round's share is decoded, or Python
    /// has enough waiting ([`State::undecoded`]).
    fn decode_tunnel(&mut self) {
        let mut decoded = 0;
        self.undecoded = false;
        while let Some(conn) = self.conn.as_mut().filter(|c| c.error.is_none()) {
            if decoded >= DECODED_PER_ROUND || self.events_bytes >= EVENTS_HIGH_WATER {
                self.undecoded = true;
                break;
            }
            let frame = match conn.decoder.next_frame() {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(qmesh_wire::Error::Undecodable(why)) => {
                    self.fail(Violation::Undecodable(why).into());
                    return;
                }
                Err(err) => {
                    self.fail(Error::Frame(err));
                    return;
                }
            };
            decoded += frame.payload.len();
            let (frame_type, seq) = (frame.frame_type, frame.seq);
            if let Err(violation) = self.dispatch(frame_type, frame.stream_id, frame.payload) {
                self.fail(violation.into());
                return;
            }
            if frame_type < CONTROL_TYPE_MIN {
                self.recv_next = seq + 1;
            }
        }
        if self.recv_next > self.ack_sent && self.ack_deadline.is_none() {
            self.ack_deadline = Some(Instant::now() + self.config.ack_delay);
        }
    }

    fn dispatch(
        &mut self,
        frame_type: u8,
        stream_id: u32,
        payload: Bytes,
    ) -> Result<(), Violation> {
        match frame_type {
            ACK => self.on_ack(u64::from_be_bytes(int_payload(&payload, ACK)?)),
            PING => {
                // Its id, echoed: a PING of any other size would make the
                // PONGs a peer that never reads gets grow as it pleases.
                int_payload::<8>(&payload, PING)?;
                self.out.push((PONG, 0, payload));
                Ok(())
            }
            PONG => {
                let id = u64::from_be_bytes(int_payload(&payload, PONG)?);
                if let Some((sent_id, at)) = self.beat.as_ref().and_then(|b| b.ping) {
                    if sent_id == id {
                        self.rtt = Some(at.elapsed());
                    }
                }
                Ok(())
            }
            DATA..=WINDOW if self.natives.contains_key(&stream_id) => {
                self.native_frame(stream_id, frame_type, payload)
            }
            _ => {
                let event = Event::Frame {
                    frame_type,
                    stream_id,
                    payload,
                };
                self.events_bytes += event_bytes(&event);
                self.events.push_back(event);
                Ok(())
            }
        }
    }

    // -- native streams ---------------------------------------------------

    fn native_frame(&mut self, sid: u32, frame_type: u8, payload: Bytes) -> Result<(), Violation> {
        let Some(native) = self.natives.get_mut(&sid) else {
            return Ok(());
        };
        match frame_type {
            DATA => {
                if native.eof_received || native.unconsumed + payload.len() > native.window as usize
                {
                    let violation = Violation::FlowControl;
                    let why = violation.to_string();
                    let reason = qmesh_wire::encode_reason(reset_code::PROTOCOL_ERROR, &why);
                    self.out.push((RESET, sid, Bytes::from(reason)));
                    self.end_native(sid, Ending::Protocol(violation));
                    return Ok(());
                }
                self.inbound(sid, payload);
            }
            WINDOW => {
                let grant = u32::from_be_bytes(int_payload(&payload, WINDOW)?);
                native.credit = native.credit.saturating_add(u64::from(grant));
                self.dirty.push(sid);
                self.resume_tls_reads(sid);
            }
            CLOSE if native.pooled.is_some() => {
                // The client left: Python ends the session and sees to the
                // connection it may hold.
                native.eof_received = true;
                self.end_native(sid, Ending::Clean);
            }
            CLOSE => {
                native.eof_received = true;
                if let Some(Err(error)) = native.frontend.as_ref().map(pg::Scanner::eof) {
                    let side = Side::Client;
                    self.end_native(sid, Ending::Postgres(PgError { side, error }));
                    return Ok(());
                }
                self.write_native(sid);
                self.check_done(sid);
            }
            _ => {
                let (code, reason) = qmesh_wire::decode_reason(&payload)
                    .map_err(|_| Violation::MissingCode { frame_type })?;
                let reason = reason.into_owned();
                self.end_native(sid, Ending::Reset { code, reason });
            }
        }
        Ok(())
    }

    /// Bytes from the tunnel for a native stream (counted against its
    /// window), scanned before they are written: a bad message never
    /// reaches the server.
    fn inbound(&mut self, sid: u32, payload: Bytes) {
        let Some(native) = self.natives.get_mut(&sid) else {
            return;
        };
        native.unconsumed += payload.len();
        if native.pooled.is_some() {
            match native.inbound_pooled(&payload) {
                Err(err) => self.end_native(sid, Ending::Postgres(err)),
                Ok(()) => {
                    self.note_records(sid);
                    self.write_native(sid);
                    self.pooled_step(sid);
                }
            }
            return;
        }
        match native.inbound(payload) {
            Err(err) => self.end_native(sid, Ending::Postgres(err)),
            Ok(hold) => self.after_release(sid, hold),
        }
    }

    /// After segments were released: a held message goes to Python at once
    /// (behind the records that came before it), the rest is written.
    fn after_release(&mut self, sid: u32, hold: Option<TapRecord>) {
        self.hand_up(sid, hold);
        self.write_native(sid);
        self.check_done(sid);
    }

    /// Tap records to Python: a held message at once, behind the records
    /// that came before it; others in batches. True if a message is held.
    fn hand_up(&mut self, sid: u32, hold: Option<TapRecord>) -> bool {
        let Some(record) = hold else {
            self.note_records(sid);
            return false;
        };
        if let Some(native) = self.natives.get_mut(&sid) {
            let mut records = std::mem::take(&mut native.records);
            records.push(record);
            self.events.push_back(Event::Tap {
                stream_id: sid,
                records,
            });
        }
        true
    }

    fn verdict(&mut self, sid: u32, replacement: Bytes) -> Result<()> {
        let Some(native) = self.natives.get_mut(&sid) else {
            return Ok(()); // ended meanwhile
        };
        let Some(input) = native.awaiting.take() else {
            return Err(invalid(format!("stream {sid} holds no message")));
        };
        // The audit follows what the client sent (a refused statement is
        // recorded as itself, with the refusal's error as its outcome).
        if let (Some(audit), Some(held)) = (&mut native.audit, native.awaiting_statement.take()) {
            audit.client(held.tag, &held.raw, held.at);
        }
        native.queue(replacement, input);
        let held: Vec<Segment> = native.held.drain(..).collect();
        let hold = native.release(held);
        self.after_release(sid, hold);
        Ok(())
    }

    fn native_ready(&mut self, sid: u32, flags: u32) {
        // Ended, or a pooled stream between connections, since epoll
        // reported it.
        if self.natives.get(&sid).is_none_or(|native| native.fd < 0) {
            return;
        }
        if flags & WRITABLE != 0 {
            self.write_native(sid);
            self.check_done(sid);
            self.pooled_step(sid);
        }
        if flags & (READABLE | BROKEN) != 0 {
            self.read_native(sid);
        }
        self.dirty.push(sid);
    }

    fn write_native(&mut self, sid: u32) {
        let Some(native) = self.natives.get_mut(&sid) else {
            return;
        };
        let result = native.write_out();
        // Grant credit in large steps, as TunnelStream does.
        if native.consumed >= native.window / 2 && native.consumed > 0 && !native.eof_received {
            let grant = native.consumed.min(u64::from(u32::MAX)) as u32;
            native.consumed -= u64::from(grant);
            self.out
                .push((WINDOW, sid, Bytes::copy_from_slice(&grant.to_be_bytes())));
        }
        self.dirty.push(sid);
        if let Err(err) = result {
            self.end_native(sid, Ending::Socket(err));
        }
    }

    fn read_native(&mut self, sid: u32) {
        let chunk_size = self.config.chunk_size;
        let mut buf = take_buffer(chunk_size);
        for _ in 0..NATIVE_READS_PER_ROUND {
            let Some(native) = self.natives.get_mut(&sid) else {
                break;
            };
            if native.socket_eof || native.credit == 0 {
                break;
            }
            let size = chunk_size.min(native.credit as usize);
            match native.read_socket(&mut buf[..size]) {
                Ok(0) if native.pooled.is_some() => {
                    // The server ended the connection: Python tells the client.
                    native.socket_eof = true;
                    self.end_native(sid, Ending::SocketEof);
                    break;
                }
                Ok(0) => {
                    native.socket_eof = true;
                    let end_now = native.end_on_socket_eof;
                    self.out.push((CLOSE, sid, Bytes::new()));
                    if end_now {
                        self.end_native(sid, Ending::SocketEof);
                    } else {
                        self.check_done(sid);
                    }
                    break;
                }
                Ok(n) => {
                    native.credit -= n as u64;
                    // A short read of a plain socket emptied it; a TLS
                    // layer's plaintext says nothing of its socket.
                    let drained = match &native.tls {
                        None => n < size,
                        Some(tls) => tls.drained(),
                    };
                    let send = match native.outbound(&buf[..n]) {
                        Ok(send) => send,
                        Err(err) => {
                            self.end_native(sid, Ending::Postgres(err));
                            break;
                        }
                    };
                    let read_only_off = native.read_only_off;
                    self.out
                        .extend(send.into_iter().map(|data| (DATA, sid, data)));
                    if read_only_off {
                        self.end_native(sid, Ending::ReadOnlyOff);
                        break;
                    }
                    self.note_records(sid);
                    if drained {
                        break; // drained for now
                    }
                }
                Err(err) if sys::would_block(&err) => break,
                Err(err) => {
                    self.end_native(sid, Ending::Socket(SocketError::new("receive", &err)));
                    break;
                }
            }
        }
        give_back(buf);
        self.pooled_step(sid);
    }

    /// Plaintext the TLS layer holds is read at the end of the round: no
    /// socket event would announce it.
    fn resume_tls_reads(&mut self, sid: u32) {
        if self.natives.get(&sid).is_some_and(Native::tls_pending) {
            self.tls_resume.push(sid);
        }
    }

    fn check_done(&mut self, sid: u32) {
        if let Some(native) = self.natives.get(&sid) {
            if native.pooled.is_none() && native.socket_eof && native.eof_received && native.shut {
                self.end_native(sid, Ending::Clean);
            }
        }
    }

    /// Count new tap records; Python is woken for them in batches.
    fn note_records(&mut self, sid: u32) {
        let waiting = self.natives.get(&sid).map_or(0, |n| n.records.len());
        if waiting == 0 {
            return;
        }
        self.tap_waiting = self.tap_waiting.max(waiting);
        if self.tap_deadline.is_none() {
            self.tap_deadline = Some(Instant::now() + self.config.tap_delay);
        }
        if self.tap_waiting >= self.config.tap_batch {
            self.flush_taps();
        }
    }

    fn flush_taps(&mut self) {
        for (sid, native) in self.natives.iter_mut() {
            if !native.records.is_empty() {
                self.events.push_back(Event::Tap {
                    stream_id: *sid,
                    records: std::mem::take(&mut native.records),
                });
            }
        }
        self.tap_deadline = None;
        self.tap_waiting = 0;
    }

    fn end_native(&mut self, sid: u32, ending: Ending) {
        if let Some(outcome) = self.remove_native(sid, ending) {
            self.events.push_back(Event::Ended {
                stream_id: sid,
                outcome,
            });
        }
    }

    /// Forget a native stream; its socket is no longer watched when this
    /// returns (Python closes it once it learns).
    fn remove_native(&mut self, sid: u32, ending: Ending) -> Option<Outcome> {
        let mut native = self.natives.remove(&sid)?;
        if let Some(shared) = self.me.upgrade() {
            native.unwatch(&shared.registration);
        }
        // Python's relay carries on with the session only after a handback;
        // any other end is the session's, and what is left unanswered is
        // recorded here (a session-mode stream's audit, when it is dropped).
        let pooled = native.pooled_end(ending == Ending::Handback);
        if !native.records.is_empty() {
            self.events.push_back(Event::Tap {
                stream_id: sid,
                records: std::mem::take(&mut native.records),
            });
        }
        Some(Outcome {
            ending,
            credit: native.credit,
            eof_sent: native.socket_eof && pooled.is_none(),
            eof_received: native.eof_received,
            pooled,
        })
    }

    // -- pooled streams ---------------------------------------------------

    /// After a pooled stream's client or server bytes: end it if the client
    /// left or Python must take over; give its connection back between
    /// transactions; borrow one if a query waits for it.
    fn pooled_step(&mut self, sid: u32) {
        let Some(native) = self.natives.get_mut(&sid) else {
            return;
        };
        let server_in_message = native.backend.as_ref().is_some_and(pg::Scanner::in_message);
        // A client stopped inside a message keeps its connection: the rest
        // of the message goes where its start went.
        let client_in_message = native
            .frontend
            .as_ref()
            .is_some_and(pg::Scanner::in_message);
        let Some(pooled) = native.pooled.as_mut() else {
            return;
        };
        // A client that said goodbye: what it sent before, on a connection
        // it holds, is written first (as the server would have read it).
        if pooled.terminated && (pooled.lease.is_none() || native.to_socket.is_empty()) {
            self.end_native(sid, Ending::Clean);
            return;
        }
        if pooled.between_transactions(server_in_message || client_in_message) {
            let lease = pooled
                .end_loan()
                .expect("a connection between transactions");
            if native.interest != 0 {
                // Now, not at the round's end: the shelf may lend it to a
                // stream of an engine on this thread before then.
                if let Some(shared) = self.me.upgrade() {
                    shared.registration.park(&lease.roaming);
                }
                native.interest = 0;
            }
            native.fd = -1;
            let spoke = tls_back_to(&mut native.tls, &lease);
            if spoke || pooled.over_prepared(&lease) {
                pooled.shelf.return_to_python(lease, ReturnWhy::Close);
            } else {
                pooled.shelf.give_back(lease);
            }
        }
        // Python's relay takes over once what the engine took on is written
        // and the server's bytes are between messages; answers still due
        // are its to relay from there on.
        if pooled.handback.is_some() && !server_in_message && native.to_socket.is_empty() {
            self.end_native(sid, Ending::Handback);
            return;
        }
        let nothing_to_send = native.to_socket.is_empty() && pooled.deferred.is_empty();
        if pooled.lease.is_some() || pooled.waiting.is_some() || nothing_to_send {
            return;
        }
        let me = self.me.clone() as Weak<dyn LeaseTaker>;
        match pooled.shelf.take_or_wait(me, sid) {
            Ok(lease) => {
                self.pooled_attach(sid, lease);
                self.pooled_step(sid); // a handback may wait for the write
            }
            Err(ticket) => {
                let deadline = Instant::now() + pooled.wait_limit;
                pooled.waiting = Some((ticket, deadline));
                self.pool_deadlines.push(Reverse((deadline, sid, ticket)));
            }
        }
    }

    /// A connection a shelf handed over for a stream's place in line.
    fn pooled_delivered(&mut self, sid: u32, ticket: u64, lease: Lease, shelf: &Shelf) {
        match self.in_line(sid, ticket) {
            Some(pooled) => {
                pooled.waiting = None;
                self.pooled_attach(sid, lease);
                self.pooled_step(sid);
            }
            None => shelf.give_back(lease), // the stream ended meanwhile
        }
    }

    /// Relay a pooled stream's queries to `lease` from now on.
    fn pooled_attach(&mut self, sid: u32, mut lease: Lease) {
        let Some(native) = self.natives.get_mut(&sid) else {
            return;
        };
        let Some(pooled) = native.pooled.as_mut() else {
            return;
        };
        let tls = match &lease.tls {
            None => None,
            Some(slot) => match slot.take() {
                Some(conn) => Some(TlsLink::new(conn)),
                None => {
                    // Out of its slot, so in use elsewhere: never lent
                    // like that. Python closes it; the stream takes another.
                    pooled.shelf.return_to_python(lease, ReturnWhy::Close);
                    self.pooled_step(sid);
                    return;
                }
            },
        };
        lease.touched = true;
        native.fd = lease.fd();
        native.tls = tls;
        native.interest = 0;
        pooled.lease = Some(lease);
        native.replay_deferred();
        self.dirty.push(sid);
        self.write_native(sid);
    }

    /// Forget deadlines of waits that ended (served, or the stream gone),
    /// so the next timer is a live one's.
    fn prune_pool_deadlines(&mut self) {
        while let Some(&Reverse((_, sid, ticket))) = self.pool_deadlines.peek() {
            if self.in_line(sid, ticket).is_some() {
                break;
            }
            self.pool_deadlines.pop();
        }
    }

    /// Stream `sid`'s pooled state, if it still waits in line with `ticket`.
    fn in_line(&mut self, sid: u32, ticket: u64) -> Option<&mut Pooled> {
        self.natives
            .get_mut(&sid)
            .and_then(|n| n.pooled.as_mut())
            .filter(|p| p.waiting.is_some_and(|(t, _)| t == ticket))
    }

    // -- timers -----------------------------------------------------------

    fn on_timers(&mut self, now: Instant) {
        self.heartbeat(now);
        if self.tap_deadline.is_some_and(|d| d <= now) {
            self.flush_taps();
        }
        while let Some(&Reverse((deadline, sid, ticket))) = self.pool_deadlines.peek() {
            if deadline > now {
                break;
            }
            self.pool_deadlines.pop();
            // Not in line any more: served (the connection is in the mailbox).
            if let Some(pooled) = self.in_line(sid, ticket) {
                if pooled.shelf.cancel(ticket) {
                    pooled.waiting = None;
                    self.end_native(sid, Ending::PoolTimeout);
                }
            }
        }
    }

    /// When a beat is due: judge the peer, then PING it.
    fn heartbeat(&mut self, now: Instant) {
        let (Some(heartbeat), true) = (self.config.heartbeat, self.conn_usable()) else {
            return;
        };
        let Some(beat) = self.beat.as_mut().filter(|beat| beat.next <= now) else {
            return;
        };
        beat.next = heartbeat.next_after(now);
        if self.undecoded {
            // Frames held back in the decoder are news from the peer, and
            // may hold the acknowledgement the check below waits for.
            self.last_heard = now;
            beat.oldest_unacked = None;
        }
        let silent = now.saturating_duration_since(self.last_heard);
        if silent > heartbeat.dead_after {
            self.fail(Error::Silent(silent));
            return;
        }
        let oldest = self.retained.front().map(|r| r.seq);
        match (oldest, beat.oldest_unacked) {
            (Some(seq), Some((held, since))) if seq == held => {
                let for_ = now.saturating_duration_since(since);
                if for_ > heartbeat.dead_after {
                    self.fail(Violation::NeverAcknowledged { for_ }.into());
                    return;
                }
            }
            (Some(seq), _) => beat.oldest_unacked = Some((seq, now)),
            (None, _) => beat.oldest_unacked = None,
        }
        self.pings += 1;
        beat.ping = Some((self.pings, now));
        self.out
            .push((PING, 0, Bytes::copy_from_slice(&self.pings.to_be_bytes())));
    }

    fn next_deadline(&self) -> Option<Instant> {
        let ack = if self.conn_usable() {
            self.ack_deadline
        } else {
            None
        };
        let beat = match &self.beat {
            Some(beat) if self.conn_usable() => Some(beat.next),
            _ => None,
        };
        let pool = self.pool_deadlines.peek().map(|Reverse((at, _, _))| *at);
        let decode = self.may_decode().then(Instant::now);
        [ack, self.tap_deadline, pool, beat, decode]
            .into_iter()
            .flatten()
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_ends_past_the_statements_awaiting_answers_its_audit_follows() {
        let (author, _queue) = crate::audit::testing::author(1 << 20);
        let mut audit = SessionStatements::new(author);
        let mut config = pg::ScannerConfig::new(pg::Direction::Frontend);
        config.full = pg::TagSet::from_bytes(b"QPBECSF");
        let mut scanner = pg::Scanner::new(config).unwrap();
        let mut records = Vec::new();
        let mut feed = |syncs: usize, audit: &mut SessionStatements| {
            let reports = Reports {
                records: &mut records,
                audit: Some(audit),
            };
            observe(
                &mut scanner,
                reports,
                &b"S\0\0\0\x04".repeat(syncs),
                Side::Client,
                None,
            )
        };
        assert_eq!(feed(MAX_UNANSWERED, &mut audit), Ok(()));
        let error = feed(1, &mut audit).unwrap_err();
        assert_eq!(error.side, Side::Client);
        assert_eq!(
            error.to_string(),
            "100001 statements await their answers, more than the limit of 100000"
        );
        // The chunk that went past it is neither relayed nor followed.
        assert_eq!(audit.statements.len(), MAX_UNANSWERED);
    }

    #[test]
    fn beats_fall_on_one_grid_a_period_on() {
        let heartbeat = Heartbeat {
            every: Duration::from_secs(5),
            dead_after: Duration::from_secs(15),
        };
        let grid = Duration::from_secs(5) / BEAT_GRID_SHARE;
        let now = Instant::now();
        let next = heartbeat.next_after(now);
        assert!(next >= now + Duration::from_secs(5), "{next:?}");
        assert!(next < now + Duration::from_secs(5) + grid, "{next:?}");
        // Sessions beating within one grid step beat together.
        let mut together = 0;
        for offset_ms in 0..200 {
            let later = heartbeat.next_after(now + Duration::from_millis(offset_ms));
            assert!(later >= next);
            together += usize::from(later == next);
        }
        assert!((1..200).contains(&together), "{together}");
        let steps = heartbeat.next_after(now + Duration::from_millis(200)) - next;
        assert_eq!(steps.as_nanos() % grid.as_nanos(), 0, "{steps:?}");
    }

    #[test]
    fn the_period_checks_three_times_within_dead_after() {
        let heartbeat = Heartbeat {
            every: Duration::from_secs(5),
            dead_after: Duration::from_secs(3),
        };
        assert_eq!(heartbeat.period(), Duration::from_secs(1));
        let huge = Heartbeat {
            every: Duration::MAX,
            dead_after: Duration::MAX,
        };
        assert_eq!(huge.period(), MAX_BEAT_PERIOD);
        assert!(huge.next_after(Instant::now()) > Instant::now());
    }
}
