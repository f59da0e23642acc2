//! Property: whatever the payloads (0 B..=16 MiB, compressible or not) and
//! however the byte stream is chopped up, the decoder returns exactly the
//! frames the encoder sealed, in order, and ends with nothing buffered.

mod common;

use common::*;
use proptest::prelude::*;
use qmesh_wire::{FrameRef, MAX_PAYLOAD_LIMIT};

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![Just(Kind::Random), Just(Kind::Text), Just(Kind::Zeros)]
}

/// Mostly small sizes, some medium, and a few at (or right under) the limit.
fn size() -> impl Strategy<Value = usize> {
    prop_oneof![
        40 => 0usize..2048,
        10 => 2048usize..262_144,
        4 => (MAX_PAYLOAD_LIMIT - 64)..=MAX_PAYLOAD_LIMIT,
        2 => Just(MAX_PAYLOAD_LIMIT),
        1 => Just(0usize),
    ]
}

#[derive(Debug, Clone)]
struct Spec {
    frame_type: u8,
    stream_id: u32,
    kind: Kind,
    len: usize,
    seed: u64,
}

fn spec() -> impl Strategy<Value = Spec> {
    (0u8..0x20, any::<u32>(), kind(), size(), any::<u64>()).prop_map(
        |(frame_type, stream_id, kind, len, seed)| Spec {
            frame_type,
            stream_id,
            kind,
            len,
            seed,
        },
    )
}

proptest! {
    // Each case may carry up to 3 × 16 MiB; 48 cases keep the run well under
    // a minute with optimised dependencies.
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn round_trip_in_random_chunks(
        specs in prop::collection::vec(spec(), 1..4),
        batch in any::<bool>(),
        max_chunk in prop_oneof![Just(1usize), 2usize..64, 64usize..70_000, Just(1usize << 20)],
        chunk_seed in any::<u64>(),
        reliable_seq in prop_oneof![Just(0u64), any::<u32>().prop_map(u64::from)],
    ) {
        let payloads: Vec<Vec<u8>> =
            specs.iter().map(|s| payload(s.kind, s.len, s.seed)).collect();
        let total: usize = payloads.iter().map(Vec::len).sum();
        let cfg = qmesh_wire::EncoderConfig { reliable_seq, ..Default::default() };
        let mut enc = qmesh_wire::FrameEncoder::new(&KEY, cfg).unwrap();
        let wire = if batch {
            let frames: Vec<FrameRef<'_>> = specs
                .iter()
                .zip(&payloads)
                .map(|(s, p)| FrameRef { frame_type: s.frame_type, stream_id: s.stream_id, payload: p })
                .collect();
            enc.encode_batch(&frames).unwrap()
        } else {
            specs
                .iter()
                .zip(&payloads)
                .flat_map(|(s, p)| enc.encode(s.frame_type, s.stream_id, p).unwrap())
                .collect()
        };

        let dcfg = qmesh_wire::DecoderConfig { reliable_seq, ..Default::default() };
        let mut dec = qmesh_wire::FrameDecoder::new(&KEY, dcfg).unwrap();
        // Tiny chunks over many megabytes only slow the run down without
        // exercising anything new.
        let max_chunk = if total > 1 << 20 { max_chunk.max(4096) } else { max_chunk };
        let mut rng = Rng(chunk_seed);
        let (frames, err) = feed_chunked(&mut dec, &wire, || 1 + rng.below(max_chunk));
        prop_assert_eq!(err, None);
        prop_assert_eq!(frames.len(), specs.len());
        let (mut rel, mut ctl) = (reliable_seq, 0u64);
        for ((f, s), p) in frames.iter().zip(&specs).zip(&payloads) {
            prop_assert_eq!(f.frame_type, s.frame_type);
            prop_assert_eq!(f.stream_id, s.stream_id);
            let seq = if s.frame_type < 0x10 { &mut rel } else { &mut ctl };
            prop_assert_eq!(f.seq, *seq);
            *seq += 1;
            prop_assert!(f.payload[..] == p[..], "payload mismatch ({} bytes)", p.len());
        }
        prop_assert_eq!(dec.buffered(), 0);
    }
}
