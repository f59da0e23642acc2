//! Frame codec behaviour through the public API: round trips, every error
//! kind, sequencing, batching and resumption.

mod common;

use common::*;
use qmesh_wire::{
    DecoderConfig, EncoderConfig, Error, FrameDecoder, FrameEncoder, FrameRef, FLAG_COMPRESSED,
    HEADER_LEN, MAX_PAYLOAD_LIMIT, TAG_LEN,
};

fn decode_all(dec: &mut FrameDecoder, bytes: &[u8]) -> Result<Vec<qmesh_wire::Frame>, Error> {
    dec.feed(bytes)?;
    dec.next_frames(0)
}

#[test]
fn round_trip_reliable_and_control() {
    let mut enc = encoder();
    let mut dec = decoder();
    let mut wire = Vec::new();
    wire.extend(enc.encode(0x01, 5, b"hello").unwrap());
    wire.extend(enc.encode(0x10, 0, b"ping").unwrap());
    wire.extend(enc.encode(0x0F, 6, b"").unwrap());
    wire.extend(enc.encode(0x1F, 1, b"pong").unwrap());
    assert_eq!(enc.next_reliable_seq(), 2);
    assert_eq!(enc.next_control_seq(), 2);

    let frames = decode_all(&mut dec, &wire).unwrap();
    let got: Vec<_> = frames
        .iter()
        .map(|f| (f.frame_type, f.stream_id, f.seq, &f.payload[..]))
        .collect();
    assert_eq!(
        got,
        vec![
            (0x01, 5, 0, &b"hello"[..]),
            (0x10, 0, 0, &b"ping"[..]),
            (0x0F, 6, 1, &b""[..]),
            (0x1F, 1, 1, &b"pong"[..]),
        ]
    );
    assert_eq!(dec.next_reliable_seq(), 2);
    assert_eq!(dec.next_control_seq(), 2);
    assert_eq!(dec.buffered(), 0);
    dec.eof().unwrap();
}

#[test]
fn wire_layout() {
    let mut enc = encoder();
    let bytes = enc.encode(0x02, 0x0102_0304, b"abc").unwrap();
    assert_eq!(bytes.len(), HEADER_LEN + 3 + TAG_LEN);
    assert_eq!(&bytes[..4], &[1, 0x02, 0, 0]);
    assert_eq!(&bytes[4..8], &[1, 2, 3, 4]);
    assert_eq!(&bytes[8..16], &0u64.to_be_bytes());
    assert_eq!(&bytes[16..20], &(3 + TAG_LEN as u32).to_be_bytes());
    assert_ne!(&bytes[20..23], b"abc", "payload must be encrypted");
}

#[test]
fn compression_only_when_worth_it() {
    let mut enc = encoder();
    let mut dec = decoder();
    let text = payload(Kind::Text, 16 * 1024, 1);
    let random = payload(Kind::Random, 16 * 1024, 2);
    let short = b"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"; // 63 < 64

    let t = enc.encode(0, 1, &text).unwrap();
    assert_eq!(t[2], FLAG_COMPRESSED);
    assert!(t.len() < text.len());
    let r = enc.encode(0, 1, &random).unwrap();
    assert_eq!(r[2], 0);
    assert_eq!(r.len(), HEADER_LEN + random.len() + TAG_LEN);
    let s = enc.encode(0, 1, short).unwrap();
    assert_eq!(s[2], 0);

    let frames = decode_all(&mut dec, &[t, r, s].concat()).unwrap();
    assert_eq!(frames[0].flags, FLAG_COMPRESSED);
    assert_eq!(&frames[0].payload[..], &text[..]);
    assert_eq!(&frames[1].payload[..], &random[..]);
    assert_eq!(&frames[2].payload[..], &short[..]);
}

#[test]
fn min_compress_threshold_is_configurable() {
    let cfg = EncoderConfig {
        min_compress: 1 << 20,
        ..EncoderConfig::default()
    };
    let mut enc = FrameEncoder::new(&KEY, cfg).unwrap();
    let zeros = vec![0u8; 4096];
    assert_eq!(enc.encode(0, 0, &zeros).unwrap()[2], 0);
    let cfg = EncoderConfig {
        min_compress: 0,
        ..EncoderConfig::default()
    };
    let mut enc = FrameEncoder::new(&KEY, cfg).unwrap();
    let mut dec = decoder();
    let empty = enc.encode(0, 0, b"").unwrap();
    assert_eq!(empty[2], 0, "an empty payload cannot shrink");
    assert_eq!(decode_all(&mut dec, &empty).unwrap()[0].payload.len(), 0);
}

#[test]
fn max_size_payloads() {
    for kind in [Kind::Random, Kind::Text] {
        let mut enc = encoder();
        let mut dec = decoder();
        let p = payload(kind, MAX_PAYLOAD_LIMIT, 3);
        let wire = enc.encode(0, 0, &p).unwrap();
        let frames = decode_all(&mut dec, &wire).unwrap();
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].payload.len(), MAX_PAYLOAD_LIMIT);
        assert!(frames[0].payload[..] == p[..]);
        assert!(enc.encode(0, 0, &vec![0u8; MAX_PAYLOAD_LIMIT + 1]).is_err());
    }
}

#[test]
fn one_byte_chunks() {
    let mut enc = encoder();
    let mut wire = Vec::new();
    let payloads: Vec<Vec<u8>> = (0..5)
        .map(|i| payload(Kind::Text, 50 + 300 * i, i as u64))
        .collect();
    for (i, p) in payloads.iter().enumerate() {
        wire.extend(enc.encode((i % 2) as u8 * 0x10, i as u32, p).unwrap());
    }
    let mut dec = decoder();
    let (frames, err) = feed_chunked(&mut dec, &wire, || 1);
    assert_eq!(err, None);
    assert_eq!(frames.len(), payloads.len());
    for (f, p) in frames.iter().zip(&payloads) {
        assert_eq!(&f.payload[..], &p[..]);
    }
}

#[test]
fn buffered_counts_partial_frame() {
    let mut enc = encoder();
    let wire = enc.encode(0, 0, b"0123456789").unwrap();
    let mut dec = decoder();
    dec.feed(&wire[..25]).unwrap();
    assert!(dec.next_frames(0).unwrap().is_empty());
    assert_eq!(dec.buffered(), 25);
    dec.feed(&wire[25..]).unwrap();
    assert_eq!(dec.next_frames(0).unwrap().len(), 1);
    assert_eq!(dec.buffered(), 0);
}

#[test]
fn next_frames_limit() {
    let mut enc = encoder();
    let wire: Vec<u8> = (0..5)
        .flat_map(|i| enc.encode(0, i, b"x").unwrap())
        .collect();
    let mut dec = decoder();
    dec.feed(&wire).unwrap();
    assert_eq!(dec.next_frames(2).unwrap().len(), 2);
    assert_eq!(dec.next_frames(2).unwrap().len(), 2);
    assert_eq!(dec.next_frames(2).unwrap().len(), 1);
    assert_eq!(dec.next_frames(2).unwrap().len(), 0);
}

// ---- every error kind -------------------------------------------------

fn one_frame() -> Vec<u8> {
    encoder()
        .encode(0x03, 9, &payload(Kind::Text, 1000, 4))
        .unwrap()
}

fn decode_err(bytes: &[u8]) -> Error {
    let mut dec = decoder();
    dec.feed(bytes).unwrap();
    dec.next_frames(0).unwrap_err()
}

#[test]
fn flipped_header_bytes_are_tampered() {
    let wire = one_frame();
    // stream id, sequence, the compressed flag, and the type (staying in
    // range) are all authenticated as associated data.
    for at in [1, 2, 4, 7, 8, 15] {
        let mut w = wire.clone();
        w[at] ^= 0x01;
        assert_eq!(decode_err(&w), Error::Tampered, "header byte {at}");
    }
}

#[test]
fn flipped_ciphertext_is_tampered() {
    let wire = one_frame();
    for at in [HEADER_LEN, HEADER_LEN + 1, wire.len() - TAG_LEN - 1] {
        let mut w = wire.clone();
        w[at] ^= 0x80;
        assert_eq!(decode_err(&w), Error::Tampered, "ciphertext byte {at}");
    }
}

#[test]
fn flipped_tag_is_tampered() {
    let wire = one_frame();
    for at in [wire.len() - TAG_LEN, wire.len() - 1] {
        let mut w = wire.clone();
        w[at] ^= 0x01;
        assert_eq!(decode_err(&w), Error::Tampered, "tag byte {at}");
    }
}

#[test]
fn length_edit_is_tampered_or_incomplete() {
    let wire = one_frame();
    // Shorter: the frame boundary moves, the tag is read from the wrong place.
    let mut w = wire.clone();
    w[19] -= 1;
    assert_eq!(decode_err(&w), Error::Tampered);
    // Longer: the decoder waits for more bytes, then eof reports truncation.
    let mut w = wire.clone();
    w[19] += 1;
    let mut dec = decoder();
    dec.feed(&w).unwrap();
    assert!(dec.next_frames(0).unwrap().is_empty());
    assert_eq!(dec.eof(), Err(Error::Truncated));
}

#[test]
fn wrong_key_is_tampered() {
    let wire = one_frame();
    let mut dec = FrameDecoder::new(&OTHER_KEY, DecoderConfig::default()).unwrap();
    dec.feed(&wire).unwrap();
    assert_eq!(dec.next_frames(0), Err(Error::Tampered));
}

#[test]
fn replayed_frame() {
    let mut enc = encoder();
    let a = enc.encode(0, 0, b"a").unwrap();
    let b = enc.encode(0, 0, b"b").unwrap();
    let mut dec = decoder();
    dec.feed(&a).unwrap();
    dec.feed(&b).unwrap();
    assert_eq!(dec.next_frames(0).unwrap().len(), 2);
    dec.feed(&a).unwrap();
    assert_eq!(dec.next_frames(0), Err(Error::Replayed));
}

#[test]
fn swapped_frames_are_reordered() {
    let mut enc = encoder();
    let a = enc.encode(0x10, 0, b"a").unwrap();
    let b = enc.encode(0x10, 0, b"b").unwrap();
    assert_eq!(decode_err(&[b, a].concat()), Error::Reordered);
}

#[test]
fn dropped_frame_is_reordered() {
    let mut enc = encoder();
    let _lost = enc.encode(0, 0, b"a").unwrap();
    let b = enc.encode(0, 0, b"b").unwrap();
    assert_eq!(decode_err(&b), Error::Reordered);
}

#[test]
fn truncated_then_eof() {
    let wire = one_frame();
    for cut in [1, HEADER_LEN - 1, HEADER_LEN, wire.len() - 1] {
        let mut dec = decoder();
        dec.feed(&wire[..cut]).unwrap();
        assert!(dec.next_frames(0).unwrap().is_empty());
        assert_eq!(dec.eof(), Err(Error::Truncated), "cut at {cut}");
        // Poisoned from now on.
        assert_eq!(dec.next_frames(0), Err(Error::Truncated));
    }
    let mut dec = decoder();
    dec.eof().unwrap();
    dec.feed(&wire).unwrap();
    assert_eq!(dec.next_frames(0).unwrap().len(), 1);
    dec.eof().unwrap();
}

#[test]
fn huge_length_field_is_too_large() {
    let mut w = one_frame();
    w[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
    let mut dec = decoder();
    // The header alone is enough to judge.
    dec.feed(&w[..HEADER_LEN]).unwrap();
    assert_eq!(dec.next_frames(0), Err(Error::FrameTooLarge));
    assert_eq!(dec.buffered(), HEADER_LEN);
}

#[test]
fn length_over_decoder_limit_is_too_large() {
    let mut enc = encoder();
    let wire = enc.encode(0, 0, &payload(Kind::Random, 2000, 5)).unwrap();
    let mut dec = FrameDecoder::new(
        &KEY,
        DecoderConfig {
            max_payload: 1000,
            ..Default::default()
        },
    )
    .unwrap();
    dec.feed(&wire[..HEADER_LEN]).unwrap();
    assert_eq!(dec.next_frames(0), Err(Error::FrameTooLarge));
}

#[test]
fn compressed_size_over_decoder_limit_is_undecodable() {
    let mut enc = encoder();
    let wire = enc.encode(0, 0, &vec![0u8; 100_000]).unwrap();
    assert_eq!(wire[2], FLAG_COMPRESSED);
    let mut dec = FrameDecoder::new(
        &KEY,
        DecoderConfig {
            max_payload: 50_000,
            ..Default::default()
        },
    )
    .unwrap();
    dec.feed(&wire).unwrap();
    // Authentic: the sender is at fault, not the line.
    assert!(matches!(dec.next_frames(0), Err(Error::Undecodable(_))));
}

#[test]
fn header_field_errors_are_malformed() {
    let wire = one_frame();
    let edits: [(usize, u8); 6] = [
        (0, 2),    // version
        (0, 0),    // version
        (1, 0x20), // frame type out of range
        (2, 0x02), // unknown flag
        (2, 0x80), // unknown flag
        (3, 0x01), // reserved
    ];
    for (at, value) in edits {
        let mut w = wire.clone();
        w[at] = value;
        assert!(
            matches!(decode_err(&w), Error::Malformed(_)),
            "byte {at} = {value:#x}"
        );
    }
    let mut w = wire.clone();
    w[16..20].copy_from_slice(&((TAG_LEN - 1) as u32).to_be_bytes());
    assert!(matches!(decode_err(&w), Error::Malformed(_)));
}

#[test]
fn poisoned_decoder_repeats_the_error() {
    let mut w = one_frame();
    w[HEADER_LEN] ^= 1;
    let mut dec = decoder();
    dec.feed(&w).unwrap();
    assert_eq!(dec.next_frames(0), Err(Error::Tampered));
    assert_eq!(dec.next_frames(0), Err(Error::Tampered));
    assert_eq!(dec.next_frame(), Err(Error::Tampered));
    assert_eq!(dec.feed(&one_frame()), Err(Error::Tampered));
    assert_eq!(dec.eof(), Err(Error::Tampered));
    assert_eq!(dec.poisoned(), Some(&Error::Tampered));
}

#[test]
fn good_frames_before_an_error_are_returned_first() {
    let mut enc = encoder();
    let a = enc.encode(0, 0, b"a").unwrap();
    let b = enc.encode(0, 0, b"b").unwrap();
    let mut c = enc.encode(0, 0, b"c").unwrap();
    c[HEADER_LEN] ^= 1;
    let mut dec = decoder();
    dec.feed(&[a, b, c].concat()).unwrap();
    let frames = dec.next_frames(0).unwrap();
    assert_eq!(frames.len(), 2);
    assert_eq!(dec.next_frames(0), Err(Error::Tampered));
}

// ---- sequencing, batching, resumption ------------------------------------

#[test]
fn control_and_reliable_sequences_are_independent() {
    let mut enc = encoder();
    let mut seqs = Vec::new();
    for t in [0x00, 0x10, 0x10, 0x05, 0x1A, 0x0F, 0x0F] {
        let w = enc.encode(t, 0, b"").unwrap();
        seqs.push(u64::from_be_bytes(w[8..16].try_into().unwrap()));
    }
    assert_eq!(seqs, vec![0, 0, 1, 1, 2, 2, 3]);
}

#[test]
fn same_seq_in_both_classes_uses_distinct_nonces() {
    // Reliable seq 0 and control seq 0 under one key: if the nonces collided,
    // rewriting the type byte across the class boundary would still verify.
    let mut enc = encoder();
    let mut w = enc.encode(0x0F, 0, b"same").unwrap();
    w[1] = 0x10;
    assert_eq!(decode_err(&w), Error::Tampered);
}

#[test]
fn reliable_seq_start_values() {
    let cfg = EncoderConfig {
        reliable_seq: 1000,
        ..Default::default()
    };
    let mut enc = FrameEncoder::new(&KEY, cfg).unwrap();
    assert_eq!(enc.next_reliable_seq(), 1000);
    let rel = enc.encode(0, 0, b"r").unwrap();
    let ctl = enc.encode(0x10, 0, b"c").unwrap();
    assert_eq!(u64::from_be_bytes(rel[8..16].try_into().unwrap()), 1000);
    assert_eq!(u64::from_be_bytes(ctl[8..16].try_into().unwrap()), 0);

    let at = |seq| {
        FrameDecoder::new(
            &KEY,
            DecoderConfig {
                reliable_seq: seq,
                ..Default::default()
            },
        )
    };
    let mut dec = at(1000).unwrap();
    let frames = decode_all(&mut dec, &[rel.clone(), ctl.clone()].concat()).unwrap();
    assert_eq!(frames[0].seq, 1000);
    assert_eq!(dec.next_reliable_seq(), 1001);
    assert_eq!(
        decode_all(&mut at(999).unwrap(), &rel),
        Err(Error::Reordered)
    );
    assert_eq!(
        decode_all(&mut at(1001).unwrap(), &rel),
        Err(Error::Replayed)
    );
    // Control frames restart at 0 whatever the reliable start.
    assert_eq!(decode_all(&mut at(5).unwrap(), &ctl).unwrap()[0].seq, 0);
}

#[test]
fn batch_equals_single_encodes() {
    let payloads: Vec<(u8, u32, Vec<u8>)> = vec![
        (0x00, 1, payload(Kind::Text, 5000, 1)),
        (0x10, 0, b"ctl".to_vec()),
        (0x01, 2, payload(Kind::Random, 3000, 2)),
        (0x00, 1, Vec::new()),
        (0x1F, 3, payload(Kind::Zeros, 100, 3)),
    ];
    let frames: Vec<FrameRef<'_>> = payloads
        .iter()
        .map(|(t, s, p)| FrameRef {
            frame_type: *t,
            stream_id: *s,
            payload: p,
        })
        .collect();
    let cfg = EncoderConfig {
        reliable_seq: 77,
        ..Default::default()
    };
    let mut batch_enc = FrameEncoder::new(&KEY, cfg).unwrap();
    let mut single_enc = FrameEncoder::new(&KEY, cfg).unwrap();
    let batch = batch_enc.encode_batch(&frames).unwrap();
    let singles: Vec<u8> = payloads
        .iter()
        .flat_map(|(t, s, p)| single_enc.encode(*t, *s, p).unwrap())
        .collect();
    assert_eq!(batch, singles);
    assert_eq!(batch_enc.next_reliable_seq(), 80);
    assert_eq!(batch_enc.next_control_seq(), 2);
    // A second batch continues the counters.
    let again = batch_enc.encode_batch(&frames).unwrap();
    let singles: Vec<u8> = payloads
        .iter()
        .flat_map(|(t, s, p)| single_enc.encode(*t, *s, p).unwrap())
        .collect();
    assert_eq!(again, singles);
    assert!(batch_enc.encode_batch(&[]).unwrap().is_empty());
}

#[test]
fn prepared_batch_reports_exact_length() {
    let mut enc = encoder();
    let text = payload(Kind::Text, 10_000, 9);
    let frames = [
        FrameRef {
            frame_type: 0,
            stream_id: 0,
            payload: &text,
        },
        FrameRef {
            frame_type: 0,
            stream_id: 0,
            payload: b"x",
        },
    ];
    let batch = enc.prepare(&frames).unwrap();
    let n = batch.encoded_len();
    assert!(n < text.len());
    let mut short = vec![0u8; n - 1];
    assert!(matches!(
        batch.write_into(&mut short),
        Err(Error::InvalidArgument(_))
    ));
    // An unwritten (here: rejected) batch hands out no sequence numbers.
    assert_eq!(enc.next_reliable_seq(), 0);
    let batch = enc.prepare(&frames).unwrap();
    let mut out = vec![0u8; n];
    batch.write_into(&mut out).unwrap();
    assert_eq!(enc.next_reliable_seq(), 2);
    let frames = decode_all(&mut decoder(), &out).unwrap();
    assert_eq!(&frames[0].payload[..], &text[..]);
}

#[test]
fn invalid_batch_leaves_counters_untouched() {
    let mut enc = encoder();
    enc.encode(0, 0, b"first").unwrap();
    let big = vec![0u8; 100];
    let cfg = EncoderConfig {
        max_payload: 50,
        ..Default::default()
    };
    let mut small = FrameEncoder::new(&KEY, cfg).unwrap();
    for (e, frames) in [
        (
            &mut enc,
            vec![
                FrameRef {
                    frame_type: 0,
                    stream_id: 0,
                    payload: b"ok",
                },
                FrameRef {
                    frame_type: 0x20,
                    stream_id: 0,
                    payload: b"bad type",
                },
            ],
        ),
        (
            &mut small,
            vec![
                FrameRef {
                    frame_type: 0,
                    stream_id: 0,
                    payload: b"ok",
                },
                FrameRef {
                    frame_type: 0x10,
                    stream_id: 0,
                    payload: &big,
                },
            ],
        ),
    ] {
        let (r, c) = (e.next_reliable_seq(), e.next_control_seq());
        assert!(matches!(
            e.encode_batch(&frames),
            Err(Error::InvalidArgument(_))
        ));
        assert_eq!((e.next_reliable_seq(), e.next_control_seq()), (r, c));
    }
}

#[test]
fn sequence_numbers_never_wrap() {
    let cfg = EncoderConfig {
        reliable_seq: u64::MAX - 1,
        ..Default::default()
    };
    let mut enc = FrameEncoder::new(&KEY, cfg).unwrap();
    enc.encode(0, 0, b"last").unwrap();
    assert!(matches!(
        enc.encode(0, 0, b"wraps"),
        Err(Error::InvalidArgument(_))
    ));
    assert_eq!(enc.next_reliable_seq(), u64::MAX);
    // Control frames are unaffected.
    enc.encode(0x10, 0, b"ctl").unwrap();
}

#[test]
fn constructor_validation() {
    let bad = |r: Result<_, Error>| matches!(r, Err(Error::InvalidArgument(_)));
    assert!(bad(
        FrameEncoder::new(&[0u8; 31], EncoderConfig::default()).map(|_| ())
    ));
    assert!(bad(
        FrameEncoder::new(&[0u8; 33], EncoderConfig::default()).map(|_| ())
    ));
    assert!(bad(
        FrameDecoder::new(&[0u8; 16], DecoderConfig::default()).map(|_| ())
    ));
    for level in [0, 20, -1] {
        let cfg = EncoderConfig {
            level,
            ..Default::default()
        };
        assert!(
            bad(FrameEncoder::new(&KEY, cfg).map(|_| ())),
            "level {level}"
        );
    }
    let cfg = EncoderConfig {
        max_payload: MAX_PAYLOAD_LIMIT + 1,
        ..Default::default()
    };
    assert!(bad(FrameEncoder::new(&KEY, cfg).map(|_| ())));
    let cfg = DecoderConfig {
        max_payload: MAX_PAYLOAD_LIMIT + 1,
        ..Default::default()
    };
    assert!(bad(FrameDecoder::new(&KEY, cfg).map(|_| ())));
    for level in [1, 19] {
        let cfg = EncoderConfig {
            level,
            ..Default::default()
        };
        let mut enc = FrameEncoder::new(&KEY, cfg).unwrap();
        let p = payload(Kind::Text, 4000, 1);
        let got = decode_all(&mut decoder(), &enc.encode(0, 0, &p).unwrap()).unwrap();
        assert_eq!(&got[0].payload[..], &p[..]);
    }
}
