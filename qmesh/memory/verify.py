"""Check an answer that someone else (an LLM through the mesh) composed from
numbered source sentences: keep only its sentences that cite a stored
sentence, and drop the rest.

For: the guard between a composed answer and the caller. The composer is
given numbered sources (stored sentences) and asked to end every sentence
with markers such as ``[1]`` or ``[1, 3]``. :func:`verify_answer` splits the
composed text into sentences and keeps a sentence only if

* it carries at least one marker,
* each marker it carries names a source that was given (an unknown number
  is an invented citation, and the sentence goes),
* at least one of its sources is still stored with the same id and exactly
  the same text (a source deleted meanwhile, or altered, does not count),
* every number it states (a year, an amount) appears in the sentences it
  cites,
* and, unless ``min_overlap`` is 0, at least that share of its content
  words (stems) appear in the sentences it cites: a marker on an unrelated
  claim is not support.

Not for: calling the LLM (:func:`qmesh.memory.llm.compose_answer` does), or
judging truth beyond the words: a sentence that rearranges its sources'
words into a different claim can pass the overlap test. The extractive
answers of :mod:`qmesh.memory.query` need no such check; they quote.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Final

import attrs

from qmesh.memory.sentences import split_sentences
from qmesh.memory.terms import content_stems

__all__ = ["CheckedSentence", "Source", "VerifiedAnswer", "verify_answer"]

DEFAULT_MIN_OVERLAP: Final = 0.75
_MARKER_RE: Final = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")
_NUMBER_RE: Final = re.compile(r"\d+(?:[.,]\d+)*")
_LEADING_MARKERS_RE: Final = re.compile(r"^(?:\s*\[\d+(?:\s*,\s*\d+)*\])+")


@attrs.frozen
class Source:
    """A numbered source given to the composer: a stored sentence's id and text."""

    n: int
    sentence_id: str
    text: str


@attrs.frozen
class CheckedSentence:
    text: str
    """The composed sentence, markers included."""
    cites: tuple[int, ...]
    kept: bool
    reason: str | None = None
    """Why it was dropped."""


@attrs.frozen
class VerifiedAnswer:
    answer: str
    """The kept sentences, joined; empty when nothing was kept."""
    sentences: tuple[CheckedSentence, ...]
    cited: tuple[int, ...]
    """Source numbers the kept sentences cite."""

    @property
    def found(self) -> bool:
        return bool(self.answer)

    @property
    def dropped(self) -> tuple[CheckedSentence, ...]:
        return tuple(s for s in self.sentences if not s.kept)


StoredLookup = Callable[[Iterable[str]], Mapping[str, str]]
"""Sentence ids → the stored text of those that exist."""


def verify_answer(
    composed: str,
    sources: Iterable[Source],
    stored: StoredLookup,
    *,
    min_overlap: float = DEFAULT_MIN_OVERLAP,
) -> VerifiedAnswer:
    """Keep the sentences of ``composed`` that cite a stored sentence (see the module docstring)."""
    given = {s.n: s for s in sources}
    current = stored([s.sentence_id for s in given.values()])
    valid = {n for n, s in given.items() if current.get(s.sentence_id) == s.text}
    checked: list[CheckedSentence] = []
    for text in _sentences(composed):
        cites = tuple(
            int(n) for group in _MARKER_RE.findall(text) for n in re.split(r"\s*,\s*", group)
        )
        reason = _problem(text, cites, given, valid, min_overlap)
        checked.append(CheckedSentence(text, cites, reason is None, reason))
    kept = [c for c in checked if c.kept]
    return VerifiedAnswer(
        answer=" ".join(c.text for c in kept),
        sentences=tuple(checked),
        cited=tuple(sorted({n for c in kept for n in c.cites})),
    )


def _sentences(composed: str) -> list[str]:
    """Sentences of the composed text, with markers that follow a full stop
    ("... in 1998. [1]") attached to the sentence before them."""
    parts: list[str] = []
    for sentence in split_sentences("answer", composed):
        text = sentence.text
        leading = _LEADING_MARKERS_RE.match(text)
        if leading and parts:
            parts[-1] = f"{parts[-1]} {leading.group().strip()}"
            text = text[leading.end() :].strip()
        if text:
            parts.append(text)
    return parts


def _problem(
    text: str,
    cites: tuple[int, ...],
    given: Mapping[int, Source],
    valid: set[int],
    min_overlap: float,
) -> str | None:
    if not cites:
        return "cites nothing"
    invented = [n for n in cites if n not in given]
    if invented:
        return f"cites {', '.join(f'[{n}]' for n in invented)}, which no source has"
    stored = [n for n in cites if n in valid]
    if not stored:
        return "cites only sources that are no longer stored as given"
    claim_text = _MARKER_RE.sub(" ", text)
    support_text = " ".join(given[n].text for n in stored)
    numbers = set(_NUMBER_RE.findall(claim_text)) - set(_NUMBER_RE.findall(support_text))
    if numbers:
        return f"states {', '.join(sorted(numbers))}, which the sentences it cites do not"
    if min_overlap > 0:
        claim = set(content_stems(claim_text))
        support = set(content_stems(support_text))
        if claim and len(claim & support) / len(claim) < min_overlap:
            return "says more than the sentences it cites"
    return None
