"""Sentence and word splitting shared by the internal NLP skills.

For: fast, allocation-light splitting of (mostly English) prose: sentence
spans by a precompiled regex plus an abbreviation check, lower-cased word
tokens, and the English stop-word list. Everything here is compiled once
at import; the per-call work is a few C-level regex scans.

Not for: linguistic accuracy beyond what extractive summaries and keyword
lists need (no POS tagging, no lemmatisation), or non-Latin scripts'
sentence rules (text without ``.!?`` is one sentence).
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["STOPWORDS", "WORD_RE", "sentence_spans", "words"]

# A sentence ends at . ! ? (or a run of them, optionally followed by a
# closing quote or bracket) followed by white space; a paragraph break ends
# one too.
_BOUNDARY_RE: Final = re.compile(r"""[.!?]+["')\]]*\s+|\n\s*\n""")
# The same without the paragraph branch: a third faster, and enough for
# text that has no blank line (checked per call with one substring search).
_SENTENCE_END_RE: Final = re.compile(r"""[.!?]+["')\]]*\s+""")
WORD_RE: Final = re.compile(r"[^\W_]+(?:'[^\W_]+)?")
# Tokens after which a period does not end a sentence.
_ABBREVIATIONS: Final = frozenset(
    "mr mrs ms dr prof sr jr st vs etc e.g i.e u.s u.k inc ltd co corp no fig al approx".split()
)

STOPWORDS: Final = frozenset(
    """a about above after again against all also am an and any are aren't as at be
    because been before being below between both but by can can't cannot could couldn't
    did didn't do does doesn't doing don't down during each few for from further had
    hadn't has hasn't have haven't having he he'd he'll he's her here here's hers herself
    him himself his how how's however i i'd i'll i'm i've if in into is isn't it it's its
    itself just let's me more most mustn't my myself no nor not of off on once only or
    other ought our ours ourselves out over own same shan't she she'd she'll she's should
    shouldn't so some such than that that's the their theirs them themselves then there
    there's these they they'd they'll they're they've this those through to too under
    until up upon very was wasn't we we'd we'll we're we've were weren't what what's when
    when's where where's which while who who's whom why why's will with won't would
    wouldn't you you'd you'll you're you've your yours yourself yourselves one two may
    might must shall many much every said says say like even though yet still already
    via per within without across among around whether either neither""".split()
)


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` of each sentence in ``text``, white space trimmed."""
    spans: list[tuple[int, int]] = []
    start = 0
    n = len(text)
    # Leading white space is never part of a sentence.
    while start < n and text[start].isspace():
        start += 1
    boundaries = _BOUNDARY_RE if "\n\n" in text else _SENTENCE_END_RE
    for match in boundaries.finditer(text):
        end = match.start()
        stop = match.end()
        boundary = text[end:stop]
        if boundary[0] == "." and "\n\n" not in boundary:
            space = text.rfind(" ", start, end)
            if text[space + 1 : end].lower() in _ABBREVIATIONS:
                continue
        # Keep the terminal punctuation (and quote) with the sentence.
        keep = end + len(boundary.rstrip())
        if keep > start:
            spans.append((start, keep))
        start = stop
    tail = text[start:].rstrip()
    if tail:
        spans.append((start, start + len(tail)))
    return spans


def words(text: str) -> list[str]:
    """Lower-cased word tokens of ``text``."""
    return WORD_RE.findall(text.lower())
