"""Loading the configuration: the file, then the environment, then every section.

For: :func:`load_config`: reading the file as UTF-8 TOML (a syntax error
becomes a :class:`~qmesh.config.errors.ConfigError` with its line), merging
the ``QMESH_*`` overrides into the tree while remembering which variable set
what, so that an error blames the variable, and building :class:`Config`
from the section readers.

Not for: the rules of any one section (the ``*_sections`` modules), or
command line flags (:mod:`qmesh.cli` applies them to the loaded Config).
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path

from qmesh.config.edge_sections import read_daemon, read_log, read_minigate, read_tunnel
from qmesh.config.env import TOP_LEVEL_KEYS, env_overrides, parse_env_value
from qmesh.config.errors import ConfigError
from qmesh.config.gate_sections import read_gate
from qmesh.config.reader import Reader, describe
from qmesh.config.schema import Config
from qmesh.config.toml_lines import KeyPath, key_lines

__all__ = ["load_config"]


def _read_config(r: Reader, root: Mapping[str, object]) -> Config:
    r.check_keys(root, (), TOP_LEVEL_KEYS)
    data_dir = r.home / ".qmesh"
    if "data_dir" in root:
        data_dir = r.path(root, (), "data_dir") or data_dir
    return Config(
        data_dir=data_dir,
        log=read_log(r, root),
        tunnel=read_tunnel(r, root),
        gate=read_gate(r, root),
        minigate=read_minigate(r, root),
        daemon=read_daemon(r, root),
    )


def _toml_error(exc: tomllib.TOMLDecodeError, text: str, origin: str) -> ConfigError:
    message = str(exc)
    # Python 3.11's tomllib has the position only in the message text.
    match = re.search(r"\(at line (\d+), column \d+\)$", message)
    if match:
        line: int | None = int(match.group(1))
    elif message.endswith("(at end of document)"):
        line = text.count("\n") + (0 if text.endswith("\n") else 1)
    else:
        line = None
    return ConfigError(f"invalid TOML: {message}", origin=origin, line=line)


def load_config(path: Path | None, env: Mapping[str, str] | None = None) -> Config:
    """Read ``path`` (None: defaults only), apply ``QMESH_*`` overrides from
    ``env`` (default :data:`os.environ`), validate, and return the Config.

    ``~`` in paths is the ``HOME`` of ``env`` when it has one. Raises
    :class:`ConfigError`.
    """
    if env is None:
        env = os.environ
    home = Path(env["HOME"]) if env.get("HOME") else Path.home()
    data: dict[str, object] = {}
    lines: dict[KeyPath, int] = {}
    origin: str | None = None
    base_dir = Path.cwd()
    if path is not None:
        origin = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError("no such file", origin=origin) from None
        except UnicodeDecodeError:
            raise ConfigError("not UTF-8 text (TOML files must be UTF-8)", origin=origin) from None
        except OSError as exc:
            raise ConfigError(f"cannot read: {exc.strerror or exc}", origin=origin) from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise _toml_error(exc, text, origin) from None
        lines = key_lines(text)
        base_dir = path.absolute().parent

    reader = Reader(origin=origin, base_dir=base_dir, home=home, lines=lines)
    for key_path, var, raw in env_overrides(env):
        parent: dict[str, object] = data
        for i, part in enumerate(key_path[:-1]):
            if str(part) not in parent:
                # A table that only this variable brought in: its errors are the variable's.
                reader.env_vars.setdefault(key_path[: i + 1], var)
            child = parent.setdefault(str(part), {})
            if not isinstance(child, dict):
                # The file's own value is wrong; report that, not the override.
                raise reader.error(key_path[: i + 1], f"expected a table, got {describe(child)}")
            parent = child
        parent[str(key_path[-1])] = parse_env_value(raw)
        reader.env_vars[key_path] = var
        reader.env_raw[key_path] = raw
    return _read_config(reader, data)
