"""Which stored sentences answer a question: cite-or-abstain, for the
question asked.

For: :func:`choose`, the step of :func:`qmesh.memory.query.ask` between
gathering candidate sentences and quoting them. A sentence is chosen only
when it contains an answer of the type the question word wants, in the
role the question asks about:

* A question about a relation (:class:`~qmesh.memory.question.Family`:
  founded, acquired, based, born, runs, a role such as CFO, owns, …) is
  answered only by a sentence that supports a fact of that relation with
  the question's entity at its end of it. The other end is the answer: for
  "who" a person or organisation, for "what"/"which" a thing; for "where" a
  place (the fact's object, or for an event such as a founding, a place
  the sentence names with "in"/"at"); for "when" a date the sentence
  attaches to that event ("founded in 2011"), or a date it states that no
  other event claims; for "how much"/"how many" an amount it states. So
  "Acme was founded in 1998 in Springfield" answers when and where
  Acme was founded, and never who founded it. A question about a relation
  that names no entity ("Who makes rocket skates?") needs a sentence that
  states the relation; one that names nothing but a pronoun ("Who founded
  it?") has no referent and is not answered.
* "How many N" is answered by a sentence in which the question's entity has
  a number of N (or of N's synonyms: "people" for employees).
* Any other question is answered by words: the sentence mentions every
  entity of the question (by name, or by a pronoun or description resolved
  to it), covers at least half of its remaining content words (directly or
  through the predicate of a fact it supports), names any unknown proper
  name of the question, and contains something of the asked type (who: a
  person or organisation other than the question's; where: a place after
  "in", "at", "to"…; when: a date; how many/much: a number or amount).

Not for: SQL, or the facts and conflicts around an answer
(:mod:`qmesh.memory.query`).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Final

import attrs

from qmesh.memory.extract import EVENT_PREDICATES
from qmesh.memory.question import FAMILIES, Question
from qmesh.memory.records import Fact, MentionSpan, StoredSentence
from qmesh.memory.terms import STOPWORDS, content_stems, stem, words

__all__ = ["MAX_ANSWER_SENTENCES", "choose", "predicate_stems"]

MAX_ANSWER_SENTENCES: Final = 3
# Answer sentences within this much of the best score are all quoted, so
# that equally good sources (and sources that disagree) are shown together.
_ANSWER_MARGIN: Final = 0.6

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
    "makes": frozenset(stem(w) for w in "make makes manufacture".split()),
}
_PLACE_BEFORE_RE: Final = re.compile(
    r"\b(?:in|at|near|to|from|across|outside|around|throughout|into)\s+(?:the\s+)?$",
    re.IGNORECASE,
)
_EVENT_PLACE_BEFORE_RE: Final = re.compile(r"\b(?:in|at|near)\s+(?:the\s+)?$", re.IGNORECASE)
_AMOUNTS: Final = {
    "how many": frozenset({"number", "money", "percent"}),
    "how much": frozenset({"money", "percent"}),
}
# A count written in figures ("2,000", "1.5 million"), not a year ("1998").
_NUMERAL_RE: Final = re.compile(
    r"(?!(?:1[0-9]|20)\d{2}$)\d[\d,]*(?:\.\d+)?(?:\s(?:thousand|million|billion))?"
)
_COUNT_GAP_RE: Final = re.compile(r"\s+(?:(?:new|more|full-time|permanent|active)\s+)?([\w-]+)")


def predicate_stems(predicate: str) -> set[str]:
    """The stems a question may use for ``predicate``: its own words' and
    those of the relation it states ("based" for "located in")."""
    stems = {stem(w) for w in predicate.split() if w not in STOPWORDS}
    stems |= _PREDICATE_WORDS.get(predicate, frozenset())
    for family in FAMILIES:
        if predicate in family.predicates or predicate in family.dated:
            stems |= family.cues
    return stems


@attrs.frozen
class _Sentences:
    """The candidate sentences and what is known of each."""

    text: Mapping[int, StoredSentence]
    spans: Mapping[int, Sequence[MentionSpan]]
    facts: Mapping[int, Sequence[Fact]]
    stems: Mapping[int, frozenset[str]]

    def kinds(self, seq: int, exclude: set[int]) -> set[str]:
        kinds = set()
        for span in self.spans.get(seq, ()):
            if span.entity.id not in exclude:
                kinds.add(span.entity.kind)
                # An entity's kind is its first mention's: "2,000" may be the year 2000.
                if _NUMERAL_RE.fullmatch(span.surface):
                    kinds.add("number")
        return kinds

    def mentions(self, seq: int, ids: set[int]) -> bool:
        return any(s.entity.id in ids for s in self.spans.get(seq, ()))

    def before(self, seq: int, span: MentionSpan) -> str:
        sentence = self.text[seq]
        return sentence.text[: span.start - sentence.start]


def choose(
    parsed: Question,
    facts: Sequence[Fact],
    sentences: Mapping[int, StoredSentence],
    spans: Mapping[int, Sequence[MentionSpan]],
) -> list[int]:
    """The sentences that answer ``parsed``, best first (see the module docstring)."""
    by_sentence: dict[int, list[Fact]] = {}
    for fact in facts:
        for seq in fact.support:
            by_sentence.setdefault(seq, []).append(fact)
    known = _Sentences(
        sentences,
        spans,
        by_sentence,
        {seq: frozenset(content_stems(s.text)) for seq, s in sentences.items()},
    )
    order = {seq: (s.document_id, s.start) for seq, s in sentences.items()}
    if parsed.dangling:
        return []
    if parsed.groups and parsed.counted:
        scored = _counts(parsed, known)
    elif parsed.family is not None and parsed.wh is not None:
        if parsed.groups:
            scored = _relation(parsed, facts, known)
        else:
            # "Who makes rocket skates?": no entity to hold a role, but the
            # sentence must still state the relation asked about.
            family = parsed.family
            scored = {
                seq: score
                for seq, score in _by_words(parsed, known).items()
                if any(
                    family.states(f.predicate)
                    or (parsed.wh == "when" and f.predicate in family.dated)
                    for f in known.facts.get(seq, ())
                )
            }
    else:
        scored = _by_words(parsed, known)
    ranked = sorted(scored.items(), key=lambda item: (-item[1], order[item[0]]))
    chosen: list[int] = []
    texts: set[str] = set()
    for seq, score in ranked:
        if score < ranked[0][1] - _ANSWER_MARGIN:
            break
        text = sentences[seq].text
        if text not in texts and len(texts) >= MAX_ANSWER_SENTENCES:
            continue
        texts.add(text)
        chosen.append(seq)
    return chosen


# -- "How many N" -------------------------------------------------------------------


def _counts(parsed: Question, known: _Sentences) -> dict[int, float]:
    """Sentences in which the question's entity has a number of N: the
    number is followed by N (or a synonym), and the nearest entity before
    it, outside a prepositional phrase, is the question's."""
    groups = [{e.id for e in group} for group in parsed.groups]
    found: dict[int, float] = {}
    for seq, spans in known.spans.items():
        if not all(known.mentions(seq, ids) for ids in groups):
            continue
        sentence = known.text[seq]
        for index, span in enumerate(spans):
            # By its surface: "2,000" may name an entity first met as the year 2000.
            if span.entity.kind != "number" and not _NUMERAL_RE.fullmatch(span.surface):
                continue
            noun = _COUNT_GAP_RE.match(sentence.text, span.end - sentence.start)
            if noun is None or stem(noun.group(1).lower()) not in parsed.counted:
                continue
            holder = next(
                (
                    s
                    for s in reversed(spans[:index])
                    if s.entity.kind in ("name", "org")
                    and not re.search(r"\b(?:in|at|of|from|with|by|for|to)\s+(?:the\s+)?$",
                                      known.before(seq, s), re.IGNORECASE)
                ),
                None,
            )  # fmt: skip
            if holder is not None and holder.entity.id in groups[0] | set().union(*groups):
                found[seq] = 1.0 + _share(parsed.asked, known.stems[seq])
    return found


# -- questions about a relation -------------------------------------------------------


def _relation(parsed: Question, facts: Sequence[Fact], known: _Sentences) -> dict[int, float]:
    """Sentences that state the question's relation with its entity in the
    asked role and an answer of the asked type (see the module docstring)."""
    family = parsed.family
    assert family is not None
    groups = [({e.id for e in group}, role) for group, role in zip(
        parsed.groups, parsed.roles, strict=True)]  # fmt: skip
    question_ids = set().union(*(ids for ids, _ in groups))
    found: dict[int, float] = {}
    for fact in facts:
        if fact.predicate in family.dated and fact.object.kind == "date":
            # "Acme founded in 1998": the date of the asked event itself, or
            # (with "in Springfield") where it happened.
            if parsed.wh not in ("when", "where") or fact.subject.id not in question_ids:
                continue
            for seq in fact.support:
                if seq not in known.text or not _others_present(known, seq, groups, fact):
                    continue
                if parsed.wh == "where" and not (
                    family.place and _event_place(known, seq, question_ids, fact)
                ):
                    continue
                score = 2.0 + _share(parsed.asked, known.stems[seq])
                found[seq] = max(found.get(seq, 0.0), score)
            continue
        if not family.states(fact.predicate):
            continue
        answer = _answer_end(fact, groups, family.symmetric)
        if answer is None:
            continue
        for seq in fact.support:
            if seq not in known.text or not _others_present(known, seq, groups, fact):
                continue
            typed = _typed(parsed, fact, answer, seq, known, question_ids)
            if typed is not None:
                found[seq] = max(found.get(seq, 0.0), typed)
    return found


def _answer_end(
    fact: Fact, groups: Sequence[tuple[set[int], str | None]], symmetric: bool
) -> str | None:
    """The end of ``fact`` that answers ("subject" or "object"): the one the
    question's entities do not hold, when one of them holds the other in
    its asked role and none holds the wrong one."""
    ends = {"subject": fact.subject.id, "object": fact.object.id}
    placed: set[str] = set()
    for ids, role in groups:
        at = {end for end, eid in ends.items() if eid in ids}
        if not at:
            continue
        if role is None or symmetric:
            placed |= at
        elif role in at:
            placed.add(role)
        else:
            return None  # "What did Initech acquire?" and "Acme acquired Initech"
    if not placed:
        return None
    if len(placed) == 2:
        return "both"  # "When did X move its headquarters to Y?": a value is asked
    return "object" if placed == {"subject"} else "subject"


def _others_present(
    known: _Sentences, seq: int, groups: Sequence[tuple[set[int], str | None]], fact: Fact
) -> bool:
    """Every entity of the question is an end of the fact or named in the sentence."""
    ends = {fact.subject.id, fact.object.id}
    return all(ids & ends or known.mentions(seq, ids) for ids, _ in groups)


def _typed(
    parsed: Question,
    fact: Fact,
    answer: str,
    seq: int,
    known: _Sentences,
    question_ids: set[int],
) -> float | None:
    """The score of sentence ``seq`` as an answer through ``fact`` if it
    has an answer of the asked type, else None."""
    family = parsed.family
    assert family is not None
    other = fact.object if answer == "object" else fact.subject
    share = _share(parsed.asked, known.stems[seq])
    wh = parsed.wh
    if answer == "both" and wh not in ("when", "how many", "how much"):
        return None
    if wh in ("who", "what", "which"):
        if other.id in question_ids or other.kind in ("date", "number", "money", "percent"):
            return None
        if wh == "who" and other.kind not in ("name", "org"):
            return None
        return 2.0 + share
    if wh == "where":
        if family.place:
            return 2.0 + share if _event_place(known, seq, question_ids, fact) else None
        return (
            2.0 + share if other.kind in ("name", "org") and other.id not in question_ids else None
        )
    # when, how many, how much: a value the sentence states for the event,
    # on words: the sentence must also say what else the question asks.
    if parsed.asked and _share(parsed.asked, known.stems[seq]) < 0.5:
        return None
    if wh == "when":
        return 1.0 + share if _free_date(known, seq, family.dated) else None
    if wh in _AMOUNTS:
        kinds = known.kinds(seq, question_ids)
        return 1.0 + share if kinds & _AMOUNTS[wh] else None
    return None


def _event_place(known: _Sentences, seq: int, question_ids: set[int], fact: Fact) -> bool:
    """Whether the sentence names a place for the event: a name after "in",
    "at" or "near" that is neither the question's entity nor an end of it."""
    ends = {fact.subject.id, fact.object.id}
    return any(
        span.entity.kind in ("name", "org")
        and span.entity.id not in question_ids | ends
        and _EVENT_PLACE_BEFORE_RE.search(known.before(seq, span))
        for span in known.spans.get(seq, ())
    )


def _free_date(known: _Sentences, seq: int, dated: Iterable[str]) -> bool:
    """Whether the sentence has a date that no other event claims ("sold in
    2018" is not a founding date)."""
    own = set(dated)
    claimed = {
        f.object.id
        for f in known.facts.get(seq, ())
        if f.object.kind == "date" and f.predicate not in own
    }
    return any(
        s.entity.kind == "date" and s.entity.id not in claimed for s in known.spans.get(seq, ())
    )


def _share(terms: frozenset[str], stems: frozenset[str]) -> float:
    return len(terms & stems) / len(terms) if terms else 1.0


# -- questions answered by words ---------------------------------------------------


def _roles_agree(parsed: Question, facts: Sequence[Fact]) -> bool:
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


def _type_ok(parsed: Question, seq: int, known: _Sentences, exclude: set[int]) -> bool:
    """Whether the sentence has something of the type the question word wants."""
    wh = parsed.wh
    if wh == "when":
        return "date" in known.kinds(seq, exclude)
    if wh in _AMOUNTS:
        return bool(known.kinds(seq, exclude) & _AMOUNTS[wh])
    if wh == "who":
        return bool(known.kinds(seq, exclude) & {"name", "org"})
    if wh == "where":
        return any(
            s.entity.kind in ("name", "org")
            and s.entity.id not in exclude
            and _PLACE_BEFORE_RE.search(known.before(seq, s))
            for s in known.spans.get(seq, ())
        )
    return True


def _by_words(parsed: Question, known: _Sentences) -> dict[int, float]:
    group_ids = [{e.id for e in group} for group in parsed.groups]
    all_ids = set().union(*group_ids) if group_ids else set()
    lengths = {seq: len(words(s.text)) for seq, s in known.text.items()}
    asked = parsed.terms.union(*(content_stems(p) for p in parsed.phrases))
    relevance = _relevance(asked, known.stems, lengths)
    best = max(relevance.values(), default=0.0)
    found: dict[int, float] = {}
    for seq, sentence in known.text.items():
        facts = known.facts.get(seq, [])
        mentioned = {s.entity.id for s in known.spans.get(seq, ())}
        covered_groups = sum(1 for ids in group_ids if ids & mentioned)
        predicates: set[str] = set()
        linked = False
        for fact in facts:
            if not all_ids or fact.subject.id in all_ids or fact.object.id in all_ids:
                predicates |= predicate_stems(fact.predicate)
                linked = linked or bool(parsed.terms & predicate_stems(fact.predicate))
        covered = {t for t in parsed.terms if t in known.stems[seq] or t in predicates}
        wh_ok = _type_ok(parsed, seq, known, all_ids)
        if group_ids:
            need = math.ceil(len(parsed.terms) / 2)
            supported = covered_groups == len(group_ids) and len(covered) >= need
        else:
            supported = bool(parsed.terms) and covered == parsed.terms
        text = sentence.text.lower()
        supported = supported and all(name in text for name in parsed.unknown)
        supported = supported and _roles_agree(parsed, facts)
        if parsed.terms:
            supported = supported and wh_ok
        if not supported:
            continue
        entity_share = covered_groups / len(group_ids) if group_ids else 0.0
        term_share = len(covered) / len(parsed.terms) if parsed.terms else 1.0
        score = (
            2.0 * entity_share
            + 1.5 * term_share
            + (0.5 if wh_ok else 0.0)
            + (0.5 if linked else 0.0)
            + 0.3 * (relevance[seq] / best if best > 0 else 0.0)
        )
        if not parsed.terms and all_ids:
            # "Tell me about Acme": prefer sentences that state facts about it
            # over ones that only name it (a heading, a passing mention).
            stated = sum(1 for f in facts if f.subject.id in all_ids or f.object.id in all_ids)
            score += min(0.6, 0.2 * stated)
        found[seq] = score
    return found


_BM25_K1: Final = 1.2
_BM25_B: Final = 0.75


def _relevance(
    terms: frozenset[str], stems: Mapping[int, frozenset[str]], lengths: Mapping[int, int]
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
