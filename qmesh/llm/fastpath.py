"""The LLM path without Python: routes for the HTTP engine's fast path.

For: :func:`route_installer`, which :class:`~qmesh.llm.api.LlmApi` hands to
:meth:`~qmesh.llm.executor.Executor.relay`. When a request was decided and
relayed at the first try, and nothing holds its app to a budget, the engine
gets a route for the requests that would be decided the same way (same app
key, endpoint, model and streaming; no larger), for
:data:`ROUTE_TTL_S`: those it relays without asking Python, and
:class:`RouteOwner` books each from the engine's report, as
:meth:`~qmesh.llm.executor.Executor.relay` books its own, after the answer
went out. Three quarters into a route's life the engine sends one request
that fits it to Python, whose fresh decision installs the next route, while
the others keep the old one: the slow way is taken once per renewal, not by
everything that arrives in between. A failure forgets every route
(:meth:`Executor.forget_fast_routes`),
so the next requests are decided again; a request whose upstream failed on
the fast path comes to Python with that attempt as its first hop.

What the fast path does not do, and Python does: budgets (an app with one
never gets a route), a shift away from a paid model, failover, skills and
daemons. The per-app limit of requests in progress is
counted separately on each side (the fast path's own cap is the same
number), so an app may briefly have up to twice as many in progress.

Not for: matching requests to routes (the engine, ``fastroute.rs``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Final

from qmesh import _core
from qmesh.llm.backends import ClientFault
from qmesh.llm.calls import DONE_EVENT, Call, error_event, tokens_for_body
from qmesh.llm.executor import Executor, RequestContext, relayed_tokens
from qmesh.llm.providers import CHUNK_TIMEOUT_S, FIRST_BYTE_TIMEOUT_S, status_error
from qmesh.qg.candidates import Candidate
from qmesh.qg.errors import UpstreamFailed
from qmesh.qg.router import Decision
from qmesh.web.exchange import NativeExchange, ProxyTarget
from qmesh.web.fastpath import FastRelayed, RouteSpec

__all__ = ["ROUTE_TTL_S", "RouteOwner", "route_installer"]

ROUTE_TTL_S: Final = 1.0
"""How long a decision serves the fast path at most: what it rests on and
no event announces (latency rankings, inventory, budgets configured anew)
is looked at again this often."""

MAX_TOKEN_COUNT: Final = 100_000_000


class RouteOwner:
    """Books the requests one route relayed."""

    def __init__(
        self,
        executor: Executor,
        decision: Decision,
        candidate: Candidate,
        ctx: RequestContext,
        call: Call,
        who: str,
        request_ids: Callable[[], str],
    ) -> None:
        self.executor = executor
        self.decision = decision
        self.candidate = candidate
        self.app = ctx.app
        self.budget_state = ctx.budget_state
        self.stream = call.stream
        self.who = who
        self.request_ids = request_ids

    def _context(self) -> RequestContext:
        return RequestContext(self.app, self.request_ids(), None, self.budget_state)

    def done_many(self, requests: Sequence[FastRelayed], now: float) -> None:
        executor, stream = self.executor, self.stream
        answers = [
            (now - started, *relayed_tokens(stream, tokens_for_body(size), t_in, t_out, out))
            for started, size, t_in, t_out, out in requests
        ]
        executor.book_relayed(self.decision, self.app, self.candidate, answers, self.request_ids)
        if executor.ledger.full:
            executor.forget_fast_routes()

    def done(self, event: _core.HttpFastDone) -> bytes | None:
        executor, candidate = self.executor, self.candidate
        executor.relayed += 1
        ctx = self._context()
        relayed = event.outcome
        seconds = time.monotonic() - event.started_at
        broken = relayed.reason is not None and not relayed.client_gone
        tokens = relayed_tokens(
            self.stream, tokens_for_body(event.body_len),
            relayed.tokens_in, relayed.tokens_out, relayed.bytes_out,
        )  # fmt: skip
        if broken and self.stream:
            executor.stream_broke(candidate, ctx, str(relayed.reason))
        cost = executor.cost(candidate, *tokens, seconds)
        outcome = "stream_broken" if broken and self.stream else "ok"
        executor.book_answer(self.decision, ctx, candidate, tokens, cost, seconds, outcome)
        if executor.ledger.full:
            executor.forget_fast_routes()
        if outcome == "ok" or not relayed.open:
            return None
        words = error_event(f"the model's stream broke off: {relayed.reason}", code=outcome)
        return words + DONE_EVENT

    def failed(self, outcome: _core.HttpProxied) -> list[dict[str, object]]:
        if outcome.kind == "failed":
            error: Exception = UpstreamFailed(f"{self.who}: {outcome.reason}")
        else:
            error = status_error(outcome.status, outcome.body, self.who)
        if isinstance(error, ClientFault):
            # The request's own fault: Python sends it again and answers
            # the client as the provider puts it.
            return []
        ctx = self._context()
        self.executor.record_failure(self.candidate, ctx, error)
        return ctx.hops


def route_installer(
    executor: Executor,
    exchange: NativeExchange,
    decision: Decision,
    ctx: RequestContext,
    call: Call,
    *,
    authorization: str,
    path: str,
    max_in_flight: int,
    request_ids: Callable[[], str],
) -> Callable[[Candidate, ProxyTarget, bytes], None] | None:
    """What :meth:`Executor.relay` calls to install a route for requests
    like this one, or None when none can be."""
    routes = exchange.routes
    model = call.body.get("model")
    if routes is None or not authorization or not isinstance(model, str):
        return None

    def install(candidate: Candidate, target: ProxyTarget, headers: bytes) -> None:
        if not target.head:
            return
        spec = RouteSpec(
            authorization=authorization, path=path, model=model, stream=call.stream,
            app=ctx.app, host=target.host, port=target.port, request_head=target.head,
            upstream_model=target.model, headers=headers,
            first_byte_timeout_s=FIRST_BYTE_TIMEOUT_S, chunk_timeout_s=CHUNK_TIMEOUT_S,
            max_body=len(call.raw), max_tokens=call.max_tokens or MAX_TOKEN_COUNT,
            max_in_flight=max_in_flight, ttl_s=ROUTE_TTL_S,
            tls=target.tls, server_name=target.server_name,
        )  # fmt: skip
        owner = RouteOwner(executor, decision, candidate, ctx, call, target.who, request_ids)
        routes.install(spec, owner)

    return install
