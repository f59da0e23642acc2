//! AES-256-GCM for the frame codec, from `ring`.
//!
//! Why not RustCrypto's `aes-gcm` (which snow uses for the handshake)? On
//! this codec's hot path it ran at about 0.8 GB/s where ring's assembly
//! (AES-NI/VAES with carry-less multiply, chosen at run time) reaches the
//! speed of OpenSSL: several GB/s. The handshake seals a few hundred bytes
//! per connection and keeps snow's own cipher.
//!
//! Nonces are explicit (`LessSafeKey`): the codec derives them from the
//! frame's class and sequence number and guarantees they never repeat
//! under one key (see `codec`).

use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, AES_256_GCM, NONCE_LEN};

use crate::error::{Error, Result};
use crate::frame::{KEY_LEN, TAG_LEN};

/// One direction's AES-256-GCM key.
pub struct Cipher(LessSafeKey);

impl Cipher {
    /// A cipher keyed with `key` (32 bytes).
    pub fn new(key: &[u8]) -> Result<Self> {
        if key.len() != KEY_LEN {
            return Err(Error::InvalidArgument(format!(
                "key must be {KEY_LEN} bytes, got {}",
                key.len()
            )));
        }
        let key = UnboundKey::new(&AES_256_GCM, key).expect("length checked above");
        Ok(Cipher(LessSafeKey::new(key)))
    }

    /// Encrypts `in_out` in place; returns the tag.
    pub fn seal(&self, nonce: [u8; NONCE_LEN], aad: &[u8], in_out: &mut [u8]) -> [u8; TAG_LEN] {
        let tag = self
            .0
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), in_out)
            .expect("frame payloads are far below AES-GCM's 64 GiB limit");
        let mut out = [0u8; TAG_LEN];
        out.copy_from_slice(tag.as_ref());
        out
    }

    /// Decrypts `in_out` in place if `tag` authenticates it with `aad`.
    pub fn open(
        &self,
        nonce: [u8; NONCE_LEN],
        aad: &[u8],
        in_out: &mut [u8],
        tag: &[u8; TAG_LEN],
    ) -> Result<()> {
        self.0
            .open_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                Tag::from(*tag),
                in_out,
                0..,
            )
            .map(|_| ())
            .map_err(|_| Error::Tampered)
    }
}
