//! `qmesh._core.TunnelEngine`: the Python face of `qmesh-relay`'s engine.
//!
//! Unlike the codec classes, the engine has a thread of its own and a mutex
//! inside. That is safe here because the engine thread never needs the GIL:
//! a Python thread waiting for the mutex while holding the GIL only waits
//! for a round of pure Rust work to end.

use std::os::fd::RawFd;
use std::time::Duration;

use bytes::Bytes;
use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use qmesh_relay as relay;

use crate::{FrameDecoder, FrameEncoder, DETACH_THRESHOLD};

/// ``(ending, code, detail, credit, eof_sent, eof_received)``.
type PyOutcome = (&'static str, u16, String, u64, bool, bool);
/// ``(at, from_tunnel, tag, raw, hold)``.
type PyTapRecord<'py> = (f64, bool, u8, Bound<'py, PyBytes>, bool);
type PyTaken<'py> = (
    Vec<(u8, u32, Bound<'py, PyBytes>)>,
    Vec<(u32, Vec<PyTapRecord<'py>>)>,
    Vec<(u32, PyOutcome)>,
    Option<(&'static str, String)>,
);

fn outcome(outcome: relay::Outcome) -> PyOutcome {
    let (ending, code, detail) = match outcome.ending {
        relay::Ending::Clean => ("clean", 0, String::new()),
        relay::Ending::SocketEof => ("socket_eof", 0, String::new()),
        relay::Ending::Reset { code, reason } => ("reset", code, reason),
        relay::Ending::Protocol(why) => ("protocol", 0, why),
        relay::Ending::Socket(why) => ("socket", 0, why),
        relay::Ending::Postgres(why) => ("postgres", 0, why),
        relay::Ending::Aborted => ("aborted", 0, String::new()),
    };
    (
        ending,
        code,
        detail,
        outcome.credit,
        outcome.eof_sent,
        outcome.eof_received,
    )
}

/// The per-message path of one tunnel session, on a thread of its own.
///
/// Owns, while attached, the connection's socket (Python keeps the socket
/// object and closes it after :meth:`detach`), the codec, retention of
/// unacknowledged frames, ACKs and PONGs, and the sockets of native streams.
/// Everything else arrives through :meth:`take`; ``notify_fd`` becomes
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
    ))]
    fn new(
        ack_every: u64,
        ack_delay: f64,
        max_unacked: usize,
        read_size: usize,
        chunk_size: usize,
        tap_delay: f64,
        tap_batch: usize,
    ) -> PyResult<Self> {
        let seconds = |value: f64, what: &str| {
            Duration::try_from_secs_f64(value)
                .map_err(|_| PyValueError::new_err(format!("{what} must be >= 0")))
        };
        if read_size == 0 || chunk_size == 0 || ack_every == 0 {
            return Err(PyValueError::new_err(
                "read_size, chunk_size and ack_every must be positive",
            ));
        }
        let config = relay::Config {
            ack_every,
            ack_delay: seconds(ack_delay, "ack_delay")?,
            max_unacked,
            read_size,
            chunk_size,
            tap_delay: seconds(tap_delay, "tap_delay")?,
            tap_batch: tap_batch.max(1),
        };
        let inner = relay::Engine::new(config).map_err(|e| PyOSError::new_err(e.to_string()))?;
        Ok(TunnelEngine { inner })
    }

    #[getter]
    fn notify_fd(&self) -> RawFd {
        self.inner.notify_fd()
    }

    /// ``(recv_next, send_next, retained_frames, retained_bytes, bytes_sent,
    /// bytes_received, native_streams, attached)``.
    fn stats(&self) -> (u64, u64, usize, usize, u64, u64, usize, bool) {
        let s = self.inner.stats();
        (
            s.recv_next,
            s.send_next,
            s.retained_frames,
            s.retained_bytes,
            s.bytes_sent,
            s.bytes_received,
            s.native_streams,
            s.attached,
        )
    }

    /// Seconds since the tunnel socket last delivered bytes.
    fn silent_for(&self) -> f64 {
        self.inner.silent_for().as_secs_f64()
    }

    /// Apply the peer's ``recv_next`` from a handshake (ValueError if it
    /// does not fit what was sent).
    fn acknowledge(&self, peer_recv_next: u64) -> PyResult<()> {
        self.inner
            .acknowledge(peer_recv_next)
            .map_err(PyValueError::new_err)
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
    ) -> PyResult<()> {
        let encoder = encoder.take()?;
        let decoder = decoder.take()?;
        // Resending a large backlog seals all of it: let Python run meanwhile.
        py.detach(|| self.inner.attach(fd, encoder, decoder, initial))
            .map_err(PyValueError::new_err)
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
    /// outcome)`` of native streams that ended, and the current connection's
    /// error as ``("lost" | "protocol", message)``. Handle taps, then endings,
    /// then frames (a frame for a stream can follow the stream's ending).
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
                    ended.push((stream_id, outcome(o)));
                }
            }
        }
        let error = error.map(|e| match e {
            relay::ConnError::Lost(why) => ("lost", why),
            relay::ConnError::Protocol(why) => ("protocol", why),
        });
        (frames, taps, ended, error)
    }

    /// Relay stream ``stream_id`` natively between the tunnel and the
    /// connected, non-blocking socket ``fd`` until it ends (reported by
    /// :meth:`take`). The other arguments carry the stream's state over.
    /// ``pg_frontend=(full, peek)`` scans the bytes from the tunnel as a
    /// Postgres client's, ``pg_backend=full`` those from the socket as a
    /// server's, reporting those kinds as taps. ``pg_guard`` kinds (with
    /// ``pg_frontend``) are held: each is reported as a tap record with
    /// ``hold`` set, and nothing more reaches the socket until
    /// :meth:`verdict`; ``pg_backend_guard`` kinds (with ``pg_backend``)
    /// likewise on the server's side.
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
        pg_frontend = None,
        pg_backend = None,
        pg_guard = None,
        pg_backend_guard = None,
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
        pg_frontend: Option<(Vec<u8>, Vec<u8>)>,
        pg_backend: Option<Vec<u8>>,
        pg_guard: Option<Vec<u8>>,
        pg_backend_guard: Option<Vec<u8>>,
    ) -> PyResult<()> {
        let spec = relay::NativeSpec {
            stream_id,
            fd,
            to_socket: to_socket.to_vec(),
            credit,
            window,
            consumed,
            eof_received,
            end_on_socket_eof,
            tap: relay::PgTap {
                frontend: pg_frontend,
                backend: pg_backend,
                guard: pg_guard.unwrap_or_default(),
                backend_guard: pg_backend_guard.unwrap_or_default(),
            },
        };
        self.inner
            .attach_native(spec)
            .map_err(PyValueError::new_err)
    }

    /// The verdict on the message a native stream holds (the client's when
    /// ``from_tunnel``, else the server's): relay ``replacement`` in its
    /// place (the message itself, or another), then carry on.
    #[pyo3(signature = (stream_id, replacement, *, from_tunnel = true))]
    fn verdict(&self, stream_id: u32, replacement: &[u8], from_tunnel: bool) -> PyResult<()> {
        self.inner
            .verdict(stream_id, replacement.to_vec(), from_tunnel)
            .map_err(PyValueError::new_err)
    }

    /// Take a native stream back: its socket is unwatched when this returns.
    /// None if it had already ended (its ending is, or was, in :meth:`take`).
    fn abort_native(&self, stream_id: u32) -> Option<PyOutcome> {
        self.inner.abort_native(stream_id).map(outcome)
    }

    /// The session is over: drop retained frames and every native stream.
    fn lose(&self) {
        self.inner.lose();
    }

    /// Stop the engine's thread (also happens when the object is collected).
    fn close(&mut self, py: Python<'_>) {
        let inner = &mut self.inner;
        py.detach(|| inner.close());
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<TunnelEngine>()
}
