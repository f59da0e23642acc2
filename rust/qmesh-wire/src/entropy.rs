//! A cheap guess at whether a payload is worth compressing.
//!
//! Much of what a tunnel carries is already compressed or encrypted (TLS
//! inside a forward, images, model weights), and zstd spends most of a
//! frame's encoding time discovering that it cannot shrink such data. An
//! order-0 entropy estimate over a sample of the payload costs a fraction of
//! that: payloads that look like noise are sent as they are.
//!
//! The estimate is biased low on short samples (1,024 random bytes estimate
//! about 7.8 bits per byte, not 8), which is why payloads shorter than
//! [`MIN_SAMPLE`] are not judged at all and the threshold sits well below 8.
//! Text, JSON and SQL are around 4.5–6 bits per byte.

use std::sync::OnceLock;

/// Payloads shorter than this are always given to zstd to judge.
pub const MIN_SAMPLE: usize = 512;
/// Bytes looked at: 16 evenly spaced runs of 64 bytes.
const RUNS: usize = 16;
const RUN_LEN: usize = 64;
const SAMPLE: usize = RUNS * RUN_LEN;
/// Above this many bits per byte a sample is taken for incompressible.
const THRESHOLD_BITS: f64 = 7.5;

/// `c * log2(c)` for every count a sample can produce.
fn c_log2_c() -> &'static [f64; SAMPLE + 1] {
    static TABLE: OnceLock<Box<[f64; SAMPLE + 1]>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut table = Box::new([0.0; SAMPLE + 1]);
        for (count, slot) in table.iter_mut().enumerate().skip(1) {
            let c = count as f64;
            *slot = c * c.log2();
        }
        table
    })
}

/// Whether `payload` looks like random bytes (already compressed or encrypted).
pub fn looks_incompressible(payload: &[u8]) -> bool {
    if payload.len() < MIN_SAMPLE {
        return false;
    }
    let mut counts = [0u16; 256];
    let mut n = 0usize;
    if payload.len() <= SAMPLE {
        for &b in payload {
            counts[b as usize] += 1;
        }
        n = payload.len();
    } else {
        let stride = (payload.len() - RUN_LEN) / (RUNS - 1);
        for run in 0..RUNS {
            for &b in &payload[run * stride..run * stride + RUN_LEN] {
                counts[b as usize] += 1;
            }
            n += RUN_LEN;
        }
    }
    let table = c_log2_c();
    let sum: f64 = counts.iter().map(|&c| table[c as usize]).sum();
    let n = n as f64;
    let bits_per_byte = n.log2() - sum / n;
    bits_per_byte > THRESHOLD_BITS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo_random(len: usize) -> Vec<u8> {
        // xorshift: deterministic and statistically random enough here.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    #[test]
    fn random_bytes_are_incompressible() {
        for len in [512, 1024, 4096, 65536, 1 << 20] {
            assert!(looks_incompressible(&pseudo_random(len)), "len {len}");
        }
    }

    #[test]
    fn text_and_structured_data_are_compressible() {
        let json =
            br#"{"id": 123, "model": "gemma-3-270m", "choices": [{"text": "hello"}]}"#.repeat(64);
        assert!(!looks_incompressible(&json));
        let text = b"The quick brown fox jumps over the lazy dog. ".repeat(100);
        assert!(!looks_incompressible(&text));
        assert!(!looks_incompressible(&vec![0u8; 100_000]));
    }

    #[test]
    fn short_payloads_are_left_to_zstd() {
        assert!(!looks_incompressible(&pseudo_random(MIN_SAMPLE - 1)));
    }

    #[test]
    fn a_compressible_payload_with_a_random_prefix_is_still_compressed() {
        let mut payload = pseudo_random(256);
        payload.extend(b"SELECT * FROM t WHERE id = 1; ".repeat(2000));
        assert!(!looks_incompressible(&payload));
    }
}
