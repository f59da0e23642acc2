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
from typing import Any, Final

from qmesh import _core

__all__ = ["DEFAULT_MAX_DEPTH", "PeerJsonError", "loads", "nesting_depth"]

DEFAULT_MAX_DEPTH: Final = 32
"""Deep enough for any request qmesh defines (OpenAI tool schemas included)."""


class PeerJsonError(ValueError):
    """A peer's JSON is too large, too deep or malformed."""


def nesting_depth(data: bytes) -> int:
    """The deepest nesting of arrays and objects in ``data``, in one linear
    pass in Rust (it runs on the event loop, over bodies of megabytes).
    Brackets inside strings nest nothing; a string left open runs to the end.
    Unbalanced input gives some number; :func:`json.loads` rejects it later.
    """
    return _core.json_nesting_depth(data)


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
