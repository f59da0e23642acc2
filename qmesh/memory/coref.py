"""What "it", "the firm", "she" and a lone surname stand for, within one
document: the references a careful reader resolves before reading a
sentence's facts.

For: :func:`resolve_references`, run on a document's sentences after
extraction (by :class:`qmesh.memory.service.Memory`). It finds, in each
sentence,

* pronouns: "it"/"its" for an organisation (never a person or a place),
  "he"/"him"/"his" and "she"/"her" for a person (of that gender when the
  text has said which: a pronoun it resolved, "actress", "her son X",
  "X, his daughter");
* definite descriptions of a company: "the company", "the firm", "the
  startup", "the family-run business", "the airline" (the nouns are
  :data:`~qmesh.memory.idioms.COMPANY_NOUNS`), never an institution ("the
  company" is not the university);
* a surname alone ("Doe") for the one person of the document with that
  surname, and a short name ("Globex") for the one organisation whose
  longer name starts with it ("Globex Industries");

and resolves each to the nearest compatible antecedent: first the
sentence's own earlier mentions, then the paragraph's earlier sentences
(each sentence's subject first), then the subjects of earlier paragraphs
(a section that begins "The company …" speaks of what the document is
about). Mentions inside a prepositional phrase ("at Initech Labs") are
antecedents of "he" and "she" but not of "it" or "the company", which
name what the text is about. Each resolved reference becomes a
:class:`~qmesh.memory.extraction.Mention` of its exact span with
``refers`` set to the antecedent's name; the sentence is then read again by
the rules with those mentions in place of the words, so "It was founded in
1998 by Jane Doe" gives "Jane Doe founded Acme", supported by that
sentence, which stays the cited text.

An entity's type (organisation, person, place, or unknown) comes from how
the document writes about it: a corporate or industry word in its name, a
company noun before or after it ("toy maker Acme", "X is a furniture
maker"), a person's cues ("the physicist X", "X, who", "X was born"),
a place's ("in X", "X-based"); otherwise a name of several words is a
person's and a single word unknown (an "it" may stand for it).

Not for: plural references ("they", "both firms", "the two"), references
across documents, events ("the deal", "the sale"), or anything a reader
needs the world to resolve. A pronoun with no compatible antecedent stays
unresolved, and its sentence yields what the rules find without it.
Pure functions; no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from typing import Final, Literal

import attrs

from qmesh.memory.extraction import MAX_MENTIONS, MAX_RELATIONS, Extraction, Mention, Relation
from qmesh.memory.idioms import COMPANY_NOUNS
from qmesh.memory.mentions import CONNECTORS, ORG_WORDS, RULE_MENTIONS
from qmesh.memory.sentences import Sentence
from qmesh.memory.terms import STOPWORDS, entity_key

__all__ = ["Reextract", "is_description", "resolve_references"]

Reextract = Callable[[str, Sequence[Mention]], Extraction]
"""Reads one sentence again with the given reference mentions in place
(:meth:`qmesh.memory.extract.RuleExtractor.extract_one`)."""

Type = Literal["org", "person", "place", "unknown"]
Gender = Literal["female", "male"]

_PARAGRAPH_RE: Final = re.compile(r"\n[ \t\r\f\v]*\n")
_PARAGRAPH_LOOKBACK: Final = 12
"""Sentences of the paragraph searched for an antecedent, nearest first."""
_BATCH: Final = 64
"""Sentences resolved between two checkpoints."""
_EARLIER_LOOKBACK: Final = 40
"""Sentences of earlier paragraphs whose subjects may be antecedents."""
_PRONOUN_RE: Final = re.compile(r"\b(?:it|its|he|him|his|she|her|hers)\b", re.IGNORECASE)
_DESCRIPTION_RE: Final = re.compile(
    r"\b(?:[Tt]he|[Tt]his|[Tt]hat)\s+"
    r"(?:(?!(?:the|a|an|this|that|its|his|her|their|of|and|or|is|was)\b)[a-z][\w-]*\s+){0,2}?"
    rf"(?:{'|'.join(sorted(COMPANY_NOUNS, key=len, reverse=True))})\b(?![-\w])"
)
# Not a reference: "the other company", "the only ferry operator" (after "is").
_NOT_REFERRING_MODIFIERS: Final = frozenset(
    "other another rival parent new first second third last next former only same-named".split()
)
_COPULA_BEFORE_RE: Final = re.compile(r"\b(?:is|was|are|were|became|remains|as)\s+$")
# "it is expected that", "it seems": no antecedent.
_PLEONASTIC_RE: Final = re.compile(
    r"\s+(?:(?:is|was|'s|’s|would\s+be|will\s+be)\s+(?:not\s+|also\s+|now\s+)?"
    r"(?:expected|likely|unlikely|possible|impossible|clear|unclear|said|reported|believed|"
    r"thought|known|important|hard|easy|difficult|necessary|true|worth|time|too)\b"
    r"|seems|seemed|appears|appeared|takes|took|remains\s+to)",
    re.IGNORECASE,
)
_IN_PHRASE_RE: Final = re.compile(
    r"(?:^|\W)(?:in|on|at|of|from|with|by|for|to|after|before|near|since|during|about|across|"
    r"than|into|over|under|between|among|like|around|outside|throughout)\s+"
    r"(?:(?:the|a|an)\s+)?(?:[a-z][\w-]*\s+){0,2}$",
    re.IGNORECASE,
)

_INSTITUTION_WORDS: Final = frozenset(
    """
    university institute college school hospital museum ministry agency council committee
    forum society association academy church club team federation union foundation library
    department party institution
    """.split()
)
_FEMALE: Final = frozenset(
    """
    woman businesswoman chairwoman wife mother daughter sister granddaughter
    great-granddaughter aunt niece actress widow girlfriend queen princess stepdaughter
    """.split()
)
_MALE: Final = frozenset(
    """
    man businessman chairman husband father son brother grandson great-grandson uncle nephew
    actor widower boyfriend king prince stepson
    """.split()
)
_HONORIFICS: Final = frozenset("mr mrs ms mx dr prof sir dame".split())
_TITLE_WORDS: Final = frozenset(
    "ceo cto cfo coo founder co-founder cofounder chairman chairwoman president executive".split()
)
_PERSON_CUE_AFTER_RE: Final = re.compile(
    r"^(?:\s*,\s*who\b|\s+who\b|\s+(?:was|is)\s+born\b|\s*,\s*who\s+was\s+born\b|\s*\(\s*born\b)"
)
_ORG_CUE_AFTER_RE: Final = re.compile(
    r"^(?:\s*,\s*which\b|\s+(?:was|is|has\s+been)\s+(?:founded|established|set\s+up|started|"
    r"acquired|bought|incorporated|headquartered|based)\b)"
)
_IS_A_AFTER_RE: Final = re.compile(
    r"^(?:\s+(?:is|was|are|were|remains)\s+|\s*,\s*)(?:a|an|the)\s+((?:[\w-]+\s+){0,5}?[\w-]+)"
    r"(?=\s*(?:[,;.!?]|$)|\s+(?:of|from|in|based|that|which|who|with|for|and)\b)"
)
_NOUN_BEFORE_RE: Final = re.compile(r"(?:^|\s)([a-z][\w-]*)\s+$")
_PERSON_NOUN_BEFORE_RE: Final = re.compile(
    r"\b(?:the|a|an|two|three|four|both)\s+(?:[a-z][\w-]*\s+)?[a-z][\w-]*,?\s+$"
)
_PLACE_BEFORE_RE: Final = re.compile(
    r"\b(?:in|at|near|to|across|outside|around|throughout)\s+(?:the\s+)?$", re.IGNORECASE
)
_GENDER_BEFORE_RE: Final = re.compile(r"\b(?:her|his|their|the|a|an)\s+([a-z][\w-]*)\s+$")
_GENDER_AFTER_RE: Final = re.compile(
    r"^(?:\s*,\s*(?:her|his|its|their|the|a|an)\s+(?:[\w-]+\s+)?([a-z][\w-]*)"
    r"|\s+(?:is|was)\s+(?:a|an|the)\s+(?:[\w-]+\s+){0,4}?([a-z][\w-]*)(?=\s*[,.;]|\s*$))"
)


@attrs.frozen
class _Entity:
    """An entity of the document, by the first name it was given."""

    key: str
    name: str
    kind: str


@attrs.define
class _Facts:
    """What the document says about one entity's type and gender."""

    org: int = 0
    person: int = 0
    place: int = 0
    words: int = 1
    gender: Gender | None = None

    def type(self) -> Type:
        if self.org:
            return "org"
        if self.person:
            return "person"
        if self.place:
            return "place"
        return "person" if self.words > 1 else "unknown"


@attrs.frozen
class _Realization:
    """An entity as one sentence names or refers to it."""

    entity: _Entity
    start: int
    end: int
    in_phrase: bool
    heads: bool
    """A possessive whose noun phrase has a name of its own as head ("Its
    rival Globex"): the head, not the possessive, is the subject."""


@attrs.define
class _Document:
    text: str
    sentences: Sequence[Sentence]
    extractions: Sequence[Extraction]
    occurrences: dict[str, list[tuple[str, Mention]]] = attrs.Factory(dict)
    """Key → every name mention with that key, with its sentence's text."""
    facts: dict[str, _Facts] = attrs.Factory(dict)
    """Key → what the document says of its type and gender (learnt when first asked)."""
    entities: dict[str, _Entity] = attrs.Factory(dict)
    """Key → the entity, named as it was first (so far in the reading)."""
    surnames: dict[str, set[str]] = attrs.Factory(dict)
    """Last word → keys (of several words, so far) that end with it."""
    prefixes: dict[str, set[str]] = attrs.Factory(dict)
    """First word → keys (of several words, so far) that start with it."""


def _index_entity(document: _Document, entity: _Entity) -> None:
    words = entity.key.split()
    if len(words) > 1:
        document.surnames.setdefault(words[-1], set()).add(entity.key)
        document.prefixes.setdefault(words[0], set()).add(entity.key)


def is_description(text: str) -> bool:
    """Whether a mention's text is a pronoun or a description ("the firm"),
    not a name: such a mention is no alias of its entity."""
    lower = text.strip().lower()
    if _PRONOUN_RE.fullmatch(lower):
        return True
    return bool(_DESCRIPTION_RE.fullmatch(text.strip()))


def _type_of(document: _Document, key: str) -> Type:
    return _facts(document, key).type()


def _facts(document: _Document, key: str) -> _Facts:
    facts = document.facts.get(key)
    if facts is None:
        facts = document.facts[key] = _learn(key, document.occurrences.get(key, ()))
    return facts


def _is_institution(name: str) -> bool:
    return any(w in _INSTITUTION_WORDS for w in name.lower().split())


def _learn(key: str, occurrences: Sequence[tuple[str, Mention]]) -> _Facts:
    """What the document says of one name's type and gender, over all of
    its mentions (see the module docstring)."""
    facts = _Facts(words=len(key.split()))
    for text, mention in occurrences:
        words = [w for w in mention.text.lower().split() if w not in CONNECTORS]
        before, after = text[: mention.start], text[mention.end :]
        noun = _NOUN_BEFORE_RE.search(before, max(0, mention.start - 40))
        is_a = _IS_A_AFTER_RE.match(after)
        is_a_words = is_a.group(1).lower().split() if is_a else []
        if (
            mention.kind == "org"
            or any(w in ORG_WORDS for w in words)
            or (noun is not None and noun.group(1) in COMPANY_NOUNS)
            or any(w in COMPANY_NOUNS for w in is_a_words)
            or _ORG_CUE_AFTER_RE.match(after)
        ):
            facts.org += 1
        elif (
            _PERSON_CUE_AFTER_RE.match(after)
            or (noun is not None and noun.group(1).lower() in _HONORIFICS | _TITLE_WORDS)
            or (noun is not None and noun.group(1) in _FEMALE | _MALE)
            or any(w in _FEMALE | _MALE for w in is_a_words)
        ):
            facts.person += 1
        elif _PLACE_BEFORE_RE.search(before, max(0, mention.start - 40)) or re.match(
            r"-(?:based|headquartered)\b", after
        ):
            facts.place += 1
        elif noun is not None and _is_person_noun(before, noun):
            facts.person += 1
        gender = _gender_cue(before, after)
        if gender is not None and facts.gender is None:
            facts.gender = gender
    return facts


def _is_person_noun(before: str, noun: re.Match[str]) -> bool:
    """ "the physicist X", "three engineers, X": a common noun (not a
    company's) right before a name, after a determiner or a number."""
    word = noun.group(1)
    if word in STOPWORDS or word in COMPANY_NOUNS or word in ORG_WORDS:
        return False
    return bool(_PERSON_NOUN_BEFORE_RE.search(before, max(0, len(before) - 60)))


def _gender_cue(before: str, after: str) -> Gender | None:
    words: list[str] = []
    match = _GENDER_BEFORE_RE.search(before, max(0, len(before) - 40))
    if match:
        words.append(match.group(1))
    match = _GENDER_AFTER_RE.match(after)
    if match:
        words.append(match.group(1) or match.group(2))
    for word in words:
        if word in _FEMALE:
            return "female"
        if word in _MALE:
            return "male"
    return None


def _is_in_phrase(text: str, start: int) -> bool:
    return bool(_IN_PHRASE_RE.search(text, max(0, start - 50), start))


def _heads(text: str, possessive_end: int, following: Sequence[Mention]) -> bool:
    """Whether the next name after a possessive heads its noun phrase: only
    non-function lower-case words ("rival") between them."""
    for mention in following:
        if mention.start < possessive_end or mention.kind not in ("name", "org"):
            continue
        between = text[possessive_end : mention.start].split()
        return len(between) <= 2 and all(
            w.islower() and w.isalpha() and w not in STOPWORDS for w in between
        )
    return False


@attrs.frozen
class _Reference:
    start: int
    end: int
    text: str
    wants: Literal["org", "company", "male", "female", "name"]
    """What it may stand for: an organisation ("it"), a company ("the firm"),
    a man or a woman, or (a surname, a short name) the entity ``name``."""
    name: _Entity | None = None
    """For a surname or a short name: the entity it stands for, already known."""


def _references(document: _Document, text: str, mentions: Sequence[Mention]) -> list[_Reference]:
    """The references of one sentence, in order (see the module docstring)."""
    taken = [(m.start, m.end) for m in mentions]

    def free(start: int, end: int) -> bool:
        return not any(s < end and start < e for s, e in taken)

    found: list[_Reference] = []
    for match in _PRONOUN_RE.finditer(text):
        if not free(match.start(), match.end()):
            continue
        word = match.group().lower()
        if word == "it" and _PLEONASTIC_RE.match(text, match.end()):
            continue
        wants: Literal["org", "male", "female"] = (
            "org" if word in ("it", "its") else "male" if word in ("he", "him", "his") else "female"
        )
        found.append(_Reference(match.start(), match.end(), match.group(), wants))
    for match in _DESCRIPTION_RE.finditer(text):
        start, end = match.span()
        modifiers = match.group().lower().split()[1:-1]
        if not free(start, end) or any(m in _NOT_REFERRING_MODIFIERS for m in modifiers):
            continue
        rest = text[end:]
        possessed = rest.startswith(("'s", "’s"))
        if not possessed and _COPULA_BEFORE_RE.search(text, 0, start):
            continue  # "X is the only ferry operator": says what X is
        if re.match(r"\s+(?:of\b|[A-Z])", rest):
            continue  # "the grocery chain Initech", "the group of companies"
        found.append(_Reference(start, end, match.group(), "company"))
    for mention in mentions:
        key = entity_key(mention.text)
        if mention.kind not in ("name", "org") or " " in key or not key:
            continue
        if key in document.entities:
            continue  # a name of its own, used before
        by_surname = {
            k for k in document.surnames.get(key, ()) if _type_of(document, k) == "person"
        }
        by_prefix = {k for k in document.prefixes.get(key, ()) if _type_of(document, k) != "person"}
        if len(by_surname) + len(by_prefix) != 1:
            continue
        entity = document.entities[next(iter(by_surname | by_prefix))]
        found.append(_Reference(mention.start, mention.end, mention.text, "name", entity))
    found.sort(key=lambda r: r.start)
    # A sentence of a hundred pronouns is no prose: the first few are read.
    return found[:RULE_MENTIONS]


def _compatible(document: _Document, reference: _Reference, entity: _Entity) -> bool:
    kind = _type_of(document, entity.key)
    if reference.wants == "org":
        return kind in ("org", "unknown")
    if reference.wants == "company":
        return kind in ("org", "unknown") and not _is_institution(entity.name)
    if kind != "person":
        return False
    gender = _facts(document, entity.key).gender
    return gender is None or gender == reference.wants


def _candidates(
    reference: _Reference,
    current: Sequence[_Realization],
    paragraph: Sequence[Sequence[_Realization]],
    earlier: Sequence[Sequence[_Realization]],
) -> Iterator[_Realization]:
    """The antecedents a reference may have, nearest first: the sentence's
    own earlier ones (right to left), then each earlier sentence of the
    paragraph (its subject first), then the subjects of earlier paragraphs.
    For "it" and "the company" a mention inside a prepositional phrase, or
    a possessive that a name heads ("Its rival Globex"), is passed over."""
    person = reference.wants in ("male", "female")
    for realization in reversed(current):
        if realization.end <= reference.start and (
            person or not (realization.in_phrase or realization.heads)
        ):
            yield realization
    for realizations in reversed(paragraph):
        for realization in realizations:
            if not realization.heads and (person or not realization.in_phrase):
                yield realization
    if not person:
        for realizations in reversed(earlier):
            for realization in realizations:
                if not (realization.in_phrase or realization.heads):
                    yield realization  # the subject only
                    break


def _antecedent(
    document: _Document,
    reference: _Reference,
    current: Sequence[_Realization],
    paragraph: Sequence[Sequence[_Realization]],
    earlier: Sequence[Sequence[_Realization]],
) -> _Entity | None:
    """The nearest compatible antecedent (see :func:`_candidates`)."""
    for realization in _candidates(reference, current, paragraph, earlier):
        if _compatible(document, reference, realization.entity):
            return realization.entity
    return None


def resolve_references(
    text: str,
    sentences: Sequence[Sentence],
    extractions: Sequence[Extraction],
    reextract: Reextract,
    checkpoint: Callable[[], None] = lambda: None,
) -> list[Extraction]:
    """The extractions of a document's ``sentences`` (which slice ``text``)
    with its references resolved: each becomes a mention that ``refers`` to
    its antecedent's name, and each sentence with a new reference is read
    again with ``reextract``; what it finds is added to what was there.
    Linear in the document: an antecedent is looked for among at most
    :data:`_PARAGRAPH_LOOKBACK` sentences and :data:`_EARLIER_LOOKBACK`
    earlier subjects; ``checkpoint`` is called every :data:`_BATCH` sentences
    (it raises to stop the work)."""
    document = _Document(text, sentences, extractions)
    if not _may_refer(document):
        return list(extractions)
    paragraph: list[list[_Realization]] = []
    earlier: list[list[_Realization]] = []
    out: list[Extraction] = []
    previous_end: int | None = None
    for index, (sentence, extraction) in enumerate(zip(sentences, extractions, strict=True)):
        if index % _BATCH == 0:
            checkpoint()
        if previous_end is not None and _PARAGRAPH_RE.search(text, previous_end, sentence.start):
            earlier.extend(paragraph)
            del earlier[:-_EARLIER_LOOKBACK]
            paragraph = []
        previous_end = sentence.end
        references = _references(document, sentence.text, extraction.mentions)
        realizations, resolved = _resolve_sentence(
            document, sentence.text, extraction, references, paragraph, earlier
        )
        paragraph.append(realizations)
        del paragraph[:-_PARAGRAPH_LOOKBACK]
        out.append(
            _merge(sentence.text, extraction, resolved, reextract) if resolved else extraction
        )
    return out


def _may_refer(document: _Document) -> bool:
    """Collect the document's names; whether any sentence has something that
    may be a reference (a pronoun, a description, a name of one word that
    another, longer name of the document ends or starts with)."""
    words: set[str] = set()
    singles: set[str] = set()
    found = False
    for sentence, extraction in zip(document.sentences, document.extractions, strict=True):
        text = sentence.text
        for mention in extraction.mentions:
            if mention.kind not in ("name", "org"):
                continue
            key = entity_key(mention.text)
            if not key:
                continue
            document.occurrences.setdefault(key, []).append((text, mention))
            parts = key.split()
            if len(parts) > 1:
                words.update((parts[0], parts[-1]))
            else:
                singles.add(key)
        if not found and (_PRONOUN_RE.search(text) or _DESCRIPTION_RE.search(text)):
            found = True
    return found or bool(singles & words)


def _resolve_sentence(
    document: _Document,
    text: str,
    extraction: Extraction,
    references: Sequence[_Reference],
    paragraph: Sequence[Sequence[_Realization]],
    earlier: Sequence[Sequence[_Realization]],
) -> tuple[list[_Realization], list[Mention]]:
    """Resolve one sentence's references in order (an earlier one may be
    the antecedent of a later one: "It … its"); its realizations and the
    mentions of the resolved references."""
    realizations: list[_Realization] = []
    resolved: list[Mention] = []
    names = {(m.start, m.end): m for m in extraction.mentions}
    spans = {(r.start, r.end) for r in references}
    pending: list[tuple[int, Mention | _Reference]] = [
        *((m.start, m) for m in extraction.mentions if (m.start, m.end) not in spans),
        *((r.start, r) for r in references),
    ]
    pending.sort(key=lambda item: item[0])
    for _, item in pending:
        if isinstance(item, _Reference):
            entity = item.name or _antecedent(document, item, realizations, paragraph, earlier)
            if entity is None:
                continue
            if item.name is not None:
                kind = names[(item.start, item.end)].kind
            else:
                kind = "org" if entity.kind == "org" else "name"
            resolved.append(Mention(item.start, item.end, item.text, kind, entity.name))
            if item.wants in ("male", "female"):
                facts = _facts(document, entity.key)
                if facts.gender is None:
                    facts.gender = "male" if item.wants == "male" else "female"
            realizations.append(_realize(text, item.start, item.end, item.text, entity, extraction))
            continue
        if item.kind not in ("name", "org"):
            continue
        key = entity_key(item.text)
        if not key:
            continue
        entity = document.entities.get(key)
        if entity is None:
            entity = document.entities[key] = _Entity(key, item.text, item.kind)
            _index_entity(document, entity)
        realizations.append(_realize(text, item.start, item.end, item.text, entity, extraction))
    return realizations, resolved


def _realize(
    text: str, start: int, end: int, surface: str, entity: _Entity, extraction: Extraction
) -> _Realization:
    """``entity`` as the sentence ``text`` names it at ``start:end``."""
    possessive = surface.lower() in ("its", "his", "her", "their") or text.startswith(
        ("'s", "’s"), end
    )
    return _Realization(
        entity,
        start,
        end,
        _is_in_phrase(text, start),
        heads=possessive and _heads(text, end, extraction.mentions),
    )


def _merge(
    sentence: str, base: Extraction, references: Sequence[Mention], reextract: Reextract
) -> Extraction:
    """``base`` with ``references`` among its mentions and the relations the
    sentence states through them (found by ``reextract``)."""
    mentions = list(base.mentions)
    at = {(m.start, m.end): i for i, m in enumerate(mentions)}
    kept: list[Mention] = []
    for reference in references:
        span = (reference.start, reference.end)
        if span in at:
            mentions[at[span]] = attrs.evolve(mentions[at[span]], refers=reference.refers)
        elif len(mentions) < MAX_MENTIONS:
            at[span] = len(mentions)
            mentions.append(reference)
        else:
            continue
        kept.append(reference)
    again = reextract(sentence, kept)
    index: dict[int, int] = {}
    for i, mention in enumerate(again.mentions):
        span = (mention.start, mention.end)
        if span not in at:
            if len(mentions) >= MAX_MENTIONS:
                continue
            at[span] = len(mentions)
            mentions.append(mention)
        index[i] = at[span]
    relations = list(base.relations)
    seen = {(r.subject, r.predicate, r.object) for r in relations}
    for relation in again.relations:
        if relation.subject not in index or relation.object not in index:
            continue
        triple = (index[relation.subject], relation.predicate, index[relation.object])
        if triple not in seen and len(relations) < MAX_RELATIONS:
            seen.add(triple)
            relations.append(Relation(*triple))
    same_as = list(base.same_as)
    for a, b in again.same_as:
        if a in index and b in index and (index[a], index[b]) not in same_as:
            same_as.append((index[a], index[b]))
    return Extraction(tuple(mentions), tuple(relations), tuple(same_as[:MAX_RELATIONS]))
