"""Key paths of the configuration: how a message spells one, and its line.

For: :data:`KeyPath`, a position in the config tree; :func:`dotted`, its
spelling in an error message (``gate.providers[0].name``); and
:func:`key_lines`, a small scanner that finds the line on which each key is
written, because :mod:`tomllib` returns plain dicts without positions.

Not for: parsing TOML or reporting its syntax errors (tomllib does both; the
scanner only runs on text tomllib has accepted), or values: it never reads
one, it only steps over them.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Mapping, Sequence
from typing import Final, TypeAlias

import attrs

__all__ = ["KeyPath", "dotted", "key_lines"]

KeyPath: TypeAlias = tuple[str | int, ...]
"""A position in the config tree: table keys, and indexes into arrays of tables."""

_BARE_KEY_RE: Final = re.compile(r"[A-Za-z0-9_-]+")


# tomllib returns plain dicts with no positions, so a second, much smaller
# scanner walks the text: it follows [table] and [[array]] headers and `key =`
# lines (dotted and quoted keys too), and skips the insides of strings and
# multi-line arrays so that text in a value is never taken for a key. It only
# runs on text tomllib has accepted, so it need not report errors; keys inside
# inline tables are not recorded, and a lookup falls back to the nearest
# enclosing key or header it did record, which for an inline table is the
# right line anyway.


@attrs.define
class _ValueState:
    """Where the scan is inside a value that may continue on the next line."""

    string: str | None = None  # the open multi-line string delimiter
    depth: int = 0  # open [ and { brackets

    @property
    def open(self) -> bool:
        return self.string is not None or self.depth > 0


def _scan_value(line: str, pos: int, state: _ValueState) -> None:
    """Advance ``state`` over ``line[pos:]``, which is (part of) a value."""
    n = len(line)
    while pos < n:
        if state.string is not None:
            delim = state.string
            if delim == '"""' and line[pos] == "\\":
                pos += 2
            elif line.startswith(delim, pos):
                pos += 3
                # A closing delimiter may be followed by up to two more quotes
                # that belong to the string's content.
                while pos < n and line[pos] == delim[0]:
                    pos += 1
                state.string = None
            else:
                pos += 1
            continue
        ch = line[pos]
        if ch == "#":
            return
        if ch in "\"'":
            if line.startswith(ch * 3, pos):
                state.string = ch * 3
                pos += 3
            else:
                pos = _skip_string(line, pos)
            continue
        if ch in "[{":
            state.depth += 1
        elif ch in "]}":
            state.depth = max(0, state.depth - 1)
        pos += 1


def _skip_string(line: str, pos: int) -> int:
    """Index after the one-line string that starts at ``line[pos]``."""
    quote = line[pos]
    pos += 1
    while pos < len(line):
        if quote == '"' and line[pos] == "\\":
            pos += 2
            continue
        if line[pos] == quote:
            return pos + 1
        pos += 1
    return pos


def _parse_key(line: str, pos: int) -> tuple[list[str], int] | None:
    """A (possibly dotted, possibly quoted) key at ``line[pos:]``: its parts and the end."""
    parts: list[str] = []
    n = len(line)
    while True:
        while pos < n and line[pos] in " \t":
            pos += 1
        if pos >= n:
            return None
        if line[pos] in "\"'":
            end = _skip_string(line, pos)
            try:
                # tomllib decodes the escapes, so quoted keys compare like tomllib's.
                parts.append(tomllib.loads(f"k = {line[pos:end]}")["k"])
            except tomllib.TOMLDecodeError:
                return None
            pos = end
        else:
            match = _BARE_KEY_RE.match(line, pos)
            if match is None:
                return None
            parts.append(match.group())
            pos = match.end()
        while pos < n and line[pos] in " \t":
            pos += 1
        if pos < n and line[pos] == ".":
            pos += 1
            continue
        return parts, pos


def _resolve(parts: Sequence[str], arrays: Mapping[KeyPath, int]) -> KeyPath:
    """A header's key path, with the current index after each array of tables."""
    out: list[str | int] = []
    for part in parts:
        out.append(part)
        count = arrays.get(tuple(out))
        if count:
            out.append(count - 1)
    return tuple(out)


def key_lines(text: str) -> dict[KeyPath, int]:
    """The line (1-based) where each key path is first written."""
    lines: dict[KeyPath, int] = {}
    arrays: dict[KeyPath, int] = {}
    table: KeyPath = ()
    state = _ValueState()

    def record(path: KeyPath, lineno: int) -> None:
        for i in range(1, len(path) + 1):
            lines.setdefault(path[:i], lineno)

    for lineno, line in enumerate(text.splitlines(), start=1):
        if state.open:
            _scan_value(line, 0, state)
            continue
        stripped = line.lstrip()
        pos = len(line) - len(stripped)
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.startswith("[["):
            parsed = _parse_key(line, pos + 2)
            if parsed is None:
                continue
            prefix = _resolve(parsed[0][:-1], arrays)
            base = (*prefix, parsed[0][-1])
            index = arrays.get(base, 0)
            arrays[base] = index + 1
            table = (*base, index)
            record(table, lineno)
            lines[table] = lineno
        elif stripped.startswith("["):
            parsed = _parse_key(line, pos + 1)
            if parsed is None:
                continue
            table = _resolve(parsed[0], arrays)
            record(table, lineno)
        else:
            parsed = _parse_key(line, pos)
            if parsed is None:
                continue
            keys, end = parsed
            while end < len(line) and line[end] in " \t":
                end += 1
            if end >= len(line) or line[end] != "=":
                continue
            record((*table, *keys), lineno)
            _scan_value(line, end + 1, state)
    return lines


def dotted(path: KeyPath) -> str:
    """``path`` as messages spell it: ``gate.apps."my app".databases[0]``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            shown = part if _BARE_KEY_RE.fullmatch(part) else json.dumps(part)
            out = f"{out}.{shown}" if out else shown
    return out
