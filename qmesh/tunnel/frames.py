"""Frame types of the tunnel protocol and the codecs of their small payloads.

The codec seals and opens frames without knowing what they mean; the
session gives them meaning, and so does the Rust engine, which handles the
per-message frames itself. So that both read the protocol alike, frame types,
reset codes and the RESET/GOAWAY reason codec are defined once, in Rust
(``qmesh-wire``'s ``protocol`` module), and taken from :mod:`qmesh._core`
here; ``tests/test_engine_contract.py`` holds the two sides to each other.
Types below 0x10 are *reliable* (kept until acknowledged and resent after a
reconnect); 0x10-0x1F are *control* frames that belong to one connection
only. See docs/protocol.md.
"""

from __future__ import annotations

import enum
import json
import struct
from typing import Any

from qmesh import _core, peerjson
from qmesh.tunnel.errors import PeerProtocolError

_TYPES = _core.FRAME_TYPES
_CODES = _core.RESET_CODES


class FrameType(enum.IntEnum):
    OPEN = _TYPES["OPEN"]  # payload: JSON object naming the service
    DATA = _TYPES["DATA"]  # payload: stream bytes
    CLOSE = _TYPES["CLOSE"]  # empty: the sender will send no more data on this stream
    RESET = _TYPES["RESET"]  # u16 code + UTF-8 reason: abort the stream both ways
    WINDOW = _TYPES["WINDOW"]  # u32: the receiver grants this many more bytes of credit
    ACK = _TYPES["ACK"]  # u64: the next reliable sequence the sender expects
    PING = _TYPES["PING"]  # u64: echoed in a PONG
    PONG = _TYPES["PONG"]
    GOAWAY = _TYPES["GOAWAY"]  # u16 code + UTF-8 reason: the session ends for good


RELIABLE_TYPES = frozenset(t for t in FrameType if t < _core.CONTROL_TYPE_MIN)


class ResetCode(enum.IntEnum):
    CANCEL = _CODES["CANCEL"]  # the stream's owner closed it before both directions ended
    REFUSED = _CODES["REFUSED"]  # no such service, or policy forbids it
    CONNECT_FAILED = _CODES["CONNECT_FAILED"]  # the service could not reach its target
    SESSION_LOST = _CODES["SESSION_LOST"]  # the whole session ended
    PROTOCOL_ERROR = _CODES["PROTOCOL_ERROR"]  # the stream broke a rule (flow control, bad OPEN)
    INTERNAL = _CODES["INTERNAL"]  # the handler failed


# Every stream starts with this much send credit in each direction; a
# receiver configured with a larger window grants the rest with a WINDOW
# frame right away. A constant keeps OPEN free of negotiation.
INITIAL_WINDOW = 256 * 1024

_U32 = struct.Struct(">I")
_MAX_OPEN = 16 * 1024
# An OPEN names a service and a few flat fields; a little nesting is allowed
# for options, none of the depth a hostile peer would need to hurt a parser.
_MAX_OPEN_DEPTH = 4


def encode_u32(value: int) -> bytes:
    return _U32.pack(value)


def decode_u32(payload: bytes, what: str) -> int:
    if len(payload) != _U32.size:
        raise PeerProtocolError(f"{what} frame: expected 4 bytes, got {len(payload)}")
    value: int = _U32.unpack(payload)[0]
    return value


encode_reason = _core.encode_reason
"""The RESET/GOAWAY payload: u16 code + the reason as UTF-8, cut at
``_core.MAX_REASON`` bytes."""


def decode_reason(payload: bytes, what: str) -> tuple[int, str]:
    """The code and reason of a ``what`` (RESET or GOAWAY) frame; the
    reason's first ``_core.MAX_REASON`` bytes, read as UTF-8 with U+FFFD for
    what is not. A payload too short for the code breaks the protocol."""
    try:
        return _core.decode_reason(payload)
    except _core.Malformed:
        raise PeerProtocolError(f"{what} frame: missing code") from None


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
