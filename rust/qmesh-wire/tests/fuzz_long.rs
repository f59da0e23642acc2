//! Decoder robustness against hostile byte streams.
//!
//! `fuzz_decoder_quick` runs with every `cargo test`. `fuzz_decoder_long` is
//! the stand-in for `cargo fuzz` on machines without nightly/libFuzzer
//! (see scripts/fuzz.sh); it is `#[ignore]`d and sized by QMESH_FUZZ_CASES
//! or QMESH_FUZZ_SECONDS, seeded by QMESH_FUZZ_SEED (see `fuzzkit`):
//!
//! ```text
//! QMESH_FUZZ_CASES=200000 cargo test --release -p qmesh-wire -- --ignored fuzz_decoder_long
//! ```
//!
//! Inputs are valid frame streams with mutations (bit flips, byte
//! overwrites, truncations, length-field edits, duplicated, dropped and
//! swapped chunks, inserted garbage) or plain random bytes, fed in random
//! chunk sizes. Beyond "no panic", two properties must hold:
//!
//! * every frame the decoder returns is authentic: per class, the returned
//!   frames are a prefix of what the encoder sealed, in order;
//! * an unmutated stream decodes completely.

mod common;
mod fuzzkit;

use common::*;
use proptest::prelude::*;
use qmesh_wire::{DecoderConfig, Error, FrameDecoder, HEADER_LEN, TAG_LEN};

#[derive(Debug, Clone)]
enum Mutation {
    FlipBit {
        at: usize,
        bit: u8,
    },
    SetByte {
        at: usize,
        value: u8,
    },
    Truncate {
        at: usize,
    },
    /// Rewrite the length field of the frame starting at `frame`th boundary.
    EditLength {
        frame: usize,
        value: u32,
    },
    Duplicate {
        at: usize,
        len: usize,
    },
    Drop {
        at: usize,
        len: usize,
    },
    Swap {
        a: usize,
        b: usize,
        len: usize,
    },
    Insert {
        at: usize,
        bytes: Vec<u8>,
    },
    /// Replay a whole frame right after itself.
    DuplicateFrame {
        frame: usize,
    },
    /// Exchange two whole frames.
    SwapFrames {
        a: usize,
        b: usize,
    },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Mutation::FlipBit { at, bit }),
        (any::<usize>(), any::<u8>()).prop_map(|(at, value)| Mutation::SetByte { at, value }),
        any::<usize>().prop_map(|at| Mutation::Truncate { at }),
        (
            0usize..8,
            prop_oneof![
                Just(0u32),
                Just(TAG_LEN as u32 - 1),
                Just(TAG_LEN as u32),
                Just(u32::MAX),
                0u32..100_000,
                Just((16 << 20) + TAG_LEN as u32),
                Just((16 << 20) + TAG_LEN as u32 + 1),
            ]
        )
            .prop_map(|(frame, value)| Mutation::EditLength { frame, value }),
        (any::<usize>(), 1usize..200).prop_map(|(at, len)| Mutation::Duplicate { at, len }),
        (any::<usize>(), 1usize..200).prop_map(|(at, len)| Mutation::Drop { at, len }),
        (any::<usize>(), any::<usize>(), 1usize..100).prop_map(|(a, b, len)| Mutation::Swap {
            a,
            b,
            len
        }),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..64))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        (0usize..8).prop_map(|frame| Mutation::DuplicateFrame { frame }),
        (0usize..8, 0usize..8).prop_map(|(a, b)| Mutation::SwapFrames { a, b }),
    ]
}

#[derive(Debug, Clone)]
struct Case {
    /// (frame_type, payload length, payload kind)
    frames: Vec<(u8, usize, u8)>,
    seed: u64,
    mutations: Vec<Mutation>,
    /// Use this instead of a frame stream (pure noise).
    noise: Option<Vec<u8>>,
    max_chunk: usize,
    chunk_seed: u64,
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop::collection::vec((0u8..0x20, 0usize..3000, 0u8..3), 0..8),
        any::<u64>(),
        prop::collection::vec(mutation(), 0..4),
        prop::option::weighted(0.1, prop::collection::vec(any::<u8>(), 0..512)),
        prop_oneof![Just(1usize), 1usize..32, 32usize..5000],
        any::<u64>(),
    )
        .prop_map(
            |(frames, seed, mutations, noise, max_chunk, chunk_seed)| Case {
                frames,
                seed,
                mutations,
                noise,
                max_chunk,
                chunk_seed,
            },
        )
}

/// Offsets at which frames start, as far as the length fields say (after
/// earlier mutations they may point anywhere).
fn boundaries(wire: &[u8]) -> Vec<usize> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos + HEADER_LEN <= wire.len() {
        out.push(pos);
        let len = u32::from_be_bytes(wire[pos + 16..pos + 20].try_into().unwrap()) as usize;
        pos = pos.saturating_add(HEADER_LEN + len);
    }
    out
}

/// Whole frames `(start, end)` that lie completely inside `wire`.
fn frame_spans(wire: &[u8]) -> Vec<(usize, usize)> {
    boundaries(wire)
        .into_iter()
        .filter_map(|start| {
            let len = u32::from_be_bytes(wire[start + 16..start + 20].try_into().unwrap());
            let end = start.checked_add(HEADER_LEN + len as usize)?;
            (end <= wire.len()).then_some((start, end))
        })
        .collect()
}

fn apply(wire: &mut Vec<u8>, m: &Mutation) {
    let n = wire.len();
    match *m {
        _ if n == 0 => {}
        Mutation::FlipBit { at, bit } => wire[at % n] ^= 1 << bit,
        Mutation::SetByte { at, value } => wire[at % n] = value,
        Mutation::Truncate { at } => wire.truncate(at % n),
        Mutation::EditLength { frame, value } => {
            let b = boundaries(wire);
            if !b.is_empty() {
                let start = b[frame % b.len()];
                wire[start + 16..start + 20].copy_from_slice(&value.to_be_bytes());
            }
        }
        Mutation::Duplicate { at, len } => {
            let at = at % n;
            let chunk = wire[at..(at + len).min(n)].to_vec();
            wire.splice(at..at, chunk);
        }
        Mutation::Drop { at, len } => {
            let at = at % n;
            wire.drain(at..(at + len).min(n));
        }
        Mutation::Swap { a, b, len } => {
            let len = len.min(n / 2);
            if len > 0 {
                let (a, b) = (a % (n - len + 1), b % (n - len + 1));
                if a + len <= b || b + len <= a {
                    let tmp = wire[a..a + len].to_vec();
                    wire.copy_within(b..b + len, a);
                    wire[b..b + len].copy_from_slice(&tmp);
                }
            }
        }
        Mutation::Insert { at, ref bytes } => {
            let at = at % (n + 1);
            wire.splice(at..at, bytes.iter().copied());
        }
        Mutation::DuplicateFrame { frame } => {
            let spans = frame_spans(wire);
            if !spans.is_empty() {
                let (s, e) = spans[frame % spans.len()];
                let copy = wire[s..e].to_vec();
                wire.splice(e..e, copy);
            }
        }
        Mutation::SwapFrames { a, b } => {
            let spans = frame_spans(wire);
            if spans.len() >= 2 {
                let (i, j) = (a % spans.len(), b % spans.len());
                let (i, j) = (i.min(j), i.max(j));
                if i != j {
                    let (sa, ea) = spans[i];
                    let (sb, eb) = spans[j];
                    let mut out = wire[..sa].to_vec();
                    out.extend_from_slice(&wire[sb..eb]);
                    out.extend_from_slice(&wire[ea..sb]);
                    out.extend_from_slice(&wire[sa..ea]);
                    out.extend_from_slice(&wire[eb..]);
                    *wire = out;
                }
            }
        }
    }
}

fn run_case(c: &Case) -> Result<(), TestCaseError> {
    let mut enc = encoder();
    let mut sealed = Vec::new(); // (type, payload)
    let mut wire = Vec::new();
    for (i, &(t, len, k)) in c.frames.iter().enumerate() {
        let kind = [Kind::Random, Kind::Text, Kind::Zeros][k as usize];
        let p = payload(kind, len, c.seed.wrapping_add(i as u64));
        wire.extend(enc.encode(t, i as u32, &p).unwrap());
        sealed.push((t, p));
    }
    let pristine = c.noise.is_none() && c.mutations.is_empty();
    if let Some(noise) = &c.noise {
        wire = noise.clone();
    }
    for m in &c.mutations {
        apply(&mut wire, m);
    }

    // A small limit makes length-field edits hit FrameTooLarge too.
    let mut dec = FrameDecoder::new(
        &KEY,
        DecoderConfig {
            max_payload: 4096,
            ..Default::default()
        },
    )
    .unwrap();
    let mut rng = Rng(c.chunk_seed);
    let (frames, err) = feed_chunked(&mut dec, &wire, || 1 + rng.below(c.max_chunk));

    // Per class, what came out is a prefix of what went in.
    for class_is_control in [false, true] {
        let sent: Vec<_> = sealed
            .iter()
            .filter(|(t, _)| (*t >= 0x10) == class_is_control)
            .collect();
        let got: Vec<_> = frames
            .iter()
            .filter(|f| (f.frame_type >= 0x10) == class_is_control)
            .collect();
        prop_assert!(got.len() <= sent.len());
        for (f, (t, p)) in got.iter().zip(&sent) {
            prop_assert_eq!(f.frame_type, *t);
            prop_assert!(f.payload[..] == p[..]);
        }
    }
    if pristine {
        prop_assert_eq!(&err, &None);
        prop_assert_eq!(frames.len(), sealed.len());
    }
    if let Some(e) = err {
        // Poisoned: the same error again, from every entry point.
        prop_assert_eq!(dec.next_frames(0), Err(e.clone()));
        prop_assert_eq!(dec.eof(), Err(e.clone()));
        prop_assert_eq!(dec.feed(b"more"), Err(e));
    }
    Ok(())
}

#[test]
fn fuzz_decoder_quick() {
    fuzzkit::quick("frame_decoder", 256, case(), |c| run_case(&c));
}

#[test]
#[ignore = "long: run via scripts/fuzz.sh (QMESH_FUZZ_CASES / QMESH_FUZZ_SECONDS)"]
fn fuzz_decoder_long() {
    fuzzkit::long("frame_decoder", case(), |c| run_case(&c));
}

#[test]
fn flipped_ciphertext_byte_is_tampered() {
    // The decoder authenticates before it judges sequence numbers or
    // decompresses, so one flipped ciphertext byte can only be Tampered.
    let mut enc = encoder();
    let mut wire = enc.encode(0, 0, b"x").unwrap();
    // One frame: header, the one ciphertext byte, tag.
    assert_eq!(wire.len(), HEADER_LEN + 1 + TAG_LEN);
    wire[HEADER_LEN] ^= 1;
    let mut dec = decoder();
    let (frames, err) = feed_chunked(&mut dec, &wire, || 3);
    assert!(frames.is_empty());
    assert_eq!(err, Some(Error::Tampered));
}
