"""MiniGate ``forward`` entries: a local listener whose connections become
tunnel streams to a target that the Gate reaches on the edge's behalf."""

from __future__ import annotations

import logging

import trio

from qmesh.boundary import guarded
from qmesh.config import parse_hostport
from qmesh.fastsocket import open_listeners, serve_listeners
from qmesh.tunnel.client import TunnelClient
from qmesh.tunnel.errors import TunnelError
from qmesh.tunnel.services import splice

log = logging.getLogger(__name__)


async def serve_forward(
    client: TunnelClient,
    listen: str,
    target: str,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on ``listen`` ("host:port") and relay each connection to ``target``
    through the tunnel. ``task_status.started`` gets the bound port."""
    host, port = parse_hostport(listen)
    listeners = await open_listeners(host, port, purpose=f"the forward to {target}")
    bound: int = listeners[0].socket.getsockname()[1]
    log.info("forwarding %s:%d → %s through the gate", host, bound, target)

    async def relay(local: trio.SocketStream) -> None:
        try:
            stream = await client.open_stream({"service": "forward", "target": target})
        except TunnelError as exc:
            log.warning("cannot open a tunnel stream for %s: %s", target, exc)
            await trio.aclose_forcefully(local)
            return
        await splice(local, stream)

    task_status.started(bound)
    await serve_listeners(
        guarded(relay, f"connection forwarded to {target}", log),
        listeners,
        what=f"forward to {target}",
    )
