"""From a question to cited facts and an extractive answer, or "not found".

For: finding the question's entities in the graph (every 1-6 word span of
the question, normalised like an entity name, looked up by key and by
alias, and a short name by the one longer name it starts: "Globex" for
"Globex Industries"), gathering their 1-hop neighbourhood and the sentences
that mention them (by name, or through a pronoun or description resolved to
them at ingest: see :mod:`qmesh.memory.coref`), adding full-text hits,
choosing the sentences that answer the question asked
(:mod:`qmesh.memory.question` says what it asks, :mod:`qmesh.memory.support`
which sentences answer it: a "who founded" question needs a founder, a
"when" question a date, in the asked role), and assembling the answer from
them, quoted verbatim, each followed by its citation number. When no
sentence qualifies the answer is "not found": the facts around the
question's entities are still returned, but nothing is asserted.

Each citation carries the references it resolved ("it" → "Acme
Corporation"), with their exact offsets; the cited text stays the stored
sentence. Facts whose subject and predicate allow one value (a founding
date, a location, a CEO) are compared, and when a value the answer quotes
has a competitor from another source, the answer's ``conflicts`` hold both,
each with its citations, never resolved by guessing.

Every step reads as the asker (:class:`~qmesh.memory.store.Access`): the
entities, facts, sentences and full-text hits are those of documents it may
see, so an answer, its facts and its conflicts never draw on another app's
private document.

Not for: composing prose (an LLM may do that; :mod:`qmesh.memory.verify`
checks its citations), or SQL (:mod:`qmesh.memory.store`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Final

import attrs

from qmesh.memory.errors import InvalidQuestion
from qmesh.memory.question import (
    Question,
    candidate_spans,
    names_in,
    parse,
    tokens_of,
)
from qmesh.memory.records import Access, EntityRef, Fact, MentionSpan, StoredSentence
from qmesh.memory.store import MemoryStore
from qmesh.memory.support import choose, predicate_stems
from qmesh.memory.terms import QUESTION_WORDS, STOPWORDS

__all__ = [
    "DEFAULT_LIMIT",
    "MAX_LIMIT",
    "MAX_QUESTION_CHARS",
    "NOT_FOUND",
    "Answer",
    "Citation",
    "Conflict",
    "FactView",
    "Resolution",
    "ask",
    "check_question",
]

NOT_FOUND: Final = "not found"
DEFAULT_LIMIT: Final = 10
MAX_LIMIT: Final = 100
MAX_QUESTION_CHARS: Final = 2000
_NEIGHBOURHOOD: Final = 500
_MENTIONS: Final = 300
_SEARCH_HITS: Final = 60

# Predicates that allow one value per subject (or, for the second set, one
# subject per object): two different values are a conflict between sources.
_ONE_VALUE: Final = frozenset({"located in", "born in", "born on", "died in", "died on"})
_ONE_SUBJECT: Final = frozenset(
    {"ceo of", "cfo of", "cto of", "coo of", "capital of", "president of", "chairman of"}
)


@attrs.frozen
class Resolution:
    """A reference in a cited sentence that the memory read as naming an
    entity: ``document[start:end] == text`` ("it"), and ``entity`` is the
    name it stands for ("Acme Corporation")."""

    text: str
    start: int
    end: int
    entity: str

    def to_json(self) -> dict[str, Any]:
        return {"text": self.text, "start": self.start, "end": self.end, "entity": self.entity}


@attrs.frozen
class Citation:
    """A stored sentence: ``document[start:end] == text``."""

    n: int
    document_id: str
    document_title: str | None
    sentence_id: str
    start: int
    end: int
    text: str
    resolutions: tuple[Resolution, ...] = ()
    """The sentence's references and what they stand for, in order."""

    def to_json(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "document_id": self.document_id,
            "document_title": self.document_title,
            "sentence_id": self.sentence_id,
            "start": self.start,
            "end": self.end,
            "text": self.text,
            "resolutions": [r.to_json() for r in self.resolutions],
        }


@attrs.frozen
class FactView:
    subject: str
    subject_kind: str
    predicate: str
    object: str
    object_kind: str
    citations: tuple[Citation, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "subject": self.subject,
            "subject_kind": self.subject_kind,
            "predicate": self.predicate,
            "object": self.object,
            "object_kind": self.object_kind,
            "citations": [c.to_json() for c in self.citations],
        }


@attrs.frozen
class Conflict:
    """Sources disagree about ``about``: for ``predicate`` they give different
    ``values`` (objects, or subjects when ``values_are == "subject"``, as for
    "X is the CEO of Y"), each with the citation numbers that say it."""

    about: str
    predicate: str
    values_are: str
    values: tuple[tuple[str, tuple[int, ...]], ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "about": self.about,
            "predicate": self.predicate,
            "values_are": self.values_are,
            "values": [{"value": v, "citations": list(ns)} for v, ns in self.values],
        }


@attrs.frozen
class Answer:
    question: str
    found: bool
    answer: str
    """Quoted sentences, each followed by ``[n]`` markers; or :data:`NOT_FOUND`."""
    citations: tuple[Citation, ...]
    """Numbered from 1: the answer's own first, then the facts' others."""
    facts: tuple[FactView, ...]
    conflicts: tuple[Conflict, ...]
    entities: tuple[str, ...]
    """The question's entities that the memory knows."""

    def to_json(self) -> dict[str, Any]:
        return {
            "question": self.question,
            "found": self.found,
            "answer": self.answer,
            "citations": [c.to_json() for c in self.citations],
            "facts": [f.to_json() for f in self.facts],
            "conflicts": [c.to_json() for c in self.conflicts],
            "entities": list(self.entities),
        }


def check_question(question: object, limit: object) -> tuple[str, int]:
    if not isinstance(question, str) or not question.strip():
        raise InvalidQuestion("question must be a non-empty string")
    if len(question) > MAX_QUESTION_CHARS:
        raise InvalidQuestion(f"question must be at most {MAX_QUESTION_CHARS} characters")
    try:
        question.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidQuestion("question is not valid Unicode (a lone surrogate)") from None
    if limit is None:
        limit = DEFAULT_LIMIT
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise InvalidQuestion(f"limit must be an integer from 1 to {MAX_LIMIT}")
    return question.strip(), limit


def ask(store: MemoryStore, question: str, limit: int = DEFAULT_LIMIT, *, access: Access) -> Answer:
    """Answer ``question`` from what ``access`` may read of the memory in
    ``store`` (see the module docstring)."""
    question, limit = check_question(question, limit)
    tokens = tokens_of(question)
    names = names_in(question)
    with store.reader(access) as reader:
        spans = candidate_spans(question, tokens, names)
        known: dict[str, list[EntityRef]] = reader.entities_by_key({key for _, _, key in spans})
        short = _short_names(question, tokens, spans, known, names)
        if short:
            for key, refs in reader.entities_by_prefix(short).items():
                if len(refs) == 1:  # a short name of one entity only
                    known.setdefault(key, refs)
        parsed = parse(question, tokens, spans, known, names)
        entity_ids = {e.id for group in parsed.groups for e in group}
        facts = {f.relation_id: f for f in reader.facts_about(entity_ids, _NEIGHBOURHOOD)}
        candidates = set(reader.sentences_mentioning(entity_ids, _MENTIONS))
        hits = reader.search(parsed.search, _SEARCH_HITS, phrases=parsed.phrases)
        candidates.update(hits)
        for fact in reader.facts_in_sentences(hits):
            facts.setdefault(fact.relation_id, fact)
        for fact in facts.values():
            candidates.update(fact.support)
        sentences = reader.sentences(candidates)
        mentions = reader.mention_spans(candidates)
    return _assemble(question, parsed, list(facts.values()), sentences, mentions, limit)


def _short_names(
    question: str,
    tokens: Sequence[tuple[int, int, str]],
    spans: Sequence[tuple[int, int, str]],
    known: dict[str, list[EntityRef]],
    names: Sequence[tuple[int, int]],
) -> set[str]:
    """Keys that may be a short name ("Globex", "initech"): the question's
    capitalised names that name nothing, and, when nothing in the question
    names anything, each of its single content words."""
    if any(key in known for _, _, key in spans):
        whole = set(names)
        return {
            key
            for i, j, key in spans
            if key not in known and (tokens[i][0], tokens[j - 1][1]) in whole
        }
    return {
        key
        for i, j, key in spans
        if j - i == 1 and tokens[i][2].lower() not in STOPWORDS | QUESTION_WORDS
    }


def _assemble(
    question: str,
    parsed: Question,
    facts: list[Fact],
    sentences: dict[int, StoredSentence],
    mentions: dict[int, list[MentionSpan]],
    limit: int,
) -> Answer:
    chosen = choose(parsed, facts, sentences, mentions)
    numbers: dict[int, int] = {}

    def number(seq: int) -> int:
        return numbers.setdefault(seq, len(numbers) + 1)

    # The answer: each distinct sentence text once, with every source that says it.
    parts: list[str] = []
    seen: dict[str, int] = {}
    markers: list[list[int]] = []
    for seq in chosen:
        text = sentences[seq].text
        if text in seen:
            markers[seen[text]].append(number(seq))
            continue
        seen[text] = len(parts)
        parts.append(text)
        markers.append([number(seq)])
    answer = " ".join(
        f"{text} {''.join(f'[{n}]' for n in ns)}" for text, ns in zip(parts, markers, strict=True)
    )
    ranked = _rank_facts(parsed, facts, set(chosen))[:limit]

    def cite(seq: int) -> Citation:
        return _citation(number(seq), sentences[seq], mentions.get(seq, ()))

    views = []
    for fact in ranked:
        cites = tuple(cite(seq) for seq in fact.support if seq in sentences)
        views.append(
            FactView(fact.subject.name, fact.subject.kind, fact.predicate, fact.object.name,
                     fact.object.kind, cites)
        )  # fmt: skip
    conflicts = _conflicts(facts, number, set(chosen))
    citations = tuple(
        _citation(n, sentences[seq], mentions.get(seq, ()))
        for seq, n in sorted(numbers.items(), key=lambda x: x[1])
    )
    entities = tuple(dict.fromkeys(e.name for group in parsed.groups for e in group))
    return Answer(
        question=question,
        found=bool(chosen),
        answer=answer if chosen else NOT_FOUND,
        citations=citations,
        facts=tuple(views),
        conflicts=conflicts,
        entities=entities,
    )


def _citation(n: int, sentence: StoredSentence, spans: Sequence[MentionSpan]) -> Citation:
    resolutions = tuple(
        Resolution(s.surface, s.start, s.end, s.entity.name) for s in spans if s.resolved
    )
    return Citation(
        n, sentence.document_id, sentence.title, sentence.id, sentence.start, sentence.end,
        sentence.text, resolutions,
    )  # fmt: skip


def _rank_facts(parsed: Question, facts: Sequence[Fact], chosen: set[int]) -> list[Fact]:
    ids = {e.id for group in parsed.groups for e in group}

    def score(fact: Fact) -> tuple[float, int]:
        value = 0.0
        # The question's own entities first, then what the question asks.
        if fact.subject.id in ids or fact.object.id in ids:
            value += 2.0
        if fact.subject.id in ids and fact.object.id in ids:
            value += 1.0
        if parsed.terms & predicate_stems(fact.predicate):
            value += 1.5
        if chosen.intersection(fact.support):
            value += 2.0
        other = fact.object if fact.subject.id in ids else fact.subject
        if _WANTED.get(parsed.wh or "", frozenset()) & {other.kind}:
            value += 0.5
        return -value, fact.relation_id

    return sorted(facts, key=score)


_WANTED: Final = {
    "when": frozenset({"date"}),
    "how many": frozenset({"number", "money", "percent"}),
    "how much": frozenset({"money", "percent"}),
    "who": frozenset({"name", "org"}),
    "where": frozenset({"name", "org"}),
}


def _conflicts(
    facts: Sequence[Fact], number: Callable[[int], int], chosen: set[int]
) -> tuple[Conflict, ...]:
    """Disagreements that bear on the answer: groups of one-valued facts in
    which some fact is supported by a sentence the answer quotes."""
    groups: dict[tuple[str, int, str], dict[str, list[int]]] = {}
    relevant: set[tuple[str, int, str]] = set()
    names: dict[int, str] = {}
    for fact in sorted(facts, key=lambda f: f.relation_id):
        names[fact.subject.id] = fact.subject.name
        names[fact.object.id] = fact.object.name
        if fact.predicate in _ONE_SUBJECT:
            key, value = ("subject", fact.object.id, fact.predicate), fact.subject.name
        elif fact.predicate in _ONE_VALUE or (
            fact.object.kind == "date" and fact.predicate.endswith((" in", " on"))
        ):
            # "founded in 1998" and "founded on 3 May 1999" disagree too.
            base = fact.predicate if fact.object.kind != "date" else fact.predicate[:-3]
            key, value = ("object", fact.subject.id, base), fact.object.name
        else:
            continue
        groups.setdefault(key, {}).setdefault(value, []).extend(fact.support)
        if chosen.intersection(fact.support):
            relevant.add(key)
    return tuple(
        Conflict(
            about=names[entity],
            predicate=predicate,
            values_are=side,
            values=tuple(
                (v, tuple(sorted({number(seq) for seq in seqs}))) for v, seqs in values.items()
            ),
        )
        for (side, entity, predicate), values in groups.items()
        if len(values) > 1 and (side, entity, predicate) in relevant
    )
