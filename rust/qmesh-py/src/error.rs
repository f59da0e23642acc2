//! The binding's one error type and the Python exceptions it becomes.
//!
//! Every library error reaches Python through [`Error`] and its one
//! `From<Error> for PyErr`, so an error kind maps to the same exception class
//! whichever call raised it: a wire error from the codec and the same wire
//! error found by the engine are both, say, `Tampered`.
//!
//! The exception families are split by who is at fault (see
//! `qmesh/_core.pyi` for each class's docstring): the peer's frame stream
//! (`FrameError` and its kinds), the peer's handshake (`HandshakeError`),
//! the peer's Postgres bytes (`PgWireError` and its kinds), the peer's use of
//! the tunnel protocol (`ProtocolViolation`), the connection
//! (`PeerClosed`, and `OSError` with its errno for a failed system call);
//! a damaged block of our own stored audit (`AuditBlockError`); our own
//! caller's mistakes are `ValueError`.

use std::io;

use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyOSError, PyValueError};
use pyo3::prelude::*;

use qmesh_pg as pg;
use qmesh_relay as relay;
use qmesh_wire as wire;

create_exception!(
    qmesh._core,
    FrameError,
    PyException,
    "The peer's byte stream is not a valid frame stream; tear the connection down."
);
create_exception!(
    qmesh._core,
    Tampered,
    FrameError,
    "The AEAD tag did not verify: header or payload altered, or the wrong key."
);
create_exception!(
    qmesh._core,
    Replayed,
    FrameError,
    "An authentic frame whose sequence number was already received."
);
create_exception!(
    qmesh._core,
    Reordered,
    FrameError,
    "An authentic frame whose sequence number is ahead of the next expected one."
);
create_exception!(
    qmesh._core,
    Truncated,
    FrameError,
    "The byte stream ended inside a frame (raised by ``FrameDecoder.eof``)."
);
create_exception!(
    qmesh._core,
    FrameTooLarge,
    FrameError,
    "A header announced more bytes than the decoder's limit; nothing was allocated."
);
create_exception!(
    qmesh._core,
    Malformed,
    FrameError,
    "A bad version, frame type, flag or reserved bits, or an undecodable payload."
);
create_exception!(
    qmesh._core,
    HandshakeError,
    PyException,
    "The Noise handshake failed: bad message, failed decryption, or misuse."
);
create_exception!(
    qmesh._core,
    PeerClosed,
    PyException,
    "The peer closed the tunnel connection between frames; the session may resume."
);
create_exception!(
    qmesh._core,
    PeerSilent,
    PeerClosed,
    "Nothing arrived on the tunnel connection past the heartbeat's dead_after: the peer \
     is hung or cut off. The session may resume."
);
create_exception!(
    qmesh._core,
    ProtocolViolation,
    PyException,
    "The peer broke the tunnel protocol in authentic frames; the session cannot go on."
);
create_exception!(
    qmesh._core,
    PgWireError,
    PyException,
    "The peer's bytes are not valid Postgres protocol; end the connection."
);
create_exception!(
    qmesh._core,
    PgMalformed,
    PgWireError,
    "An unknown message type, a bad length or a field that does not parse."
);
create_exception!(
    qmesh._core,
    PgMessageTooLarge,
    PgWireError,
    "A length field announced more than the limit; nothing was allocated for it."
);
create_exception!(
    qmesh._core,
    PgTruncated,
    PgWireError,
    "The stream ended inside a message (raised by ``PgScanner.eof``)."
);

create_exception!(
    qmesh._core,
    TlsError,
    PyOSError,
    "TLS with a server failed: its certificate, its handshake or a record \
     (an OSError, as Python's ssl.SSLError is)."
);

create_exception!(
    qmesh._core,
    AuditBlockError,
    PyException,
    "A stored statement-audit block that cannot be read: damaged, or not \
     one the audit wrote."
);

/// The binding's one error type: an error of one of the crates it wraps, an
/// OS error, or a Python error raised while converting arguments.
#[derive(Debug)]
pub enum Error {
    Wire(wire::Error),
    Pg(pg::Error),
    Relay(relay::Error),
    Os(io::Error),
    Tls(relay::tls::TlsError),
    AuditBlock(relay::AuditBlockError),
    Python(PyErr),
}

/// `Result` with the binding's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<wire::Error> for Error {
    fn from(err: wire::Error) -> Self {
        Error::Wire(err)
    }
}

impl From<pg::Error> for Error {
    fn from(err: pg::Error) -> Self {
        Error::Pg(err)
    }
}

impl From<relay::Error> for Error {
    fn from(err: relay::Error) -> Self {
        Error::Relay(err)
    }
}

impl From<io::Error> for Error {
    fn from(err: io::Error) -> Self {
        Error::Os(err)
    }
}

impl From<relay::tls::TlsError> for Error {
    fn from(err: relay::tls::TlsError) -> Self {
        Error::Tls(err)
    }
}

impl From<relay::AuditBlockError> for Error {
    fn from(err: relay::AuditBlockError) -> Self {
        Error::AuditBlock(err)
    }
}

impl From<PyErr> for Error {
    fn from(err: PyErr) -> Self {
        Error::Python(err)
    }
}

impl From<Error> for PyErr {
    fn from(err: Error) -> PyErr {
        match err {
            Error::Python(err) => err,
            Error::Wire(err) => wire_error(&err),
            Error::Pg(err) => pg_error(&err),
            Error::Os(err) => os_error(err),
            Error::Tls(err) => TlsError::new_err(err.to_string()),
            Error::AuditBlock(err) => AuditBlockError::new_err(err.to_string()),
            Error::Relay(err) => relay_error(err),
        }
    }
}

/// ``OSError(errno, strerror)``, as Python's own system calls raise it: the
/// constructor picks the subclass from errno, and callers can test
/// ``exc.errno`` (EMFILE, say) instead of parsing text.
fn os_error(err: io::Error) -> PyErr {
    match err.raw_os_error() {
        Some(errno) => {
            let text = err.to_string();
            let suffix = format!(" (os error {errno})");
            let strerror = text.strip_suffix(&suffix).unwrap_or(&text).to_owned();
            PyOSError::new_err((errno, strerror))
        }
        None => err.into(),
    }
}

/// The exception class for a wire error, with the error's own text.
fn wire_error(err: &wire::Error) -> PyErr {
    let msg = err.to_string();
    match err {
        wire::Error::Tampered => Tampered::new_err(msg),
        wire::Error::Replayed => Replayed::new_err(msg),
        wire::Error::Reordered => Reordered::new_err(msg),
        wire::Error::Truncated => Truncated::new_err(msg),
        wire::Error::FrameTooLarge => FrameTooLarge::new_err(msg),
        wire::Error::Malformed(_) | wire::Error::Undecodable(_) => Malformed::new_err(msg),
        wire::Error::Handshake(_) => HandshakeError::new_err(msg),
        wire::Error::InvalidArgument(_) => PyValueError::new_err(msg),
    }
}

/// The exception class for a Postgres wire error, with the error's own text.
fn pg_error(err: &pg::Error) -> PyErr {
    let msg = err.to_string();
    match err {
        pg::Error::TooLarge { .. } => PgMessageTooLarge::new_err(msg),
        pg::Error::Malformed(_) | pg::Error::Unanswered { .. } => PgMalformed::new_err(msg),
        pg::Error::Truncated => PgTruncated::new_err(msg),
        pg::Error::InvalidArgument(_) => PyValueError::new_err(msg),
    }
}

fn relay_error(err: relay::Error) -> PyErr {
    let msg = err.to_string();
    match err {
        relay::Error::Lost => PeerClosed::new_err(msg),
        relay::Error::Silent(_) => PeerSilent::new_err(msg),
        // The kind's own text: the class already says it is a bad frame.
        relay::Error::Frame(err) => wire_error(&err),
        relay::Error::Protocol(_) => ProtocolViolation::new_err(msg),
        // OSError(errno, text) is what Python's own socket calls raise: the
        // constructor picks the subclass (BrokenPipeError, ...) from errno.
        relay::Error::Socket(err) => PyOSError::new_err((err.errno, msg)),
        relay::Error::Seal(_) | relay::Error::InvalidArgument(_) => PyValueError::new_err(msg),
    }
}

/// Add the exception classes to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("FrameError", py.get_type::<FrameError>())?;
    m.add("Tampered", py.get_type::<Tampered>())?;
    m.add("Replayed", py.get_type::<Replayed>())?;
    m.add("Reordered", py.get_type::<Reordered>())?;
    m.add("Truncated", py.get_type::<Truncated>())?;
    m.add("FrameTooLarge", py.get_type::<FrameTooLarge>())?;
    m.add("Malformed", py.get_type::<Malformed>())?;
    m.add("HandshakeError", py.get_type::<HandshakeError>())?;
    m.add("PeerClosed", py.get_type::<PeerClosed>())?;
    m.add("PeerSilent", py.get_type::<PeerSilent>())?;
    m.add("ProtocolViolation", py.get_type::<ProtocolViolation>())?;
    m.add("PgWireError", py.get_type::<PgWireError>())?;
    m.add("PgMalformed", py.get_type::<PgMalformed>())?;
    m.add("PgMessageTooLarge", py.get_type::<PgMessageTooLarge>())?;
    m.add("PgTruncated", py.get_type::<PgTruncated>())?;
    m.add("TlsError", py.get_type::<TlsError>())?;
    m.add("AuditBlockError", py.get_type::<AuditBlockError>())?;
    Ok(())
}
