"""Decision time of the qg:// router with 1,000 candidates.

Usage: .venv/bin/python bench/route.py [--candidates 1000] [--decisions 20000]

Builds a router with the Gate's six built-in skills, daemon models spread
over many nodes (three models per node, equivalence groups, random queue
depths, some busy, some cooling down, some stale) and priced provider
models, then times ``Router.decide`` for a mix of DSNs — speed, cost,
quality, local, balanced, a model pin, privacy, max_cost, max_latency — with
live telemetry moving between decisions (a latency observation after each
decision marks the rankings stale, so the amortised re-sort is included).
Prints p50/p90/p99 per DSN and overall. The target: p50 ≤ 50 µs.
Nothing is asserted.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qmesh.nlp.skills import builtin_skills
from qmesh.qg.candidates import DAEMON, INTERNAL, PROVIDER, Candidate
from qmesh.qg.dsn import parse_dsn
from qmesh.qg.errors import NoRoute
from qmesh.qg.router import BUDGET_SHIFT, BudgetSnapshot, Router

CHAT_TASKS = frozenset({"chat", "creative_writing", "code", "translate", "summarize"})
FAMILIES = ("gemma3", "llama3", "qwen2", "mistral", "phi3")
SIZES = ("xs", "s", "m", "l")
DSNS = (
    "qg://task=summarize;prefer=speed",
    "qg://task=chat;prefer=speed",
    "qg://task=chat;prefer=cost",
    "qg://task=chat;prefer=quality",
    "qg://task=creative_writing;prefer=local",
    "qg://task=code",
    "qg://task=chat;model=llama3",
    "qg://task=chat;privacy=local;max_latency_ms=3000",
    "qg://task=translate;max_cost=0.001",
    "qg://task=chat;privacy=private;context=8192",
)


def chat_shape(rng: random.Random) -> tuple[str, str, dict[str, Any]]:
    """A chat model's family and size, drawn in that order, and the
    candidate fields they fix."""
    family = rng.choice(FAMILIES)
    size = rng.choice(SIZES)
    fields = {
        "tasks": CHAT_TASKS,
        "family": family,
        "size_class": size,
        "equivalence": f"{family}:{size}",
    }
    return family, size, fields


def build(n: int, rng: random.Random) -> Router:
    router = Router()
    skills = [
        Candidate(
            id=f"skill:{task}",
            kind=INTERNAL,
            model=skill.model,
            tasks=frozenset({task}),
            latency_ms=0.2,
            tokens_per_s=1e6,
        )
        for task, skill in builtin_skills().items()
    ]
    providers: list[Candidate] = []
    daemons: list[Candidate] = []
    remaining = n - len(skills)
    n_providers = max(10, remaining // 10)
    for i in range(n_providers):
        family, size, shape = chat_shape(rng)
        providers.append(
            Candidate(
                id=f"provider:p{i % 12}/m{i}",
                kind=PROVIDER,
                model=f"cloud-{family}-{size}-{i}",
                **shape,
                node=f"provider:p{i % 12}",
                local=False,
                private=False,
                context=rng.choice((8192, 32768, 131072)),
                price_in=rng.uniform(0.1, 5.0),
                price_out=rng.uniform(0.4, 15.0),
                quality=rng.randint(2, 5),
                latency_ms=rng.uniform(200, 2000),
            )
        )
    for i in range(remaining - n_providers):
        node = f"node-{i // 3}"
        family, size, shape = chat_shape(rng)
        daemons.append(
            Candidate(
                id=f"node:{node}/{family}-{size}-{i % 3}",
                kind=DAEMON,
                model=f"{family}-{size}-q4",
                **shape,
                node=node,
                context=rng.choice((2048, 4096, 8192)),
                local_rate=rng.uniform(0.01, 0.2),
                quality=1 + SIZES.index(size),
                latency_ms=rng.uniform(300, 5000),
                tokens_per_s=rng.uniform(5, 120),
                queue_depth=rng.randint(0, 4),
                queue_limit=4,
                busy=rng.random() < 0.05,
                healthy=rng.random() > 0.03,
                cool_until=time.monotonic() + 3600 if rng.random() < 0.02 else 0.0,
            )
        )
    router.set_candidates("skills", skills)
    router.set_candidates("providers", providers)
    router.set_candidates("daemons", daemons)
    return router


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidates", type=int, default=1000)
    parser.add_argument("--decisions", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    router = build(args.candidates, rng)
    dsns = [parse_dsn(text) for text in DSNS]
    per_dsn: dict[str, list[float]] = {text: [] for text in DSNS}
    daemons = [c for c in router.candidates if c.kind == DAEMON]
    errors = 0
    # Warm up: build every ranking once.
    for dsn in dsns:
        try:
            router.decide(dsn)
        except NoRoute:
            pass
    clock = time.perf_counter_ns
    # A hard budget nearly spent and projected over: shift to local, and
    # check that paid candidates' maximum cost still fits.
    shift = BudgetSnapshot("bench", BUDGET_SHIFT, hard=True, limit_usd=100.0, committed_usd=99.9)
    for i in range(args.decisions):
        index = i % len(dsns)
        dsn = dsns[index]
        budget = shift if i % 17 == 0 else None
        start = clock()
        try:
            router.decide(dsn, tokens_in=800, tokens_out=200, budget=budget)
        except NoRoute:
            errors += 1
        per_dsn[DSNS[index]].append((clock() - start) / 1000)
        # Telemetry keeps moving: a finished request's latency, a queue change.
        moved = daemons[i % len(daemons)]
        moved.observe_latency(rng.uniform(300, 5000))
        moved.queue_depth = rng.randint(0, 4)
        router.telemetry_changed()
    print(f"router: {len(router.candidates)} candidates, {args.decisions} decisions, "
          f"{errors} without a route")  # fmt: skip
    print(f"{'DSN':<52} {'p50 µs':>8} {'p90 µs':>8} {'p99 µs':>8}")
    everything: list[float] = []
    for text, times in per_dsn.items():
        times.sort()
        everything += times
        q = statistics.quantiles(times, n=100)
        print(f"{text:<52} {q[49]:>8.1f} {q[89]:>8.1f} {q[98]:>8.1f}")
    q = statistics.quantiles(sorted(everything), n=100)
    verdict = "met" if q[49] <= 50 else "NOT met"
    print(f"{'all':<52} {q[49]:>8.1f} {q[89]:>8.1f} {q[98]:>8.1f}   (p50 ≤ 50 µs: {verdict})")


if __name__ == "__main__":
    main()
