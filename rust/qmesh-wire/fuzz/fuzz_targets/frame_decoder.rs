//! Throw arbitrary bytes at a `FrameDecoder`, split at fuzzer-chosen points;
//! it must never panic, and once it reports an error it must keep reporting
//! the same one.
//!
//! Input layout: byte 0 picks the mode and the decoder's `max_payload`;
//! byte 1 says how many split points follow (one byte each); the rest is the
//! stream. In "sealed" mode (bit 7 of byte 0) the rest is first turned into a
//! valid frame stream under a fixed key and then partly overwritten by the
//! tail of the input, so the fuzzer also reaches the code behind the AEAD
//! check (sequence numbers, decompression).
#![no_main]

use libfuzzer_sys::fuzz_target;
use qmesh_wire::{DecoderConfig, EncoderConfig, FrameDecoder, FrameEncoder, FrameRef};

const KEY: [u8; 32] = [0x42; 32];

fn sealed_stream(data: &[u8]) -> Vec<u8> {
    // Frames: [type, len, payload[len]]*, then the rest overwrites bytes.
    let mut enc = FrameEncoder::new(
        &KEY,
        EncoderConfig {
            min_compress: 8,
            ..Default::default()
        },
    )
    .expect("valid config");
    let mut frames = Vec::new();
    let mut rest = data;
    while rest.len() >= 2 && frames.len() < 16 {
        let (t, len) = (rest[0] % 0x20, rest[1] as usize);
        let len = len.min(rest.len() - 2);
        frames.push(FrameRef {
            frame_type: t,
            stream_id: u32::from(rest[0]),
            payload: &rest[2..2 + len],
        });
        rest = &rest[2 + len..];
        if len == 0 {
            break;
        }
    }
    let mut wire = enc.encode_batch(&frames).expect("valid frames");
    // Remaining input: (position, xor) pairs.
    for pair in rest.chunks_exact(2) {
        if !wire.is_empty() {
            let at = pair[0] as usize * wire.len() / 256;
            wire[at] ^= pair[1];
        }
    }
    wire
}

fuzz_target!(|data: &[u8]| {
    let [mode, n_splits, rest @ ..] = data else {
        return;
    };
    let n_splits = (*n_splits as usize % 32).min(rest.len());
    let (splits, stream) = rest.split_at(n_splits);
    let sealed;
    let stream = if mode & 0x80 != 0 {
        sealed = sealed_stream(stream);
        &sealed[..]
    } else {
        stream
    };
    let max_payload = match mode & 0x03 {
        0 => 0,
        1 => 64,
        2 => 4096,
        _ => qmesh_wire::MAX_PAYLOAD_LIMIT,
    };
    let mut dec = FrameDecoder::new(
        &KEY,
        DecoderConfig {
            max_payload,
            ..Default::default()
        },
    )
    .expect("valid config");

    let mut first_error = None;
    let mut pos = 0;
    let mut chunk_sizes = splits
        .iter()
        .map(|&b| b as usize + 1)
        .chain(std::iter::repeat(usize::MAX));
    while pos < stream.len() {
        let n = chunk_sizes.next().unwrap().min(stream.len() - pos);
        let fed = dec.feed(&stream[pos..pos + n]);
        pos += n;
        let res = fed.and_then(|()| dec.next_frames(usize::from(mode >> 4 & 0x3)));
        if let Err(e) = res {
            match &first_error {
                None => first_error = Some(e),
                Some(first) => assert_eq!(&e, first, "poisoned decoder changed its error"),
            }
        }
    }
    if let Err(e) = dec.next_frames(0).and_then(|_| dec.eof()) {
        if let Some(first) = &first_error {
            assert_eq!(&e, first, "poisoned decoder changed its error");
        }
    }
});
