//! The frame header, the wire constants and the nonce layout.
//!
//! Every frame is a 20-byte header followed by an AES-256-GCM ciphertext of
//! `length` bytes, the 16-byte tag included:
//!
//! ```text
//! 0  u8   version      (1)
//! 1  u8   frame type   (0x00-0x0F reliable, 0x10-0x1F control)
//! 2  u8   flags        (bit 0: payload is zstd-compressed; other bits 0)
//! 3  u8   reserved     (0)
//! 4  u32  stream id    (big-endian)
//! 8  u64  sequence     (big-endian; per direction and per class)
//! 16 u32  length       (big-endian; ciphertext bytes incl. the 16-byte tag)
//! ```
//!
//! The header is the AEAD associated data, so every field is authenticated.
//! The 12-byte nonce is `class || 0 0 0 || sequence (u64 BE)` with class 0 for
//! reliable frames and 1 for control frames: the two sequence spaces never
//! share a nonce under one key.
//!
//! This module only knows the layout; sequencing, sealing and buffering live
//! in [`crate::codec`].

use crate::error::{Error, Result};

/// Wire protocol version carried in every header.
pub const PROTOCOL_VERSION: u8 = 1;
/// Bytes in a frame header.
pub const HEADER_LEN: usize = 20;
/// Bytes of the AES-GCM tag at the end of every ciphertext.
pub const TAG_LEN: usize = 16;
/// Bytes in a frame key (AES-256).
pub const KEY_LEN: usize = 32;
/// Bytes in an AES-GCM nonce.
pub const NONCE_LEN: usize = 12;
/// Absolute cap on a frame's plaintext payload; a codec's `max_payload` may
/// not exceed it. It also bounds what a hostile header can make us buffer.
pub const MAX_PAYLOAD_LIMIT: usize = 16 * 1024 * 1024;
/// Header flag bit: the payload was zstd-compressed before sealing.
pub const FLAG_COMPRESSED: u8 = 0x01;
/// Every flag bit this version understands; any other bit is malformed.
pub const KNOWN_FLAGS: u8 = FLAG_COMPRESSED;
/// Frame types below this are reliable; `CONTROL_TYPE_MIN..FRAME_TYPE_LIMIT`
/// are control.
pub const CONTROL_TYPE_MIN: u8 = 0x10;
/// Frame types at or above this are malformed.
pub const FRAME_TYPE_LIMIT: u8 = 0x20;

// The largest possible frame must be describable by the u32 length field.
const _: () = assert!(MAX_PAYLOAD_LIMIT + TAG_LEN <= u32::MAX as usize);

/// The two sequence spaces. Reliable sequences continue across reconnects of
/// one session; control sequences restart at 0 on every connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameClass {
    Reliable,
    Control,
}

impl FrameClass {
    /// The class of a frame type, or `None` if the type is out of range.
    pub fn of(frame_type: u8) -> Option<FrameClass> {
        match frame_type {
            t if t < CONTROL_TYPE_MIN => Some(FrameClass::Reliable),
            t if t < FRAME_TYPE_LIMIT => Some(FrameClass::Control),
            _ => None,
        }
    }

    /// The first byte of the nonce.
    fn nonce_byte(self) -> u8 {
        match self {
            FrameClass::Reliable => 0,
            FrameClass::Control => 1,
        }
    }
}

/// The AES-GCM nonce for a frame: `class || 0 0 0 || seq (u64 BE)`.
pub fn nonce(class: FrameClass, seq: u64) -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    n[0] = class.nonce_byte();
    n[4..].copy_from_slice(&seq.to_be_bytes());
    n
}

/// A parsed, validated frame header (the version is implied: always
/// [`PROTOCOL_VERSION`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub frame_type: u8,
    pub flags: u8,
    pub stream_id: u32,
    pub seq: u64,
    /// Ciphertext bytes following the header, the tag included.
    pub length: u32,
}

impl Header {
    /// Serialise into the first [`HEADER_LEN`] bytes of `out`.
    pub fn write_to(&self, out: &mut [u8; HEADER_LEN]) {
        out[0] = PROTOCOL_VERSION;
        out[1] = self.frame_type;
        out[2] = self.flags;
        out[3] = 0;
        out[4..8].copy_from_slice(&self.stream_id.to_be_bytes());
        out[8..16].copy_from_slice(&self.seq.to_be_bytes());
        out[16..20].copy_from_slice(&self.length.to_be_bytes());
    }

    /// The serialised header.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        self.write_to(&mut out);
        out
    }

    /// Parse and validate a header from its bytes alone, before any of the
    /// body is buffered. `max_payload` is the decoder's plaintext limit: a
    /// length beyond `max_payload + TAG_LEN` is [`Error::FrameTooLarge`], so
    /// a hostile length field never makes the caller wait for (or allocate)
    /// more than the limit.
    ///
    /// Nothing here is authenticated yet: a header that passes may still fail
    /// the AEAD check.
    pub fn parse(bytes: &[u8; HEADER_LEN], max_payload: usize) -> Result<Header> {
        let version = bytes[0];
        if version != PROTOCOL_VERSION {
            return Err(Error::Malformed(format!(
                "unsupported protocol version {version}"
            )));
        }
        let frame_type = bytes[1];
        if frame_type >= FRAME_TYPE_LIMIT {
            return Err(Error::Malformed(format!(
                "unknown frame type {frame_type:#04x}"
            )));
        }
        let flags = bytes[2];
        if flags & !KNOWN_FLAGS != 0 {
            return Err(Error::Malformed(format!("unknown flag bits {flags:#04x}")));
        }
        if bytes[3] != 0 {
            return Err(Error::Malformed("reserved header byte is not zero".into()));
        }
        let length = u32::from_be_bytes(bytes[16..20].try_into().expect("4 bytes"));
        if (length as usize) < TAG_LEN {
            return Err(Error::Malformed(format!(
                "length {length} is shorter than the tag"
            )));
        }
        if length as usize > max_payload + TAG_LEN {
            return Err(Error::FrameTooLarge);
        }
        Ok(Header {
            frame_type,
            flags,
            stream_id: u32::from_be_bytes(bytes[4..8].try_into().expect("4 bytes")),
            seq: u64::from_be_bytes(bytes[8..16].try_into().expect("8 bytes")),
            length,
        })
    }

    /// The sequence space this frame belongs to.
    pub fn class(&self) -> FrameClass {
        FrameClass::of(self.frame_type).expect("validated frame type")
    }

    /// Header and ciphertext together.
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + self.length as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            frame_type: 0x11,
            flags: FLAG_COMPRESSED,
            stream_id: 7,
            seq: 42,
            length: 100,
        }
    }

    #[test]
    fn header_round_trip() {
        let h = header();
        let bytes = h.to_bytes();
        assert_eq!(bytes[0], PROTOCOL_VERSION);
        assert_eq!(Header::parse(&bytes, MAX_PAYLOAD_LIMIT), Ok(h));
        assert_eq!(h.class(), FrameClass::Control);
        assert_eq!(h.frame_len(), 120);
    }

    #[test]
    fn header_rejects_bad_fields() {
        let good = header().to_bytes();
        let cases: [(usize, u8); 5] = [(0, 2), (1, 0x20), (1, 0xFF), (2, 0x02), (3, 1)];
        for (at, value) in cases {
            let mut b = good;
            b[at] = value;
            assert!(
                matches!(
                    Header::parse(&b, MAX_PAYLOAD_LIMIT),
                    Err(Error::Malformed(_))
                ),
                "byte {at} = {value:#x}"
            );
        }
        let mut b = good;
        b[16..20].copy_from_slice(&15u32.to_be_bytes());
        assert!(matches!(
            Header::parse(&b, MAX_PAYLOAD_LIMIT),
            Err(Error::Malformed(_))
        ));
    }

    #[test]
    fn header_length_limits() {
        let mut b = header().to_bytes();
        b[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(
            Header::parse(&b, MAX_PAYLOAD_LIMIT),
            Err(Error::FrameTooLarge)
        );
        b[16..20].copy_from_slice(&(1024 + TAG_LEN as u32).to_be_bytes());
        assert!(Header::parse(&b, 1024).is_ok());
        b[16..20].copy_from_slice(&(1025 + TAG_LEN as u32).to_be_bytes());
        assert_eq!(Header::parse(&b, 1024), Err(Error::FrameTooLarge));
    }

    #[test]
    fn nonce_layout() {
        assert_eq!(
            nonce(FrameClass::Reliable, 1),
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]
        );
        assert_eq!(
            nonce(FrameClass::Control, 0x0102_0304_0506_0708),
            [1, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8]
        );
    }

    #[test]
    fn classes() {
        assert_eq!(FrameClass::of(0), Some(FrameClass::Reliable));
        assert_eq!(FrameClass::of(0x0F), Some(FrameClass::Reliable));
        assert_eq!(FrameClass::of(0x10), Some(FrameClass::Control));
        assert_eq!(FrameClass::of(0x1F), Some(FrameClass::Control));
        assert_eq!(FrameClass::of(0x20), None);
    }
}
