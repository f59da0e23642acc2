"""The MiniGate's LLM port: the Gate's OpenAI-compatible API on localhost.

An application on the edge box points its OpenAI client at
``http://127.0.0.1:11435/v1`` (``minigate.llm_listen``) with its app key as
the API key (``APP_ID:APP_KEY``). Each connection becomes one ``llm``
tunnel stream that the Gate serves with its own HTTP router
(:mod:`qmesh.llm.relay`), so keep-alive, SSE streaming and every
error pass through unchanged, sealed and compressed by the tunnel.

Not for: parsing HTTP here: the MiniGate relays bytes and holds no
secrets, so authentication, routing and accounting all stay at the Gate.
"""

from __future__ import annotations

import logging

import trio

from qmesh.boundary import guarded
from qmesh.config import parse_hostport
from qmesh.fastsocket import open_listeners
from qmesh.tunnel.client import TunnelClient
from qmesh.tunnel.errors import TunnelError
from qmesh.tunnel.services import splice

__all__ = ["serve_llm"]

log = logging.getLogger(__name__)

_BODY = (
    b'{"error":{"message":"the qmesh gate is unreachable","type":"server_error","code":"no_gate"}}'
)
_UNAVAILABLE = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
    b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(_BODY), _BODY)
)


async def serve_llm(
    client: TunnelClient,
    listen: str,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on ``listen`` ("host:port"); ``task_status.started`` gets the bound port."""
    host, port = parse_hostport(listen)
    listeners = await open_listeners(host, port, purpose="the MiniGate's LLM API")
    bound: int = listeners[0].socket.getsockname()[1]
    log.info("LLM API on %s:%d (relayed to the gate)", host, bound)

    async def relay(local: trio.SocketStream) -> None:
        try:
            stream = await client.open_stream({"service": "llm"})
        except TunnelError as exc:
            log.warning("cannot reach the gate for an LLM request: %s", exc)
            try:
                await local.send_all(_UNAVAILABLE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            await trio.aclose_forcefully(local)
            return
        await splice(local, stream)

    task_status.started(bound)
    await trio.serve_listeners(guarded(relay, "LLM client connection", log), listeners)
