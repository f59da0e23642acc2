"""From a question to cited facts and an extractive answer, or "not found".

For: finding the question's entities in the graph (every 1-6 word span of
the question, normalised like an entity name, looked up by key and by
alias), gathering their 1-hop neighbourhood and the sentences that mention
them, adding full-text hits, scoring every candidate sentence, and
assembling the answer from the best *supported* sentences, quoted verbatim,
each followed by its citation number. A sentence supports an answer when it
mentions every entity of the question, covers the question's remaining
content words (directly or through the predicate of a fact it supports, so
"based" finds "headquartered in"), names any unknown proper name the
question contains, and, for who/when/where/how-many questions about a
relation, contains something of the asked-for kind (a name, a date, a
number). When no sentence qualifies the answer is "not found": the facts
around the question's entities are still returned, but nothing is asserted.

Facts whose subject and predicate allow one value (a founding date, a
location, a CEO) are compared, and disagreements between sources are
reported as conflicts, each value with its citations, never resolved by
guessing.

Every step reads as the asker (:class:`~qmesh.memory.store.Access`): the
entities, facts, sentences and full-text hits are those of documents it may
see, so an answer, its facts and its conflicts never draw on another app's
private document.

Not for: composing prose (an LLM may do that; :mod:`qmesh.memory.verify`
checks its citations), or SQL (:mod:`qmesh.memory.store`).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

import attrs

from qmesh.memory.errors import InvalidQuestion
from qmesh.memory.extract import EVENT_PREDICATES, TRANSITIVE_FORMS, RuleExtractor
from qmesh.memory.records import Access, EntityRef, Fact, StoredSentence
from qmesh.memory.store import MemoryStore
from qmesh.memory.terms import QUESTION_WORDS, STOPWORDS, content_stems, entity_key, stem, words

__all__ = [
    "DEFAULT_LIMIT",
    "MAX_LIMIT",
    "MAX_QUESTION_CHARS",
    "NOT_FOUND",
    "Answer",
    "Citation",
    "Conflict",
    "FactView",
    "ask",
    "check_question",
]

NOT_FOUND: Final = "not found"
DEFAULT_LIMIT: Final = 10
MAX_LIMIT: Final = 100
MAX_QUESTION_CHARS: Final = 2000
MAX_ANSWER_SENTENCES: Final = 3
_MAX_NGRAM: Final = 6
_NEIGHBOURHOOD: Final = 500
_MENTIONS: Final = 300
_SEARCH_HITS: Final = 60
# Answer sentences within this much of the best score are all quoted, so
# that equally good sources (and sources that disagree) are shown together.
_ANSWER_MARGIN: Final = 0.6

_TOKEN_RE: Final = re.compile(r"\w+(?:['’.&-]\w+)*\.?")

# Predicates that allow one value per subject (or, for the second set, one
# subject per object): two different values are a conflict between sources.
_ONE_VALUE: Final = frozenset({"located in", "born in", "born on", "died in", "died on"})
_ONE_SUBJECT: Final = frozenset({"ceo of", "capital of", "president of", "chairman of"})

# Words in a question that point at a predicate with other words in it.
_PREDICATE_WORDS: Final[dict[str, frozenset[str]]] = {
    "located in": frozenset(
        stem(w) for w in "where location located based headquartered headquarters situated".split()
    ),
    "works for": frozenset(stem(w) for w in "work works employer employee employed".split()),
    "leads": frozenset(stem(w) for w in "lead leads runs manages heads boss".split()),
    "born in": frozenset(stem(w) for w in "born birth birthplace".split()),
    "born on": frozenset(stem(w) for w in "born birth birthday".split()),
    "founded": frozenset(stem(w) for w in "founded founder founders started established".split()),
    "acquired": frozenset(stem(w) for w in "acquired bought purchased acquisition buy".split()),
    "makes": frozenset(stem(w) for w in "make makes product products manufacture".split()),
}


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

    def to_json(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "document_id": self.document_id,
            "document_title": self.document_title,
            "sentence_id": self.sentence_id,
            "start": self.start,
            "end": self.end,
            "text": self.text,
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


@attrs.frozen
class _Question:
    groups: tuple[tuple[EntityRef, ...], ...]
    """One group per entity named in the question: the entities it may mean."""
    roles: tuple[str | None, ...]
    """Per group: "subject" or "object" of the question's verb, when it has one."""
    verb: str | None
    """The transitive predicate the question asks about ("acquired"), if any."""
    terms: frozenset[str]
    """Content stems not used up by entity names."""
    unknown: tuple[str, ...]
    """Names in the question (lower-cased) that name nothing the memory knows."""
    search: tuple[str, ...]
    """Words for full-text search: the content words outside the names."""
    phrases: tuple[str, ...]
    """The question's names of known entities, as written, for full-text search."""
    wh: str | None


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
    tokens = [(m.start(), m.end(), m.group().rstrip(".")) for m in _TOKEN_RE.finditer(question)]
    names = [
        (m.start, m.end)
        for m in _QUESTION_EXTRACTOR.mentions(question)
        if m.kind in ("name", "org", "term")
    ]
    with store.reader(access) as reader:
        spans = _candidate_spans(question, tokens, names)
        known = reader.entities_by_key({key for _, _, key in spans})
        parsed = _parse(question, tokens, spans, known, names)
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
        mentions = reader.mentions_in(candidates)
    return _assemble(question, parsed, list(facts.values()), sentences, mentions, limit)


# -- the question ---------------------------------------------------------------

_QUESTION_EXTRACTOR: Final = RuleExtractor()
_BE: Final = frozenset({"is", "was", "are", "were", "been", "being", "be"})
_VERB_STEMS: Final = {stem(f): label for f, label in TRANSITIVE_FORMS.items() if " " not in f}


def _candidate_spans(
    question: str, tokens: Sequence[tuple[int, int, str]], names: Sequence[tuple[int, int]]
) -> list[tuple[int, int, str]]:
    """(first token, last token + 1, key) for every span that could name an
    entity. A span may not cut through a capitalised name of the question:
    "Aperture Robotics" is looked up whole, never as "Aperture"."""
    spans = []
    for i in range(len(tokens)):
        for j in range(i + 1, min(len(tokens), i + _MAX_NGRAM) + 1):
            words = [t[2].lower() for t in tokens[i:j]]
            if all(w in STOPWORDS or w in QUESTION_WORDS for w in words):
                continue
            if words[0] in QUESTION_WORDS or words[-1] in STOPWORDS:
                continue
            start, end = tokens[i][0], tokens[j - 1][1]
            if any(start < n_end and n_start < end and (start, end) != (n_start, n_end)
                   for n_start, n_end in names):  # fmt: skip
                continue
            key = entity_key(question[start:end])
            if key:
                spans.append((i, j, key))
    return spans


def _parse(
    question: str,
    tokens: Sequence[tuple[int, int, str]],
    spans: Sequence[tuple[int, int, str]],
    known: dict[str, list[EntityRef]],
    names: Sequence[tuple[int, int]],
) -> _Question:
    used = [False] * len(tokens)
    groups: list[tuple[EntityRef, ...]] = []
    places: list[tuple[int, int]] = []
    # Longest names first: "Jane Doe" before "Doe".
    for i, j, key in sorted(spans, key=lambda s: (s[0] - s[1], s[0])):
        refs = known.get(key)
        if not refs or any(used[i:j]):
            continue
        for k in range(i, j):
            used[k] = True
        if tuple(refs) not in groups:
            groups.append(tuple(refs))
            places.append((i, j))
    resolved = {(tokens[i][0], tokens[j - 1][1]) for i, j in places}
    unknown = tuple(question[a:b].lower() for a, b in names if (a, b) not in resolved)
    terms: set[str] = set()
    search: list[str] = []
    wh = None
    verb: str | None = None
    verb_at = -1
    for index, (_, _, word) in enumerate(tokens):
        lower = word.lower()
        if wh is None and lower in ("who", "whom", "whose", "when", "where", "which", "what"):
            wh = "who" if lower in ("whom", "whose") else lower
        if lower in ("many", "much") and index > 0 and tokens[index - 1][2].lower() == "how":
            wh = "how many"
        if lower in STOPWORDS or lower in QUESTION_WORDS or used[index]:
            continue
        search.append(lower)
        stemmed = stem(lower)
        terms.add(stemmed)
        if verb is None and stemmed in _VERB_STEMS:
            verb, verb_at = _VERB_STEMS[stemmed], index
    roles: list[str | None] = []
    passive = verb is not None and any(t[2].lower() in _BE for t in tokens[:verb_at])
    for i, _ in places:
        if verb is None:
            roles.append(None)
            continue
        before = i < verb_at
        # "What did Acme acquire?" asks about the subject; "Who acquired
        # Acme?" and "When was Acme acquired?" about the object.
        roles.append("subject" if before != passive else "object")
    return _Question(
        groups=tuple(groups),
        roles=tuple(roles),
        verb=verb,
        terms=frozenset(terms),
        unknown=unknown,
        search=tuple(search),
        phrases=tuple(question[tokens[i][0] : tokens[j - 1][1]] for i, j in places),
        wh=wh,
    )


# -- scoring and assembly ---------------------------------------------------------


def _predicate_stems(predicate: str) -> set[str]:
    stems = {stem(w) for w in predicate.split() if w not in STOPWORDS}
    return stems | set(_PREDICATE_WORDS.get(predicate, ()))


def _wants(wh: str | None, kinds: Iterable[str]) -> bool:
    kinds = set(kinds)
    if wh == "when":
        return "date" in kinds
    if wh == "how many":
        return bool(kinds & {"number", "money", "percent"})
    if wh in ("who", "where"):
        return bool(kinds & {"name", "org"})
    return True


def _roles_agree(parsed: _Question, facts: Sequence[Fact]) -> bool:
    """False when the sentence's facts about the question's verb all have
    the question's entities the other way round ("Acme was acquired by
    Globex" does not answer "What did Acme acquire?"). True when it has no
    such fact: then only its words can be judged."""
    if parsed.verb is None:
        return True
    about_verb = False
    for fact in facts:
        if fact.predicate == parsed.verb:
            holders = {"subject": fact.subject.id, "object": fact.object.id}
        elif EVENT_PREDICATES.get(fact.predicate) == parsed.verb:
            holders = {"object": fact.subject.id}  # "Acme founded in 1998": Acme was founded
        else:
            continue
        involved = False
        for group, role in zip(parsed.groups, parsed.roles, strict=True):
            ids = {e.id for e in group}
            if ids & {fact.subject.id, fact.object.id}:
                involved = True
                if role is not None and holders.get(role) in ids:
                    return True
        about_verb = about_verb or involved
    return not about_verb


@attrs.frozen
class _Scored:
    seq: int
    score: float
    supported: bool


def _score(
    parsed: _Question,
    sentence: StoredSentence,
    stems: frozenset[str],
    facts: Sequence[Fact],
    mentioned: dict[int, str],
    relevance: float,
) -> _Scored:
    group_ids = [{e.id for e in group} for group in parsed.groups]
    all_ids = set().union(*group_ids) if group_ids else set()
    covered_groups = sum(1 for ids in group_ids if ids & mentioned.keys())
    predicate_stems: set[str] = set()
    linked = False
    for fact in facts:
        if not all_ids or fact.subject.id in all_ids or fact.object.id in all_ids:
            predicate_stems |= _predicate_stems(fact.predicate)
            linked = linked or bool(parsed.terms & _predicate_stems(fact.predicate))
    covered = {t for t in parsed.terms if t in stems or t in predicate_stems}
    text = sentence.text.lower()
    other_kinds = [kind for eid, kind in mentioned.items() if eid not in all_ids]
    wh_ok = _wants(parsed.wh, other_kinds)
    entity_share = covered_groups / len(group_ids) if group_ids else 0.0
    term_share = len(covered) / len(parsed.terms) if parsed.terms else 1.0
    if group_ids:
        need = math.ceil(len(parsed.terms) / 2)
        supported = covered_groups == len(group_ids) and len(covered) >= need
    else:
        supported = bool(parsed.terms) and covered == parsed.terms
    supported = supported and all(name in text for name in parsed.unknown)
    supported = supported and _roles_agree(parsed, facts)
    if parsed.terms:
        supported = supported and wh_ok
    score = (
        2.0 * entity_share
        + 1.5 * term_share
        + (0.5 if wh_ok else 0.0)
        + (0.5 if linked else 0.0)
        + 0.3 * relevance
    )
    if not parsed.terms and all_ids:
        # "Tell me about Acme": prefer sentences that state facts about it
        # over ones that only name it (a heading, a passing mention).
        stated = sum(1 for f in facts if f.subject.id in all_ids or f.object.id in all_ids)
        score += min(0.6, 0.2 * stated)
    return _Scored(sentence.seq, score, supported)


_BM25_K1: Final = 1.2
_BM25_B: Final = 0.75


def _relevance(
    terms: frozenset[str], stems: dict[int, frozenset[str]], lengths: dict[int, int]
) -> dict[int, float]:
    """BM25 of each candidate sentence for the question's stems, with the
    candidates as the collection (their document frequencies and average
    length). Computed here, not by the database, so that both backends —
    whose full-text rankings differ (FTS5's bm25, PostgreSQL's ts_rank) —
    score a sentence alike: the database only finds the hits."""
    if not stems or not terms:
        return dict.fromkeys(stems, 0.0)
    n = len(stems)
    df = Counter(t for present in stems.values() for t in terms & present)
    idf = {t: math.log(1 + (n - df[t] + 0.5) / (df[t] + 0.5)) for t in terms}
    average = sum(lengths.values()) / n or 1.0
    return {
        seq: sum(idf[t] for t in terms & present)
        * (_BM25_K1 + 1)
        / (1 + _BM25_K1 * (1 - _BM25_B + _BM25_B * lengths[seq] / average))
        for seq, present in stems.items()
    }


def _assemble(
    question: str,
    parsed: _Question,
    facts: list[Fact],
    sentences: dict[int, StoredSentence],
    mentions: dict[int, dict[int, str]],
    limit: int,
) -> Answer:
    by_sentence: dict[int, list[Fact]] = {}
    for fact in facts:
        for seq in fact.support:
            by_sentence.setdefault(seq, []).append(fact)
    stems = {seq: frozenset(content_stems(s.text)) for seq, s in sentences.items()}
    lengths = {seq: len(words(s.text)) for seq, s in sentences.items()}
    asked = parsed.terms.union(*(content_stems(p) for p in parsed.phrases))
    relevance = _relevance(asked, stems, lengths)
    best = max(relevance.values(), default=0.0)
    scored = [
        _score(parsed, s, stems[seq], by_sentence.get(seq, []), mentions.get(seq, {}),
               relevance[seq] / best if best > 0 else 0.0)
        for seq, s in sentences.items()
    ]  # fmt: skip
    order = {seq: (s.document_id, s.start) for seq, s in sentences.items()}
    supported = sorted((s for s in scored if s.supported), key=lambda s: (-s.score, order[s.seq]))
    chosen: list[int] = []
    if supported:
        best = supported[0].score
        texts: set[str] = set()
        for s in supported:
            if s.score < best - _ANSWER_MARGIN:
                break
            text = sentences[s.seq].text
            if text not in texts and len(texts) >= MAX_ANSWER_SENTENCES:
                continue
            texts.add(text)
            chosen.append(s.seq)
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
    views = []
    for fact in ranked:
        cites = tuple(
            _citation(number(seq), sentences[seq]) for seq in fact.support if seq in sentences
        )
        views.append(
            FactView(fact.subject.name, fact.subject.kind, fact.predicate, fact.object.name,
                     fact.object.kind, cites)
        )  # fmt: skip
    conflicts = _conflicts(facts, number, set(chosen))
    citations = tuple(
        _citation(n, sentences[seq]) for seq, n in sorted(numbers.items(), key=lambda x: x[1])
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


def _citation(n: int, sentence: StoredSentence) -> Citation:
    return Citation(
        n, sentence.document_id, sentence.title, sentence.id, sentence.start, sentence.end,
        sentence.text,
    )  # fmt: skip


def _rank_facts(parsed: _Question, facts: Sequence[Fact], chosen: set[int]) -> list[Fact]:
    ids = {e.id for group in parsed.groups for e in group}

    def score(fact: Fact) -> tuple[float, int]:
        value = 0.0
        # The question's own entities first, then what the question asks.
        if fact.subject.id in ids or fact.object.id in ids:
            value += 2.0
        if fact.subject.id in ids and fact.object.id in ids:
            value += 1.0
        if parsed.terms & _predicate_stems(fact.predicate):
            value += 1.5
        if chosen.intersection(fact.support):
            value += 2.0
        other = fact.object if fact.subject.id in ids else fact.subject
        if parsed.wh in ("when", "how many", "who", "where") and _wants(parsed.wh, [other.kind]):
            value += 0.5
        return -value, fact.relation_id

    return sorted(facts, key=score)


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
