//! Properties of the batch scanner: however a byte stream of valid messages
//! is split into feeds, the reported messages (and, in relay mode, the bytes
//! handed back) are the same, and equal to what a model computes from the
//! message list; arbitrary bytes never make it panic.

use proptest::prelude::*;
use qmesh_pg::encode;
use qmesh_pg::{Direction, Scanner, ScannerConfig, Sink, TagSet, BACKEND_TAGS, FRONTEND_TAGS};

#[derive(Default)]
struct Collect {
    events: Vec<(u8, Vec<u8>, bool)>,
    out: Vec<u8>,
    passes: usize,
}

impl Sink for Collect {
    fn pass(&mut self, bytes: &[u8]) {
        self.passes += 1;
        self.out.extend_from_slice(bytes);
    }
    fn message(&mut self, tag: u8, raw: &[u8], complete: bool) {
        self.events.push((tag, raw.to_vec(), complete));
        self.out.extend_from_slice(raw);
    }
}

fn body_len() -> impl Strategy<Value = usize> {
    prop_oneof![
        30 => 0usize..64,
        8 => 64usize..4096,
        2 => 4096usize..200_000,
    ]
}

fn subset(tags: &'static [u8]) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<bool>(), tags.len()).prop_map(move |mask| {
        tags.iter()
            .zip(mask)
            .filter_map(|(t, m)| m.then_some(*t))
            .collect()
    })
}

fn cut_points(len: usize, seed: u64, max_chunk: usize) -> Vec<usize> {
    let mut cuts = Vec::new();
    let mut x = seed | 1;
    let mut pos = 0;
    while pos < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        pos += 1 + (x as usize) % max_chunk;
        cuts.push(pos.min(len));
    }
    cuts
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn same_boundaries_however_split(
        frontend in any::<bool>(),
        msgs in prop::collection::vec((any::<prop::sample::Index>(), body_len(), any::<u8>()), 0..40),
        full_f in subset(FRONTEND_TAGS),
        peek_f in subset(FRONTEND_TAGS),
        full_b in subset(BACKEND_TAGS),
        peek_b in subset(BACKEND_TAGS),
        relay in any::<bool>(),
        peek_max in prop_oneof![Just(0usize), 1usize..64, Just(1024usize)],
        seed in any::<u64>(),
        max_chunk in prop_oneof![Just(1usize), 2usize..16, 16usize..5000, Just(1usize << 20)],
    ) {
        let (direction, tags, full, peek) = if frontend {
            (Direction::Frontend, FRONTEND_TAGS, full_f, peek_f)
        } else {
            (Direction::Backend, BACKEND_TAGS, full_b, peek_b)
        };
        let full = TagSet::from_bytes(&full);
        let peek = TagSet::from_bytes(&peek);
        let mut stream = Vec::new();
        let mut expected = Vec::new();
        for (index, len, fill) in &msgs {
            let tag = tags[index.index(tags.len())];
            let raw = encode::message(tag, &vec![*fill; *len]).unwrap();
            if full.contains(tag) || (peek.contains(tag) && *len <= peek_max) {
                expected.push((tag, raw.clone(), true));
            } else if peek.contains(tag) {
                expected.push((tag, raw[..5 + peek_max].to_vec(), false));
            }
            stream.extend(raw);
        }
        let config = ScannerConfig { full, peek, relay, peek_max, ..ScannerConfig::new(direction) };

        let mut scanner = Scanner::new(config).unwrap();
        let mut sink = Collect::default();
        let mut start = 0;
        for cut in cut_points(stream.len(), seed, max_chunk) {
            scanner.feed(&stream[start..cut], &mut sink).unwrap();
            start = cut;
        }
        prop_assert_eq!(&sink.events, &expected);
        prop_assert_eq!(scanner.messages(), msgs.len() as u64);
        prop_assert_eq!(scanner.buffered(), 0);
        prop_assert!(scanner.eof().is_ok());
        if relay {
            prop_assert!(sink.out == stream, "relay output differs from the input");
        } else {
            prop_assert_eq!(sink.passes, 0);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(
        frontend in any::<bool>(),
        data in prop::collection::vec(any::<u8>(), 0..4096),
        seed in any::<u64>(),
        max_chunk in 1usize..512,
        relay in any::<bool>(),
    ) {
        let direction = if frontend { Direction::Frontend } else { Direction::Backend };
        let config = ScannerConfig {
            full: TagSet::from_bytes(b"QPZCE"),
            peek: TagSet::from_bytes(b"BDd"),
            relay,
            max_message: 2048,
            peek_max: 16,
            ..ScannerConfig::new(direction)
        };
        let mut scanner = Scanner::new(config).unwrap();
        let mut sink = Collect::default();
        let mut start = 0;
        let mut failed = None;
        for cut in cut_points(data.len(), seed, max_chunk) {
            if let Err(e) = scanner.feed(&data[start..cut], &mut sink) {
                failed = Some(e);
                break;
            }
            start = cut;
        }
        if let Some(e) = failed {
            // Poisoned: the same error again.
            prop_assert_eq!(scanner.feed(b"x", &mut sink).unwrap_err(), e);
        }
        // Every complete reported message really has its declared length.
        for (_, raw, complete) in &sink.events {
            let declared = u32::from_be_bytes([raw[1], raw[2], raw[3], raw[4]]) as usize + 1;
            prop_assert!(!*complete || declared == raw.len());
            prop_assert!(raw.len() <= 2049);
        }
    }

    #[test]
    fn typed_parsers_never_panic(
        tag in any::<u8>(),
        body in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        let _ = qmesh_pg::Frontend::parse(tag, &body);
        let _ = qmesh_pg::Backend::parse(tag, &body);
        let _ = qmesh_pg::parse_startup(&body, 10_000);
    }
}
