"""Reading and checking the qg:// router's tables under ``[gate]``.

For: ``[gate.routing]``, ``[[gate.providers]]`` with their
``[[gate.providers.models]]``, and ``[[gate.budgets]]``: names used once,
provider URLs, model ids and task names, and API keys given only as a
reference (``store:NAME`` or ``env:VAR``), never as the key itself.

Not for: routing or spending (:mod:`qmesh.llm`, :mod:`qmesh.finops`), or
what the fields mean (:mod:`qmesh.config.gate_schema`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final

from qmesh.config.gate_schema import (
    BudgetConfig,
    ProviderConfig,
    ProviderModelConfig,
    RoutingConfig,
)
from qmesh.config.reader import (
    APP_ID_RE,
    GATE_NAME_RE,
    Reader,
    describe,
    field_names,
    require_key,
    string_array,
    table_at,
    table_paths,
    unique_name,
)
from qmesh.config.toml_lines import KeyPath

__all__ = ["read_budgets", "read_providers", "read_routing"]

_PROVIDER_KINDS: Final = ("openai", "anthropic")
_SIZE_CLASSES: Final = ("xs", "s", "m", "l", "xl")
_BUDGET_PERIODS: Final = ("day", "month")
_BUDGET_MODES: Final = ("hard", "soft")
_MODEL_ID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}")
_TASK_NAME_RE: Final = re.compile(r"[a-z][a-z0-9_]{0,63}")


def read_routing(r: Reader, gate: Mapping[str, object], gate_path: KeyPath) -> RoutingConfig:
    path: KeyPath = (*gate_path, "routing")
    t = r.table(gate, path)
    r.check_keys(t, path, field_names(RoutingConfig))
    d = RoutingConfig()
    groups: dict[str, tuple[str, ...]] = {}
    table = r.table(t, (*path, "equivalences"))
    for name in table:
        groups[name] = string_array(
            table, (*path, "equivalences"), name, (), _MODEL_ID_RE, "model id", r=r
        )
    local_rate = None
    if "local_rate_usd_per_1m" in t:
        local_rate = r.number(t, path, "local_rate_usd_per_1m", 0.0, positive=False)
    return RoutingConfig(
        extra_tasks=string_array(t, path, "extra_tasks", (), _TASK_NAME_RE, "task name", r=r),
        cooldown_s=r.number(t, path, "cooldown_s", d.cooldown_s, positive=False),
        max_hops=r.integer(t, path, "max_hops", d.max_hops, lo=1, hi=64),
        electricity_usd_per_kwh=r.number(
            t, path, "electricity_usd_per_kwh", d.electricity_usd_per_kwh, positive=False
        ),
        gate_cpu_watts=r.number(t, path, "gate_cpu_watts", d.gate_cpu_watts, positive=False),
        local_rate_usd_per_1m=local_rate,
        equivalences=groups,
    )


def read_providers(
    r: Reader, gate: Mapping[str, object], gate_path: KeyPath
) -> tuple[ProviderConfig, ...]:
    providers: list[ProviderConfig] = []
    names: set[str] = set()
    for where in table_paths(r, gate, gate_path, "providers"):
        t = table_at(gate, where)
        r.check_keys(t, where, field_names(ProviderConfig))
        require_key(r, t, where, "name", "a short name for the provider")
        require_key(r, t, where, "base_url", 'e.g. "https://api.example.com/v1"')
        name = unique_name(
            r, t, where, names, GATE_NAME_RE, "must be 1-64 letters, digits, . _ -", "provider"
        )
        base_url = r.string(t, where, "base_url", "")
        if not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", base_url):
            raise r.error(
                (*where, "base_url"), f"expected an http(s):// URL, got {describe(base_url)}"
            )
        api_key = None
        if "api_key" in t:
            api_key = r.string(t, where, "api_key", "")
            if not re.fullmatch(r"(store|env):[A-Za-z0-9_.-]+", api_key):
                # Never echo the value: it may be the key itself, pasted by mistake.
                raise r.error(
                    (*where, "api_key"),
                    'expected "store:NAME" or "env:VARIABLE" (never the key itself)',
                )
        models: list[ProviderModelConfig] = []
        for mwhere in table_paths(r, t, where, "models"):
            m = table_at(t, mwhere)
            r.check_keys(m, mwhere, field_names(ProviderModelConfig))
            require_key(r, m, mwhere, "id", "the model id clients name")
            d = ProviderModelConfig(id="")
            model_id = r.string(m, mwhere, "id", "")
            if not _MODEL_ID_RE.fullmatch(model_id):
                raise r.error((*mwhere, "id"), f"expected a model id, got {describe(model_id)}")
            size_class = None
            if "size_class" in m:
                size_class = r.string(m, mwhere, "size_class", "", choices=_SIZE_CLASSES)
            models.append(
                ProviderModelConfig(
                    id=model_id,
                    upstream=r.string(m, mwhere, "upstream", model_id) if "upstream" in m else None,
                    tasks=string_array(
                        m, mwhere, "tasks", d.tasks, _TASK_NAME_RE, "task name", r=r
                    ),
                    price_in=r.number(m, mwhere, "price_in", 0.0, positive=False),
                    price_out=r.number(m, mwhere, "price_out", 0.0, positive=False),
                    latency_ms=r.number(m, mwhere, "latency_ms", d.latency_ms, positive=True),
                    context=r.integer(m, mwhere, "context", d.context, lo=1),
                    quality=r.integer(m, mwhere, "quality", d.quality, lo=0, hi=5),
                    family=r.string(m, mwhere, "family", "") or None,
                    size_class=size_class,
                )
            )
        providers.append(
            ProviderConfig(
                name=name,
                base_url=base_url,
                kind=r.string(t, where, "kind", "openai", choices=_PROVIDER_KINDS),
                api_key=api_key,
                private=r.boolean(t, where, "private", False),
                models=tuple(models),
            )
        )
    return tuple(providers)


def read_budgets(
    r: Reader, gate: Mapping[str, object], gate_path: KeyPath
) -> tuple[BudgetConfig, ...]:
    budgets: list[BudgetConfig] = []
    names: set[str] = set()
    for where in table_paths(r, gate, gate_path, "budgets"):
        t = table_at(gate, where)
        r.check_keys(t, where, field_names(BudgetConfig))
        require_key(r, t, where, "name", "e.g. team-a")
        require_key(r, t, where, "limit_usd", "the most it may spend per period")
        name = unique_name(
            r, t, where, names, APP_ID_RE, "must be 1-63 letters, digits, . _ -", "budget"
        )
        budgets.append(
            BudgetConfig(
                name=name,
                limit_usd=r.number(t, where, "limit_usd", 0.0, positive=False),
                period=r.string(t, where, "period", "month", choices=_BUDGET_PERIODS),
                mode=r.string(t, where, "mode", "hard", choices=_BUDGET_MODES),
                apps=string_array(t, where, "apps", (), APP_ID_RE, "app id", r=r),
            )
        )
    return tuple(budgets)
