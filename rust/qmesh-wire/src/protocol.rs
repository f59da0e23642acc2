//! The tunnel protocol's vocabulary above the codec: frame types, reset codes
//! and the codec of the `u16 code + UTF-8 reason` payload of RESET and GOAWAY.
//!
//! The codec itself never looks at a frame type beyond its class; these
//! definitions are for the two places that give frames meaning, the Rust
//! engine (`qmesh-relay`) and the Python session (`qmesh/tunnel/frames.py`,
//! which takes its values from here through `qmesh._core`). Defining them
//! once is what keeps the two ends of a stream speaking the same protocol;
//! `tests/test_engine_contract.py` holds them to it.
//!
//! See `docs/protocol.md` for what each frame carries.

use std::borrow::Cow;

use crate::error::{Error, Result};

/// Frame types: the header's second byte. Below
/// [`crate::CONTROL_TYPE_MIN`] they are reliable (kept until acknowledged,
/// resent after a reconnect); from it on they belong to one connection.
pub mod frame_type {
    /// JSON object naming the service; opens a stream.
    pub const OPEN: u8 = 0x01;
    /// Stream bytes.
    pub const DATA: u8 = 0x02;
    /// Empty: the sender sends no more DATA on this stream.
    pub const CLOSE: u8 = 0x03;
    /// `u16` code + UTF-8 reason: abort the stream both ways.
    pub const RESET: u8 = 0x04;
    /// `u32`: the receiver grants this many more bytes of credit.
    pub const WINDOW: u8 = 0x05;
    /// `u64`: the next reliable sequence the sender expects.
    pub const ACK: u8 = 0x10;
    /// `u64`, echoed in a PONG.
    pub const PING: u8 = 0x11;
    /// The PING's payload.
    pub const PONG: u8 = 0x12;
    /// `u16` code + UTF-8 reason: the session ends for good.
    pub const GOAWAY: u8 = 0x13;

    /// Every frame type of this protocol version, by name, in order.
    pub const ALL: [(&str, u8); 9] = [
        ("OPEN", OPEN),
        ("DATA", DATA),
        ("CLOSE", CLOSE),
        ("RESET", RESET),
        ("WINDOW", WINDOW),
        ("ACK", ACK),
        ("PING", PING),
        ("PONG", PONG),
        ("GOAWAY", GOAWAY),
    ];
}

/// RESET codes (GOAWAY carries a code too, always [`reset_code::CANCEL`] so far).
pub mod reset_code {
    /// The stream's owner closed it before both directions ended.
    pub const CANCEL: u16 = 0;
    /// No such service, or policy forbids it.
    pub const REFUSED: u16 = 1;
    /// The service could not reach its target.
    pub const CONNECT_FAILED: u16 = 2;
    /// The whole session ended.
    pub const SESSION_LOST: u16 = 3;
    /// The stream broke a rule (flow control, a bad OPEN).
    pub const PROTOCOL_ERROR: u16 = 4;
    /// The handler failed.
    pub const INTERNAL: u16 = 5;

    /// Every reset code, by name, in order.
    pub const ALL: [(&str, u16); 6] = [
        ("CANCEL", CANCEL),
        ("REFUSED", REFUSED),
        ("CONNECT_FAILED", CONNECT_FAILED),
        ("SESSION_LOST", SESSION_LOST),
        ("PROTOCOL_ERROR", PROTOCOL_ERROR),
        ("INTERNAL", INTERNAL),
    ];
}

/// Bytes of reason text a RESET or GOAWAY carries at most; the encoder cuts
/// longer ones and the decoder ignores anything beyond.
pub const MAX_REASON: usize = 1024;
/// Bytes of the code in front of the reason.
const CODE_LEN: usize = 2;

/// The payload of a RESET or GOAWAY: the code (`u16` big-endian), then the
/// reason's UTF-8 bytes, cut at [`MAX_REASON`] bytes.
///
/// The cut is by bytes, not characters, as every version so far has sent
/// it: a character cut in two is the decoder's to replace.
pub fn encode_reason(code: u16, reason: &str) -> Vec<u8> {
    let text = &reason.as_bytes()[..reason.len().min(MAX_REASON)];
    let mut payload = Vec::with_capacity(CODE_LEN + text.len());
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(text);
    payload
}

/// The code and reason of a RESET or GOAWAY payload. The reason is read as
/// UTF-8 with U+FFFD for what is not (a peer's text is never trusted to
/// be valid), and only its first [`MAX_REASON`] bytes count.
///
/// [`Error::Malformed`] when the payload is too short to hold the code.
pub fn decode_reason(payload: &[u8]) -> Result<(u16, Cow<'_, str>)> {
    let Some((code, text)) = payload.split_first_chunk::<CODE_LEN>() else {
        return Err(Error::Malformed("missing code".into()));
    };
    let text = &text[..text.len().min(MAX_REASON)];
    Ok((u16::from_be_bytes(*code), String::from_utf8_lossy(text)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{FrameClass, CONTROL_TYPE_MIN};

    #[test]
    fn frame_types_are_distinct_and_classed() {
        for (i, (name, t)) in frame_type::ALL.iter().enumerate() {
            assert!(FrameClass::of(*t).is_some(), "{name}");
            for (other, u) in &frame_type::ALL[i + 1..] {
                assert_ne!(t, u, "{name} and {other}");
            }
        }
        let reliable: Vec<&str> = frame_type::ALL
            .iter()
            .filter(|(_, t)| *t < CONTROL_TYPE_MIN)
            .map(|(name, _)| *name)
            .collect();
        assert_eq!(reliable, ["OPEN", "DATA", "CLOSE", "RESET", "WINDOW"]);
    }

    #[test]
    fn reset_codes_are_distinct() {
        for (i, (name, code)) in reset_code::ALL.iter().enumerate() {
            assert_eq!(usize::from(*code), i, "{name}");
        }
    }

    #[test]
    fn reason_round_trip() {
        let payload = encode_reason(reset_code::REFUSED, "no such service");
        assert_eq!(&payload[..2], &[0, 1]);
        let (code, reason) = decode_reason(&payload).unwrap();
        assert_eq!((code, reason.as_ref()), (1, "no such service"));
        assert_eq!(encode_reason(u16::MAX, ""), vec![0xFF, 0xFF]);
        assert_eq!(decode_reason(&[0xFF, 0xFF]).unwrap(), (u16::MAX, "".into()));
    }

    #[test]
    fn reason_is_cut_at_the_limit() {
        let long = "é".repeat(MAX_REASON); // 2 bytes each
        let payload = encode_reason(0, &long);
        assert_eq!(payload.len(), 2 + MAX_REASON);
        let (_, reason) = decode_reason(&payload).unwrap();
        assert_eq!(reason, "é".repeat(MAX_REASON / 2));
        // A character cut in two by the limit is replaced, not an error.
        let odd = format!("x{long}");
        let payload = encode_reason(0, &odd);
        let (_, reason) = decode_reason(&payload).unwrap();
        assert_eq!(
            reason,
            format!("x{}\u{FFFD}", "é".repeat(MAX_REASON / 2 - 1))
        );
        // A decoder ignores whatever a peer sends past the limit.
        let mut payload = vec![0, 2];
        payload.extend(std::iter::repeat_n(b'a', MAX_REASON + 10));
        assert_eq!(decode_reason(&payload).unwrap().1.len(), MAX_REASON);
    }

    #[test]
    fn reason_decoding_is_lossy_and_checks_the_code() {
        assert_eq!(
            decode_reason(b"\x00\x04ok\xffno").unwrap(),
            (4, "ok\u{FFFD}no".into())
        );
        assert!(matches!(decode_reason(b""), Err(Error::Malformed(_))));
        assert!(matches!(decode_reason(b"\x00"), Err(Error::Malformed(_))));
    }
}
