//! End-to-end tests of the tunnel engine: two [`Engine`]s talking over a Unix
//! socketpair (the "tunnel"), with plain socketpairs standing in for the
//! sockets of natively relayed streams.
//!
//! Covered:
//!
//! * reliable frames: order, exact payloads, `recv_next`, and the lone ACK
//!   sent after `ack_delay` that lets the sender drop its retained frames;
//! * PING answered with PONG by the engine itself, never shown to Python;
//! * native relay both ways (credit and WINDOW, since the payload is larger
//!   than the window), clean end on both sides after both half-closes;
//! * the `to_socket` handover and the takeover of frames still queued;
//! * flow-control violation (RESET code 4 sent back) and a peer's RESET;
//! * Postgres taps (records, batching delay) and a scanner rejecting bytes;
//! * resumption over a new connection: retained frames resent, delivered
//!   exactly once;
//! * `abort_native`.
//!
//! Every wait is bounded (see [`DEADLINE`]) and panics with what was seen.

use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use qmesh_pg as pg;
use qmesh_relay::{
    monotonic, Config, Ending, Engine, Error, Event, Heartbeat, NativeSpec, Notifier, Outcome,
    PgError, PgTap, Side, Stats, TapRecord, Violation,
};
use qmesh_wire::frame_type::{ACK, CLOSE, DATA, OPEN, PING, RESET, WINDOW};
use qmesh_wire::{DecoderConfig, EncoderConfig, FrameDecoder, FrameEncoder};

/// Every wait gives up (and fails the test) after this long.
const DEADLINE: Duration = Duration::from_secs(5);
/// How long "nothing more arrives" is watched for.
const SETTLE: Duration = Duration::from_millis(100);
/// Window and initial credit of the native streams, unless a test says otherwise.
const WINDOW_SIZE: u64 = 256 << 10;

/// A frame as `Engine::send` takes it.
type OutFrame = (u8, u32, Bytes);
/// A frame as the tests compare them: type, stream, payload.
type SeenFrame = (u8, u32, Vec<u8>);

// -- helpers: engines and sockets ------------------------------------------

fn config() -> Config {
    Config {
        ack_every: 32,
        ack_delay: Duration::from_millis(10),
        max_unacked: 64 << 20,
        read_size: 256 << 10,
        chunk_size: 64 << 10,
        tap_delay: Duration::from_millis(20),
        tap_batch: 256,
        heartbeat: None,
    }
}

/// A 32-byte key; each direction of each connection gets its own `tag`.
fn key(tag: u8) -> [u8; 32] {
    let mut key = [tag; 32];
    key[0] = 0xA5;
    key
}

fn encoder(key: &[u8; 32], reliable_seq: u64) -> FrameEncoder {
    let config = EncoderConfig {
        reliable_seq,
        ..EncoderConfig::default()
    };
    FrameEncoder::new(key, config).expect("encoder")
}

fn decoder(key: &[u8; 32], reliable_seq: u64) -> FrameDecoder {
    let config = DecoderConfig {
        reliable_seq,
        ..DecoderConfig::default()
    };
    FrameDecoder::new(key, config).expect("decoder")
}

/// A connected pair, both ends non-blocking (what the engine is given).
fn nonblocking_pair() -> (UnixStream, UnixStream) {
    let (x, y) = UnixStream::pair().expect("socketpair");
    x.set_nonblocking(true).expect("nonblocking");
    y.set_nonblocking(true).expect("nonblocking");
    (x, y)
}

/// Two engines joined by a tunnel socketpair, plus every socket they borrow.
///
/// Field order matters: the engines are dropped (and stop watching their
/// descriptors) before the sockets they borrow are closed.
struct Link {
    a: Engine,
    b: Engine,
    /// Sockets an engine borrows, by descriptor: kept open until released.
    borrowed: RefCell<Vec<UnixStream>>,
}

impl Link {
    /// A attaches with (A→B, B→A) keys, B with the mirror image.
    fn new() -> Link {
        Link::with_notifiers(None, None)
    }

    fn with_notifiers(a: Option<(Arc<Notifier>, u64)>, b: Option<(Arc<Notifier>, u64)>) -> Link {
        Link::with_configs(config(), a, b)
    }

    /// A with `config_a`, B with the tests' usual one.
    fn with_configs(
        config_a: Config,
        a: Option<(Arc<Notifier>, u64)>,
        b: Option<(Arc<Notifier>, u64)>,
    ) -> Link {
        let link = Link {
            a: Engine::new(config_a, a).expect("engine A"),
            b: Engine::new(config(), b).expect("engine B"),
            borrowed: RefCell::new(Vec::new()),
        };
        link.connect(&key(1), &key(2), 0, 0);
        link
    }

    /// Attach both engines over a fresh socketpair. A's encoder starts at
    /// `a_seq` (its oldest unacknowledged frame), B's at `b_seq`; each
    /// decoder starts at its own engine's `recv_next`.
    fn connect(&self, key_ab: &[u8; 32], key_ba: &[u8; 32], a_seq: u64, b_seq: u64) {
        let (fd_a, fd_b) = self.tunnel_sockets();
        let (a_recv, b_recv) = (self.a.stats().recv_next, self.b.stats().recv_next);
        self.a
            .attach(fd_a, encoder(key_ab, a_seq), decoder(key_ba, a_recv), &[])
            .expect("attach A");
        self.b
            .attach(fd_b, encoder(key_ba, b_seq), decoder(key_ab, b_recv), &[])
            .expect("attach B");
    }

    /// A tunnel socketpair: both ends kept here, their descriptors returned.
    fn tunnel_sockets(&self) -> (RawFd, RawFd) {
        let (x, y) = nonblocking_pair();
        let fds = (x.as_raw_fd(), y.as_raw_fd());
        self.borrowed.borrow_mut().extend([x, y]);
        fds
    }

    /// A socket for a native stream: the engine's end is kept here (borrowed
    /// by descriptor), the application's end is returned, blocking.
    fn native_socket(&self) -> (RawFd, UnixStream) {
        let (engine_side, app_side) = nonblocking_pair();
        app_side.set_nonblocking(false).expect("blocking");
        let fd = engine_side.as_raw_fd();
        self.borrowed.borrow_mut().push(engine_side);
        (fd, app_side)
    }

    /// Close a borrowed socket, as Python does once the engine has let go
    /// of it (after `Ended`, `abort_native` or `detach`).
    fn release(&self, fd: RawFd) {
        let mut borrowed = self.borrowed.borrow_mut();
        let index = borrowed
            .iter()
            .position(|s| s.as_raw_fd() == fd)
            .expect("a borrowed socket");
        drop(borrowed.remove(index));
    }
}

/// A native stream spec with the defaults these tests use.
fn native(stream_id: u32, fd: RawFd) -> NativeSpec {
    NativeSpec {
        stream_id,
        fd,
        to_socket: Vec::new(),
        credit: WINDOW_SIZE,
        window: WINDOW_SIZE,
        consumed: 0,
        eof_received: false,
        end_on_socket_eof: false,
        tap: PgTap::default(),
        tls: None,
        pooled: None,
        audit: None,
    }
}

fn frame(frame_type: u8, stream_id: u32, payload: &[u8]) -> OutFrame {
    (frame_type, stream_id, Bytes::copy_from_slice(payload))
}

fn reset_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(reason.as_bytes());
    payload
}

/// Deterministic pseudo-random bytes (xorshift64*), so a failure reproduces.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A Postgres frontend message: type byte, `i32` length (counting itself), body.
fn pg_message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut msg = vec![tag];
    msg.extend_from_slice(&(4 + body.len() as i32).to_be_bytes());
    msg.extend_from_slice(body);
    msg
}

/// A Query message for `sql`.
fn pg_query(sql: &str) -> Vec<u8> {
    let mut body = sql.as_bytes().to_vec();
    body.push(0);
    pg_message(b'Q', &body)
}

// -- helpers: events -------------------------------------------------------

/// What one engine handed up to "Python", accumulated over `take()` calls.
struct Inbox<'e> {
    engine: &'e Engine,
    events: Vec<Event>,
}

impl<'e> Inbox<'e> {
    fn new(engine: &'e Engine) -> Inbox<'e> {
        Inbox {
            engine,
            events: Vec::new(),
        }
    }

    /// Take what is waiting. A connection error fails the test: none of
    /// these scenarios should break the tunnel.
    fn poll(&mut self) {
        let (events, error): (Vec<Event>, Option<Error>) = self.engine.take();
        self.events.extend(events);
        if let Some(error) = error {
            panic!(
                "unexpected connection error {error:?}; events so far: {:#?}",
                self.events
            );
        }
    }

    /// Poll (every millisecond) until `done` holds over everything taken so
    /// far; panic after [`DEADLINE`].
    fn wait_until(&mut self, what: &str, done: impl Fn(&[Event]) -> bool) {
        let start = Instant::now();
        loop {
            self.poll();
            if done(&self.events) {
                return;
            }
            if start.elapsed() > DEADLINE {
                panic!("timed out waiting for {what}; events: {:#?}", self.events);
            }
            thread::sleep(Duration::from_millis(1));
        }
    }

    /// Poll for [`SETTLE`] and return what arrived meanwhile (for "nothing
    /// more" checks).
    fn settle(&mut self) -> &[Event] {
        let before = self.events.len();
        let start = Instant::now();
        while start.elapsed() < SETTLE {
            self.poll();
            thread::sleep(Duration::from_millis(1));
        }
        &self.events[before..]
    }

    fn frames(&self) -> Vec<SeenFrame> {
        frames(&self.events)
    }

    fn ended(&self, stream_id: u32) -> Option<&Outcome> {
        ended(&self.events, stream_id)
    }

    fn tap_records(&self, stream_id: u32) -> Vec<TapRecord> {
        tap_records(&self.events, stream_id)
    }
}

fn frames(events: &[Event]) -> Vec<SeenFrame> {
    events
        .iter()
        .filter_map(|event| match event {
            Event::Frame {
                frame_type,
                stream_id,
                payload,
            } => Some((*frame_type, *stream_id, payload.to_vec())),
            _ => None,
        })
        .collect()
}

fn ended(events: &[Event], sid: u32) -> Option<&Outcome> {
    events.iter().find_map(|event| match event {
        Event::Ended { stream_id, outcome } if *stream_id == sid => Some(outcome),
        _ => None,
    })
}

fn tap_records(events: &[Event], sid: u32) -> Vec<TapRecord> {
    events
        .iter()
        .filter_map(|event| match event {
            Event::Tap { stream_id, records } if *stream_id == sid => Some(records.clone()),
            _ => None,
        })
        .flatten()
        .collect()
}

/// Poll `engine.stats()` until `done` holds; panic after [`DEADLINE`].
fn wait_stats(engine: &Engine, what: &str, done: impl Fn(&Stats) -> bool) -> Stats {
    let start = Instant::now();
    loop {
        let stats = engine.stats();
        if done(&stats) {
            return stats;
        }
        if start.elapsed() > DEADLINE {
            panic!("timed out waiting for {what}; stats: {stats:#?}");
        }
        thread::sleep(Duration::from_millis(1));
    }
}

/// Read from a blocking socket until `len` bytes came or it reached EOF,
/// giving up (with what was read) after [`DEADLINE`].
fn read_up_to(socket: &UnixStream, len: usize) -> Vec<u8> {
    socket
        .set_read_timeout(Some(DEADLINE))
        .expect("read timeout");
    let mut out = vec![0; len];
    let mut got = 0;
    while got < len {
        match (&*socket).read(&mut out[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => panic!("read after {got} of {len} bytes: {err}"),
        }
    }
    out.truncate(got);
    out
}

/// Everything a blocking socket delivers until EOF (bounded by [`DEADLINE`]).
fn read_to_eof(socket: &UnixStream) -> Vec<u8> {
    socket
        .set_read_timeout(Some(DEADLINE))
        .expect("read timeout");
    let mut out = Vec::new();
    (&*socket).read_to_end(&mut out).expect("read to EOF");
    out
}

// -- tests -----------------------------------------------------------------

/// Reliable frames arrive in order with exact payloads; B acknowledges on
/// its own (a lone ACK after `ack_delay`) although it sends nothing else.
#[test]
fn reliable_frames_arrive_in_order_and_are_acknowledged() {
    let link = Link::new();
    let sent = vec![
        frame(OPEN, 1, b"service=pg"),
        frame(DATA, 1, b"first"),
        frame(DATA, 1, &noise(1, 5000)),
        frame(DATA, 1, b""),
        frame(DATA, 1, b"last"),
    ];
    let expected: Vec<SeenFrame> = sent.iter().map(|(t, s, p)| (*t, *s, p.to_vec())).collect();
    link.a.send(sent);
    assert_eq!(link.a.stats().send_next, 5);

    let mut b = Inbox::new(&link.b);
    b.wait_until("five frames at B", |events| frames(events).len() >= 5);
    assert_eq!(b.frames(), expected);
    assert_eq!(b.events.len(), 5, "only the frames: {:#?}", b.events);
    assert_eq!(link.b.stats().recv_next, 5);

    let a_stats = wait_stats(&link.a, "A's frames acknowledged", |s| {
        s.retained_frames == 0
    });
    assert_eq!(a_stats.retained_bytes, 0);
    assert_eq!(a_stats.send_next, 5);
    assert_eq!(a_stats.recv_next, 0);

    // The ACK is a control frame: B's counters do not move, A shows nothing.
    let mut a = Inbox::new(&link.a);
    assert!(a.settle().is_empty(), "A got {:#?}", a.events);
    let (a_stats, b_stats) = (link.a.stats(), link.b.stats());
    assert_eq!(b_stats.send_next, 0);
    assert_eq!(b_stats.retained_frames, 0);
    assert!(a_stats.attached && b_stats.attached);
    assert_eq!(a_stats.bytes_sent, b_stats.bytes_received);
    assert_eq!(b_stats.bytes_sent, a_stats.bytes_received);
    assert!(b_stats.bytes_sent > 0, "B sent no ACK");
}

/// Engines sharing a notifier post their own keys, each once until taken,
/// and only the engine with events posts.
#[test]
fn a_shared_notifier_names_the_engines_with_events() {
    let notifier = Arc::new(Notifier::new().expect("notifier"));
    let link = Link::with_notifiers(Some((notifier.clone(), 11)), Some((notifier.clone(), 22)));
    link.a.send(vec![frame(OPEN, 1, b"one")]);
    link.a.send(vec![frame(OPEN, 3, b"two")]);
    let start = Instant::now();
    let mut keys = Vec::new();
    while keys.is_empty() && start.elapsed() < DEADLINE {
        keys = notifier.take();
        thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(keys, vec![22]);
    let mut inbox = Inbox::new(&link.b);
    inbox.wait_until("both OPENs", |events| frames(events).len() == 2);
    // B was posted once for both frames (or again for the second, after a
    // take): never while its first post was untaken.
    let again = notifier.take();
    assert!(again.iter().all(|key| *key == 22), "{again:?}");
    assert!(inbox.settle().is_empty());
}

/// A's heartbeat PINGs B; B's engine answers, A's engine takes the round
/// trip from the PONG. Neither Python sees a frame of it.
#[test]
fn heartbeats_are_the_engines_alone() {
    let beating = Config {
        heartbeat: Some(Heartbeat {
            every: Duration::from_millis(20),
            dead_after: DEADLINE,
        }),
        ..config()
    };
    let link = Link::with_configs(beating, None, None);
    assert_eq!(link.a.stats().rtt, None);
    let start = Instant::now();
    let rtt = loop {
        if let Some(rtt) = link.a.stats().rtt {
            break rtt;
        }
        assert!(start.elapsed() < DEADLINE, "no round trip at A");
        thread::sleep(Duration::from_millis(1));
    };
    assert!(rtt > Duration::ZERO && rtt < DEADLINE, "{rtt:?}");
    assert_eq!(link.b.stats().rtt, None, "B has no heartbeat of its own");
    for engine in [&link.a, &link.b] {
        let mut inbox = Inbox::new(engine);
        assert!(inbox.settle().is_empty(), "Python saw {:#?}", inbox.events);
        // Control frames are neither counted nor retained.
        let stats = engine.stats();
        assert_eq!(
            (stats.send_next, stats.recv_next, stats.retained_frames),
            (0, 0, 0)
        );
    }
}

/// 4 MiB each way through native streams at both ends (16 windows' worth,
/// so credit must come back in WINDOW frames), then a clean end.
#[test]
fn native_relay_both_ways_and_clean_end() {
    const SIZE: usize = 4 << 20;
    let link = Link::new();
    let (sock_a, app_a) = link.native_socket();
    let (sock_b, srv_b) = link.native_socket();
    link.a.attach_native(native(1, sock_a)).expect("native A");
    link.b.attach_native(native(1, sock_b)).expect("native B");

    let to_b = noise(0xAB, SIZE);
    let to_a = noise(0xBA, SIZE);
    let writer = |socket: &UnixStream, data: Vec<u8>| {
        let mut socket = socket.try_clone().expect("clone");
        // A stalled relay fails the write instead of hanging the test.
        socket
            .set_write_timeout(Some(DEADLINE))
            .expect("write timeout");
        thread::spawn(move || socket.write_all(&data).expect("write"))
    };
    let reader = |socket: &UnixStream| {
        let socket = socket.try_clone().expect("clone");
        thread::spawn(move || read_up_to(&socket, SIZE))
    };
    let writers = [writer(&app_a, to_b.clone()), writer(&srv_b, to_a.clone())];
    let at_b = reader(&srv_b);
    let at_a = reader(&app_a);
    let (at_b, at_a) = (
        at_b.join().expect("reader B"),
        at_a.join().expect("reader A"),
    );
    for w in writers {
        w.join().expect("writer");
    }
    assert_eq!(at_b.len(), SIZE, "A → B delivered {} bytes", at_b.len());
    assert!(at_b == to_b, "A → B bytes differ");
    assert_eq!(at_a.len(), SIZE, "B → A delivered {} bytes", at_a.len());
    assert!(at_a == to_a, "B → A bytes differ");

    // Half-close both applications: each EOF crosses as CLOSE and is passed on.
    app_a.shutdown(Shutdown::Write).expect("shutdown A");
    srv_b.shutdown(Shutdown::Write).expect("shutdown B");
    assert_eq!(read_to_eof(&srv_b), b"");
    assert_eq!(read_to_eof(&app_a), b"");

    for (name, engine) in [("A", &link.a), ("B", &link.b)] {
        let mut inbox = Inbox::new(engine);
        inbox.wait_until("Ended for stream 1", |events| ended(events, 1).is_some());
        let outcome = inbox.ended(1).expect("checked");
        assert_eq!(outcome.ending, Ending::Clean, "{name}");
        assert!(
            outcome.eof_sent && outcome.eof_received,
            "{name}: {outcome:?}"
        );
        // Every byte was written out, so all but less than half a window of
        // credit came back before the peer's CLOSE.
        assert!(
            outcome.credit > WINDOW_SIZE / 2 && outcome.credit <= WINDOW_SIZE,
            "{name}: credit {}",
            outcome.credit
        );
        // No stray frames for the stream reached Python.
        assert_eq!(inbox.frames(), Vec::<SeenFrame>::new(), "{name}");
        assert_eq!(engine.stats().native_streams, 0, "{name}");
    }
}

/// Bytes handed over with the stream go first, then frames that were still
/// queued for Python (taken over by `attach_native`), then live ones.
#[test]
fn to_socket_and_queued_frames_are_written_first() {
    let link = Link::new();
    link.a
        .send(vec![frame(OPEN, 5, b""), frame(DATA, 5, b"-queued")]);
    // Arrived and queued at B, but not taken by its Python yet.
    wait_stats(&link.b, "B received the queued frames", |s| {
        s.recv_next == 2
    });

    let (sock_b, srv_b) = link.native_socket();
    let spec = NativeSpec {
        to_socket: b"early".to_vec(),
        ..native(5, sock_b)
    };
    link.b.attach_native(spec).expect("native B");
    link.a.send(vec![frame(DATA, 5, b"-live")]);

    let expected = b"early-queued-live";
    assert_eq!(read_up_to(&srv_b, expected.len()), expected);

    // Python still gets the OPEN; the DATA frames were the engine's.
    let mut b = Inbox::new(&link.b);
    b.settle();
    assert_eq!(b.frames(), vec![(OPEN, 5, Vec::new())]);
    assert!(b.ended(5).is_none(), "{:#?}", b.events);
    assert_eq!(link.b.stats().native_streams, 1);
}

/// DATA beyond the window granted: the stream ends with a protocol error,
/// the peer is sent RESET(PROTOCOL_ERROR = 4), the socket gets nothing.
#[test]
fn flow_control_violation_resets_the_stream() {
    let link = Link::new();
    let (sock_b, srv_b) = link.native_socket();
    let spec = NativeSpec {
        window: 1024,
        credit: 777,
        ..native(3, sock_b)
    };
    link.b.attach_native(spec).expect("native B");
    link.a.send(vec![frame(DATA, 3, &noise(3, 2048))]);

    let mut b = Inbox::new(&link.b);
    b.wait_until("Ended for stream 3", |events| ended(events, 3).is_some());
    let why = "flow-control window exceeded";
    assert_eq!(
        b.ended(3),
        Some(&Outcome {
            ending: Ending::Protocol(Violation::FlowControl),
            credit: 777,
            eof_sent: false,
            eof_received: false,
            pooled: None,
        })
    );

    let mut a = Inbox::new(&link.a);
    a.wait_until("RESET at A", |events| !frames(events).is_empty());
    assert_eq!(a.frames(), vec![(RESET, 3, reset_payload(4, why))]);

    link.release(sock_b);
    assert_eq!(
        read_to_eof(&srv_b),
        b"",
        "the oversized DATA reached the socket"
    );
    assert_eq!(link.b.stats().native_streams, 0);
}

/// The peer's RESET ends the native stream with its code and reason.
#[test]
fn peer_reset_ends_the_stream() {
    let link = Link::new();
    let (sock_b, srv_b) = link.native_socket();
    link.b.attach_native(native(6, sock_b)).expect("native B");
    link.a.send(vec![
        frame(DATA, 6, b"before"),
        frame(RESET, 6, &reset_payload(0, "bye")),
    ]);

    let mut b = Inbox::new(&link.b);
    b.wait_until("Ended for stream 6", |events| ended(events, 6).is_some());
    assert_eq!(
        b.ended(6),
        Some(&Outcome {
            ending: Ending::Reset {
                code: 0,
                reason: "bye".into(),
            },
            credit: WINDOW_SIZE,
            eof_sent: false,
            eof_received: false,
            pooled: None,
        })
    );
    assert_eq!(b.frames(), Vec::<SeenFrame>::new());
    link.release(sock_b);
    assert_eq!(read_to_eof(&srv_b), b"before");
}

/// A frontend scanner reports a Query as a tap record (after `tap_delay`),
/// relays it unchanged, and stops the stream at a bad message type without
/// relaying it.
#[test]
fn postgres_tap_reports_queries_and_rejects_bad_framing() {
    let link = Link::new();
    let (sock_b, srv_b) = link.native_socket();
    let spec = NativeSpec {
        tap: PgTap {
            frontend: Some((b"QP".to_vec(), Vec::new())),
            backend: None,
            guard: Vec::new(),
            read_only: false,
            ..PgTap::default()
        },
        ..native(7, sock_b)
    };
    link.b.attach_native(spec).expect("native B");

    let query = pg_query("SELECT 1");
    assert_eq!(query.len(), 1 + 4 + 9);
    let before = monotonic();
    let sent_at = Instant::now();
    link.a.send(vec![frame(DATA, 7, &query)]);
    assert_eq!(read_up_to(&srv_b, query.len()), query);

    let mut b = Inbox::new(&link.b);
    b.wait_until("a tap record", |events| !tap_records(events, 7).is_empty());
    let waited = sent_at.elapsed();
    assert!(
        waited < Duration::from_millis(1000),
        "tap came after {waited:?}"
    );
    let records = b.tap_records(7);
    assert_eq!(records.len(), 1, "{records:#?}");
    let record = &records[0];
    assert_eq!((record.tag, record.from_tunnel), (b'Q', true));
    assert_eq!(record.raw, query);
    assert!(
        record.at >= before && record.at <= monotonic(),
        "stamped {}",
        record.at
    );

    // Type byte 0x00 is no frontend message.
    link.a
        .send(vec![frame(DATA, 7, &[0x00, 0, 0, 0, 8, 1, 2, 3, 4])]);
    b.wait_until("Ended for stream 7", |events| ended(events, 7).is_some());
    let outcome = b.ended(7).expect("checked");
    assert!(
        matches!(
            outcome.ending,
            Ending::Postgres(PgError {
                side: Side::Client,
                error: pg::Error::Malformed(_)
            })
        ),
        "{outcome:?}"
    );
    assert_eq!((outcome.eof_sent, outcome.eof_received), (false, false));
    assert_eq!(b.tap_records(7).len(), 1, "no record for the bad bytes");
    link.release(sock_b);
    assert_eq!(read_to_eof(&srv_b), b"", "bad bytes reached the server");
}

/// A read-only session's server reports the setting turned off: the
/// client gets the whole answer before it in the same read and nothing of
/// the one it is in, and the stream ends for Python to end the session.
#[test]
fn a_read_only_stream_ends_where_the_server_turns_the_setting_off() {
    let link = Link::new();
    let (sock_a, app_a) = link.native_socket();
    let (sock_b, srv_b) = link.native_socket();
    link.a.attach_native(native(1, sock_a)).expect("native A");
    let tap = PgTap {
        read_only: true,
        ..PgTap::default()
    };
    link.b
        .attach_native(NativeSpec {
            tap,
            ..native(1, sock_b)
        })
        .expect("native B");

    let earlier = [pg_message(b'C', b"SELECT 1\0"), pg_message(b'Z', b"I")].concat();
    let lifting = [
        pg_message(b'D', b"\0\x01\0\0\0\x011"),
        pg_message(b'C', b"SELECT 1\0"),
        pg_message(b'S', b"default_transaction_read_only\0off\0"),
        pg_message(b'Z', b"I"),
    ]
    .concat();
    (&srv_b)
        .write_all(&[earlier.clone(), lifting].concat())
        .expect("write");

    let mut b = Inbox::new(&link.b);
    b.wait_until("the end of stream 1", |events| ended(events, 1).is_some());
    assert_eq!(b.ended(1).expect("checked").ending, Ending::ReadOnlyOff);
    // What Python sends next follows whatever the engine sent: nothing of
    // the lifting answer may come between.
    let farewell = pg_message(b'E', b"SFATAL\0C25006\0\0");
    link.b.send(vec![frame(DATA, 1, &farewell)]);
    let got = read_up_to(&app_a, earlier.len() + farewell.len());
    assert_eq!(got, [earlier, farewell].concat());
}

/// A statement guard: each guarded message is held, with everything behind
/// it, until the verdict; the socket gets the verdict's bytes in its place,
/// the consumed input is credited back, and order is kept.
#[test]
fn guarded_messages_wait_for_a_verdict() {
    let link = Link::new();
    let (sock_b, srv_b) = link.native_socket();
    let spec = NativeSpec {
        window: 4096,
        tap: PgTap {
            frontend: Some((Vec::new(), b"S".to_vec())),
            backend: None,
            guard: b"Q".to_vec(),
            read_only: false,
            ..PgTap::default()
        },
        ..native(9, sock_b)
    };
    link.b.attach_native(spec).expect("native B");

    let first = pg_query("DROP TABLE a");
    let sync = pg_message(b'S', b"");
    let second = pg_query("SELECT 2");
    let input = [first.clone(), sync.clone(), second.clone()].concat();
    link.a.send(vec![frame(DATA, 9, &input)]);

    let mut b = Inbox::new(&link.b);
    b.wait_until("the first held message", |events| {
        tap_records(events, 9).iter().any(|r| r.hold)
    });
    let records = b.tap_records(9);
    assert_eq!(records.len(), 1, "{records:#?}");
    assert_eq!((records[0].tag, records[0].hold), (b'Q', true));
    assert_eq!(records[0].raw, first);
    b.settle();
    assert_eq!(
        b.tap_records(9).len(),
        1,
        "nothing behind the held message is reported yet"
    );

    let replacement = pg_query("SELECT 'refused'");
    link.b.verdict(9, replacement.clone()).expect("verdict");
    b.wait_until("the second held message", |events| {
        tap_records(events, 9).iter().filter(|r| r.hold).count() == 2
    });
    let records = b.tap_records(9);
    let kinds: Vec<(u8, bool)> = records.iter().map(|r| (r.tag, r.hold)).collect();
    assert_eq!(kinds, vec![(b'Q', true), (b'S', false), (b'Q', true)]);
    assert_eq!(
        read_up_to(&srv_b, replacement.len() + sync.len()),
        [replacement.clone(), sync.clone()].concat()
    );
    link.b.verdict(9, second.clone()).expect("verdict");
    assert_eq!(read_up_to(&srv_b, second.len()), second);
    assert!(
        matches!(
            link.b.verdict(9, Vec::new()),
            Err(Error::InvalidArgument(_))
        ),
        "nothing is held any more"
    );

    // All input was consumed, so the peer may send a whole window again.
    let big = pg_message(b'd', &vec![b'x'; 4000]);
    link.a.send(vec![frame(DATA, 9, &big)]);
    assert_eq!(read_up_to(&srv_b, big.len()), big);
    assert!(b.ended(9).is_none());
    link.release(sock_b);
}

/// With a guard screen, a guarded Query or Parse that names none of its
/// words (ASCII letters in any case) is relayed at once and reported unheld;
/// one that names a word is held as before, and so is what follows it.
#[test]
fn the_guard_screen_holds_only_statements_that_name_its_words() {
    let link = Link::new();
    let (sock_b, srv_b) = link.native_socket();
    let spec = NativeSpec {
        tap: PgTap {
            frontend: Some((b"QP".to_vec(), Vec::new())),
            guard: b"QP".to_vec(),
            guard_screen: vec![b"read".to_vec(), b"set_config".to_vec()],
            ..PgTap::default()
        },
        ..native(21, sock_b)
    };
    link.b.attach_native(spec).expect("native B");

    let plain = pg_query("SELECT abalance FROM accounts");
    let named = pg_query("SET default_transaction_READ_only = off");
    let after = pg_query("SELECT 3");
    link.a.send(vec![frame(DATA, 21, &plain)]);
    assert_eq!(
        read_up_to(&srv_b, plain.len()),
        plain,
        "relayed without a verdict"
    );
    link.a.send(vec![frame(
        DATA,
        21,
        &[named.clone(), after.clone()].concat(),
    )]);

    let mut b = Inbox::new(&link.b);
    b.wait_until("the held statement", |events| {
        tap_records(events, 21).iter().any(|r| r.hold)
    });
    let records = b.tap_records(21);
    let seen: Vec<(Vec<u8>, bool)> = records.iter().map(|r| (r.raw.clone(), r.hold)).collect();
    assert_eq!(seen, vec![(plain.clone(), false), (named.clone(), true)]);
    link.b.verdict(21, named.clone()).expect("verdict");
    assert_eq!(
        read_up_to(&srv_b, named.len() + after.len()),
        [named, after].concat()
    );
    link.release(sock_b);
}

/// `Ending::Postgres` promises that the chunk holding a bad message is
/// neither relayed nor audited: the server and the audit agree, also when a
/// valid message precedes the bad one in the same DATA frame.
#[test]
fn postgres_rejection_drops_and_forgets_the_whole_bad_chunk() {
    let link = Link::new();
    let (sock_b, srv_b) = link.native_socket();
    let spec = NativeSpec {
        tap: PgTap {
            frontend: Some((b"Q".to_vec(), Vec::new())),
            backend: None,
            guard: Vec::new(),
            read_only: false,
            ..PgTap::default()
        },
        ..native(8, sock_b)
    };
    link.b.attach_native(spec).expect("native B");

    let query = pg_query("SELECT 2");
    let mut payload = query.clone();
    payload.extend_from_slice(&[0x00, 0, 0, 0, 4]);
    link.a.send(vec![frame(DATA, 8, &payload)]);

    let mut b = Inbox::new(&link.b);
    b.wait_until("Ended for stream 8", |events| ended(events, 8).is_some());
    assert!(matches!(
        b.ended(8).expect("checked").ending,
        Ending::Postgres(PgError {
            side: Side::Client,
            ..
        })
    ));
    // The Query is not reported as seen...
    assert!(b.tap_records(8).is_empty());
    link.release(sock_b);
    // ...because it never reached the server.
    assert_eq!(read_to_eof(&srv_b), b"");
}

/// Records found in the bytes handed over with the stream are delivered
/// after `tap_delay` like any others.
#[test]
fn postgres_tap_reports_handed_over_bytes() {
    let link = Link::new();
    let (sock_b, srv_b) = link.native_socket();
    let query = pg_query("SELECT 3");
    let spec = NativeSpec {
        to_socket: query.clone(),
        tap: PgTap {
            frontend: Some((b"Q".to_vec(), Vec::new())),
            backend: None,
            guard: Vec::new(),
            read_only: false,
            ..PgTap::default()
        },
        ..native(9, sock_b)
    };
    // Let B's engine thread go idle (in epoll_wait without a deadline), as
    // it is when Python hands a stream over on a quiet session.
    thread::sleep(SETTLE);
    link.b.attach_native(spec).expect("native B");
    assert_eq!(read_up_to(&srv_b, query.len()), query);

    let mut b = Inbox::new(&link.b);
    b.wait_until("a tap record", |events| !tap_records(events, 9).is_empty());
    let records = b.tap_records(9);
    assert_eq!(records.len(), 1);
    assert_eq!(
        (records[0].tag, records[0].from_tunnel, &records[0].raw),
        (b'Q', true, &query)
    );
}

/// Frames sealed onto a connection the peer never read are resent on the
/// next one and delivered exactly once, in order, after the old ones.
#[test]
fn resumption_delivers_retained_frames_exactly_once() {
    let link = Link::new();
    let mut b = Inbox::new(&link.b);
    link.a.send(vec![
        frame(OPEN, 1, b""),
        frame(DATA, 1, b"one"),
        frame(DATA, 1, b"two"),
    ]);
    b.wait_until("three frames at B", |events| frames(events).len() >= 3);
    wait_stats(&link.a, "A's first frames acknowledged", |s| {
        s.retained_frames == 0
    });

    // B goes away; A still writes to the old socket, which nobody reads now.
    link.b.detach();
    link.a.send(vec![
        frame(DATA, 1, b"three"),
        frame(DATA, 1, b"four"),
        frame(DATA, 1, b"five"),
    ]);
    link.a.send(vec![frame(PING, 0, &1u64.to_be_bytes())]); // control: not resent
    let a_stats = link.a.stats();
    assert_eq!((a_stats.send_next, a_stats.retained_frames), (6, 3));
    assert!(
        b.settle().is_empty(),
        "a detached engine delivered {:#?}",
        b.events
    );
    link.a.detach();
    assert!(!link.a.stats().attached && !link.b.stats().attached);

    // The handshake: each side learns the other's recv_next.
    let (b_recv, a_recv) = (link.b.stats().recv_next, link.a.stats().recv_next);
    assert_eq!((b_recv, a_recv), (3, 0));
    assert_eq!(
        link.a.acknowledge(7),
        Err(Error::Protocol(Violation::AckBeyondSent {
            acked: 7,
            sent: 6
        })),
        "acknowledged a frame never sent"
    );
    link.a.acknowledge(b_recv).expect("A resumes");
    link.b.acknowledge(a_recv).expect("B resumes");
    assert_eq!(link.a.stats().retained_frames, 3);

    // An encoder that does not start at the oldest retained frame is refused.
    let (probe, _peer) = nonblocking_pair();
    assert!(matches!(
        link.a.attach(
            probe.as_raw_fd(),
            encoder(&key(3), 4),
            decoder(&key(4), 0),
            &[]
        ),
        Err(Error::InvalidArgument(_))
    ));
    assert!(!link.a.stats().attached);

    link.connect(&key(3), &key(4), b_recv, 0);
    link.a.send(vec![frame(DATA, 1, b"six")]);

    b.wait_until("six frames at B", |events| frames(events).len() >= 7);
    let data: Vec<(u8, u32, &[u8])> = vec![
        (OPEN, 1, b""),
        (DATA, 1, b"one"),
        (DATA, 1, b"two"),
        (DATA, 1, b"three"),
        (DATA, 1, b"four"),
        (DATA, 1, b"five"),
        (DATA, 1, b"six"),
    ];
    let expected: Vec<SeenFrame> = data
        .into_iter()
        .map(|(t, s, p)| (t, s, p.to_vec()))
        .collect();
    assert_eq!(b.frames(), expected);
    assert!(b.settle().is_empty(), "duplicates: {:#?}", b.events);
    let a_stats = wait_stats(&link.a, "everything acknowledged", |s| {
        s.retained_frames == 0
    });
    assert_eq!(a_stats.send_next, 7);
    assert_eq!(link.b.stats().recv_next, 7);
    let mut a = Inbox::new(&link.a);
    assert!(a.settle().is_empty(), "A got {:#?}", a.events);
}

/// Python takes a live native stream back: its state comes back as
/// `Aborted`, once; unknown streams give `None`.
#[test]
fn abort_native_returns_the_outcome_once() {
    let link = Link::new();
    let (sock_b, srv_b) = link.native_socket();
    let spec = NativeSpec {
        credit: 1234,
        eof_received: true,
        ..native(11, sock_b)
    };
    link.b.attach_native(spec).expect("native B");
    assert!(
        matches!(
            link.b.attach_native(native(11, sock_b)),
            Err(Error::InvalidArgument(_))
        ),
        "attached twice"
    );
    assert_eq!(link.b.stats().native_streams, 1);

    assert_eq!(link.b.abort_native(12), None);
    assert_eq!(
        link.b.abort_native(11),
        Some(Outcome {
            ending: Ending::Aborted,
            credit: 1234,
            eof_sent: false,
            eof_received: true,
            pooled: None,
        })
    );
    assert_eq!(link.b.abort_native(11), None);
    assert_eq!(link.b.stats().native_streams, 0);

    // No Ended event for an aborted stream; its frames go to Python again.
    link.a.send(vec![
        frame(WINDOW, 11, &5u32.to_be_bytes()),
        frame(CLOSE, 11, b""),
    ]);
    let mut b = Inbox::new(&link.b);
    b.wait_until("frames for the aborted stream", |events| {
        frames(events).len() >= 2
    });
    assert_eq!(
        b.frames(),
        vec![
            (WINDOW, 11, 5u32.to_be_bytes().to_vec()),
            (CLOSE, 11, Vec::new())
        ]
    );
    assert!(b.ended(11).is_none());
    // The half-close (eof_received) was applied by the engine at attach:
    // EOF while the socket is still open.
    assert_eq!(read_to_eof(&srv_b), b"");
    link.release(sock_b);
    // ACK is never an event.
    assert!(b.events.iter().all(|e| !matches!(
        e,
        Event::Frame {
            frame_type: ACK,
            ..
        }
    )));
}

/// A peer that breaks the protocol in an authentic frame fails the
/// connection with the typed violation, for Python to end the session.
#[test]
fn a_reset_without_its_code_is_a_protocol_violation() {
    let link = Link::new();
    let (sock_b, _srv_b) = link.native_socket();
    link.b.attach_native(native(13, sock_b)).expect("native B");
    link.a.send(vec![frame(RESET, 13, b"\x00")]);

    let start = Instant::now();
    let error = loop {
        if let (_, Some(error)) = link.b.take() {
            break error;
        }
        assert!(start.elapsed() < DEADLINE, "no connection error at B");
        thread::sleep(Duration::from_millis(1));
    };
    assert_eq!(
        error,
        Error::Protocol(Violation::MissingCode { frame_type: RESET })
    );
    assert_eq!(error.to_string(), "RESET frame: missing code");
    assert!(
        link.b.abort_native(13).is_some(),
        "the stream outlives the connection"
    );
    link.release(sock_b);
}

/// With a farewell, a lost session writes it to each socket left between
/// two Postgres messages (where the MiniGate's FATAL 08006 may go): after
/// whole messages it follows them, inside one nothing is added, and a
/// stream without a farewell gets none.
#[test]
fn a_lost_session_says_farewell_between_messages_only() {
    let link = Link::new();
    let (sock_whole, srv_whole) = link.native_socket();
    let (sock_cut, srv_cut) = link.native_socket();
    let (sock_plain, srv_plain) = link.native_socket();
    let farewell = pg_message(b'E', b"SFATAL\0C08006\0Mgone\0\0");
    let tap = PgTap {
        farewell: farewell.clone(),
        ..PgTap::default()
    };
    let spec = |sid, fd| NativeSpec {
        tap: tap.clone(),
        ..native(sid, fd)
    };
    link.b
        .attach_native(spec(15, sock_whole))
        .expect("native 15");
    link.b.attach_native(spec(17, sock_cut)).expect("native 17");
    link.b
        .attach_native(native(19, sock_plain))
        .expect("native 19");
    let messages = [pg_message(b'C', b"SELECT 1\0"), pg_message(b'Z', b"I")].concat();
    let cut = &messages[..messages.len() - 1];
    link.a.send(vec![
        frame(DATA, 15, &messages[..7]),
        frame(DATA, 15, &messages[7..]),
        frame(DATA, 17, cut),
        frame(DATA, 19, &messages),
    ]);
    assert_eq!(read_up_to(&srv_whole, messages.len()), messages);
    assert_eq!(read_up_to(&srv_cut, cut.len()), cut);
    assert_eq!(read_up_to(&srv_plain, messages.len()), messages);

    link.b.lose();
    assert_eq!(link.b.stats().native_streams, 0);
    for fd in [sock_whole, sock_cut, sock_plain] {
        link.release(fd);
    }
    assert_eq!(read_to_eof(&srv_whole), farewell);
    assert_eq!(read_to_eof(&srv_cut), b"");
    assert_eq!(read_to_eof(&srv_plain), b"");
}
