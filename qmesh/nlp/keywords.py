"""Keywords: the content words and two-word phrases that carry a text.

For: ``task=keywords`` answered by the Gate. A term's score is its count
times a length bonus; two adjacent content words that recur form a phrase,
which then outranks its parts. Deterministic: ties go to first occurrence.

Not for: a vocabulary-wide TF-IDF (there is no corpus at the Gate) or
named-entity recognition.
"""

from __future__ import annotations

from typing import Final

from qmesh.nlp.text import STOPWORDS, WORD_RE

__all__ = ["keywords"]

MIN_LENGTH: Final = 3


def keywords(text: str, count: int = 8) -> list[str]:
    """Up to ``count`` keywords of ``text``, best first."""
    tokens = WORD_RE.findall(text.lower())
    stop = STOPWORDS
    scores: dict[str, float] = {}
    first: dict[str, int] = {}
    previous: str | None = None
    for position, token in enumerate(tokens):
        if token in stop or len(token) < MIN_LENGTH or token.isdigit():
            previous = None
            continue
        scores[token] = scores.get(token, 0.0) + 1.0 + 0.1 * min(len(token), 12)
        first.setdefault(token, position)
        if previous is not None:
            phrase = f"{previous} {token}"
            scores[phrase] = scores.get(phrase, 0.0) + 1.5
            first.setdefault(phrase, position)
        previous = token
    # A phrase seen once is chance; one seen twice names something.
    ranked = sorted(
        (t for t in scores if " " not in t or scores[t] >= 3.0),
        key=lambda t: (-scores[t], first[t]),
    )
    chosen: list[str] = []
    covered: set[str] = set()
    for term in ranked:
        if term in covered:
            continue
        chosen.append(term)
        if " " in term:
            covered.update(term.split(" "))
        if len(chosen) == count:
            break
    return chosen
