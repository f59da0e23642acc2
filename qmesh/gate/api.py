"""The Gate's operational HTTP endpoints: health and the tunnel's live state."""

from __future__ import annotations

from typing import Any

from qmesh import __version__
from qmesh.gate.auth import AppAuthenticator
from qmesh.tunnel import Session, TunnelServer
from qmesh.web.http import Request, Response, Router


def _session_view(session: Session) -> dict[str, Any]:
    return {
        "session": session.id.hex()[:12],
        "peer": session.peer,
        "role": session.peer_role,
        "attached": session.attached,
        "streams": session.stream_count,
        "connections": session.connections,
        "rtt_ms": None if session.rtt is None else round(session.rtt * 1000, 3),
        "bytes_sent": session.bytes_sent,
        "bytes_received": session.bytes_received,
    }


def add_routes(router: Router, server: TunnelServer, auth: AppAuthenticator) -> None:
    async def healthz(request: Request) -> Response:
        return Response.json(
            {"status": "ok", "version": __version__, "sessions": len(server.sessions)}
        )

    async def tunnel(request: Request) -> Response:
        await auth.require(request, admin=True)
        return Response.json(
            {
                "sessions": [_session_view(s) for s in server.sessions.values()],
                "resumptions": server.resumptions,
                "handshake_failures": server.handshake_failures,
            }
        )

    router.add("GET", "/healthz", healthz)
    router.add("GET", "/api/tunnel", tunnel)
