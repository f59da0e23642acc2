"""The daemon ⇄ Gate messages carried on tunnel streams: JSON lines, sans-IO.

For: the services of docs/daemon.md — ``inventory`` (opened by the
daemon, a long-lived stream of ``hello`` / ``inventory`` / ``heartbeat``
lines), ``infer`` (opened by the Gate: one request line, then ``start`` /
``delta``… / ``end`` or ``error`` lines back) and ``control`` (opened by the
Gate: one ``stop`` / ``start`` / ``unload`` line, one ``done`` or ``error``
line back). :class:`LineDecoder` splits
bytes into JSON objects with a size cap checked before anything is kept;
:func:`encode` is its inverse; the ``*_event`` helpers build the lines, so
both ends spell them the same way.

Not for: sockets or streams (the roles own those), nor the meaning of an
inventory (:mod:`qmesh.fleet.inventory`) or of a request
(:mod:`qmesh.daemon.runtimes.base`).
"""

from __future__ import annotations

import json
from typing import Any, Final

from qmesh import peerjson

__all__ = [
    "CONTROL_OPERATIONS",
    "CONTROL_SERVICE",
    "ERROR_CODES",
    "INFER_SERVICE",
    "INVENTORY_SERVICE",
    "MAX_LINE",
    "WIRE_VERSION",
    "LineDecoder",
    "WireError",
    "encode",
    "error_event",
]

WIRE_VERSION: Final = 1
INVENTORY_SERVICE: Final = "inventory"
INFER_SERVICE: Final = "infer"
CONTROL_SERVICE: Final = "control"
CONTROL_OPERATIONS: Final = ("stop", "start", "unload")
"""What a ``control`` line may ask (its ``type``)."""
MAX_LINE: Final = 4 * 1024 * 1024
"""Longest line either end accepts (a full inventory with hundreds of models
fits many times over; a prompt larger than this is refused)."""
MAX_DEPTH: Final = 64
"""Deepest JSON nesting in a line: a chat request with tool schemas nests a
dozen levels; nothing legitimate comes near this."""

ERROR_CODES: Final = frozenset(
    {
        "bad_request",  # the request line is malformed or names no model
        "unknown_model",  # the node has no such model
        "busy",  # the model's queue is full: send the work elsewhere
        "stopped",  # an operator stopped the model on this node: send the work elsewhere
        "load_failed",  # the model could not be loaded (memory, bad file)
        "runtime_failed",  # the runtime failed before or during generation
        "shutting_down",  # the daemon is stopping
    }
)
"""Values of ``code`` in an ``error`` line of the ``infer`` and ``control`` services."""


class WireError(Exception):
    """The peer sent bytes that are not a line of this protocol (not JSON, not
    an object, too long, or truncated at EOF)."""


def encode(message: dict[str, Any]) -> bytes:
    """One message as a line: compact JSON and ``\\n``."""
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def error_event(code: str, message: str) -> dict[str, Any]:
    """An ``error`` line of the ``infer`` service; ``code`` from :data:`ERROR_CODES`."""
    assert code in ERROR_CODES, code
    return {"type": "error", "code": code, "message": message}


class LineDecoder:
    """Bytes in, JSON objects out; never touches a stream.

    ``feed(data)`` returns the complete objects in ``data`` (and whatever was
    buffered before); ``feed(b"")`` means EOF and raises if a partial line is
    left. A line longer than ``max_line`` raises as soon as the buffer
    exceeds it, so a peer cannot make us hold more than that.
    """

    def __init__(self, *, max_line: int = MAX_LINE) -> None:
        self._buffer = bytearray()
        self._max_line = max_line

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        if not data:
            if self._buffer.strip():
                raise WireError("stream ended inside a line")
            return []
        self._buffer += data
        messages: list[dict[str, Any]] = []
        while (end := self._buffer.find(b"\n")) >= 0:
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            if line.strip():
                messages.append(_parse(line))
        if len(self._buffer) > self._max_line:
            raise WireError(f"line longer than {self._max_line} bytes")
        return messages


def _parse(line: bytes) -> dict[str, Any]:
    try:
        value = peerjson.loads(line, max_bytes=MAX_LINE, max_depth=MAX_DEPTH, what="line")
    except ValueError as exc:
        raise WireError(str(exc)) from None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise WireError("expected a JSON object with a string 'type'")
    return value
