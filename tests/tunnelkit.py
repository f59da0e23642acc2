"""Building blocks for tunnel tests: keys, a Gate and edges in one Trio loop."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import trio
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from qmesh.config import TunnelConfig
from qmesh.tunnel import HandshakeRefused, TunnelClient, TunnelServer, TunnelStream
from qmesh.tunnel.handshake import Hello
from qmesh.tunnel.services import ServiceHandler


def keypair() -> tuple[bytes, bytes]:
    key = X25519PrivateKey.generate()
    return key.private_bytes_raw(), key.public_key().public_bytes_raw()


def fast_settings(**overrides: object) -> TunnelConfig:
    """Short timers so tests notice dead peers and expire sessions quickly."""
    values: dict[str, object] = {
        "heartbeat_interval_s": 0.5,
        "dead_after_s": 2.0,
        "resume_grace_s": 30.0,
        "reconnect_initial_s": 0.01,
        "reconnect_max_s": 0.2,
        "handshake_timeout_s": 5.0,
    }
    values.update(overrides)
    return attrs.evolve(TunnelConfig(), **values)  # type: ignore[arg-type]


async def echo_service(stream: TunnelStream) -> None:
    while data := await stream.receive_some():
        await stream.send_all(data)
    await stream.send_eof()


@attrs.define
class Registry:
    """The Gate's view of enrolled edges, as ``authenticate`` sees it."""

    edges: dict[bytes, tuple[str, str]] = attrs.field(factory=dict)
    revoked: set[str] = attrs.field(factory=set)

    def enroll(self, name: str, role: str = "minigate") -> tuple[bytes, bytes]:
        private, public = keypair()
        self.edges[public] = (name, role)
        return private, public

    async def authenticate(self, public_key: bytes, hello: Hello) -> tuple[str, str]:
        await trio.lowlevel.checkpoint()
        identity = self.edges.get(public_key)
        if identity is None:
            raise HandshakeRefused("not_enrolled", "this key is not enrolled")
        if identity[0] in self.revoked:
            raise HandshakeRefused("revoked", f"{identity[0]} was revoked")
        return identity


@attrs.define
class Gate:
    server: TunnelServer
    port: int
    private: bytes
    public: bytes
    registry: Registry


async def start_gate(
    nursery: trio.Nursery,
    services: Mapping[str, ServiceHandler] | None = None,
    settings: TunnelConfig | None = None,
) -> Gate:
    private, public = keypair()
    registry = Registry()
    server = TunnelServer(
        settings or fast_settings(),
        name="test-gate",
        private_key=private,
        authenticate=registry.authenticate,
        services=services if services is not None else {"echo": echo_service},
    )
    port = await nursery.start(server.serve, "127.0.0.1", 0)
    return Gate(server, port, private, public, registry)


def make_edge(
    gate: Gate,
    name: str,
    *,
    port: int | None = None,
    settings: TunnelConfig | None = None,
    private_key: bytes | None = None,
    gate_public: bytes | None = None,
    services: Mapping[str, ServiceHandler] | None = None,
) -> TunnelClient:
    if private_key is None:
        private_key, _ = gate.registry.enroll(name)
    client = TunnelClient(
        settings or fast_settings(),
        name=name,
        role="minigate",
        private_key=private_key,
        gate_public_key=gate_public or gate.public,
        gate_addresses=[("127.0.0.1", port or gate.port)],
        services=services,
    )
    return client


async def start_edge(nursery: trio.Nursery, gate: Gate, name: str, **options: Any) -> TunnelClient:
    client = make_edge(gate, name, **options)
    await nursery.start(client.run)
    return client


async def until(
    condition: Callable[[], bool], poll_s: float = 0.005, timeout_s: float = 60.0
) -> None:
    """Wait for a condition on session internals that no event announces.
    ``trio.TooSlowError`` past ``timeout_s`` (a caller's own deadline may be
    shorter): a condition that never comes fails its test, never hangs the run."""
    with trio.fail_after(timeout_s):
        while not condition():  # noqa: ASYNC110 - there is no event to wait on
            await trio.sleep(poll_s)


async def roundtrip(stream: TunnelStream, payload: bytes) -> bytes:
    """Send ``payload`` and EOF on an echo stream; what came back."""
    received = bytearray()

    async def read() -> None:
        while data := await stream.receive_some():
            received.extend(data)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        await stream.send_all(payload)
        await stream.send_eof()
    return bytes(received)


class Recorder(trio.abc.Stream):
    """A stream that remembers every byte sent through it: what an on-path
    observer of the tunnel would capture."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.sent = bytearray()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.sent += data
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def raw_handshake(
    port: int, gate_public: bytes, private_key: bytes, hello_json: bytes
) -> tuple[trio.SocketStream, bytes]:
    """Send a handshake's first message with any HELLO payload, as a hostile
    client would; the open connection and the bytes sent."""
    from qmesh import _core
    from qmesh.tunnel.handshake import PREAMBLE

    noise = _core.NoiseHandshake.initiator(private_key, gate_public, PREAMBLE)
    message = noise.write_message(hello_json)
    data = PREAMBLE + len(message).to_bytes(2, "big") + message
    transport = await trio.open_tcp_stream("127.0.0.1", port)
    await transport.send_all(data)
    return transport, data


async def wait_closed(transport: trio.SocketStream) -> None:
    """Read until the peer closes (what it sent before is not looked at)."""
    with contextlib.suppress(trio.BrokenResourceError):
        while await transport.receive_some(65536):
            pass
