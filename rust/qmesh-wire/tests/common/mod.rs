//! Shared helpers for the qmesh-wire integration tests: deterministic data
//! generators (fast enough for 16 MiB payloads) and codec constructors.
#![allow(dead_code)]

use qmesh_wire::{DecoderConfig, EncoderConfig, FrameDecoder, FrameEncoder};

pub const KEY: [u8; 32] = [7u8; 32];
pub const OTHER_KEY: [u8; 32] = [8u8; 32];

/// SplitMix64: tiny, fast, good enough to make incompressible bytes.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn fill(&mut self, out: &mut [u8]) {
        let mut chunks = out.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let last = self.next_u64().to_le_bytes();
        rest.copy_from_slice(&last[..rest.len()]);
    }
}

#[derive(Debug, Clone, Copy)]
pub enum Kind {
    /// Incompressible.
    Random,
    /// JSON-like text: compresses well.
    Text,
    /// All zeros: compresses extremely well.
    Zeros,
}

pub fn payload(kind: Kind, len: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed);
    match kind {
        Kind::Random => {
            let mut v = vec![0u8; len];
            rng.fill(&mut v);
            v
        }
        Kind::Zeros => vec![0u8; len],
        Kind::Text => {
            const WORDS: [&str; 8] = [
                "\"id\":",
                "\"name\":",
                "\"tokens\":",
                "[1,2,3]",
                "\"text\":",
                "true",
                "null",
                ",",
            ];
            let mut v = Vec::with_capacity(len + 16);
            while v.len() < len {
                v.extend_from_slice(WORDS[rng.below(WORDS.len())].as_bytes());
                v.extend_from_slice(rng.below(100_000).to_string().as_bytes());
            }
            v.truncate(len);
            v
        }
    }
}

pub fn encoder() -> FrameEncoder {
    FrameEncoder::new(&KEY, EncoderConfig::default()).unwrap()
}

pub fn decoder() -> FrameDecoder {
    FrameDecoder::new(&KEY, DecoderConfig::default()).unwrap()
}

/// Feed `bytes` in chunks whose sizes come from `next_chunk`, collecting every
/// frame; stops at the first error.
pub fn feed_chunked(
    dec: &mut FrameDecoder,
    bytes: &[u8],
    mut next_chunk: impl FnMut() -> usize,
) -> (Vec<qmesh_wire::Frame>, Option<qmesh_wire::Error>) {
    let mut frames = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let n = next_chunk().clamp(1, rest.len());
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        if let Err(e) = dec.feed(chunk) {
            return (frames, Some(e));
        }
        match dec.next_frames(0) {
            Ok(fs) => frames.extend(fs),
            Err(e) => return (frames, Some(e)),
        }
    }
    // Pick up an error left pending behind good frames.
    match dec.next_frames(0) {
        Ok(fs) => frames.extend(fs),
        Err(e) => return (frames, Some(e)),
    }
    match dec.eof() {
        Ok(()) => (frames, None),
        Err(e) => (frames, Some(e)),
    }
}
