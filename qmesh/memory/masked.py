"""One sentence as the relation rules read it: each mention replaced by the
placeholder ``«index»``, with a map back to the sentence's offsets.

For: :class:`MaskedSentence`, shared by the verb patterns of
:mod:`qmesh.memory.extract` and the idioms of :mod:`qmesh.memory.idioms`,
and the regular-expression pieces both write their patterns with. A
possessive pronoun that stands for an entity ("its", "her") is masked as
``«index»'s``, so that "its chief executive is X" reads like "Acme's chief
executive is X". A *clause* of a sentence ("… and is headquartered in
Springfield") can be read with the sentence's subject put in front of it
(:meth:`MaskedSentence.clause`); what it finds is recorded on the sentence.

Not for: finding mentions (:mod:`qmesh.memory.mentions`) or deciding what a
pronoun stands for (:mod:`qmesh.memory.coref`).
"""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import Final

from qmesh.memory.extraction import MAX_RELATIONS, Mention

__all__ = [
    "ADVERB",
    "AGENT_KINDS",
    "BE",
    "LIST",
    "NP_STOP",
    "POSSESSIVES",
    "THE",
    "E",
    "MaskedSentence",
    "agents",
    "index_of",
    "indexes",
]

E: Final = r"«\d+»"
"""One mention's placeholder."""
# A list of mentions: "A", "A and B", "A, B and C", "A, B, and C". A comma
# list without "and" is not a list: "In 2015, Acme ..." is not two subjects.
LIST: Final = rf"{E}(?:(?:\s*,\s*{E})*\s*,?\s+(?:and|&)\s+{E})?"
ADVERB: Final = (
    r"(?:\s+(?:also|later|then|first|jointly|together|eventually|originally|now|still|\w+ly))?"
)
BE: Final = r"(?:is|was|are|were|has been|have been|had been|will be|would be|became)"
THE: Final = r"(?:(?:the|a|an|its|their|his|her)\s+)?"
# Where a noun phrase ends: punctuation, or a word that starts something else.
NP_STOP: Final = (
    r"(?=\s*(?:[,;:.!?()\"“”]|$)|\s+(?:who|which|that|but|in|at|of|for|from|with|based|"
    r"located|founded|since|by|on|to|whose|where|when|until|after|before|during)\b)"
)
AGENT_KINDS: Final = frozenset({"name", "org", "term", "concept"})
"""Kinds of mention that can do or undergo something (not dates or amounts)."""
POSSESSIVES: Final = frozenset({"its", "his", "her", "their"})
"""Pronouns masked as ``«index»'s`` when they stand for an entity."""

_INDEX_RE: Final = re.compile(r"«(\d+)»")


def indexes(text: str) -> list[int]:
    """The mention indexes of the placeholders in ``text``, in order."""
    return [int(i) for i in _INDEX_RE.findall(text)]


def index_of(placeholder: str) -> int:
    """The index of one placeholder ("«3»" → 3)."""
    return int(placeholder[1:-1])


class MaskedSentence:
    """One sentence being extracted: its mentions and the masked text in
    which each mention is the placeholder ``«index»`` (``«index»'s`` for
    the possessive pronouns among ``possessive``)."""

    def __init__(
        self, sentence: str, mentions: list[Mention], possessive: Collection[int] = ()
    ) -> None:
        self.sentence = sentence
        self.mentions = mentions
        self.relations: dict[tuple[int, str, int], None] = {}
        self.same_as: dict[tuple[int, int], None] = {}
        pieces: list[str] = []
        # positions[i] is the sentence offset of masked[i] (placeholders map to -1).
        self.positions: list[int] = []
        cursor = 0
        for index, mention in enumerate(mentions):
            start, end = mention.start, mention.end
            if mention.kind == "term" and start > cursor and end < len(sentence):
                # The quotes around a term belong to its placeholder, so that
                # 'makes the "Roadrunner Trap"' reads like 'makes the «1»'.
                if sentence[start - 1] in '"“‘' and sentence[end] in '"”’':
                    start, end = start - 1, end + 1
            pieces.append(sentence[cursor:start])
            self.positions.extend(range(cursor, start))
            placeholder = f"«{index}»'s" if index in possessive else f"«{index}»"
            pieces.append(placeholder)
            self.positions.extend([-1] * len(placeholder))
            cursor = end
        pieces.append(sentence[cursor:])
        self.positions.extend(range(cursor, len(sentence)))
        self.masked = "".join(pieces)

    def clause(self, subject: int, start: int) -> MaskedSentence:
        """The masked text from ``start`` on, with the placeholder of
        ``subject`` and a space in front: a coordinated clause read with the
        sentence's subject. It shares this sentence's mentions, relations
        and aliases, so what the rules find in it is recorded here."""
        view = object.__new__(MaskedSentence)
        view.sentence = self.sentence
        view.mentions = self.mentions
        view.relations = self.relations
        view.same_as = self.same_as
        prefix = f"«{subject}» "
        view.masked = prefix + self.masked[start:]
        view.positions = [-1] * len(prefix) + self.positions[start:]
        return view

    def kind(self, index: int) -> str:
        return self.mentions[index].kind

    def add(self, subject: int, predicate: str, obj: int) -> None:
        # A list times a list ("A, B, … and Z acquired …") multiplies: past
        # the cap the sentence is a table, not a statement worth every pair.
        if subject != obj and len(self.relations) < MAX_RELATIONS:
            self.relations[(subject, predicate, obj)] = None

    def add_concept(self, start: int, end: int) -> int | None:
        """A mention for masked[start:end] (which holds no placeholder)."""
        first, last = self.positions[start], self.positions[end - 1]
        if first < 0 or last < 0:
            return None
        text = self.sentence[first : last + 1]
        if not text.strip():
            return None
        for index, mention in enumerate(self.mentions):
            if mention.start == first and mention.end == last + 1:
                return index
        self.mentions.append(Mention(first, last + 1, text, "concept"))
        return len(self.mentions) - 1


def agents(state: MaskedSentence, text: str | None) -> list[int]:
    """The mentions among the placeholders of ``text`` that can be agents."""
    if text is None:
        return []
    return [i for i in indexes(text) if state.kind(i) in AGENT_KINDS]
