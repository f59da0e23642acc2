//! Sans-IO frame codec: [`FrameEncoder`] seals frames for one direction of one
//! connection, [`FrameDecoder`] opens them (h11 style: [`FrameDecoder::feed`]
//! only buffers, [`FrameDecoder::next_frame`] returns what is complete).
//!
//! Not for: I/O, timers, retransmission or acknowledgement. Resumption is
//! the caller's business; this module only lets it start the reliable
//! counters where the previous connection left off.
//!
//! Invariants:
//!
//! * A key is used for one direction only, and each `(class, seq)` pair is
//!   sealed at most once under it: the encoder's counters only move forward,
//!   and it refuses to wrap them. So no AES-GCM nonce is ever reused.
//! * The decoder checks everything it can from the 20-byte header alone
//!   (version, type, flags, reserved byte, length limit) before it waits for
//!   the body, so a hostile length field never makes it allocate.
//! * The decoder authenticates before it judges the sequence number: a
//!   forged header fails as [`Error::Tampered`], and only an authentic old
//!   frame is [`Error::Replayed`] (an authentic future one, [`Error::Reordered`]).
//! * After its first error a decoder is poisoned and repeats that error on
//!   every later call: a frame stream with a hole in it is never resumed.

use std::io::Cursor;

use bytes::{Buf, Bytes, BytesMut};
use zstd::bulk::{Compressor, Decompressor};
use zstd::zstd_safe;

use crate::aead::Cipher;
use crate::entropy::looks_incompressible;
use crate::error::{Error, Result};
use crate::frame::{
    nonce, FrameClass, Header, FLAG_COMPRESSED, HEADER_LEN, MAX_PAYLOAD_LIMIT, TAG_LEN,
};

/// zstd levels the encoder accepts.
pub const MIN_LEVEL: i32 = 1;
/// zstd levels the encoder accepts.
pub const MAX_LEVEL: i32 = 19;
/// Default zstd level.
pub const DEFAULT_LEVEL: i32 = 3;
/// Default threshold below which payloads are never compressed.
pub const DEFAULT_MIN_COMPRESS: usize = 64;
/// Payloads below this size are "small": zstd's fixed cost per call (about
/// 5 µs at level 3, whatever the size) is more than most of them save.
pub const SMALL_PAYLOAD: usize = 1024;
/// After this many small payloads in a row that did not shrink, the encoder
/// stops trying on small payloads...
const SMALL_MISSES_TO_SKIP: u32 = 4;
/// ...except every this many, to notice when small payloads start to
/// compress again; each probe that fails doubles the interval, up to the
/// most (a probe is a compression's full fixed cost: one in 16 was still
/// a tenth of what sealing a Postgres round trip costs).
const SMALL_PROBE_EVERY: u32 = 16;
const SMALL_PROBE_MOST: u32 = 256;
/// The encoder keeps at most this much scratch capacity between batches, so
/// one 16 MiB frame does not pin 16 MiB per connection for its lifetime.
const SCRATCH_RETAIN: usize = 256 * 1024;
/// A compressed body is sent only if it saves at least this many bytes and
/// at least 1/`WORTH_FRACTION` of the payload. Anything less buys the link
/// next to nothing (a 109-byte Parse, Bind, Execute and Sync shrinks by 1
/// to 5 bytes) and costs the receiver a decompression.
const WORTH_BYTES: usize = 16;
const WORTH_FRACTION: usize = 16;

/// Whether `packed` bytes in place of `plain` are worth a decompression.
fn worth_sending(plain: usize, packed: usize) -> bool {
    packed + WORTH_BYTES.max(plain / WORTH_FRACTION) <= plain
}

fn check_max_payload(max_payload: usize) -> Result<()> {
    if max_payload > MAX_PAYLOAD_LIMIT {
        return Err(Error::InvalidArgument(format!(
            "max_payload must be at most {MAX_PAYLOAD_LIMIT}, got {max_payload}"
        )));
    }
    Ok(())
}

/// Settings for a [`FrameEncoder`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncoderConfig {
    /// Sequence number of the first reliable frame (resumption continues the
    /// previous connection's count).
    pub reliable_seq: u64,
    /// zstd level, `MIN_LEVEL..=MAX_LEVEL`.
    pub level: i32,
    /// Largest plaintext payload accepted, at most [`MAX_PAYLOAD_LIMIT`].
    pub max_payload: usize,
    /// Payloads shorter than this are never compressed.
    pub min_compress: usize,
}

impl Default for EncoderConfig {
    fn default() -> Self {
        EncoderConfig {
            reliable_seq: 0,
            level: DEFAULT_LEVEL,
            max_payload: MAX_PAYLOAD_LIMIT,
            min_compress: DEFAULT_MIN_COMPRESS,
        }
    }
}

/// Settings for a [`FrameDecoder`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecoderConfig {
    /// Sequence number of the next reliable frame expected.
    pub reliable_seq: u64,
    /// Largest plaintext payload accepted, at most [`MAX_PAYLOAD_LIMIT`].
    pub max_payload: usize,
}

impl Default for DecoderConfig {
    fn default() -> Self {
        DecoderConfig {
            reliable_seq: 0,
            max_payload: MAX_PAYLOAD_LIMIT,
        }
    }
}

/// A frame to encode: the encoder assigns the sequence number and flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameRef<'a> {
    pub frame_type: u8,
    pub stream_id: u32,
    pub payload: &'a [u8],
}

/// A decoded, authenticated, in-order frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub frame_type: u8,
    pub stream_id: u32,
    pub seq: u64,
    pub flags: u8,
    /// The plaintext (decompressed if `flags` has [`FLAG_COMPRESSED`]).
    pub payload: Bytes,
}

/// Where a prepared frame's body comes from.
#[derive(Debug, Clone, Copy)]
enum Body {
    /// The caller's payload, as is.
    Plain,
    /// `scratch[start..start + len]`, zstd-compressed.
    Compressed { start: usize, len: usize },
}

/// Seals frames for one direction of one connection.
pub struct FrameEncoder {
    cipher: Cipher,
    compressor: Compressor<'static>,
    /// Compressed bodies of the batch being prepared, back to back.
    scratch: Vec<u8>,
    /// One entry per frame of the batch being prepared.
    plan: Vec<Body>,
    next_reliable: u64,
    next_control: u64,
    max_payload: usize,
    min_compress: usize,
    /// Small payloads in a row that zstd could not shrink (saturating).
    small_misses: u32,
    /// Small payloads sent plain without trying, since the last probe.
    small_skipped: u32,
    /// Small payloads sent plain between two probes.
    small_probe_every: u32,
}

impl std::fmt::Debug for FrameEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("FrameEncoder")
            .field("next_reliable", &self.next_reliable)
            .field("next_control", &self.next_control)
            .field("max_payload", &self.max_payload)
            .field("min_compress", &self.min_compress)
            .finish_non_exhaustive()
    }
}

impl FrameEncoder {
    /// An encoder keyed with `key` (32 bytes).
    pub fn new(key: &[u8], config: EncoderConfig) -> Result<Self> {
        let cipher = Cipher::new(key)?;
        check_max_payload(config.max_payload)?;
        if !(MIN_LEVEL..=MAX_LEVEL).contains(&config.level) {
            return Err(Error::InvalidArgument(format!(
                "level must be in {MIN_LEVEL}..={MAX_LEVEL}, got {}",
                config.level
            )));
        }
        let compressor = Compressor::new(config.level)
            .map_err(|e| Error::InvalidArgument(format!("zstd compressor: {e}")))?;
        Ok(FrameEncoder {
            cipher,
            compressor,
            scratch: Vec::new(),
            plan: Vec::new(),
            next_reliable: config.reliable_seq,
            next_control: 0,
            max_payload: config.max_payload,
            min_compress: config.min_compress,
            small_misses: 0,
            small_skipped: 0,
            small_probe_every: SMALL_PROBE_EVERY,
        })
    }

    /// Sequence number the next reliable frame will carry.
    pub fn next_reliable_seq(&self) -> u64 {
        self.next_reliable
    }

    /// Sequence number the next control frame will carry.
    pub fn next_control_seq(&self) -> u64 {
        self.next_control
    }

    /// Largest payload accepted.
    pub fn max_payload(&self) -> usize {
        self.max_payload
    }

    /// Validate and compress `frames` without assigning sequence numbers.
    /// The returned batch knows its exact encoded length, so the caller can
    /// allocate the output once (e.g. a Python `bytes`) and
    /// [`PreparedBatch::write_into`] it. Dropping the batch unwritten leaves
    /// the counters untouched.
    ///
    /// Every frame is validated before anything is compressed: an error
    /// means nothing happened.
    pub fn prepare<'e, 'f>(
        &'e mut self,
        frames: &'f [FrameRef<'f>],
    ) -> Result<PreparedBatch<'e, 'f>> {
        let mut n_reliable: u64 = 0;
        let mut n_control: u64 = 0;
        for (i, frame) in frames.iter().enumerate() {
            match FrameClass::of(frame.frame_type) {
                Some(FrameClass::Reliable) => n_reliable += 1,
                Some(FrameClass::Control) => n_control += 1,
                None => {
                    return Err(Error::InvalidArgument(format!(
                        "frame {i}: frame type {:#04x} is out of range (0x00..=0x1f)",
                        frame.frame_type
                    )))
                }
            }
            if frame.payload.len() > self.max_payload {
                return Err(Error::InvalidArgument(format!(
                    "frame {i}: payload of {} bytes exceeds max_payload ({})",
                    frame.payload.len(),
                    self.max_payload
                )));
            }
        }
        // The counters may reach u64::MAX but never carry it as a sequence
        // number, so they can never wrap around to an already-used nonce.
        if self.next_reliable.checked_add(n_reliable).is_none()
            || self.next_control.checked_add(n_control).is_none()
        {
            return Err(Error::InvalidArgument("sequence numbers exhausted".into()));
        }

        self.scratch.clear();
        if self.scratch.capacity() > SCRATCH_RETAIN {
            self.scratch.shrink_to(SCRATCH_RETAIN);
        }
        self.plan.clear();
        let mut total = 0usize;
        for frame in frames {
            let body = self.compress(frame.payload);
            let body_len = match body {
                Body::Plain => frame.payload.len(),
                Body::Compressed { len, .. } => len,
            };
            self.plan.push(body);
            total += HEADER_LEN + body_len + TAG_LEN;
        }
        Ok(PreparedBatch {
            encoder: self,
            frames,
            len: total,
        })
    }

    /// Compress `payload` onto the end of `scratch` if it is long enough,
    /// does not look like noise, and the result is worth sending
    /// ([`worth_sending`]); otherwise leave `scratch` as it was.
    ///
    /// Small payloads are tried only while small payloads have been
    /// shrinking: an interactive protocol's short messages (a Postgres
    /// round trip's 60-byte reply) almost never do, and trying costs more
    /// than sealing them. While they keep failing, one in
    /// `SMALL_PROBE_EVERY` is still tried, then one in twice as many after
    /// each probe that failed, up to `SMALL_PROBE_MOST`.
    fn compress(&mut self, payload: &[u8]) -> Body {
        if payload.is_empty() || payload.len() < self.min_compress || looks_incompressible(payload)
        {
            return Body::Plain;
        }
        let small = payload.len() < SMALL_PAYLOAD;
        let probe = small && self.small_misses >= SMALL_MISSES_TO_SKIP;
        if probe {
            self.small_skipped += 1;
            if self.small_skipped < self.small_probe_every {
                return Body::Plain;
            }
            self.small_skipped = 0;
        }
        let body = self.try_compress(payload);
        if small {
            match body {
                Body::Plain => {
                    self.small_misses = self.small_misses.saturating_add(1);
                    if probe {
                        self.small_probe_every = (self.small_probe_every * 2).min(SMALL_PROBE_MOST);
                    }
                }
                Body::Compressed { .. } => {
                    self.small_misses = 0;
                    self.small_probe_every = SMALL_PROBE_EVERY;
                }
            }
        }
        body
    }

    fn try_compress(&mut self, payload: &[u8]) -> Body {
        let start = self.scratch.len();
        // Room for an output of up to len - 1 bytes; zstd fails cleanly if
        // its output would not fit.
        self.scratch.reserve(payload.len() - 1);
        let mut out = Cursor::new(&mut self.scratch);
        out.set_position(start as u64);
        // One-shot compression records the content size in the frame header,
        // which the decoder needs to bound its allocation.
        match self.compressor.compress_to_buffer(payload, &mut out) {
            Ok(len) if worth_sending(payload.len(), len) => Body::Compressed { start, len },
            _ => {
                self.scratch.truncate(start);
                Body::Plain
            }
        }
    }

    /// Encode one frame into a new `Vec`.
    pub fn encode(&mut self, frame_type: u8, stream_id: u32, payload: &[u8]) -> Result<Vec<u8>> {
        self.encode_batch(&[FrameRef {
            frame_type,
            stream_id,
            payload,
        }])
    }

    /// Encode many frames, concatenated in order, into a new `Vec`.
    pub fn encode_batch(&mut self, frames: &[FrameRef<'_>]) -> Result<Vec<u8>> {
        let batch = self.prepare(frames)?;
        let mut out = vec![0u8; batch.encoded_len()];
        batch.write_into(&mut out)?;
        Ok(out)
    }
}

/// A validated, compressed batch waiting for its output buffer; see
/// [`FrameEncoder::prepare`].
pub struct PreparedBatch<'e, 'f> {
    encoder: &'e mut FrameEncoder,
    frames: &'f [FrameRef<'f>],
    len: usize,
}

impl PreparedBatch<'_, '_> {
    /// Exact number of bytes [`PreparedBatch::write_into`] writes.
    pub fn encoded_len(&self) -> usize {
        self.len
    }

    /// Assign sequence numbers and seal every frame into `out`, which must be
    /// exactly [`PreparedBatch::encoded_len`] bytes.
    pub fn write_into(self, out: &mut [u8]) -> Result<()> {
        if out.len() != self.len {
            return Err(Error::InvalidArgument(format!(
                "output buffer is {} bytes, batch needs {}",
                out.len(),
                self.len
            )));
        }
        let enc = self.encoder;
        let mut rest = out;
        for (frame, body) in self.frames.iter().zip(&enc.plan) {
            let (src, flags) = match *body {
                Body::Plain => (frame.payload, 0),
                Body::Compressed { start, len } => {
                    (&enc.scratch[start..start + len], FLAG_COMPRESSED)
                }
            };
            let class = FrameClass::of(frame.frame_type).expect("validated in prepare");
            // Advance the counter before sealing: even if sealing failed, the
            // sequence number would not be handed out twice.
            let counter = match class {
                FrameClass::Reliable => &mut enc.next_reliable,
                FrameClass::Control => &mut enc.next_control,
            };
            let seq = *counter;
            *counter += 1; // cannot overflow: checked in prepare

            let header = Header {
                frame_type: frame.frame_type,
                flags,
                stream_id: frame.stream_id,
                seq,
                length: u32::try_from(src.len() + TAG_LEN).expect("bounded by MAX_PAYLOAD_LIMIT"),
            };
            let (hdr, tail) = rest.split_at_mut(HEADER_LEN);
            let hdr: &mut [u8; HEADER_LEN] = hdr.try_into().expect("HEADER_LEN bytes");
            header.write_to(hdr);
            let (body_out, tail) = tail.split_at_mut(src.len());
            body_out.copy_from_slice(src);
            let tag = enc.cipher.seal(nonce(class, seq), hdr, body_out);
            let (tag_out, tail) = tail.split_at_mut(TAG_LEN);
            tag_out.copy_from_slice(&tag);
            rest = tail;
        }
        debug_assert!(rest.is_empty());
        Ok(())
    }
}

/// Opens frames for one direction of one connection.
pub struct FrameDecoder {
    cipher: Cipher,
    decompressor: Decompressor<'static>,
    /// Bytes fed but not yet consumed. `split_to` hands frames off the front
    /// without moving the rest; `reserve` reclaims the space once they are
    /// dropped, so feeding and decoding stay linear in the bytes fed.
    buf: BytesMut,
    next_reliable: u64,
    next_control: u64,
    max_payload: usize,
    poisoned: Option<Error>,
}

impl std::fmt::Debug for FrameDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameDecoder")
            .field("buffered", &self.buf.len())
            .field("next_reliable", &self.next_reliable)
            .field("next_control", &self.next_control)
            .field("max_payload", &self.max_payload)
            .field("poisoned", &self.poisoned)
            .finish_non_exhaustive()
    }
}

impl FrameDecoder {
    /// A decoder keyed with `key` (32 bytes).
    pub fn new(key: &[u8], config: DecoderConfig) -> Result<Self> {
        let cipher = Cipher::new(key)?;
        check_max_payload(config.max_payload)?;
        let decompressor = Decompressor::new()
            .map_err(|e| Error::InvalidArgument(format!("zstd decompressor: {e}")))?;
        Ok(FrameDecoder {
            cipher,
            decompressor,
            buf: BytesMut::new(),
            next_reliable: config.reliable_seq,
            next_control: 0,
            max_payload: config.max_payload,
            poisoned: None,
        })
    }

    /// Sequence number of the next reliable frame expected.
    pub fn next_reliable_seq(&self) -> u64 {
        self.next_reliable
    }

    /// Sequence number of the next control frame expected.
    pub fn next_control_seq(&self) -> u64 {
        self.next_control
    }

    /// Bytes held that have not been returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Largest payload accepted.
    pub fn max_payload(&self) -> usize {
        self.max_payload
    }

    /// The error this decoder is poisoned with, if any.
    pub fn poisoned(&self) -> Option<&Error> {
        self.poisoned.as_ref()
    }

    /// Buffer bytes from the transport. Never parses; fails only if the
    /// decoder is poisoned.
    pub fn feed(&mut self, data: &[u8]) -> Result<()> {
        self.check_poison()?;
        self.buf.extend_from_slice(data);
        Ok(())
    }

    /// The transport ended: [`Error::Truncated`] if any bytes are still
    /// buffered (a partial frame, or complete frames never asked for).
    pub fn eof(&mut self) -> Result<()> {
        self.check_poison()?;
        if !self.buf.is_empty() {
            return Err(self.poison(Error::Truncated));
        }
        Ok(())
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>> {
        self.check_poison()?;
        self.decode_one().map_err(|e| self.poison(e))
    }

    /// All complete frames (at most `limit` when `limit > 0`). If a bad frame
    /// follows good ones, the good ones are returned and the error comes from
    /// the next call.
    pub fn next_frames(&mut self, limit: usize) -> Result<Vec<Frame>> {
        self.check_poison()?;
        let mut frames = Vec::new();
        while limit == 0 || frames.len() < limit {
            match self.next_frame() {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                // Poisoned now: the next call raises it.
                Err(_) if !frames.is_empty() => break,
                Err(e) => return Err(e),
            }
        }
        Ok(frames)
    }

    fn check_poison(&self) -> Result<()> {
        match &self.poisoned {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    fn poison(&mut self, err: Error) -> Error {
        self.poisoned = Some(err.clone());
        err
    }

    fn decode_one(&mut self) -> Result<Option<Frame>> {
        let Some(hdr_bytes) = self.buf.get(..HEADER_LEN) else {
            return Ok(None);
        };
        let hdr_bytes: [u8; HEADER_LEN] = hdr_bytes.try_into().expect("HEADER_LEN bytes");
        // Judged on the header alone, before the body arrives: a too-large
        // length fails here with nothing allocated for it.
        let header = Header::parse(&hdr_bytes, self.max_payload)?;
        if self.buf.len() < header.frame_len() {
            return Ok(None);
        }
        let mut frame = self.buf.split_to(header.frame_len());
        frame.advance(HEADER_LEN);
        let ct_len = header.length as usize - TAG_LEN;
        let tag: [u8; TAG_LEN] = frame[ct_len..].try_into().expect("TAG_LEN bytes");
        frame.truncate(ct_len);

        // Authenticate first (nonce from the header's own class and seq), so
        // a forged header is Tampered and only authentic frames are judged on
        // their sequence number.
        let class = header.class();
        self.cipher
            .open(nonce(class, header.seq), &hdr_bytes, &mut frame[..], &tag)?;

        let counter = match class {
            FrameClass::Reliable => &mut self.next_reliable,
            FrameClass::Control => &mut self.next_control,
        };
        if header.seq < *counter {
            return Err(Error::Replayed);
        }
        if header.seq > *counter {
            return Err(Error::Reordered);
        }
        // An honest encoder never sends u64::MAX (it refuses to wrap), so
        // this only fails for a peer that is misbehaving anyway.
        *counter = counter
            .checked_add(1)
            .ok_or_else(|| Error::Undecodable("sequence numbers exhausted".into()))?;

        let payload = if header.flags & FLAG_COMPRESSED != 0 {
            Bytes::from(self.decompress(&frame)?)
        } else {
            frame.freeze()
        };
        Ok(Some(Frame {
            frame_type: header.frame_type,
            stream_id: header.stream_id,
            seq: header.seq,
            flags: header.flags,
            payload,
        }))
    }

    /// Decompress an authenticated payload within `max_payload`.
    fn decompress(&mut self, data: &[u8]) -> Result<Vec<u8>> {
        decompress_within(&mut self.decompressor, data, self.max_payload)
            .map_err(Error::Undecodable)
    }
}

/// Decompress one zstd frame, allocating no more than the size its header
/// declares, and only if that is at most `max` bytes: a frame cannot make
/// its reader allocate what it will not fill. The error says why, as text
/// for the caller's own error type.
pub fn decompress_within(
    decompressor: &mut Decompressor<'_>,
    data: &[u8],
    max: usize,
) -> std::result::Result<Vec<u8>, String> {
    let size = zstd_safe::get_frame_content_size(data)
        .map_err(|_| "not a zstd frame".to_owned())?
        .ok_or_else(|| "zstd frame without a content size".to_owned())?;
    if size > max as u64 {
        return Err(format!(
            "{size} bytes decompressed, more than the limit of {max}"
        ));
    }
    let size = size as usize;
    let mut out = Vec::with_capacity(size);
    let written = decompressor
        .decompress_to_buffer(data, &mut out)
        .map_err(|e| format!("zstd: {e}"))?;
    if written != size || out.len() != size {
        return Err(format!(
            "zstd frame declared {size} bytes but produced {written}"
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::KEY_LEN;

    #[test]
    fn oversized_length_allocates_nothing() {
        let mut dec = FrameDecoder::new(&[1u8; KEY_LEN], DecoderConfig::default()).unwrap();
        let header = Header {
            frame_type: 0,
            flags: 0,
            stream_id: 0,
            seq: 0,
            length: u32::MAX,
        };
        let mut bytes = header.to_bytes().to_vec();
        bytes.extend_from_slice(&[0u8; 100]);
        dec.feed(&bytes).unwrap();
        assert_eq!(dec.next_frame(), Err(Error::FrameTooLarge));
        // Only what was fed is held; nothing was reserved for the 4 GiB body.
        assert_eq!(dec.buffered(), HEADER_LEN + 100);
        assert!(dec.buf.capacity() < 4096, "capacity {}", dec.buf.capacity());
    }

    #[test]
    fn a_max_length_header_waits_without_reserving() {
        let mut dec = FrameDecoder::new(&[1u8; KEY_LEN], DecoderConfig::default()).unwrap();
        let length = (MAX_PAYLOAD_LIMIT + TAG_LEN) as u32;
        let header = Header {
            frame_type: 0,
            flags: 0,
            stream_id: 0,
            seq: 0,
            length,
        };
        dec.feed(&header.to_bytes()).unwrap();
        assert_eq!(dec.next_frame(), Ok(None));
        assert!(dec.buf.capacity() < 4096, "capacity {}", dec.buf.capacity());
    }

    fn compressed(enc: &mut FrameEncoder, payload: &[u8]) -> bool {
        let frames = [FrameRef {
            frame_type: 0,
            stream_id: 0,
            payload,
        }];
        let batch = enc.prepare(&frames).unwrap();
        matches!(batch.encoder.plan[0], Body::Compressed { .. })
    }

    #[test]
    fn small_payloads_that_never_shrink_are_mostly_not_tried() {
        let mut enc = FrameEncoder::new(&[1u8; KEY_LEN], EncoderConfig::default()).unwrap();
        // A Postgres-like reply: too short and varied for zstd to shrink.
        let reply: &[u8] = b"T\x00\x00\x00\x21\x00\x01abalance\x00\x00\x00@\x06\x00\x03\x00\x00\x00\x17\x00\x04\xff\xff\xff\xff\x00\x00D\x00\x00\x00\x0b\x00\x01\x00\x00\x00\x01\x30C\x00\x00\x00\x0dSELECT 1\x00Z\x00\x00\x00\x05I";
        assert!(reply.len() >= DEFAULT_MIN_COMPRESS);
        let text = b"{\"k\": \"value\"} ".repeat(40); // small, compresses well
        for _ in 0..SMALL_MISSES_TO_SKIP {
            assert!(!compressed(&mut enc, reply));
        }
        assert_eq!(enc.small_misses, SMALL_MISSES_TO_SKIP);
        // Now skipping, and probing less often after each probe that fails.
        let tries = |enc: &mut FrameEncoder, count: u32| {
            let misses = enc.small_misses;
            (0..count).for_each(|_| assert!(!compressed(enc, reply)));
            enc.small_misses - misses // the tries: each one missed
        };
        assert_eq!(tries(&mut enc, SMALL_PROBE_EVERY), 1);
        assert_eq!(tries(&mut enc, SMALL_PROBE_EVERY * 2), 1);
        assert_eq!(tries(&mut enc, SMALL_PROBE_EVERY * 4 - 1), 0);
        assert_eq!(tries(&mut enc, 1), 1);
        for _ in 0..8 {
            tries(&mut enc, SMALL_PROBE_MOST);
        }
        assert_eq!(enc.small_probe_every, SMALL_PROBE_MOST);
        // A compressible small payload is sent plain until the probe, which
        // succeeds and turns small compression back on.
        for _ in 1..SMALL_PROBE_MOST - enc.small_skipped {
            assert!(!compressed(&mut enc, &text));
        }
        assert!(compressed(&mut enc, &text));
        assert_eq!(
            (enc.small_misses, enc.small_probe_every),
            (0, SMALL_PROBE_EVERY)
        );
        assert!(compressed(&mut enc, &text));
        // Large payloads are always tried, whatever small ones did.
        for _ in 0..SMALL_MISSES_TO_SKIP {
            compressed(&mut enc, reply);
        }
        assert!(compressed(&mut enc, &b"{\"k\": \"value\"} ".repeat(100)));
    }

    #[test]
    fn a_payload_that_barely_shrinks_is_sent_plain_and_counts_as_a_miss() {
        let mut enc = FrameEncoder::new(&[1u8; KEY_LEN], EncoderConfig::default()).unwrap();
        // pgbench -M extended's transaction: Parse, Bind, Describe, Execute,
        // Sync. zstd shrinks it by a few bytes at most.
        let mut request = b"P\x00\x00\x00\x3d\x00SELECT abalance FROM pgbench_accounts WHERE aid = $1;\x00\x00\x00".to_vec();
        request.extend_from_slice(
            b"B\x00\x00\x00\x18\x00\x00\x00\x00\x00\x01\x00\x00\x00\x06116493\x00\x01\x00\x00",
        );
        request.extend_from_slice(
            b"D\x00\x00\x00\x06P\x00E\x00\x00\x00\x09\x00\x00\x00\x00\x00S\x00\x00\x00\x04",
        );
        let packed = zstd::bulk::compress(&request, DEFAULT_LEVEL).unwrap();
        assert!(packed.len() < request.len(), "zstd shrinks it a little");
        assert!(!compressed(&mut enc, &request));
        assert_eq!(enc.small_misses, 1);
        assert!(enc.scratch.is_empty());
    }

    #[test]
    fn worth_sending_asks_for_sixteen_bytes_and_a_sixteenth() {
        assert!(worth_sending(100, 84));
        assert!(!worth_sending(100, 85));
        assert!(worth_sending(1600, 1500));
        assert!(!worth_sending(1600, 1501));
        assert!(!worth_sending(10, 0), "nothing under 16 bytes is worth it");
    }

    #[test]
    fn compressed_bodies_record_their_content_size() {
        let mut enc = FrameEncoder::new(&[1u8; KEY_LEN], EncoderConfig::default()).unwrap();
        let text = b"{\"k\": \"value\"} ".repeat(100);
        let frames = [FrameRef {
            frame_type: 0,
            stream_id: 0,
            payload: &text,
        }];
        let batch = enc.prepare(&frames).unwrap();
        let Body::Compressed { start, len } = batch.encoder.plan[0] else {
            panic!("expected compression");
        };
        let body = &batch.encoder.scratch[start..start + len];
        assert_eq!(
            zstd_safe::get_frame_content_size(body).unwrap(),
            Some(text.len() as u64)
        );
    }

    #[test]
    fn scratch_does_not_stay_huge() {
        let mut enc = FrameEncoder::new(&[1u8; KEY_LEN], EncoderConfig::default()).unwrap();
        enc.encode(0, 0, &vec![0u8; 4 << 20]).unwrap();
        enc.encode(0, 0, b"small").unwrap();
        assert!(enc.scratch.capacity() <= SCRATCH_RETAIN);
    }

    #[test]
    fn feeding_after_partial_consumption_stays_linear() {
        // Many small frames fed one at a time: the buffer must not grow
        // beyond a few frames, i.e. consumed space is reclaimed.
        let key = [1u8; KEY_LEN];
        let mut enc = FrameEncoder::new(&key, EncoderConfig::default()).unwrap();
        let mut dec = FrameDecoder::new(&key, DecoderConfig::default()).unwrap();
        let mut peak = 0;
        for _ in 0..10_000 {
            let f = enc.encode(0, 0, &[5u8; 40]).unwrap();
            dec.feed(&f[..30]).unwrap();
            assert!(dec.next_frames(0).unwrap().is_empty());
            dec.feed(&f[30..]).unwrap();
            assert_eq!(dec.next_frames(0).unwrap().len(), 1);
            peak = peak.max(dec.buf.capacity());
        }
        assert!(peak < 4096, "peak capacity {peak}");
    }
}
