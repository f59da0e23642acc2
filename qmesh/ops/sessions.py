"""The Gate's operational HTTP endpoints: health, and the tunnel's live sessions.

``GET /api/sessions`` lists live tunnel sessions; ``POST /api/sessions/kill``
ends an identity's sessions, or one session, without revoking anything (the
edge may connect again; ``qmesh revoke`` is what keeps it out). Both need the
admin key, and like every admin endpoint they are served on the Gate's own
listener only (see :mod:`qmesh.llm.relay`).
"""

from __future__ import annotations

from typing import Any, Final

from qmesh import __version__
from qmesh.cluster.fabric import edge_sessions
from qmesh.operator_roles import Right
from qmesh.tunnel import Session, TunnelServer
from qmesh.web.auth import AppAuthenticator
from qmesh.web.http import HttpError, Request, Response, Router

SHORT_ID: Final = 12
"""Hex digits of a session id shown to operators; any unique prefix of at
least MIN_PREFIX digits names a session."""
MIN_PREFIX: Final = 8


def session_view(session: Session) -> dict[str, Any]:
    return {
        "session": session.id.hex()[:SHORT_ID],
        "peer": session.peer,
        "role": session.peer_role,
        "protocol": session.protocol_version,
        "address": session.address,
        "since": session.opened_at,
        "attached": session.attached,
        "streams": session.stream_count,
        "connections": session.connections,
        "resumptions": session.resumptions,
        "rtt_ms": None if session.rtt is None else round(session.rtt * 1000, 3),
        "bytes_sent": session.bytes_sent,
        "bytes_received": session.bytes_received,
    }


def _sessions_named(server: TunnelServer, target: str) -> list[Session]:
    """The sessions ``target`` names: an identity's, or one by id prefix."""
    by_peer = server.sessions_of(target)
    if by_peer:
        return by_peer
    prefix = target.lower()
    if len(prefix) < MIN_PREFIX or not all(c in "0123456789abcdef" for c in prefix):
        return []
    matches = [s for s in server.sessions.values() if s.id.hex().startswith(prefix)]
    if len(matches) > 1:
        raise HttpError(409, f"session id prefix {target!r} is ambiguous; give more digits")
    return matches


def add_routes(router: Router, server: TunnelServer, auth: AppAuthenticator) -> None:
    async def healthz(request: Request) -> Response:
        edges = edge_sessions(server)
        body = {
            "status": "draining" if server.draining else "ok", "version": __version__,
            "sessions": edges, "gate_links": len(server.sessions) - edges,
        }  # fmt: skip
        # A load balancer's health check: a draining Gate takes nothing new.
        return Response.json(body, status=503 if server.draining else 200)

    def tunnel_view() -> dict[str, Any]:
        return {
            "sessions": [session_view(s) for s in server.sessions.values()],
            "resumptions": server.resumptions,
            "handshake_failures": server.handshake_failures,
            "handshakes_shed": server.handshakes_shed,
        }

    async def tunnel(request: Request) -> Response:
        await auth.require(request, Right.VIEW)
        return Response.json(tunnel_view())

    async def kill(request: Request) -> Response:
        await auth.require(request, Right.OPERATE)
        body = request.json()
        target = body.get("target") if isinstance(body, dict) else None
        if not isinstance(target, str) or not target:
            raise HttpError(400, 'expected {"target": NAME or SESSION_ID}', param="target")
        sessions = _sessions_named(server, target)
        if not sessions:
            raise HttpError(404, f"no live session of or with id {target!r}", code="not_found")
        ended = [session_view(s) for s in sessions]
        for session in sessions:
            server.end_session(session, "ended by an operator")
        names = sorted({f"{view['peer']}/{view['session']}" for view in ended})
        await auth.record(request, "sessions.kill", {"target": target, "ended": names})
        return Response.json({"ended": ended})

    router.add("GET", "/healthz", healthz)
    router.add("GET", "/api/tunnel", tunnel)
    router.add("GET", "/api/sessions", tunnel)
    router.add("POST", "/api/sessions/kill", kill)
