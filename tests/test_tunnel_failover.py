"""An edge given one host name for a cluster of Gates: each address the name
resolves to is a Gate, and when the edge's Gate goes, it moves to another.

Two tunnel servers with the cluster's one key, on 127.0.0.1 and 127.0.0.2
(both loopback) at the same port, and a resolver that answers the name
``gates.test`` with both addresses, as a DNS record with two A records
would."""

from __future__ import annotations

import socket
from typing import Any

import trio
from tunnelkit import Registry, echo_service, fast_settings, keypair, until

from qmesh.tunnel import TunnelClient, TunnelServer

ADDRESSES = ("127.0.0.1", "127.0.0.2")


class TwoRecords(trio.abc.HostnameResolver):
    """``gates.test`` has two addresses; every other name is resolved as usual."""

    async def getaddrinfo(
        self, host: bytes | None, port: bytes | str | int | None, family: int = 0,
        type: int = 0, proto: int = 0, flags: int = 0,
    ) -> list[tuple[Any, ...]]:  # fmt: skip
        if host == b"gates.test":
            number = int(port) if port is not None else 0
            return [
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, number))
                for address in ADDRESSES
            ]
        return socket.getaddrinfo(host, port, family, type, proto, flags)

    async def getnameinfo(self, sockaddr: tuple[Any, ...], flags: int) -> tuple[str, str]:
        return socket.getnameinfo(sockaddr, flags)


async def test_each_address_of_a_name_is_a_gate_and_the_edge_moves_on(
    nursery: trio.Nursery,
) -> None:
    private, public = keypair()
    registry = Registry()
    servers: dict[str, tuple[TunnelServer, trio.CancelScope]] = {}
    port = 0
    for address in ADDRESSES:
        server = TunnelServer(
            fast_settings(), name=f"gate@{address}", private_key=private,
            authenticate=registry.authenticate, services={"echo": echo_service},
        )  # fmt: skip
        scope = trio.CancelScope()

        async def serve(
            server: TunnelServer = server,
            scope: trio.CancelScope = scope,
            address: str = address,
            listen_port: int = port,  # 0 for the first; the second takes the first's
            *,
            task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
        ) -> None:
            with scope:
                await server.serve(address, listen_port, task_status=task_status)

        port = await nursery.start(serve)
        servers[address] = (server, scope)
    trio.socket.set_custom_hostname_resolver(TwoRecords())
    try:
        edge_key, _ = registry.enroll("edge-1")
        edge = TunnelClient(
            fast_settings(failover_jitter_s=0.05), name="edge-1", role="minigate",
            private_key=edge_key, gate_public_key=public, gate_addresses=[("gates.test", port)],
        )  # fmt: skip
        await nursery.start(edge.run)
        await edge.wait_connected()
        first = edge.gate_address[0]
        assert first in ADDRESSES  # a Gate of the name, not the name itself
        servers[first][1].cancel()  # that Gate goes away
        with trio.fail_after(20):
            await until(lambda: edge.connected and edge.gate_address[0] != first)
        other = edge.gate_address[0]
        assert other in ADDRESSES and other != first
        assert len(servers[other][0].sessions) == 1
    finally:
        trio.socket.set_custom_hostname_resolver(None)
