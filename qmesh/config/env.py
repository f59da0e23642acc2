"""Environment overrides: which ``QMESH_*`` variables are configuration.

For: finding the variables that set a key (``QMESH_<SECTION>__<KEY>``, or a
top-level key such as ``QMESH_DATA_DIR``), the key path each one names, and
its value, read as TOML when it parses as one and as text otherwise. The
grammar is described in :mod:`qmesh.config`.

Not for: merging the values into the file's tree or blaming a variable for
a bad value (:func:`qmesh.config.loader.load_config` and the
:class:`~qmesh.config.reader.Reader` do both), nor ``QMESH_`` variables that
are not configuration: test suites and scripts use the prefix for their own
settings, and those are left alone.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from typing import Final

from qmesh.config.errors import ConfigError
from qmesh.config.toml_lines import KeyPath

__all__ = ["ENV_PREFIX", "TOP_LEVEL_KEYS", "env_overrides", "parse_env_value"]

ENV_PREFIX: Final = "QMESH_"
TOP_LEVEL_KEYS: Final = ("data_dir", "log", "tunnel", "gate", "minigate", "daemon")
"""The keys at the top of the file (the fields of :class:`qmesh.config.Config`).
A ``QMESH_`` variable without a double underscore is configuration only when
it names one of them."""


def parse_env_value(raw: str) -> object:
    """A variable's value as the tree holds it: TOML when it parses as one
    value, else the text itself."""
    try:
        parsed = tomllib.loads(f"v = {raw}")
    except tomllib.TOMLDecodeError:
        return raw
    # A value with a newline could smuggle in more keys; then it is just text.
    return parsed["v"] if parsed.keys() == {"v"} else raw


def env_overrides(env: Mapping[str, str]) -> list[tuple[KeyPath, str, str]]:
    """``(path, variable, raw value)`` for each ``QMESH_*`` variable that is config."""
    found: list[tuple[KeyPath, str, str]] = []
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX) :]
        if "__" in rest:
            parts = tuple(part.lower() for part in rest.split("__"))
            if not all(parts):
                raise ConfigError(
                    "malformed name: levels are separated by exactly two underscores",
                    origin=f"environment variable {name}",
                )
        elif rest.lower() in TOP_LEVEL_KEYS:
            parts = (rest.lower(),)
        else:
            continue
        found.append((parts, name, env[name]))
    return found
