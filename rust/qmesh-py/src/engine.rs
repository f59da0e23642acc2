//! `qmesh._core.TunnelEngine`: the Python face of `qmesh-relay`'s engine.
//!
//! Unlike the codec classes, the engine runs on an engine thread and has a
//! mutex inside. That is safe here because engine threads never need the GIL:
//! a Python thread waiting for the mutex while holding the GIL only waits
//! for a round of pure Rust work to end.

use crate::seconds;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use pyo3::exceptions::{PyBaseException, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use qmesh_relay as relay;

use crate::audit::AuditAuthor;
use crate::pool::PoolShelf;
use crate::tls::TlsSession;
use crate::{Error, FrameDecoder, FrameEncoder, Result, DETACH_THRESHOLD};

/// ``(at, from_tunnel, tag, raw, hold)``: a tuple rather than a class, since
/// the audit gets one per statement and tuples are the cheapest to build.
type PyTapRecord<'py> = (f64, bool, u8, Bound<'py, PyBytes>, bool);
type PyTaken<'py> = (
    Vec<(u8, u32, Bound<'py, PyBytes>)>,
    Vec<(u32, Vec<PyTapRecord<'py>>)>,
    Vec<(u32, RelayOutcome)>,
    Option<Py<PyBaseException>>,
);

/// How a native relay ended.
#[pyclass(
    module = "qmesh._core",
    name = "RelayEnding",
    eq,
    eq_int,
    frozen,
    hash,
    from_py_object
)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RelayEnding {
    /// Both directions closed, everything delivered.
    #[pyo3(name = "CLEAN")]
    Clean = 0,
    /// The socket reached end of stream on a relay asked to end there.
    #[pyo3(name = "SOCKET_EOF")]
    SocketEof = 1,
    /// The peer reset the stream (``code`` and ``detail`` say why).
    #[pyo3(name = "RESET")]
    Reset = 2,
    /// The peer broke flow control; the engine sent RESET.
    #[pyo3(name = "PROTOCOL")]
    Protocol = 3,
    /// The socket failed.
    #[pyo3(name = "SOCKET")]
    Socket = 4,
    /// A Postgres scanner rejected the bytes; nothing of them was relayed.
    #[pyo3(name = "POSTGRES")]
    Postgres = 5,
    /// Python took the stream back, or the session ended.
    #[pyo3(name = "ABORTED")]
    Aborted = 6,
    /// A pooled stream's client sent what the engine does not relay: the
    /// outcome's ``pooled`` says where Python's relay takes over.
    #[pyo3(name = "HANDBACK")]
    Handback = 7,
    /// A pooled stream's client waited its pool's limit for a connection.
    #[pyo3(name = "POOL_TIMEOUT")]
    PoolTimeout = 8,
    /// A read-only pooled stream's server reported the read-only setting
    /// turned off: the session ends, and its connection must be closed.
    #[pyo3(name = "READ_ONLY_OFF")]
    ReadOnlyOff = 9,
}

impl RelayEnding {
    /// The name Python sees.
    fn name(self) -> &'static str {
        match self {
            RelayEnding::Clean => "CLEAN",
            RelayEnding::SocketEof => "SOCKET_EOF",
            RelayEnding::Reset => "RESET",
            RelayEnding::Protocol => "PROTOCOL",
            RelayEnding::Socket => "SOCKET",
            RelayEnding::Postgres => "POSTGRES",
            RelayEnding::Aborted => "ABORTED",
            RelayEnding::Handback => "HANDBACK",
            RelayEnding::PoolTimeout => "POOL_TIMEOUT",
            RelayEnding::ReadOnlyOff => "READ_ONLY_OFF",
        }
    }
}

/// Python's spelling of a bool, for the reprs.
fn py_bool(value: bool) -> &'static str {
    if value {
        "True"
    } else {
        "False"
    }
}

/// A native relay's end, with what the stream needs to carry on.
#[pyclass(module = "qmesh._core", name = "RelayOutcome", frozen, get_all)]
#[derive(Debug, Clone)]
pub struct RelayOutcome {
    ending: RelayEnding,
    /// The peer's reset code, for ``RESET``; else 0.
    code: u16,
    /// The peer's reason, or what went wrong; empty for a clean end.
    detail: String,
    /// Send credit left.
    credit: u64,
    /// CLOSE was sent (the socket reached end of stream).
    eof_sent: bool,
    /// CLOSE was received.
    eof_received: bool,
    /// A pooled stream's state at its end.
    pooled: Option<PooledEnd>,
}

/// What makes a native stream a transaction-mode client session: its
/// pool's shelf, the longest wait in line (seconds), the most statements a
/// connection keeps prepared, and what the client prepared so far (a
/// session back from Python's relay): its named statements, ``(name,
/// server name, Parse)`` each, and its unnamed statement's Parse. Its
/// guard's words and read-only flag are its :class:`TapSpec`'s.
#[pyclass(module = "qmesh._core", name = "PooledSpec", frozen)]
pub struct PooledSpec {
    shelf: Arc<relay::Shelf>,
    wait_limit: Duration,
    max_prepared: usize,
    statements: Vec<(Vec<u8>, Vec<u8>, Vec<u8>)>,
    unnamed: Option<Vec<u8>>,
}

#[pymethods]
impl PooledSpec {
    #[new]
    #[pyo3(signature = (
        shelf, wait_s, max_prepared, *, statements = Vec::new(), unnamed = None
    ))]
    fn new(
        shelf: PyRef<'_, PoolShelf>,
        wait_s: f64,
        max_prepared: usize,
        statements: Vec<(Vec<u8>, Vec<u8>, Vec<u8>)>,
        unnamed: Option<Vec<u8>>,
    ) -> Result<Self> {
        let wait_limit = crate::seconds(wait_s, "a pool's wait")?;
        Ok(PooledSpec {
            shelf: shelf.inner.clone(),
            wait_limit,
            max_prepared,
            statements,
            unnamed,
        })
    }
}

type OwedTuple<'py> = (
    char,
    Bound<'py, PyBytes>,
    Bound<'py, PyBytes>,
    Option<(Bound<'py, PyBytes>, Bound<'py, PyBytes>)>,
);
type StatementTuple<'py> = (
    Bound<'py, PyBytes>,
    Bound<'py, PyBytes>,
    Bound<'py, PyBytes>,
);

/// A pooled stream's state at its end: what Python's relay carries on
/// from, or cleans up.
#[pyclass(module = "qmesh._core", name = "PooledEnd", frozen)]
#[derive(Debug, Clone)]
pub struct PooledEnd {
    /// The connection the client held (the pool's id), or None.
    #[pyo3(get)]
    lease: Option<u64>,
    /// The engine ran statements on ``lease`` since Python last had it.
    #[pyo3(get)]
    touched: bool,
    owed: Vec<relay::OwedAnswer>,
    statements: Vec<(Vec<u8>, Vec<u8>, Vec<u8>)>,
    unnamed: Option<Vec<u8>>,
    /// Whether the connection the client holds has its unnamed statement.
    #[pyo3(get)]
    unnamed_held: bool,
    /// The server discards the client's messages until its next Sync.
    #[pyo3(get)]
    skipping: bool,
    /// The server's status at its last ReadyForQuery (``I``, ``T``, ``E``),
    /// or None while a query was on its way.
    #[pyo3(get)]
    status: Option<char>,
    /// The server's bytes stopped inside a message.
    #[pyo3(get)]
    server_mid_message: bool,
    /// The server sent a FATAL error (relayed to the client).
    #[pyo3(get)]
    server_fatal: bool,
    leftover: Vec<u8>,
    /// Client bytes consumed but not yet granted back.
    #[pyo3(get)]
    consumed: u64,
    /// Transactions the engine relayed to their end in this part of the session.
    #[pyo3(get)]
    transactions: u64,
}

#[pymethods]
impl PooledEnd {
    /// Client bytes the engine did not relay, from the first message it
    /// does not relay natively on.
    #[getter]
    fn leftover<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.leftover)
    }

    /// The answers the server still owes, in order: ``(kind, target,
    /// name, saved)`` each. ``kind`` is the client message's type byte
    /// (``Q``, ``P``, ``B``, ``D``, ``E``, ``C``, ``S``) or what the engine
    /// sent in its stead: ``i`` a Parse it added (its ParseComplete is not
    /// the client's), ``p`` a Close standing in for a Parse of a statement
    /// the connection has (the client gets a ParseComplete for its
    /// CloseComplete), ``c`` a Close standing in for the client's Close.
    /// ``target`` is the server's name a Parse (``P``, ``i``) prepares or a
    /// Close (``C``) closes, ``name`` the client's (``P``, ``p``, ``c``,
    /// ``C``), ``saved`` the client's statement a Close forgot (``(server
    /// name, Parse)``); empty or None where they do not apply.
    #[getter]
    fn owed<'py>(&self, py: Python<'py>) -> Vec<OwedTuple<'py>> {
        self.owed
            .iter()
            .map(|o| {
                let saved = o
                    .saved
                    .as_ref()
                    .map(|(target, parse)| (PyBytes::new(py, target), PyBytes::new(py, parse)));
                (
                    char::from(o.kind),
                    PyBytes::new(py, &o.target),
                    PyBytes::new(py, &o.name),
                    saved,
                )
            })
            .collect()
    }

    /// The client's named statements: ``(name, server name, Parse)`` each.
    #[getter]
    fn statements<'py>(&self, py: Python<'py>) -> Vec<StatementTuple<'py>> {
        self.statements
            .iter()
            .map(|(name, target, parse)| {
                (
                    PyBytes::new(py, name),
                    PyBytes::new(py, target),
                    PyBytes::new(py, parse),
                )
            })
            .collect()
    }

    /// The client's unnamed statement: its Parse message, or None.
    #[getter]
    fn unnamed<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyBytes>> {
        self.unnamed.as_deref().map(|parse| PyBytes::new(py, parse))
    }

    fn __repr__(&self) -> String {
        format!(
            "PooledEnd(lease={:?}, owed={:?}, status={:?}, leftover={} bytes)",
            self.lease,
            self.owed
                .iter()
                .map(|o| char::from(o.kind))
                .collect::<String>(),
            self.status,
            self.leftover.len()
        )
    }
}

impl From<relay::PooledEnd> for PooledEnd {
    fn from(end: relay::PooledEnd) -> Self {
        PooledEnd {
            lease: end.lease.as_ref().map(|l| l.id),
            touched: end.lease.as_ref().is_some_and(|l| l.touched),
            owed: end.owed,
            statements: end.statements,
            unnamed: end.unnamed,
            unnamed_held: end.unnamed_held,
            skipping: end.skipping,
            status: (end.status != 0).then_some(char::from(end.status)),
            server_mid_message: end.server_mid_message,
            server_fatal: end.server_fatal,
            leftover: end.leftover,
            consumed: end.consumed,
            transactions: end.transactions,
        }
    }
}

impl From<relay::Outcome> for RelayOutcome {
    fn from(outcome: relay::Outcome) -> Self {
        let (ending, code, detail) = match outcome.ending {
            relay::Ending::Clean => (RelayEnding::Clean, 0, String::new()),
            relay::Ending::SocketEof => (RelayEnding::SocketEof, 0, String::new()),
            relay::Ending::Reset { code, reason } => (RelayEnding::Reset, code, reason),
            relay::Ending::Protocol(v) => (RelayEnding::Protocol, 0, v.to_string()),
            relay::Ending::Socket(err) => (RelayEnding::Socket, 0, err.to_string()),
            relay::Ending::Postgres(err) => (RelayEnding::Postgres, 0, err.to_string()),
            relay::Ending::Aborted => (RelayEnding::Aborted, 0, String::new()),
            relay::Ending::Handback => (RelayEnding::Handback, 0, String::new()),
            relay::Ending::PoolTimeout => (RelayEnding::PoolTimeout, 0, String::new()),
            relay::Ending::ReadOnlyOff => (RelayEnding::ReadOnlyOff, 0, String::new()),
        };
        RelayOutcome {
            ending,
            code,
            detail,
            credit: outcome.credit,
            eof_sent: outcome.eof_sent,
            eof_received: outcome.eof_received,
            pooled: outcome.pooled.map(PooledEnd::from),
        }
    }
}

#[pymethods]
impl RelayOutcome {
    #[new]
    #[pyo3(signature = (
        ending,
        *,
        code = 0,
        detail = String::new(),
        credit = 0,
        eof_sent = false,
        eof_received = false,
    ))]
    fn new(
        ending: RelayEnding,
        code: u16,
        detail: String,
        credit: u64,
        eof_sent: bool,
        eof_received: bool,
    ) -> Self {
        RelayOutcome {
            ending,
            code,
            detail,
            credit,
            eof_sent,
            eof_received,
            pooled: None,
        }
    }

    /// Whether the relay ended other than by its ends closing.
    #[getter]
    fn failed(&self) -> bool {
        !matches!(self.ending, RelayEnding::Clean | RelayEnding::SocketEof)
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let detail = self.detail.as_str().into_pyobject(py)?.repr()?;
        Ok(format!(
            "RelayOutcome(RelayEnding.{}, code={}, detail={detail}, credit={}, eof_sent={}, \
             eof_received={})",
            self.ending.name(),
            self.code,
            self.credit,
            py_bool(self.eof_sent),
            py_bool(self.eof_received),
        ))
    }
}

/// The scanners of a native relay: which Postgres message kinds the engine
/// reports (as tap records), each way, and which client kinds it holds for
/// a verdict. Built by the
/// code that knows the bytes are Postgres; the tunnel passes it through.
#[pyclass(module = "qmesh._core", name = "TapSpec", frozen)]
pub struct TapSpec {
    inner: relay::PgTap,
}

#[pymethods]
impl TapSpec {
    /// ``frontend=(full, peek)`` scans the bytes from the tunnel as a
    /// Postgres client's and reports those kinds (whole, or a prefix);
    /// ``backend=full`` scans the socket's bytes as a server's. ``guard``
    /// kinds (with ``frontend``) are held: each is reported as a record
    /// with ``held`` set, and nothing more reaches the socket until
    /// ``TunnelEngine.verdict``; ``guard_screen`` words let a Query or
    /// Parse that names none of them through without a verdict (for a
    /// pooled stream: through the engine, not Python's relay).
    /// ``read_only``: the server reporting ``default_transaction_read_only``
    /// off ends the stream (``RelayEnding.READ_ONLY_OFF``) before the client
    /// gets that answer. A
    /// ``farewell`` (the MiniGate's side, where the tunnel brings a server's
    /// messages) is written to the socket if the session is lost between
    /// two messages.
    #[new]
    #[pyo3(signature = (
        *,
        frontend = None,
        backend = None,
        guard = None,
        read_only = false,
        farewell = None,
        guard_screen = None,
    ))]
    fn new(
        frontend: Option<(Vec<u8>, Vec<u8>)>,
        backend: Option<Vec<u8>>,
        guard: Option<Vec<u8>>,
        read_only: bool,
        farewell: Option<Vec<u8>>,
        guard_screen: Option<Vec<Vec<u8>>>,
    ) -> Result<Self> {
        let guard = guard.unwrap_or_default();
        // Checked here, where the mistake is made, rather than when a
        // stream is handed over.
        if !guard.is_empty() && frontend.is_none() {
            return Err(PyValueError::new_err("a guard needs the frontend scanner").into());
        }
        Ok(TapSpec {
            inner: relay::PgTap {
                frontend,
                backend,
                guard,
                read_only,
                farewell: farewell.unwrap_or_default(),
                guard_screen: guard_screen.unwrap_or_default(),
            },
        })
    }

    fn __repr__(&self) -> String {
        // Tag sets are ASCII letters; written the way Python writes bytes.
        let tags = |t: &[u8]| format!("b'{}'", t.escape_ascii());
        let tap = &self.inner;
        let frontend = tap.frontend.as_ref().map_or("None".into(), |(full, peek)| {
            format!("({}, {})", tags(full), tags(peek))
        });
        let backend = tap.backend.as_deref().map_or("None".into(), tags);
        format!(
            "TapSpec(frontend={frontend}, backend={backend}, guard={}, read_only={})",
            tags(&tap.guard),
            if tap.read_only { "True" } else { "False" },
        )
    }
}

/// A snapshot of an engine's counters, for operators and tests.
#[pyclass(module = "qmesh._core", name = "EngineStats", frozen, get_all)]
#[derive(Debug, Clone)]
pub struct EngineStats {
    /// Sequence of the next reliable frame expected from the peer.
    recv_next: u64,
    /// Sequence the next reliable frame sent will get.
    send_next: u64,
    /// Reliable frames sent and not yet acknowledged.
    retained_frames: usize,
    /// Their payload bytes.
    retained_bytes: usize,
    /// Bytes written to, and read from, tunnel connections.
    bytes_sent: u64,
    bytes_received: u64,
    /// Streams the engine relays natively now.
    native_streams: usize,
    /// Whether a connection is attached.
    attached: bool,
    /// The latest heartbeat's round trip in seconds (None before the first PONG).
    rtt: Option<f64>,
}

#[pymethods]
impl EngineStats {
    fn __repr__(&self) -> String {
        format!(
            "<EngineStats recv_next={} send_next={} retained_frames={} retained_bytes={} \
             bytes_sent={} bytes_received={} native_streams={} attached={} rtt={}>",
            self.recv_next,
            self.send_next,
            self.retained_frames,
            self.retained_bytes,
            self.bytes_sent,
            self.bytes_received,
            self.native_streams,
            py_bool(self.attached),
            self.rtt
                .map_or("None".to_owned(), |rtt| format!("{rtt:.6}")),
        )
    }
}

/// The per-message path of one tunnel session, run by an engine thread.
///
/// Owns, while attached, the connection's socket (Python keeps the socket
/// object and closes it after :meth:`detach`), the codec, retention of
/// unacknowledged frames, ACKs and PONGs, and the sockets of native streams.
/// With ``heartbeat_interval`` and ``dead_after`` (both or neither), also the
/// heartbeat: a PING every ``min(heartbeat_interval, dead_after / 3)`` (at
/// most an hour; a step of 1/1024 of it late at most, so that the beats of
/// many sessions share an engine thread's wake-up), its round trip in
/// :meth:`stats`, and at each PING the connection's end when
/// nothing arrived for longer than ``dead_after`` (:class:`PeerSilent`) or the
/// oldest unacknowledged frame stayed so that long (:class:`ProtocolViolation`).
/// Everything else arrives through :meth:`take`. With a ``notifier``, the
/// engine posts ``key`` to it when there is something to take (many
/// sessions, one descriptor); without, ``notify_fd`` is its own and becomes
/// readable when there is something to take.
#[pyclass(module = "qmesh._core", name = "TunnelEngine")]
pub struct TunnelEngine {
    inner: relay::Engine,
}

#[pymethods]
impl TunnelEngine {
    #[new]
    #[pyo3(signature = (
        *,
        ack_every = 32,
        ack_delay = 0.01,
        max_unacked = 268435456,
        read_size = 262144,
        chunk_size = 65536,
        tap_delay = 0.02,
        tap_batch = 256,
        heartbeat_interval = None,
        dead_after = None,
        notifier = None,
        key = 0,
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        ack_every: u64,
        ack_delay: f64,
        max_unacked: usize,
        read_size: usize,
        chunk_size: usize,
        tap_delay: f64,
        tap_batch: usize,
        heartbeat_interval: Option<f64>,
        dead_after: Option<f64>,
        notifier: Option<PyRef<'_, EngineNotifier>>,
        key: u64,
    ) -> Result<Self> {
        if read_size == 0 || chunk_size == 0 || ack_every == 0 {
            let why = "read_size, chunk_size and ack_every must be positive";
            return Err(PyValueError::new_err(why).into());
        }
        let config = relay::Config {
            ack_every,
            ack_delay: seconds(ack_delay, "ack_delay")?,
            max_unacked,
            read_size,
            chunk_size,
            tap_delay: seconds(tap_delay, "tap_delay")?,
            tap_batch: tap_batch.max(1),
            heartbeat: match (heartbeat_interval, dead_after) {
                (None, None) => None,
                (Some(every), Some(dead_after)) if every > 0.0 && dead_after > 0.0 => {
                    Some(relay::Heartbeat {
                        every: seconds(every, "heartbeat_interval")?,
                        dead_after: seconds(dead_after, "dead_after")?,
                    })
                }
                _ => {
                    let why = "heartbeat_interval and dead_after go together, both positive";
                    return Err(PyValueError::new_err(why).into());
                }
            },
        };
        Ok(TunnelEngine {
            inner: relay::Engine::new(config, notifier.map(|n| (n.inner.clone(), key)))?,
        })
    }

    #[getter]
    fn notify_fd(&self) -> RawFd {
        self.inner.notify_fd()
    }

    /// The counters, all from one moment.
    fn stats(&self) -> EngineStats {
        let s = self.inner.stats();
        EngineStats {
            recv_next: s.recv_next,
            send_next: s.send_next,
            retained_frames: s.retained_frames,
            retained_bytes: s.retained_bytes,
            bytes_sent: s.bytes_sent,
            bytes_received: s.bytes_received,
            native_streams: s.native_streams,
            attached: s.attached,
            rtt: s.rtt.map(|rtt| rtt.as_secs_f64()),
        }
    }

    /// Apply the peer's ``recv_next`` from a handshake
    /// (:class:`ProtocolViolation` if it does not fit what was sent).
    fn acknowledge(&self, peer_recv_next: u64) -> Result<()> {
        Ok(self.inner.acknowledge(peer_recv_next)?)
    }

    /// Carry the session over the connected socket ``fd``. Takes the codec
    /// (the Python objects are unusable afterwards); resends what the peer
    /// has not acknowledged; ``initial`` is what was read past the handshake.
    fn attach(
        &self,
        py: Python<'_>,
        fd: RawFd,
        mut encoder: PyRefMut<'_, FrameEncoder>,
        mut decoder: PyRefMut<'_, FrameDecoder>,
        initial: &[u8],
    ) -> Result<()> {
        let encoder = encoder.take()?;
        let decoder = decoder.take()?;
        // Resending a large backlog seals all of it: let Python run meanwhile.
        Ok(py.detach(|| self.inner.attach(fd, encoder, decoder, initial))?)
    }

    /// Stop using the current connection's socket (safe to close after this).
    fn detach(&self) {
        self.inner.detach();
    }

    /// Seal and send ``(frame_type, stream_id, payload)`` frames, or keep the
    /// reliable ones for the next connection while none is attached.
    fn send(&self, py: Python<'_>, frames: Vec<(u8, u32, Bound<'_, PyBytes>)>) {
        let mut total = 0;
        let frames: Vec<(u8, u32, Bytes)> = frames
            .iter()
            .map(|(frame_type, stream_id, payload)| {
                let payload = payload.as_bytes();
                total += payload.len();
                (*frame_type, *stream_id, Bytes::copy_from_slice(payload))
            })
            .collect();
        if total >= DETACH_THRESHOLD {
            py.detach(|| self.inner.send(frames));
        } else {
            self.inner.send(frames);
        }
    }

    /// ``(frames, taps, ended, error)``: frames for Python to dispatch,
    /// ``(stream_id, records)`` from native streams' scanners, ``(stream_id,
    /// outcome)`` of native streams that ended, and why the current
    /// connection failed, as an exception (not raised). Handle taps, then
    /// endings, then frames (a frame for a stream can follow the stream's
    /// ending).
    fn take<'py>(&self, py: Python<'py>) -> PyTaken<'py> {
        let (events, error) = self.inner.take();
        let mut frames = Vec::new();
        let mut taps = Vec::new();
        let mut ended = Vec::new();
        for event in events {
            match event {
                relay::Event::Frame {
                    frame_type,
                    stream_id,
                    payload,
                } => frames.push((frame_type, stream_id, PyBytes::new(py, &payload))),
                relay::Event::Tap { stream_id, records } => {
                    let records = records
                        .into_iter()
                        .map(|r| (r.at, r.from_tunnel, r.tag, PyBytes::new(py, &r.raw), r.hold))
                        .collect();
                    taps.push((stream_id, records));
                }
                relay::Event::Ended {
                    stream_id,
                    outcome: o,
                } => {
                    ended.push((stream_id, o.into()));
                }
            }
        }
        let error = error.map(|e| PyErr::from(Error::from(e)).into_value(py));
        (frames, taps, ended, error)
    }

    /// Relay stream ``stream_id`` natively between the tunnel and the
    /// connected, non-blocking socket ``fd`` until it ends (reported by
    /// :meth:`take`). The other arguments carry the stream's state over;
    /// ``tap`` says what the stream's scanners report and hold (see
    /// :class:`TapSpec`); ``pooled`` (a :class:`PooledSpec`) makes it a
    /// transaction-mode client session. With ``audit`` (an
    /// :class:`AuditAuthor`) the engine records each finished statement
    /// there itself; a stream that is not pooled then needs a tap with
    /// both scanners reporting what the audit reads (a message its guard
    /// holds is followed once the verdict is in).
    #[pyo3(signature = (
        stream_id,
        fd,
        *,
        credit,
        window,
        to_socket = b"".as_slice(),
        consumed = 0,
        eof_received = false,
        end_on_socket_eof = false,
        tap = None,
        tls = None,
        pooled = None,
        audit = None,
    ))]
    #[allow(clippy::too_many_arguments)]
    fn attach_native(
        &self,
        stream_id: u32,
        fd: RawFd,
        credit: u64,
        window: u64,
        to_socket: &[u8],
        consumed: u64,
        eof_received: bool,
        end_on_socket_eof: bool,
        tap: Option<PyRef<'_, TapSpec>>,
        tls: Option<PyRef<'_, TlsSession>>,
        pooled: Option<PyRef<'_, PooledSpec>>,
        audit: Option<PyRef<'_, AuditAuthor>>,
    ) -> Result<()> {
        if pooled.is_some() && tap.is_none() {
            // A default would drop its guard's words and read-only watch.
            let why = "a pooled stream needs its tap (its guard's words and read-only flag)";
            return Err(PyValueError::new_err(why).into());
        }
        let pooled = pooled.map(|spec| relay::PooledSpec {
            shelf: spec.shelf.clone(),
            wait_limit: spec.wait_limit,
            max_prepared: spec.max_prepared,
            statements: spec.statements.clone(),
            unnamed: spec.unnamed.clone(),
        });
        let tls = match tls {
            Some(client) => Some(client.hand_over()?),
            None => None,
        };
        let spec = relay::NativeSpec {
            stream_id,
            fd,
            to_socket: to_socket.to_vec(),
            credit,
            window,
            consumed,
            eof_received,
            end_on_socket_eof,
            tap: tap.map(|t| t.inner.clone()).unwrap_or_default(),
            tls,
            pooled,
            audit: audit.map(|author| author.inner.clone()),
        };
        Ok(self.inner.attach_native(spec)?)
    }

    /// The verdict on the client message a native stream holds: relay
    /// ``replacement`` in its place (the message itself, or another), then
    /// carry on.
    fn verdict(&self, stream_id: u32, replacement: &[u8]) -> Result<()> {
        Ok(self.inner.verdict(stream_id, replacement.to_vec())?)
    }

    /// The connection a pooled stream holds now (its pool's id), or None.
    fn pooled_lease(&self, stream_id: u32) -> Option<u64> {
        self.inner.pooled_lease(stream_id)
    }

    /// Take a native stream back: its socket is unwatched when this returns.
    /// None if it had already ended (its ending is, or was, in :meth:`take`).
    fn abort_native(&self, stream_id: u32) -> Option<RelayOutcome> {
        self.inner.abort_native(stream_id).map(RelayOutcome::from)
    }

    /// The session is over: drop retained frames and every native stream
    /// (after its farewell, see ``TapSpec``).
    fn lose(&self) {
        self.inner.lose();
    }

    /// Stop the engine's thread (also happens when the object is collected).
    fn close(&mut self, py: Python<'_>) {
        let inner = &mut self.inner;
        py.detach(|| inner.close());
    }
}

/// How many engine threads run in this process (0 before the first
/// ``TunnelEngine``): about one per core, each serving many sessions.
#[pyfunction]
fn engine_threads() -> usize {
    relay::engine_threads()
}

/// Ask the kernel for a time slice of ``seconds`` for the calling thread
/// (Linux 6.12 on, clamped to 0.1–100 ms), or its own again (None): woken,
/// a thread with a shorter slice than the running one preempts it at once.
/// A thread inherits the slice of the one that started it. False where the
/// kernel keeps no slice per thread; OSError if it refused.
#[pyfunction]
fn request_time_slice(seconds: Option<f64>) -> PyResult<bool> {
    let slice = match seconds {
        None => None,
        Some(seconds) if seconds.is_finite() && seconds > 0.0 => {
            Some(std::time::Duration::from_secs_f64(seconds.min(1.0)))
        }
        Some(seconds) => {
            return Err(pyo3::exceptions::PyValueError::new_err(format!(
                "a time slice is a positive number of seconds, not {seconds}"
            )))
        }
    };
    Ok(relay::request_time_slice(slice)?)
}

/// Let the engine threads poll for work for up to ``seconds`` (at most 1 ms)
/// before they sleep, each sizing its window from its own idle spells; 0:
/// never (the default). Trades CPU for the wake-up of a sleeping thread;
/// see ``tunnel.engine_poll_us``.
#[pyfunction]
fn set_engine_poll(seconds: f64) -> PyResult<()> {
    let most = relay::MAX_POLL.as_secs_f64();
    if !(seconds.is_finite() && (0.0..=most).contains(&seconds)) {
        return Err(pyo3::exceptions::PyValueError::new_err(format!(
            "an engine poll window is 0 to {most} seconds, not {seconds}"
        )));
    }
    relay::set_engine_poll(std::time::Duration::from_secs_f64(seconds));
    Ok(())
}

/// The longest poll window the engine threads use now, in seconds.
#[pyfunction]
fn engine_poll() -> f64 {
    relay::engine_poll().as_secs_f64()
}

/// ``(caught, missed)``: the engine threads' polls that found work, and
/// those that ran out of their window and slept.
#[pyfunction]
fn engine_polls() -> (u64, u64) {
    relay::engine_polls()
}

/// One descriptor for the wake-ups of many engines: ``fd`` turns readable
/// when an engine created with this notifier has something to take, and
/// :meth:`take` names them by the ``key`` each was given.
#[pyclass(module = "qmesh._core", name = "EngineNotifier", frozen)]
pub struct EngineNotifier {
    inner: Arc<relay::Notifier>,
}

#[pymethods]
impl EngineNotifier {
    #[new]
    fn new() -> Result<Self> {
        Ok(EngineNotifier {
            inner: Arc::new(relay::Notifier::new()?),
        })
    }

    #[getter]
    fn fd(&self) -> RawFd {
        self.inner.fd()
    }

    /// The keys of the engines that posted since the last take, each once.
    fn take(&self) -> Vec<u64> {
        self.inner.take()
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(engine_threads, m)?)?;
    m.add_function(wrap_pyfunction!(request_time_slice, m)?)?;
    m.add_function(wrap_pyfunction!(set_engine_poll, m)?)?;
    m.add_function(wrap_pyfunction!(engine_poll, m)?)?;
    m.add_function(wrap_pyfunction!(engine_polls, m)?)?;
    m.add_class::<EngineNotifier>()?;
    m.add_class::<TunnelEngine>()?;
    m.add_class::<RelayEnding>()?;
    m.add_class::<RelayOutcome>()?;
    m.add_class::<PooledEnd>()?;
    m.add_class::<PooledSpec>()?;
    m.add_class::<EngineStats>()?;
    m.add_class::<TapSpec>()?;
    m.add("STATEMENT_RUNNING", relay::STATEMENT_RUNNING)?;
    // The stub's alias exists at runtime too (like `Frame` in lib.rs).
    let py = m.py();
    let (int, float, bool_) = (
        py.get_type::<pyo3::types::PyInt>(),
        py.get_type::<pyo3::types::PyFloat>(),
        py.get_type::<pyo3::types::PyBool>(),
    );
    let record = py.get_type::<pyo3::types::PyTuple>().get_item((
        &float,
        &bool_,
        &int,
        py.get_type::<PyBytes>(),
        &bool_,
    ))?;
    m.add("TapRecord", record)
}
