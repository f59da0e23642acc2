"""JSON from a peer, parsed with its size and nesting depth bounded first.

For: every place where another party's JSON arrives (tunnel HELLO and OPEN,
HTTP request bodies, the daemon wire). ``json.loads`` recurses once per level
of nesting, so ``[`` × 16,000 raises ``RecursionError`` — not a ``ValueError``
— and a handler that catches only the latter lets it end the process. Here
depth is measured before parsing, without recursion, and every failure is
one :class:`PeerJsonError` (a ``ValueError``), so a caller's ordinary
``except ValueError`` is enough.

Not for: JSON the process wrote itself (files under DATA_DIR, its own
configuration), which ``json.loads`` reads as before.
"""

from __future__ import annotations

import json
import re
from itertools import accumulate
from typing import Any, Final

__all__ = ["DEFAULT_MAX_DEPTH", "PeerJsonError", "loads", "nesting_depth"]

DEFAULT_MAX_DEPTH: Final = 32
"""Deep enough for any request qmesh defines (OpenAI tool schemas included)."""

# A JSON string, escapes included. Strings are removed before brackets are
# counted, since a bracket inside a string does not nest anything.
# Linear, because it runs on the event loop holding the GIL, over bodies of
# megabytes: an unterminated string runs to the end of the input (json.loads
# rejects it; a bracket after its opening quote nests nothing before that),
# where failing to match made the search start again at every escaped quote
# inside it ('"' + '\\"' * 20,000: 11 s); and plain bytes go in runs, not one
# alternation per byte (17 times faster on a 7 MB document).
_STRING: Final = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\Z)', re.DOTALL)
_NOT_BRACKETS: Final = bytes(b for b in range(256) if b not in b"[]{}")
# +1 for an opening bracket, -1 for a closing one, indexed by byte value.
_DELTA: Final = tuple(1 if b in b"[{" else -1 if b in b"]}" else 0 for b in range(256))


class PeerJsonError(ValueError):
    """A peer's JSON is too large, too deep or malformed."""


def nesting_depth(data: bytes) -> int:
    """The deepest nesting of arrays and objects in ``data``, in linear time.

    Unbalanced input gives some number; :func:`json.loads` rejects it later.
    """
    brackets = _STRING.sub(b'""', data).translate(None, _NOT_BRACKETS)
    return max(accumulate(map(_DELTA.__getitem__, brackets)), default=0)


def loads(
    data: bytes | bytearray | memoryview | str,
    *,
    max_bytes: int,
    max_depth: int = DEFAULT_MAX_DEPTH,
    what: str = "JSON",
) -> Any:
    """Parse ``data``; raises :class:`PeerJsonError` for anything wrong with it."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    if len(raw) > max_bytes:
        raise PeerJsonError(f"{what} too large ({len(raw)} bytes; the limit is {max_bytes})")
    depth = nesting_depth(raw)
    if depth > max_depth:
        raise PeerJsonError(f"{what} nested too deep ({depth} levels; the limit is {max_depth})")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        # RecursionError cannot happen below max_depth; kept so that a
        # caller's limit set too high still cannot escape as a crash.
        raise PeerJsonError(f"malformed {what}: {exc}") from None
