"""The ``llm`` tunnel service: an edge's LLM-port connection, served by the
Gate's application routes.

A MiniGate relays each connection an application makes to its LLM port
(default ``127.0.0.1:11435``) as one tunnel stream; here that stream is
served like a TCP connection to the Gate's HTTP port: the tunnel engine
relays it to one end of a socket pair, and an HTTP engine
(:class:`~qmesh.web.native.NativeHttpServer`, :meth:`LlmRelay.run`) serves
the other. So the OpenAI-compatible API, its authentication (the app's own
key in ``Authorization``), streaming and errors are the same through the
tunnel as they are directly, and an edge's request crosses no Python
between the tunnel and the upstream model server either.

Only the application routes, though: the OpenAI-compatible API and graph
memory (``/v1/…``) and the capability API (``/qg/v1/…``). The admin API,
dashboard and metrics live on the Gate's own listener, and the admin key is
refused here outright: an edge's localhost port is reachable by every local
user of the edge's box, and is no place for the operator's credential.

Not for: the API itself (:mod:`qmesh.llm.api`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import trio

from qmesh.tunnel.services import splice
from qmesh.tunnel.stream import TunnelStream
from qmesh.web.auth import ADMIN_APP
from qmesh.web.http import Handler, HttpError, Request, Response, Router
from qmesh.web.native import NativeHttpServer

__all__ = ["APP_ROUTE_PREFIXES", "AppRoutes", "LlmRelay"]

APP_ROUTE_PREFIXES: Final = ("/v1/", "/qg/v1/")


class AppRoutes(Router):
    """A view of the Gate's router with the application routes only."""

    def __init__(self, router: Router) -> None:
        super().__init__(router.limits)
        self._inner = router
        self._guarded: dict[Handler, Handler] = {}
        self._original: dict[Handler, Handler] = {}

    @property
    def observe(self) -> Callable[[str, str, int, float], None] | None:
        # The Gate's metrics count requests from edges with the rest.
        return self._inner.observe

    @observe.setter
    def observe(self, value: Callable[[str, str, int, float], None] | None) -> None:
        if value is not None:
            self._inner.observe = value

    def add(self, method: str, path: str, handler: Handler) -> None:
        raise TypeError("AppRoutes is a read-only view; add routes to the Gate's router")

    def route_of(self, handler: Handler | None) -> str:
        return self._inner.route_of(self._original.get(handler) if handler else None)

    def resolve(self, method: str, path: str) -> tuple[Handler, dict[str, str]]:
        if not path.startswith(APP_ROUTE_PREFIXES):
            raise HttpError(
                404,
                f"no route for {path} here: an edge serves the application API only "
                "(/v1/… and /qg/v1/…); the admin API is on the Gate's own listener",
                code="not_found",
            )
        handler, params = self._inner.resolve(method, path)
        return self._guard(handler), params

    def _guard(self, handler: Handler) -> Handler:
        guarded = self._guarded.get(handler)
        if guarded is None:

            async def guarded(request: Request) -> Response:
                token = request.bearer_token() or ""
                if token.partition(":")[0] == ADMIN_APP:
                    raise HttpError(
                        403,
                        "the admin key is not accepted through an edge; "
                        "use the Gate's own HTTP listener",
                        kind="permission_error",
                    )
                return await handler(request)

            self._guarded[handler] = guarded
            self._original[guarded] = handler
        return guarded


class LlmRelay:
    """The ``llm`` service handler; :meth:`run` must be running to serve."""

    def __init__(self, router: Router) -> None:
        self.routes = AppRoutes(router)
        # Failed authentications count against the edge ("tunnel:NAME").
        self.server = NativeHttpServer(self.routes, source_of=lambda peer: peer)
        self.active = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.server.run(task_status=task_status)

    async def __call__(self, stream: TunnelStream) -> None:
        self.active += 1
        try:
            ours, engines = trio.socket.socketpair()
            self.server.adopt(engines.detach(), f"tunnel:{stream.session.peer}")
            await splice(stream, trio.SocketStream(ours))  # in the tunnel engine; closes both
        finally:
            self.active -= 1
