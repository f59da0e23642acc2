"""Reading typed values out of the merged tree, with errors that say where.

For: :class:`Reader`, which every section reader uses to take a string, a
number, an address or a path out of a table and to raise
:class:`~qmesh.config.errors.ConfigError` naming the file and line (or the
environment variable that set it) and the dotted key; and what the section
readers share: arrays of tables, arrays of names, required keys, and the
name patterns more than one section checks.

Not for: the rules of any one section (the ``*_sections`` modules), or
where the tree comes from (:mod:`qmesh.config.loader`).
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

import attrs

from qmesh.config.address import parse_hostport
from qmesh.config.errors import ConfigError
from qmesh.config.toml_lines import KeyPath, dotted

__all__ = [
    "APP_ID_RE",
    "GATE_NAME_RE",
    "Reader",
    "describe",
    "field_names",
    "require_key",
    "string_array",
    "table_at",
    "table_paths",
    "unique_name",
]

GATE_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""A Gate's or a provider's name."""
# An app id, as qmesh.state.check_name accepts it (not imported: this package
# depends on nothing else in qmesh). Edge identity names and budgets use it too.
APP_ID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def describe(value: object) -> str:
    """A short rendering of a bad value for an error message."""
    if isinstance(value, str):
        shown = json.dumps(value)
        return shown if len(shown) <= 60 else shown[:56] + '..."'
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"float {value}"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"


@attrs.define
class Reader:
    """Reads typed values out of the merged tree, raising ConfigError with locations."""

    origin: str | None
    base_dir: Path
    home: Path
    lines: dict[KeyPath, int]
    env_vars: dict[KeyPath, str] = attrs.field(factory=dict)
    env_raw: dict[KeyPath, str] = attrs.field(factory=dict)

    def from_env(self, path: KeyPath) -> str | None:
        for i in range(len(path), 0, -1):
            var = self.env_vars.get(path[:i])
            if var is not None:
                return var
        return None

    def error(self, path: KeyPath, problem: str) -> ConfigError:
        key = dotted(path) if path else None
        var = self.from_env(path)
        if var is not None:
            return ConfigError(problem, key=key, origin=f"environment variable {var}")
        line = None
        for i in range(len(path), 0, -1):
            line = self.lines.get(path[:i])
            if line is not None:
                break
        return ConfigError(problem, key=key, origin=self.origin, line=line)

    def table(self, parent: Mapping[str, object], path: KeyPath) -> Mapping[str, object]:
        value = parent.get(str(path[-1]), {}) if path else parent
        if not isinstance(value, dict):
            raise self.error(path, f"expected a table, got {describe(value)}")
        return value

    def check_keys(
        self, table: Mapping[str, object], path: KeyPath, allowed: Sequence[str]
    ) -> None:
        for key in table:
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise self.error((*path, key), f"unknown key{hint}")

    def string(
        self,
        table: Mapping[str, object],
        path: KeyPath,
        key: str,
        default: str,
        *,
        choices: Sequence[str] = (),
    ) -> str:
        if key not in table:
            return default
        where = (*path, key)
        value = table[key]
        if not isinstance(value, str) and where in self.env_raw:
            value = self.env_raw[where]
        if not isinstance(value, str):
            raise self.error(where, f"expected a string, got {describe(value)}")
        if choices and value not in choices:
            listed = ", ".join(json.dumps(c) for c in choices)
            raise self.error(where, f"expected one of {listed}, got {describe(value)}")
        return value

    def address(self, table: Mapping[str, object], path: KeyPath, key: str, default: str) -> str:
        if key not in table:
            return default
        value = self.string(table, path, key, default)
        self.check_address(value, (*path, key))
        return value

    def addresses(self, table: Mapping[str, object], path: KeyPath, key: str) -> tuple[str, ...]:
        """A list of "host:port": an array of strings, or one string with the
        addresses separated by commas (as an environment variable gives it).
        Absent: ``()``."""
        if key not in table:
            return ()
        where = (*path, key)
        value = table[key]
        if isinstance(value, str):
            items: list[object] = [part.strip() for part in value.split(",")]
        elif isinstance(value, list):
            items = list(value)
        else:
            raise self.error(
                where, f'expected "host:port" or an array of them, got {describe(value)}'
            )
        if not items:
            raise self.error(where, 'expected at least one "host:port"')
        addresses: list[str] = []
        for i, item in enumerate(items):
            at = where if isinstance(value, str) else (*where, i)
            if not isinstance(item, str):
                raise self.error(at, f"expected a string, got {describe(item)}")
            self.check_address(item, at)
            if item not in addresses:
                addresses.append(item)
        return tuple(addresses)

    def check_address(self, value: str, where: KeyPath) -> None:
        try:
            parse_hostport(value)
        except ValueError as exc:
            detail = "" if ":" not in value else f" ({exc})"
            raise self.error(
                where, f'expected "host:port", got {describe(value)}{detail}'
            ) from None

    def integer(
        self,
        table: Mapping[str, object],
        path: KeyPath,
        key: str,
        default: int,
        *,
        lo: int,
        hi: int | None = None,
    ) -> int:
        if key not in table:
            return default
        value = table[key]
        where = (*path, key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(where, f"expected an integer, got {describe(value)}")
        if value < lo or (hi is not None and value > hi):
            wanted = f"from {lo} to {hi}" if hi is not None else f"of at least {lo}"
            raise self.error(where, f"expected an integer {wanted}, got {value}")
        return value

    def number(
        self,
        table: Mapping[str, object],
        path: KeyPath,
        key: str,
        default: float,
        *,
        positive: bool,
        unit: str = "seconds",
    ) -> float:
        if key not in table:
            return default
        value = table[key]
        where = (*path, key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(where, f"expected a number of {unit}, got {describe(value)}")
        if not math.isfinite(value):
            raise self.error(where, f"expected a finite number, got {value}")
        if positive and value <= 0:
            raise self.error(where, f"expected a number greater than 0, got {value}")
        if value < 0:
            raise self.error(where, f"expected a number of at least 0, got {value}")
        return float(value)

    def boolean(self, table: Mapping[str, object], path: KeyPath, key: str, default: bool) -> bool:
        if key not in table:
            return default
        value = table[key]
        if not isinstance(value, bool):
            raise self.error((*path, key), f"expected true or false, got {describe(value)}")
        return value

    def path(self, table: Mapping[str, object], path: KeyPath, key: str) -> Path | None:
        if key not in table:
            return None
        where = (*path, key)
        text = self.string(table, path, key, "")
        if not text:
            raise self.error(where, "expected a path, got an empty string")
        return self.resolve_path(text, where)

    def resolve_path(self, text: str, where: KeyPath) -> Path:
        """``~`` expanded; a relative path is taken from the config file's
        directory when written there, from the working directory when it came
        from the environment, so the meaning does not depend on where qmesh
        was started from."""
        if text == "~" or text.startswith("~/"):
            result = self.home / text[2:]
        else:
            result = Path(os.path.expanduser(text))
        if not result.is_absolute():
            base = Path.cwd() if self.from_env(where) is not None else self.base_dir
            result = base / result
        return result


def field_names(cls: type[attrs.AttrsInstance]) -> list[str]:
    """The keys a table read into ``cls`` may hold: its attribute names."""
    return [f.name for f in attrs.fields(cls)]


def table_paths(r: Reader, t: Mapping[str, object], path: KeyPath, key: str) -> list[KeyPath]:
    """Paths of the ``[[…key]]`` array of tables in ``t`` (checked to be one)."""
    if key not in t:
        return []
    where: KeyPath = (*path, key)
    value = t[key]
    if not isinstance(value, list):
        raise r.error(where, f"expected [[{dotted(where)}]] tables, got {describe(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise r.error((*where, i), f"expected a table, got {describe(item)}")
    return [(*where, i) for i in range(len(value))]


def table_at(t: Mapping[str, object], where: KeyPath) -> Mapping[str, object]:
    """The table at ``where``, one of the paths :func:`table_paths` returned for ``t``."""
    value = t[str(where[-2])]
    assert isinstance(value, list)
    item = value[int(where[-1])]
    assert isinstance(item, dict)
    return item


def string_array(
    t: Mapping[str, object],
    path: KeyPath,
    key: str,
    default: tuple[str, ...],
    pattern: re.Pattern[str],
    what: str,
    *,
    r: Reader,
) -> tuple[str, ...]:
    """The array of strings at ``key`` (``default`` when absent), each matching
    ``pattern``; ``what`` names one of them in messages."""
    if key not in t:
        return default
    where: KeyPath = (*path, key)
    value = t[key]
    if not isinstance(value, list):
        raise r.error(where, f"expected an array of {what}s, got {describe(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, str) or not pattern.fullmatch(item):
            raise r.error((*where, i), f"expected a {what}, got {describe(item)}")
    return tuple(str(v) for v in value)


def require_key(r: Reader, t: Mapping[str, object], path: KeyPath, key: str, hint: str) -> None:
    """Raise at ``path`` unless ``t`` has ``key``; ``hint`` says what to write there."""
    if key not in t:
        raise r.error(path, f"missing key {key!r} ({hint})")


def unique_name(
    r: Reader,
    t: Mapping[str, object],
    where: KeyPath,
    names: set[str],
    pattern: re.Pattern[str],
    rule: str,
    what: str,
) -> str:
    """Read ``name`` from ``t``: it must match ``pattern`` and not be in ``names``
    (which it then joins). ``rule`` says what the pattern wants, ``what`` the noun."""
    name = r.string(t, where, "name", "")
    if not pattern.fullmatch(name) or name in names:
        problem = "is used twice" if name in names else rule
        raise r.error((*where, "name"), f"{what} name {describe(name)} {problem}")
    names.add(name)
    return name
