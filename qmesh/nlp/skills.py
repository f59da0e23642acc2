"""The Gate's built-in skills, each with its capacity measured at start-up.

For: one :class:`Skill` per task the Gate answers itself (summarize,
keywords, classify, extract, redact, embed), a uniform way to run them on a
text (:meth:`Skill.run` returns the answer as text, or a vector for
``embed``), and :func:`measure` — a short timed run on a built-in sample
that sets ``capacity`` (operations per second on one core), which the
router advertises ("summarize: yes, 4,100/s") and uses as the skill's
expected latency.

Not for: HTTP (``qmesh.llm.api``) or choosing between a skill and a
model (``qmesh.qg.router``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Final

import attrs

from qmesh.nlp.classify import classify
from qmesh.nlp.embed import embed
from qmesh.nlp.keywords import keywords
from qmesh.nlp.redact import find_pii, redact
from qmesh.nlp.summarize import summarize

__all__ = ["SAMPLE", "Skill", "builtin_skills", "estimate_tokens", "measure"]

SAMPLE: Final = (
    "The city council voted on Tuesday to expand the bus network into the northern "
    "suburbs, ending a debate that had lasted almost two years. The plan adds four new "
    "routes and raises the frequency on the busiest line to one bus every six minutes "
    "during rush hour. Supporters said the change would cut car traffic on the main "
    "bridge, where congestion has grown every year since the new stadium opened. "
    "Opponents argued that the cost, estimated at 40 million dollars over five years, "
    "would force cuts to road maintenance. The mayor said the money would come from a "
    "federal grant and from parking fees, not from the maintenance budget. Construction "
    "of new shelters will begin in the spring. The transit agency expects the first new "
    "route to open in September, and the others within a year. Residents of the northern "
    "suburbs, many of whom commute to the hospital district, welcomed the decision. "
    "Questions go to press@example.org or +1 555 010 2030."
)
MEASURE_S: Final = 0.05


def estimate_tokens(text: str) -> int:
    """A tokenizer-free token count: ≈ 4 characters per token for English."""
    return max(1, (len(text) + 3) // 4)


@attrs.define
class Skill:
    """A task the Gate does itself."""

    task: str
    model: str
    """The model id it is listed under in ``/v1/models`` (``qmesh-summarize``)."""
    fn: Callable[[str], str | list[float]]
    capacity: float = 0.0
    """Operations per second on one core, from :func:`measure` (0: not measured)."""
    blocking: bool = False
    """It does I/O (a database): always run in a worker thread, never measured."""

    def run(self, text: str) -> str | list[float]:
        return self.fn(text)

    @property
    def latency_ms(self) -> float:
        return 1000.0 / self.capacity if self.capacity > 0 else 1.0

    def describe(self) -> str:
        return f"{self.task}: yes, {self.capacity:,.0f}/s"


def _summarize(text: str) -> str:
    return summarize(text, 3)


def _keywords(text: str) -> str:
    return ", ".join(keywords(text))


def _classify(text: str) -> str:
    return json.dumps(classify(text).as_dict())


def _extract(text: str) -> str:
    found = [{"kind": f.kind, "text": f.text, "start": f.start} for f in find_pii(text)]
    return json.dumps({"pii": found, "keywords": keywords(text)})


def _redact(text: str) -> str:
    return redact(text)[0]


def builtin_skills() -> dict[str, Skill]:
    """The built-in skills by task (unmeasured: call :func:`measure`)."""
    skills = (
        Skill("summarize", "qmesh-summarize", _summarize),
        Skill("keywords", "qmesh-keywords", _keywords),
        Skill("classify", "qmesh-classify", _classify),
        Skill("extract", "qmesh-extract", _extract),
        Skill("redact", "qmesh-redact", _redact),
        Skill("embed", "qmesh-embed", embed),
    )
    return {s.task: s for s in skills}


def measure(skills: dict[str, Skill], seconds: float = MEASURE_S) -> None:
    """Set each skill's ``capacity`` from a timed run of ``seconds`` on
    :data:`SAMPLE` (CPU time, so a busy machine lowers it only as much as
    it really slows the skill)."""
    for skill in skills.values():
        if skill.blocking:
            continue
        skill.run(SAMPLE)  # warm caches and lazy regex state
        runs = 0
        start = time.process_time()
        deadline = start + seconds
        now = start
        while now < deadline:
            for _ in range(8):
                skill.run(SAMPLE)
            runs += 8
            now = time.process_time()
        elapsed = max(now - start, 1e-9)
        skill.capacity = runs / elapsed
