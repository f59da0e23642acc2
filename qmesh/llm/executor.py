"""Fluid failover ("liquify"): run a routed call, moving it when a worker fails.

For: :class:`Executor`, which takes the router's :class:`~qmesh.qg.router.Decision`
and tries its chosen candidate, then the fallbacks, then anything else
that passes the filters *now*, until one answers:

- a busy worker (:class:`~qmesh.qg.errors.UpstreamBusy`) → the next
  candidate (equivalent models are in the same ranking, see the router);
- a failure before the first byte (:class:`~qmesh.qg.errors.UpstreamFailed`)
  → the worker's node cools down for ``cooldown_s`` and the next candidate
  takes the call, invisibly to the client;
- a failure after bytes reached the client (a stream broken mid-way) → the
  stream ends with an OpenAI-style error event and ``[DONE]``, never a hang.

The order is the router's (:meth:`~qmesh.qg.router.Router.hops`), and
before each attempt the candidate is admitted by the same verdict the
decision and its explanation used (:meth:`~qmesh.qg.router.Router.admission`,
over the budget's snapshot of that moment: a node cooled down by an earlier
hop, a paid candidate whose maximum cost no longer fits a hard budget, are
skipped); only then is its maximum cost reserved, which can still be
refused when other requests took the money in between. So the first hop
run is the one ``POST /qg/v1/route`` names. Every request's hops, tokens,
cost and outcome become one ledger entry.

Not for: choosing (the router), HTTP (``qmesh.llm.api``), or the
backends' protocols (``qmesh.llm.backends``, ``qmesh.llm.providers``).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any, Final

import attrs

from qmesh import _core
from qmesh.config import RoutingConfig
from qmesh.finops.budgets import Budget, BudgetBook, Reservation
from qmesh.finops.ledger import Hop, Ledger, LedgerEntry
from qmesh.llm.backends import Backend, ClientFault
from qmesh.llm.calls import DONE_EVENT, Answer, Call, Usage, error_event
from qmesh.llm.providers import CHUNK_TIMEOUT_S, FIRST_BYTE_TIMEOUT_S, status_error
from qmesh.qg.candidates import INTERNAL, PROVIDER, Candidate
from qmesh.qg.errors import NoRoute, UpstreamBusy, UpstreamError, UpstreamFailed
from qmesh.qg.router import Decision, Router
from qmesh.web.exchange import ClientGone, NativeExchange, ProxyTarget
from qmesh.web.fastpath import FastRoutes
from qmesh.web.http import Response

__all__ = [
    "Executor",
    "InstallRoute",
    "PythonAnswer",
    "RequestContext",
    "relayed_tokens",
    "stream_tokens",
]

log = logging.getLogger(__name__)

JOULES_PER_KWH: Final = 3_600_000.0
_JSON: Final = (("content-type", "application/json"),)
_EVENT_STREAM_HEADERS: Final = b"cache-control: no-cache\r\n"


def _not_json(value: object) -> object:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _compact_encoder() -> Callable[[object], str]:
    """``json.dumps(value, separators=(",", ":"))``, with one C encoder for
    every row: ``JSONEncoder.encode`` makes a new one each call, which cost
    as much as encoding a row's hops (2 of 4 µs). No check for cycles:
    hops are flat dicts made here."""
    make: Any = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # an interpreter without the C accelerator
        return json.JSONEncoder(separators=(",", ":")).encode
    encoder = make(None, _not_json, json.encoder.encode_basestring_ascii, None, ":", ",",
                   False, False, True)  # fmt: skip
    return lambda value: "".join(encoder(value, 0))


_compact_json: Final = _compact_encoder()
_JSON_STRING: Final[Callable[[str], str]] = json.encoder.encode_basestring_ascii
_ANSWERED_HOP: Final = ("candidate", "outcome", "ms")


def _hops_json(hops: list[dict[str, object]]) -> str:
    """``_compact_json(hops)``. The one hop of a request answered at the
    first try is written here, not by the encoder, in a quarter of its
    time: every request that took the fast path has it."""
    if len(hops) == 1:
        hop = hops[0]
        candidate, ms = hop.get("candidate"), hop.get("ms")
        if (
            type(candidate) is str
            and type(ms) is float
            and math.isfinite(ms)
            and hop.get("outcome") == "ok"
            and tuple(hop) == _ANSWERED_HOP
        ):
            return f'[{{"candidate":{_JSON_STRING(candidate)},"outcome":"ok","ms":{ms!r}}}]'
    return _compact_json(hops)


InstallRoute = Callable[[Candidate, ProxyTarget, bytes], None]
"""Installs a fast-path route for requests like the one being relayed:
they go to this candidate at this target, with these headers added."""

PythonAnswer = Callable[[Iterator[Candidate] | None, int], Awaitable[Response]]
"""Answers a call in Python from these candidates on, ``attempts`` made so
far: what :meth:`Executor.relay` falls back to for a candidate the HTTP
engine cannot reach."""


def stream_tokens(estimated_in: int, usage: Usage) -> tuple[int, int]:
    """A stream's tokens: its usage, else estimates (``estimated_in`` from
    the request; ≈ 4 bytes of text per token in ≈ 64-byte events)."""
    return relayed_tokens(True, estimated_in, usage.tokens_in, usage.tokens_out, usage.bytes_out)


def relayed_tokens(
    stream: bool, estimated_in: int, tokens_in: int, tokens_out: int, bytes_out: int
) -> tuple[int, int]:
    """An answer's tokens from its usage (0: not given), else estimates:
    ``estimated_in`` from the request, and for a stream ≈ 4 bytes of text
    per token in ≈ 64-byte events."""
    if stream and not tokens_out:
        tokens_out = max(1, bytes_out // 64)
    return tokens_in or estimated_in, tokens_out


def _release(exchange: NativeExchange, outcome: _core.HttpProxied) -> None:
    """The relayed answer's end, which waited for its booking."""
    if outcome.open:
        try:
            exchange.finish()
        except ClientGone:
            pass


async def _events(*events: bytes) -> AsyncIterator[bytes]:
    for event in events:
        yield event


@attrs.define
class RequestContext:
    """Who asked and who pays, for one request."""

    app: str
    request_id: str
    budget: Budget | None
    budget_state: str
    hops: list[dict[str, object]] = attrs.field(factory=list)


def _reason(decision: Decision) -> str:
    """The decision as the ledger keeps it: why, how fast, and what was passed over."""
    text = f"{decision.reason}; decided in {decision.elapsed_us:.0f} µs"
    if decision.rejected:
        passed = "; ".join(f"{cid}: {why}" for cid, why in decision.rejected[:5])
        more = len(decision.rejected) - 5
        text += f"; passed over {passed}" + (f" (+{more} more)" if more > 0 else "")
    return text


class Executor:
    def __init__(
        self, router: Router, book: BudgetBook, ledger: Ledger, routing: RoutingConfig
    ) -> None:
        self.router = router
        self.book = book
        self.ledger = ledger
        self.routing = routing
        self.failovers = 0
        self.relayed = 0
        """Answers the HTTP engine relayed (their bytes never passed through Python)."""
        self.fast_routes: weakref.WeakSet[FastRoutes] = weakref.WeakSet()
        """Where routes were installed for the fast path (see :meth:`relay`)."""

    def forget_fast_routes(self) -> None:
        """What decisions rest on changed: the fast path decides nothing
        more until Python has decided again."""
        for routes in list(self.fast_routes):
            routes.forget_all()

    # -- candidates in order ----------------------------------------------------

    def _candidates(
        self, decision: Decision, call: Call, ctx: RequestContext
    ) -> Iterator[Candidate]:
        """The router's order for this request; past the decision's own
        hops, what passes admission with the budget as it is by then."""
        return self.router.hops(
            decision,
            tokens_in=call.tokens_in,
            tokens_out=call.max_tokens,
            budget=lambda: self.book.snapshot(ctx.budget),
        )

    async def _admit(
        self, decision: Decision, candidate: Candidate, call: Call, ctx: RequestContext
    ) -> Reservation | None:
        """Admit ``candidate`` as the decision did, now (an earlier hop may
        have cooled its node down, or spent the budget), then hold its
        maximum cost; None, with the hop recorded, when it may not run."""
        refusal = self.router.admission(
            candidate,
            decision.dsn,
            tokens_in=call.tokens_in,
            tokens_out=call.max_tokens,
            budget=self.book.snapshot(ctx.budget),
            rules=decision.rules,
        )
        if refusal is not None:
            ctx.hops.append({"candidate": candidate.id, "outcome": refusal.kind, "ms": 0.0})
            return None
        ceiling = candidate.cost(call.tokens_in, call.max_tokens)
        reservation = await self.book.reserve(ctx.budget, ceiling, paid=candidate.paid)
        if reservation is None:
            ctx.hops.append({"candidate": candidate.id, "outcome": "budget", "ms": 0.0})
        return reservation

    def cost(self, candidate: Candidate, tokens_in: int, tokens_out: int, seconds: float) -> float:
        if candidate.kind == PROVIDER:
            return candidate.cost(tokens_in, tokens_out)
        if candidate.kind != INTERNAL and self.routing.local_rate_usd_per_1m is not None:
            return self.routing.local_rate_usd_per_1m * (tokens_in + tokens_out) / 1e6
        watts = candidate.power_w if candidate.kind != INTERNAL else self.routing.gate_cpu_watts
        return watts * seconds / JOULES_PER_KWH * self.routing.electricity_usd_per_kwh

    def record_failure(self, candidate: Candidate, ctx: RequestContext, exc: Exception) -> None:
        """An attempt failed before the request reached Python (on the fast
        path): as :meth:`_failed` records one of its own."""
        self._failed(candidate, ctx, exc, 0.0)

    def _failed(self, candidate: Candidate, ctx: RequestContext, exc: Exception, ms: float) -> None:
        busy = isinstance(exc, UpstreamBusy)
        ctx.hops.append(
            {
                "candidate": candidate.id,
                "outcome": "busy" if busy else "failed",
                "ms": round(ms, 3),
                "error": str(exc)[:200],
            }
        )
        if not busy and self.routing.cooldown_s > 0:
            self.router.cool_down(candidate, self.routing.cooldown_s)
        self.router.telemetry_changed()
        self.forget_fast_routes()
        self.failovers += 1
        log.info("request %s: %s on %s; trying the next", ctx.request_id, exc, candidate.id)

    def _record(
        self,
        decision: Decision,
        ctx: RequestContext,
        candidate: Candidate | None,
        tokens: tuple[int, int],
        cost: float,
        outcome: str,
    ) -> None:
        shifted = decision.shifted_from
        avoided = 0.0
        if shifted is not None and candidate is not None and candidate is not shifted:
            avoided = max(0.0, shifted.cost(*tokens) - cost)
            if ctx.budget is not None:
                ctx.budget.shifted += 1
                ctx.budget.avoided += avoided
        self.ledger.record(
            LedgerEntry(
                ts=time.time(),
                request_id=ctx.request_id,
                app=ctx.app,
                budget=None if ctx.budget is None else ctx.budget.name,
                task=decision.dsn.task,
                candidate="" if candidate is None else candidate.id,
                kind="" if candidate is None else candidate.kind,
                model="" if candidate is None else candidate.model,
                provider=None
                if candidate is None or candidate.kind != PROVIDER
                else candidate.node,
                tokens_in=tokens[0],
                tokens_out=tokens[1],
                cost_usd=cost,
                shifted_from=None if shifted is None else shifted.id,
                avoided_usd=avoided,
                outcome=outcome,
                hops=_hops_json(ctx.hops),
                reason=_reason(decision),
            ),
            ctx.hops,
        )

    def _exhausted(self, decision: Decision, ctx: RequestContext, call: Call) -> NoRoute:
        self._record(decision, ctx, None, (0, 0), 0.0, "error")
        summary = "; ".join(f"{h['candidate']}: {h['outcome']}" for h in ctx.hops[-5:])
        if ctx.hops and all(h["outcome"] == "budget" for h in ctx.hops):
            return NoRoute(
                "budget spent: paid providers are blocked and no local candidate can do "
                f"task={decision.dsn.task}",
                budget=True,
            )
        return NoRoute(f"every candidate failed ({summary})")

    # -- running -----------------------------------------------------------------

    async def complete(
        self,
        decision: Decision,
        call: Call,
        ctx: RequestContext,
        candidates: Iterator[Candidate] | None = None,
        attempts: int = 0,
    ) -> Answer:
        """The whole answer from the first candidate that gives one (of
        ``candidates`` when given, ``attempts`` already made). Raises
        NoRoute when all failed, ClientFault for the client's own mistake."""
        if candidates is None:
            candidates = self._candidates(decision, call, ctx)
        for candidate in candidates:
            if attempts >= self.routing.max_hops:
                break
            started = time.monotonic()
            reservation = await self._admit(decision, candidate, call, ctx)
            if reservation is None:
                continue
            attempts += 1
            try:
                backend: Backend = candidate.backend
                answer = await backend.complete(candidate, call)
            except UpstreamError as exc:
                await reservation.settle(0.0)
                self._failed(candidate, ctx, exc, (time.monotonic() - started) * 1000)
                continue
            except ClientFault:
                await reservation.settle(0.0)
                ctx.hops.append({"candidate": candidate.id, "outcome": "client_error", "ms": 0.0})
                self._record(decision, ctx, candidate, (0, 0), 0.0, "client_error")
                raise
            except BaseException:
                await reservation.settle(0.0)
                raise
            tokens = (answer.tokens_in, answer.tokens_out)
            await self._settle(decision, ctx, candidate, tokens, started, reservation)
            return answer
        raise self._exhausted(decision, ctx, call)

    async def _settle(
        self,
        decision: Decision,
        ctx: RequestContext,
        candidate: Candidate,
        tokens: tuple[int, int],
        started: float,
        reservation: Reservation,
        outcome: str = "ok",
    ) -> None:
        """Charge an answer's cost to its budget, then book it."""
        seconds = time.monotonic() - started
        cost = self.cost(candidate, *tokens, seconds)
        await reservation.settle(cost)
        self.book_answer(decision, ctx, candidate, tokens, cost, seconds, outcome)

    def book_answer(
        self,
        decision: Decision,
        ctx: RequestContext,
        candidate: Candidate,
        tokens: tuple[int, int],
        cost: float,
        seconds: float,
        outcome: str,
    ) -> None:
        """An answer's latency (when it succeeded), hop and ledger row; its
        cost is charged to the budget already."""
        if outcome == "ok":
            candidate.observe_latency(seconds * 1000)
            self.router.telemetry_changed()
            ctx.hops.append(
                {"candidate": candidate.id, "outcome": "ok", "ms": round(seconds * 1000, 3)}
            )
        self._record(decision, ctx, candidate, tokens, cost, outcome)

    def book_relayed(
        self,
        decision: Decision,
        app: str,
        candidate: Candidate,
        answers: Sequence[tuple[float, int, int]],
        request_ids: Callable[[], str],
    ) -> None:
        """Book answers the HTTP engine relayed whole by a fast-path route
        (``(seconds, tokens_in, tokens_out)`` each) as :meth:`book_answer`
        books one answered at the first try: its latency, one ``ok`` hop and
        a ledger row each. Together, as this runs for every request of the
        fast path: what is the same for all of them is worked out once."""
        cid, kind, model = candidate.id, candidate.kind, candidate.model
        provider = candidate.node if kind == PROVIDER else None
        task, reason = decision.dsn.task, _reason(decision)
        hop_json = f'[{{"candidate":{_JSON_STRING(cid)},"outcome":"ok","ms":'
        ts = time.time()
        entries: list[LedgerEntry] = []
        hops: list[tuple[Hop]] = []
        for seconds, tokens_in, tokens_out in answers:
            ms = round(seconds * 1000, 3)
            candidate.observe_latency(seconds * 1000)
            cost = self.cost(candidate, tokens_in, tokens_out, seconds)
            # Positional: with keywords, the entry costs three times as much.
            entry = LedgerEntry(
                ts, request_ids(), app, None, task, cid, kind, model, provider,
                tokens_in, tokens_out, cost, None, 0.0, "ok", f"{hop_json}{ms!r}}}]", reason,
            )  # fmt: skip
            entries.append(entry)
            hops.append(({"candidate": cid, "outcome": "ok", "ms": ms},))
        self.relayed += len(entries)
        self.router.telemetry_changed()
        self.ledger.record_many(entries, hops)

    def stream_broke(self, candidate: Candidate, ctx: RequestContext, reason: str) -> None:
        """A stream broke off after bytes reached the client."""
        self.router.cool_down(candidate, self.routing.cooldown_s)
        self.forget_fast_routes()
        ctx.hops.append({"candidate": candidate.id, "outcome": "stream_broken", "ms": 0.0})
        log.warning("request %s: stream from %s broke: %s", ctx.request_id, candidate.id, reason)

    async def stream(
        self,
        decision: Decision,
        call: Call,
        ctx: RequestContext,
        candidates: Iterator[Candidate] | None = None,
        attempts: int = 0,
    ) -> AsyncIterator[bytes]:
        """SSE events from the first candidate that starts answering (of
        ``candidates`` when given, ``attempts`` already made); a failure
        after that ends the stream with an error event."""
        if candidates is None:
            candidates = self._candidates(decision, call, ctx)
        for candidate in candidates:
            if attempts >= self.routing.max_hops:
                break
            started = time.monotonic()
            reservation = await self._admit(decision, candidate, call, ctx)
            if reservation is None:
                continue
            attempts += 1
            usage = Usage()
            streaming: Backend = candidate.backend
            events = streaming.stream(candidate, call, usage)
            sent = False
            outcome = "ok"
            tail: tuple[bytes, ...] = ()
            try:
                async for event in events:
                    sent = True
                    yield event
            except UpstreamError as exc:
                if not sent and exc.retryable:
                    await reservation.settle(0.0)
                    self._failed(candidate, ctx, exc, (time.monotonic() - started) * 1000)
                    continue
                outcome = "stream_broken"
                self.stream_broke(candidate, ctx, str(exc))
                message = f"the model's stream broke off: {exc}"
                tail = (error_event(message, code=outcome), DONE_EVENT)
            except ClientFault as fault:
                outcome = "client_error"
                message = fault.body[:500].decode("utf-8", "replace")
                tail = (error_event(message, kind="invalid_request_error"), DONE_EVENT)
            finally:
                await events.aclose()
                if not reservation.settled:
                    tokens = stream_tokens(call.tokens_in, usage)
                    await self._settle(
                        decision, ctx, candidate, tokens, started, reservation, outcome
                    )
            # Written to the ledger before the client hears how it ended.
            for event in tail:
                yield event
            return
        error = self._exhausted(decision, ctx, call)
        yield error_event(str(error), kind="server_error", code="no_route")
        yield DONE_EVENT

    # -- relayed by the HTTP engine ------------------------------------------

    async def relay(
        self,
        decision: Decision,
        call: Call,
        ctx: RequestContext,
        exchange: NativeExchange,
        in_python: PythonAnswer,
        install: InstallRoute | None = None,
    ) -> Response:
        """Run the call with the HTTP engine sending each attempt and
        relaying the answer: the same failover, budgets and ledger as
        :meth:`complete` and :meth:`stream`, without the answer's bytes
        passing through Python. A non-streamed answer reaches the client
        only once whole, so a failure before its end still moves the call
        on. From the first candidate the engine cannot reach (a skill, a
        daemon, a TLS or Anthropic provider) ``in_python`` answers."""
        candidates = self._candidates(decision, call, ctx)
        attempts = 0
        for candidate in candidates:
            if attempts >= self.routing.max_hops:
                break
            native = getattr(candidate.backend, "native_target", None)
            target: ProxyTarget | None = None if native is None else await native(candidate, call)
            if target is None:
                return await in_python(itertools.chain((candidate,), candidates), attempts)
            started = time.monotonic()
            reservation = await self._admit(decision, candidate, call, ctx)
            if reservation is None:
                continue
            attempts += 1
            headers = (
                _EVENT_STREAM_HEADERS
                if call.stream
                else b"x-qmesh-route: " + candidate.id.encode() + b"\r\n"
            )
            try:
                outcome = await exchange.proxy(
                    target,
                    headers,
                    first_byte_timeout_s=FIRST_BYTE_TIMEOUT_S,
                    chunk_timeout_s=CHUNK_TIMEOUT_S,
                    hold=not call.stream,
                )
            except BaseException:
                await reservation.settle(0.0)
                raise
            if outcome.kind != "relayed":
                await reservation.settle(0.0)
                error = (
                    UpstreamFailed(f"{target.who}: {outcome.reason}")
                    if outcome.kind == "failed"
                    else status_error(outcome.status, outcome.body, target.who)
                )
                if isinstance(error, ClientFault):
                    return self._client_fault(decision, ctx, candidate, call, error)
                self._failed(candidate, ctx, error, (time.monotonic() - started) * 1000)
                continue
            self.relayed += 1
            usage = Usage(outcome.tokens_in, outcome.tokens_out, outcome.bytes_out)
            if call.stream:
                await self._relayed_stream(
                    decision, ctx, candidate, call, usage, started, reservation, outcome, exchange
                )
            else:
                tokens = (usage.tokens_in or call.tokens_in, usage.tokens_out)
                await self._settle(decision, ctx, candidate, tokens, started, reservation)
                _release(exchange, outcome)
            if install is not None and self._may_skip_python(decision, ctx, candidate, outcome):
                install(candidate, target, headers)
                if exchange.routes is not None:
                    self.fast_routes.add(exchange.routes)
            return Response.already_relayed()
        error = self._exhausted(decision, ctx, call)
        if not call.stream:
            raise error
        return Response.event_stream(
            _events(error_event(str(error), kind="server_error", code="no_route"), DONE_EVENT)
        )

    def _may_skip_python(
        self,
        decision: Decision,
        ctx: RequestContext,
        candidate: Candidate,
        outcome: _core.HttpProxied,
    ) -> bool:
        """Whether requests like this one may take the fast path: its
        decision's first choice answered at the first try, whole, and
        nothing holds it to a budget (which must see each request before
        it runs) or to a ledger that cannot take more rows."""
        return (
            outcome.reason is None
            and len(ctx.hops) == 1
            and candidate is decision.chosen
            and ctx.budget is None
            and decision.shifted_from is None
            and not self.ledger.full
        )

    def _client_fault(
        self,
        decision: Decision,
        ctx: RequestContext,
        candidate: Candidate,
        call: Call,
        fault: ClientFault,
    ) -> Response:
        """The provider said the request itself is wrong: the client hears
        it as the provider put it (in a stream, as its one error event)."""
        ctx.hops.append({"candidate": candidate.id, "outcome": "client_error", "ms": 0.0})
        self._record(decision, ctx, candidate, (0, 0), 0.0, "client_error")
        if not call.stream:
            return Response(fault.status, fault.body, _JSON)
        message = fault.body[:500].decode("utf-8", "replace")
        event = error_event(message, kind="invalid_request_error")
        return Response.event_stream(_events(event, DONE_EVENT))

    async def _relayed_stream(
        self,
        decision: Decision,
        ctx: RequestContext,
        candidate: Candidate,
        call: Call,
        usage: Usage,
        started: float,
        reservation: Reservation,
        outcome: _core.HttpProxied,
        exchange: NativeExchange,
    ) -> None:
        """Settle a stream the engine relayed; one that broke off is ended
        with an error event once the ledger has it, as :meth:`stream` does."""
        reason = outcome.reason
        if reason is None or outcome.client_gone:
            tokens = stream_tokens(call.tokens_in, usage)
            await self._settle(decision, ctx, candidate, tokens, started, reservation)
            _release(exchange, outcome)
            return
        self.stream_broke(candidate, ctx, reason)
        tokens = stream_tokens(call.tokens_in, usage)
        await self._settle(decision, ctx, candidate, tokens, started, reservation, "stream_broken")
        if outcome.open:
            tail = error_event(f"the model's stream broke off: {reason}", code="stream_broken")
            try:
                await exchange.write(tail, CHUNK_TIMEOUT_S)
                await exchange.write(DONE_EVENT, CHUNK_TIMEOUT_S)
                exchange.finish()
            except ClientGone:
                pass
