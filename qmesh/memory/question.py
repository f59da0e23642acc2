"""What a question asks: its entities, the relation it is about, the role
its entities play in it, and the type of answer its question word wants.

For: :func:`parse`, which :func:`qmesh.memory.query.ask` runs on a question
once its candidate names (:func:`candidate_spans`) have been looked up. A
question is about a *relation* (a :class:`Family` of stored predicates:
"Who founded X?", "Who is the CFO of X?", "Where is X based?", "Who runs
X?") when one of its words is a cue of one; its entities then have roles
in it (X is what was founded, so the answer is the founder), found from a
transitive verb's voice ("Who acquired X?" and "What did X acquire?"), a
role noun ("the CEO of X", "X's founder": X holds the role's other end)
or, for the other cues, the side of the cue the entity is on ("Where is X
based?"). A question whose entity is written as a possessor ("X's first
customer", "X's best-known product") is about the possessed noun, and
about a relation only if that noun is a cue. "How many N" asks for a count
of N (with the usual synonyms: people and employees, ships and vessels).

The answer type follows the question word: who → a person or an
organisation, when → a date, where → a place, how many / how much → a
number or an amount, what / which → anything of the relation's kind.

Not for: finding or scoring sentences (:mod:`qmesh.memory.query`) or SQL.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Final, Literal

import attrs

from qmesh.memory.extract import TRANSITIVE_FORMS, RuleExtractor
from qmesh.memory.records import EntityRef
from qmesh.memory.terms import QUESTION_WORDS, STOPWORDS, entity_key, stem

__all__ = [
    "FAMILIES",
    "Family",
    "Question",
    "Token",
    "candidate_spans",
    "names_in",
    "parse",
    "tokens_of",
]

Role = Literal["subject", "object"]
Token = tuple[int, int, str]
"""A question's word: start, end, text."""

_TOKEN_RE: Final = re.compile(r"\w+(?:['’.&-]\w+)*\.?")
_MAX_NGRAM: Final = 6
_EXTRACTOR: Final = RuleExtractor()
_BE: Final = frozenset({"is", "was", "are", "were", "been", "being", "be"})
_VERB_STEMS: Final = {stem(f): label for f, label in TRANSITIVE_FORMS.items() if " " not in f}
_PRONOUNS: Final = frozenset("it its he him his she her they them their".split())
_WH: Final = {
    "who": "who", "whom": "who", "whose": "who", "when": "when", "where": "where",
    "which": "which", "what": "what",
}  # fmt: skip


def _stems(words: str) -> frozenset[str]:
    return frozenset(stem(w) for w in words.split())


@attrs.frozen
class Family:
    """Stored predicates that state one relation, and the question words
    that ask about it."""

    name: str
    predicates: frozenset[str]
    """Predicates between the relation's subject and object."""
    cues: frozenset[str]
    """Stems of the words that ask about it ("founded", "started", "founder")."""
    nouns: frozenset[str] = frozenset()
    """Cue words that are nouns naming one end ("founder", "headquarters")."""
    holder: Role = "subject"
    """The end whose attribute the relation is: "X's founder" asks who
    founded X (the object), "X's headquarters" where X (the subject) is."""
    dated: frozenset[str] = frozenset()
    """Predicates that date it, with the dated entity as subject ("founded in")."""
    place: bool = False
    """A "where" question about it asks for a place the sentence names
    ("founded in 1998 in Springfield"), not for its object."""
    symmetric: bool = False

    def states(self, predicate: str) -> bool:
        """Whether a stored predicate states this relation: one of its own,
        or (for a predicate no rule writes, as a model's) one made of its
        cue words ("headquartered in")."""
        if predicate in self.predicates:
            return True
        if predicate in _RULE_PREDICATES:
            return False
        stems = {stem(w) for w in predicate.split() if w not in STOPWORDS}
        return bool(stems) and stems <= self.cues


FAMILIES: Final[tuple[Family, ...]] = (
    Family("founded", frozenset({"founded"}),
           _stems("founded founder founders cofounded co-founded started established set "
                  "creator"),
           frozenset({"founder", "founders", "co-founder", "cofounder", "creator"}),
           holder="object", dated=frozenset({"founded in", "founded on"}), place=True),
    Family("acquired", frozenset({"acquired"}),
           _stems("acquired acquire bought buy buys purchased purchase acquisition takeover "
                  "pay paid price buyer acquirer"),
           frozenset({"buyer", "acquirer", "purchaser"}),
           holder="object", dated=frozenset({"acquired in", "acquired on"}), place=True),
    Family("located", frozenset({"located in"}),
           _stems("based headquartered headquarters located location situated hq"),
           frozenset({"headquarters", "hq", "location"})),
    Family("born", frozenset({"born in", "born on"}), _stems("born birth birthplace birthday"),
           frozenset({"birthplace", "birthday", "birth"}),
           dated=frozenset({"born in", "born on"})),
    Family("died", frozenset({"died in", "died on"}), _stems("died die death"),
           frozenset({"death"}), dated=frozenset({"died in", "died on"})),
    Family("leads", frozenset({"leads", "ceo of", "head of", "managing director of"}),
           _stems("runs run leads lead heads head manages managed boss"),
           frozenset({"head", "boss"}), holder="object"),
    Family("owns", frozenset({"owns"}), _stems("owns owned owner owners"),
           frozenset({"owner", "owners"}), holder="object"),
    Family("works for", frozenset({"works for"}), _stems("work works worked employer"),
           frozenset({"employer"})),
    Family("studied at", frozenset({"studied at"}),
           _stems("study studied studies graduated educated"), frozenset()),
    Family("teaches at", frozenset({"teaches at"}), _stems("teach teaches taught lectures"),
           frozenset()),
    Family("lives in", frozenset({"lives in"}), _stems("live lives lived resides"), frozenset()),
    Family("married", frozenset({"married"}), _stems("married husband wife spouse"),
           frozenset({"husband", "wife", "spouse"}), symmetric=True),
    Family("funded", frozenset({"funded"}),
           _stems("invested invest investor investors funded funding backed backer backers "
                  "round financed"),
           frozenset({"investor", "investors", "backer", "backers", "funding", "round"}),
           holder="object"),
    Family("supplies", frozenset({"supplies"}), _stems("supplies supply supplied supplier"),
           frozenset({"supplier", "suppliers"}), holder="object"),
    Family("expands to", frozenset({"expands to"}),
           _stems("expand expanding expands expansion enter entering"), frozenset()),
    Family("makes", frozenset({"makes"}), _stems("make makes made manufacture produce"),
           frozenset()),
)  # fmt: skip
_RULE_PREDICATES: Final = frozenset(p for f in FAMILIES for p in f.predicates | f.dated)
_BY_VERB: Final = {f.name: f for f in FAMILIES}

# A role noun: "the CFO of X", "X's chief executive". Each is its own family.
_ROLE_WORDS: Final = frozenset(
    "ceo cfo cto coo cio cmo president chairman chairwoman chair director".split()
)
_CHIEF_RE: Final = re.compile(r"\bchief\s+([a-z])[a-z-]*(?:\s+officer)?\b", re.IGNORECASE)

# "How many people" is answered by employees, staff, workers; "ships" by vessels.
_COUNT_CLASSES: Final = (
    _stems("people employees employee staff workers worker persons personnel"),
    _stems("ships ship vessels vessel boats boat ferries ferry"),
    _stems("planes plane aircraft"),
)


@attrs.frozen
class Question:
    groups: tuple[tuple[EntityRef, ...], ...]
    """One group per entity named in the question: the entities it may mean."""
    roles: tuple[Role | None, ...]
    """Per group: its role in the question's relation (or verb), when known."""
    verb: str | None
    """The transitive predicate the question's verb names ("acquired"), if any."""
    family: Family | None
    """The relation the question asks about, if it names one."""
    terms: frozenset[str]
    """Content stems not used up by entity names."""
    asked: frozenset[str]
    """The terms that the relation's cue words and the question's type noun
    ("which country") leave: what a sentence must still say."""
    unknown: tuple[str, ...]
    """Names in the question (lower-cased) that name nothing the memory knows."""
    search: tuple[str, ...]
    """Words for full-text search: the content words outside the names."""
    phrases: tuple[str, ...]
    """The question's names of known entities, as written, for full-text search."""
    wh: str | None
    """who, what, which, when, where, how many or how much."""
    counted: frozenset[str]
    """For "how many N": the stems that count as N."""
    dangling: bool = False
    """The question names nothing but a pronoun ("Who founded it?"): it has
    no referent the memory could know."""


def tokens_of(question: str) -> list[Token]:
    """The question's words; a possessive's "'s" is not part of its word
    ("Acme's" is "Acme", so that it lines up with the name)."""
    tokens = []
    for match in _TOKEN_RE.finditer(question):
        text = match.group().rstrip(".")
        end = match.start() + len(text)
        if len(text) > 2 and text.lower().endswith(("'s", "’s")):
            text, end = text[:-2], end - 2
        tokens.append((match.start(), end, text))
    return tokens


def names_in(question: str) -> list[tuple[int, int]]:
    """The spans of the capitalised names and quoted terms of ``question``."""
    spans = []
    for m in _EXTRACTOR.mentions(question):
        if m.kind in ("name", "org", "term"):
            # "Acme Robotics'": the possessive's apostrophe is not the name's.
            end = m.end - 1 if m.text.endswith(("'", "’")) and len(m.text) > 1 else m.end
            spans.append((m.start, end))
    return spans


def candidate_spans(
    question: str, tokens: Sequence[Token], names: Sequence[tuple[int, int]]
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


def _wh(tokens: Sequence[Token]) -> str | None:
    words = [t[2].lower().replace("’", "'") for t in tokens]
    for index, word in enumerate(words):
        if word == "how" and index + 1 < len(words) and words[index + 1] in ("many", "much"):
            return f"how {words[index + 1]}"
    for word in words:
        base = word[:-2] if word.endswith("'s") else word
        if base in _WH:
            return _WH[base]
    return None


def _role_family(words: str) -> Family | None:
    """A family for a role noun among ``words`` ("CFO", "chief financial
    officer"): the predicate the extractor writes for it ("cfo of")."""
    chief = _CHIEF_RE.search(words)
    if chief:
        letter = chief.group(1).lower()
        return _role("ceo" if letter == "e" else f"c{letter}o")
    for word in re.findall(r"[\w-]+", words.lower()):
        if word in _ROLE_WORDS:
            return _role(word)
    return None


def _role(role: str) -> Family:
    if role == "ceo":
        return attrs.evolve(_BY_VERB["leads"], name="ceo", predicates=frozenset({"ceo of"}),
                            cues=frozenset({"ceo"}), nouns=frozenset({"ceo"}))  # fmt: skip
    return Family(role, frozenset({f"{role} of", f"{role} at"}), frozenset({role}),
                  frozenset({role}), holder="object")  # fmt: skip


def _possessed(
    question: str, tokens: Sequence[Token], places: Sequence[tuple[int, int]]
) -> int | None:
    """The index of the head of the noun a question's entity possesses
    ("X's first customer" → "customer"), if one does."""
    for _, j in places:
        last = tokens[j - 1]
        after = question[last[1] : last[1] + 1]
        if not after or after not in "'’":
            continue
        end = j
        while end < len(tokens) and tokens[end][2].lower() not in STOPWORDS | QUESTION_WORDS:
            end += 1
        if end > j:
            return end - 1
    return None


def parse(
    question: str,
    tokens: Sequence[Token],
    spans: Sequence[tuple[int, int, str]],
    known: Mapping[str, Sequence[EntityRef]],
    names: Sequence[tuple[int, int]],
) -> Question:
    """What ``question`` asks (see the module docstring); ``known`` maps the
    keys of ``spans`` to the entities they name."""
    used = [False] * len(tokens)
    groups: list[tuple[EntityRef, ...]] = []
    places: list[tuple[int, int]] = []
    # Longest names first: "Jane Doe" before "Doe".
    for i, j, key in sorted(spans, key=lambda s: (s[0] - s[1], s[0])):
        refs = known.get(key)
        if not refs or any(used[i:j]) or all(r.kind == "concept" for r in refs):
            # A common noun that names a concept ("year") is a word of the
            # question, not an entity it is about.
            continue
        for k in range(i, j):
            used[k] = True
        if tuple(refs) not in groups:
            groups.append(tuple(refs))
            places.append((i, j))
    resolved = {(tokens[i][0], tokens[j - 1][1]) for i, j in places}
    unknown = tuple(question[a:b].lower() for a, b in names if (a, b) not in resolved)
    wh = _wh(tokens)
    terms: set[str] = set()
    search: list[str] = []
    verb: str | None = None
    verb_at = -1
    for index, (_, _, word) in enumerate(tokens):
        lower = word.lower()
        if lower in STOPWORDS or lower in QUESTION_WORDS or used[index]:
            continue
        search.append(lower)
        stemmed = stem(lower)
        terms.add(stemmed)
        if verb is None and stemmed in _VERB_STEMS:
            verb, verb_at = _VERB_STEMS[stemmed], index
    family, cue_at, noun_cue = _family(question, tokens, used, places, verb)
    roles = _roles(tokens, places, verb, verb_at, family, cue_at, noun_cue)
    asked = set(terms)
    if family is not None:
        asked -= family.cues
    descriptor = _descriptor(tokens, wh)
    if descriptor is not None:
        asked.discard(stem(descriptor))
    counted: frozenset[str] = frozenset()
    if wh == "how many":
        noun = _descriptor(tokens, "how many")
        if noun is not None:
            counted = next((c for c in _COUNT_CLASSES if stem(noun) in c), frozenset({stem(noun)}))
    return Question(
        groups=tuple(groups),
        roles=tuple(roles),
        verb=verb,
        family=family,
        terms=frozenset(terms),
        asked=frozenset(asked),
        unknown=unknown,
        search=tuple(search),
        phrases=tuple(question[tokens[i][0] : tokens[j - 1][1]] for i, j in places),
        wh=wh,
        counted=counted,
        dangling=not groups and any(t[2].lower() in _PRONOUNS for t in tokens),
    )


def _descriptor(tokens: Sequence[Token], wh: str | None) -> str | None:
    """The noun after "which"/"what"/"how many" ("which country" → "country")."""
    if wh not in ("which", "what", "how many"):
        return None
    words = [t[2].lower() for t in tokens]
    anchor = "many" if wh == "how many" else wh
    for index, word in enumerate(words[:-1]):
        if word == anchor:
            following = words[index + 1]
            if following not in STOPWORDS and following not in QUESTION_WORDS:
                return following
            return None
    return None


def _family(
    question: str,
    tokens: Sequence[Token],
    used: Sequence[bool],
    places: Sequence[tuple[int, int]],
    verb: str | None,
) -> tuple[Family | None, int, bool]:
    """The relation the question asks about, the index of its cue word and
    whether that word is a noun naming one end (see the module docstring)."""
    possessed = _possessed(question, tokens, places)
    if possessed is not None:
        # "X's funding round": only the possessed noun's head says what is asked.
        head = tokens[possessed][2].lower()
        owner = max(j for _, j in places if j <= possessed)
        role = _role_family(" ".join(t[2] for t in tokens[owner : possessed + 1]))
        if role is not None:
            return role, possessed, True
        for family in FAMILIES:
            if stem(head) in family.cues:
                return family, possessed, True
        return None, -1, False
    role = _role_family(" ".join(t[2] for t, u in zip(tokens, used, strict=True) if not u))
    if role is not None:
        at = next((i for i, t in enumerate(tokens) if t[2].lower() in role.nouns | {"chief"}), -1)
        return role, at, True
    for index, (_, _, word) in enumerate(tokens):
        lower = word.lower()
        if used[index] or lower in STOPWORDS or lower in QUESTION_WORDS:
            continue
        stemmed = stem(lower)
        if verb is not None and _VERB_STEMS.get(stemmed) == verb and verb in _BY_VERB:
            return _BY_VERB[verb], index, False
        for family in FAMILIES:
            if stemmed in family.cues:
                return family, index, lower in family.nouns
    return None, -1, False


def _roles(
    tokens: Sequence[Token],
    places: Sequence[tuple[int, int]],
    verb: str | None,
    verb_at: int,
    family: Family | None,
    cue_at: int,
    noun_cue: bool,
) -> list[Role | None]:
    roles: list[Role | None] = []
    passive = verb is not None and any(t[2].lower() in _BE for t in tokens[:verb_at])
    for i, _ in places:
        if family is not None and noun_cue:
            # "X's CEO", "the CEO of X": X holds it; "… headquarters to Y": Y is the other end.
            after_of = i > cue_at and i > 0 and tokens[i - 1][2].lower() == "of"
            if i < cue_at or after_of or cue_at < 0:
                roles.append(family.holder)
            else:
                roles.append("object" if family.holder == "subject" else "subject")
        elif family is not None and (verb is None or family.name != verb):
            roles.append("subject" if i < cue_at else "object")
        elif verb is not None:
            # "What did Acme acquire?" asks about the subject; "Who acquired
            # Acme?" and "When was Acme acquired?" about the object.
            roles.append("subject" if (i < verb_at) != passive else "object")
        else:
            roles.append(None)
    return roles
