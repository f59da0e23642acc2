//! The one error type of the Postgres wire layer.
//!
//! Split by who is at fault: the peer sent bytes that are not the protocol
//! ([`Error::Malformed`], [`Error::TooLarge`], [`Error::Truncated`]), or our
//! own caller passed a bad argument ([`Error::InvalidArgument`]). Messages
//! never quote the peer's bytes beyond a type byte or a number: a malformed
//! message may well be a password.

use std::fmt;

/// Everything that can go wrong in this crate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// A length field announced more than the configured limit. Raised from
    /// the header alone: nothing of the body was awaited or allocated.
    TooLarge { length: u64, limit: usize },
    /// Not a valid message: an unknown type byte, a length below the minimum,
    /// a field that runs past the end, bytes left over, invalid UTF-8 where
    /// the protocol requires a name.
    Malformed(String),
    /// The stream ended inside a message (see `Scanner::eof`).
    Truncated,
    /// The caller passed a value the protocol cannot carry (a NUL inside a
    /// string, a body over 2 GiB, ...).
    InvalidArgument(String),
    /// More messages await their answers than a relay following the
    /// stream keeps track of (a client pipelining without reading them).
    Unanswered { waiting: usize, limit: usize },
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::TooLarge { length, limit } => write!(
                f,
                "message length {length} exceeds the limit of {limit} bytes"
            ),
            Error::Malformed(why) => write!(f, "malformed message: {why}"),
            Error::Truncated => f.write_str("stream ended inside a message"),
            Error::InvalidArgument(why) => f.write_str(why),
            Error::Unanswered { waiting, limit } => write!(
                f,
                "{waiting} statements await their answers, more than the limit of {limit}"
            ),
        }
    }
}

impl std::error::Error for Error {}

pub(crate) fn malformed(why: impl Into<String>) -> Error {
    Error::Malformed(why.into())
}
