"""Embeddings by the hashing trick: words and word bigrams, signed, hashed
into a fixed number of dimensions, then L2-normalised.

For: ``/v1/embeddings`` and ``task=embed`` answered by the Gate: cheap,
deterministic across processes and machines (CRC-32, not Python's salted
``hash``), good enough for near-duplicate detection and keyword-level
similarity. Cosine similarity of two vectors is their dot product.

Not for: semantic similarity between different wordings (that needs a
trained model; route ``model=`` to a daemon's embedding model for that).
"""

from __future__ import annotations

import math
import zlib
from typing import Final

from qmesh.nlp.text import STOPWORDS, WORD_RE

__all__ = ["DIMENSIONS", "embed"]

DIMENSIONS: Final = 256
_CACHE_LIMIT: Final = 65_536
# token -> (index, sign) per dimension count; bounded so hostile input
# cannot grow it without limit (cleared when full: the hash is cheap).
_slots: dict[tuple[str, int], tuple[int, float]] = {}


def _slot(feature: str, dimensions: int) -> tuple[int, float]:
    key = (feature, dimensions)
    slot = _slots.get(key)
    if slot is None:
        h = zlib.crc32(feature.encode())
        slot = (h % dimensions, 1.0 if (h >> 31) & 1 else -1.0)
        if len(_slots) >= _CACHE_LIMIT:
            _slots.clear()
        _slots[key] = slot
    return slot


def embed(text: str, dimensions: int = DIMENSIONS) -> list[float]:
    """A unit vector (all zeros for text without words)."""
    vector = [0.0] * dimensions
    previous: str | None = None
    for token in WORD_RE.findall(text.lower()):
        weight = 0.5 if token in STOPWORDS else 1.0
        index, sign = _slot(token, dimensions)
        vector[index] += sign * weight
        if previous is not None:
            index, sign = _slot(f"{previous} {token}", dimensions)
            vector[index] += sign * 0.5
        previous = token
    norm = math.sqrt(math.fsum(v * v for v in vector))
    if norm == 0.0:
        return vector
    return [v / norm for v in vector]
