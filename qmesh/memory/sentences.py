"""Split a document's text into sentences with exact offsets and stable ids.

For: the unit of provenance. A sentence is a span ``text[start:end]`` of the
stored document, trimmed of surrounding whitespace, so slicing the document
with a citation's offsets gives back exactly the cited text. Offsets count
Unicode code points (Python ``str`` indices), not bytes or UTF-16 units.

A sentence id is ``DOC_ID:START-END:HASH`` where HASH is the first 16 hex
digits of the SHA-256 of the sentence text: the same document text gives the
same ids on every ingest, and an id says by itself where to look and what
must be found there.

Not for: linguistic perfection. The rules are the usual ones (terminal
punctuation followed by a capital, a digit or an opening quote; known
abbreviations and initials do not end a sentence; blank lines and list
markers always do), and an over-long run without punctuation is cut at a
space so that one sentence stays small enough to cite.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from itertools import islice
from typing import Final

import attrs

__all__ = ["MAX_SENTENCE_CHARS", "Sentence", "sentence_hash", "sentence_id", "split_sentences"]

MAX_SENTENCE_CHARS: Final = 1000
"""Longer runs without a sentence boundary are cut at a space."""

# Paragraph breaks (a blank line), and a newline before a list item: always
# a boundary, whatever the punctuation.
_BLOCK_BREAK_RE: Final = re.compile(r"\n[ \t\r\f\v]*\n\s*|\n(?=[ \t]*(?:[-*+•]|\d{1,3}[.)])\s)")
# A candidate end: terminal punctuation, closing quotes/brackets, then space
# or the end of the block. It starts only at the first mark of a run and takes
# the run whole: tried from every mark, a long run of them ("." * 100,000)
# backtracks quadratically.
_END_RE: Final = re.compile(r"(?<![.!?…])[.!?…]++[\"'”’)\]]*+(?=\s|$)")
_STARTS_SENTENCE_RE: Final = re.compile(r"\s+[\"'“‘(\[]*[A-Z0-9À-ÖØ-Þ]")
_ABBREVIATIONS: Final = frozenset(
    """
    mr mrs ms dr prof sr jr st mt ft rev hon gen col lt sgt capt cmdr adm gov pres sen rep
    bros dept univ assn est approx vs fig figs vol vols pp
    ed eds e.g i.e cf al jan feb mar apr jun jul aug sep sept oct nov dec u.s u.k u.n
    e.u a.m p.m
    """.split()
)
# Not "Inc.", "Ltd.", "Corp.": a company's suffix ends its name, so a capital
# after it starts a new sentence far more often than it continues the name.
_WORD_BEFORE_RE: Final = re.compile(r"([\w.]+)$")


def sentence_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def sentence_id(document_id: str, start: int, end: int, text: str) -> str:
    return f"{document_id}:{start}-{end}:{sentence_hash(text)}"


@attrs.frozen
class Sentence:
    """``text == document[start:end]``; ``id`` as described in the module docstring."""

    id: str
    start: int
    end: int
    text: str

    @property
    def hash(self) -> str:
        return self.id.rsplit(":", 1)[1]


def split_sentences(document_id: str, text: str, *, limit: int | None = None) -> list[Sentence]:
    """The sentences of ``text``, in order, without overlaps; only the first
    ``limit`` if given (so that a caller with a cap need not split, hash and
    hold every one of a million one-word lines before refusing them)."""
    sentences = []
    for start, end in islice(_spans(text), limit):
        sentence = text[start:end]
        sentences.append(
            Sentence(sentence_id(document_id, start, end, sentence), start, end, sentence)
        )
    return sentences


def _spans(text: str) -> Iterator[tuple[int, int]]:
    position = 0
    for match in _BLOCK_BREAK_RE.finditer(text):
        yield from _block_spans(text, position, match.start())
        position = match.end()
    yield from _block_spans(text, position, len(text))


def _block_spans(text: str, start: int, end: int) -> Iterator[tuple[int, int]]:
    # Where the block's text ends: a candidate end at or after it ends the
    # block (found once here rather than by stripping the rest of the block
    # at every candidate, which is quadratic in a block of many of them).
    last = end
    while last > start and text[last - 1].isspace():
        last -= 1
    position = start
    for match in _END_RE.finditer(text, start, end):
        stop = match.end()
        if not _is_boundary(text, match.start(), stop, end, last):
            continue
        yield from _trimmed(text, position, stop)
        position = stop
    yield from _trimmed(text, position, end)


def _is_boundary(text: str, punct: int, stop: int, end: int, last: int) -> bool:
    if stop >= last:
        return True
    if not _STARTS_SENTENCE_RE.match(text, stop, end):
        return False
    if text[punct] != ".":
        return True
    word = _WORD_BEFORE_RE.search(text, max(0, punct - 20), punct)
    if word is None:
        return True
    token = word.group(1)
    # An initial ("J. R. Tolkien") or a known abbreviation ("Dr. Who").
    if len(token) == 1 and token.isupper():
        return False
    return token.lower().strip(".") not in _ABBREVIATIONS


def _trimmed(text: str, start: int, end: int) -> Iterator[tuple[int, int]]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    while end - start > MAX_SENTENCE_CHARS:
        cut = text.rfind(" ", start + 1, start + MAX_SENTENCE_CHARS)
        if cut <= start:
            cut = start + MAX_SENTENCE_CHARS
        stop = cut
        while stop > start and text[stop - 1].isspace():
            stop -= 1
        yield start, stop
        start = cut
        while start < end and text[start].isspace():
            start += 1
    if end > start:
        yield start, end
