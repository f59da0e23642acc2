"""The ``llm`` tunnel service: an edge's LLM-port connection, served by the
Gate's own HTTP router.

A MiniGate relays each connection an application makes to its LLM port
(default ``127.0.0.1:11435``) as one tunnel stream; here that stream is
served exactly like a TCP connection to the Gate's HTTP port (h11 works
over any Trio stream), so the OpenAI-compatible API, its authentication
(the app's own key in ``Authorization``), streaming and errors are the
same through the tunnel as they are directly.

Not for: the API itself (:mod:`qmesh.gate.llm_api`).
"""

from __future__ import annotations

from qmesh.tunnel.stream import TunnelStream
from qmesh.web.http import Router, serve_stream

__all__ = ["LlmRelay"]


class LlmRelay:
    """The ``llm`` service handler."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self.active = 0

    async def __call__(self, stream: TunnelStream) -> None:
        self.active += 1
        try:
            await serve_stream(self.router, stream, client=f"tunnel:{stream.session.peer}")
        finally:
            self.active -= 1
