"""Extractive summarization: the most central sentences, in their order.

For: short summaries of prose the Gate answers itself (``task=summarize``)
at thousands per second on one core. The score is TextRank's: sentences
are nodes, the weight between two is the number of content words they
share divided by the sum of the logs of their lengths, and a few damped
power iterations give each sentence's centrality. A small bonus for the
opening sentence breaks ties the way news-style text expects.

Not for: abstractive summaries (a daemon's model does those) or documents
of many thousands of sentences (the graph is quadratic; input beyond
``MAX_SENTENCES`` is cut, which keeps the worst case bounded).

Why not a Rust helper: on ≈ 1 KB texts the work is a handful of regex
scans (C) plus ~100 set intersections; Python reaches well over the 3,600/s
target, so the extension would add build weight without need
(``bench/nlp.py`` measures it).
"""

from __future__ import annotations

import math
import operator
from typing import Final

from qmesh.nlp.text import STOPWORDS, WORD_RE, sentence_spans

__all__ = ["summarize", "summary_sentences"]

MAX_SENTENCES: Final = 200
DAMPING: Final = 0.85
# The ranking, which is all that is used, settles long before the scores
# do: on the bench corpus 5 rounds already pick what 60 rounds pick.
ITERATIONS: Final = 6
LEAD_BONUS: Final = 0.05
_mul = operator.mul
# log() of small lengths, precomputed: most sentences have < 64 content words.
_LOG: Final = tuple(math.log(n) if n > 1 else 0.0 for n in range(256))


def summary_sentences(text: str, count: int = 3) -> list[int]:
    """Indexes (into :func:`~qmesh.nlp.text.sentence_spans`) of the chosen
    sentences, ascending."""
    spans = sentence_spans(text)[:MAX_SENTENCES]
    return _choose(text, spans, count)


def summarize(text: str, count: int = 3) -> str:
    """The ``count`` most central sentences of ``text``, in document order."""
    spans = sentence_spans(text)[:MAX_SENTENCES]
    chosen = _choose(text, spans, count)
    return " ".join(text[spans[i][0] : spans[i][1]] for i in chosen)


def _choose(text: str, spans: list[tuple[int, int]], count: int) -> list[int]:
    n = len(spans)
    if n <= count:
        return list(range(n))
    lower = text.lower()
    findall = WORD_RE.findall
    stop = STOPWORDS
    bags: list[frozenset[str]] = []
    logs: list[float] = []
    for start, end in spans:
        bag = frozenset(findall(lower, start, end)) - stop
        bags.append(bag)
        size = len(bag)
        logs.append(_LOG[size] if size < 256 else math.log(size))
    # Weighted adjacency as neighbour lists; row sums for normalisation.
    neighbours: list[list[tuple[int, float]]] = [[] for _ in range(n)]
    totals = [0.0] * n
    for i in range(n):
        bag_i = bags[i]
        if not bag_i:
            continue
        log_i = logs[i]
        row = neighbours[i]
        for j in range(i + 1, n):
            shared = len(bag_i & bags[j])
            if shared:
                denominator = log_i + logs[j]
                weight = shared / denominator if denominator > 0 else float(shared)
                row.append((j, weight))
                neighbours[j].append((i, weight))
                totals[i] += weight
                totals[j] += weight
    # Column-normalised weights as parallel index/weight lists, so an
    # iteration is one C-level sum(map(...)) per sentence.
    sources = [[j for j, _ in row] for row in neighbours]
    weights = [[w / totals[j] for j, w in row] for row in neighbours]
    rows = list(zip(sources, weights, strict=True))
    base = (1.0 - DAMPING) / n
    scores = [1.0 / n] * n
    for _ in range(ITERATIONS):
        get = scores.__getitem__
        scores = [base + DAMPING * sum(map(_mul, map(get, js), ws)) for js, ws in rows]
    scores[0] += LEAD_BONUS / n
    ranked = sorted(range(n), key=scores.__getitem__, reverse=True)
    return sorted(ranked[:count])
