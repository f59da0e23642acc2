//! A bounds-checked cursor over one message body.
//!
//! Every read checks the remaining length first; a count read from the peer
//! is checked against the bytes that remain (times the least each item can
//! take) before anything is allocated for it, so a hostile count cannot make
//! a parser reserve more than the body it came in.

use crate::error::{malformed, Result};

/// Reads fields from the front of a message body.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    /// A reader over `buf`; `what` names the message in error texts.
    pub fn new(buf: &'a [u8], what: &'static str) -> Self {
        Reader { buf, pos: 0, what }
    }

    /// Bytes not yet read.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn short(&self, field: &str) -> crate::Error {
        malformed(format!(
            "{}: {field} runs past the end of the message",
            self.what
        ))
    }

    /// The next `n` bytes.
    pub fn bytes(&mut self, n: usize, field: &str) -> Result<&'a [u8]> {
        if self.remaining() < n {
            return Err(self.short(field));
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    pub fn u8(&mut self, field: &str) -> Result<u8> {
        Ok(self.bytes(1, field)?[0])
    }

    pub fn i16(&mut self, field: &str) -> Result<i16> {
        let b = self.bytes(2, field)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    pub fn i32(&mut self, field: &str) -> Result<i32> {
        let b = self.bytes(4, field)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn u32(&mut self, field: &str) -> Result<u32> {
        Ok(self.i32(field)? as u32)
    }

    /// A NUL-terminated string, without its terminator.
    pub fn cstr(&mut self, field: &str) -> Result<&'a [u8]> {
        let rest = &self.buf[self.pos..];
        match rest.iter().position(|&b| b == 0) {
            Some(end) => {
                self.pos += end + 1;
                Ok(&rest[..end])
            }
            None => Err(malformed(format!(
                "{}: {field} is not NUL-terminated",
                self.what
            ))),
        }
    }

    /// A NUL-terminated string that must be UTF-8 (names the protocol
    /// itself defines, like parameter names and SASL mechanisms).
    pub fn cstr_utf8(&mut self, field: &str) -> Result<&'a str> {
        let raw = self.cstr(field)?;
        std::str::from_utf8(raw)
            .map_err(|_| malformed(format!("{}: {field} is not valid UTF-8", self.what)))
    }

    /// Everything not yet read.
    pub fn rest(&mut self) -> &'a [u8] {
        let out = &self.buf[self.pos..];
        self.pos = self.buf.len();
        out
    }

    /// A count of items that each take at least `min_item` bytes: negative
    /// counts and counts that cannot fit in the rest of the body are refused
    /// here, before the caller allocates for them.
    pub fn count_i16(&mut self, field: &str, min_item: usize) -> Result<usize> {
        let n = self.i16(field)?;
        self.check_count(n as i64, field, min_item)
    }

    pub fn check_count(&self, n: i64, field: &str, min_item: usize) -> Result<usize> {
        if n < 0 {
            return Err(malformed(format!("{}: negative {field}", self.what)));
        }
        let n = n as usize;
        if n.saturating_mul(min_item) > self.remaining() {
            return Err(malformed(format!(
                "{}: {field} of {n} does not fit in the message",
                self.what
            )));
        }
        Ok(n)
    }

    /// A length-prefixed value (`i32` length, -1 for NULL).
    pub fn value(&mut self, field: &str) -> Result<Option<&'a [u8]>> {
        let len = self.i32(field)?;
        if len == -1 {
            return Ok(None);
        }
        if len < 0 {
            return Err(malformed(format!(
                "{}: negative length of {field}",
                self.what
            )));
        }
        Ok(Some(self.bytes(len as usize, field)?))
    }

    /// Fail if bytes are left over.
    pub fn finish(&self) -> Result<()> {
        if self.remaining() != 0 {
            return Err(malformed(format!(
                "{}: {} unexpected bytes at the end",
                self.what,
                self.remaining()
            )));
        }
        Ok(())
    }
}
