//! The Noise IK handshake against hostile messages: whatever arrives as
//! message 1 at the responder or as message 2 at the initiator, nothing
//! panics, and the handshake either succeeds with exactly what the honest
//! peer sent or fails with `Error::Handshake` and stays failed.
//!
//! `fuzz_handshake_quick` runs with every `cargo test`; `fuzz_handshake_long`
//! is the stand-in for `cargo fuzz` (see scripts/fuzz.sh and `fuzzkit`):
//!
//! ```text
//! QMESH_FUZZ_SECONDS=120 cargo test --release -p qmesh-wire --test handshake_fuzz \
//!     -- --ignored --nocapture
//! ```
//!
//! Inputs: an honest peer's message (payloads from empty to the 65,000-byte
//! maximum), possibly under the wrong responder key or a different
//! prologue, then mutated (bit flips, byte overwrites, truncations,
//! extensions past Noise's 65,535-byte limit, inserted, dropped and replaced
//! chunks), or plain random bytes; after it, a random sequence of further
//! calls (reads, writes, `into_codec` with good and bad settings) on the
//! side under test. Properties:
//!
//! * a message whose bytes differ from the honest one never authenticates;
//!   the honest one, under matching keys and prologue, always does, and
//!   yields the payload that was sent and the right remote static key;
//! * a failed handshake is poisoned: every later call fails with
//!   `Error::Handshake`, `remote_static` tells nothing new, `is_finished`
//!   is false;
//! * a finished one gives a codec pair that talks to the honest peer's.
//!
//! The static keys are RFC 7748's test vectors, so cases are reproducible;
//! the ephemeral keys come from the OS, which changes the bytes but not the
//! outcome of any case.

mod fuzzkit;

use proptest::prelude::*;
use proptest::sample::Index;
use qmesh_wire::{
    DecoderConfig, EncoderConfig, Error, NoiseHandshake, MAX_HANDSHAKE_PAYLOAD, MAX_PAYLOAD_LIMIT,
};

/// RFC 7748 section 6.1: Alice (the edge) and Bob (the Gate).
const EDGE_PRIVATE: [u8; 32] =
    hex32("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a");
const EDGE_PUBLIC: [u8; 32] =
    hex32("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a");
const GATE_PRIVATE: [u8; 32] =
    hex32("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb");
const GATE_PUBLIC: [u8; 32] =
    hex32("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f");
const PROLOGUE: &[u8] = b"QMSH\x01\0\0\0";
const MAX_MESSAGE_LEN: usize = 65_535;

const fn hex32(s: &str) -> [u8; 32] {
    const fn nibble(c: u8) -> u8 {
        match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            _ => panic!("not hex"),
        }
    }
    let s = s.as_bytes();
    let mut out = [0u8; 32];
    let mut i = 0;
    while i < 32 {
        out[i] = nibble(s[2 * i]) << 4 | nibble(s[2 * i + 1]);
        i += 1;
    }
    out
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
    Extend {
        bytes: Vec<u8>,
    },
    /// Grow past Noise's message limit.
    Oversize {
        extra: usize,
    },
    Insert {
        at: Index,
        bytes: Vec<u8>,
    },
    Drop {
        at: Index,
        len: usize,
    },
    /// Overwrite a run of bytes (a key, a tag) with random ones.
    Replace {
        at: Index,
        bytes: Vec<u8>,
    },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => (any::<Index>(), 0u8..8).prop_map(|(at, bit)| Mutation::FlipBit { at, bit }),
        1 => (any::<Index>(), any::<u8>()).prop_map(|(at, value)| Mutation::SetByte { at, value }),
        2 => any::<Index>().prop_map(|at| Mutation::Truncate { at }),
        1 => prop::collection::vec(any::<u8>(), 1..64).prop_map(|bytes| Mutation::Extend { bytes }),
        1 => (1usize..5000).prop_map(|extra| Mutation::Oversize { extra }),
        1 => (any::<Index>(), prop::collection::vec(any::<u8>(), 1..64))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        1 => (any::<Index>(), 1usize..100).prop_map(|(at, len)| Mutation::Drop { at, len }),
        1 => (any::<Index>(), prop::collection::vec(any::<u8>(), 1..48))
            .prop_map(|(at, bytes)| Mutation::Replace { at, bytes }),
    ]
}

fn apply(msg: &mut Vec<u8>, m: &Mutation) {
    let n = msg.len();
    match m {
        Mutation::Extend { bytes } => msg.extend(bytes),
        Mutation::Oversize { extra } => msg.resize(MAX_MESSAGE_LEN + extra, 0xa5),
        Mutation::Insert { at, bytes } => {
            let at = at.index(n + 1);
            msg.splice(at..at, bytes.iter().copied());
        }
        _ if n == 0 => {}
        Mutation::FlipBit { at, bit } => msg[at.index(n)] ^= 1 << bit,
        Mutation::SetByte { at, value } => msg[at.index(n)] = *value,
        Mutation::Truncate { at } => msg.truncate(at.index(n)),
        Mutation::Drop { at, len } => {
            let at = at.index(n);
            msg.drain(at..(at + len).min(n));
        }
        Mutation::Replace { at, bytes } => {
            let at = at.index(n);
            let end = (at + bytes.len()).min(n);
            msg[at..end].copy_from_slice(&bytes[..end - at]);
        }
    }
}

/// A later call on the side under test.
#[derive(Debug, Clone)]
enum Op {
    Read(Vec<u8>),
    Write(usize),
    IntoCodec { level: i32, max_payload: usize },
    Inspect,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..200).prop_map(Op::Read),
        prop_oneof![
            0usize..100,
            Just(MAX_HANDSHAKE_PAYLOAD),
            Just(MAX_HANDSHAKE_PAYLOAD + 1),
        ]
        .prop_map(Op::Write),
        (
            prop_oneof![Just(3), -10i32..30, Just(i32::MIN)],
            prop_oneof![Just(MAX_PAYLOAD_LIMIT), 0usize..100, Just(usize::MAX)]
        )
            .prop_map(|(level, max_payload)| Op::IntoCodec { level, max_payload }),
        Just(Op::Inspect),
    ]
}

#[derive(Debug, Clone)]
struct Case {
    /// Attack the responder (message 1) or the initiator (message 2).
    responder: bool,
    payload: Vec<u8>,
    /// The initiator aims at another key than the responder's.
    wrong_key: bool,
    /// The two sides disagree on the prologue (the tunnel's preamble).
    other_prologue: bool,
    mutations: Vec<Mutation>,
    /// Random bytes instead of the honest message.
    noise: Option<Vec<u8>>,
    ops: Vec<Op>,
}

fn case() -> impl Strategy<Value = Case> {
    (
        any::<bool>(),
        prop_oneof![
            8 => prop::collection::vec(any::<u8>(), 0..300),
            1 => Just(vec![b'{'; MAX_HANDSHAKE_PAYLOAD]),
        ],
        prop::bool::weighted(0.05),
        prop::bool::weighted(0.05),
        prop_oneof![
            1 => Just(Vec::new()),
            4 => prop::collection::vec(mutation(), 1..4),
        ],
        prop::option::weighted(
            0.15,
            prop_oneof![
                8 => prop::collection::vec(any::<u8>(), 0..200),
                1 => prop::collection::vec(any::<u8>(), 65_000..70_000),
            ],
        ),
        prop::collection::vec(op(), 0..4),
    )
        .prop_map(
            |(responder, payload, wrong_key, other_prologue, mutations, noise, ops)| Case {
                responder,
                payload,
                wrong_key,
                other_prologue,
                mutations,
                noise,
                ops,
            },
        )
}

fn is_handshake_error<T>(r: &Result<T, Error>) -> bool {
    matches!(r, Err(Error::Handshake(_)))
}

fn run_case(c: Case) -> Result<(), TestCaseError> {
    let target = if c.wrong_key {
        EDGE_PUBLIC
    } else {
        GATE_PUBLIC
    };
    let mut initiator = NoiseHandshake::initiator(&EDGE_PRIVATE, &target, PROLOGUE).unwrap();
    let responder_prologue: &[u8] = if c.other_prologue {
        b"QMSH\x02\0\0\0"
    } else {
        PROLOGUE
    };
    let mut responder = NoiseHandshake::responder(&GATE_PRIVATE, responder_prologue).unwrap();
    let honest_peers = !c.wrong_key && !c.other_prologue;
    let back = b"welcome".to_vec();

    let m1 = initiator.write_message(&c.payload).unwrap();
    prop_assert!(m1.len() <= MAX_MESSAGE_LEN);
    let (side, honest, sent) = if c.responder {
        (&mut responder, m1, &c.payload)
    } else {
        // The responder must get an honest message 1 to answer at all.
        let got = responder.read_message(&m1);
        if !honest_peers {
            prop_assert!(is_handshake_error(&got), "{:?}", got);
            return Ok(());
        }
        prop_assert_eq!(&got.unwrap(), &c.payload);
        let m2 = responder.write_message(&back).unwrap();
        (&mut initiator, m2, &back)
    };
    let mut message = c.noise.clone().unwrap_or_else(|| honest.clone());
    for m in &c.mutations {
        apply(&mut message, m);
    }
    let known_before = side.remote_static();

    let result = side.read_message(&message);
    let authentic = honest_peers && message == honest;
    if authentic {
        let payload = result.map_err(|e| TestCaseError::fail(format!("honest message: {e}")))?;
        prop_assert_eq!(&payload, sent);
        let peer = if c.responder {
            EDGE_PUBLIC
        } else {
            GATE_PUBLIC
        };
        prop_assert_eq!(side.remote_static(), Some(peer));
        if !c.responder {
            prop_assert!(side.is_finished());
        }
    } else {
        prop_assert!(
            is_handshake_error(&result),
            "forged message gave {:?}",
            result
        );
        prop_assert!(!side.is_finished());
        prop_assert_eq!(side.remote_static(), known_before);
    }

    // Whatever the caller does next, no panic; a failed side stays failed.
    for op in &c.ops {
        match op {
            Op::Read(bytes) => {
                let r = side.read_message(bytes);
                prop_assert!(r.is_err(), "a stray read succeeded");
                prop_assert!(is_handshake_error(&r), "{:?}", r);
            }
            Op::Write(len) => {
                let r = side.write_message(&vec![0u8; *len]);
                if !authentic {
                    prop_assert!(r.is_err());
                }
                if let Ok(m) = &r {
                    prop_assert!(m.len() <= MAX_MESSAGE_LEN);
                }
                if *len > MAX_HANDSHAKE_PAYLOAD {
                    prop_assert!(matches!(r, Err(Error::InvalidArgument(_))), "{:?}", r);
                }
            }
            Op::IntoCodec { level, max_payload } => {
                let send = EncoderConfig {
                    level: *level,
                    max_payload: *max_payload,
                    ..EncoderConfig::default()
                };
                let recv = DecoderConfig {
                    max_payload: *max_payload,
                    ..DecoderConfig::default()
                };
                let r = side.into_codec(send, recv);
                if !authentic {
                    prop_assert!(is_handshake_error(&r), "{:?}", r);
                }
            }
            Op::Inspect => {
                let _ = (side.handshake_hash(), side.is_initiator());
            }
        }
    }
    if !authentic {
        prop_assert!(!side.is_finished());
        prop_assert!(is_handshake_error(
            &side.into_codec(EncoderConfig::default(), DecoderConfig::default())
        ));
        return Ok(());
    }

    // An authentic first message at the responder: finish honestly and
    // check the codecs talk (unless the ops above spent the handshake).
    if c.responder && !c.ops.is_empty() {
        return Ok(());
    }
    if c.responder {
        let m2 = responder.write_message(&back).unwrap();
        prop_assert_eq!(initiator.read_message(&m2).unwrap(), back);
    }
    if !c.ops.is_empty() {
        return Ok(());
    }
    prop_assert_eq!(initiator.handshake_hash(), responder.handshake_hash());
    let (mut enc, _) = initiator
        .into_codec(EncoderConfig::default(), DecoderConfig::default())
        .unwrap();
    let (_, mut dec) = responder
        .into_codec(EncoderConfig::default(), DecoderConfig::default())
        .unwrap();
    dec.feed(&enc.encode(0x02, 1, &c.payload).unwrap()).unwrap();
    let frames = dec.next_frames(0).unwrap();
    prop_assert_eq!(frames.len(), 1);
    prop_assert!(frames[0].payload[..] == c.payload[..]);
    Ok(())
}

#[test]
fn rfc7748_keys_are_a_pair() {
    // The constants above are what the cases rely on: Alice's key reaches Bob.
    let mut i = NoiseHandshake::initiator(&EDGE_PRIVATE, &GATE_PUBLIC, PROLOGUE).unwrap();
    let mut r = NoiseHandshake::responder(&GATE_PRIVATE, PROLOGUE).unwrap();
    r.read_message(&i.write_message(b"hi").unwrap()).unwrap();
    assert_eq!(r.remote_static(), Some(EDGE_PUBLIC));
}

#[test]
fn fuzz_handshake_quick() {
    fuzzkit::quick("noise_handshake", 256, case(), run_case);
}

#[test]
#[ignore = "long: run via scripts/fuzz.sh (QMESH_FUZZ_CASES / QMESH_FUZZ_SECONDS)"]
fn fuzz_handshake_long() {
    fuzzkit::long("noise_handshake", case(), run_case);
}
