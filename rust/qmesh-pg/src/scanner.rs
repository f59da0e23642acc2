//! The batch scanner: feed it a buffer, it finds the message boundaries and
//! reports only the messages the caller asked to see.
//!
//! A proxy relays whole buffers and looks inside a few message kinds (Query
//! and Parse text, ReadyForQuery, ErrorResponse, CommandComplete, ...). The
//! scanner makes that cheap: a message whose kind is not asked for costs one
//! header check and is never copied, however large it is, so a 64 MiB
//! DataRow is relayed as it arrives rather than buffered.
//!
//! Each kind is in one of three classes, set per scanner and changeable
//! between feeds:
//!
//! * **full**: buffered until complete, then reported whole (header
//!   included), up to `max_message` bytes;
//! * **peek**: reported by its header and first `peek_max` body bytes (the
//!   whole message when it is no longer than that), the rest passed on;
//! * everything else: not reported.
//!
//! In **relay** mode the scanner also hands back the bytes to forward, in
//! order, through [`Sink::pass`]: the concatenation of every `pass` slice and
//! every reported `raw` is exactly the input. A caller that wants to rewrite
//! a full message sends something else instead of its `raw`; a peek prefix
//! (`complete == false`) must be sent as it is, since the rest of its
//! message follows as pass bytes. In **observe** mode `pass` is never
//! called: the caller forwards its input itself and only looks at the
//! reports.
//!
//! Invariants:
//!
//! * the five header bytes are checked (known type byte for the direction,
//!   `4 <= length <= max_message`) as soon as they are in, before any body
//!   byte is awaited or a buffer is sized: a 1 GiB length field fails with
//!   [`Error::TooLarge`] without allocating;
//! * a buffer never grows past the length its header declared, and grows
//!   with the bytes that actually arrived, not with the declared length;
//! * the events for a byte stream do not depend on how it is split into
//!   feeds (the proptest in `tests/scanner_prop.rs` checks this);
//! * after its first error the scanner is poisoned and repeats that error.

use crate::error::{malformed, Error, Result};

/// Bytes in a message header: the type byte and the `i32` length.
pub const HEADER_LEN: usize = 5;
/// Default cap on one message (the length field's value): 256 MiB, room for
/// a 64 MiB bytea sent as hex (128 MiB of text) with plenty to spare.
pub const DEFAULT_MAX_MESSAGE: usize = 256 * 1024 * 1024;
/// Default number of body bytes reported for a peek kind.
pub const DEFAULT_PEEK_MAX: usize = 1024;
/// The largest `max_message` accepted: the length field is an `i32`.
pub const MAX_MESSAGE_LIMIT: usize = i32::MAX as usize;

/// Type bytes a client may send after the startup packet.
pub const FRONTEND_TAGS: &[u8] = b"BCDEFHPQSXcdfp";
/// Type bytes a server may send.
pub const BACKEND_TAGS: &[u8] = b"123ACDEGHIKNRSTVWZcdnstv";

/// Which side's messages a scanner reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Client to server.
    Frontend,
    /// Server to client.
    Backend,
}

impl Direction {
    /// Every type byte valid in this direction.
    pub fn tags(self) -> &'static [u8] {
        match self {
            Direction::Frontend => FRONTEND_TAGS,
            Direction::Backend => BACKEND_TAGS,
        }
    }

    /// The direction's name: `"frontend"` or `"backend"`.
    pub fn name(self) -> &'static str {
        match self {
            Direction::Frontend => "frontend",
            Direction::Backend => "backend",
        }
    }
}

/// A set of message type bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TagSet([u64; 4]);

impl TagSet {
    pub const EMPTY: TagSet = TagSet([0; 4]);

    pub fn from_bytes(tags: &[u8]) -> Self {
        let mut set = TagSet::EMPTY;
        for &t in tags {
            set.0[(t >> 6) as usize] |= 1 << (t & 63);
        }
        set
    }

    pub fn is_empty(&self) -> bool {
        self.0 == [0; 4]
    }

    pub fn contains(&self, tag: u8) -> bool {
        self.0[(tag >> 6) as usize] & (1 << (tag & 63)) != 0
    }

    /// The members, in ascending order.
    pub fn to_bytes(&self) -> Vec<u8> {
        (0..=255u8).filter(|&t| self.contains(t)).collect()
    }
}

/// Settings for a [`Scanner`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScannerConfig {
    pub direction: Direction,
    /// Kinds reported whole.
    pub full: TagSet,
    /// Kinds reported by their first `peek_max` body bytes.
    pub peek: TagSet,
    /// Hand back the bytes to forward (see the module documentation).
    pub relay: bool,
    /// The largest length field accepted (it counts its own four bytes).
    pub max_message: usize,
    pub peek_max: usize,
}

impl ScannerConfig {
    /// Report nothing, observe mode, default limits.
    pub fn new(direction: Direction) -> Self {
        ScannerConfig {
            direction,
            full: TagSet::EMPTY,
            peek: TagSet::EMPTY,
            relay: false,
            max_message: DEFAULT_MAX_MESSAGE,
            peek_max: DEFAULT_PEEK_MAX,
        }
    }
}

/// Where a scanner puts what it finds.
pub trait Sink {
    /// Relay mode only: bytes to forward as they are.
    fn pass(&mut self, bytes: &[u8]);
    /// A reported message. `raw` starts with the type byte and the length;
    /// it is the whole message when `complete`, else a peek prefix.
    fn message(&mut self, tag: u8, raw: &[u8], complete: bool);
}

#[derive(Debug)]
enum Body {
    /// Not reported: passed on (relay) or skipped (observe).
    Pass,
    /// Reported whole once complete; the buffer holds the header too.
    Full(Vec<u8>),
    /// Reported once `peek_max` body bytes are in (the message is longer).
    Peek(Vec<u8>),
}

#[derive(Debug)]
struct Current {
    tag: u8,
    /// The whole message's size, header included.
    total: usize,
    /// Body bytes not yet seen.
    remaining: usize,
    body: Body,
}

/// Finds message boundaries in one direction of one connection.
#[derive(Debug)]
pub struct Scanner {
    config: ScannerConfig,
    valid: TagSet,
    header: [u8; HEADER_LEN],
    header_len: usize,
    current: Option<Current>,
    poisoned: Option<Error>,
    messages: u64,
}

impl Scanner {
    /// A scanner; [`Error::InvalidArgument`] for limits out of range.
    pub fn new(config: ScannerConfig) -> Result<Self> {
        if config.max_message < 4 || config.max_message > MAX_MESSAGE_LIMIT {
            return Err(Error::InvalidArgument(format!(
                "max_message must be in 4..={MAX_MESSAGE_LIMIT}, got {}",
                config.max_message
            )));
        }
        Ok(Scanner {
            config,
            valid: TagSet::from_bytes(config.direction.tags()),
            header: [0; HEADER_LEN],
            header_len: 0,
            current: None,
            poisoned: None,
            messages: 0,
        })
    }

    pub fn config(&self) -> &ScannerConfig {
        &self.config
    }

    /// Change the kinds reported whole. Applies from the next message whose
    /// header is not yet complete; one already being collected keeps its class.
    pub fn set_full(&mut self, full: TagSet) {
        self.config.full = full;
    }

    /// Change the kinds reported by a prefix (same timing as [`Self::set_full`]).
    pub fn set_peek(&mut self, peek: TagSet) {
        self.config.peek = peek;
    }

    /// Messages whose last byte has been scanned.
    pub fn messages(&self) -> u64 {
        self.messages
    }

    /// Bytes held inside the scanner (a partial header, a message being
    /// collected). In relay mode these have not been handed back yet.
    pub fn buffered(&self) -> usize {
        let body = match &self.current {
            Some(Current {
                body: Body::Full(buf) | Body::Peek(buf),
                ..
            }) => buf.len(),
            _ => 0,
        };
        self.header_len + body
    }

    /// Hand over the bytes held inside (a partial header, or the start of a
    /// message collected whole) and stand between messages again: for
    /// passing the rest of a stream, from a message boundary, to another
    /// reader. A message being passed on or peeked at has already left in
    /// part, so its bytes here are not a boundary: `None` then, and the
    /// scanner is unchanged.
    pub fn take_partial(&mut self) -> Option<Vec<u8>> {
        let mut partial = self.header[..self.header_len].to_vec();
        match &mut self.current {
            None => {}
            Some(Current {
                body: Body::Full(buf),
                ..
            }) => partial = std::mem::take(buf),
            Some(_) => return None,
        }
        self.header_len = 0;
        self.current = None;
        Some(partial)
    }

    /// Whether the scanner is inside a message (or its header).
    pub fn in_message(&self) -> bool {
        self.header_len > 0 || self.current.is_some()
    }

    /// The transport ended: [`Error::Truncated`] if it ended inside a message.
    pub fn eof(&self) -> Result<()> {
        if let Some(err) = &self.poisoned {
            return Err(err.clone());
        }
        if self.in_message() {
            return Err(Error::Truncated);
        }
        Ok(())
    }

    /// Scan `data`, reporting to `sink`. On error nothing more is reported,
    /// ever (the scanner is poisoned); what was reported before stands.
    pub fn feed<S: Sink>(&mut self, data: &[u8], sink: &mut S) -> Result<()> {
        if let Some(err) = &self.poisoned {
            return Err(err.clone());
        }
        let result = self.feed_inner(data, sink);
        if let Err(err) = &result {
            self.poisoned = Some(err.clone());
            self.current = None;
            self.header_len = 0;
        }
        result
    }

    fn feed_inner<S: Sink>(&mut self, mut input: &[u8], sink: &mut S) -> Result<()> {
        while !input.is_empty() {
            if self.current.is_none() {
                if self.header_len == 0 && input.len() >= HEADER_LEN {
                    let mut header = [0u8; HEADER_LEN];
                    header.copy_from_slice(&input[..HEADER_LEN]);
                    let current = self.classify(&header)?;
                    // Fast path: a whole reported message inside this input
                    // is handed over without being copied.
                    if let Body::Full(_) = current.body {
                        if input.len() >= current.total {
                            sink.message(current.tag, &input[..current.total], true);
                            self.messages += 1;
                            input = &input[current.total..];
                            continue;
                        }
                    }
                    input = &input[HEADER_LEN..];
                    self.begin(current, &header, sink);
                } else {
                    let take = (HEADER_LEN - self.header_len).min(input.len());
                    self.header[self.header_len..self.header_len + take]
                        .copy_from_slice(&input[..take]);
                    self.header_len += take;
                    input = &input[take..];
                    if self.header_len < HEADER_LEN {
                        return Ok(());
                    }
                    let header = self.header;
                    self.header_len = 0;
                    let current = self.classify(&header)?;
                    self.begin(current, &header, sink);
                }
                if self.current.is_none() {
                    continue; // an empty body: already reported
                }
            }
            input = self.body(input, sink);
        }
        Ok(())
    }

    /// Check a complete header and decide how its message is handled.
    fn classify(&self, header: &[u8; HEADER_LEN]) -> Result<Current> {
        let tag = header[0];
        if !self.valid.contains(tag) {
            let side = self.config.direction.name();
            return Err(malformed(format!(
                "invalid {side} message type {}",
                describe_tag(tag)
            )));
        }
        let length = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        if length > self.config.max_message {
            return Err(Error::TooLarge {
                length: length as u64,
                limit: self.config.max_message,
            });
        }
        if length < 4 {
            return Err(malformed(format!(
                "message {} has length {length} (below 4)",
                describe_tag(tag)
            )));
        }
        let body_len = length - 4;
        let full = self.config.full.contains(tag)
            || (self.config.peek.contains(tag) && body_len <= self.config.peek_max);
        let body = if full {
            Body::Full(Vec::new())
        } else if self.config.peek.contains(tag) {
            Body::Peek(Vec::new())
        } else {
            Body::Pass
        };
        Ok(Current {
            tag,
            total: length + 1,
            remaining: body_len,
            body,
        })
    }

    /// Start a message whose header was just consumed.
    fn begin<S: Sink>(&mut self, mut current: Current, header: &[u8; HEADER_LEN], sink: &mut S) {
        match &mut current.body {
            Body::Pass => {
                if self.config.relay {
                    sink.pass(header);
                }
            }
            Body::Full(buf) | Body::Peek(buf) => buf.extend_from_slice(header),
        }
        if current.remaining == 0 {
            self.finish(current, sink);
        } else {
            self.current = Some(current);
        }
    }

    /// Consume body bytes of the current message; returns what is left.
    fn body<'i, S: Sink>(&mut self, input: &'i [u8], sink: &mut S) -> &'i [u8] {
        let relay = self.config.relay;
        let peek_max = self.config.peek_max;
        let current = self.current.as_mut().expect("inside a message");
        let n = current.remaining.min(input.len());
        let (chunk, rest) = input.split_at(n);
        current.remaining -= n;
        match &mut current.body {
            Body::Pass => {
                if relay {
                    sink.pass(chunk);
                }
            }
            Body::Full(buf) => grow(buf, chunk, current.total),
            Body::Peek(buf) => {
                let want = HEADER_LEN + peek_max - buf.len();
                let k = want.min(chunk.len());
                grow(buf, &chunk[..k], HEADER_LEN + peek_max);
                if buf.len() == HEADER_LEN + peek_max {
                    // A peek message is longer than peek_max, so its prefix
                    // is always complete before the message is.
                    sink.message(current.tag, buf, false);
                    current.body = Body::Pass;
                    if relay && k < chunk.len() {
                        sink.pass(&chunk[k..]);
                    }
                }
            }
        }
        if current.remaining == 0 {
            let current = self.current.take().expect("inside a message");
            self.finish(current, sink);
        }
        rest
    }

    fn finish<S: Sink>(&mut self, current: Current, sink: &mut S) {
        if let Body::Full(buf) = &current.body {
            sink.message(current.tag, buf, true);
        }
        self.messages += 1;
    }
}

/// Append `chunk`, growing the buffer geometrically but never past `total`.
fn grow(buf: &mut Vec<u8>, chunk: &[u8], total: usize) {
    let needed = buf.len() + chunk.len();
    if needed > buf.capacity() {
        let target = needed.max(buf.capacity() * 2).min(total).max(needed);
        buf.reserve_exact(target - buf.len());
    }
    buf.extend_from_slice(chunk);
}

/// A type byte for an error message: the character when printable.
pub fn describe_tag(tag: u8) -> String {
    if tag.is_ascii_graphic() {
        format!("'{}'", tag as char)
    } else {
        format!("0x{tag:02x}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encode;

    #[derive(Default, Debug)]
    struct Collect {
        passed: Vec<u8>,
        events: Vec<(u8, Vec<u8>, bool)>,
        out: Vec<u8>,
    }

    impl Sink for Collect {
        fn pass(&mut self, bytes: &[u8]) {
            self.passed.extend_from_slice(bytes);
            self.out.extend_from_slice(bytes);
        }
        fn message(&mut self, tag: u8, raw: &[u8], complete: bool) {
            self.events.push((tag, raw.to_vec(), complete));
            self.out.extend_from_slice(raw);
        }
    }

    fn scanner(direction: Direction, full: &[u8], peek: &[u8], relay: bool) -> Scanner {
        Scanner::new(ScannerConfig {
            full: TagSet::from_bytes(full),
            peek: TagSet::from_bytes(peek),
            relay,
            peek_max: 8,
            ..ScannerConfig::new(direction)
        })
        .unwrap()
    }

    #[test]
    fn reports_only_what_was_asked() {
        let mut stream = Vec::new();
        stream.extend(encode::message(b'T', &[0, 0]).unwrap());
        stream.extend(encode::message(b'D', &[7u8; 1000]).unwrap());
        stream.extend(encode::message(b'C', b"SELECT 1\0").unwrap());
        stream.extend(encode::message(b'Z', b"I").unwrap());
        let mut s = scanner(Direction::Backend, b"CZ", b"", false);
        let mut sink = Collect::default();
        s.feed(&stream, &mut sink).unwrap();
        let tags: Vec<u8> = sink.events.iter().map(|e| e.0).collect();
        assert_eq!(tags, b"CZ");
        assert!(sink.passed.is_empty());
        assert_eq!(s.messages(), 4);
        assert!(s.eof().is_ok());
    }

    #[test]
    fn relay_output_is_the_input_and_peek_reports_a_prefix() {
        let mut stream = Vec::new();
        stream.extend(encode::message(b'B', &[1u8; 100]).unwrap());
        stream.extend(encode::message(b'E', &[0, 0, 0, 0, 0]).unwrap());
        stream.extend(encode::message(b'd', &[2u8; 50]).unwrap());
        stream.extend(encode::message(b'Q', b"select 1\0").unwrap());
        stream.extend(encode::message(b'S', b"").unwrap());
        for split in 1..stream.len() {
            let mut s = scanner(Direction::Frontend, b"QS", b"BE", true);
            let mut sink = Collect::default();
            s.feed(&stream[..split], &mut sink).unwrap();
            s.feed(&stream[split..], &mut sink).unwrap();
            assert_eq!(sink.out, stream);
            let got: Vec<(u8, usize, bool)> =
                sink.events.iter().map(|e| (e.0, e.1.len(), e.2)).collect();
            assert_eq!(
                got,
                vec![
                    (b'B', 13, false),
                    (b'E', 10, true),
                    (b'Q', 14, true),
                    (b'S', 5, true)
                ]
            );
        }
    }

    #[test]
    fn hostile_length_is_refused_from_the_header() {
        let mut s = scanner(Direction::Frontend, b"Q", b"", true);
        let mut sink = Collect::default();
        let header = [b'Q', 0x40, 0, 0, 0]; // 1 GiB
        assert!(matches!(
            s.feed(&header, &mut sink),
            Err(Error::TooLarge { length, .. }) if length == 1 << 30
        ));
        assert_eq!(s.buffered(), 0);
        // Poisoned.
        assert!(s.feed(b"anything", &mut sink).is_err());
        assert!(s.eof().is_err());
    }

    #[test]
    fn unknown_type_and_short_length() {
        let mut s = scanner(Direction::Frontend, b"", b"", false);
        let err = s.feed(b"Z\0\0\0\x04", &mut Collect::default()).unwrap_err();
        assert!(err
            .to_string()
            .contains("invalid frontend message type 'Z'"));
        let mut s = scanner(Direction::Backend, b"", b"", false);
        let err = s.feed(b"Z\0\0\0\x03", &mut Collect::default()).unwrap_err();
        assert!(matches!(err, Error::Malformed(_)));
    }

    #[test]
    fn truncated_at_eof() {
        let mut s = scanner(Direction::Frontend, b"Q", b"", true);
        let mut sink = Collect::default();
        s.feed(b"Q\0\0\0\x10sel", &mut sink).unwrap();
        assert!(sink.events.is_empty() && sink.out.is_empty());
        assert_eq!(s.buffered(), 8);
        assert_eq!(s.eof(), Err(Error::Truncated));
    }

    #[test]
    fn large_pass_messages_are_never_buffered() {
        let mut s = scanner(Direction::Backend, b"Z", b"", false);
        let mut sink = Collect::default();
        let length: u32 = 200 * 1024 * 1024;
        let mut header = vec![b'D'];
        header.extend(length.to_be_bytes());
        s.feed(&header, &mut sink).unwrap();
        let chunk = vec![0u8; 1 << 20];
        for _ in 0..199 {
            s.feed(&chunk, &mut sink).unwrap();
            assert_eq!(s.buffered(), 0);
        }
        s.feed(
            &vec![0u8; (length as usize - 4) - 199 * (1 << 20)],
            &mut sink,
        )
        .unwrap();
        s.feed(b"Z\0\0\0\x05I", &mut sink).unwrap();
        assert_eq!(sink.events.len(), 1);
        assert_eq!(s.messages(), 2);
    }

    #[test]
    fn full_buffer_grows_with_data_not_with_the_declared_length() {
        let mut s = scanner(Direction::Frontend, b"Q", b"", true);
        let mut sink = Collect::default();
        let length: u32 = 100 * 1024 * 1024;
        let mut header = vec![b'Q'];
        header.extend(length.to_be_bytes());
        s.feed(&header, &mut sink).unwrap();
        s.feed(b"select", &mut sink).unwrap();
        let held = s.buffered();
        assert_eq!(held, 11);
        if let Some(Current {
            body: Body::Full(buf),
            ..
        }) = &s.current
        {
            assert!(buf.capacity() < 1024, "capacity {}", buf.capacity());
        } else {
            panic!("not collecting");
        }
    }
}
