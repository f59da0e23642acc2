//! Noise IK handshake: round trip, authentication failures, misuse, and the
//! codec pair it produces.

mod common;

use common::{payload, Kind};
use qmesh_wire::{
    DecoderConfig, EncoderConfig, Error, FrameDecoder, FrameEncoder, NoiseHandshake,
    MAX_HANDSHAKE_PAYLOAD,
};
use snow::Builder;

struct Keys {
    private: Vec<u8>,
    public: Vec<u8>,
}

fn keypair() -> Keys {
    let kp = Builder::new(qmesh_wire::NOISE_PATTERN.parse().unwrap())
        .generate_keypair()
        .unwrap();
    Keys {
        private: kp.private,
        public: kp.public,
    }
}

const PROLOGUE: &[u8] = b"qmesh/1 test";

fn pair(client: &Keys, server: &Keys) -> (NoiseHandshake, NoiseHandshake) {
    (
        NoiseHandshake::initiator(&client.private, &server.public, PROLOGUE).unwrap(),
        NoiseHandshake::responder(&server.private, PROLOGUE).unwrap(),
    )
}

fn handshake(client: &Keys, server: &Keys) -> (NoiseHandshake, NoiseHandshake) {
    let (mut i, mut r) = pair(client, server);
    let m1 = i.write_message(b"hello from initiator").unwrap();
    assert_eq!(r.read_message(&m1).unwrap(), b"hello from initiator");
    let m2 = r.write_message(b"hello from responder").unwrap();
    assert_eq!(i.read_message(&m2).unwrap(), b"hello from responder");
    (i, r)
}

#[test]
fn round_trip_and_remote_static() {
    let (client, server) = (keypair(), keypair());
    let (mut i, mut r) = pair(&client, &server);
    assert!(i.is_initiator() && !r.is_initiator());
    assert_eq!(i.remote_static().unwrap().to_vec(), server.public);
    assert_eq!(r.remote_static(), None);
    assert!(!i.is_finished());

    let m1 = i.write_message(b"p1").unwrap();
    // The initiator's payload and static key are encrypted in message 1.
    assert!(!m1.windows(2).any(|w| w == b"p1"));
    assert!(!m1.windows(32).any(|w| w == &client.public[..]));
    assert_eq!(r.read_message(&m1).unwrap(), b"p1");
    assert_eq!(r.remote_static().unwrap().to_vec(), client.public);
    let m2 = r.write_message(b"p2").unwrap();
    assert_eq!(i.read_message(&m2).unwrap(), b"p2");

    assert!(i.is_finished() && r.is_finished());
    assert_eq!(i.handshake_hash(), r.handshake_hash());
}

#[test]
fn codecs_interoperate() {
    let (client, server) = (keypair(), keypair());
    let (mut i, mut r) = handshake(&client, &server);
    let hash = i.handshake_hash();
    let (mut i_enc, mut i_dec) = i
        .into_codec(EncoderConfig::default(), DecoderConfig::default())
        .unwrap();
    let (mut r_enc, mut r_dec) = r
        .into_codec(EncoderConfig::default(), DecoderConfig::default())
        .unwrap();

    let big = payload(Kind::Text, 200_000, 1);
    r_dec.feed(&i_enc.encode(0, 1, &big).unwrap()).unwrap();
    let got = r_dec.next_frames(0).unwrap();
    assert_eq!(&got[0].payload[..], &big[..]);
    i_dec.feed(&r_enc.encode(0x10, 0, b"ack").unwrap()).unwrap();
    assert_eq!(&i_dec.next_frames(0).unwrap()[0].payload[..], b"ack");

    // Directions use different keys: a frame reflected back fails.
    let reflected = i_enc.encode(0, 0, b"mirror").unwrap();
    i_dec.feed(&reflected).unwrap();
    assert_eq!(i_dec.next_frames(0), Err(Error::Tampered));

    // Consumed: a second into_codec fails, the hash stays readable.
    assert!(i.is_finished());
    assert_eq!(i.handshake_hash(), hash);
    assert_eq!(i.remote_static().unwrap().to_vec(), server.public);
    assert!(matches!(
        i.into_codec(EncoderConfig::default(), DecoderConfig::default()),
        Err(Error::Handshake(_))
    ));
    assert!(matches!(i.write_message(b""), Err(Error::Handshake(_))));
}

#[test]
fn codec_resumption_counters() {
    let (client, server) = (keypair(), keypair());
    let (mut i, mut r) = handshake(&client, &server);
    let send = EncoderConfig {
        reliable_seq: 41,
        ..Default::default()
    };
    let (mut enc, _) = i.into_codec(send, DecoderConfig::default()).unwrap();
    let recv = DecoderConfig {
        reliable_seq: 41,
        ..Default::default()
    };
    let (_, mut dec) = r.into_codec(EncoderConfig::default(), recv).unwrap();
    dec.feed(&enc.encode(0, 0, b"resumed").unwrap()).unwrap();
    assert_eq!(dec.next_frames(0).unwrap()[0].seq, 41);
}

#[test]
fn wrong_responder_key_fails() {
    let (client, server, impostor) = (keypair(), keypair(), keypair());
    // The initiator thinks it talks to `impostor`, but `server` answers.
    let mut i = NoiseHandshake::initiator(&client.private, &impostor.public, PROLOGUE).unwrap();
    let mut r = NoiseHandshake::responder(&server.private, PROLOGUE).unwrap();
    let m1 = i.write_message(b"secret").unwrap();
    assert!(matches!(r.read_message(&m1), Err(Error::Handshake(_))));
    // The failed side is poisoned.
    assert!(matches!(r.write_message(b""), Err(Error::Handshake(_))));
    assert!(!r.is_finished());
}

#[test]
fn prologue_mismatch_fails() {
    let (client, server) = (keypair(), keypair());
    let mut i = NoiseHandshake::initiator(&client.private, &server.public, b"a").unwrap();
    let mut r = NoiseHandshake::responder(&server.private, b"b").unwrap();
    let m1 = i.write_message(b"").unwrap();
    assert!(matches!(r.read_message(&m1), Err(Error::Handshake(_))));
}

#[test]
fn tampered_messages_fail() {
    let (client, server) = (keypair(), keypair());
    let (mut i, mut r) = pair(&client, &server);
    let mut m1 = i.write_message(b"x").unwrap();
    let last = m1.len() - 1;
    m1[last] ^= 1;
    assert!(matches!(r.read_message(&m1), Err(Error::Handshake(_))));

    let (mut i, mut r) = pair(&client, &server);
    let m1 = i.write_message(b"x").unwrap();
    r.read_message(&m1).unwrap();
    let mut m2 = r.write_message(b"y").unwrap();
    m2[0] ^= 1;
    assert!(matches!(i.read_message(&m2), Err(Error::Handshake(_))));
    assert!(matches!(
        i.read_message(&[0u8; 10]),
        Err(Error::Handshake(_))
    ));
}

#[test]
fn misuse() {
    let (client, server) = (keypair(), keypair());
    let (mut i, mut r) = pair(&client, &server);
    // Not finished yet.
    assert!(matches!(
        i.into_codec(EncoderConfig::default(), DecoderConfig::default()),
        Err(Error::Handshake(_))
    ));
    // Oversized payload: an argument error, and the handshake survives it.
    let big = vec![0u8; MAX_HANDSHAKE_PAYLOAD + 1];
    assert!(matches!(
        i.write_message(&big),
        Err(Error::InvalidArgument(_))
    ));
    let m1 = i.write_message(&vec![1u8; MAX_HANDSHAKE_PAYLOAD]).unwrap();
    assert_eq!(r.read_message(&m1).unwrap().len(), MAX_HANDSHAKE_PAYLOAD);
    // Responder writing out of turn / initiator writing twice.
    let mut r2 = NoiseHandshake::responder(&server.private, PROLOGUE).unwrap();
    assert!(matches!(r2.write_message(b""), Err(Error::Handshake(_))));
    assert!(matches!(i.write_message(b""), Err(Error::Handshake(_))));
    // Oversized message.
    let mut r3 = NoiseHandshake::responder(&server.private, PROLOGUE).unwrap();
    assert!(matches!(
        r3.read_message(&vec![0u8; 70_000]),
        Err(Error::Handshake(_))
    ));
}

#[test]
fn bad_key_lengths() {
    let k = keypair();
    assert!(matches!(
        NoiseHandshake::initiator(&k.private[..31], &k.public, b""),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        NoiseHandshake::initiator(&k.private, &[0u8; 33], b""),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        NoiseHandshake::responder(b"", b""),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn bad_codec_config_leaves_handshake_usable() {
    let (client, server) = (keypair(), keypair());
    let (mut i, _r) = handshake(&client, &server);
    let bad = EncoderConfig {
        level: 99,
        ..Default::default()
    };
    assert!(matches!(
        i.into_codec(bad, DecoderConfig::default()),
        Err(Error::InvalidArgument(_))
    ));
    let _: (FrameEncoder, FrameDecoder) = i
        .into_codec(EncoderConfig::default(), DecoderConfig::default())
        .unwrap();
}
