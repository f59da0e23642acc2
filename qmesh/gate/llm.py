"""The Gate's capability service: skills, providers, router, budgets, ledger.

For: building everything the qg:// path needs from the configuration once
at start-up (:class:`LlmService`) — the built-in skills with their measured
capacity, a candidate per provider model, the router, the pooled upstream
client, the budget book seeded from the ledger — and running its background
work (:meth:`LlmService.run`: the ledger writer, and folding the daemons'
inventory into the router when the daemons' side provides one).

Not for: HTTP handlers (:mod:`qmesh.gate.llm_api`) or execution
(:mod:`qmesh.gate.liquify`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Final

import trio

from qmesh.config import Config
from qmesh.finops.budgets import BudgetBook
from qmesh.finops.ledger import Ledger, spent_since
from qmesh.gate.backends import SkillBackend
from qmesh.gate.liquify import Executor
from qmesh.gate.provider_keys import resolve_api_key
from qmesh.gate.providers import AnthropicProvider, OpenAIProvider
from qmesh.nlp.skills import builtin_skills, measure
from qmesh.pg.masterkey import load_master_key
from qmesh.qg.candidates import INTERNAL, PROVIDER, Candidate
from qmesh.qg.dsn import BUILTIN_TASKS
from qmesh.qg.router import TYPICAL_IN, TYPICAL_OUT, Router
from qmesh.state import StateStore
from qmesh.web.pool import HttpPool, parse_url

__all__ = ["LlmService"]

log = logging.getLogger(__name__)

JOULES_PER_KWH: Final = 3_600_000.0
SKILL_CONTEXT: Final = 1_000_000


class LlmService:
    def __init__(
        self,
        config: Config,
        store: StateStore,
        *,
        master_key: bytes | None = None,
        env: Mapping[str, str] | None = None,
        measure_skills: bool = True,
    ) -> None:
        self.config = config
        self.store = store
        routing = config.gate.routing
        self.tasks: tuple[str, ...] = (*BUILTIN_TASKS, *routing.extra_tasks)
        self.skills = builtin_skills()
        if measure_skills:
            measure(self.skills)
        self.skill_backend = SkillBackend(self.skills)
        self.pool = HttpPool()
        self.router = Router()
        self.book = BudgetBook(config.gate.budgets)
        self.ledger = Ledger(store)
        self.executor = Executor(self.router, self.book, self.ledger, routing)
        self._equivalence = {
            model: group for group, models in routing.equivalences.items() for model in models
        }
        self.router.set_candidates("skills", self._skill_candidates())
        self.router.set_candidates("providers", self._provider_candidates(master_key, env))

    @classmethod
    def from_config(cls, config: Config, store: StateStore) -> LlmService:
        """As the Gate builds it: the vault's master key is read only when a
        provider's key is in the store."""
        master_key = None
        if any((p.api_key or "").startswith("store:") for p in config.gate.providers):
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
        self, master_key: bytes | None, env: Mapping[str, str] | None
    ) -> list[Candidate]:
        out = []
        for provider in self.config.gate.providers:
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
        """Seed the budgets from the ledger, then write the ledger until cancelled."""
        for budget in self.book.budgets.values():
            spent = await trio.to_thread.run_sync(spent_since, self.store, budget.period_start)
            self.book.seed({budget.name: spent.get(budget.name, 0.0)})
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.ledger.run)
                for line in (s.describe() for s in self.skills.values()):
                    log.info("skill %s", line)
                task_status.started()
        finally:
            with trio.CancelScope(shield=True):
                await self.pool.aclose()
