//! qmesh's wire layer, sans-IO: frames are sealed and opened here, and the
//! Noise handshake that keys them runs here, but nothing in this crate reads a
//! socket, looks at a clock or spawns a thread. Callers (the tunnel engine in
//! `qmesh-relay`, the Python binding in `qmesh-py`, tests, the fuzz target)
//! push bytes in and take bytes out.
//!
//! * [`frame`]: the 20-byte header, the wire constants and the nonce layout.
//! * [`codec`]: [`FrameEncoder`] and [`FrameDecoder`], one per direction.
//! * [`handshake`]: `Noise_IK_25519_AESGCM_SHA256`, ending in a codec pair
//!   whose keys never leave this crate.
//! * [`protocol`]: frame types, reset codes and the RESET/GOAWAY reason
//!   codec: the one definition the Rust engine and the Python session share.
//! * [`error`]: the one error type.
//!
//! This crate deliberately has no pyo3 dependency, so it gets plain
//! `cargo test` and `cargo fuzz`.

mod aead;
pub mod codec;
mod entropy;
pub mod error;
pub mod frame;
pub mod handshake;
pub mod protocol;

pub use codec::{
    decompress_within, DecoderConfig, EncoderConfig, Frame, FrameDecoder, FrameEncoder, FrameRef,
    PreparedBatch,
};
pub use error::{Error, Result};
pub use frame::{
    FrameClass, Header, CONTROL_TYPE_MIN, FLAG_COMPRESSED, FRAME_TYPE_LIMIT, HEADER_LEN, KEY_LEN,
    MAX_PAYLOAD_LIMIT, PROTOCOL_VERSION, TAG_LEN,
};
pub use handshake::{NoiseHandshake, MAX_HANDSHAKE_PAYLOAD, NOISE_PATTERN};
pub use protocol::{decode_reason, encode_reason, frame_type, reset_code, MAX_REASON};
