"""The tunnel handshake over a Trio stream: preamble, then Noise IK.

    edge → gate   PREAMBLE (8 bytes: b"QMSH", newest and oldest version, 2 zero bytes)
    edge → gate   u16 length + Noise message 1, payload = HELLO (JSON)
    gate → edge   u16 length + Noise message 2, payload = WELCOME (JSON)

The preamble is the Noise prologue, so both ends also authenticate it. The
Gate runs the newest version both sides speak and names it in the WELCOME;
with none in common it still completes message 1 and refuses in message 2,
naming the versions each side speaks and which side to upgrade. The
HELLO names the edge's session (if resuming), its ``recv_next`` and a
timestamp (nanoseconds since the epoch) that must grow with every handshake
of the same edge key: Noise IK's message 1 can be replayed by anyone who saw
it, and the Gate refuses a replay by that timestamp, as WireGuard does with
its TAI64N field. The
WELCOME answers with the session id, whether it was resumed, and the Gate's
``recv_next``. A refusal is a WELCOME with ``ok: false`` — still encrypted to
the edge, so only the key's owner learns why it was refused.

This module is only about the bytes of the handshake; what the Gate decides
(who is enrolled, which session to resume) is the server's business.
"""

from __future__ import annotations

import json
import re
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import attrs
import trio
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from qmesh import __version__, _core, peerjson
from qmesh.tunnel.errors import HandshakeFailed, HandshakeRefused

NEWEST_VERSION: Final = _core.PROTOCOL_VERSION
OLDEST_VERSION: Final = max(1, NEWEST_VERSION - 1)
"""The oldest tunnel protocol this side still speaks: one version behind,
so a cluster upgrades its Gates first and its edges after, at leisure."""
PREAMBLE = b"QMSH" + bytes([NEWEST_VERSION, OLDEST_VERSION, 0, 0])
"""What an edge sends first: the newest and the oldest version it speaks
(an edge from before the second byte was used sends 0 there: its newest
is its only one)."""
VERSION_REFUSED: Final = "version"
_LEN = struct.Struct(">H")
MAX_HANDSHAKE_MESSAGE = 65535
# HELLO and WELCOME are flat objects; nothing legitimate nests at all.
_MAX_JSON_DEPTH: Final = 2
_MAX_NAME: Final = 255
_U64_LIMIT: Final = 2**64
_SESSION_ID_HEX: Final = 32


def _u64(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < _U64_LIMIT:
        raise ValueError(f"{what} must be an integer in [0, 2^64)")
    return value


def _text(value: object, what: str) -> str:
    if not isinstance(value, str) or len(value) > _MAX_NAME:
        raise ValueError(f"{what} must be a string of at most {_MAX_NAME} characters")
    return value


def _object(payload: bytes, what: str) -> dict[str, Any]:
    data = peerjson.loads(
        payload, max_bytes=MAX_HANDSHAKE_MESSAGE, max_depth=_MAX_JSON_DEPTH, what=what
    )
    if not isinstance(data, dict):
        raise ValueError(f"{what} must be a JSON object")
    return data


def _session_id(value: object) -> bytes | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) != _SESSION_ID_HEX:
        raise ValueError(f"session must be {_SESSION_ID_HEX} hex digits")
    return bytes.fromhex(value)


def clock_ns() -> int:
    """The HELLO timestamp: wall-clock nanoseconds, so it keeps growing
    across restarts of the edge (the Gate remembers the last one it saw)."""
    return time.time_ns()


@attrs.frozen
class Hello:
    """What the edge says about itself in message 1."""

    role: str
    name: str
    session_id: bytes | None
    recv_next: int
    timestamp: int
    join: str | None = attrs.field(default=None, repr=False)
    """A one-time join token's proof, from an edge whose key is not enrolled
    yet (qmesh.admission redeems it)."""

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "v": _core.PROTOCOL_VERSION,
                "role": self.role,
                "name": self.name,
                "session": self.session_id.hex() if self.session_id else None,
                "recv_next": self.recv_next,
                "ts": self.timestamp,
                "software": f"qmesh/{__version__}",
                **({"join": self.join} if self.join else {}),
            }
        ).encode()

    @classmethod
    def from_json(cls, payload: bytes) -> Hello:
        """Every field checked for type and range: this is a stranger's input
        (anyone holding the Gate's public key can send it)."""
        try:
            data = _object(payload, "HELLO")
            return cls(
                role=_text(data.get("role"), "role"),
                name=_text(data.get("name"), "name"),
                session_id=_session_id(data.get("session")),
                recv_next=_u64(data.get("recv_next"), "recv_next"),
                timestamp=_u64(data.get("ts"), "ts"),
                join=None if data.get("join") is None else _text(data.get("join"), "join"),
            )
        except ValueError as exc:
            raise HandshakeFailed(f"malformed HELLO: {exc}") from None


@attrs.frozen
class Welcome:
    """The Gate's answer in message 2 when it accepts the edge."""

    session_id: bytes
    resumed: bool
    recv_next: int
    gate: str
    version: int = NEWEST_VERSION
    """The tunnel protocol the session runs: the newest both sides speak."""
    gate_key: bytes | None = None
    """The Gate's new public key, when the edge reached it with the key a
    rotation replaced (the edge keeps it for its next handshakes)."""


def agree(edge_newest: int, edge_oldest: int) -> int:
    """The version a Gate of this build runs with an edge that speaks
    ``edge_oldest``..``edge_newest``; HandshakeRefused naming both ranges
    and what to upgrade when they do not meet."""
    edge_oldest = edge_oldest or edge_newest
    version = min(edge_newest, NEWEST_VERSION)
    if version >= max(edge_oldest, OLDEST_VERSION) and version >= 1:
        return version
    side = "the Gate" if edge_oldest > NEWEST_VERSION else "the edge"
    raise HandshakeRefused(
        VERSION_REFUSED,
        f"this Gate speaks tunnel protocol versions {OLDEST_VERSION}-{NEWEST_VERSION}, the "
        f"edge {edge_oldest}-{edge_newest}: upgrade {side} (Gates first, then edges)",
    )


class _Reader:
    """Exact reads over a Trio stream, keeping what was read past the end."""

    def __init__(self, transport: trio.abc.Stream) -> None:
        self.transport = transport
        self.buffer = bytearray()

    async def read_exactly(self, n: int, what: str) -> bytes:
        while len(self.buffer) < n:
            try:
                data = await self.transport.receive_some(65536)
            except (trio.BrokenResourceError, OSError) as exc:
                raise HandshakeFailed(f"connection failed while reading {what}: {exc}") from None
            if not data:
                raise HandshakeFailed(f"peer closed the connection while sending {what}")
            self.buffer += data
        out = bytes(self.buffer[:n])
        del self.buffer[:n]
        return out

    async def read_message(self, what: str) -> bytes:
        (length,) = _LEN.unpack(await self.read_exactly(_LEN.size, what))
        return await self.read_exactly(length, what)


async def _send(transport: trio.abc.Stream, data: bytes, what: str) -> None:
    try:
        await transport.send_all(data)
    except (trio.BrokenResourceError, OSError) as exc:
        raise HandshakeFailed(f"connection failed while sending {what}: {exc}") from None


def _framed(message: bytes) -> bytes:
    return _LEN.pack(len(message)) + message


async def initiate(
    transport: trio.abc.Stream,
    *,
    local_private: bytes,
    gate_public: bytes,
    hello: Hello,
) -> tuple[_core.NoiseHandshake, Welcome, bytes]:
    """Run the edge's side. Returns the finished handshake, the Gate's
    WELCOME and any bytes received after it (the first frames)."""
    noise = _core.NoiseHandshake.initiator(local_private, gate_public, PREAMBLE)
    await _send(transport, PREAMBLE + _framed(noise.write_message(hello.to_json())), "HELLO")
    reader = _Reader(transport)
    message = await reader.read_message("WELCOME")
    try:
        data = _object(noise.read_message(message), "WELCOME")
    except _core.HandshakeError as exc:
        raise HandshakeFailed(f"gate's reply did not authenticate: {exc}") from None
    except ValueError as exc:
        raise HandshakeFailed(f"gate's WELCOME is unreadable: {exc}") from None
    if not data.get("ok"):
        raise HandshakeRefused(
            str(data.get("code", "refused"))[:_MAX_NAME], str(data.get("error", ""))[:1024]
        )
    try:
        session_id = _session_id(data.get("session"))
        if session_id is None:
            raise ValueError("no session")
        version = _u64(data.get("v", NEWEST_VERSION), "v")
        if not OLDEST_VERSION <= version <= NEWEST_VERSION:
            raise ValueError(f"the gate chose version {version}, which this edge does not speak")
        gate_key = data.get("gate_key")
        if gate_key is not None and (
            not isinstance(gate_key, str) or not re.fullmatch(r"[0-9a-f]{64}", gate_key)
        ):
            raise ValueError("gate_key must be 64 hex digits")
        welcome = Welcome(
            session_id=session_id,
            resumed=data.get("resumed") is True,
            recv_next=_u64(data.get("recv_next"), "recv_next"),
            gate=_text(data.get("gate", ""), "gate"),
            version=version,
            gate_key=None if gate_key is None else bytes.fromhex(gate_key),
        )
    except ValueError as exc:
        raise HandshakeFailed(f"malformed WELCOME: {exc}") from None
    return noise, welcome, bytes(reader.buffer)


Decide = Callable[[bytes, Hello], Awaitable[Welcome]]


async def respond(
    transport: trio.abc.Stream,
    *,
    local_private: bytes,
    decide: Decide,
    previous_private: bytes | None = None,
) -> tuple[_core.NoiseHandshake, Hello, Welcome, bytes]:
    """Run the Gate's side. ``decide(edge_public_key, hello)`` returns the
    WELCOME or raises :class:`HandshakeRefused`, which is sent to the edge and
    re-raised here. ``previous_private``: the Gate key a rotation replaced,
    still accepted (its overlap); an edge that used it is told the new one."""
    reader = _Reader(transport)
    preamble = await reader.read_exactly(len(PREAMBLE), "the preamble")
    if preamble[:4] != PREAMBLE[:4] or preamble[6:] != b"\0\0":
        raise HandshakeFailed(f"not a qmesh tunnel client (preamble {preamble[:8]!r})")
    # The edge's own preamble is the prologue: a refusal for want of a common
    # version is still sent where only the key's owner can read it.
    message = await reader.read_message("HELLO")
    noise = _core.NoiseHandshake.responder(local_private, preamble)
    new_gate_key: bytes | None = None
    try:
        try:
            payload = noise.read_message(message)
        except _core.HandshakeError:
            if previous_private is None:
                raise
            # IK's message 1 is encrypted to the key the edge holds: try the
            # one a rotation replaced (a fresh state: the first one failed).
            noise = _core.NoiseHandshake.responder(previous_private, preamble)
            payload = noise.read_message(message)
            new_gate_key = (
                X25519PrivateKey.from_private_bytes(local_private).public_key().public_bytes_raw()
            )
        hello = Hello.from_json(payload)
    except _core.HandshakeError as exc:
        # Either garbage or a client holding the wrong Gate key: IK fails
        # to decrypt message 1. Nothing can be sent that it could read.
        raise HandshakeFailed(f"HELLO did not authenticate: {exc}") from None
    edge_key = noise.remote_static()
    if edge_key is None:  # impossible with IK; guard the type
        raise HandshakeFailed("no static key in HELLO")
    try:
        # Before decide(): a refusal for the version must not have spent the
        # edge's HELLO timestamp, a join token, or a session it resumes.
        version = agree(preamble[4], preamble[5])
        welcome = attrs.evolve(await decide(edge_key, hello), version=version)
    except HandshakeRefused as refusal:
        reply = {"ok": False, "code": refusal.code, "error": refusal.reason}
        await _send(transport, _framed(noise.write_message(json.dumps(reply).encode())), "refusal")
        raise
    reply = {
        "ok": True,
        "session": welcome.session_id.hex(),
        "resumed": welcome.resumed,
        "recv_next": welcome.recv_next,
        "gate": welcome.gate,
        "v": welcome.version,
        **({"gate_key": new_gate_key.hex()} if new_gate_key is not None else {}),
    }
    await _send(transport, _framed(noise.write_message(json.dumps(reply).encode())), "WELCOME")
    return noise, hello, welcome, bytes(reader.buffer)
