//! The one error type of the engine.
//!
//! The variants are split by who is at fault, because each calls for a
//! different reaction from the session:
//!
//! * the connection is gone ([`Error::Lost`], [`Error::Socket`]) or its bytes
//!   were damaged ([`Error::Frame`]): drop the connection, resume the
//!   session on a new one;
//! * the peer broke the protocol in frames that are authentic
//!   ([`Error::Protocol`]): resending the same frames would break it again,
//!   so the session is over;
//! * a native stream's Postgres bytes are not the protocol: not an error of
//!   the engine at all, but how that stream ends ([`crate::Ending::Postgres`]);
//! * the engine's own caller asked for something its state does not allow
//!   ([`Error::InvalidArgument`]).
//!
//! Every variant is plain data (`Clone + Eq`; an OS error is kept as its
//! errno): the connection's error is handed out on every `Engine::take`,
//! and a native stream's ending carries the part that ended it.

use std::fmt;
use std::io;
use std::time::Duration;

use qmesh_pg as pg;
use qmesh_wire as wire;

/// Which side of a native Postgres stream sent the bytes in question.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client, at the far end of the tunnel.
    Client,
    /// The server, behind the stream's socket.
    Server,
}

/// A protocol rule the peer broke in an authentic frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    /// An ACK or WINDOW payload of the wrong size.
    PayloadSize {
        frame_type: u8,
        expected: usize,
        got: usize,
    },
    /// A RESET too short to hold its code.
    MissingCode { frame_type: u8 },
    /// An acknowledgement of frames never sent.
    AckBeyondSent { acked: u64, sent: u64 },
    /// A resumption at a frame that is no longer held (the peer had
    /// acknowledged it before).
    ResumeBehind { resume: u64, oldest: u64 },
    /// More than the engine's `max_unacked` bytes left unacknowledged.
    Unacknowledged { bytes: usize },
    /// DATA beyond a stream's window, or after its CLOSE.
    FlowControl,
    /// The same oldest frame unacknowledged for longer than the heartbeat's
    /// `dead_after`, while the peer kept talking (it answers PINGs, say).
    NeverAcknowledged { for_: Duration },
    /// An authentic frame that does not decode ([`wire::Error::Undecodable`]):
    /// resent on the next connection, it would fail again.
    Undecodable(String),
}

/// A failed system call on a socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketError {
    /// The call (`"send"`, `"receive"`, `"shutdown"`).
    pub call: &'static str,
    /// The OS error number.
    pub errno: i32,
}

impl SocketError {
    /// Our calls report `errno` (see `sys.rs`); anything else counts as EIO
    /// rather than being lost.
    pub(crate) fn new(call: &'static str, err: &io::Error) -> SocketError {
        SocketError {
            call,
            errno: err.raw_os_error().unwrap_or(libc::EIO),
        }
    }

    pub fn os_error(&self) -> io::Error {
        io::Error::from_raw_os_error(self.errno)
    }
}

/// A native stream's Postgres scanner rejected bytes (framing, size, a
/// stream ending inside a message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgError {
    pub side: Side,
    pub error: pg::Error,
}

/// Everything that can go wrong in the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The peer closed the tunnel connection between frames.
    Lost,
    /// Nothing arrived on the connection for this long, past the
    /// heartbeat's `dead_after`: the peer is hung or cut off (a dead one
    /// refuses or resets). The session may resume elsewhere.
    Silent(Duration),
    /// The peer's bytes are not a valid frame stream; the wire error says how.
    /// Bytes damaged or injected in transit look exactly like this, so it
    /// ends the connection, not the session.
    Frame(wire::Error),
    /// The peer broke the tunnel protocol in authentic frames.
    Protocol(Violation),
    /// A system call on a socket failed.
    Socket(SocketError),
    /// Frames the engine was given cannot be sealed (the codec's own
    /// checks: a payload over its limit, a frame type out of range).
    Seal(wire::Error),
    /// The caller asked for something the engine's state does not allow.
    InvalidArgument(String),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Violation> for Error {
    fn from(violation: Violation) -> Self {
        Error::Protocol(violation)
    }
}

impl From<SocketError> for Error {
    fn from(err: SocketError) -> Self {
        Error::Socket(err)
    }
}

/// A frame type by name in messages (by number when it has none).
struct FrameName(u8);

impl fmt::Display for FrameName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match wire::frame_type::ALL.iter().find(|(_, t)| *t == self.0) {
            Some((name, _)) => f.write_str(name),
            None => write!(f, "{:#04x}", self.0),
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::PayloadSize {
                frame_type,
                expected,
                got,
            } => write!(
                f,
                "{} frame: expected {expected} bytes, got {got}",
                FrameName(*frame_type)
            ),
            Violation::MissingCode { frame_type } => {
                write!(f, "{} frame: missing code", FrameName(*frame_type))
            }
            Violation::AckBeyondSent { acked, sent } => {
                write!(f, "peer acknowledges {acked}, only {sent} frames were sent")
            }
            Violation::ResumeBehind { resume, oldest } => write!(
                f,
                "peer resumes at {resume}, but the oldest frame still held is {oldest}"
            ),
            Violation::Unacknowledged { bytes } => {
                write!(f, "peer left {} MiB unacknowledged", bytes >> 20)
            }
            Violation::FlowControl => f.write_str("flow-control window exceeded"),
            Violation::NeverAcknowledged { for_ } => {
                write!(
                    f,
                    "peer acknowledged nothing for {:.1}s",
                    for_.as_secs_f64()
                )
            }
            Violation::Undecodable(why) => write!(f, "peer sent an undecodable frame: {why}"),
        }
    }
}

impl fmt::Display for SocketError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} failed: {}", self.call, self.os_error())
    }
}

impl fmt::Display for PgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The client's faults are told to the client as they are; the
        // server's are marked, since the client did nothing wrong.
        match (self.side, &self.error) {
            (Side::Client, pg::Error::Truncated) => {
                f.write_str("the client's stream ended inside a message")
            }
            (Side::Client, error) => error.fmt(f),
            (Side::Server, error) => write!(f, "server: {error}"),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Lost => f.write_str("peer closed the connection"),
            Error::Silent(for_) => write!(f, "peer silent for {:.1}s", for_.as_secs_f64()),
            Error::Frame(err) => write!(f, "bad frame: {err}"),
            Error::Protocol(violation) => violation.fmt(f),
            Error::Socket(err) => err.fmt(f),
            Error::Seal(err) => write!(f, "cannot seal frames: {err}"),
            Error::InvalidArgument(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Frame(err) | Error::Seal(err) => Some(err),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages() {
        let ack = Violation::PayloadSize {
            frame_type: wire::frame_type::ACK,
            expected: 8,
            got: 3,
        };
        assert_eq!(ack.to_string(), "ACK frame: expected 8 bytes, got 3");
        let unknown = Violation::MissingCode { frame_type: 0x1F };
        assert_eq!(unknown.to_string(), "0x1f frame: missing code");
        let client = PgError {
            side: Side::Client,
            error: pg::Error::Truncated,
        };
        assert_eq!(
            client.to_string(),
            "the client's stream ended inside a message"
        );
        let server = PgError {
            side: Side::Server,
            error: pg::Error::Truncated,
        };
        assert_eq!(server.to_string(), "server: stream ended inside a message");
        let socket = SocketError::new("send", &io::Error::from_raw_os_error(libc::EPIPE));
        assert!(socket.to_string().starts_with("send failed: "), "{socket}");
        assert_eq!(socket.os_error().kind(), io::ErrorKind::BrokenPipe);
        assert_eq!(
            Error::Frame(wire::Error::Tampered).to_string(),
            "bad frame: frame authentication failed"
        );
    }
}
