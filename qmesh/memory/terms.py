"""Words, stems and entity keys: the vocabulary the extractor, the store and
the query share, so that a question and a sentence are compared the same way.

For: tokenising, a small suffix-stripping stemmer (consistency matters more
than linguistic accuracy: "founded", "founder" and "founding" all become
"found"), stop words, and :func:`entity_key`, the normal form under which
surface names merge ("Acme Corp.", "ACME Corporation" and "the Acme
corporation" are one entity).

Not for: language detection or anything beyond English; full-text search has
its own tokenizer (SQLite FTS5's porter), used only to find candidates.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from typing import Final

__all__ = [
    "CORPORATE_SUFFIXES",
    "QUESTION_WORDS",
    "STOPWORDS",
    "content_stems",
    "entity_key",
    "stem",
    "words",
]

_WORD_RE: Final = re.compile(r"\w+(?:['’-]\w+)*")

STOPWORDS: Final = frozenset(
    """
    a about above after again against all also am an and any are as at be because been
    before being below between both but by can could did do does doing down during each
    either few for from further had has have having he her here hers herself him himself
    his i if in into is it its itself just me more most my myself neither no nor not now
    of off on once only or other our ours ourselves out over own same she should so some
    such than that the their theirs them themselves then there these they this those
    through to too under until up very was we were what when where which while who whom
    whose why will with would you your yours yourself yourselves how s t don shall may
    might must upon onto per via among within without whether ever still yet
    """.split()
)
"""Function words: never content, never a whole entity key."""

QUESTION_WORDS: Final = frozenset(
    """
    who whom whose what when where which why how many much tell know give list name
    describe explain show find please anything something everything say says said
    """.split()
)
"""Words that shape a question without being what it is about."""

CORPORATE_SUFFIXES: Final = frozenset(
    "inc incorporated corp corporation ltd limited llc plc co company gmbh ag sa nv bv".split()
)

_IRREGULAR: Final = {
    "made": "make", "bought": "buy", "wrote": "write", "written": "write", "built": "build",
    "won": "win", "led": "lead", "ran": "run", "sold": "sell", "began": "begin",
    "begun": "begin", "grew": "grow", "grown": "grow", "took": "take", "taken": "take",
    "gave": "give", "given": "give", "became": "become", "held": "hold", "left": "leave",
    "met": "meet", "paid": "pay", "went": "go", "gone": "go", "knew": "know",
    "known": "know", "children": "child", "people": "person", "men": "man",
    "women": "woman", "heads": "head", "headed": "head", "bore": "bear", "chose": "choose",
    "chosen": "choose", "drove": "drive", "driven": "drive", "fell": "fall", "found": "found",
    "headquarters": "headquarter", "thought": "think", "taught": "teach", "spent": "spend",
    "sent": "send", "lost": "lose", "kept": "keep", "brought": "bring", "sought": "seek",
}  # fmt: skip


def words(text: str) -> list[str]:
    """Lower-cased word tokens (letters, digits, inner apostrophes and hyphens)."""
    return [w.lower().replace("’", "'") for w in _WORD_RE.findall(text)]


@functools.lru_cache(maxsize=1 << 16)
def stem(word: str) -> str:
    """A crude, consistent stem of one lower-case word (cached: a corpus
    repeats its words, and queries stem every candidate sentence)."""
    if word.endswith("'s"):
        word = word[:-2]
    irregular = _IRREGULAR.get(word)
    if irregular is not None:
        word = irregular
    elif len(word) > 4 and word.endswith("ies"):
        word = word[:-3] + "y"
    else:
        for suffix, shortest in (("ing", 6), ("ed", 5), ("es", 5), ("er", 6), ("s", 4)):
            if word.endswith(suffix) and len(word) >= shortest and not word.endswith("ss"):
                word = word[: -len(suffix)]
                if suffix in ("ing", "ed") and len(word) > 3 and word[-1] == word[-2]:
                    if word[-1] not in "lsz":
                        word = word[:-1]
                break
    if len(word) > 3 and word.endswith("e"):
        word = word[:-1]
    return word


def content_stems(text: str) -> list[str]:
    """Stems of the words of ``text`` that are not stop words, in order, without repeats."""
    return list(dict.fromkeys(stem(w) for w in words(text) if w not in STOPWORDS))


_THOUSANDS_RE: Final = re.compile(r"(?<=\d),(?=\d{3}\b)")
_DOT_RE: Final = re.compile(r"(?<!\d)\.|\.(?!\d)")
_PUNCT_RE: Final = re.compile(r"[^\w&'%$€£.+-]+")


@functools.lru_cache(maxsize=1 << 16)
def entity_key(surface: str) -> str:
    """The normal form under which surface names are the same entity: NFKC,
    case-folded, without a leading "the", a trailing possessive, acronym dots,
    punctuation, or a trailing corporate suffix ("Inc.", "Corporation")."""
    text = unicodedata.normalize("NFKC", surface).replace("’", "'").casefold().strip()
    text = _THOUSANDS_RE.sub("", text)
    text = _DOT_RE.sub("", text)
    text = _PUNCT_RE.sub(" ", text)
    tokens = text.split()
    if tokens and tokens[-1].endswith("'s"):
        tokens[-1] = tokens[-1][:-2]
    tokens = [t.strip("'-") for t in tokens]
    tokens = [t for t in tokens if t]
    if len(tokens) > 1 and tokens[0] == "the":
        tokens = tokens[1:]
    for _ in range(2):  # "Co., Ltd."
        if len(tokens) > 1 and tokens[-1] in CORPORATE_SUFFIXES:
            tokens = tokens[:-1]
    return " ".join(tokens)
