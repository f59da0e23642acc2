//! The `Noise_IK_25519_AESGCM_SHA256` handshake that keys a connection.
//!
//! IK: the initiator knows the responder's static key in advance; the
//! responder learns and authenticates the initiator's static key from the
//! first message. Two messages, one round trip, forward secrecy from the
//! ephemeral keys. Sans-IO like the codec: messages go in and out as bytes.
//!
//! The handshake ends in [`NoiseHandshake::into_codec`], which turns the
//! Noise split into a [`FrameEncoder`]/[`FrameDecoder`] pair. The transport
//! keys are used only to build those ciphers and are wiped right after, so
//! they never leave this crate. snow's own transport mode is not used: our
//! frames carry their sequence number in the header (for resumption and
//! replay detection) rather than relying on an implicit counter.
//!
//! Not for: key storage, key generation, or deciding which peers to trust
//! (the caller checks [`NoiseHandshake::remote_static`] against its policy).

use snow::{Builder, HandshakeState};
use zeroize::Zeroize;

use crate::codec::{DecoderConfig, EncoderConfig, FrameDecoder, FrameEncoder};
use crate::error::{Error, Result};

/// The Noise protocol name.
pub const NOISE_PATTERN: &str = "Noise_IK_25519_AESGCM_SHA256";
/// Largest payload a handshake message may carry (leaves room under Noise's
/// 65,535-byte message limit for the keys and tags).
pub const MAX_HANDSHAKE_PAYLOAD: usize = 65_000;
/// Noise's message size limit.
pub const MAX_MESSAGE_LEN: usize = 65_535;
/// Bytes in an X25519 key, private or public.
pub const DH_KEY_LEN: usize = 32;
/// Bytes in the SHA-256 handshake hash.
pub const HASH_LEN: usize = 32;

enum State {
    /// In progress or finished, not yet turned into a codec.
    Active(Box<HandshakeState>),
    /// A message failed; snow's state may be half-updated, so it is dropped.
    Failed,
    /// [`NoiseHandshake::into_codec`] succeeded.
    Consumed,
}

/// One side of a Noise IK handshake.
pub struct NoiseHandshake {
    state: State,
    initiator: bool,
    /// Kept outside snow's state so they stay readable after `into_codec`.
    remote_static: Option<[u8; DH_KEY_LEN]>,
    hash: [u8; HASH_LEN],
}

impl std::fmt::Debug for NoiseHandshake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match self.state {
            State::Active(_) => "active",
            State::Failed => "failed",
            State::Consumed => "consumed",
        };
        f.debug_struct("NoiseHandshake")
            .field("initiator", &self.initiator)
            .field("state", &state)
            .finish_non_exhaustive()
    }
}

fn check_key(what: &str, key: &[u8]) -> Result<()> {
    if key.len() != DH_KEY_LEN {
        return Err(Error::InvalidArgument(format!(
            "{what} must be {DH_KEY_LEN} bytes, got {}",
            key.len()
        )));
    }
    Ok(())
}

impl NoiseHandshake {
    /// The initiator: `local_private` is our X25519 static private key,
    /// `remote_public` the responder's static public key, `prologue` bytes
    /// both sides must agree on (bound into the handshake hash).
    pub fn initiator(local_private: &[u8], remote_public: &[u8], prologue: &[u8]) -> Result<Self> {
        check_key("local_private", local_private)?;
        check_key("remote_public", remote_public)?;
        let hs = Builder::new(NOISE_PATTERN.parse()?)
            .local_private_key(local_private)?
            .remote_public_key(remote_public)?
            .prologue(prologue)?
            .build_initiator()?;
        Ok(Self::from_state(hs, true))
    }

    /// The responder: it learns the initiator's static key from message 1.
    pub fn responder(local_private: &[u8], prologue: &[u8]) -> Result<Self> {
        check_key("local_private", local_private)?;
        let hs = Builder::new(NOISE_PATTERN.parse()?)
            .local_private_key(local_private)?
            .prologue(prologue)?
            .build_responder()?;
        Ok(Self::from_state(hs, false))
    }

    fn from_state(hs: HandshakeState, initiator: bool) -> Self {
        let mut this = NoiseHandshake {
            state: State::Active(Box::new(hs)),
            initiator,
            remote_static: None,
            hash: [0; HASH_LEN],
        };
        this.refresh();
        this
    }

    /// Copy what stays readable after the state is consumed.
    fn refresh(&mut self) {
        if let State::Active(hs) = &self.state {
            self.remote_static = hs.get_remote_static().and_then(|k| k.try_into().ok());
            if let Ok(h) = hs.get_handshake_hash().try_into() {
                self.hash = h;
            }
        }
    }

    fn active(&mut self) -> Result<&mut HandshakeState> {
        match &mut self.state {
            State::Active(hs) => Ok(hs),
            State::Failed => Err(Error::Handshake("handshake already failed".into())),
            State::Consumed => Err(Error::Handshake("handshake already consumed".into())),
        }
    }

    /// Run one snow operation; any failure poisons the handshake.
    fn step(
        &mut self,
        op: impl FnOnce(&mut HandshakeState) -> std::result::Result<usize, snow::Error>,
    ) -> Result<usize> {
        let hs = self.active()?;
        match op(hs) {
            Ok(n) => {
                self.refresh();
                Ok(n)
            }
            Err(e) => {
                self.state = State::Failed;
                Err(e.into())
            }
        }
    }

    /// Whether we are the initiator.
    pub fn is_initiator(&self) -> bool {
        self.initiator
    }

    /// Both messages have been exchanged (stays true after `into_codec`).
    pub fn is_finished(&self) -> bool {
        match &self.state {
            State::Active(hs) => hs.is_handshake_finished(),
            State::Failed => false,
            State::Consumed => true,
        }
    }

    /// The next handshake message, carrying `payload` (encrypted where the
    /// pattern allows).
    pub fn write_message(&mut self, payload: &[u8]) -> Result<Vec<u8>> {
        if payload.len() > MAX_HANDSHAKE_PAYLOAD {
            return Err(Error::InvalidArgument(format!(
                "handshake payload of {} bytes exceeds {MAX_HANDSHAKE_PAYLOAD}",
                payload.len()
            )));
        }
        let mut out = vec![0u8; MAX_MESSAGE_LEN];
        let n = self.step(|hs| hs.write_message(payload, &mut out))?;
        out.truncate(n);
        Ok(out)
    }

    /// Process the peer's handshake message; return its payload.
    pub fn read_message(&mut self, message: &[u8]) -> Result<Vec<u8>> {
        self.active()?;
        if message.len() > MAX_MESSAGE_LEN {
            self.state = State::Failed;
            return Err(Error::Handshake(format!(
                "message of {} bytes exceeds the Noise limit ({MAX_MESSAGE_LEN})",
                message.len()
            )));
        }
        let mut payload = vec![0u8; MAX_MESSAGE_LEN];
        let n = self.step(|hs| hs.read_message(message, &mut payload))?;
        payload.truncate(n);
        Ok(payload)
    }

    /// The peer's static public key, once known (the initiator knows it from
    /// the start; the responder after message 1).
    pub fn remote_static(&self) -> Option<[u8; DH_KEY_LEN]> {
        self.remote_static
    }

    /// The handshake transcript hash: public, unique per connection. Final
    /// once the handshake is finished.
    pub fn handshake_hash(&self) -> [u8; HASH_LEN] {
        self.hash
    }

    /// The encoder and decoder for this side, keyed from the Noise split:
    /// the first split key seals initiator→responder, the second
    /// responder→initiator. Consumes the handshake on success; a bad config
    /// leaves it untouched so the call can be retried.
    pub fn into_codec(
        &mut self,
        send: EncoderConfig,
        recv: DecoderConfig,
    ) -> Result<(FrameEncoder, FrameDecoder)> {
        let initiator = self.initiator;
        let hs = self.active()?;
        if !hs.is_handshake_finished() {
            return Err(Error::Handshake("handshake not finished".into()));
        }
        let (mut i2r, mut r2i) = hs.dangerously_get_raw_split();
        let (send_key, recv_key) = if initiator {
            (&i2r, &r2i)
        } else {
            (&r2i, &i2r)
        };
        let codec = FrameEncoder::new(send_key, send)
            .and_then(|enc| Ok((enc, FrameDecoder::new(recv_key, recv)?)));
        i2r.zeroize();
        r2i.zeroize();
        let codec = codec?;
        self.state = State::Consumed;
        Ok(codec)
    }
}
