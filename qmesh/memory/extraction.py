"""What an extractor returns, and the proof that it can be cited.

For: the :class:`Extractor` protocol that every extractor implements (the
rules of :mod:`qmesh.memory.extract`; :class:`qmesh.memory.llm.LlmExtractor`
adds a model's triples through ``qg://task=extract``), the
:class:`Extraction` it returns, and :func:`check_extraction`, which proves
that an extraction can be cited before anything is stored: every mention is
a span of its sentence whose text is exactly that slice, and every relation
joins two distinct mentions of the same sentence. An extractor only ever
sees one sentence per :class:`Extraction`, so whatever it returns is
supported by that sentence or rejected.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, Protocol

import attrs

from qmesh.memory.errors import ProvenanceError

__all__ = [
    "KINDS",
    "MAX_MENTIONS",
    "MAX_RELATIONS",
    "Extraction",
    "Extractor",
    "Mention",
    "Relation",
    "check_extraction",
]

KINDS: Final = ("name", "org", "term", "concept", "date", "money", "percent", "number")
"""Mention kinds. ``concept`` is a common-noun phrase that is the object of
"is a"; ``term`` a quoted expression; the last four are values."""


@attrs.frozen
class Mention:
    """``sentence[start:end] == text``."""

    start: int
    end: int
    text: str
    kind: str
    refers: str | None = None
    """For a mention that names its entity only through an earlier one of the
    same document ("it", "the firm", a surname, a short name): that earlier
    mention's text, the name the store resolves it by (see
    :mod:`qmesh.memory.coref`). The mention's own text stays its exact span."""


@attrs.frozen
class Relation:
    """``subject`` and ``object`` index the extraction's mentions."""

    subject: int
    predicate: str
    object: int


@attrs.frozen
class Extraction:
    mentions: tuple[Mention, ...] = ()
    relations: tuple[Relation, ...] = ()
    same_as: tuple[tuple[int, int], ...] = ()
    """Pairs of mentions that name one entity, the fuller name first."""


class Extractor(Protocol):
    """Turns sentences into extractions, one per sentence, in order."""

    @property
    def name(self) -> str: ...

    def extract(self, sentences: Sequence[str]) -> list[Extraction]: ...


_MAX_PREDICATE: Final = 60
_MAX_REFERS: Final = 300

MAX_MENTIONS: Final = 256
"""Mentions any extractor may return for one sentence: the store writes a
row per mention inside the state store's one write transaction, so this
(with the document size) bounds how long an ingest holds it."""
MAX_RELATIONS: Final = 256
"""Relations (and alias pairs) any extractor may return for one sentence."""


def check_extraction(sentence: str, extraction: Extraction) -> None:
    """Raise :class:`ProvenanceError` unless every mention slices ``sentence``
    exactly, every relation and alias joins two distinct mentions, and there
    are at most :data:`MAX_MENTIONS` and :data:`MAX_RELATIONS` of them."""
    count = len(extraction.mentions)
    if (
        count > MAX_MENTIONS
        or len(extraction.relations) > MAX_RELATIONS
        or len(extraction.same_as) > MAX_RELATIONS
    ):
        raise ProvenanceError(
            f"an extraction of {count} mentions and {len(extraction.relations)} relations is "
            f"more than one sentence can state (at most {MAX_MENTIONS} and {MAX_RELATIONS})"
        )
    for mention in extraction.mentions:
        if not 0 <= mention.start < mention.end <= len(sentence):
            raise ProvenanceError(f"mention {mention.text!r} lies outside its sentence")
        if sentence[mention.start : mention.end] != mention.text or not mention.text.strip():
            raise ProvenanceError(f"mention {mention.text!r} does not match its sentence span")
        if mention.kind not in KINDS:
            raise ProvenanceError(f"mention {mention.text!r} has unknown kind {mention.kind!r}")
        refers = mention.refers
        if refers is not None and (
            not isinstance(refers, str)
            or not refers.strip()
            or len(refers) > _MAX_REFERS
            or mention.kind not in ("name", "org")
        ):
            raise ProvenanceError(f"mention {mention.text!r} refers to an unusable antecedent")
    for relation in extraction.relations:
        if not (0 <= relation.subject < count and 0 <= relation.object < count):
            raise ProvenanceError(f"relation {relation!r} names a mention the sentence lacks")
        if relation.subject == relation.object:
            raise ProvenanceError(f"relation {relation!r} joins a mention to itself")
        predicate = relation.predicate
        if not predicate or predicate != predicate.strip() or len(predicate) > _MAX_PREDICATE:
            raise ProvenanceError(f"relation {relation!r} has an unusable predicate")
    for a, b in extraction.same_as:
        if not (0 <= a < count and 0 <= b < count) or a == b:
            raise ProvenanceError(f"alias pair {(a, b)!r} names a mention the sentence lacks")
