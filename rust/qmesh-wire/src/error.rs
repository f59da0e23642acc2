//! The one error type of the wire layer.
//!
//! The variants are split by who is at fault, so callers can react without
//! parsing messages:
//!
//! * the peer (or the network) sent a bad frame stream: [`Error::Tampered`],
//!   [`Error::Replayed`], [`Error::Reordered`], [`Error::Truncated`],
//!   [`Error::FrameTooLarge`], [`Error::Malformed`];
//! * the Noise handshake failed: [`Error::Handshake`];
//! * our own caller passed a bad argument: [`Error::InvalidArgument`].
//!
//! Like pyca/cryptography's `InvalidTag`, a failed decryption says
//! [`Error::Tampered`] and nothing more: which byte was wrong is not
//! knowable, and guessing would only help an attacker.

use std::fmt;

/// Everything that can go wrong in this crate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The AEAD tag did not verify: header or payload altered, or the wrong key.
    Tampered,
    /// An authentic frame whose sequence number was already received.
    Replayed,
    /// An authentic frame whose sequence number is ahead of the next expected one.
    Reordered,
    /// The byte stream ended inside a frame.
    Truncated,
    /// A header announced more bytes than the decoder's limit.
    FrameTooLarge,
    /// Bad version, frame type, flags or reserved bits: judged before the
    /// frame is authenticated, so the line may be at fault.
    Malformed(String),
    /// An authentic frame that does not decode (a payload that does not
    /// decompress within the limit, sequence numbers exhausted): its
    /// sender is at fault, and sending it again would fail again.
    Undecodable(String),
    /// The Noise handshake failed: bad message, failed decryption, or misuse.
    Handshake(String),
    /// The caller passed a value outside the allowed range.
    InvalidArgument(String),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Tampered => f.write_str("frame authentication failed"),
            Error::Replayed => f.write_str("frame sequence number already received (replay)"),
            Error::Reordered => f.write_str("frame sequence number ahead of the expected one"),
            Error::Truncated => f.write_str("byte stream ended inside a frame"),
            Error::FrameTooLarge => f.write_str("frame length exceeds the decoder's limit"),
            Error::Malformed(why) => write!(f, "malformed frame: {why}"),
            Error::Undecodable(why) => write!(f, "undecodable frame: {why}"),
            Error::Handshake(why) => write!(f, "noise handshake failed: {why}"),
            Error::InvalidArgument(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for Error {}

impl From<snow::Error> for Error {
    fn from(err: snow::Error) -> Self {
        // snow's Display is coarse ("decrypt error", "diffie-hellman error",
        // ...): enough to debug, nothing an attacker can use.
        Error::Handshake(err.to_string())
    }
}
