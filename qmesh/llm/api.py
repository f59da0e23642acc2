"""The Gate's OpenAI-compatible API and the qg API, over :mod:`qmesh.web.http`.

For: ``POST /v1/chat/completions`` (SSE when ``stream`` is true),
``POST /v1/completions``, ``POST /v1/embeddings``, ``GET /v1/models`` —
where ``model`` is a ``qg://`` DSN or a concrete model id — and
``POST /qg/v1/route`` (the router's explanation as JSON: the decision
serving would make now, budget and cool-downs included, without making it),
``GET /qg/v1/skills``, ``GET /qg/v1/budgets``, ``GET /qg/v1/decisions``.
Each request: authenticate the app key, read ``model``, parse the DSN,
find the budget, decide, run with failover, answer. Errors are OpenAI-style
bodies: 400 for a bad DSN or body (naming the problem), 401 for a bad app
key, 402 when a spent budget blocks the only candidates, 404 for an
unknown model, 503 when nothing can serve now.

Not for: deciding (:mod:`qmesh.qg.router`) or running
(:mod:`qmesh.llm.executor`); this module only translates HTTP to those.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator
from typing import Any, Final

import attrs

from qmesh.config import PRIVACY_FLOORS, LlmPolicyConfig
from qmesh.finops.budgets import Budget
from qmesh.llm.backends import ClientFault
from qmesh.llm.calls import Call, estimate_call_tokens
from qmesh.llm.executor import RequestContext
from qmesh.llm.fastpath import route_installer
from qmesh.llm.limits import TooLarge
from qmesh.llm.retention import answer_text, collect_stream, kept_record, prompt_text
from qmesh.llm.service import LlmService
from qmesh.operator_roles import Right
from qmesh.qg.admission import AppRules
from qmesh.qg.candidates import Candidate
from qmesh.qg.dsn import Dsn, is_dsn, parse_dsn
from qmesh.qg.errors import BudgetBlocked, DsnError, NoRoute, PolicyBlocked
from qmesh.qg.router import BUDGET_OK, Decision
from qmesh.web.auth import AppAuthenticator
from qmesh.web.http import HttpError, Request, Response, Router

__all__ = ["add_llm_routes"]

DEFAULT_MAX_TOKENS: Final = 512
"""The completion ceiling assumed for cost reservation when a request sets none."""
_JSON: Final = (("content-type", "application/json"),)
_ENDPOINT_TASKS: Final = {"chat": "chat", "completions": "chat", "embeddings": "embed"}
_REQUEST_KEYS: Final = ("messages", "prompt")
"""A ``POST /qg/v1/route`` body with one of these is a request to explain as sent."""

MAX_TOKEN_COUNT: Final = 100_000_000
"""Largest token count a request may name: far above any model's context,
and small enough that prices and budgets stay exact (an unbounded integer
from a client would overflow their float arithmetic)."""


def _max_tokens(body: dict[str, Any]) -> Any:
    """The completion ceiling a request body names (unchecked), or the default."""
    return body.get("max_tokens") or body.get("max_completion_tokens") or DEFAULT_MAX_TOKENS


def _token_count(value: object, *, least: int) -> bool:
    return (
        isinstance(value, int) and not isinstance(value, bool) and least <= value <= MAX_TOKEN_COUNT
    )


def _bounded(app: str, dsn: Dsn, policy: LlmPolicyConfig) -> Dsn:
    """``dsn`` as ``app``'s policy lets it ask: its task allowed, its
    privacy raised to the policy's floor."""
    if policy.tasks is not None and dsn.task not in policy.tasks:
        raise HttpError(
            403,
            f"app policy of {app!r} allows tasks {list(policy.tasks)}: not {dsn.task!r}",
            kind="permission_error", code="policy_forbids",
        )  # fmt: skip
    if PRIVACY_FLOORS.index(policy.privacy) > PRIVACY_FLOORS.index(dsn.privacy):
        dsn = attrs.evolve(dsn, privacy=policy.privacy)
    return dsn


def _cap_max_tokens(app: str, body: dict[str, Any], cap: int) -> bytes | None:
    """Hold a request to ``app``'s ``max_tokens`` cap: one that asks for more
    is refused; one that names none gets the cap (the new body to send, so
    the model stops there too)."""
    asked = body.get("max_tokens") or body.get("max_completion_tokens")
    if asked is None:
        body["max_tokens"] = cap
        return json.dumps(body).encode()
    if isinstance(asked, int) and not isinstance(asked, bool) and asked > cap:
        raise HttpError(
            400, f"max_tokens {asked} is over the app policy's cap of {cap} for {app!r}",
            param="max_tokens", code="policy_forbids",
        )  # fmt: skip
    return None


def _rules(app: str, policy: LlmPolicyConfig) -> AppRules | None:
    if policy.models is None and policy.providers is None:
        return None
    return AppRules(app, models=policy.models, providers=policy.providers)


def _no_route(exc: NoRoute) -> HttpError:
    if isinstance(exc, PolicyBlocked):
        return HttpError(403, str(exc), kind="permission_error", code="policy_forbids")
    if exc.budget or isinstance(exc, BudgetBlocked):
        return HttpError(402, str(exc), kind="insufficient_quota", code="budget_exceeded")
    return HttpError(503, str(exc), kind="server_error", code="no_route")


class LlmApi:
    def __init__(self, service: LlmService, auth: AppAuthenticator) -> None:
        self.service = service
        self.auth = auth
        # A revoked or rotated key must not keep its fast-path routes.
        auth.on_keys_dropped.append(service.executor.forget_fast_routes)
        self.router = service.router
        # Request ids: a random prefix per process and a counter, unique
        # across Gates without a system call per request.
        self._id_prefix = os.urandom(4).hex()
        self._ids = itertools.count(1)

    def _request_id(self) -> str:
        return f"{self._id_prefix}{next(self._ids):08x}"

    # -- shared steps --------------------------------------------------------------

    def _dsn_for(self, model: object, endpoint: str) -> tuple[Dsn, str | None]:
        """The DSN to route and the model pin, from a request's ``model``."""
        self.service.sync_inventory()
        if not isinstance(model, str) or not model:
            raise HttpError(400, "'model' is required: a model id or a qg:// DSN", param="model")
        if is_dsn(model):
            try:
                dsn = parse_dsn(model, tasks=self.service.tasks)
            except DsnError as exc:
                raise HttpError(400, str(exc), param="model", code="invalid_dsn") from None
            if endpoint == "embeddings" and dsn.task != "embed":
                raise HttpError(
                    400,
                    f"/v1/embeddings needs task=embed in the DSN, got task={dsn.task}",
                    param="model",
                    code="invalid_dsn",
                )
            return dsn, None
        pin = self.router.resolve_model(model)
        if pin is None:
            raise HttpError(
                404,
                f"the model {model!r} does not exist here (see GET /v1/models, or use a "
                "qg:// DSN such as qg://task=chat)",
                param="model",
                code="model_not_found",
            )
        task = _ENDPOINT_TASKS[endpoint]
        candidate = self.router.first_for_model(model)
        if candidate is not None and task not in candidate.tasks:
            task = min(candidate.tasks)  # a skill's model: its own task
        return Dsn(task=task), pin

    def _budget(self, app: str, dsn: Dsn, param: str) -> Budget | None:
        """The budget that pays for ``app``'s request for ``dsn``."""
        try:
            return self.service.book.for_app(app, dsn.budget)
        except KeyError:
            raise HttpError(400, f"unknown budget {dsn.budget!r}", param=param) from None
        except PermissionError as exc:
            raise HttpError(403, str(exc), kind="permission_error") from None

    async def _route(
        self, request: Request, endpoint: str
    ) -> tuple[Decision, Call, RequestContext]:
        app = await self.auth.require(request)
        if self.service.ledger.full:
            # Every request is accounted for, or not served: the books
            # cannot be written (the state's database is away) and the rows
            # waiting for it are as many as a Gate keeps.
            raise HttpError(
                503, "the gate cannot write its ledger now; retry later",
                kind="server_error", code="ledger_unavailable", headers=(("retry-after", "5"),),
            )  # fmt: skip
        body = request.json()
        if not isinstance(body, dict):
            raise HttpError(400, "the request body must be a JSON object")
        policy = self.service.llm_policy(app)
        dsn, pin = self._dsn_for(body.get("model"), endpoint)
        dsn = _bounded(app, dsn, policy)
        raw = request.body
        if policy.max_tokens is not None and endpoint != "embeddings":
            raw = _cap_max_tokens(app, body, policy.max_tokens) or raw
        max_tokens = _max_tokens(body)
        if not _token_count(max_tokens, least=1):
            raise HttpError(
                400,
                f"'max_tokens' must be an integer from 1 to {MAX_TOKEN_COUNT}",
                param="max_tokens",
            )
        if endpoint == "embeddings":
            max_tokens = 0
        stream = bool(body.get("stream")) and endpoint != "embeddings"
        # Token estimate from the raw size: walking the messages here would
        # cost more than it would tell (see estimate_call_tokens).
        tokens_in = estimate_call_tokens(raw)
        try:
            limited = self.service.rate_limits.take(
                app, tokens_in + max_tokens,
                requests_per_minute=policy.requests_per_minute,
                tokens_per_minute=policy.tokens_per_minute,
            )  # fmt: skip
        except TooLarge as exc:
            raise HttpError(400, str(exc), param="max_tokens", code="policy_forbids") from None
        if limited is not None:
            raise HttpError(
                429, f"app {app!r} is over its limit of {limited.reason} at this gate (app "
                f"policy); retry in {limited.retry_after_s:.1f} s",
                kind="rate_limit_error", code="rate_limit_exceeded", headers=limited.headers,
            )  # fmt: skip
        budget = self._budget(app, dsn, "model")
        snapshot = self.service.book.snapshot(budget)
        try:
            decision = self.router.decide(
                dsn, model=pin, tokens_in=tokens_in, tokens_out=max_tokens, budget=snapshot,
                rules=_rules(app, policy),
            )  # fmt: skip
        except NoRoute as exc:
            raise _no_route(exc) from None
        state = BUDGET_OK if snapshot is None else snapshot.state
        request_id = self._request_id()
        call = Call(
            endpoint=endpoint,
            body=body,
            raw=raw,
            stream=stream,
            request_id=request_id,
            tokens_in=tokens_in,
            max_tokens=max_tokens,
        )
        return decision, call, RequestContext(app, request_id, budget, state)

    async def _serve(self, request: Request, endpoint: str) -> Response:
        decision, call, ctx = await self._route(request, endpoint)
        executor = self.service.executor
        native = request.native
        if native is not None:
            ctx.hops.extend(native.earlier_hops)  # its attempts on the fast path

        keep = self.service.llm_policy(ctx.app).keep

        def kept(answer: str) -> None:
            prompt = prompt_text(call.body)
            self.service.ledger.keep(kept_record(keep, ctx.request_id, ctx.app, prompt, answer))

        async def in_python(candidates: Iterator[Candidate] | None, attempts: int) -> Response:
            if call.stream:
                events = executor.stream(decision, call, ctx, candidates, attempts)
                if keep != "nothing":
                    events = collect_stream(events, kept)
                return Response.event_stream(events)
            try:
                answer = await executor.complete(decision, call, ctx, candidates, attempts)
            except NoRoute as exc:
                raise _no_route(exc) from None
            except ClientFault as fault:
                return Response(fault.status, fault.body, _JSON)
            if keep != "nothing":
                kept(answer_text(answer.body))
            headers = (*_JSON, ("x-qmesh-route", str(ctx.hops[-1]["candidate"])))
            return Response(200, answer.body, headers)

        if native is None or keep != "nothing":
            # An answer the ledger keeps is read here, not relayed unread.
            return await in_python(None, 0)
        if self.service.llm_policy(ctx.app).restricts:
            # Rate limits and caps are judged per request, in Python: no
            # route for the engine to answer this app's next requests by.
            return await executor.relay(decision, call, ctx, native, in_python)
        install = route_installer(
            executor, native, decision, ctx, call,
            authorization=request.headers.get("authorization", ""), path=request.path,
            max_in_flight=self.auth.limits.max_requests_per_app, request_ids=self._request_id,
        )  # fmt: skip
        try:
            return await executor.relay(decision, call, ctx, native, in_python, install)
        except NoRoute as exc:
            raise _no_route(exc) from None

    # -- handlers ----------------------------------------------------------------------

    async def chat(self, request: Request) -> Response:
        return await self._serve(request, "chat")

    async def completions(self, request: Request) -> Response:
        return await self._serve(request, "completions")

    async def embeddings(self, request: Request) -> Response:
        return await self._serve(request, "embeddings")

    async def models(self, request: Request) -> Response:
        await self.auth.require(request)
        self.service.sync_inventory()
        data = [
            {
                "id": c.model,
                "object": "model",
                "created": 0,
                "owned_by": "qmesh" if c.kind == "internal" else (c.node or c.kind),
                "qmesh": {"kind": c.kind, "tasks": sorted(c.tasks), "context": c.context},
            }
            for c in self.router.models()
        ]
        return Response.json({"object": "list", "data": data})

    async def route(self, request: Request) -> Response:
        app = await self.auth.require(request)
        body = request.json()
        if not isinstance(body, dict):
            raise HttpError(400, "the request body must be a JSON object")
        text = body.get("dsn", body.get("model"))
        policy = self.service.llm_policy(app)
        dsn, pin = self._dsn_for(text, "chat")
        dsn = _bounded(app, dsn, policy)
        if "tokens_in" not in body and any(k in body for k in _REQUEST_KEYS):
            # A chat request's own body: sized as serving it would size it.
            tokens_in = estimate_call_tokens(request.body)
            max_tokens = _max_tokens(body)
        else:
            tokens_in = body.get("tokens_in", 1000)
            max_tokens = body.get("max_tokens", 256)
        if not (_token_count(tokens_in, least=0) and _token_count(max_tokens, least=0)):
            raise HttpError(
                400, f"'tokens_in' and 'max_tokens' must be integers from 0 to {MAX_TOKEN_COUNT}"
            )
        budget = self._budget(app, dsn, "dsn")
        # The decision serving would make, with the budget as it stands:
        # read, nothing reserved, nothing recorded.
        explanation = self.router.explain(
            dsn,
            model=pin,
            tokens_in=tokens_in,
            tokens_out=max_tokens,
            budget=self.service.book.snapshot(budget),
            rules=_rules(app, policy),
        )
        return Response.json(explanation.as_dict())

    async def skills(self, request: Request) -> Response:
        await self.auth.require(request)
        return Response.json({"skills": self.service.skill_view()})

    async def budgets(self, request: Request) -> Response:
        app = await self.auth.require(request, Right.USE, Right.VIEW)
        views = self.service.book.views()
        if not await self.auth.holds(request, Right.VIEW):
            views = [v for v in views if app in v["apps"]]  # type: ignore[operator]
        return Response.json({"budgets": views})

    async def decisions(self, request: Request) -> Response:
        await self.auth.require(request, Right.VIEW)
        limit = int((request.query.get("limit") or ["50"])[0])
        recent = list(self.router.recent)[-max(1, min(limit, 1000)) :]
        return Response.json({"decisions": [d.as_dict() for d in recent]})


def add_llm_routes(router: Router, service: LlmService, auth: AppAuthenticator) -> LlmApi:
    api = LlmApi(service, auth)
    router.backlog = service.ledger.backlog
    router.add("POST", "/v1/chat/completions", api.chat)
    router.add("POST", "/v1/completions", api.completions)
    router.add("POST", "/v1/embeddings", api.embeddings)
    router.add("GET", "/v1/models", api.models)
    router.add("POST", "/qg/v1/route", api.route)
    router.add("GET", "/qg/v1/skills", api.skills)
    router.add("GET", "/qg/v1/budgets", api.budgets)
    router.add("GET", "/qg/v1/decisions", api.decisions)
    return api
