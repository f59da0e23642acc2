"""Entities and (subject, predicate, object) relations, one sentence at a time.

For: :class:`RuleExtractor` (what it returns, and the check every extraction
passes, are in :mod:`qmesh.memory.extraction`). It is the fast default
(thousands of sentences a second, no model): capitalised names, quoted
terms, dates, money, percentages and numbers; relations from verb patterns
("X founded Y", "Y was acquired by X", "X is based in Y", "X works for Y",
"X is the CEO of Y", "X, the CEO of Y,", "X is a chemist"), lists ("X and Y
founded Z"), coordinated clauses with the sentence's subject ("X was founded
in 2017 and is based in Y"), dates attached to events ("founded in 1998"),
aliases ("International Business Machines (IBM)", "X, also known as Y"),
and the idioms of :mod:`qmesh.memory.idioms`.

Not for: resolving mentions to entities across sentences or documents (the
store does that, with the document as context), or pronouns and
descriptions: "She founded it" yields nothing here, since its subject is not
named in the sentence. :mod:`qmesh.memory.coref` decides what "she" stands
for and passes it back as a reference (:meth:`RuleExtractor.extract_one`),
which the patterns then read like a name. Nor negation (negated statements
match no pattern, on purpose), or I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import Final

from qmesh.memory.extraction import Extraction, Mention, Relation
from qmesh.memory.idioms import add_idioms
from qmesh.memory.masked import (
    ADVERB,
    AGENT_KINDS,
    BE,
    LIST,
    NP_STOP,
    POSSESSIVES,
    THE,
    E,
    MaskedSentence,
    agents,
    index_of,
    indexes,
)
from qmesh.memory.mentions import CONNECTORS, find_mentions, is_title_line
from qmesh.memory.terms import STOPWORDS

__all__ = ["EVENT_PREDICATES", "TRANSITIVE_FORMS", "RuleExtractor"]

# -- relations ----------------------------------------------------------------

_E: Final = E
_LIST: Final = LIST
_ADVERB: Final = ADVERB
_BE: Final = BE
_THE: Final = THE
_PREP_DATE: Final = re.compile(r"\b(in|on|since)\s+«(\d+)»")
# Between "by" and the agent, a description of it: "by the physicist X",
# "by three engineers, X, Y and Z", "by the brothers X and Y".
_AGENT_DESCRIPTION: Final = (
    rf"(?:(?:(?:the|a|an|its|their|his|her|both)\s+|{_E}\s+)"
    r"(?:(?!(?:by|of|in|on|at|for|from|with|to|and|or|led|who|which|that|is|was)\b)"
    r"[a-z][\w-]*,?\s+){0,3}?)?"
)
# Not "acquired Globex's unit": an object followed by a possessive is not the object.
_NOT_POSSESSED: Final = r"(?![\w'’])"


def _forms(*words: str) -> str:
    # "its" in a form ("has its headquarters in") may be a masked possessive.
    return "|".join(
        sorted(
            (
                re.escape(w)
                .replace(r"\ ", r"\s+")
                .replace(r"\s+its\s+", rf"\s+(?:its|their|{_E}['’]s)\s+")
                .replace(r"\s+their\s+", rf"\s+(?:its|their|{_E}['’]s)\s+")
                for w in words
            ),
            key=len,
        )[::-1]
    )


# label: (active forms, passive participles, does a date attach to the object?)
_TRANSITIVE: Final[dict[str, tuple[tuple[str, ...], tuple[str, ...], bool]]] = {
    "founded": (
        ("founded", "co-founded", "cofounded", "established", "started", "set up"),
        ("founded", "co-founded", "cofounded", "established", "started", "set up"),
        True,
    ),
    "acquired": (
        ("acquired", "acquires", "bought", "buys", "purchased", "took over"),
        ("acquired", "bought", "purchased", "taken over"),
        True,
    ),
    "owns": (("owns", "owned"), ("owned",), False),
    "created": (("created", "creates"), ("created",), True),
    "invented": (("invented",), ("invented",), True),
    "designed": (("designed", "designs"), ("designed",), True),
    "developed": (("developed", "develops"), ("developed",), True),
    "built": (("built", "builds"), ("built",), True),
    "wrote": (("wrote", "writes", "authored"), ("written", "authored"), True),
    "discovered": (("discovered",), ("discovered",), True),
    "launched": (("launched", "launches"), ("launched",), True),
    "released": (("released", "releases"), ("released",), True),
    "published": (("published", "publishes"), ("published",), True),
    "makes": (("makes", "made", "manufactures", "manufactured", "produces", "produced"),
              ("made", "manufactured", "produced"), False),
    "leads": (("leads", "led", "heads", "headed", "runs", "ran", "manages", "managed",
               "chairs", "chaired"), ("led", "headed", "run", "managed", "chaired"), False),
    "joined": (("joined", "joins"), (), False),
    "married": (("married",), (), False),
    "won": (("won", "wins"), ("won",), False),
    "received": (("received", "receives"), (), False),
    "sold": (("sold", "sells"), ("sold",), True),
    "funded": (("funded", "funds", "financed", "backed"), ("funded", "financed", "backed"), False),
    "sued": (("sued", "sues"), ("sued",), False),
    "employs": (("employs", "employed"), (), False),
    "replaced": (("replaced", "succeeded"), ("replaced", "succeeded"), False),
    "supplies": (("supplies", "supplied"), ("supplied",), False),
    "licensed": (("licensed", "licenses"), ("licensed",), False),
    "partnered with": (("partnered with", "partners with", "teamed up with"), (), False),
    "merged with": (("merged with", "merges with"), (), False),
    "competes with": (("competes with", "competed with", "rivals"), (), False),
}  # fmt: skip

_PARTICIPLES: Final = {"wrote": "written"}

TRANSITIVE_FORMS: Final = {
    form: label
    for label, (active, passive, _) in _TRANSITIVE.items()
    for form in (*active, *passive)
}
"""Every verb form of the transitive predicates ("bought", "acquires") → its label ("acquired")."""
EVENT_PREDICATES: Final = {
    f"{_PARTICIPLES.get(label, label)} {preposition}": label
    for label, (_, _, dated) in _TRANSITIVE.items()
    if dated
    for preposition in ("in", "on")
}
"""Date predicates ("founded in") → the transitive label whose object they date ("founded")."""

# label: forms that follow the subject (with or without "is/was"), then the object.
_PREPOSITIONAL: Final[dict[str, tuple[str, ...]]] = {
    "located in": (
        "located in", "based in", "headquartered in", "situated in", "located at", "based at",
        "headquartered at", "has its headquarters in", "has headquarters in",
        "moved its headquarters to", "relocated its headquarters to",
    ),
    "works for": (
        "works for", "worked for", "works at", "worked at", "employed by", "employed at",
        "works with", "worked with",
    ),
    "born in": ("born in", "born on"),
    "died in": ("died in", "died on", "passed away in", "passed away on"),
    "lives in": ("lives in", "lived in", "resides in", "resided in"),
    "moved to": ("moved to", "relocated to", "moves to"),
    "studied at": ("studied at", "graduated from", "studies at", "attended"),
    "operates in": ("operates in", "operated in", "sells in", "active in"),
    "teaches at": ("teaches at", "taught at", "lectures at", "lectured at"),
}  # fmt: skip

# "Red Hat, based in Raleigh, makes ..." and "Hank Scorpio, the CEO of
# Globex, founded ...": an apposition between a subject and its verb.
_APPOSITION: Final = (
    r"(?:\s*,\s*(?:based|located|headquartered|founded|established|born|a|an|the|its|their|"
    r"his|her|now|formerly|also|who|which)\b[^,;()]*,)?"
)
_SUBJECT_LINK: Final = r"(?:\s*,\s*(?:who|which)|\s+(?:who|which|that))?"
_AUXILIARY: Final = r"(?:\s+(?:has|have|had|will|would|did|does))?"


def _compile_active() -> list[tuple[re.Pattern[str], str]]:
    patterns = []
    for label, (active, _, _) in _TRANSITIVE.items():
        patterns.append((re.compile(
            rf"(?P<s>{_LIST}){_APPOSITION}{_SUBJECT_LINK}{_AUXILIARY}{_ADVERB}\s+(?P<v>{_forms(*active)})"
            rf"\s+{_THE}(?P<o>{_LIST}){_NOT_POSSESSED}"
        ), label))  # fmt: skip
    return patterns


def _compile_passive() -> list[tuple[re.Pattern[str], str]]:
    patterns = []
    for label, (_, passive, _) in _TRANSITIVE.items():
        if not passive:
            continue
        patterns.append((re.compile(
            rf"(?P<o>{_LIST})(?:\s*,\s*(?:which|who)|\s+(?:which|that|who))?"
            rf"(?:\s+{_BE}{_ADVERB}|\s*,)\s+(?P<v>{_forms(*passive)})"
            rf"(?P<gap>(?:\s+(?:in|on|at|during|around|since)\s+{_THE}{_E})*)"
            rf"(?:\s+by\s+{_AGENT_DESCRIPTION}(?P<s>{_LIST}))?"
        ), label))  # fmt: skip
    return patterns


def _compile_prepositional() -> list[tuple[re.Pattern[str], str]]:
    patterns = []
    for label, forms in _PREPOSITIONAL.items():
        patterns.append((re.compile(
            rf"(?P<s>{_LIST}){_APPOSITION}(?:\s*,\s*(?:who|which)|\s+(?:who|which|that))?"
            rf"(?:\s+{_BE}|\s*,)?{_ADVERB}\s+(?P<v>{_forms(*forms)})\s+{_THE}(?P<o>{_LIST})"
        ), label))  # fmt: skip
    return patterns


# Verbs whose object may be a common noun phrase ("makes rocket skates"):
# the phrase becomes a concept. Not "acquired" or "founded", whose common-noun
# objects ("a stake", "the company") say little without their referent.
_CONCEPT_OBJECT_VERBS: Final = (
    "makes",
    "created",
    "invented",
    "designed",
    "developed",
    "built",
    "discovered",
    "launched",
    "released",
    "published",
    "wrote",
    "sold",
)


def _compile_concept_objects() -> re.Pattern[str]:
    forms = [f for label in _CONCEPT_OBJECT_VERBS for f in _TRANSITIVE[label][0]]
    labels = {f: label for label in _CONCEPT_OBJECT_VERBS for f in _TRANSITIVE[label][0]}
    assert len(labels) == len(forms)
    return re.compile(
        rf"(?P<s>{_LIST}){_APPOSITION}{_SUBJECT_LINK}{_AUXILIARY}{_ADVERB}\s+(?P<v>{_forms(*forms)})"
        rf"\s+(?:(?:the|a|an|its|their|his|her)\s+)?(?P<np>[a-z][a-z-]*(?:\s+[a-z][a-z-]*){{0,3}}?)"
        rf"{_NP_STOP}"
    )


_ACTIVE: Final = _compile_active()
_PASSIVE: Final = _compile_passive()
_PREPOSITIONS: Final = _compile_prepositional()

_ROLE: Final = r"(?P<role>[A-Za-z][\w-]*(?:\s+[A-Za-z][\w-]*){0,3}?)"
_ROLE_MODIFIERS: Final = frozenset(
    {"current", "former", "first", "new", "founding", "then", "sole", "main", "interim", "acting"}
)
_ROLE_OF: Final = re.compile(
    rf"(?P<s>{_LIST})\s+(?:{_BE}|remains|remained|served as|serves as|acts as|acted as|"
    rf"works as|worked as)\s+{_THE}{_ROLE}\s+(?P<p>of|at|for)\s+{_THE}(?P<o>{_LIST})"
)
_ROLE_OF_REVERSED: Final = re.compile(
    rf"(?:^|\b)(?:[Tt]he|[Ii]ts|[Tt]heir)\s+{_ROLE}\s+(?P<p>of|at)\s+{_THE}(?P<o>{_E})"
    rf"\s+(?:is|was|has been|had been|remains)\s+(?P<s>{_LIST})"
)
_ROLE_APPOSITION: Final = re.compile(
    rf"(?P<s>{_E})\s*,\s*(?:the|a|an|its|their)\s+{_ROLE}\s+(?P<p>of|at)\s+{_THE}(?P<o>{_E})"
)
_ROLE_END: Final = r"(?=\s*(?:[,;:.!?)]|$)|\s+(?:and|who|since|for|at|in|of|from|until)\b)"
_ROLE_POSSESSIVE: Final = re.compile(
    rf"(?P<o3>{_E})['’]s\s+(?P<role3>[A-Za-z][\w-]*(?:\s+[A-Za-z][\w-]*){{0,3}}?)\s+"
    rf"(?:is|was|has been|had been|remains)\s+(?P<s3>{_E})"
    rf"|(?P<s2>{_E})\s+(?:is|was)\s+(?P<o2>{_E})['’]s\s+"
    rf"(?P<role2>[A-Za-z][\w-]*(?:\s+[A-Za-z][\w-]*){{0,3}}?){_ROLE_END}"
    rf"|(?P<o>{_E})['’]s\s+(?P<role>[A-Za-z][\w-]*(?:\s+[A-Za-z][\w-]*){{0,3}}?),?\s+(?P<s>{_E})"
)
_NP_STOP: Final = NP_STOP
_CONCEPT_OBJECTS: Final = _compile_concept_objects()
_CONCEPT_LABELS: Final = {
    form.replace(" ", ""): label
    for label in _CONCEPT_OBJECT_VERBS
    for form in _TRANSITIVE[label][0]
}
_IS_A: Final = re.compile(
    rf"(?P<s>{_LIST})\s+(?:is|was|are|were|became|remains|remained)\s+(?:a|an|one of the)\s+"
    rf"(?P<np>[^,;:.!?()«»\"“”]{{1,60}}?){_NP_STOP}"
)
_IS_A_APPOSITION: Final = re.compile(
    rf"(?P<s>{_E})\s*,\s*(?:a|an)\s+(?P<np>[^,;:.!?()«»\"“”]{{1,60}}?){_NP_STOP}"
)
_SAME_AS_PAREN: Final = re.compile(rf"(?P<a>{_E})\s*\(\s*(?P<aka>(?:also known as|aka|formerly|"
                                   rf"or|known as)\s+)?(?P<b>{_E})\s*\)")  # fmt: skip
_SAME_AS_PHRASE: Final = re.compile(
    rf"(?P<a>{_E})\s*,?\s+(?:also known as|better known as|known as|formerly known as|"
    rf"formerly|aka|now known as|renamed)\s+(?P<b>{_E})"
)
_COUNT: Final = re.compile(
    rf"(?P<s>{_E})\s+(?:has|had|have|employs|employed)\s+(?:about\s+|around\s+|over\s+|"
    rf"more than\s+|nearly\s+|almost\s+|some\s+)?(?P<o>{_E})\s+(?P<unit>employees|staff|"
    rf"workers|members|customers|users|stores|offices|students|subscribers|locations)\b"
)
_PARTICIPLE_FIRST: Final = re.compile(
    rf"^(?P<v>Founded|Established|Incorporated|Launched|Created)\s+(?P<p>in|on)\s+(?P<d>{_E})"
    rf"\s*,\s*{_THE}(?P<s>{_E})"
)
_BORN_PAREN: Final = re.compile(rf"(?P<s>{_E})\s*\(\s*born\s+(?:on\s+|in\s+)?(?P<o>{_E})")
_AGENT_KINDS: Final = AGENT_KINDS
_indexes = indexes
_agents = agents
_Sentence = MaskedSentence


_CLAIMED_BY_RE: Final = re.compile(r"\b([a-z]+(?:\s+up|\s+over)?)\s+$")


def _date_facts(
    state: _Sentence, anchor: int, patient: list[int], label: str, *, near: int = 0
) -> None:
    """Attach the nearest "in/on/since DATE" of the sentence to ``patient``
    (only one that starts at ``near`` or later, if given)."""
    best: tuple[int, int, str] | None = None
    own = {label, _PARTICIPLES.get(label, label)}
    for match in _PREP_DATE.finditer(state.masked, near):
        index = int(match.group(2))
        if state.kind(index) != "date":
            continue
        claimed = _CLAIMED_BY_RE.search(state.masked, max(0, match.start() - 30), match.start())
        other = TRANSITIVE_FORMS.get(claimed.group(1)) if claimed else None
        if other is not None and other not in own:
            continue  # "bought X, a maker founded in 2013": the date is the founding's
        distance = abs(match.start() - anchor)
        if best is None or distance < best[0]:
            best = (distance, index, match.group(1))
    if best is None:
        return
    _, date, preposition = best
    suffix = "on" if preposition == "on" else "in"
    participle = _PARTICIPLES.get(label, label)
    for p in patient:
        state.add(p, f"{participle} {suffix}", date)


def _add_transitive(
    state: _Sentence,
    match: re.Match[str],
    subjects: list[int],
    label: str,
    objects: list[int],
    consumed: list[tuple[int, int]],
) -> None:
    """Record ``label`` between every subject and object of a transitive-verb
    match, its date facts when the verb takes one, and the span it used."""
    for s in subjects:
        for o in objects:
            state.add(s, label, o)
    if _TRANSITIVE[label][2]:
        _date_facts(state, match.start("v"), objects, label)
    consumed.append(match.span())


# A clause that goes on with a verb and no subject of its own ("X was founded
# in 2017 and is headquartered in Y") has the sentence's subject.
_CLAUSE_VERBS: Final = frozenset(
    """
    is was are were has had have will would can could became remains remained also later then
    now still
    """.split()
) | frozenset(
    form.split()[0]
    for forms in (
        *(active for active, _, _ in _TRANSITIVE.values()),
        *_PREPOSITIONAL.values(),
    )
    for form in forms
)
_CLAUSE_RE: Final = re.compile(r"(?:,\s*|\s+)and\s+(?=(?P<verb>[a-z][\w-]*)\b)")
_IN_PHRASE_RE: Final = re.compile(
    r"(?:^|\W)(?:in|on|at|of|from|with|by|for|to|after|before|near|since|during|about|across|"
    r"than|into|over|under|between|among|like)\s+(?:(?:the|a|an)\s+)?(?:[a-z][\w-]*\s+){0,2}$"
)


def _subject_of(state: _Sentence, end: int) -> int | None:
    """The sentence's subject before masked[end]: its first agent that is
    neither inside a prepositional phrase nor a possessive."""
    masked = state.masked
    for match in re.finditer(r"«(\d+)»", masked[:end]):
        index = int(match.group(1))
        if state.kind(index) not in _AGENT_KINDS or masked.startswith("'s", match.end()):
            continue
        if masked.startswith("’s", match.end()):
            continue
        if _IN_PHRASE_RE.search(masked, max(0, match.start() - 40), match.start()):
            continue
        return index
    return None


def _relations(state: _Sentence) -> None:
    _verb_relations(state)
    add_idioms(state)
    for match in _CLAUSE_RE.finditer(state.masked):
        if match.group("verb") not in _CLAUSE_VERBS:
            continue
        subject = _subject_of(state, match.start())
        if subject is None:
            continue
        clause = state.clause(subject, match.end())
        _verb_relations(clause)
        add_idioms(clause)


def _verb_relations(state: _Sentence) -> None:
    masked = state.masked
    consumed: list[tuple[int, int]] = []
    for pattern, label in _ACTIVE:
        for match in pattern.finditer(masked):
            subjects = _agents(state, match.group("s"))
            if label == "employs":
                objects = [i for i in _indexes(match.group("o")) if state.kind(i) != "date"]
            else:
                objects = _agents(state, match.group("o"))
            if not subjects or not objects:
                continue
            _add_transitive(state, match, subjects, label, objects, consumed)
    for pattern, label in _PASSIVE:
        for match in pattern.finditer(masked):
            objects = _agents(state, match.group("o"))
            if not objects:
                continue
            subjects = _agents(state, match.group("s"))
            _add_transitive(state, match, subjects, label, objects, consumed)
    for pattern, label in _PREPOSITIONS:
        for match in pattern.finditer(masked):
            subjects = _agents(state, match.group("s"))
            objects = _indexes(match.group("o"))
            if label not in ("born in", "died in"):
                objects = [o for o in objects if state.kind(o) in _AGENT_KINDS]
            for s in subjects:
                for o in objects:
                    predicate = label
                    if label in ("born in", "died in") and match.group("v").endswith("on"):
                        predicate = label[:-2] + "on"
                    state.add(s, predicate, o)
            if label in ("born in", "died in") and not any(
                state.kind(o) == "date" for o in objects
            ):
                # "born in Warsaw in 1867": the date of the birth too.
                _date_facts(state, match.end("v"), subjects, label[:-3], near=match.end())
            consumed.append(match.span())
    for match in _PARTICIPLE_FIRST.finditer(masked):
        s, d = int(match.group("s")[1:-1]), int(match.group("d")[1:-1])
        if state.kind(d) == "date" and state.kind(s) in _AGENT_KINDS:
            verb = match.group("v").lower()
            label = "founded" if verb in ("established", "incorporated") else verb
            state.add(s, f"{label} {match.group('p')}", d)
    for match in _BORN_PAREN.finditer(masked):
        s, o = int(match.group("s")[1:-1]), int(match.group("o")[1:-1])
        if state.kind(o) == "date" and state.kind(s) in _AGENT_KINDS:
            state.add(s, "born on" if "," in state.mentions[o].text else "born in", o)
    for pattern in (_ROLE_OF, _ROLE_OF_REVERSED, _ROLE_APPOSITION):
        for match in pattern.finditer(masked):
            role = _role(match.group("role"))
            if role is None:
                continue
            predicate = _role_predicate(role, match.group("p"))
            for s in _agents(state, match.group("s")):
                for o in _agents(state, match.group("o")):
                    state.add(s, predicate, o)
            consumed.append(match.span())
    for match in _ROLE_POSSESSIVE.finditer(masked):
        role = _role(match.group("role") or match.group("role2") or match.group("role3"))
        if role is None:
            continue
        s = index_of(match.group("s") or match.group("s2") or match.group("s3"))
        o = index_of(match.group("o") or match.group("o2") or match.group("o3"))
        if state.kind(s) in ("name", "org") and state.kind(o) in ("name", "org"):
            state.add(s, _role_predicate(role, "of"), o)
            consumed.append(match.span())
    for match in _COUNT.finditer(masked):
        s, o = int(match.group("s")[1:-1]), int(match.group("o")[1:-1])
        if state.kind(o) == "number" and state.kind(s) in _AGENT_KINDS:
            state.add(s, f"has {match.group('unit')}", o)
    for match in _CONCEPT_OBJECTS.finditer(masked):
        subjects = _agents(state, match.group("s"))
        verb = _CONCEPT_LABELS.get(re.sub(r"\s+", "", match.group("v")))
        if not subjects or verb is None:
            continue
        np_start, np_end = match.span("np")
        if match.group("np").split()[0] in STOPWORDS:
            continue
        concept = state.add_concept(np_start, np_end)
        if concept is not None:
            for s in subjects:
                state.add(s, verb, concept)
    for pattern in (_IS_A, _IS_A_APPOSITION):
        for match in pattern.finditer(masked):
            np_start, np_end = match.span("np")
            if any(start <= np_start < end for start, end in consumed):
                continue
            subjects = _agents(state, match.group("s"))
            if not subjects:
                continue  # "in 2018, a year after": no concept without a subject
            for part_start, part_end in _conjuncts(masked, np_start, np_end):
                concept = state.add_concept(part_start, part_end)
                if concept is None:
                    continue
                for s in subjects:
                    state.add(s, "is a", concept)
    for pattern in (_SAME_AS_PAREN, _SAME_AS_PHRASE):
        for match in pattern.finditer(masked):
            a, b = int(match.group("a")[1:-1]), int(match.group("b")[1:-1])
            if state.kind(a) not in ("name", "org", "term") or state.kind(b) not in (
                "name",
                "org",
                "term",
            ):
                continue
            explicit = pattern is _SAME_AS_PHRASE or match.group("aka")
            if explicit or _is_acronym(state.mentions[b].text, state.mentions[a].text):
                state.same_as[(a, b)] = None


def _role(text: str) -> str | None:
    """A role as its predicate names it: lower-cased, without "former" or
    "current", and a chief officer by the usual initials ("chief
    executive" → "ceo", "chief financial officer" → "cfo")."""
    words = text.split()
    while words and words[0].lower() in _ROLE_MODIFIERS:
        words = words[1:]
    if not words or any(w.lower() in STOPWORDS for w in words):
        return None
    role = " ".join(words).lower()
    if role in ("chief executive", "chief executive officer"):
        return "ceo"
    chief = re.fullmatch(r"chief ([a-z])[a-z-]* officer", role)
    return f"c{chief.group(1)}o" if chief else role


_ROLE_PREDICATES: Final = {
    "founder": "founded", "co-founder": "founded", "cofounder": "founded",
    "founders": "founded", "co-founders": "founded", "owner": "owns", "owners": "owns",
}  # fmt: skip
"""Roles that name a relation the verbs state too: "its founder, X" is "X founded it"."""


def _role_predicate(role: str, preposition: str) -> str:
    return _ROLE_PREDICATES.get(role) or f"{role} {preposition}"


def _conjuncts(masked: str, start: int, end: int) -> Iterator[tuple[int, int]]:
    """Parts of "physicist and chemist", trimmed, without leading articles."""
    text = masked[start:end]
    position = 0
    for piece in re.split(r"(\s+and\s+|\s+or\s+)", text):
        piece_start = start + position
        position += len(piece)
        if re.fullmatch(r"\s+(?:and|or)\s+", piece):
            continue
        stripped = piece.strip()
        offset = piece.find(stripped)
        article = re.match(r"(?:a|an|the)\s+", stripped)
        if article:
            offset += article.end()
            stripped = stripped[article.end() :]
        if not stripped or len(stripped.split()) > 5 or stripped.lower() in STOPWORDS:
            continue
        yield piece_start + offset, piece_start + offset + len(stripped)


_NEXT_WORD_RE: Final = re.compile(r"\s+([A-Za-z][\w-]*)")


def _is_possessive(sentence: str, mention: Mention) -> bool:
    """Whether a pronoun is a possessive determiner ("its plant", "her
    husband"); "her" only when a noun-like word follows it."""
    word = mention.text.lower()
    if word not in POSSESSIVES:
        return False
    if word != "her":
        return True
    following = _NEXT_WORD_RE.match(sentence, mention.end)
    return following is not None and following.group(1).lower() not in STOPWORDS


def _is_acronym(short: str, long: str) -> bool:
    letters = [c for c in short if c.isalpha()]
    if not letters or not all(c.isupper() for c in letters) or len(letters) < 2:
        return False
    initials = [
        w[0].upper() for w in long.split() if w.lower() not in CONNECTORS and w[0].isalpha()
    ]
    return letters == initials or (
        letters[0] == initials[0] and _subsequence(letters, [c for c in long if c.isupper()])
    )


def _subsequence(needle: list[str], haystack: list[str]) -> bool:
    it = iter(haystack)
    return all(c in it for c in needle)


class RuleExtractor:
    """The built-in rule-based extractor (see the module docstring)."""

    name: Final = "rules"

    def extract(self, sentences: Sequence[str]) -> list[Extraction]:
        return [self.extract_one(sentence) for sentence in sentences]

    def extract_one(self, sentence: str, references: Sequence[Mention] = ()) -> Extraction:
        """The extraction of one sentence. ``references`` are mentions that
        stand for an entity named elsewhere ("it", "the firm"; see
        :mod:`qmesh.memory.coref`): they take the place of whatever the rules
        would find at their spans, and the relations they take part in are
        found as if they were names."""
        if is_title_line(sentence):
            return Extraction()
        mentions = find_mentions(sentence)
        if references:
            mentions = [
                m
                for m in mentions
                if not any(r.start < m.end and m.start < r.end for r in references)
            ]
            mentions = sorted([*mentions, *references], key=lambda m: m.start)
        if not mentions:
            return Extraction()
        possessive = {
            i
            for i, m in enumerate(mentions)
            if m.refers is not None and _is_possessive(sentence, m)
        }
        state = _Sentence(sentence, mentions, possessive)
        _relations(state)
        return Extraction(
            mentions=tuple(state.mentions),
            relations=tuple(Relation(s, p, o) for s, p, o in state.relations),
            same_as=tuple(state.same_as),
        )

    def mentions(self, text: str) -> list[Mention]:
        """Mentions only, title lines included: for finding entities in a question."""
        return find_mentions(text)
