"""Generic TCP forwarding at the Gate, for services qmesh does not speak natively.

An edge opens a ``forward`` stream naming ``target`` ("host:port"); the Gate
connects there only if a pattern of its ``forward_allow`` policy matches
(deny by default), then relays bytes both ways.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import trio

from qmesh.config import forward_allowed, parse_hostport
from qmesh.fastsocket import connect_tcp
from qmesh.tunnel.frames import ResetCode
from qmesh.tunnel.services import splice
from qmesh.tunnel.stream import TunnelStream

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0


class ForwardService:
    """The ``forward`` service handler."""

    def __init__(self, allow: Sequence[str]) -> None:
        self.allow = tuple(allow)

    async def __call__(self, stream: TunnelStream) -> None:
        target = stream.request.get("target")
        try:
            host, port = parse_hostport(str(target))
        except ValueError:
            stream.reset(ResetCode.REFUSED, f"bad forward target {target!r}")
            return
        if port == 0 or not forward_allowed(self.allow, host, port):
            log.warning("%s may not forward to %s:%d", stream.session.peer, host, port)
            stream.reset(ResetCode.REFUSED, f"forwarding to {host}:{port} is not allowed")
            return
        try:
            with trio.fail_after(CONNECT_TIMEOUT_S):
                upstream = await connect_tcp(host, port)
        except (OSError, trio.TooSlowError) as exc:
            log.info("forward %s → %s:%d failed: %s", stream.session.peer, host, port, exc)
            stream.reset(ResetCode.CONNECT_FAILED, f"cannot connect to {host}:{port}")
            return
        await splice(stream, upstream)
