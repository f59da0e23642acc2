//! The HTTP engine: the Gate's LLM path outside Python.
//!
//! The engine owns client connections Python accepted (and handed over with
//! [`HttpEngine::adopt`]) and a pool of keep-alive connections to upstream
//! model servers. On an engine thread (`reactor.rs`) it reads and parses
//! each request (`qmesh-http`: bounded heads and bodies, length or chunked)
//! and hands it whole to Python as one [`HttpEvent::Request`]. Python
//! decides (authentication, routing, budgets) and answers with one command:
//!
//! * [`HttpEngine::respond`]: a whole response it built;
//! * [`HttpEngine::start`] / [`HttpEngine::write`] / [`HttpEngine::finish`]:
//!   a chunked response it produces piece by piece, with
//!   [`HttpEvent::Drained`] as back-pressure;
//! * [`HttpEngine::proxy`]: send these request bytes to that upstream and
//!   relay its answer. A 200 is relayed as it arrives (server-sent events
//!   pass through without Python), its usage figures read on the way; any
//!   other status, a refused connection or a silent upstream is reported
//!   before a byte reaches the client, so Python can try the next candidate.
//!   The result comes back as one [`HttpEvent::Proxied`].
//!
//! A request that matches a route Python installed ([`HttpEngine::route`],
//! see `fastroute.rs`) takes the fast path instead: the engine relays it to
//! the route's upstream without asking Python, and reports it afterwards
//! ([`HttpEvent::FastDone`]) for booking. One the upstream fails before a
//! byte reached the client goes to Python after all
//! ([`HttpEvent::FastFailed`]), which tries the next candidate.
//!
//! A peer's mistake ends that peer's connection only: a malformed or
//! oversized request is answered (400, 408, 413, 431, 501) and the
//! connection closed after a lingering drain; an upstream that breaks its
//! framing is a failed or broken relay. Time is bounded everywhere: the
//! idle keep-alive, a request's arrival, a write to a client that does not
//! read, an upstream's first byte and each later read.
//!
//! Locking and ownership: as in `engine.rs`, all state sits behind one
//! mutex, and the engine thread never touches the GIL. Unlike the tunnel
//! engine, this one owns its sockets (it closes them).

use std::collections::VecDeque;

// Foldhash, not SipHash: every key here is the engine's own id or the
// config's upstream, so no peer chooses what collides, and these maps are
// looked up several times per request.
use foldhash::{HashMap, HashMapExt};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use qmesh_http::{
    encode_chunk, parse_request, parse_response, read_completion_request, BodyDecoder, Framing,
    HttpError, Limits, RequestHead, UsageScan, LAST_CHUNK,
};
use socket2::{Domain, Socket, Type};

use crate::fastroute::{FastRoute, RouteKey, Routes};
use crate::reactor::{self, Driven, Reactor, Registration};
use crate::sys::{self, EventFd, BROKEN, READABLE, WRITABLE};
use crate::tls::{self, TlsLink};

/// How often deadlines are checked: timeouts are seconds, so a tenth of one
/// is precise enough, and one scan per tick is cheaper than a timer each.
const TICK: Duration = Duration::from_millis(100);
/// Bytes read from one socket per call.
const READ_SIZE: usize = 65536;
/// While a request is in flight its client's socket stays watched, and
/// what the client sends meanwhile (a pipelined request, its end) is read
/// ahead up to this much: taking the socket out of the epoll for the
/// request and putting it back cost two `epoll_ctl` a request.
const READ_AHEAD: usize = READ_SIZE;
/// A client's unsent output above which its upstream is not read (and a
/// Python producer is told to wait) …
const HIGH_WATER: usize = 256 * 1024;
/// … until it is below this.
const LOW_WATER: usize = 64 * 1024;
/// A refused (non-200) upstream answer kept for Python at most.
const MAX_ERROR_BODY: usize = 65536;
/// A held (whole-body) 200 answer at most; a larger one is relayed as it comes.
const MAX_HOLD: usize = 8 * 1024 * 1024;
/// An upstream response head at most.
const MAX_UPSTREAM_HEAD: usize = 65536;
/// After an error answer the client's further input is read and dropped,
/// up to this much and this long, so that closing does not reset the
/// connection under the answer before the client has read it.
const LINGER_BYTES: usize = 1024 * 1024;
const LINGER: Duration = Duration::from_secs(2);
/// JSON nesting the fast path reads (Python's `peerjson.DEFAULT_MAX_DEPTH`).
const FAST_MAX_DEPTH: usize = 32;

/// Limits and times of one engine.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    pub max_head: usize,
    pub max_body: usize,
    /// A kept-alive connection waiting for its next request is closed after this.
    pub idle_timeout: Duration,
    /// From a request's first byte to the end of its body (408 beyond); also
    /// the longest one write may wait for a client that does not read.
    pub request_timeout: Duration,
    /// Idle upstream connections kept per address.
    pub max_idle_per_upstream: usize,
    /// An idle upstream connection is closed after this.
    pub upstream_idle: Duration,
    /// An engine on the engine threads: how many fast-path reports may wait
    /// for Python to take them. Past it, requests wait in the engine
    /// (parked) until Python takes the reports: the relaying never runs
    /// ahead of the bookkeeping by more (an inline engine relays only when
    /// its owner polls it, so it needs no bound).
    pub max_fast_reports: usize,
}

/// TLS towards an upstream: the client configuration, and the name its
/// certificate must carry (also sent as SNI).
#[derive(Debug, Clone)]
pub struct UpstreamTls {
    pub config: Arc<rustls::ClientConfig>,
    pub server_name: Arc<str>,
}

/// What [`HttpEngine::proxy`] sends where.
#[derive(Debug, Clone)]
pub struct ProxySpec {
    pub addr: SocketAddr,
    /// Speak TLS to it (an https upstream).
    pub tls: Option<UpstreamTls>,
    /// A whole HTTP/1.1 request, sent on a pooled or new connection.
    pub request: Arc<[u8]>,
    /// `name: value\r\n` lines added to the relayed answer's head.
    pub headers: Arc<[u8]>,
    /// From the request's sending to the answer's head.
    pub first_byte_timeout: Duration,
    /// Between two reads of the answer's body.
    pub chunk_timeout: Duration,
    /// Send the answer to the client only once it is whole (up to
    /// `MAX_HOLD`), so that one cut short is a failure another upstream may
    /// take over, not a broken answer.
    pub hold: bool,
}

impl ProxySpec {
    /// Nothing to send: what an idle pooled connection carries.
    fn idle(addr: SocketAddr) -> Self {
        ProxySpec {
            addr,
            tls: None,
            request: Arc::from(&[][..]),
            headers: Arc::from(&[][..]),
            first_byte_timeout: Duration::ZERO,
            chunk_timeout: Duration::ZERO,
            hold: false,
        }
    }
}

/// What happened to a [`HttpEngine::proxy`].
#[derive(Debug, Clone)]
pub enum ProxyOutcome {
    /// Nothing reached the client: the upstream could not be reached, broke
    /// off or timed out (`timeout`) before answering.
    Failed { reason: String, timeout: bool },
    /// The upstream answered another status than 200; nothing reached the
    /// client. `body` is the start of its answer.
    Refused {
        status: u16,
        body: Vec<u8>,
        content_type: Option<Vec<u8>>,
    },
    /// Relayed to its end, or cut short: the upstream broke off or went
    /// silent after bytes reached the client (`broken` says why), or the
    /// client went away (`client_gone`). With `open`, the answer's end waits
    /// for Python (`finish`, after `write`s of closing words if it broke):
    /// a held answer is released, a chunked one gets its last chunk, once
    /// Python has booked it. A broken answer that is not chunked ends its
    /// connection.
    Relayed {
        broken: Option<String>,
        client_gone: bool,
        open: bool,
        usage: Usage,
    },
}

/// Figures of a relayed answer.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    pub tokens_in: u64,
    pub tokens_out: u64,
    /// Body bytes relayed to the client.
    pub bytes_out: u64,
    /// When the answer's head came (the monotonic clock, see `sys::monotonic`).
    pub first_byte_at: f64,
}

/// What the engine tells Python.
#[derive(Debug)]
pub enum HttpEvent {
    /// A whole request, for Python to answer (`exchange` names it).
    Request {
        exchange: u64,
        head: RequestHead,
        body: Vec<u8>,
        peer: Arc<str>,
    },
    Proxied {
        exchange: u64,
        outcome: ProxyOutcome,
    },
    /// A request the fast path relayed is done with: Python books it. Its
    /// `outcome` is [`ProxyOutcome::Relayed`]; a whole answer went out
    /// already, and one that broke off and is `open` waits for Python's
    /// closing words and `finish`, as for [`HttpEvent::Proxied`].
    FastDone {
        exchange: u64,
        route: u64,
        outcome: ProxyOutcome,
        /// The request body's size, and when its request was read.
        body_len: usize,
        started_at: f64,
    },
    /// The fast path's upstream failed before a byte reached the client:
    /// the request is Python's, as a [`HttpEvent::Request`] would have
    /// made it, with what came of the attempt.
    FastFailed {
        exchange: u64,
        route: u64,
        outcome: ProxyOutcome,
        head: RequestHead,
        body: Vec<u8>,
        peer: Arc<str>,
    },
    /// No request will name this route any more.
    RouteReleased { route: u64 },
    /// A producer's output went below the low-water mark.
    Drained { exchange: u64 },
    /// The client's connection ended before the exchange was answered.
    Gone { exchange: u64 },
}

/// Counters, from one moment.
#[derive(Debug, Clone, Copy, Default)]
pub struct HttpStats {
    pub clients: usize,
    pub upstreams: usize,
    pub idle_upstreams: usize,
    pub requests: u64,
    pub proxied: u64,
    pub reused: u64,
    /// Requests that took the fast path.
    pub fast: u64,
    /// Upstream silences past their deadline not held against the upstream:
    /// its client held it back by not reading.
    pub held_back: u64,
}

#[derive(Debug)]
enum Phase {
    /// Waiting for the first byte of a request.
    Idle,
    /// Reading a request's head and body.
    Reading {
        head: Option<(RequestHead, BodyDecoder)>,
        body: Vec<u8>,
    },
    /// The request is Python's to answer.
    Python,
    /// An upstream's answer is being relayed.
    Relaying { upstream: u64 },
    /// Python writes a chunked answer (or ends a relayed one).
    Streaming,
    /// A relayed answer, whole, waits for Python's word (`finish`) once its
    /// cost is booked.
    Held { answer: Vec<u8> },
    /// An answer is being written, then the connection ends with a
    /// lingering drain.
    Closing,
    /// Output written and shut; dropping the client's input until it stops.
    Lingering { drained: usize },
}

struct Client {
    socket: Socket,
    interest: u32,
    peer: Arc<str>,
    rbuf: Vec<u8>,
    /// How much of `rbuf` a parse found to be an incomplete head: it is
    /// parsed again only once a line ends past it (a head sent a byte at a
    /// time would otherwise be parsed from its start at every byte).
    head_parsed: usize,
    out: Vec<u8>,
    phase: Phase,
    exchange: u64,
    keep_alive: bool,
    head_only: bool,
    /// The request is HTTP/1.0 ([`Client::streamed`]).
    http10: bool,
    /// Python was told it may write again once output falls below LOW_WATER.
    drain_wanted: bool,
    deadline: Option<Instant>,
    /// When the current unsent output last made progress.
    stalled_since: Option<Instant>,
    /// What a request's deadline means when it passes.
    deadline_is_idle: bool,
    /// The client sent its last byte: nothing more is read.
    read_closed: bool,
    tls: Option<TlsLink>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UpPhase {
    Connecting,
    Exchanging,
    Idle,
}

/// Where an idle upstream connection may be reused: its address, and the
/// name its TLS was verified for (None: plain).
/// Pooled connections are told apart by address, and for TLS by server
/// name and client configuration (its identity: two providers at one
/// address may present different client certificates).
type PoolKey = (SocketAddr, Option<(Arc<str>, usize)>);

fn pool_key(addr: SocketAddr, tls: Option<&UpstreamTls>) -> PoolKey {
    let tls = tls.map(|t| (Arc::clone(&t.server_name), Arc::as_ptr(&t.config) as usize));
    (addr, tls)
}

struct Upstream {
    socket: Socket,
    interest: u32,
    /// Where it is connected, and as whom (the pool's key).
    key: PoolKey,
    addr: SocketAddr,
    tls: Option<TlsLink>,
    phase: UpPhase,
    /// What it carries now (while idle: the last one, its request dropped).
    spec: ProxySpec,
    sent: usize,
    rbuf: Vec<u8>,
    client: u64,
    exchange: u64,
    reused: bool,
    received: bool,
    head: Option<(u16, BodyDecoder, bool)>,
    content_type: Option<Vec<u8>>,
    relaying: bool,
    chunked_out: bool,
    kept: Vec<u8>,
    framing: Framing,
    usage: UsageScan,
    bytes_out: u64,
    first_byte_at: f64,
    deadline: Option<Instant>,
}

struct State {
    config: HttpConfig,
    closed: bool,
    clients: HashMap<u64, Client>,
    upstreams: HashMap<u64, Upstream>,
    idle: HashMap<PoolKey, Vec<u64>>,
    exchanges: HashMap<u64, u64>,
    events: Vec<HttpEvent>,
    notified: bool,
    next_id: u64,
    ticking: bool,
    stats: HttpStats,
    routes: Routes,
    /// Exchanges on the fast path, by exchange id.
    fast: HashMap<u64, FastExchange>,
    /// Fast-path reports among `events`.
    fast_reports: usize,
    /// Whole requests held back while `fast_reports` is at its bound (at
    /// most one per client: a client is not read while its request waits).
    parked: VecDeque<WholeRequest>,
}

/// A request read whole, as the engine dispatches it (and holds it while
/// the fast path's reports wait at their bound: see
/// [`HttpConfig::max_fast_reports`]).
struct WholeRequest {
    client: u64,
    exchange: u64,
    head: RequestHead,
    body: Vec<u8>,
    peer: Arc<str>,
}

/// A request on the fast path: kept whole until its answer began, in case
/// Python must serve it after all.
struct FastExchange {
    route: Arc<FastRoute>,
    head: RequestHead,
    body: Vec<u8>,
    peer: Arc<str>,
    started_at: f64,
}

struct Shared {
    state: Mutex<State>,
    notify: EventFd,
    registration: std::sync::OnceLock<Registration>,
    /// An inline engine's own reactor, which its owner polls.
    inline: Option<Arc<Reactor>>,
}

/// The engine (see the module's documentation).
pub struct HttpEngine {
    shared: Arc<Shared>,
}

fn lock(mutex: &Mutex<State>) -> MutexGuard<'_, State> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        402 => "Payment Required",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        418 => "I'm a Teapot",
        422 => "Unprocessable Content",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

/// A response head: status line, the given headers, then framing (an
/// answer that ends with the connection closes it).
fn response_head(status: u16, headers: &[u8], framing: Framing, close: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(128 + headers.len());
    out.extend_from_slice(format!("HTTP/1.1 {status} {}\r\n", reason(status)).as_bytes());
    out.extend_from_slice(headers);
    out.extend_from_slice(b"server: qmesh\r\n");
    match framing {
        Framing::Length(length) => {
            out.extend_from_slice(format!("content-length: {length}\r\n").as_bytes());
        }
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Framing::UntilClose => {}
    }
    if close || framing == Framing::UntilClose {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// An OpenAI-style error body, as the Python server writes them.
fn error_body(error: &HttpError) -> Vec<u8> {
    let mut message = String::with_capacity(error.message.len());
    for c in error.message.chars() {
        match c {
            '"' => message.push_str("\\\""),
            '\\' => message.push_str("\\\\"),
            c if (c as u32) < 0x20 || !c.is_ascii() => {
                message.push_str(&format!("\\u{:04x}", c as u32 & 0xffff))
            }
            c => message.push(c),
        }
    }
    let kind = if error.status >= 500 {
        "server_error"
    } else {
        "invalid_request_error"
    };
    format!(
        "{{\"error\":{{\"message\":\"{message}\",\"type\":\"{kind}\",\"param\":null,\"code\":null}}}}"
    )
    .into_bytes()
}

impl Client {
    /// Output not yet on the wire (plaintext, or records TLS sealed).
    fn unsent(&self) -> bool {
        !self.out.is_empty() || self.tls.as_ref().is_some_and(TlsLink::wants_write)
    }

    /// The framing of an answer of unknown length: chunked, or for an
    /// HTTP/1.0 client (which knows no chunks) the connection's end.
    fn streamed(&mut self) -> Framing {
        if self.http10 {
            self.keep_alive = false;
            Framing::UntilClose
        } else {
            Framing::Chunked
        }
    }

    /// A piece of an answer of unknown length, framed as [`Client::streamed`].
    fn push_piece(&mut self, data: &[u8]) {
        if self.http10 {
            self.out.extend_from_slice(data);
        } else {
            encode_chunk(data, &mut self.out);
        }
    }

    fn transmit(&mut self) -> io::Result<usize> {
        let taken = transmit(&self.socket, self.tls.as_mut(), &self.out)?;
        self.out.drain(..taken);
        Ok(taken)
    }

    fn receive(&mut self) -> io::Result<usize> {
        receive(&self.socket, self.tls.as_mut(), &mut self.rbuf)
    }
}

/// Write what the socket takes of `out` (through TLS if any): how many
/// bytes of `out` went; an error for a connection that is broken.
fn transmit(socket: &Socket, tls: Option<&mut TlsLink>, out: &[u8]) -> io::Result<usize> {
    let fd = socket.as_raw_fd();
    let mut taken = 0;
    match tls {
        None => {
            while taken < out.len() {
                match sys::send(fd, &out[taken..]) {
                    Ok(n) => taken += n,
                    Err(err) if sys::would_block(&err) => break,
                    Err(err) => return Err(err),
                }
            }
        }
        Some(link) => loop {
            let n = link.write(&out[taken..])?;
            taken += n;
            link.flush(fd)?;
            if n == 0 || taken == out.len() || link.wants_write() {
                break;
            }
        },
    }
    Ok(taken)
}

/// Read what the socket has into `rbuf` (through TLS if any, whose
/// handshake answers go out here): how much, `Ok(0)` at the end.
fn receive(socket: &Socket, tls: Option<&mut TlsLink>, rbuf: &mut Vec<u8>) -> io::Result<usize> {
    let Some(link) = tls else {
        return read_into(socket, rbuf);
    };
    let fd = socket.as_raw_fd();
    let mut total = 0;
    // Until the socket is drained, or enough for one round: plaintext
    // left inside TLS is read on (no socket event would announce it).
    while total < 4 * READ_SIZE || link.has_pending() {
        rbuf.reserve(READ_SIZE);
        let len = rbuf.len();
        // SAFETY: as in `read_into`: `read` fills the first `n` bytes of
        // the spare capacity, and only those are kept.
        let result = unsafe {
            let spare = std::slice::from_raw_parts_mut(rbuf.as_mut_ptr().add(len), READ_SIZE);
            link.read(fd, spare)
        };
        match result {
            Ok(0) => break,
            // SAFETY: see above.
            Ok(n) => unsafe { rbuf.set_len(len + n) },
            Err(err) if sys::would_block(&err) => {
                link.flush(fd)?;
                if total == 0 {
                    return Err(err);
                }
                break;
            }
            Err(err) => return Err(err),
        }
        total += rbuf.len() - len;
        if link.drained() {
            break; // another read would find the socket empty
        }
    }
    link.flush(fd)?;
    Ok(total)
}

fn read_into(socket: &Socket, buf: &mut Vec<u8>) -> io::Result<usize> {
    buf.reserve(READ_SIZE);
    let len = buf.len();
    // SAFETY: the spare capacity is at least READ_SIZE writable bytes;
    // `read` initialises the first `n` of them, and only those are kept.
    let n = unsafe {
        let spare = std::slice::from_raw_parts_mut(buf.as_mut_ptr().add(len), READ_SIZE);
        sys::read(socket.as_raw_fd(), spare)?
    };
    // SAFETY: see above.
    unsafe { buf.set_len(len + n) };
    Ok(n)
}

impl HttpEngine {
    /// An engine on the process's engine threads, or with `inline`, on no
    /// thread of its own: its owner calls [`HttpEngine::poll`] when
    /// [`HttpEngine::poll_fd`] is readable (a timer descriptor makes it so
    /// when a timeout is due). Inline, a request's way through the Gate crosses no
    /// thread: on a Gate with one core that saves two switches a request.
    pub fn new(mut config: HttpConfig, inline: bool) -> io::Result<Self> {
        if inline {
            config.max_fast_reports = usize::MAX;
        }
        let own = if inline {
            Some(Reactor::manual()?)
        } else {
            reactor::start_pool()?;
            None
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                config,
                closed: false,
                clients: HashMap::new(),
                upstreams: HashMap::new(),
                idle: HashMap::new(),
                exchanges: HashMap::new(),
                events: Vec::new(),
                notified: false,
                next_id: 1,
                ticking: false,
                stats: HttpStats::default(),
                routes: Routes::default(),
                fast: HashMap::new(),
                fast_reports: 0,
                parked: VecDeque::new(),
            }),
            notify: EventFd::new()?,
            registration: std::sync::OnceLock::new(),
            inline: own.clone(),
        });
        let weak: Weak<dyn Driven> = Arc::downgrade(&shared) as Weak<Shared>;
        let registration = match own {
            Some(reactor) => Registration::on(reactor, weak),
            None => Registration::new(weak),
        };
        let _ = shared.registration.set(registration);
        Ok(HttpEngine { shared })
    }

    /// Readable when there are events to [`HttpEngine::take`] (an engine
    /// on the engine threads).
    pub fn notify_fd(&self) -> RawFd {
        self.shared.notify.fd()
    }

    /// Readable when an inline engine has work for [`HttpEngine::poll`]
    /// (an engine on the engine threads: its `notify_fd`).
    pub fn poll_fd(&self) -> RawFd {
        match &self.shared.inline {
            Some(reactor) => reactor.fd(),
            None => self.notify_fd(),
        }
    }

    /// Run an inline engine's ready work and due timeouts, then [`HttpEngine::take`].
    pub fn poll(&self) -> Vec<HttpEvent> {
        if let Some(reactor) = &self.shared.inline {
            reactor.poll();
        }
        self.take()
    }

    fn with<R>(&self, f: impl FnOnce(&mut State, &Registration) -> R) -> R {
        let mut st = lock(&self.shared.state);
        let reg = self
            .shared
            .registration
            .get()
            .expect("registered at creation");
        let result = f(&mut st, reg);
        st.finish(&self.shared, reg);
        result
    }

    /// Serve the connected socket `fd` (the engine owns it from now on),
    /// as a TLS server with `tls`: its handshake is bounded by the request
    /// timeout.
    pub fn adopt(
        &self,
        fd: RawFd,
        peer: &str,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> io::Result<()> {
        // SAFETY: the caller hands over a connected socket it no longer uses.
        let socket = unsafe { Socket::from_raw_fd(fd) };
        socket.set_nonblocking(true)?;
        let _ = socket.set_tcp_nodelay(true); // not TCP (a test's socketpair): fine
        let link = match tls {
            Some(config) => Some(TlsLink::new(
                tls::accept(config).map_err(|e| io::Error::other(e.to_string()))?,
            )),
            None => None,
        };
        self.with(|st, reg| {
            if st.closed {
                return;
            }
            let id = st.id();
            let wait = if link.is_some() {
                st.config.request_timeout
            } else {
                st.config.idle_timeout
            };
            let deadline = Some(Instant::now() + wait);
            st.clients.insert(
                id,
                Client {
                    socket,
                    interest: 0,
                    peer: Arc::from(peer),
                    rbuf: Vec::new(),
                    head_parsed: 0,
                    out: Vec::new(),
                    phase: Phase::Idle,
                    exchange: 0,
                    keep_alive: true,
                    head_only: false,
                    http10: false,
                    drain_wanted: false,
                    deadline,
                    stalled_since: None,
                    deadline_is_idle: true,
                    read_closed: false,
                    tls: link,
                },
            );
            st.update_client(reg, id);
        });
        Ok(())
    }

    /// Answer `exchange` with a whole response (`headers` are `name: value\r\n`
    /// lines); false if its client is gone.
    pub fn respond(
        &self,
        exchange: u64,
        status: u16,
        headers: &[u8],
        body: &[u8],
        close: bool,
    ) -> bool {
        self.with(|st, reg| {
            let Some(id) = st.python_client(exchange) else {
                return false;
            };
            let client = st
                .clients
                .get_mut(&id)
                .expect("exchanges name live clients");
            let close = close || !client.keep_alive;
            let length = Framing::Length(body.len() as u64);
            let mut data = response_head(status, headers, length, close);
            if !client.head_only {
                data.extend_from_slice(body);
            }
            client.out.extend_from_slice(&data);
            client.keep_alive = !close;
            st.answered(reg, id);
            true
        })
    }

    /// Start a chunked answer to `exchange`; false if its client is gone.
    pub fn start(&self, exchange: u64, status: u16, headers: &[u8]) -> bool {
        self.with(|st, reg| {
            let Some(id) = st.python_client(exchange) else {
                return false;
            };
            let client = st
                .clients
                .get_mut(&id)
                .expect("exchanges name live clients");
            let framing = client.streamed();
            let head = response_head(status, headers, framing, !client.keep_alive);
            client.out.extend_from_slice(&head);
            if client.head_only {
                st.answered(reg, id); // a HEAD answer has no body, not even an empty one
            } else {
                client.phase = Phase::Streaming;
                st.flush_client(reg, id);
            }
            true
        })
    }

    /// Append a chunk to a started answer: the bytes now waiting to be
    /// written (at or over the high-water mark: wait for `Drained`), or
    /// `None` if the client is gone.
    pub fn write(&self, exchange: u64, data: &[u8]) -> Option<usize> {
        self.with(|st, reg| {
            let id = st.streaming_client(exchange)?;
            let client = st
                .clients
                .get_mut(&id)
                .expect("exchanges name live clients");
            client.push_piece(data);
            st.flush_client(reg, id);
            let client = st.clients.get_mut(&id)?;
            if client.out.len() >= HIGH_WATER {
                client.drain_wanted = true;
            }
            Some(client.out.len())
        })
    }

    /// End a started answer, or release a held one; false if the client
    /// is gone.
    pub fn finish(&self, exchange: u64) -> bool {
        self.with(|st, reg| st.release_answer(reg, exchange))
    }

    /// Serve the requests that carry `key` as Python decided in `route`
    /// (see `fastroute.rs`), replacing the route `key` had.
    pub fn route(&self, key: RouteKey, route: FastRoute) {
        self.with(|st, _| st.routes.insert(key, route));
    }

    /// Forget every route: what decisions rest on changed.
    pub fn forget_routes(&self) {
        self.with(|st, _| st.routes.clear());
    }

    /// Requests of `app` in flight on the fast path.
    pub fn fast_in_flight(&self, app: &str) -> usize {
        lock(&self.shared.state).routes.in_flight(app)
    }

    /// End `exchange`'s connection now, whatever was written.
    pub fn abort(&self, exchange: u64) {
        self.with(|st, reg| {
            if let Some(&id) = st.exchanges.get(&exchange) {
                st.drop_client(reg, id);
            }
        });
    }

    /// Send a request upstream and relay its 200 answer to `exchange`'s
    /// client (see [`ProxySpec`]). False if the client is gone.
    pub fn proxy(&self, exchange: u64, spec: ProxySpec) -> bool {
        self.with(|st, reg| {
            let Some(client) = st.python_client(exchange) else {
                return false;
            };
            st.stats.proxied += 1;
            let deadline = Instant::now() + spec.first_byte_timeout;
            st.send_upstream(reg, spec, client, exchange, deadline);
            true
        })
    }

    /// Everything to report since the last call (drains `notify_fd`);
    /// requests parked for want of room for their reports go on.
    pub fn take(&self) -> Vec<HttpEvent> {
        self.with(|st, reg| {
            if st.notified {
                self.shared.notify.drain();
            }
            st.notified = false;
            st.fast_reports = 0;
            let events = std::mem::take(&mut st.events);
            st.unpark(reg);
            events
        })
    }

    pub fn stats(&self) -> HttpStats {
        let st = lock(&self.shared.state);
        HttpStats {
            clients: st.clients.len(),
            upstreams: st.upstreams.len(),
            idle_upstreams: st.idle.values().map(Vec::len).sum(),
            ..st.stats
        }
    }

    /// Close every connection; the engine serves nothing more.
    pub fn close(&self) {
        self.with(|st, reg| {
            st.closed = true;
            for (_, client) in st.clients.drain() {
                reg.unwatch(client.socket.as_raw_fd());
            }
            for (_, upstream) in st.upstreams.drain() {
                reg.unwatch(upstream.socket.as_raw_fd());
            }
            st.idle.clear();
            st.exchanges.clear();
            st.fast.clear();
            st.routes.clear();
        });
    }
}

impl Drop for HttpEngine {
    fn drop(&mut self) {
        self.close();
    }
}

impl Driven for Shared {
    fn ready(&self, events: &[(u64, u32)]) {
        let mut st = lock(&self.state);
        let reg = self.registration.get().expect("registered at creation");
        if st.closed {
            return;
        }
        for &(token, flags) in events {
            if st.clients.contains_key(&token) {
                st.client_ready(reg, token, flags);
            } else if st.upstreams.contains_key(&token) {
                st.upstream_ready(reg, token, flags);
            }
        }
        st.finish(self, reg);
    }

    fn timer(&self, now: Instant) {
        let mut st = lock(&self.state);
        let reg = self.registration.get().expect("registered at creation");
        st.ticking = false;
        if st.closed {
            return;
        }
        st.expire(reg, now);
        st.finish(self, reg);
    }
}

impl State {
    fn id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    fn emit(&mut self, event: HttpEvent) {
        self.events.push(event);
    }

    /// End of a round: wake Python if there is news, keep the tick going
    /// while anything has a deadline.
    fn finish(&mut self, shared: &Shared, reg: &Registration) {
        for route in self.routes.released() {
            self.events.push(HttpEvent::RouteReleased { route });
        }
        // An inline engine's owner polls it and takes the events then: a
        // signal would cost two system calls a round for nothing.
        if !self.events.is_empty() && !self.notified && shared.inline.is_none() {
            self.notified = true;
            shared.notify.signal();
        }
        if !(self.ticking || self.clients.is_empty() && self.upstreams.is_empty()) {
            self.ticking = true;
            reg.schedule(Instant::now() + TICK);
        }
    }

    fn python_client(&self, exchange: u64) -> Option<u64> {
        let id = *self.exchanges.get(&exchange)?;
        let client = self.clients.get(&id)?;
        matches!(client.phase, Phase::Python).then_some(id)
    }

    fn streaming_client(&self, exchange: u64) -> Option<u64> {
        let id = *self.exchanges.get(&exchange)?;
        let client = self.clients.get(&id)?;
        matches!(client.phase, Phase::Streaming).then_some(id)
    }

    // -- clients -------------------------------------------------------------

    fn update_client(&mut self, reg: &Registration, id: u64) {
        let Some(client) = self.clients.get_mut(&id) else {
            return;
        };
        let reading = match client.phase {
            Phase::Lingering { .. } => true,
            Phase::Idle | Phase::Reading { .. } => !client.read_closed,
            Phase::Python | Phase::Relaying { .. } | Phase::Streaming | Phase::Held { .. } => {
                !client.read_closed && client.rbuf.len() < READ_AHEAD
            }
            Phase::Closing => false,
        };
        let want = if reading { READABLE } else { 0 } | if client.unsent() { WRITABLE } else { 0 };
        reg.set_interest(client.socket.as_raw_fd(), id, &mut client.interest, want);
    }

    fn client_ready(&mut self, reg: &Registration, id: u64, flags: u32) {
        if flags & WRITABLE != 0 || flags & BROKEN != 0 {
            self.flush_client(reg, id);
        }
        if flags & (READABLE | BROKEN) != 0 {
            self.read_client(reg, id);
        }
    }

    /// Write what is waiting; a client that cannot take it any more is dropped.
    fn flush_client(&mut self, reg: &Registration, id: u64) {
        let Some(client) = self.clients.get_mut(&id) else {
            return;
        };
        let Ok(written) = client.transmit() else {
            self.drop_client(reg, id);
            return;
        };
        // The clock runs from the last progress while anything is unsent,
        // and starts at a write that took nothing (the socket was full).
        if written > 0 || !client.unsent() || client.stalled_since.is_none() {
            client.stalled_since = client.unsent().then(Instant::now);
        }
        if client.drain_wanted && client.out.len() < LOW_WATER {
            client.drain_wanted = false;
            let exchange = client.exchange;
            self.emit(HttpEvent::Drained { exchange });
        }
        let client = self.clients.get_mut(&id).expect("still here");
        if !client.unsent() && matches!(client.phase, Phase::Closing) {
            if let Some(link) = &mut client.tls {
                link.close();
                let _ = link.flush(client.socket.as_raw_fd());
            }
            let _ = sys::shutdown_write(client.socket.as_raw_fd());
            client.phase = Phase::Lingering { drained: 0 };
            client.deadline = Some(Instant::now() + LINGER);
            client.deadline_is_idle = true;
        }
        if let Phase::Relaying { upstream } = client.phase {
            self.update_upstream(reg, upstream);
        }
        self.update_client(reg, id);
    }

    fn read_client(&mut self, reg: &Registration, id: u64) {
        let Some(client) = self.clients.get_mut(&id) else {
            return;
        };
        if let Phase::Lingering { drained } = &mut client.phase {
            let mut scratch = Vec::new();
            match read_into(&client.socket, &mut scratch) {
                Ok(0) => self.drop_client(reg, id),
                Ok(n) if *drained + n < LINGER_BYTES => *drained += n,
                Err(err) if sys::would_block(&err) => {}
                _ => self.drop_client(reg, id),
            }
            return;
        }
        if !matches!(client.phase, Phase::Idle | Phase::Reading { .. }) {
            // A request in flight: read ahead, parsed once it is answered.
            if matches!(client.phase, Phase::Closing) || client.read_closed {
                return;
            }
            match client.receive() {
                Ok(0) => client.read_closed = true,
                Ok(_) => {}
                Err(err) if sys::would_block(&err) => {}
                Err(_) => {
                    self.drop_client(reg, id);
                    return;
                }
            }
            self.update_client(reg, id);
            return;
        }
        match client.receive() {
            Ok(0) => {
                self.peer_closed(reg, id);
                return;
            }
            Ok(_) => {}
            Err(err) if sys::would_block(&err) => return,
            Err(_) => {
                self.drop_client(reg, id);
                return;
            }
        }
        self.parse_client(reg, id);
    }

    /// Take requests from what the client sent, as far as the phase allows.
    fn parse_client(&mut self, reg: &Registration, id: u64) {
        let limits = Limits {
            max_head: self.config.max_head,
            max_body: self.config.max_body,
        };
        let request_timeout = self.config.request_timeout;
        'parse: {
            let Some(client) = self.clients.get_mut(&id) else {
                return;
            };
            if client.rbuf.is_empty() {
                break 'parse;
            }
            if matches!(client.phase, Phase::Idle) {
                client.phase = Phase::Reading {
                    head: None,
                    body: Vec::new(),
                };
                client.deadline = Some(Instant::now() + request_timeout);
                client.deadline_is_idle = false;
            }
            let Phase::Reading { head, body } = &mut client.phase else {
                break 'parse;
            };
            if head.is_none() {
                let fresh = client.rbuf.get(client.head_parsed..).unwrap_or_default();
                if client.head_parsed > 0
                    && !fresh.contains(&b'\n')
                    && client.rbuf.len() <= limits.max_head
                {
                    break 'parse;
                }
                match parse_request(&client.rbuf, &limits) {
                    Ok(None) => {
                        client.head_parsed = client.rbuf.len();
                        break 'parse;
                    }
                    Ok(Some(parsed)) => {
                        client.head_parsed = 0;
                        client.rbuf.drain(..parsed.length);
                        let decoder = BodyDecoder::new(parsed.framing);
                        if parsed.expect_continue && !decoder.done() {
                            client
                                .out
                                .extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
                        }
                        *head = Some((parsed, decoder));
                    }
                    Err(error) => {
                        self.refuse(reg, id, &error);
                        return;
                    }
                }
            }
            let (_, decoder) = head.as_mut().expect("parsed above");
            match decoder.decode(&client.rbuf, body) {
                Ok(used) => {
                    client.rbuf.drain(..used);
                }
                Err(error) => {
                    self.refuse(reg, id, &error);
                    return;
                }
            }
            if body.len() > limits.max_body {
                let error =
                    HttpError::new(413, format!("request body over {} bytes", limits.max_body));
                self.refuse(reg, id, &error);
                return;
            }
            if !decoder.done() {
                break 'parse;
            }
            let Phase::Reading { head, body } = std::mem::replace(&mut client.phase, Phase::Python)
            else {
                unreachable!("matched above")
            };
            let (head, _) = head.expect("parsed above");
            let exchange = self.id();
            let client = self.clients.get_mut(&id).expect("still here");
            client.exchange = exchange;
            client.keep_alive = head.keep_alive;
            client.head_only = head.method == "HEAD";
            client.http10 = head.http10;
            client.deadline = None;
            if client.rbuf.capacity() > 4 * READ_SIZE && client.rbuf.len() < READ_SIZE {
                client.rbuf.shrink_to(READ_SIZE);
            }
            let peer = Arc::clone(&client.peer);
            self.exchanges.insert(exchange, id);
            self.stats.requests += 1;
            let request = WholeRequest {
                client: id,
                exchange,
                head,
                body,
                peer,
            };
            self.dispatch(reg, request);
            break 'parse;
        }
        let Some(client) = self.clients.get(&id) else {
            return;
        };
        if client.read_closed && matches!(client.phase, Phase::Idle | Phase::Reading { .. }) {
            self.peer_closed(reg, id);
            return;
        }
        self.flush_client(reg, id);
    }

    /// The client sent its last byte, and what it sent before is taken: a
    /// request it cut short is refused; between requests, the connection
    /// ends once the last answer is out.
    fn peer_closed(&mut self, reg: &Registration, id: u64) {
        let Some(client) = self.clients.get_mut(&id) else {
            return;
        };
        client.read_closed = true;
        if matches!(client.phase, Phase::Reading { .. }) {
            let error = HttpError::new(400, "connection closed inside the request");
            self.refuse(reg, id, &error);
            self.drop_client(reg, id);
        } else if client.unsent() {
            client.phase = Phase::Closing;
            client.deadline = Some(Instant::now() + self.config.request_timeout);
            client.deadline_is_idle = true;
            self.flush_client(reg, id);
        } else {
            self.drop_client(reg, id);
        }
    }

    /// The end of a relayed answer that waited for its booking: a held
    /// answer goes out, a chunked one gets its last chunk. False if there
    /// is no such answer (or client).
    fn release_answer(&mut self, reg: &Registration, exchange: u64) -> bool {
        let Some(id) = self.exchanges.get(&exchange).copied() else {
            return false;
        };
        let Some(client) = self.clients.get_mut(&id) else {
            return false;
        };
        match std::mem::replace(&mut client.phase, Phase::Python) {
            Phase::Streaming if client.http10 => {} // it ends with the connection
            Phase::Streaming => client.out.extend_from_slice(LAST_CHUNK),
            Phase::Held { answer } => client.out.extend_from_slice(&answer),
            other => {
                client.phase = other;
                return false;
            }
        }
        self.answered(reg, id);
        true
    }

    /// A whole request: relayed by its route, handed to Python, or held
    /// while the fast path's reports wait for Python at their bound (an
    /// engine on the engine threads, with routes).
    fn dispatch(&mut self, reg: &Registration, request: WholeRequest) {
        let held_back =
            !self.parked.is_empty() || self.fast_reports >= self.config.max_fast_reports;
        if held_back && !self.routes.is_empty() {
            self.parked.push_back(request);
        } else {
            self.relay_or_hand_over(reg, request);
        }
    }

    fn relay_or_hand_over(&mut self, reg: &Registration, request: WholeRequest) {
        if let Some(request) = self.try_fast(reg, request) {
            self.emit(HttpEvent::Request {
                exchange: request.exchange,
                head: request.head,
                body: request.body,
                peer: request.peer,
            });
        }
    }

    /// Dispatch the held requests, in order, while there is room for their
    /// reports; one whose exchange ended meanwhile (its client dropped) is
    /// skipped.
    fn unpark(&mut self, reg: &Registration) {
        while self.fast_reports < self.config.max_fast_reports || self.routes.is_empty() {
            let Some(request) = self.parked.pop_front() else {
                return;
            };
            if self.exchanges.get(&request.exchange) == Some(&request.client) {
                self.relay_or_hand_over(reg, request);
            }
        }
    }

    /// Relay a request by its route, if one fits; else hand it back for Python.
    fn try_fast(&mut self, reg: &Registration, request: WholeRequest) -> Option<WholeRequest> {
        let WholeRequest {
            client,
            exchange,
            head,
            body,
            peer,
        } = request;
        let back = |head, body, peer| {
            Some(WholeRequest {
                client,
                exchange,
                head,
                body,
                peer,
            })
        };
        if self.routes.is_empty() || head.method != "POST" {
            return back(head, body, peer);
        }
        let (Some(authorization), Some(request)) = (
            head.header("authorization"),
            read_completion_request(&body, FAST_MAX_DEPTH),
        ) else {
            return back(head, body, peer);
        };
        let key = RouteKey {
            authorization: authorization.to_vec(),
            path: head.target.clone(),
            model: request.model.clone(),
            stream: request.stream,
        };
        let Some(route) = self
            .routes
            .take(&key, body.len(), request.max_tokens, Instant::now())
        else {
            return back(head, body, peer);
        };
        let Some(upstream_body) = request.upstream_body(&body, &route.upstream_model) else {
            self.routes.leave(&route);
            return back(head, body, peer);
        };
        let mut wire = Vec::with_capacity(route.request_head.len() + upstream_body.len() + 40);
        wire.extend_from_slice(&route.request_head);
        wire.extend_from_slice(
            format!("content-length: {}\r\n\r\n", upstream_body.len()).as_bytes(),
        );
        wire.extend_from_slice(&upstream_body);
        let spec = ProxySpec {
            addr: route.addr,
            tls: route.tls.clone(),
            request: Arc::from(wire),
            headers: Arc::clone(&route.headers),
            first_byte_timeout: route.first_byte_timeout,
            chunk_timeout: route.chunk_timeout,
            hold: !request.stream,
        };
        let deadline = Instant::now() + route.first_byte_timeout;
        self.fast.insert(
            exchange,
            FastExchange {
                route,
                head,
                body,
                peer,
                started_at: sys::monotonic(),
            },
        );
        self.stats.proxied += 1;
        self.stats.fast += 1;
        self.send_upstream(reg, spec, client, exchange, deadline);
        None
    }

    /// What came of a proxied request: Python's to hear, or, on the fast
    /// path, the engine's to finish (and Python's to book).
    fn proxied(&mut self, reg: &Registration, exchange: u64, outcome: ProxyOutcome) {
        let Some(fast) = self.fast.remove(&exchange) else {
            self.emit(HttpEvent::Proxied { exchange, outcome });
            return;
        };
        self.routes.leave(&fast.route);
        let route = fast.route.id;
        match outcome {
            ProxyOutcome::Relayed {
                broken,
                client_gone,
                open,
                usage,
            } => {
                let open = if open && broken.is_none() {
                    // Nothing to add: the answer goes out whole now, and is
                    // booked after (a route is only installed for an app
                    // with no budget to hold it to).
                    self.release_answer(reg, exchange);
                    false
                } else {
                    open
                };
                let outcome = ProxyOutcome::Relayed {
                    broken,
                    client_gone,
                    open,
                    usage,
                };
                self.fast_reports += 1;
                self.emit(HttpEvent::FastDone {
                    exchange,
                    route,
                    outcome,
                    body_len: fast.body.len(),
                    started_at: fast.started_at,
                });
            }
            outcome => self.emit(HttpEvent::FastFailed {
                exchange,
                route,
                outcome,
                head: fast.head,
                body: fast.body,
                peer: fast.peer,
            }),
        }
    }

    /// Answer a bad request with its error and close after the answer.
    fn refuse(&mut self, reg: &Registration, id: u64, error: &HttpError) {
        let Some(client) = self.clients.get_mut(&id) else {
            return;
        };
        let body = error_body(error);
        let headers = b"content-type: application/json\r\n";
        let length = Framing::Length(body.len() as u64);
        let mut data = response_head(error.status, headers, length, true);
        data.extend_from_slice(&body);
        client.out.extend_from_slice(&data);
        client.rbuf = Vec::new();
        client.head_parsed = 0;
        client.phase = Phase::Closing;
        client.deadline = Some(Instant::now() + self.config.request_timeout);
        client.deadline_is_idle = true;
        self.flush_client(reg, id);
    }

    /// A response is wholly queued: keep the connection for the next
    /// request, or close it once the answer is out.
    fn answered(&mut self, reg: &Registration, id: u64) {
        let Some(client) = self.clients.get_mut(&id) else {
            return;
        };
        self.exchanges.remove(&client.exchange);
        client.drain_wanted = false;
        if client.keep_alive {
            client.phase = Phase::Idle;
            client.deadline = Some(Instant::now() + self.config.idle_timeout);
            client.deadline_is_idle = true;
            self.parse_client(reg, id); // a pipelined request may be waiting
        } else {
            client.phase = Phase::Closing;
            client.deadline = None;
            self.flush_client(reg, id);
        }
    }

    /// Forget a client; Python hears of an exchange it held, and an upstream
    /// relaying to it is closed.
    fn drop_client(&mut self, reg: &Registration, id: u64) {
        let Some(client) = self.clients.remove(&id) else {
            return;
        };
        reg.unwatch(client.socket.as_raw_fd());
        if client.http10 && matches!(client.phase, Phase::Streaming | Phase::Relaying { .. }) {
            // An answer that ends with the connection: a reset, not a
            // close, or the client would take what it has for all of it.
            let _ = client.socket.set_linger(Some(Duration::ZERO));
        }
        let exchange = client.exchange;
        if self.exchanges.remove(&exchange).is_some() {
            match client.phase {
                Phase::Relaying { upstream } => self.end_relay(reg, upstream, None, true),
                Phase::Python | Phase::Streaming | Phase::Held { .. } => {
                    self.emit(HttpEvent::Gone { exchange })
                }
                _ => {}
            }
        }
    }

    // -- upstreams -----------------------------------------------------------

    /// Send `spec`'s request for `client` on a pooled connection to its
    /// address, or a new one; a connection that cannot be made is reported
    /// as a failure, and the client is Python's again.
    fn send_upstream(
        &mut self,
        reg: &Registration,
        spec: ProxySpec,
        client: u64,
        exchange: u64,
        deadline: Instant,
    ) {
        let addr = spec.addr;
        let key = pool_key(addr, spec.tls.as_ref());
        let pooled = self.idle.get_mut(&key).and_then(Vec::pop);
        let (id, reused) = match pooled {
            Some(id) => {
                self.stats.reused += 1;
                (id, true)
            }
            None => match self.connect(key, spec.tls.as_ref()) {
                Ok(id) => (id, false),
                Err(err) => {
                    if let Some(c) = self.clients.get_mut(&client) {
                        c.phase = Phase::Python;
                    }
                    let reason = format!("cannot connect to {addr}: {err}");
                    let outcome = ProxyOutcome::Failed {
                        reason,
                        timeout: false,
                    };
                    self.proxied(reg, exchange, outcome);
                    return;
                }
            },
        };
        let up = self.upstreams.get_mut(&id).expect("pooled or new");
        up.phase = if reused {
            UpPhase::Exchanging
        } else {
            UpPhase::Connecting
        };
        up.spec = spec;
        up.sent = 0;
        up.rbuf.clear();
        up.client = client;
        up.exchange = exchange;
        up.reused = reused;
        up.received = false;
        up.head = None;
        up.content_type = None;
        up.relaying = false;
        up.chunked_out = false;
        up.kept.clear();
        up.framing = Framing::UntilClose;
        up.usage = UsageScan::default();
        up.bytes_out = 0;
        up.first_byte_at = 0.0;
        up.deadline = Some(deadline);
        if let Some(c) = self.clients.get_mut(&client) {
            c.phase = Phase::Relaying { upstream: id };
        }
        self.upstream_progress(reg, id);
    }

    fn connect(&mut self, key: PoolKey, tls: Option<&UpstreamTls>) -> io::Result<u64> {
        let addr = key.0;
        let link = match tls {
            Some(t) => Some(TlsLink::new(
                tls::connect(Arc::clone(&t.config), &t.server_name)
                    .map_err(|e| io::Error::other(e.to_string()))?,
            )),
            None => None,
        };
        // socket2 sets close-on-exec on the sockets it makes.
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        socket.set_nonblocking(true)?;
        socket.set_tcp_nodelay(true)?;
        match socket.connect(&addr.into()) {
            Ok(()) => {}
            Err(err) if err.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(err) => return Err(err),
        }
        let id = self.id();
        self.upstreams.insert(
            id,
            Upstream {
                socket,
                interest: 0,
                key,
                addr,
                tls: link,
                phase: UpPhase::Connecting,
                spec: ProxySpec::idle(addr),
                sent: 0,
                rbuf: Vec::new(),
                client: 0,
                exchange: 0,
                reused: false,
                received: false,
                head: None,
                content_type: None,
                relaying: false,
                chunked_out: false,
                kept: Vec::new(),
                framing: Framing::UntilClose,
                usage: UsageScan::default(),
                bytes_out: 0,
                first_byte_at: 0.0,
                deadline: None,
            },
        );
        Ok(id)
    }

    fn update_upstream(&mut self, reg: &Registration, id: u64) {
        let Some(up) = self.upstreams.get_mut(&id) else {
            return;
        };
        let want = match up.phase {
            UpPhase::Connecting => WRITABLE,
            UpPhase::Idle => READABLE,
            UpPhase::Exchanging => {
                let unsent = up.tls.as_ref().is_some_and(TlsLink::wants_write);
                let sending = if up.sent < up.spec.request.len() || unsent {
                    WRITABLE
                } else {
                    0
                };
                // A client that does not read holds its upstream back.
                let backlog = self.clients.get(&up.client).map_or(0, |c| c.out.len());
                let reading = if backlog < HIGH_WATER { READABLE } else { 0 };
                sending | reading
            }
        };
        reg.set_interest(up.socket.as_raw_fd(), id, &mut up.interest, want);
    }

    fn upstream_ready(&mut self, reg: &Registration, id: u64, flags: u32) {
        let Some(up) = self.upstreams.get_mut(&id) else {
            return;
        };
        if up.phase == UpPhase::Idle {
            // An idle pooled connection that speaks or closes is done with.
            self.close_upstream(reg, id);
            return;
        }
        if up.phase == UpPhase::Connecting {
            if flags & (WRITABLE | BROKEN) == 0 {
                return;
            }
            match up.socket.take_error() {
                Ok(None) => up.phase = UpPhase::Exchanging,
                Ok(Some(err)) | Err(err) => {
                    let reason = format!("cannot connect to {}: {err}", up.addr);
                    self.fail_upstream(reg, id, reason, false);
                    return;
                }
            }
        }
        self.upstream_progress(reg, id);
        if flags & (READABLE | BROKEN) != 0 {
            self.read_upstream(reg, id);
        }
    }

    /// Send what is left of the request.
    fn upstream_progress(&mut self, reg: &Registration, id: u64) {
        let Some(up) = self.upstreams.get_mut(&id) else {
            return;
        };
        if up.phase == UpPhase::Exchanging {
            let rest = &up.spec.request[up.sent..];
            match transmit(&up.socket, up.tls.as_mut(), rest) {
                Ok(n) => up.sent += n,
                Err(err) => {
                    self.upstream_lost(reg, id, format!("sending the request failed: {err}"));
                    return;
                }
            }
        }
        self.update_upstream(reg, id);
    }

    fn read_upstream(&mut self, reg: &Registration, id: u64) {
        let Some(up) = self.upstreams.get_mut(&id) else {
            return;
        };
        if up.phase != UpPhase::Exchanging {
            return;
        }
        match receive(&up.socket, up.tls.as_mut(), &mut up.rbuf) {
            Ok(0) => {
                let until_close = up.head.as_ref().is_some_and(|(_, d, _)| d.until_close());
                if up.tls.as_ref().is_some_and(TlsLink::cut_short) {
                    let why = "the upstream's TLS stream ended without close_notify";
                    self.upstream_lost(reg, id, why.into());
                } else if until_close {
                    self.upstream_body(reg, id, true);
                } else {
                    self.upstream_lost(reg, id, "the upstream closed the connection".into());
                }
                return;
            }
            Ok(_) => up.received = true,
            Err(err) if sys::would_block(&err) => return,
            Err(err) => {
                self.upstream_lost(reg, id, format!("reading the answer failed: {err}"));
                return;
            }
        }
        if up.head.is_none() {
            loop {
                match parse_response(&up.rbuf, MAX_UPSTREAM_HEAD) {
                    Ok(None) => return self.update_upstream(reg, id),
                    Ok(Some(head)) if (100..200).contains(&head.status) => {
                        up.rbuf.drain(..head.length); // interim: skip it
                    }
                    Ok(Some(head)) => {
                        up.rbuf.drain(..head.length);
                        up.first_byte_at = sys::monotonic();
                        up.content_type = head.header("content-type").map(<[u8]>::to_vec);
                        let decoder = BodyDecoder::new(head.framing);
                        up.head = Some((head.status, decoder, head.keep_alive));
                        up.framing = head.framing;
                        if head.status == 200 && !up.spec.hold {
                            self.start_relay(id, head.framing);
                        }
                        break;
                    }
                    Err(err) => {
                        let reason = format!("unreadable answer: {}", err.message);
                        self.fail_upstream(reg, id, reason, false);
                        return;
                    }
                }
            }
        }
        self.upstream_body(reg, id, false);
    }

    /// The 200 answer's head for the client; the upstream is relaying from now on.
    fn relay_head(&mut self, id: u64, framing: Framing) -> Vec<u8> {
        let Some(up) = self.upstreams.get_mut(&id) else {
            return Vec::new();
        };
        up.relaying = true;
        let client = self.clients.get_mut(&up.client);
        let framing = match framing {
            Framing::Length(n) => Framing::Length(n),
            _ => client.map_or(Framing::Chunked, Client::streamed),
        };
        let keep_alive = self.clients.get(&up.client).is_some_and(|c| c.keep_alive);
        up.chunked_out = !matches!(framing, Framing::Length(_));
        let mut headers = Vec::with_capacity(64 + up.spec.headers.len());
        if let Some(ct) = &up.content_type {
            headers.extend_from_slice(b"content-type: ");
            headers.extend_from_slice(ct);
            headers.extend_from_slice(b"\r\n");
        }
        headers.extend_from_slice(&up.spec.headers);
        response_head(200, &headers, framing, !keep_alive)
    }

    /// Relaying starts: the head goes to the client.
    fn start_relay(&mut self, id: u64, framing: Framing) {
        let head = self.relay_head(id, framing);
        let client = self.upstreams.get(&id).map(|up| up.client);
        if let Some(client) = client.and_then(|c| self.clients.get_mut(&c)) {
            client.out.extend_from_slice(&head);
        }
    }

    /// Decode what came of the body: relay it, or keep it for a refusal.
    fn upstream_body(&mut self, reg: &Registration, id: u64, eof: bool) {
        let Some(up) = self.upstreams.get_mut(&id) else {
            return;
        };
        let Some((status, decoder, keep_alive)) = up.head.as_mut() else {
            return;
        };
        let mut piece = Vec::new();
        let used = match decoder.decode(&up.rbuf, &mut piece) {
            Ok(used) => used,
            Err(err) => {
                let reason = format!("the upstream broke its framing: {}", err.message);
                self.upstream_lost(reg, id, reason);
                return;
            }
        };
        up.rbuf.drain(..used);
        let done = decoder.done() || eof;
        let (status, keep_alive) = (*status, *keep_alive && !eof);
        up.deadline = Some(Instant::now() + up.spec.chunk_timeout);
        if status == 200 && !up.relaying {
            // Held until whole, so that a failure before its end can still
            // go to another upstream; past MAX_HOLD it is relayed as it comes.
            up.kept.extend_from_slice(&piece);
            if !done && up.kept.len() <= MAX_HOLD {
                self.update_upstream(reg, id);
                return;
            }
            piece = std::mem::take(&mut up.kept);
            if done {
                up.usage.absorb(&piece);
                up.bytes_out = piece.len() as u64;
                let client_id = up.client;
                let mut answer = self.relay_head(id, Framing::Length(piece.len() as u64));
                answer.extend_from_slice(&piece);
                if let Some(client) = self.clients.get_mut(&client_id) {
                    client.phase = Phase::Held { answer };
                }
                self.end_relay(reg, id, None, false);
                self.release_upstream(reg, id, keep_alive);
                return;
            }
            let framing = up.framing;
            self.start_relay(id, framing);
        }
        let up = self.upstreams.get_mut(&id).expect("still here");
        if up.relaying {
            up.usage.absorb(&piece);
            up.bytes_out += piece.len() as u64;
            let chunked = up.chunked_out;
            let client_id = up.client;
            if let Some(client) = self.clients.get_mut(&client_id) {
                if chunked {
                    client.push_piece(&piece);
                    if done {
                        // Its last chunk waits for Python's `finish`, once
                        // the cost is booked.
                        client.phase = Phase::Streaming;
                    }
                } else {
                    client.out.extend_from_slice(&piece);
                }
            }
            if done {
                self.end_relay(reg, id, None, false);
                self.release_upstream(reg, id, keep_alive);
                let whole = self
                    .clients
                    .get(&client_id)
                    .is_some_and(|c| matches!(c.phase, Phase::Relaying { .. }));
                if whole {
                    self.answered(reg, client_id);
                } else {
                    self.flush_client(reg, client_id);
                }
            } else {
                self.flush_client(reg, client_id);
                self.update_upstream(reg, id);
            }
            return;
        }
        let room = MAX_ERROR_BODY.saturating_sub(up.kept.len());
        up.kept.extend_from_slice(&piece[..piece.len().min(room)]);
        let full = piece.len() > room;
        if done || full {
            let exchange = up.exchange;
            let outcome = ProxyOutcome::Refused {
                status,
                body: std::mem::take(&mut up.kept),
                content_type: up.content_type.take(),
            };
            let client = up.client;
            self.release_upstream(reg, id, keep_alive && !full);
            if let Some(c) = self.clients.get_mut(&client) {
                c.phase = Phase::Python;
            }
            self.proxied(reg, exchange, outcome);
        } else {
            self.update_upstream(reg, id);
        }
    }

    /// The upstream failed: before its answer began that is a failure Python
    /// may retry elsewhere (or, on a stale pooled connection, one the
    /// engine retries on a new one); after, a broken relay.
    fn upstream_lost(&mut self, reg: &Registration, id: u64, reason: String) {
        let Some(up) = self.upstreams.get(&id) else {
            return;
        };
        if up.relaying {
            self.end_relay(reg, id, Some(reason), false);
            self.close_upstream(reg, id);
            return;
        }
        if up.reused && !up.received {
            // The server closed a kept-alive connection as we reused it:
            // the request did not reach it, so send it on a new one.
            let (spec, client, exchange) = (up.spec.clone(), up.client, up.exchange);
            let deadline = up.deadline.unwrap_or_else(Instant::now);
            self.close_upstream(reg, id);
            self.send_upstream(reg, spec, client, exchange, deadline);
            return;
        }
        self.fail_upstream(reg, id, reason, false);
    }

    /// Report a failure before the answer began; the client is Python's again.
    fn fail_upstream(&mut self, reg: &Registration, id: u64, reason: String, timeout: bool) {
        let Some(up) = self.upstreams.get(&id) else {
            return;
        };
        let (client, exchange) = (up.client, up.exchange);
        self.close_upstream(reg, id);
        if let Some(c) = self.clients.get_mut(&client) {
            c.phase = Phase::Python;
        }
        self.proxied(reg, exchange, ProxyOutcome::Failed { reason, timeout });
    }

    /// Report a relay's end (whole, broken, or its client gone).
    fn end_relay(
        &mut self,
        reg: &Registration,
        id: u64,
        broken: Option<String>,
        client_gone: bool,
    ) {
        let Some(up) = self.upstreams.get_mut(&id) else {
            return;
        };
        if up.exchange == 0 {
            return; // already reported
        }
        let usage = Usage {
            tokens_in: up.usage.tokens_in,
            tokens_out: up.usage.tokens_out,
            bytes_out: up.bytes_out,
            first_byte_at: up.first_byte_at,
        };
        let (exchange, client_id, chunked) = (up.exchange, up.client, up.chunked_out);
        up.relaying = false;
        up.exchange = 0;
        if broken.is_some() && self.clients.contains_key(&client_id) {
            if chunked {
                let client = self.clients.get_mut(&client_id).expect("checked");
                client.phase = Phase::Streaming; // Python ends it in words
            } else {
                self.drop_client(reg, client_id);
            }
        }
        let open = self
            .clients
            .get(&client_id)
            .is_some_and(|c| matches!(c.phase, Phase::Streaming | Phase::Held { .. }));
        if client_gone || broken.is_some() {
            self.close_upstream(reg, id);
        }
        let outcome = ProxyOutcome::Relayed {
            broken,
            client_gone,
            open,
            usage,
        };
        self.proxied(reg, exchange, outcome);
    }

    /// Back to the pool when it can carry another request, else closed.
    fn release_upstream(&mut self, reg: &Registration, id: u64, reusable: bool) {
        let max_idle = self.config.max_idle_per_upstream;
        let idle_for = self.config.upstream_idle;
        let Some(up) = self.upstreams.get_mut(&id) else {
            return;
        };
        // A backend may answer before it read the whole request (a large
        // body refused early): the rest would be read as the next request.
        let request_sent =
            up.sent == up.spec.request.len() && !up.tls.as_ref().is_some_and(TlsLink::wants_write);
        let pool = self.idle.entry(up.key.clone()).or_default();
        if !reusable || !request_sent || !up.rbuf.is_empty() || pool.len() >= max_idle {
            self.close_upstream(reg, id);
            return;
        }
        up.phase = UpPhase::Idle;
        up.client = 0;
        up.exchange = 0;
        up.spec = ProxySpec::idle(up.addr);
        up.deadline = Some(Instant::now() + idle_for);
        if up.rbuf.capacity() > 4 * READ_SIZE {
            up.rbuf = Vec::new();
        }
        pool.push(id);
        self.update_upstream(reg, id);
    }

    fn close_upstream(&mut self, reg: &Registration, id: u64) {
        let Some(up) = self.upstreams.remove(&id) else {
            return;
        };
        reg.unwatch(up.socket.as_raw_fd());
        if let Some(pool) = self.idle.get_mut(&up.key) {
            pool.retain(|&other| other != id);
            if pool.is_empty() {
                self.idle.remove(&up.key);
            }
        }
    }

    // -- time ----------------------------------------------------------------

    fn expire(&mut self, reg: &Registration, now: Instant) {
        self.routes.expire(now);
        let request_timeout = self.config.request_timeout;
        let late_clients: Vec<u64> = self
            .clients
            .iter()
            .filter(|(_, c)| {
                c.deadline.is_some_and(|d| d <= now)
                    || c.stalled_since
                        .is_some_and(|s| now.duration_since(s) >= request_timeout)
            })
            .map(|(&id, _)| id)
            .collect();
        for id in late_clients {
            let Some(client) = self.clients.get(&id) else {
                continue;
            };
            let stalled = client
                .stalled_since
                .is_some_and(|s| now.duration_since(s) >= request_timeout);
            if stalled || client.deadline_is_idle {
                self.drop_client(reg, id);
            } else {
                self.refuse(reg, id, &HttpError::new(408, "request took too long"));
            }
        }
        let late_upstreams: Vec<u64> = self
            .upstreams
            .iter()
            .filter(|(_, u)| u.deadline.is_some_and(|d| d <= now))
            .map(|(&id, _)| id)
            .collect();
        for id in late_upstreams {
            let Some(up) = self.upstreams.get(&id) else {
                continue;
            };
            // Paused by its client's backlog, the upstream's silence is the
            // client's doing: its own stall clock judges it.
            let held_back = self
                .clients
                .get(&up.client)
                .is_some_and(|c| c.out.len() >= HIGH_WATER);
            match (up.phase, up.relaying) {
                (UpPhase::Idle, _) => self.close_upstream(reg, id),
                (_, true) if held_back => {
                    self.stats.held_back += 1;
                    let chunk_timeout = up.spec.chunk_timeout;
                    if let Some(up) = self.upstreams.get_mut(&id) {
                        up.deadline = Some(now + chunk_timeout);
                    }
                }
                (_, true) => {
                    let reason =
                        format!("the upstream sent nothing for {:?}", up.spec.chunk_timeout);
                    self.end_relay(reg, id, Some(reason), false);
                    self.close_upstream(reg, id);
                }
                (_, false) => {
                    let reason = format!("no answer within {:?}", up.spec.first_byte_timeout);
                    self.fail_upstream(reg, id, reason, true);
                }
            }
        }
    }
}
