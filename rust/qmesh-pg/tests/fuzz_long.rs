//! The Postgres wire parser against hostile bytes: the batch scanner, the
//! startup-packet parser and the typed frontend/backend parsers.
//!
//! Each target has a `*_quick` test that runs with every `cargo test` and an
//! `#[ignore]`d `*_long` one, the stand-in for `cargo fuzz` (see
//! scripts/fuzz.sh and `fuzzkit`):
//!
//! ```text
//! QMESH_FUZZ_SECONDS=120 cargo test --release -p qmesh-pg --test fuzz_long \
//!     -- --ignored --nocapture
//! ```
//!
//! Inputs are streams of valid messages (typed ones built by
//! `qmesh_pg::encode`, and filler bodies up to 200 KB) under mutations (bit
//! flips, byte overwrites, truncations, length fields set to 0..4, to the
//! limit and one past it, to 2 GiB and 4 GiB, type bytes and counts
//! replaced, chunks duplicated, dropped and inserted), or plain random bytes,
//! fed in random chunk sizes. Beyond "no panic":
//!
//! * the scanner agrees exactly with a small reference model written from
//!   its documentation: the messages reported (bytes and all), the message
//!   count, the error (its variant and numbers), `buffered()`, `eof()` and,
//!   in relay mode, the bytes handed back, whatever the chunking;
//! * no single allocation exceeds what the bytes that actually arrived
//!   justify: a 2 GiB length field with ten bytes behind it allocates
//!   nothing of the sort (a counting global allocator measures it);
//! * errors are the typed ones the documentation promises, a poisoned
//!   scanner repeats its error, and valid messages still parse.

mod fuzzkit;

use fuzzkit::largest_alloc;
use proptest::prelude::*;
use proptest::sample::Index;
use qmesh_pg::encode::{self, Body};
use qmesh_pg::{
    backend, frontend, parse_startup, Backend, Direction, Error, Frontend, Scanner, ScannerConfig,
    Sink, Startup, TagSet, CANCEL_REQUEST_CODE, DEFAULT_MAX_MESSAGE, GSSENC_REQUEST_CODE,
    HEADER_LEN, MAX_MESSAGE_LIMIT, MAX_STARTUP_PACKET, PROTOCOL_3_0, SSL_REQUEST_CODE,
};

/// Allocations this small are noise (error texts, an 8-byte first `Vec`).
const SMALL_ALLOC: usize = 256;

// -- valid messages ---------------------------------------------------------------

fn text(max: usize) -> impl Strategy<Value = Vec<u8>> {
    // Protocol strings: any bytes but NUL.
    prop::collection::vec(1u8..=255, 0..max)
}

fn name(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => prop::collection::vec(b'a'..=b'z', 0..max),
        1 => text(max),
    ]
}

fn value(max: usize) -> impl Strategy<Value = Option<Vec<u8>>> {
    prop::option::weighted(0.8, prop::collection::vec(any::<u8>(), 0..max))
}

fn utf8_name() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-z_]{1,16}",
        1 => "[^\u{0}]{1,12}",
    ]
}

fn values(list: &[Option<Vec<u8>>]) -> Vec<Option<&[u8]>> {
    list.iter().map(Option::as_deref).collect()
}

/// One valid frontend message: (type byte, body).
fn frontend_message() -> impl Strategy<Value = (u8, Vec<u8>)> {
    let b = |m: Vec<u8>| (m[0], m[5..].to_vec());
    prop_oneof![
        text(200).prop_map(move |sql| b(encode::query(&sql).unwrap())),
        (
            name(16),
            text(100),
            prop::collection::vec(any::<u32>(), 0..8)
        )
            .prop_map(move |(n, sql, types)| b(encode::parse(&n, &sql, &types).unwrap())),
        (
            name(16),
            name(16),
            prop::collection::vec(0i16..2, 0..4),
            prop::collection::vec(value(40), 0..8),
            prop::collection::vec(0i16..2, 0..4),
        )
            .prop_map(move |(portal, st, pf, params, rf)| {
                b(encode::bind(&portal, &st, &pf, &values(&params), &rf).unwrap())
            }),
        (name(16), any::<i32>()).prop_map(move |(p, rows)| b(encode::execute(&p, rows).unwrap())),
        (
            prop::sample::select(&b"DC"[..]),
            prop::sample::select(&b"SP"[..]),
            name(16)
        )
            .prop_map(|(tag, kind, n)| {
                let mut body = Body::new();
                body.u8(kind).cstr(&n).unwrap();
                (tag, body.into_inner())
            }),
        prop::sample::select(&b"SHcX"[..]).prop_map(|tag| (tag, Vec::new())),
        prop::collection::vec(any::<u8>(), 0..300).prop_map(|data| (b'd', data)),
        text(60).prop_map(|m| {
            let mut body = Body::new();
            body.cstr(&m).unwrap();
            (b'f', body.into_inner())
        }),
        (utf8_name(), prop::collection::vec(any::<u8>(), 0..80)).prop_map(move |(mech, data)| {
            b(encode::sasl_initial_response(&mech, &data).unwrap())
        }),
        (
            any::<u32>(),
            prop::collection::vec(0i16..2, 0..4),
            prop::collection::vec(value(30), 0..6),
            0i16..2,
        )
            .prop_map(|(oid, formats, args, result)| {
                let mut body = Body::new();
                body.i32(oid as i32).count16(formats.len()).unwrap();
                for f in &formats {
                    body.i16(*f);
                }
                body.count16(args.len()).unwrap();
                for a in &args {
                    body.value(a.as_deref()).unwrap();
                }
                body.i16(result);
                (b'F', body.into_inner())
            }),
    ]
}

/// One valid backend message: (type byte, body).
fn backend_message() -> impl Strategy<Value = (u8, Vec<u8>)> {
    let b = |m: Vec<u8>| (m[0], m[5..].to_vec());
    prop_oneof![
        prop_oneof![
            Just((0i32, Vec::new())),
            Just((3, Vec::new())),
            any::<[u8; 4]>().prop_map(|salt| (5, salt.to_vec())),
            prop::collection::vec(utf8_name(), 0..4).prop_map(|names| {
                let mut data = Vec::new();
                for n in names {
                    data.extend(n.as_bytes());
                    data.push(0);
                }
                data.push(0);
                (10, data)
            }),
            (11i32..=12, prop::collection::vec(any::<u8>(), 0..100)),
            (any::<i32>(), prop::collection::vec(any::<u8>(), 0..20)),
        ]
        .prop_map(move |(code, data)| b(encode::authentication(code, &data).unwrap())),
        (name(20), text(40)).prop_map(move |(n, v)| b(encode::parameter_status(&n, &v).unwrap())),
        (any::<u32>(), prop::collection::vec(any::<u8>(), 4..=256))
            .prop_map(move |(pid, key)| b(encode::backend_key_data(pid, &key).unwrap())),
        prop::sample::select(&b"ITE"[..]).prop_map(move |s| b(encode::ready_for_query(s).unwrap())),
        prop::collection::vec((name(12), any::<[u8; 18]>()), 0..5).prop_map(|fields| {
            let mut body = Body::new();
            body.count16(fields.len()).unwrap();
            for (n, rest) in &fields {
                body.cstr(n).unwrap().bytes(rest);
            }
            (b'T', body.into_inner())
        }),
        prop::collection::vec(value(60), 0..8).prop_map(|cols| {
            let mut body = Body::new();
            body.count16(cols.len()).unwrap();
            for c in &cols {
                body.value(c.as_deref()).unwrap();
            }
            (b'D', body.into_inner())
        }),
        (
            prop::sample::select(vec!["SELECT", "INSERT 0", "UPDATE", "BEGIN", "COPY"]),
            any::<u32>()
        )
            .prop_map(|(cmd, n)| {
                let mut body = Body::new();
                body.cstr(format!("{cmd} {n}").as_bytes()).unwrap();
                (b'C', body.into_inner())
            }),
        (
            prop::sample::select(&b"EN"[..]),
            prop::collection::vec((1u8..=255, "[^\u{0}]{0,30}"), 0..6)
        )
            .prop_map(move |(tag, fields)| {
                let fields: Vec<(u8, &str)> =
                    fields.iter().map(|(c, v)| (*c, v.as_str())).collect();
                b(encode::error_response(tag, &fields).unwrap())
            }),
        (any::<u32>(), name(20), text(60)).prop_map(|(pid, channel, payload)| {
            let mut body = Body::new();
            body.i32(pid as i32)
                .cstr(&channel)
                .unwrap()
                .cstr(&payload)
                .unwrap();
            (b'A', body.into_inner())
        }),
        (
            prop::sample::select(&b"GHW"[..]),
            0u8..2,
            prop::collection::vec(0i16..2, 0..8)
        )
            .prop_map(|(tag, format, cols)| {
                let mut body = Body::new();
                body.u8(format).count16(cols.len()).unwrap();
                for c in &cols {
                    body.i16(*c);
                }
                (tag, body.into_inner())
            }),
        prop::collection::vec(any::<u8>(), 0..300).prop_map(|data| (b'd', data)),
        prop::sample::select(&b"c123nsI"[..]).prop_map(|tag| (tag, Vec::new())),
        prop::collection::vec(any::<u32>(), 0..8).prop_map(|types| {
            let mut body = Body::new();
            body.count16(types.len()).unwrap();
            for t in &types {
                body.i32(*t as i32);
            }
            (b't', body.into_inner())
        }),
        value(60).prop_map(|v| {
            let mut body = Body::new();
            body.value(v.as_deref()).unwrap();
            (b'V', body.into_inner())
        }),
        (
            any::<u32>(),
            prop::collection::vec("_pq_\\.[a-z_]{1,12}", 0..4)
        )
            .prop_map(move |(minor, opts)| {
                let opts: Vec<&str> = opts.iter().map(String::as_str).collect();
                b(encode::negotiate_protocol_version(minor, &opts).unwrap())
            }),
    ]
}

fn parse_typed(direction: Direction, tag: u8, body: &[u8]) -> Result<(), Error> {
    match direction {
        Direction::Frontend => Frontend::parse(tag, body).map(drop),
        Direction::Backend => Backend::parse(tag, body).map(drop),
    }
}

// -- mutations --------------------------------------------------------------------

/// A length field's new value, resolved against the case's limit.
#[derive(Debug, Clone, Copy)]
enum Length {
    Exact(u32),
    /// `limit + delta` (saturating), the edges of the cap.
    AtLimit(i8),
}

fn length() -> impl Strategy<Value = Length> {
    prop_oneof![
        (0u32..=5).prop_map(Length::Exact),
        (0u32..100_000).prop_map(Length::Exact),
        (-1i8..=1).prop_map(Length::AtLimit),
        prop::sample::select(vec![
            0x7fff_ffffu32,
            0x8000_0000,
            u32::MAX,
            200 << 20,
            DEFAULT_MAX_MESSAGE as u32 + 1,
        ])
        .prop_map(Length::Exact),
    ]
}

impl Length {
    fn resolve(self, limit: usize) -> u32 {
        match self {
            Length::Exact(v) => v,
            Length::AtLimit(d) => (limit as i64 + i64::from(d)).clamp(0, u32::MAX.into()) as u32,
        }
    }
}

#[derive(Debug, Clone)]
enum Mutation {
    FlipBit {
        at: Index,
        bit: u8,
    },
    SetByte {
        at: Index,
        value: u8,
    },
    Truncate {
        at: Index,
    },
    /// Rewrite the length field of a message (by its boundary as the
    /// length fields say so far).
    EditLength {
        msg: Index,
        value: Length,
    },
    /// Replace a type byte: any byte, or one valid in the other direction.
    SetTag {
        msg: Index,
        tag: u8,
    },
    /// Overwrite 2 or 4 bytes inside a body with a count-like value.
    EditCount {
        at: Index,
        wide: bool,
        value: i32,
    },
    Duplicate {
        at: Index,
        len: usize,
    },
    Drop {
        at: Index,
        len: usize,
    },
    Insert {
        at: Index,
        bytes: Vec<u8>,
    },
}

fn count_value() -> impl Strategy<Value = i32> {
    prop_oneof![
        prop::sample::select(vec![
            0,
            1,
            2,
            -1,
            -2,
            i16::MAX.into(),
            i16::MIN.into(),
            0x4000,
            i32::MAX,
            i32::MIN,
            0x7fff_0000,
        ]),
        any::<i32>(),
        0i32..64,
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let any_tag = prop_oneof![
        any::<u8>(),
        prop::sample::select(&b"BCDEFHPQSXcdfp123ACDEGHIKNRSTVWZcdnstv"[..]),
    ];
    prop_oneof![
        1 => (any::<Index>(), 0u8..8).prop_map(|(at, bit)| Mutation::FlipBit { at, bit }),
        1 => (any::<Index>(), any::<u8>()).prop_map(|(at, value)| Mutation::SetByte { at, value }),
        1 => any::<Index>().prop_map(|at| Mutation::Truncate { at }),
        3 => (any::<Index>(), length()).prop_map(|(msg, value)| Mutation::EditLength { msg, value }),
        1 => (any::<Index>(), any_tag).prop_map(|(msg, tag)| Mutation::SetTag { msg, tag }),
        2 => (any::<Index>(), any::<bool>(), count_value())
            .prop_map(|(at, wide, value)| Mutation::EditCount { at, wide, value }),
        1 => (any::<Index>(), 1usize..200).prop_map(|(at, len)| Mutation::Duplicate { at, len }),
        1 => (any::<Index>(), 1usize..200).prop_map(|(at, len)| Mutation::Drop { at, len }),
        1 => (any::<Index>(), prop::collection::vec(any::<u8>(), 1..64))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
    ]
}

/// Message starts in a tagged stream, as far as the length fields say.
fn boundaries(wire: &[u8]) -> Vec<usize> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos + HEADER_LEN <= wire.len() {
        out.push(pos);
        let len = u32::from_be_bytes(wire[pos + 1..pos + 5].try_into().unwrap()) as usize;
        pos = pos.saturating_add(1 + len.max(4));
    }
    out
}

/// Apply `m` to a tagged stream (`untagged`: a startup packet, whose only
/// length field is at 0 and has no type byte).
fn apply(wire: &mut Vec<u8>, m: &Mutation, limit: usize, untagged: bool) {
    let n = wire.len();
    match m {
        Mutation::Insert { at, bytes } => {
            let at = at.index(n + 1);
            wire.splice(at..at, bytes.iter().copied());
        }
        _ if n == 0 => {}
        Mutation::FlipBit { at, bit } => wire[at.index(n)] ^= 1 << bit,
        Mutation::SetByte { at, value } => wire[at.index(n)] = *value,
        Mutation::Truncate { at } => wire.truncate(at.index(n)),
        Mutation::EditLength { msg, value } => {
            let value = value.resolve(limit).to_be_bytes();
            if untagged {
                if n >= 4 {
                    wire[..4].copy_from_slice(&value);
                }
            } else {
                let b = boundaries(wire);
                if !b.is_empty() {
                    let start = b[msg.index(b.len())];
                    wire[start + 1..start + 5].copy_from_slice(&value);
                }
            }
        }
        Mutation::SetTag { msg, tag } => {
            let b = boundaries(wire);
            if !untagged && !b.is_empty() {
                wire[b[msg.index(b.len())]] = *tag;
            }
        }
        Mutation::EditCount { at, wide, value } => {
            let bytes: Vec<u8> = if *wide {
                value.to_be_bytes().to_vec()
            } else {
                (*value as i16).to_be_bytes().to_vec()
            };
            if n >= bytes.len() {
                let at = at.index(n - bytes.len() + 1);
                wire[at..at + bytes.len()].copy_from_slice(&bytes);
            }
        }
        Mutation::Duplicate { at, len } => {
            let at = at.index(n);
            let chunk = wire[at..(at + len).min(n)].to_vec();
            wire.splice(at..at, chunk);
        }
        Mutation::Drop { at, len } => {
            let at = at.index(n);
            wire.drain(at..(at + len).min(n));
        }
    }
}

/// xorshift64: chunk sizes from a seed.
fn chunk_sizes(seed: u64, max_chunk: usize) -> impl FnMut() -> usize {
    let mut x = seed | 1;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        1 + (x as usize) % max_chunk
    }
}

// -- target 1: the scanner ----------------------------------------------------------

#[derive(Debug, Clone)]
enum Msg {
    /// A typed message that must parse.
    Typed(u8, Vec<u8>),
    /// Type byte (an index into the direction's tags), body length, fill byte.
    Filler(Index, usize, u8),
}

#[derive(Debug, Clone)]
struct ScanCase {
    frontend: bool,
    msgs: Vec<Msg>,
    full: Vec<bool>,
    peek: Vec<bool>,
    relay: bool,
    max_message: usize,
    peek_max: usize,
    mutations: Vec<Mutation>,
    noise: Option<Vec<u8>>,
    max_chunk: usize,
    chunk_seed: u64,
}

fn scan_case() -> impl Strategy<Value = ScanCase> {
    let msgs = |typed: BoxedStrategy<(u8, Vec<u8>)>| {
        prop::collection::vec(
            prop_oneof![
                3 => typed.prop_map(|(t, b)| Msg::Typed(t, b)),
                1 => (any::<Index>(), prop_oneof![
                    20 => 0usize..64,
                    4 => 64usize..5000,
                    1 => 5000usize..200_000,
                ], any::<u8>()).prop_map(|(i, len, fill)| Msg::Filler(i, len, fill)),
            ],
            0..24,
        )
    };
    let direction = any::<bool>().prop_flat_map(move |frontend| {
        let typed = if frontend {
            frontend_message().boxed()
        } else {
            backend_message().boxed()
        };
        (Just(frontend), msgs(typed))
    });
    (
        direction,
        prop::collection::vec(prop::bool::weighted(0.3), 24),
        prop::collection::vec(prop::bool::weighted(0.3), 24),
        any::<bool>(),
        prop_oneof![
            1 => Just(4usize),
            1 => Just(5usize),
            2 => 16usize..600,
            2 => Just(2048usize),
            2 => Just(65_536usize),
            4 => Just(DEFAULT_MAX_MESSAGE),
            1 => Just(MAX_MESSAGE_LIMIT),
        ],
        prop_oneof![
            Just(0usize),
            1usize..64,
            Just(1024usize),
            Just(1usize << 20),
            Just(usize::MAX),
        ],
        prop::collection::vec(mutation(), 0..4),
        prop::option::weighted(0.1, prop::collection::vec(any::<u8>(), 0..2048)),
        prop_oneof![Just(1usize), 2usize..32, 32usize..5000, Just(1usize << 30)],
        any::<u64>(),
    )
        .prop_map(
            |(
                (frontend, msgs),
                full,
                peek,
                relay,
                max_message,
                peek_max,
                mutations,
                noise,
                max_chunk,
                chunk_seed,
            )| ScanCase {
                frontend,
                msgs,
                full,
                peek,
                relay,
                max_message,
                peek_max,
                mutations,
                noise,
                max_chunk,
                chunk_seed,
            },
        )
}

/// A reported message, as the reference model sees it: where it starts in
/// the input, how long the report is, whether it is the whole message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Report {
    tag: u8,
    start: usize,
    len: usize,
    complete: bool,
}

#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    reports: Vec<Report>,
    error: Option<Error>,
    messages: u64,
    /// Relay mode: the bytes handed back (passes and reports) are the
    /// input's first `emitted` bytes.
    emitted: usize,
    buffered: usize,
    in_message: bool,
}

/// What the scanner must do with `input`, from its documentation alone.
fn model(input: &[u8], config: &ScannerConfig) -> Outcome {
    let valid = config.direction.tags();
    let n = input.len();
    let mut out = Outcome {
        reports: Vec::new(),
        error: None,
        messages: 0,
        emitted: n,
        buffered: 0,
        in_message: false,
    };
    let mut pos = 0;
    while pos < n {
        if pos + HEADER_LEN > n {
            out.emitted = pos;
            out.buffered = n - pos;
            out.in_message = true;
            break;
        }
        let tag = input[pos];
        let length = u32::from_be_bytes(input[pos + 1..pos + 5].try_into().unwrap()) as usize;
        if !valid.contains(&tag) {
            out.error = Some(Error::Malformed(String::new()));
        } else if length > config.max_message {
            out.error = Some(Error::TooLarge {
                length: length as u64,
                limit: config.max_message,
            });
        } else if length < 4 {
            out.error = Some(Error::Malformed(String::new()));
        }
        if out.error.is_some() {
            out.emitted = pos;
            break;
        }
        let body = length - 4;
        let total = length + 1;
        let arrived = n - pos;
        let whole = arrived >= total;
        let full =
            config.full.contains(tag) || (config.peek.contains(tag) && body <= config.peek_max);
        if full {
            if whole {
                out.reports.push(Report {
                    tag,
                    start: pos,
                    len: total,
                    complete: true,
                });
            } else {
                out.emitted = pos;
                out.buffered = arrived;
            }
        } else if config.peek.contains(tag) {
            let prefix = HEADER_LEN + config.peek_max;
            if arrived >= prefix {
                out.reports.push(Report {
                    tag,
                    start: pos,
                    len: prefix,
                    complete: false,
                });
            } else {
                out.emitted = pos;
                out.buffered = arrived;
            }
        }
        if !whole {
            out.in_message = true;
            break;
        }
        out.messages += 1;
        pos += total;
    }
    out
}

/// Checks every call against the input as it happens, without allocating
/// (the allocation probe is armed while the scanner runs).
struct Checker<'a> {
    input: &'a [u8],
    expected: &'a [Report],
    relay: bool,
    /// Relay mode: where the next handed-back byte must come from.
    emitted: usize,
    reports: usize,
    passes: usize,
    fault: Option<&'static str>,
}

impl Sink for Checker<'_> {
    fn pass(&mut self, bytes: &[u8]) {
        self.passes += 1;
        let end = self.emitted + bytes.len();
        if end > self.input.len() || bytes != &self.input[self.emitted..end] {
            self.fault
                .get_or_insert("passed bytes that are not the next input bytes");
        }
        self.emitted = end.min(self.input.len());
    }

    fn message(&mut self, tag: u8, raw: &[u8], complete: bool) {
        let Some(want) = self.expected.get(self.reports) else {
            self.fault
                .get_or_insert("reported more messages than the model");
            return;
        };
        self.reports += 1;
        let got = &self.input[want.start..(want.start + want.len).min(self.input.len())];
        if tag != want.tag || complete != want.complete || raw != got {
            self.fault
                .get_or_insert("a report differs from the model's");
        }
        if self.relay {
            if self.emitted != want.start {
                self.fault
                    .get_or_insert("a report is out of place in the relayed bytes");
            }
            self.emitted = want.start + raw.len();
        }
    }
}

fn tag_set(tags: &[u8], mask: &[bool]) -> TagSet {
    let chosen: Vec<u8> = tags
        .iter()
        .zip(mask)
        .filter_map(|(t, m)| m.then_some(*t))
        .collect();
    TagSet::from_bytes(&chosen)
}

fn same_error(got: &Error, want: &Error) -> bool {
    match (got, want) {
        (Error::Malformed(_), Error::Malformed(_)) => true,
        _ => got == want,
    }
}

fn run_scan_case(c: ScanCase) -> Result<(), TestCaseError> {
    let direction = if c.frontend {
        Direction::Frontend
    } else {
        Direction::Backend
    };
    let tags = direction.tags();
    let mut wire = Vec::new();
    let mut typed = Vec::new(); // (start, tag, body len) of typed messages
    for m in &c.msgs {
        let (tag, body) = match m {
            Msg::Typed(tag, body) => {
                typed.push((wire.len(), *tag, body.len()));
                (*tag, body.clone())
            }
            Msg::Filler(i, len, fill) => (tags[i.index(tags.len())], vec![*fill; *len]),
        };
        wire.extend(encode::message(tag, &body).unwrap());
    }
    let pristine = c.noise.is_none() && c.mutations.is_empty();
    if let Some(noise) = &c.noise {
        wire = noise.clone();
    }
    for m in &c.mutations {
        apply(&mut wire, m, c.max_message, false);
    }

    let config = ScannerConfig {
        full: tag_set(tags, &c.full),
        peek: tag_set(tags, &c.peek),
        relay: c.relay,
        max_message: c.max_message,
        peek_max: c.peek_max,
        ..ScannerConfig::new(direction)
    };
    let want = model(&wire, &config);
    let mut scanner = Scanner::new(config).unwrap();
    let mut sink = Checker {
        input: &wire,
        expected: &want.reports,
        relay: c.relay,
        emitted: 0,
        reports: 0,
        passes: 0,
        fault: None,
    };
    let mut next = chunk_sizes(c.chunk_seed, c.max_chunk);
    let mut pos = 0;
    let mut error = None;
    while pos < wire.len() {
        let end = (pos + next()).min(wire.len());
        let (result, largest) = largest_alloc(|| scanner.feed(&wire[pos..end], &mut sink));
        // Growth follows the bytes that arrived (doubling at most), never
        // the declared length, and never passes the cap.
        prop_assert!(
            largest <= SMALL_ALLOC.max((2 * end).min(c.max_message.saturating_add(1))),
            "feeding up to byte {} allocated {} bytes at once (cap {})",
            end,
            largest,
            c.max_message
        );
        pos = end;
        if let Err(e) = result {
            // Poisoned: the same error from every entry point, no reports.
            let reports = sink.reports;
            prop_assert_eq!(scanner.feed(b"Q\0\0\0\x04", &mut sink), Err(e.clone()));
            prop_assert_eq!(scanner.eof(), Err(e.clone()));
            prop_assert_eq!(sink.reports, reports);
            error = Some(e);
            break;
        }
    }
    if let Some(fault) = sink.fault {
        return Err(TestCaseError::fail(fault));
    }
    prop_assert_eq!(sink.reports, want.reports.len(), "reports");
    match (&error, &want.error) {
        (None, None) => {
            prop_assert_eq!(scanner.messages(), want.messages);
            prop_assert_eq!(scanner.buffered(), want.buffered);
            prop_assert_eq!(scanner.in_message(), want.in_message);
            let eof = scanner.eof();
            if want.in_message {
                prop_assert_eq!(eof, Err(Error::Truncated));
            } else {
                prop_assert_eq!(eof, Ok(()));
            }
        }
        (Some(got), Some(expected)) => {
            prop_assert!(
                same_error(got, expected),
                "error {:?}, model {:?}",
                got,
                expected
            );
            prop_assert_eq!(scanner.messages(), want.messages);
            prop_assert_eq!(scanner.buffered(), 0);
        }
        (got, expected) => {
            return Err(TestCaseError::fail(format!(
                "scanner error {got:?}, model error {expected:?}"
            )))
        }
    }
    if c.relay {
        prop_assert_eq!(sink.emitted, want.emitted, "relayed bytes");
    } else {
        prop_assert_eq!(sink.passes, 0);
    }

    // Reported whole messages go on to the typed parsers: no panic, and no
    // allocation beyond what the body can hold.
    for r in want.reports.iter().filter(|r| r.complete) {
        let body = &wire[r.start + HEADER_LEN..r.start + r.len];
        let (_, largest) = largest_alloc(|| parse_typed(direction, r.tag, body));
        prop_assert!(largest <= SMALL_ALLOC + 64 * body.len());
    }
    if pristine {
        // Valid messages still parse, wherever they sit in the stream.
        for (start, tag, len) in typed {
            let body = &wire[start + HEADER_LEN..start + HEADER_LEN + len];
            prop_assert!(
                parse_typed(direction, tag, body).is_ok(),
                "valid {} message {:?} did not parse: {:?}",
                direction.name(),
                tag as char,
                parse_typed(direction, tag, body)
            );
        }
        if want.error.is_none() {
            prop_assert_eq!(want.messages, c.msgs.len() as u64);
        }
    }
    Ok(())
}

#[test]
fn fuzz_scanner_quick() {
    fuzzkit::quick("pg_scanner", 512, scan_case(), run_scan_case);
}

#[test]
#[ignore = "long: run via scripts/fuzz.sh (QMESH_FUZZ_CASES / QMESH_FUZZ_SECONDS)"]
fn fuzz_scanner_long() {
    fuzzkit::long("pg_scanner", scan_case(), run_scan_case);
}

// -- target 2: the startup packet -----------------------------------------------------

#[derive(Debug, Clone)]
enum Packet {
    Startup(u32, Vec<(String, String)>),
    Ssl,
    GssEnc,
    Cancel(u32, Vec<u8>),
    /// Any untagged packet: the code and whatever follows it.
    Raw(u32, Vec<u8>),
}

#[derive(Debug, Clone)]
struct StartupCase {
    packet: Packet,
    max_length: usize,
    mutations: Vec<Mutation>,
    trailing: Vec<u8>,
    noise: Option<Vec<u8>>,
}

fn request_code() -> impl Strategy<Value = u32> {
    prop_oneof![
        prop::sample::select(vec![
            SSL_REQUEST_CODE,
            GSSENC_REQUEST_CODE,
            CANCEL_REQUEST_CODE,
            PROTOCOL_3_0,
            PROTOCOL_3_0 | 2,
            PROTOCOL_3_0 | 0xffff,
            2 << 16,
            4 << 16,
            1234 << 16 | 5681,
            0,
            u32::MAX,
        ]),
        any::<u32>(),
    ]
}

fn startup_case() -> impl Strategy<Value = StartupCase> {
    let packet = prop_oneof![
        4 => (
            prop_oneof![Just(PROTOCOL_3_0), (0u32..=0xffff).prop_map(|m| PROTOCOL_3_0 | m)],
            prop::collection::vec((utf8_name(), "[^\u{0}]{0,40}"), 0..12),
        )
            .prop_map(|(v, p)| Packet::Startup(v, p)),
        1 => Just(Packet::Ssl),
        1 => Just(Packet::GssEnc),
        1 => (any::<u32>(), prop::collection::vec(any::<u8>(), 4..=256))
            .prop_map(|(pid, key)| Packet::Cancel(pid, key)),
        1 => (request_code(), prop::collection::vec(any::<u8>(), 0..300))
            .prop_map(|(code, rest)| Packet::Raw(code, rest)),
    ];
    (
        packet,
        prop_oneof![
            4 => Just(MAX_STARTUP_PACKET),
            1 => Just(0usize),
            1 => 1usize..16,
            1 => 16usize..400,
            1 => Just(usize::MAX),
        ],
        prop::collection::vec(mutation(), 0..3),
        prop::collection::vec(any::<u8>(), 0..16),
        prop::option::weighted(0.1, prop::collection::vec(any::<u8>(), 0..64)),
    )
        .prop_map(
            |(packet, max_length, mutations, trailing, noise)| StartupCase {
                packet,
                max_length,
                mutations,
                trailing,
                noise,
            },
        )
}

fn raw_packet(code: u32, rest: &[u8]) -> Vec<u8> {
    let mut out = ((8 + rest.len()) as u32).to_be_bytes().to_vec();
    out.extend(code.to_be_bytes());
    out.extend(rest);
    out
}

fn encode_packet(p: &Packet) -> Vec<u8> {
    match p {
        Packet::Startup(version, params) => {
            let params: Vec<(&str, &str)> = params
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_str()))
                .collect();
            encode::startup_message(*version, &params).unwrap()
        }
        Packet::Ssl => encode::ssl_request(),
        Packet::GssEnc => encode::gssenc_request(),
        Packet::Cancel(pid, key) => encode::cancel_request(*pid, key).unwrap(),
        Packet::Raw(code, rest) => raw_packet(*code, rest),
    }
}

/// The structure every accepted packet must have, whatever bytes made it.
fn check_packet(packet: &Startup<'_>, used: usize) -> Result<(), TestCaseError> {
    match packet {
        Startup::SslRequest | Startup::GssEncRequest => prop_assert_eq!(used, 8),
        Startup::CancelRequest { secret, .. } => {
            prop_assert!((4..=256).contains(&secret.len()));
            prop_assert_eq!(used, 12 + secret.len());
        }
        Startup::StartupMessage { version, params } => {
            prop_assert_eq!(version >> 16, 3);
            let mut size = 8 + 1; // length, code, the list's final NUL
            for (n, v) in params {
                prop_assert!(!n.is_empty() && !n.contains('\0') && !v.contains('\0'));
                size += n.len() + v.len() + 2;
            }
            prop_assert_eq!(size, used);
        }
    }
    Ok(())
}

fn run_startup_case(c: StartupCase) -> Result<(), TestCaseError> {
    let mut buf = encode_packet(&c.packet);
    let pristine = c.mutations.is_empty() && c.noise.is_none();
    if let Some(noise) = &c.noise {
        buf = noise.clone();
    }
    for m in &c.mutations {
        apply(&mut buf, m, c.max_length, true);
    }
    buf.extend(&c.trailing);

    let (result, largest) = largest_alloc(|| parse_startup(&buf, c.max_length));
    // The parameter list is the only thing sized by the input: at most one
    // (&str, &str) per two bytes of the packet, doubled by growth.
    prop_assert!(
        largest <= SMALL_ALLOC + 32 * buf.len().min(c.max_length),
        "allocated {} bytes for a {}-byte buffer",
        largest,
        buf.len()
    );
    if buf.len() < 4 {
        prop_assert_eq!(result, Ok(None));
        return Ok(());
    }
    let declared = u32::from_be_bytes(buf[..4].try_into().unwrap()) as usize;
    match &result {
        Err(Error::TooLarge { length, limit }) => {
            prop_assert!(declared > c.max_length);
            prop_assert_eq!((*length, *limit), (declared as u64, c.max_length));
        }
        _ if declared > c.max_length => {
            return Err(TestCaseError::fail(format!(
                "length {declared} over the limit {} gave {result:?}",
                c.max_length
            )))
        }
        Err(Error::Malformed(_)) => {}
        Err(other) => {
            return Err(TestCaseError::fail(format!(
                "untyped error for peer bytes: {other:?}"
            )))
        }
        Ok(None) => prop_assert!(declared >= 8 && buf.len() < declared),
        Ok(Some((packet, used))) => {
            prop_assert_eq!(*used, declared);
            prop_assert!(*used <= buf.len() && *used <= c.max_length);
            check_packet(packet, *used)?;
            // Only the packet's own bytes count: what follows is not read,
            // and any proper prefix is "incomplete", never an error.
            let again = parse_startup(&buf[..*used], c.max_length);
            prop_assert_eq!(&again, &result);
            for cut in [0, 3, 4, 7, *used / 2, *used - 1] {
                if cut < *used {
                    prop_assert_eq!(parse_startup(&buf[..cut], c.max_length), Ok(None));
                }
            }
        }
    }
    if declared < 8 && declared <= c.max_length {
        prop_assert!(matches!(result, Err(Error::Malformed(_))));
    }
    let valid = !matches!(c.packet, Packet::Raw(..));
    if pristine && valid && declared <= c.max_length {
        let parsed = result.map_err(|e| TestCaseError::fail(format!("valid packet: {e}")))?;
        let (packet, _) = parsed.expect("a whole packet");
        match (&c.packet, packet) {
            (
                Packet::Startup(v, params),
                Startup::StartupMessage {
                    version,
                    params: got,
                },
            ) => {
                prop_assert_eq!(*v, version);
                let want: Vec<(&str, &str)> = params
                    .iter()
                    .map(|(n, v)| (n.as_str(), v.as_str()))
                    .collect();
                prop_assert_eq!(want, got);
            }
            (Packet::Ssl, Startup::SslRequest) | (Packet::GssEnc, Startup::GssEncRequest) => {}
            (Packet::Cancel(p, k), Startup::CancelRequest { pid, secret }) => {
                prop_assert_eq!((*p, &k[..]), (pid, secret));
            }
            (sent, got) => {
                return Err(TestCaseError::fail(format!(
                    "sent {sent:?}, parsed {got:?}"
                )))
            }
        }
    }
    Ok(())
}

#[test]
fn fuzz_startup_quick() {
    fuzzkit::quick("pg_startup", 2048, startup_case(), run_startup_case);
}

#[test]
#[ignore = "long: run via scripts/fuzz.sh (QMESH_FUZZ_CASES / QMESH_FUZZ_SECONDS)"]
fn fuzz_startup_long() {
    fuzzkit::long("pg_startup", startup_case(), run_startup_case);
}

// -- target 3: the typed parsers ------------------------------------------------------

#[derive(Debug, Clone)]
struct TypedCase {
    frontend: bool,
    /// Built by a valid-message generator (else random bytes).
    generated: bool,
    tag: u8,
    body: Vec<u8>,
    mutations: Vec<Mutation>,
    /// Parse the body under another type byte.
    retag: Option<u8>,
}

fn typed_case() -> impl Strategy<Value = TypedCase> {
    (
        prop_oneof![
            2 => frontend_message().prop_map(|m| (true, true, m)),
            2 => backend_message().prop_map(|m| (false, true, m)),
            1 => (any::<bool>(), (any::<u8>(), prop::collection::vec(any::<u8>(), 0..128)))
                .prop_map(|(frontend, m)| (frontend, false, m)),
        ],
        prop::collection::vec(mutation(), 0..4),
        prop::option::weighted(0.1, any::<u8>()),
    )
        .prop_map(
            |((frontend, generated, (tag, body)), mutations, retag)| TypedCase {
                frontend,
                generated,
                tag,
                body,
                mutations,
                retag,
            },
        )
}

/// Every parse entry point over `body`; returns the main parser's result.
fn parse_everything(direction: Direction, tag: u8, body: &[u8]) -> Result<(), Error> {
    let _ = frontend::bind_names(body);
    let _ = frontend::sasl_initial_response(body);
    let _ = frontend::password_message(body);
    let _ = backend::authentication(body);
    let _ = backend::parameter_status(body);
    let _ = backend::backend_key_data(body);
    let _ = backend::ready_for_query(body);
    let _ = backend::command_complete(body).map(backend::command_rows);
    let _ = backend::notice_fields(body);
    let _ = backend::notification(body);
    let _ = backend::copy_response(body);
    let _ = backend::negotiate_protocol_version(body);
    let _ = backend::command_rows(body);
    parse_typed(direction, tag, body)
}

fn run_typed_case(c: TypedCase) -> Result<(), TestCaseError> {
    let direction = if c.frontend {
        Direction::Frontend
    } else {
        Direction::Backend
    };
    let mut body = c.body.clone();
    for m in &c.mutations {
        // Bodies have no length field of their own; edits of counts and
        // value lengths come from EditCount.
        let limit = body.len();
        apply(&mut body, m, limit, true);
    }
    let tag = c.retag.unwrap_or(c.tag);
    let (result, largest) = largest_alloc(|| parse_everything(direction, tag, &body));
    // Counts are checked against the bytes left before a Vec is sized: the
    // largest item (a RowDescription field, 19 bytes on the wire) takes
    // under 64 bytes in memory, so 64 per body byte bounds any honest Vec.
    prop_assert!(
        largest <= SMALL_ALLOC + 64 * body.len(),
        "allocated {} bytes for a {}-byte body",
        largest,
        body.len()
    );
    if let Err(e) = &result {
        prop_assert!(matches!(e, Error::Malformed(_)), "untyped error {:?}", e);
    }
    if c.generated && c.mutations.is_empty() && c.retag.is_none() {
        prop_assert!(
            result.is_ok(),
            "valid {} message {:?}: {:?}",
            direction.name(),
            tag as char,
            result
        );
    }
    Ok(())
}

#[test]
fn fuzz_typed_quick() {
    fuzzkit::quick("pg_typed", 2048, typed_case(), run_typed_case);
}

#[test]
#[ignore = "long: run via scripts/fuzz.sh (QMESH_FUZZ_CASES / QMESH_FUZZ_SECONDS)"]
fn fuzz_typed_long() {
    fuzzkit::long("pg_typed", typed_case(), run_typed_case);
}
