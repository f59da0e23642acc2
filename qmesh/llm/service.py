"""The Gate's capability service: skills, providers, router, budgets, ledger.

For: building everything the qg:// path needs from the configuration once
at start-up (:class:`LlmService`) — the built-in skills with their measured
capacity, a candidate per provider model, the router, the pooled upstream
client, the budget book seeded from the ledger — and running its background
work (:meth:`LlmService.run`: the ledger writer, and folding the daemons'
inventory into the router: a candidate per model per node, rebuilt when
nodes or models come and go, updated in place when only their load moves);
and in-process model calls for the Gate's own features
(:meth:`LlmService.complete_text`, used by the graph memory).

Not for: HTTP handlers (:mod:`qmesh.llm.api`) or execution
(:mod:`qmesh.llm.executor`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from typing import Any, Final

import trio

from qmesh.config import Config, LlmPolicyConfig
from qmesh.finops.budgets import BudgetBook
from qmesh.finops.ledger import Ledger, spent_since
from qmesh.finops.totals import BudgetTotals
from qmesh.fleet.daemons import DaemonClient
from qmesh.fleet.inventory import Inventory
from qmesh.llm.backends import ClientFault, SkillBackend
from qmesh.llm.calls import Call, estimate_call_tokens
from qmesh.llm.daemon_backend import DaemonBackend, daemon_candidates, refresh_load
from qmesh.llm.executor import Executor, RequestContext
from qmesh.llm.limits import AppRateLimits
from qmesh.llm.provider_keys import resolve_api_key
from qmesh.llm.providers import AnthropicProvider, OpenAIProvider
from qmesh.masterkey import load_master_key
from qmesh.memory.errors import GraphMemoryError
from qmesh.memory.llm import LlmUnavailable
from qmesh.memory.records import SHARED_ONLY
from qmesh.memory.service import Memory
from qmesh.nlp.skills import Skill, builtin_skills, measure
from qmesh.pg.policy import PolicyBook
from qmesh.qg.candidates import INTERNAL, PROVIDER, Candidate
from qmesh.qg.dsn import BUILTIN_TASKS, parse_dsn
from qmesh.qg.errors import DsnError, NoRoute
from qmesh.qg.router import BUDGET_OK, TYPICAL_IN, TYPICAL_OUT, Router
from qmesh.state import StateStore
from qmesh.web.pool import HttpPool, parse_url

__all__ = ["LlmService"]

log = logging.getLogger(__name__)

JOULES_PER_KWH: Final = 3_600_000.0
SKILL_CONTEXT: Final = 1_000_000
INVENTORY_POLL_S: Final = 0.2
"""How often the router's daemon candidates catch up with the inventory."""


class LlmService:
    def __init__(
        self,
        config: Config,
        store: StateStore,
        *,
        master_key: bytes | None = None,
        env: Mapping[str, str] | None = None,
        measure_skills: bool = True,
        resolve_keys: bool = True,
    ) -> None:
        self.config = config
        self.store = store
        self.master_key = master_key
        """The vault's, when it was needed (PostgreSQL's state, stored provider keys)."""
        routing = config.gate.routing
        self.tasks: tuple[str, ...] = (*BUILTIN_TASKS, *routing.extra_tasks)
        self.skills = builtin_skills()
        if measure_skills:
            measure(self.skills)
        self.skill_backend = SkillBackend(self.skills)
        self.pool = HttpPool()
        self.router = Router()
        self.book = BudgetBook(config.gate.budgets, totals=BudgetTotals(store))
        self.ledger = Ledger(store, master_key=master_key)
        self.executor = Executor(self.router, self.book, self.ledger, routing)
        self.policies = PolicyBook(config)
        """Each app's policy (its ``llm`` part here), from the config and the state."""
        self.policies.load(store)
        self.rate_limits = AppRateLimits()
        self._equivalence = {
            model: group for group, models in routing.equivalences.items() for model in models
        }
        self.router.set_candidates("skills", self._skill_candidates())
        self.router.set_candidates(
            "providers", self._provider_candidates(master_key, env, resolve_keys=resolve_keys)
        )
        self.inventory: Inventory | None = None
        self.daemon_backend: DaemonBackend | None = None
        self._daemon_candidates: list[Candidate] = []
        self._daemon_shape: tuple[object, ...] = ()
        self._inventory_seen = -1
        self._models_seen = -1

    @classmethod
    def from_config(cls, config: Config, store: StateStore) -> LlmService:
        """As the Gate builds it: the vault's master key is read only when a
        provider's key is in the store, or the state is on PostgreSQL."""
        master_key = None
        if store.dialect != "sqlite" or any(
            (p.api_key or "").startswith("store:") for p in config.gate.providers
        ):
            # On PostgreSQL the ledger's chain key is sealed with it too.
            master_key = load_master_key(config)
        return cls(config, store, master_key=master_key)

    # -- candidates ------------------------------------------------------------

    def equivalence_of(self, model: str, family: str | None, size_class: str | None) -> str | None:
        group = self._equivalence.get(model)
        if group is not None:
            return group
        if family and size_class:
            return f"{family}:{size_class}"
        return None

    def _skill_candidates(self) -> list[Candidate]:
        routing = self.config.gate.routing
        out = []
        for task, skill in self.skills.items():
            seconds = 1.0 / skill.capacity if skill.capacity > 0 else 0.001
            joules = routing.gate_cpu_watts * seconds
            per_request = joules / JOULES_PER_KWH * routing.electricity_usd_per_kwh
            out.append(
                Candidate(
                    id=f"skill:{task}",
                    kind=INTERNAL,
                    model=skill.model,
                    tasks=frozenset({task}),
                    local=True,
                    private=True,
                    context=SKILL_CONTEXT,
                    local_rate=per_request / (TYPICAL_IN + TYPICAL_OUT) * 1e6,
                    power_w=routing.gate_cpu_watts,
                    quality=0,
                    latency_ms=skill.latency_ms,
                    tokens_per_s=skill.capacity * TYPICAL_OUT,
                    backend=self.skill_backend,
                )
            )
        return out

    def _provider_candidates(
        self, master_key: bytes | None, env: Mapping[str, str] | None, *, resolve_keys: bool
    ) -> list[Candidate]:
        out = []
        for provider in self.config.gate.providers:
            api_key = None
            if resolve_keys:
                api_key = resolve_api_key(provider.api_key, self.store, master_key, env)
            upstream = parse_url(provider.base_url)
            cls = AnthropicProvider if provider.kind == "anthropic" else OpenAIProvider
            backend = cls(provider.name, self.pool, upstream, api_key)
            for model in provider.models:
                out.append(
                    Candidate(
                        id=f"provider:{provider.name}/{model.id}",
                        kind=PROVIDER,
                        model=model.id,
                        upstream_model=model.upstream or model.id,
                        tasks=frozenset(model.tasks),
                        family=model.family,
                        size_class=model.size_class,
                        equivalence=self.equivalence_of(model.id, model.family, model.size_class),
                        node=f"provider:{provider.name}",
                        local=False,
                        private=provider.private,
                        context=model.context,
                        price_in=model.price_in,
                        price_out=model.price_out,
                        quality=model.quality,
                        latency_ms=model.latency_ms,
                        backend=backend,
                    )
                )
        return out

    def attach_memory(self, memory: Memory) -> None:
        """Answer ``task=memory_query`` from the graph memory: the question is
        the last user message; the answer quotes stored sentences and lists
        the numbered citations, or says it is not in memory. A skill is not
        told which app calls it, so it reads only the documents shared with
        every app."""

        def answer(question: str) -> str:
            try:
                found = memory.ask(question, access=SHARED_ONLY)
            except GraphMemoryError as exc:
                return f"cannot ask the memory: {exc}"
            lines = [found.answer]
            if found.citations:
                lines.append("")
                lines += [
                    f"[{c.n}] {c.document_title or c.document_id}: {c.text}"
                    for c in found.citations
                ]
            return "\n".join(lines)

        skill = Skill("memory_query", "qmesh-memory", answer, blocking=True)
        self.skills["memory_query"] = skill
        self.router.set_candidates("skills", self._skill_candidates())

    async def complete_text(
        self, app: str, dsn_text: str, system: str, user: str, *, max_tokens: int = 1024
    ) -> str:
        """The reply text of one chat call routed in-process by ``dsn_text``
        (no HTTP), charged to ``app``'s budget and written to the ledger like
        any other request. Raises :class:`LlmUnavailable` when no model
        answered; an internal skill's answer does not count (a rule-based
        skill is not the model the caller asked for)."""
        try:
            dsn = parse_dsn(dsn_text, tasks=self.tasks)
            budget = self.book.for_app(app, dsn.budget)
        except (DsnError, KeyError, PermissionError) as exc:
            raise LlmUnavailable(f"cannot route {dsn_text}: {exc}") from None
        snapshot = self.book.snapshot(budget)
        body = {
            "model": dsn_text,
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": user},
            ],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        raw = json.dumps(body).encode()
        tokens_in = estimate_call_tokens(raw)
        self.sync_inventory()
        try:
            decision = self.router.decide(
                dsn, tokens_in=tokens_in, tokens_out=max_tokens, budget=snapshot
            )
            request_id = os.urandom(8).hex()
            call = Call("chat", body, raw, False, request_id, tokens_in, max_tokens)
            state = BUDGET_OK if snapshot is None else snapshot.state
            ctx = RequestContext(app, request_id, budget, state)
            answer = await self.executor.complete(decision, call, ctx)
        except (NoRoute, ClientFault) as exc:
            raise LlmUnavailable(f"no model answered {dsn_text}: {exc}") from None
        if str(ctx.hops[-1]["candidate"]).startswith("skill:"):
            raise LlmUnavailable(f"{dsn_text} was answered by a built-in skill, not a model")
        try:
            content = json.loads(answer.body)["choices"][0]["message"]["content"]
        except (ValueError, LookupError, TypeError):
            raise LlmUnavailable(
                f"the model's reply to {dsn_text} is not a chat completion"
            ) from None
        if not isinstance(content, str):
            raise LlmUnavailable(f"the model's reply to {dsn_text} has no text")
        return content

    def attach_daemons(self, inventory: Inventory, client: DaemonClient) -> None:
        """Route to the daemons' models too: :meth:`run` then follows the
        inventory and keeps a candidate per (node, model) up to date."""
        self.inventory = inventory
        self.daemon_backend = DaemonBackend(client)

    def llm_policy(self, app: str) -> LlmPolicyConfig:
        """What ``app`` may do through the LLM API (no restriction without a policy)."""
        settings = self.policies.settings(app)
        return LlmPolicyConfig() if settings is None else settings.llm

    async def reload_policies(self) -> None:
        """After a change to the state: read the stored policies again; routes
        the fast path learnt are forgotten, so the next request of every app
        is judged by its policy as it now stands."""
        await trio.to_thread.run_sync(self.policies.load, self.store)
        self.executor.forget_fast_routes()
        self.rate_limits.forget(lambda app: self.llm_policy(app).restricts)

    def sync_inventory(self, *, load: bool = False) -> None:
        """Bring the router up to date with the inventory, if it changed.

        Before each decision (``load=False``) only a change of which models
        exist and may be used counts — an operator's ``qmesh models stop``
        holds for the very next request, while heartbeats' load figures wait
        for the poll every ``INVENTORY_POLL_S`` (``load=True``)."""
        inventory = self.inventory
        if inventory is None:
            return
        seen = inventory.version if load else inventory.models_version
        if seen != (self._inventory_seen if load else self._models_seen):
            self._inventory_seen, self._models_seen = inventory.version, inventory.models_version
            self._sync_daemons()

    def _sync_daemons(self) -> None:
        inventory = self.inventory
        if inventory is None or self.daemon_backend is None:
            return
        nodes = inventory.nodes(now=time.time(), kind="daemon")
        shape = tuple(
            (n.name, n.state, tuple(sorted((m.id, m.state, m.stopped) for m in n.models.values())))
            for n in nodes
        )
        if shape == self._daemon_shape:
            # Only the load moved (a heartbeat): update in place, no rebuild.
            refresh_load(self._daemon_candidates, {n.name: n for n in nodes})
        else:
            previous = {c.id: c for c in self._daemon_candidates}
            self._daemon_candidates = daemon_candidates(
                nodes,
                self.daemon_backend,
                equivalences=self._equivalence,
                previous=previous,
                extra_tasks=self.config.gate.routing.extra_tasks,
            )
            self.router.set_candidates("daemons", self._daemon_candidates)
            self._daemon_shape = shape
        self.router.telemetry_changed()

    async def _follow_inventory(self) -> None:
        while True:
            self.sync_inventory(load=True)
            await trio.sleep(INVENTORY_POLL_S)

    def skill_view(self) -> list[dict[str, Any]]:
        return [
            {
                "task": skill.task,
                "model": skill.model,
                "capacity_per_s": round(skill.capacity, 1),
                "advertised": skill.describe(),
            }
            for skill in self.skills.values()
        ]

    # -- running -------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Seed the budgets' shared totals from the ledger (unless a Gate
        already did this period), then write the ledger and keep the totals
        in step until cancelled."""
        for budget in self.book.budgets.values():
            spent = await trio.to_thread.run_sync(spent_since, self.store, budget.period_start)
            await self.book.seed_shared(budget, spent.get(budget.name, 0.0))
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.ledger.run)
                nursery.start_soon(self.book.sync_forever)
                nursery.start_soon(self._follow_inventory)
                for line in (s.describe() for s in self.skills.values()):
                    log.info("skill %s", line)
                task_status.started()
        finally:
            with trio.CancelScope(shield=True):
                await self.pool.aclose()
