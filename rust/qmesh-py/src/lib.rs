//! `qmesh._core`: the one Python binding of qmesh's Rust crates (see
//! `qmesh/_core.pyi`, the contract this module implements):
//!
//! * `qmesh-wire`, the sealed frame codec, the Noise handshake and the
//!   protocol's frame types, reset codes and reason codec (this file);
//! * `qmesh-pg`, the sans-IO Postgres wire parser ([`pg`]);
//! * `qmesh-relay`, the tunnel engine that owns a session's sockets on the
//!   per-message path ([`engine`]);
//! * `qmesh-chain`, the seals of the ledger's and audit's hash chains
//!   ([`chain`]).
//!
//! This crate only converts: Python arguments in, Python objects out, every
//! crate's errors to Python exceptions ([`error`]), and the decision of when
//! to release the GIL. All protocol logic lives in the wrapped crates, which
//! have no pyo3 dependency.
//!
//! Thread safety. pyo3 0.30 requires every `#[pyclass]` to be `Send + Sync`
//! unless it is `unsendable`, and `unsendable` would make a codec unusable
//! from any thread but its creator's (Trio runs sync code in worker threads
//! via `trio.to_thread`). Our classes are plain `Send + Sync` data (AES key
//! schedule, zstd contexts, byte buffers, snow's state; zstd-safe and snow
//! declare their contexts `Send + Sync`), and every method that mutates takes
//! `&mut self`, i.e. pyo3's runtime-checked exclusive borrow. So two threads
//! can never run the same codec at once: the second one gets a `RuntimeError`
//! ("already borrowed") instead of a data race, even while the first has
//! released the GIL. We deliberately do not use a `Mutex` inside: a thread
//! blocking on it while holding the GIL, against a holder that needs the GIL
//! back to finish, would deadlock.

use std::borrow::Cow;

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::{PyOverflowError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyDict, PyInt, PyMemoryView, PyString, PyTuple};

/// Every allocation of the Rust side (the engines' buffers, chunks, frames,
/// TLS records; Python's objects keep Python's allocator): glibc's malloc
/// took 4 % of a Gate engine's samples. With mimalloc, at pgbench -c 64
/// through a transaction pool (extended protocol), CPU per transaction fell
/// from 14.8-15.4 to 13.5-14.3 µs in the Gate and from 7.2-8.9 to 6.3-7.0 in
/// the MiniGate, and an idle tunnel session costs the Gate 44-48 KiB rather
/// than 54-63 (`bench/edges.py`, 1,000 and 5,000 edges, two runs each).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Far enough to mean never, near enough not to overflow an `Instant`.
const NEVER: std::time::Duration = std::time::Duration::from_secs(100 * 365 * 24 * 3600);

/// A duration given in seconds by Python: at least 0; one of [`NEVER`] or
/// more (infinity too) is [`NEVER`], since a longer one would overflow a
/// deadline on an engine thread.
fn seconds(value: f64, what: &str) -> PyResult<std::time::Duration> {
    if value >= NEVER.as_secs_f64() {
        return Ok(NEVER);
    }
    std::time::Duration::try_from_secs_f64(value).map_err(|_| {
        PyValueError::new_err(format!(
            "{what} must be a number of seconds >= 0, got {value}"
        ))
    })
}

mod audit;
mod chain;
mod engine;
mod error;
mod http;
mod pg;
mod pool;
mod sqlite;
mod tls;

pub use error::{Error, Result};
use qmesh_wire as wire;
use qmesh_wire::{DecoderConfig, EncoderConfig, FrameRef};

/// Work on at least this many bytes runs with the GIL released.
///
/// Releasing is not free: re-acquiring can mean waiting behind another
/// thread for up to the interpreter's switch interval (5 ms by default),
/// while sealing or opening 64 KiB takes only tens of microseconds. Below
/// the threshold we keep the GIL and finish quickly; above it the AES/zstd
/// work is long enough that letting other Python threads (and Trio's event
/// loop, when we run in a worker thread) proceed is worth the hand-off.
const DETACH_THRESHOLD: usize = 64 * 1024;

// The `#[pyo3(signature)]` defaults below are written as literals so they show
// up in `__text_signature__` (which stubtest compares with the stub); keep
// them equal to the wire crate's defaults.
const _: () = assert!(wire::codec::DEFAULT_LEVEL == 3);
const _: () = assert!(wire::codec::DEFAULT_MIN_COMPRESS == 64);

/// The bytes of a `bytes`, `bytearray` or `memoryview` argument.
///
/// `bytes` is immutable, so it is borrowed (and may be read with the GIL
/// released). Anything else exporting a buffer is copied while we hold the
/// GIL: a `bytearray` could be mutated by another thread the moment we let
/// go of it, and reading it then would be a data race.
fn input<'a>(obj: &'a Bound<'_, PyAny>) -> PyResult<Cow<'a, [u8]>> {
    if let Ok(bytes) = obj.cast::<PyBytes>() {
        return Ok(Cow::Borrowed(bytes.as_bytes()));
    }
    let buffer = PyBuffer::<u8>::get(obj)?;
    Ok(Cow::Owned(buffer.to_vec(obj.py())?))
}

/// A frame type argument: anything not in `0..=255` is a `ValueError` (like
/// `0x20..=0xFF`, which the encoder rejects), not pyo3's `OverflowError`.
fn frame_type_arg(obj: &Bound<'_, PyAny>) -> PyResult<u8> {
    obj.extract::<u8>().map_err(|e| {
        if e.is_instance_of::<PyOverflowError>(obj.py()) {
            PyValueError::new_err("frame type out of range (0x00..=0x1f)")
        } else {
            e
        }
    })
}

/// The deepest nesting of arrays and objects in a JSON document (see
/// ``qmesh.peerjson``), measured without parsing it.
#[pyfunction]
fn json_nesting_depth(py: Python<'_>, data: &[u8]) -> usize {
    if data.len() > 1 << 20 {
        py.detach(|| qmesh_http::nesting_depth(data))
    } else {
        qmesh_http::nesting_depth(data)
    }
}

/// The RESET/GOAWAY payload: ``code`` (u16) and ``reason`` as UTF-8, cut at
/// ``MAX_REASON`` bytes.
#[pyfunction]
fn encode_reason<'py>(
    py: Python<'py>,
    code: u16,
    reason: &Bound<'py, PyString>,
) -> PyResult<Bound<'py, PyBytes>> {
    let payload = match reason.to_str() {
        Ok(text) => wire::encode_reason(code, text),
        // A str with lone surrogates has no UTF-8 form; encode it the way
        // Python's "replace" error handler does (a "?" each), as the tunnel
        // always has. Rare enough that the detour through Python is fine.
        Err(_) => {
            let encoded = reason.call_method1("encode", ("utf-8", "replace"))?;
            let bytes = encoded.cast::<PyBytes>()?.as_bytes();
            let text =
                std::str::from_utf8(bytes).map_err(|e| PyValueError::new_err(e.to_string()))?;
            wire::encode_reason(code, text)
        }
    };
    Ok(PyBytes::new(py, &payload))
}

/// ``(code, reason)`` of a RESET/GOAWAY payload; raises :class:`Malformed`
/// when it is too short to hold the code.
#[pyfunction]
fn decode_reason(payload: &[u8]) -> Result<(u16, String)> {
    let (code, reason) = wire::decode_reason(payload)?;
    Ok((code, reason.into_owned()))
}

/// Validate, compress and seal `frames` straight into a new `bytes` of the
/// exact size. `payload_bytes` (their total) decides about the GIL.
fn encode_frames<'py>(
    py: Python<'py>,
    encoder: &mut wire::FrameEncoder,
    frames: &[FrameRef<'_>],
    payload_bytes: usize,
) -> Result<Bound<'py, PyBytes>> {
    let detach = payload_bytes >= DETACH_THRESHOLD;
    // Validation happens first, inside prepare: an error leaves the counters
    // untouched, and no sequence number is assigned until write_into.
    let batch = if detach {
        py.detach(|| encoder.prepare(frames))?
    } else {
        encoder.prepare(frames)?
    };
    let len = batch.encoded_len();
    // The new bytes object is not visible to any other code until we return
    // it, so filling it with the GIL released is safe.
    let out = PyBytes::new_with(py, len, |buf| {
        let written = if detach {
            py.detach(|| batch.write_into(buf))
        } else {
            batch.write_into(buf)
        };
        written.map_err(|e| PyErr::from(Error::from(e)))
    })?;
    Ok(out)
}

/// Seals frames for one direction of one connection.
///
/// Sequence numbers are assigned here, from two counters: reliable frames
/// (type < 0x10) continue from ``reliable_seq``; control frames start at 0.
#[pyclass(module = "qmesh._core", name = "FrameEncoder")]
pub struct FrameEncoder {
    /// `None` once handed to a `TunnelEngine`.
    inner: Option<wire::FrameEncoder>,
}

fn handed_over() -> PyErr {
    PyValueError::new_err("this codec was handed to a TunnelEngine")
}

impl FrameEncoder {
    fn codec(&self) -> PyResult<&wire::FrameEncoder> {
        self.inner.as_ref().ok_or_else(handed_over)
    }

    fn codec_mut(&mut self) -> PyResult<&mut wire::FrameEncoder> {
        self.inner.as_mut().ok_or_else(handed_over)
    }

    /// Give the codec to an engine; the Python object is unusable afterwards.
    pub(crate) fn take(&mut self) -> PyResult<wire::FrameEncoder> {
        self.inner.take().ok_or_else(handed_over)
    }
}

#[pymethods]
impl FrameEncoder {
    #[new]
    #[pyo3(signature = (
        key,
        *,
        reliable_seq = 0,
        level = 3,
        max_payload = wire::MAX_PAYLOAD_LIMIT,
        min_compress = 64,
    ))]
    fn new(
        key: &[u8],
        reliable_seq: u64,
        level: i32,
        max_payload: usize,
        min_compress: usize,
    ) -> Result<Self> {
        let config = EncoderConfig {
            reliable_seq,
            level,
            max_payload,
            min_compress,
        };
        Ok(FrameEncoder {
            inner: Some(wire::FrameEncoder::new(key, config)?),
        })
    }

    #[getter]
    fn next_reliable_seq(&self) -> PyResult<u64> {
        Ok(self.codec()?.next_reliable_seq())
    }

    #[getter]
    fn next_control_seq(&self) -> PyResult<u64> {
        Ok(self.codec()?.next_control_seq())
    }

    /// One frame, header and ciphertext. Raises ValueError for a bad type
    /// or a payload over ``max_payload``.
    fn encode<'py>(
        &mut self,
        py: Python<'py>,
        frame_type: &Bound<'py, PyAny>,
        stream_id: u32,
        payload: &Bound<'py, PyAny>,
    ) -> Result<Bound<'py, PyBytes>> {
        let frame_type = frame_type_arg(frame_type)?;
        let payload = input(payload)?;
        let frames = [FrameRef {
            frame_type,
            stream_id,
            payload: &payload,
        }];
        encode_frames(py, self.codec_mut()?, &frames, payload.len())
    }

    /// Many frames ``(frame_type, stream_id, payload)`` concatenated in one
    /// buffer, in order. Validation happens before anything is encoded, so a
    /// ValueError leaves the counters untouched.
    fn encode_batch<'py>(
        &mut self,
        py: Python<'py>,
        frames: &Bound<'py, PyAny>,
    ) -> Result<Bound<'py, PyBytes>> {
        let mut items = Vec::new();
        for item in frames.try_iter()? {
            let (frame_type, stream_id, payload): (Bound<'py, PyAny>, u32, Bound<'py, PyAny>) =
                item?.extract()?;
            items.push((frame_type_arg(&frame_type)?, stream_id, payload));
        }
        let payloads = items
            .iter()
            .map(|(_, _, p)| input(p))
            .collect::<PyResult<Vec<Cow<'_, [u8]>>>>()?;
        let refs: Vec<FrameRef<'_>> = items
            .iter()
            .zip(&payloads)
            .map(|((frame_type, stream_id, _), payload)| FrameRef {
                frame_type: *frame_type,
                stream_id: *stream_id,
                payload,
            })
            .collect();
        let total = payloads.iter().map(|p| p.len()).sum();
        encode_frames(py, self.codec_mut()?, &refs, total)
    }

    fn __repr__(&self) -> String {
        match &self.inner {
            Some(codec) => format!(
                "<FrameEncoder next_reliable_seq={} next_control_seq={}>",
                codec.next_reliable_seq(),
                codec.next_control_seq()
            ),
            None => "<FrameEncoder handed to a TunnelEngine>".into(),
        }
    }
}

/// A decoded frame as Python sees it: ``(frame_type, stream_id, sequence,
/// flags, payload)``.
type PyFrame<'py> = (u8, u32, u64, u8, Bound<'py, PyBytes>);

/// Opens frames for one direction of one connection (h11 style: ``feed``
/// buffers, ``next_frames`` returns what is complete).
///
/// After the first error the decoder is poisoned: every later call raises
/// the same error kind again.
#[pyclass(module = "qmesh._core", name = "FrameDecoder")]
pub struct FrameDecoder {
    /// `None` once handed to a `TunnelEngine`.
    inner: Option<wire::FrameDecoder>,
}

impl FrameDecoder {
    fn codec(&self) -> PyResult<&wire::FrameDecoder> {
        self.inner.as_ref().ok_or_else(handed_over)
    }

    fn codec_mut(&mut self) -> PyResult<&mut wire::FrameDecoder> {
        self.inner.as_mut().ok_or_else(handed_over)
    }

    /// Give the codec to an engine; the Python object is unusable afterwards.
    pub(crate) fn take(&mut self) -> PyResult<wire::FrameDecoder> {
        self.inner.take().ok_or_else(handed_over)
    }
}

#[pymethods]
impl FrameDecoder {
    #[new]
    #[pyo3(signature = (key, *, reliable_seq = 0, max_payload = wire::MAX_PAYLOAD_LIMIT))]
    fn new(key: &[u8], reliable_seq: u64, max_payload: usize) -> Result<Self> {
        let config = DecoderConfig {
            reliable_seq,
            max_payload,
        };
        Ok(FrameDecoder {
            inner: Some(wire::FrameDecoder::new(key, config)?),
        })
    }

    #[getter]
    fn next_reliable_seq(&self) -> PyResult<u64> {
        Ok(self.codec()?.next_reliable_seq())
    }

    #[getter]
    fn next_control_seq(&self) -> PyResult<u64> {
        Ok(self.codec()?.next_control_seq())
    }

    /// Bytes held that do not yet make a complete frame.
    #[getter]
    fn buffered(&self) -> PyResult<usize> {
        Ok(self.codec()?.buffered())
    }

    fn feed(&mut self, data: &Bound<'_, PyAny>) -> Result<()> {
        // A plain copy into our buffer; no parsing happens here, so there
        // is nothing worth releasing the GIL for.
        let data = input(data)?;
        Ok(self.codec_mut()?.feed(&data)?)
    }

    /// All complete frames (at most ``limit`` when > 0). If a bad frame
    /// follows good ones, the good ones are returned and the error is raised
    /// by the next call.
    #[pyo3(signature = (limit = 0))]
    fn next_frames<'py>(&mut self, py: Python<'py>, limit: i64) -> Result<Vec<PyFrame<'py>>> {
        let limit = usize::try_from(limit).unwrap_or(0);
        let inner = self.codec_mut()?;
        let frames = if inner.buffered() >= DETACH_THRESHOLD {
            py.detach(|| inner.next_frames(limit))?
        } else {
            inner.next_frames(limit)?
        };
        Ok(frames
            .into_iter()
            .map(|f| {
                (
                    f.frame_type,
                    f.stream_id,
                    f.seq,
                    f.flags,
                    PyBytes::new(py, &f.payload),
                )
            })
            .collect())
    }

    /// The transport ended: raises :class:`Truncated` if bytes of a partial
    /// frame are buffered.
    fn eof(&mut self) -> Result<()> {
        Ok(self.codec_mut()?.eof()?)
    }

    fn __repr__(&self) -> String {
        match &self.inner {
            Some(codec) => format!(
                "<FrameDecoder next_reliable_seq={} next_control_seq={} buffered={}>",
                codec.next_reliable_seq(),
                codec.next_control_seq(),
                codec.buffered()
            ),
            None => "<FrameDecoder handed to a TunnelEngine>".into(),
        }
    }
}

/// ``Noise_IK_25519_AESGCM_SHA256``: the initiator knows the responder's
/// static key in advance; the responder learns and authenticates the
/// initiator's static key from the first message. Two messages, one round
/// trip, forward secrecy from ephemeral keys.
///
/// Handshake messages are small and the X25519 work is a few hundred
/// microseconds at most, so none of these methods release the GIL.
#[pyclass(module = "qmesh._core", name = "NoiseHandshake")]
pub struct NoiseHandshake {
    inner: wire::NoiseHandshake,
}

#[pymethods]
impl NoiseHandshake {
    #[staticmethod]
    fn initiator(local_private: &[u8], remote_public: &[u8], prologue: &[u8]) -> Result<Self> {
        Ok(NoiseHandshake {
            inner: wire::NoiseHandshake::initiator(local_private, remote_public, prologue)?,
        })
    }

    #[staticmethod]
    fn responder(local_private: &[u8], prologue: &[u8]) -> Result<Self> {
        Ok(NoiseHandshake {
            inner: wire::NoiseHandshake::responder(local_private, prologue)?,
        })
    }

    #[getter]
    fn is_finished(&self) -> bool {
        self.inner.is_finished()
    }

    /// The next handshake message carrying ``payload`` (encrypted where the
    /// pattern allows; at most 65,000 bytes).
    fn write_message<'py>(
        &mut self,
        py: Python<'py>,
        payload: &[u8],
    ) -> Result<Bound<'py, PyBytes>> {
        Ok(PyBytes::new(py, &self.inner.write_message(payload)?))
    }

    /// Process the peer's handshake message; return its payload.
    fn read_message<'py>(
        &mut self,
        py: Python<'py>,
        message: &[u8],
    ) -> Result<Bound<'py, PyBytes>> {
        Ok(PyBytes::new(py, &self.inner.read_message(message)?))
    }

    /// The peer's static public key (32 bytes) once known.
    fn remote_static<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyBytes>> {
        self.inner.remote_static().map(|k| PyBytes::new(py, &k))
    }

    /// The handshake transcript hash: public, unique per connection.
    fn handshake_hash<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.inner.handshake_hash())
    }

    /// After the handshake: the encoder and decoder for this side, keyed
    /// from the Noise split. The keys never leave Rust. Consumes the
    /// handshake (a second call raises HandshakeError).
    #[pyo3(signature = (
        *,
        send_reliable_seq = 0,
        recv_reliable_seq = 0,
        level = 3,
        max_payload = wire::MAX_PAYLOAD_LIMIT,
        min_compress = 64,
    ))]
    // The Python name is fixed by the stub. It cannot take `self` by value
    // (Python owns the object); the Rust side marks the handshake consumed.
    #[allow(clippy::wrong_self_convention)]
    fn into_codec(
        &mut self,
        send_reliable_seq: u64,
        recv_reliable_seq: u64,
        level: i32,
        max_payload: usize,
        min_compress: usize,
    ) -> Result<(FrameEncoder, FrameDecoder)> {
        let send = EncoderConfig {
            reliable_seq: send_reliable_seq,
            level,
            max_payload,
            min_compress,
        };
        let recv = DecoderConfig {
            reliable_seq: recv_reliable_seq,
            max_payload,
        };
        let (encoder, decoder) = self.inner.into_codec(send, recv)?;
        Ok((
            FrameEncoder {
                inner: Some(encoder),
            },
            FrameDecoder {
                inner: Some(decoder),
            },
        ))
    }

    fn __repr__(&self) -> String {
        format!(
            "<NoiseHandshake initiator={} finished={}>",
            self.inner.is_initiator(),
            self.inner.is_finished()
        )
    }
}

/// qmesh's Rust core: the sealed frame codec and Noise handshake, the
/// Postgres wire parser, and the tunnel engine.
#[pymodule]
mod _core {
    use super::*;

    #[pymodule_export]
    use super::{
        decode_reason, encode_reason, json_nesting_depth, FrameDecoder, FrameEncoder,
        NoiseHandshake,
    };

    #[pymodule_init]
    fn init(m: &Bound<'_, PyModule>) -> PyResult<()> {
        let py = m.py();
        m.add("PROTOCOL_VERSION", wire::PROTOCOL_VERSION)?;
        m.add("HEADER_LEN", wire::HEADER_LEN)?;
        m.add("TAG_LEN", wire::TAG_LEN)?;
        m.add("MAX_PAYLOAD_LIMIT", wire::MAX_PAYLOAD_LIMIT)?;
        m.add("FLAG_COMPRESSED", wire::FLAG_COMPRESSED)?;
        m.add("CONTROL_TYPE_MIN", wire::CONTROL_TYPE_MIN)?;
        m.add("NOISE_PATTERN", wire::NOISE_PATTERN)?;
        m.add("MAX_REASON", wire::MAX_REASON)?;
        // Name → value, in protocol order: `qmesh/tunnel/frames.py` builds
        // its enums from these, and a test holds the two to each other.
        let frame_types = PyDict::new(py);
        for (name, value) in wire::frame_type::ALL {
            frame_types.set_item(name, value)?;
        }
        m.add("FRAME_TYPES", frame_types)?;
        let reset_codes = PyDict::new(py);
        for (name, value) in wire::reset_code::ALL {
            reset_codes.set_item(name, value)?;
        }
        m.add("RESET_CODES", reset_codes)?;

        // The stub's type aliases exist at runtime too, so that
        // `from qmesh._core import Frame` works outside `TYPE_CHECKING`.
        let bytes = py.get_type::<PyBytes>();
        let buffer_like = bytes
            .bitor(py.get_type::<PyByteArray>())?
            .bitor(py.get_type::<PyMemoryView>())?;
        m.add("BufferLike", buffer_like)?;
        let int = py.get_type::<PyInt>();
        let frame = py
            .get_type::<PyTuple>()
            .get_item((&int, &int, &int, &int, &bytes))?;
        m.add("Frame", frame)?;

        error::register(m)?;
        pg::register(m)?;
        engine::register(m)?;
        pool::register(m)?;
        audit::register(m)?;
        tls::register(m)?;
        http::register(m)?;
        chain::register(m)?;
        Ok(())
    }
}
