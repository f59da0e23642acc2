"""The one exception of :mod:`qmesh.config`, and how its message reads.

For: :class:`ConfigError`, raised by every part of the loader for anything
the operator got wrong, with the file and line (or the environment
variable), the dotted key and the problem, so that the message alone says
what to fix.

Not for: failures that a valid configuration runs into later (a port
already in use, an unreachable Gate): the roles report those themselves.
"""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(Exception):
    """The operator's configuration is wrong.

    Raised for a missing or unreadable file, a TOML syntax error, an unknown
    key, a value of the wrong type or out of range, or a bad environment
    override. ``str(err)`` is the whole message, e.g.
    ``config.toml:12: gate.tunnel_listen: expected "host:port", got "11439"``.
    The parts are kept as attributes for callers that want them: ``origin``
    (the file as given, or ``environment variable NAME``), ``line`` (when
    known), ``key`` (the dotted key) and ``problem``.
    """

    def __init__(
        self,
        problem: str,
        *,
        key: str | None = None,
        origin: str | None = None,
        line: int | None = None,
    ) -> None:
        self.problem = problem
        self.key = key
        self.origin = origin
        self.line = line
        parts: list[str] = []
        if origin is not None:
            parts.append(origin if line is None else f"{origin}:{line}")
        if key is not None:
            parts.append(key)
        parts.append(problem)
        super().__init__(": ".join(parts))
