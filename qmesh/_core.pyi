"""The Rust hot path of qmesh (sans-IO): frame codec and Noise handshake.

Nothing here touches a socket or a clock. Trio code in :mod:`qmesh.tunnel`
owns all I/O and feeds bytes in and out.

Wire format (see docs/protocol.md): every frame is a 20-byte header followed
by an AES-256-GCM ciphertext of ``length`` bytes (the tag included)::

    0  u8   version      (1)
    1  u8   frame type   (0x00-0x0F reliable, 0x10-0x1F control)
    2  u8   flags        (bit 0: payload is zstd-compressed; other bits 0)
    3  u8   reserved     (0)
    4  u32  stream id    (big-endian)
    8  u64  sequence     (big-endian; per direction and per class)
    16 u32  length       (big-endian; ciphertext bytes incl. the 16-byte tag)

The header is the AEAD associated data. The 12-byte nonce is
``class (1 byte: 0 reliable, 1 control) || 3 zero bytes || sequence (u64 BE)``.
Reliable sequences continue across reconnects of one session; control
sequences restart at 0 on every connection. Keys are fresh per connection.
"""

from collections.abc import Sequence
from typing import Final, Self, TypeAlias, final

__all__ = [
    "CONTROL_TYPE_MIN",
    "FLAG_COMPRESSED",
    "HEADER_LEN",
    "MAX_PAYLOAD_LIMIT",
    "NOISE_PATTERN",
    "PROTOCOL_VERSION",
    "TAG_LEN",
    "BufferLike",
    "Frame",
    "FrameDecoder",
    "FrameEncoder",
    "FrameError",
    "FrameTooLarge",
    "HandshakeError",
    "Malformed",
    "NoiseHandshake",
    "Reordered",
    "Replayed",
    "Tampered",
    "Truncated",
]

BufferLike: TypeAlias = bytes | bytearray | memoryview

PROTOCOL_VERSION: Final[int]
"""Wire protocol version carried in every header (1)."""
HEADER_LEN: Final[int]
"""Bytes in a frame header (20)."""
TAG_LEN: Final[int]
"""Bytes of the AES-GCM tag at the end of every ciphertext (16)."""
MAX_PAYLOAD_LIMIT: Final[int]
"""Absolute cap on a frame's plaintext payload (16 MiB); ``max_payload`` may not exceed it."""
FLAG_COMPRESSED: Final[int]
"""Header flag bit: the payload was zstd-compressed before sealing."""
CONTROL_TYPE_MIN: Final[int]
"""Frame types below this (0x10) are reliable; 0x10..0x1F are control; above is malformed."""
NOISE_PATTERN: Final[str]
"""The Noise protocol name used by :class:`NoiseHandshake`."""

Frame: TypeAlias = tuple[int, int, int, int, bytes]
"""A decoded frame: ``(frame_type, stream_id, sequence, flags, payload)``."""

class FrameError(Exception):
    """The peer's byte stream is not a valid frame stream; tear the connection down."""

class Tampered(FrameError):
    """The AEAD tag did not verify: header or payload altered, or the wrong key."""

class Replayed(FrameError):
    """An authentic frame whose sequence number was already received."""

class Reordered(FrameError):
    """An authentic frame whose sequence number is ahead of the next expected one."""

class Truncated(FrameError):
    """The byte stream ended inside a frame (raised by ``FrameDecoder.eof``)."""

class FrameTooLarge(FrameError):
    """A header announced more bytes than the decoder's limit; nothing was allocated."""

class Malformed(FrameError):
    """A bad version, frame type, flag or reserved bits, or an undecodable payload."""

class HandshakeError(Exception):
    """The Noise handshake failed: bad message, failed decryption, or misuse."""

@final
class FrameEncoder:
    """Seals frames for one direction of one connection.

    Sequence numbers are assigned here, from two counters: reliable frames
    (type < 0x10) continue from ``reliable_seq``; control frames start at 0.
    """

    def __new__(
        cls,
        key: bytes,
        *,
        reliable_seq: int = 0,
        level: int = 3,
        max_payload: int = ...,
        min_compress: int = 64,
    ) -> Self:
        """``key``: 32 bytes. ``level``: zstd level (1-19). Payloads shorter
        than ``min_compress`` bytes are never compressed; others are sent
        compressed only when that makes them smaller."""

    @property
    def next_reliable_seq(self) -> int: ...
    @property
    def next_control_seq(self) -> int: ...
    def encode(self, frame_type: int, stream_id: int, payload: BufferLike) -> bytes:
        """One frame, header and ciphertext. Raises ValueError for a bad type
        or a payload over ``max_payload``."""

    def encode_batch(self, frames: Sequence[tuple[int, int, BufferLike]]) -> bytes:
        """Many frames ``(frame_type, stream_id, payload)`` concatenated in one
        buffer, in order. Validation happens before anything is encoded, so a
        ValueError leaves the counters untouched."""

@final
class FrameDecoder:
    """Opens frames for one direction of one connection (h11 style: ``feed``
    buffers, ``next_frames`` returns what is complete).

    After the first error the decoder is poisoned: every later call raises
    the same error kind again.
    """

    def __new__(
        cls,
        key: bytes,
        *,
        reliable_seq: int = 0,
        max_payload: int = ...,
    ) -> Self: ...
    @property
    def next_reliable_seq(self) -> int: ...
    @property
    def next_control_seq(self) -> int: ...
    @property
    def buffered(self) -> int:
        """Bytes held that do not yet make a complete frame."""

    def feed(self, data: BufferLike) -> None: ...
    def next_frames(self, limit: int = 0) -> list[Frame]:
        """All complete frames (at most ``limit`` when > 0). If a bad frame
        follows good ones, the good ones are returned and the error is raised
        by the next call."""

    def eof(self) -> None:
        """The transport ended: raises :class:`Truncated` if bytes of a partial
        frame are buffered."""

@final
class NoiseHandshake:
    """``Noise_IK_25519_AESGCM_SHA256``: the initiator knows the responder's
    static key in advance; the responder learns and authenticates the
    initiator's static key from the first message. Two messages, one round
    trip, forward secrecy from ephemeral keys."""

    @staticmethod
    def initiator(
        local_private: bytes, remote_public: bytes, prologue: bytes
    ) -> NoiseHandshake: ...
    @staticmethod
    def responder(local_private: bytes, prologue: bytes) -> NoiseHandshake: ...
    @property
    def is_finished(self) -> bool: ...
    def write_message(self, payload: bytes) -> bytes:
        """The next handshake message carrying ``payload`` (encrypted where the
        pattern allows; at most 65,000 bytes)."""

    def read_message(self, message: bytes) -> bytes:
        """Process the peer's handshake message; return its payload."""

    def remote_static(self) -> bytes | None:
        """The peer's static public key (32 bytes) once known."""

    def handshake_hash(self) -> bytes:
        """The handshake transcript hash: public, unique per connection."""

    def into_codec(
        self,
        *,
        send_reliable_seq: int = 0,
        recv_reliable_seq: int = 0,
        level: int = 3,
        max_payload: int = ...,
        min_compress: int = 64,
    ) -> tuple[FrameEncoder, FrameDecoder]:
        """After the handshake: the encoder and decoder for this side, keyed
        from the Noise split. The keys never leave Rust. Consumes the
        handshake (a second call raises HandshakeError)."""
