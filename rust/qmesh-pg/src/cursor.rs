//! Where a relayed stream of messages stands: between two messages, or
//! inside one.
//!
//! For a proxy that must end a connection with a message of its own (an
//! ErrorResponse when its upstream is lost): that message may only follow a
//! complete one, or the client would read it as the rest of a cut message.
//! The cursor only follows the framing; it checks nothing, since the bytes
//! were checked where they were made (the Gate's scanners).

use crate::scanner::HEADER_LEN;

/// Follows the framing of typed messages (a type byte, then an `i32` length
/// that counts itself) over bytes fed in any pieces.
#[derive(Debug, Clone, Default)]
pub struct MessageCursor {
    header: [u8; HEADER_LEN],
    header_len: usize,
    body_left: u64,
}

impl MessageCursor {
    pub fn new() -> Self {
        Self::default()
    }

    /// Account for `bytes`, the next ones of the stream.
    pub fn advance(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.body_left > 0 {
                let n = bytes
                    .len()
                    .min(usize::try_from(self.body_left).unwrap_or(usize::MAX));
                bytes = &bytes[n..];
                self.body_left -= n as u64;
                continue;
            }
            let n = bytes.len().min(HEADER_LEN - self.header_len);
            self.header[self.header_len..self.header_len + n].copy_from_slice(&bytes[..n]);
            self.header_len += n;
            bytes = &bytes[n..];
            if self.header_len == HEADER_LEN {
                let length = u32::from_be_bytes([
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]);
                self.body_left = u64::from(length).saturating_sub(4);
                self.header_len = 0;
            }
        }
    }

    /// Whether every message begun so far is complete.
    pub fn between_messages(&self) -> bool {
        self.header_len == 0 && self.body_left == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn between_messages_only_at_their_boundaries_however_the_bytes_are_split() {
        let stream = [
            message(b'Z', b"I"),
            message(b'D', &[7; 300]),
            message(b'1', b""),
            message(b'C', b"SELECT 1\0"),
        ];
        let mut boundaries = vec![0];
        let mut bytes = Vec::new();
        for m in &stream {
            bytes.extend_from_slice(m);
            boundaries.push(bytes.len());
        }
        for piece in [1, 2, 3, 5, 7, 64, bytes.len()] {
            let mut cursor = MessageCursor::new();
            let mut fed = 0;
            assert!(cursor.between_messages());
            for chunk in bytes.chunks(piece) {
                cursor.advance(chunk);
                fed += chunk.len();
                assert_eq!(
                    cursor.between_messages(),
                    boundaries.contains(&fed),
                    "piece {piece}, after {fed} bytes"
                );
            }
        }
    }

    #[test]
    fn a_huge_declared_length_is_only_counted() {
        let mut cursor = MessageCursor::new();
        cursor.advance(&[b'D', 0x7f, 0xff, 0xff, 0xff, 1, 2, 3]);
        assert!(!cursor.between_messages());
    }
}
