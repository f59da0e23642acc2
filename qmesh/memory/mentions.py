"""Mentions in one sentence, by rule: capitalised names (people and
organisations), quoted terms, dates, money, percentages and numbers.

For: :func:`find_mentions`, the first half of :class:`qmesh.memory.extract.RuleExtractor`.
Not for: relations between the mentions (:mod:`qmesh.memory.extract`).
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterator
from itertools import islice
from typing import Final

from qmesh.memory.extraction import Mention
from qmesh.memory.terms import CORPORATE_SUFFIXES, QUESTION_WORDS, STOPWORDS

__all__ = [
    "CONNECTORS",
    "LOCATIVE_SUFFIXES",
    "NUMBER_WORDS",
    "ORG_WORDS",
    "RULE_MENTIONS",
    "find_mentions",
    "is_title_line",
]

RULE_MENTIONS: Final = 32
"""Mentions the rules keep in one sentence (the first by priority). Prose has
a handful; a sentence with hundreds is a list of numbers, and matching the
relation patterns costs time in proportion to its mentions."""
_CANDIDATES: Final = 2 * RULE_MENTIONS


_MONTH: Final = (
    r"(?:January|February|March|April|May|June|July|August|September|October|November|December"
    r"|Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sept|Sep|Oct|Nov|Dec)"
)
_DATE_RE: Final = re.compile(
    rf"\b\d{{1,2}}(?:st|nd|rd|th)?\s+(?:of\s+)?{_MONTH}\.?,?\s+\d{{4}}\b"
    rf"|\b{_MONTH}\.?\s+\d{{1,2}}(?:st|nd|rd|th)?,\s*\d{{4}}\b"
    rf"|\b{_MONTH}\.?\s+\d{{1,2}}(?:st|nd|rd|th)?\s+\d{{4}}\b"
    rf"|\b(?:early|mid|late)[- ]{_MONTH}\s+\d{{4}}\b"
    rf"|\b{_MONTH}\s+\d{{4}}\b"
    r"|\b\d{4}-\d{2}-\d{2}\b"
    r"|\b(?:1[0-9]|20)\d{2}s?\b(?![,.]\d)"
    r"|\b(?:Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday)\b"
    r"|\b(?:January|February|March|April|June|July|August|September|October|November|December)\b"
)
_SCALE: Final = r"(?:\s?(?:thousand|million|billion|trillion|bn|mn|m|k)\b)?"
_MONEY_RE: Final = re.compile(
    rf"[$€£¥]\s?\d[\d,]*(?:\.\d+)?{_SCALE}"
    rf"|\b\d[\d,]*(?:\.\d+)?{_SCALE}\s?(?:dollars|euros|pounds|USD|EUR|GBP)\b"
)
_PERCENT_RE: Final = re.compile(r"\b\d+(?:\.\d+)?\s?(?:%|percent\b|per cent\b)")
_NUMBER_RE: Final = re.compile(
    r"\b\d[\d,]*(?:\.\d+)?(?:\s(?:thousand|million|billion|trillion))?\b(?![.,]?\d)"
)
NUMBER_WORDS: Final = frozenset(
    """
    two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen
    sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety
    """.split()
)
"""Numbers written as words (not "one", which is as often a pronoun)."""
_NUMBER_WORD_RE: Final = re.compile(
    r"\b(?i:" + "|".join(sorted(NUMBER_WORDS, key=len, reverse=True)) + r")"
    r"(?:[- ](?i:one|two|three|four|five|six|seven|eight|nine))?"
    r"(?:\s(?:hundred|thousand|million|billion))?\b(?![-'’]\w)"
)
LOCATIVE_SUFFIXES: Final = ("-based", "-headquartered")
"""A name that ends in one of these ("Springfield-based") is a place modifying
what follows; the name is the part before it."""
_QUOTED_RE: Final = re.compile(r"\"([^\"\n]{2,80}?)\"|“([^”\n]{2,80}?)”|‘([^’\n]{2,60}?)’")

# Word tokens for name finding: words (with inner apostrophes, hyphens and
# ampersands, and a trailing period kept for later inspection) or a single
# other character.
_TOKEN_RE: Final = re.compile(r"\w[\w'’&-]*\.?|&|[^\w\s]")
CONNECTORS: Final = frozenset(
    {"of", "de", "del", "della", "der", "den", "van", "von", "la", "le", "du", "da", "di", "&"}
)
_NAME_ABBREVIATIONS: Final = frozenset(
    {"corp", "inc", "ltd", "co", "jr", "sr", "st", "bros", "mt", "ft", "plc"}
)
_HONORIFICS: Final = frozenset({"mr", "mrs", "ms", "mx", "dr", "prof", "sir", "dame"})
_TITLES: Final = frozenset(
    """
    ceo cto cfo coo cio cmo vp svp evp chairman chairwoman chair president founder
    co-founder cofounder director manager chief head minister senator governor mayor
    professor dean editor general
    """.split()
)
# Capitalised words that start sentences without naming anything.
_STARTERS: Final = (
    STOPWORDS
    | QUESTION_WORDS
    | frozenset(
        """
        however today yesterday tomorrow later earlier meanwhile then also after before since
        during although though despite following according unlike like as in on at by for
        from with without founded based located born many several most some both each every
        other another one two three four five first last next finally recently currently
        initially originally eventually instead thus therefore furthermore moreover overall
        yes no there here its it's this these those our we you i he she they his her their
        while once soon now still only even all any such but and or so nor yet if unless
        because whereas although until upon despite among between within beyond toward towards
        nevertheless nonetheless indeed perhaps maybe afterwards additionally similarly
        """.split()
    )
)
ORG_WORDS: Final = CORPORATE_SUFFIXES | frozenset(
    """
        university institute college bank group foundation agency association council party
        ministry department school hospital laboratory laboratories labs systems technologies
        industries holdings partners airlines motors press society committee museum library
        church club team fund federation union organization organisation corporation
        forum academy institution
        robotics energy pharma pharmaceuticals diagnostics therapeutics biotech foods ferries
        ventures capital mobility logistics airways shipping software networks electronics
        semiconductors analytics dynamics media studios entertainment solutions brands
        automotive aerospace chemicals mining insurance investments telecom
        """.split()
)
"""Last words that make a capitalised name an organisation's: corporate
suffixes, institutions, and the industry nouns companies name themselves by
("Acme Robotics", "Globex Pharma", "Initech Ventures")."""


def _is_capitalised(token: str) -> bool:
    return token[:1].isupper()


def _name_spans(sentence: str) -> Iterator[tuple[int, int]]:
    tokens = [(m.start(), m.end(), m.group()) for m in _TOKEN_RE.finditer(sentence)]
    first_word = next((i for i, t in enumerate(tokens) if t[2][0].isalnum()), None)
    i = 0
    while i < len(tokens):
        text = tokens[i][2]
        if not (_is_capitalised(text) and text[0].isalpha()):
            i += 1
            continue
        # Grow the name over adjacent capitalised tokens and connectors.
        run = [i]
        j = i
        while True:
            if tokens[j][2].endswith(".") and not _keeps_period(tokens[j][2]):
                break
            if tokens[j][2].lower().rstrip(".") in CORPORATE_SUFFIXES and len(run) > 1:
                break  # "Umbrella Ltd. Hank Scorpio" is two names
            if tokens[j][2].endswith(("'s", "’s")) or _locative_suffix(tokens[j][2]):
                break
            nxt = j + 1
            if nxt < len(tokens) and tokens[nxt][2].lower() in CONNECTORS:
                if nxt + 1 < len(tokens) and _is_capitalised(tokens[nxt + 1][2]):
                    if _adjacent(sentence, tokens, j, nxt) and _adjacent(
                        sentence, tokens, nxt, nxt + 1
                    ):
                        run.extend((nxt, nxt + 1))
                        j = nxt + 1
                        continue
                break
            if (
                nxt < len(tokens)
                and _is_capitalised(tokens[nxt][2])
                and tokens[nxt][2][0].isalpha()
                and _adjacent(sentence, tokens, j, nxt)
            ):
                run.append(nxt)
                j = nxt
                continue
            break
        i = j + 1
        words = [tokens[k] for k in run]
        # Drop sentence-initial function words, honorifics and job titles.
        while words:
            lower = words[0][2].lower().rstrip(".")
            at_start = first_word is not None and words[0][0] == tokens[first_word][0]
            if (
                (at_start and lower in _STARTERS)
                or lower in _HONORIFICS
                or lower in _TITLES
                or lower in CONNECTORS
                or (lower in STOPWORDS and len(words) == 1)
            ):
                words = words[1:]
                continue
            break
        while words and (
            words[-1][2].lower().rstrip(".") in _TITLES or words[-1][2].lower() in CONNECTORS
        ):
            words = words[:-1]
        if not words:
            continue
        span_start = words[0][0]
        _, last_end, last = words[-1]
        suffix = _locative_suffix(last)
        if suffix:
            last_end -= suffix
        elif last.endswith(("'s", "’s")):
            last_end -= 2
        elif last.endswith(".") and not _keeps_period(last):
            last_end -= 1
        if len(words) == 1 and words[0][2].rstrip(".").lower() in {"i", "a"}:
            continue
        yield span_start, last_end


def _locative_suffix(token: str) -> int:
    """The length of a locative suffix ("-based") that ``token`` ends with, or 0."""
    lower = token.lower()
    for suffix in LOCATIVE_SUFFIXES:
        if lower.endswith(suffix) and len(lower) > len(suffix):
            return len(suffix)
    return 0


def _keeps_period(token: str) -> bool:
    base = token.rstrip(".")
    return (len(base) == 1 and base.isupper()) or base.lower() in _NAME_ABBREVIATIONS


def _adjacent(sentence: str, tokens: list[tuple[int, int, str]], a: int, b: int) -> bool:
    gap = sentence[tokens[a][1] : tokens[b][0]]
    return gap.isspace() and "\n" not in gap and len(gap) <= 2


def _name_kind(text: str) -> str:
    last = text.split()[-1].lower().rstrip(".")
    return "org" if last in ORG_WORDS else "name"


def is_title_line(sentence: str) -> bool:
    """A heading: no terminal punctuation and every word capitalised or a function word."""
    if sentence.rstrip()[-1:] in '.!?:;"”)':
        return False
    tokens = re.findall(r"[^\W\d_][\w'’-]*", sentence)
    if not tokens or len(tokens) > 10:
        return False
    return all(_is_capitalised(t) or t.lower() in STOPWORDS for t in tokens)


def find_mentions(sentence: str) -> list[Mention]:
    candidates: list[tuple[int, int, int, str]] = []  # priority, start, end, kind
    # At most _CANDIDATES of each kind, in sentence order: no more than
    # RULE_MENTIONS are kept, so the rest of a sentence of 500 numbers
    # would only be sorted and thrown away.
    for match in islice(_QUOTED_RE.finditer(sentence), _CANDIDATES):
        group = next(g for g in (1, 2, 3) if match.group(g) is not None)
        inner = match.group(group)
        stripped = inner.strip()
        if (
            stripped
            and len(stripped.split()) <= 6
            and stripped[-1] not in ",.;:!?"
            and stripped.lower() not in STOPWORDS
        ):
            start = match.start(group) + (len(inner) - len(inner.lstrip()))
            candidates.append((0, start, start + len(stripped), "term"))
    for pattern, kind in ((_MONEY_RE, "money"), (_PERCENT_RE, "percent"), (_DATE_RE, "date")):
        for match in islice(pattern.finditer(sentence), _CANDIDATES):
            candidates.append((1, match.start(), match.end(), kind))
    for start, end in islice(_name_spans(sentence), _CANDIDATES):
        candidates.append((2, start, end, _name_kind(sentence[start:end])))
    for match in islice(_NUMBER_RE.finditer(sentence), _CANDIDATES):
        candidates.append((3, match.start(), match.end(), "number"))
    for match in islice(_NUMBER_WORD_RE.finditer(sentence), _CANDIDATES):
        candidates.append((3, match.start(), match.end(), "number"))
    # The spans taken so far are disjoint, so sorted by start they are sorted
    # by end too, and the only one that can overlap [start, end) is the last
    # that starts before ``end``: a bisection, not a scan of every span (a
    # sentence of a few hundred numbers made that quadratic).
    taken_starts: list[int] = []
    taken_ends: list[int] = []
    mentions: list[Mention] = []
    for _, start, end, kind in sorted(candidates, key=lambda c: (c[0], c[1], -c[2])):
        if len(mentions) == RULE_MENTIONS:
            break
        before = bisect.bisect_left(taken_starts, end)
        if before and taken_ends[before - 1] > start:
            continue
        taken_starts.insert(before, start)
        taken_ends.insert(before, end)
        mentions.append(Mention(start, end, sentence[start:end], kind))
    mentions.sort(key=lambda m: m.start)
    return mentions
