"""The graph memory's LLM paths: extraction with a model's help, and answers
composed by a model and then verified.

For:

* :class:`LlmExtractor`: the rule extractor's result for each sentence plus
  the (subject, predicate, object) triples a model proposes for it (asked
  for as JSON through ``qg://task=extract``). A proposed triple is kept only
  when its subject and object are literal spans of that sentence, they
  differ, its predicate's words occur in the sentence, and the result still
  passes :func:`~qmesh.memory.extraction.check_extraction`. A model can
  therefore add facts but never one its sentence does not state in its own
  words; a model that fails or answers garbage adds nothing.
* :func:`compose_answer`: numbered sources (the extractive answer's
  citations) go to a model; its reply goes through
  :func:`~qmesh.memory.verify.verify_answer`, and if no sentence survives,
  the extractive answer stands.

The model is reached through a :data:`Complete` callable ``(system, user) ->
reply text`` that raises :class:`LlmUnavailable` when no model answered; the
Gate builds it over its capability router (``qmesh.llm.service``), tests can
pass anything.

Not for: routing, HTTP, or trio (everything here blocks; the extractor runs
in the worker thread that ingests the document).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, Final

import attrs

from qmesh import peerjson
from qmesh.memory.errors import ProvenanceError
from qmesh.memory.extract import RuleExtractor
from qmesh.memory.extraction import KINDS, Extraction, Mention, Relation, check_extraction
from qmesh.memory.query import Answer
from qmesh.memory.terms import STOPWORDS, content_stems
from qmesh.memory.verify import Source, StoredLookup, VerifiedAnswer, verify_answer

__all__ = [
    "COMPOSE_SYSTEM",
    "EXTRACT_SYSTEM",
    "Complete",
    "Composed",
    "ExtractStats",
    "LlmExtractor",
    "LlmUnavailable",
    "compose_answer",
    "parse_triples",
]


class LlmUnavailable(Exception):
    """No model answered (no route, every candidate failed, budget spent)."""


Complete = Callable[[str, str], str]
"""``(system prompt, user prompt) -> the model's reply text``."""

BATCH: Final = 16
"""Sentences per extraction request."""
MAX_TRIPLES: Final = 32
"""Triples read per sentence; more is a model running away."""
_MAX_PREDICATE: Final = 60
_WORD_RE: Final = re.compile(r"[^\W_]+(?:['’][^\W_]+)?")

EXTRACT_SYSTEM: Final = (
    "You extract facts from numbered sentences. For each sentence, list the facts it "
    "states as triples whose subject and object are copied exactly, character for "
    "character, from that sentence, and whose predicate is a short lowercase verb "
    "phrase using the sentence's own words. Answer with JSON only: "
    '{"sentences": [{"n": 1, "triples": [{"subject": "...", "predicate": "...", '
    '"object": "..."}]}]}. Leave out facts the sentence does not state itself.'
)
COMPOSE_SYSTEM: Final = (
    "Answer the question using only the numbered sources. Write short sentences. End "
    "every sentence with the numbers of the sources that state it, like [1] or [1, 3]. "
    "Do not add anything the sources do not say. If the sources do not answer the "
    "question, say nothing."
)


# -- extraction ---------------------------------------------------------------------


@attrs.define
class ExtractStats:
    """What the model added to the last document (for the API's response)."""

    requests: int = 0
    failed: int = 0
    proposed: int = 0
    kept: int = 0

    def to_json(self) -> dict[str, int]:
        return attrs.asdict(self)


def parse_triples(reply: str, count: int) -> list[list[tuple[str, str, str]]]:
    """``count`` lists of (subject, predicate, object) strings from a model's
    reply; anything malformed is skipped, never raised."""
    out: list[list[tuple[str, str, str]]] = [[] for _ in range(count)]
    data = _json_object(reply)
    items = data.get("sentences") if isinstance(data, dict) else None
    if not isinstance(items, list):
        return out
    for item in items:
        if not isinstance(item, dict):
            continue
        n, triples = item.get("n"), item.get("triples")
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= count:
            continue
        if not isinstance(triples, list):
            continue
        for triple in triples[:MAX_TRIPLES]:
            if not isinstance(triple, dict):
                continue
            parts = (triple.get("subject"), triple.get("predicate"), triple.get("object"))
            if all(isinstance(p, str) and p.strip() for p in parts):
                s, p, o = (str(x).strip() for x in parts)
                out[n - 1].append((s, p, o))
    return out


def _json_object(reply: str) -> Any:
    """The JSON object in ``reply``, also inside a ``` fence or after prose; None if none."""
    start, end = reply.find("{"), reply.rfind("}")
    if start < 0 or end <= start:
        return None
    text = reply[start : end + 1]
    try:
        # A model's reply is not ours: nesting that deep would make the
        # standard parser raise RecursionError, not ValueError.
        return peerjson.loads(text, max_bytes=4 * len(text) + 16, what="model reply")
    except ValueError:
        return None


def _span(sentence: str, text: str) -> tuple[int, int] | None:
    """Where ``text`` occurs in ``sentence`` as whole words (case-insensitively
    if not exactly); None if it does not."""
    for haystack, needle in ((sentence, text), (sentence.casefold(), text.casefold())):
        if len(haystack) != len(sentence):
            return None  # case folding changed lengths: offsets would not slice
        for match in re.finditer(re.escape(needle), haystack):
            start, end = match.span()
            before = sentence[start - 1] if start else " "
            after = sentence[end] if end < len(sentence) else " "
            if not (before.isalnum() or after.isalnum()):
                return start, end
    return None


def _predicate_in(sentence: str, predicate: str) -> bool:
    """Every content word of the predicate (by stem) is in the sentence; a
    predicate of function words only ("is a", "in") must appear word for word."""
    if len(predicate) > _MAX_PREDICATE or not _WORD_RE.search(predicate):
        return False
    wanted = set(content_stems(predicate))
    if wanted:
        return wanted <= set(content_stems(sentence))
    words = {w.casefold() for w in _WORD_RE.findall(sentence)}
    return all(w.casefold() in words for w in _WORD_RE.findall(predicate))


def _kind(text: str) -> str:
    if text[:1].isupper() or text[:1].isdigit():
        return "name" if text[:1].isupper() else "number"
    return "concept"


class LlmExtractor:
    """Rules plus a model's triples, each kept only if its sentence supports it."""

    name = "rules+llm"

    def __init__(self, complete: Complete, *, rules: RuleExtractor | None = None) -> None:
        self.complete = complete
        self.rules = rules or RuleExtractor()
        self.stats = ExtractStats()

    def extract(self, sentences: Sequence[str]) -> list[Extraction]:
        out = self.rules.extract(sentences)
        for first in range(0, len(sentences), BATCH):
            batch = sentences[first : first + BATCH]
            prompt = "\n".join(f"{i}. {s}" for i, s in enumerate(batch, 1))
            self.stats.requests += 1
            try:
                reply = self.complete(EXTRACT_SYSTEM, prompt)
            except LlmUnavailable:
                self.stats.failed += 1
                continue
            for offset, triples in enumerate(parse_triples(reply, len(batch))):
                i = first + offset
                self.stats.proposed += len(triples)
                out[i] = self._add(sentences[i], out[i], triples)
        return out

    def _add(
        self, sentence: str, base: Extraction, triples: Sequence[tuple[str, str, str]]
    ) -> Extraction:
        mentions = list(base.mentions)
        relations = list(base.relations)
        index = {(m.start, m.end): i for i, m in enumerate(mentions)}
        seen = {(r.subject, r.predicate, r.object) for r in relations}

        def mention(text: str) -> int | None:
            span = _span(sentence, text)
            if span is None:
                return None
            if span not in index:
                surface = sentence[span[0] : span[1]]
                kind = _kind(surface)
                if surface.casefold() in STOPWORDS or kind not in KINDS:
                    return None
                index[span] = len(mentions)
                mentions.append(Mention(span[0], span[1], surface, kind))
            return index[span]

        kept = 0
        for subject_text, predicate, object_text in triples:
            predicate = " ".join(predicate.casefold().split())
            if not _predicate_in(sentence, predicate):
                continue
            subject, obj = mention(subject_text), mention(object_text)
            if subject is None or obj is None or subject == obj:
                continue
            key = (subject, predicate, obj)
            if key not in seen:
                seen.add(key)
                relations.append(Relation(subject, predicate, obj))
                kept += 1
        # Mentions that no relation uses are left out: the model's spans matter
        # only as ends of a supported relation.
        used = {r.subject for r in relations} | {r.object for r in relations}
        keep = [i for i in range(len(mentions)) if i < len(base.mentions) or i in used]
        renumber = {old: new for new, old in enumerate(keep)}
        result = Extraction(
            mentions=tuple(mentions[i] for i in keep),
            relations=tuple(
                Relation(renumber[r.subject], r.predicate, renumber[r.object]) for r in relations
            ),
            same_as=base.same_as,
        )
        try:
            check_extraction(sentence, result)
        except ProvenanceError:
            return base
        self.stats.kept += kept
        return result


# -- composition --------------------------------------------------------------------


@attrs.frozen
class Composed:
    composed_by: str
    """``llm`` when a verified composed answer replaced the extractive one, else ``extractive``."""
    answer: str
    verified: VerifiedAnswer | None
    """None when no model was asked or none answered."""
    error: str | None = None


def compose_answer(answer: Answer, complete: Complete, stored: StoredLookup) -> Composed:
    """Ask a model to answer ``answer.question`` from ``answer``'s citations;
    keep its verified sentences, or fall back to the extractive answer.
    Nothing is composed for a question the memory cannot answer: the model
    would only have unrelated facts to work with."""
    if not answer.found or not answer.citations:
        return Composed("extractive", answer.answer, None)
    sources = [Source(c.n, c.sentence_id, c.text) for c in answer.citations]
    prompt = "Sources:\n" + "\n".join(f"[{s.n}] {s.text}" for s in sources)
    prompt += f"\n\nQuestion: {answer.question}"
    try:
        reply = complete(COMPOSE_SYSTEM, prompt)
    except LlmUnavailable as exc:
        return Composed("extractive", answer.answer, None, str(exc))
    verified = verify_answer(reply, sources, stored)
    if not verified.found:
        return Composed("extractive", answer.answer, verified)
    return Composed("llm", verified.answer, verified)
