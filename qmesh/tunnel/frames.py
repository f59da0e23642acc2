"""Frame types of the tunnel protocol and the codecs of their small payloads.

The Rust core seals and opens frames without knowing what they mean; this
module is where the meaning lives. Types below 0x10 are *reliable* (kept until
acknowledged and resent after a reconnect); 0x10-0x1F are *control* frames
that belong to one connection only. See docs/protocol.md.
"""

from __future__ import annotations

import enum
import json
import struct
from typing import Any

from qmesh import peerjson
from qmesh.tunnel.errors import PeerProtocolError


class FrameType(enum.IntEnum):
    OPEN = 0x01  # payload: JSON object naming the service
    DATA = 0x02  # payload: stream bytes
    CLOSE = 0x03  # empty: the sender will send no more data on this stream
    RESET = 0x04  # u16 code + UTF-8 reason: abort the stream both ways
    WINDOW = 0x05  # u32: the receiver grants this many more bytes of credit
    ACK = 0x10  # u64: the next reliable sequence the sender expects
    PING = 0x11  # u64: echoed in a PONG
    PONG = 0x12
    GOAWAY = 0x13  # u16 code + UTF-8 reason: the session ends for good


RELIABLE_TYPES = frozenset(t for t in FrameType if t < 0x10)


class ResetCode(enum.IntEnum):
    CANCEL = 0  # the stream's owner closed it before both directions ended
    REFUSED = 1  # no such service, or policy forbids it
    CONNECT_FAILED = 2  # the service could not reach its target
    SESSION_LOST = 3  # the whole session ended
    PROTOCOL_ERROR = 4  # the stream broke a rule (flow control, bad OPEN)
    INTERNAL = 5  # the handler failed


# Every stream starts with this much send credit in each direction; a
# receiver configured with a larger window grants the rest with a WINDOW
# frame right away. A constant keeps OPEN free of negotiation.
INITIAL_WINDOW = 256 * 1024

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_MAX_REASON = 1024
_MAX_OPEN = 16 * 1024
# An OPEN names a service and a few flat fields; a little nesting is allowed
# for options, none of the depth a hostile peer would need to hurt a parser.
_MAX_OPEN_DEPTH = 4


def encode_u32(value: int) -> bytes:
    return _U32.pack(value)


def encode_u64(value: int) -> bytes:
    return _U64.pack(value)


def decode_u32(payload: bytes, what: str) -> int:
    if len(payload) != _U32.size:
        raise PeerProtocolError(f"{what} frame: expected 4 bytes, got {len(payload)}")
    value: int = _U32.unpack(payload)[0]
    return value


def decode_u64(payload: bytes, what: str) -> int:
    if len(payload) != _U64.size:
        raise PeerProtocolError(f"{what} frame: expected 8 bytes, got {len(payload)}")
    value: int = _U64.unpack(payload)[0]
    return value


def encode_reason(code: int, reason: str) -> bytes:
    return _U16.pack(code) + reason.encode("utf-8", "replace")[:_MAX_REASON]


def decode_reason(payload: bytes, what: str) -> tuple[int, str]:
    if len(payload) < _U16.size:
        raise PeerProtocolError(f"{what} frame: missing code")
    code: int = _U16.unpack_from(payload)[0]
    return code, payload[_U16.size : _U16.size + _MAX_REASON].decode("utf-8", "replace")


def encode_open(request: dict[str, Any]) -> bytes:
    data = json.dumps(request, separators=(",", ":")).encode()
    if len(data) > _MAX_OPEN:
        raise ValueError(f"OPEN request too large ({len(data)} bytes)")
    return data


def decode_open(payload: bytes) -> dict[str, Any]:
    """The OPEN request; a malformed one is the stream's problem, not the
    session's. Raises ValueError (a :class:`peerjson.PeerJsonError` for
    oversized, too deep or malformed JSON)."""
    request = peerjson.loads(
        payload, max_bytes=_MAX_OPEN, max_depth=_MAX_OPEN_DEPTH, what="OPEN request"
    )
    if not isinstance(request, dict) or not isinstance(request.get("service"), str):
        raise ValueError("OPEN request must be a JSON object with a string 'service'")
    return request
