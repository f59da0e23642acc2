"""The ``qg://`` capability DSN: ``qg://task=summarize;prefer=speed``.

For: turning the text an application puts in a ``model`` field into a
validated, immutable :class:`Dsn`, and back (:meth:`Dsn.format`). Every
error is a :class:`~qmesh.qg.errors.DsnError` that names the problem and,
for a likely typo, the intended spelling. The grammar is written down in
``docs/qg.md``; keep the two in step.

Not for: deciding who serves the request (:mod:`qmesh.qg.router`) or
knowing which models exist (a ``model=`` value is only checked for shape
here; the router says when nothing matches it).
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable
from typing import Final
from urllib.parse import quote, unquote

import attrs

from qmesh.qg.errors import DsnError

__all__ = [
    "BUILTIN_TASKS",
    "KEYS",
    "PREFERENCES",
    "PRIVACY",
    "SCHEME",
    "Dsn",
    "is_dsn",
    "parse_dsn",
]

SCHEME: Final = "qg://"
MAX_DSN_LEN: Final = 2048
"""Longer text is refused before it is split: a DSN is a few dozen bytes."""

BUILTIN_TASKS: Final = (
    "summarize",
    "keywords",
    "classify",
    "extract",
    "embed",
    "redact",
    "chat",
    "creative_writing",
    "code",
    "translate",
    "memory_query",
)
PREFERENCES: Final = ("speed", "cost", "quality", "local", "balanced")
PRIVACY: Final = ("local", "private", "any")
KEYS: Final = (
    "task",
    "prefer",
    "model",
    "max_cost",
    "max_latency_ms",
    "privacy",
    "budget",
    "context",
)
DEFAULT_TASK: Final = "chat"

_KEY_RE: Final = re.compile(r"[a-z][a-z0-9_]*")
_SCHEME_TYPO_RE: Final = re.compile(r"^qg:/*", re.IGNORECASE)
_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}")
_BUDGET_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_TASK_RE: Final = re.compile(r"[a-z][a-z0-9_]{0,63}")
_MAX_CONTEXT: Final = 100_000_000
_MAX_LATENCY_MS: Final = 86_400_000


@attrs.frozen
class Dsn:
    """A parsed capability request. Fields a DSN did not set keep their defaults."""

    task: str = DEFAULT_TASK
    prefer: str = "balanced"
    model: str | None = None
    """A family (``gemma3``) or an exact model id; matched by the router."""
    max_cost: float | None = None
    """USD per request, ≥ 0."""
    max_latency_ms: int | None = None
    privacy: str = "any"
    budget: str | None = None
    context: int | None = None
    """Tokens the request needs to fit in the model's context window."""

    def format(self) -> str:
        """The canonical text: keys in :data:`KEYS` order, defaults left out
        except ``task``. ``parse_dsn(d.format()) == d``."""
        parts = [f"task={self.task}"]
        if self.prefer != "balanced":
            parts.append(f"prefer={self.prefer}")
        if self.model is not None:
            parts.append(f"model={quote(self.model, safe='._:/@+-')}")
        if self.max_cost is not None:
            parts.append(f"max_cost={self.max_cost!r}")
        if self.max_latency_ms is not None:
            parts.append(f"max_latency_ms={self.max_latency_ms}")
        if self.privacy != "any":
            parts.append(f"privacy={self.privacy}")
        if self.budget is not None:
            parts.append(f"budget={self.budget}")
        if self.context is not None:
            parts.append(f"context={self.context}")
        return SCHEME + ";".join(parts)


def is_dsn(text: str) -> bool:
    """Whether ``text`` is meant as a DSN (so a concrete model id is not).

    Anything starting with ``qg:`` counts, so that ``qg:/task=x`` reaches the
    parser and gets told what is wrong instead of "no such model".
    """
    return text[:3].lower() == "qg:"


def _suggest(word: str, choices: Iterable[str]) -> str | None:
    close = difflib.get_close_matches(word.lower(), list(choices), n=1, cutoff=0.6)
    return close[0] if close else None


def _choice(key: str, value: str, choices: tuple[str, ...]) -> str:
    if value in choices:
        return value
    listed = ", ".join(choices)
    raise DsnError(
        f"{key}={value!r} is not one of: {listed}", key=key, suggestion=_suggest(value, choices)
    )


def _number(key: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise DsnError(f"{key} must be a number of USD, got {value!r}", key=key) from None
    if not math.isfinite(number):
        raise DsnError(f"{key} must be a finite number of USD, got {value!r}", key=key)
    if number < 0:
        raise DsnError(f"{key} must not be negative, got {value!r}", key=key)
    return number


def _integer(key: str, value: str, *, lo: int, hi: int, unit: str) -> int:
    if not value.isascii() or not value.isdigit():
        raise DsnError(f"{key} must be a whole number of {unit}, got {value!r}", key=key)
    number = int(value)
    if not lo <= number <= hi:
        raise DsnError(f"{key} must be from {lo} to {hi} {unit}, got {number}", key=key)
    return number


def parse_dsn(text: str, *, tasks: Iterable[str] = BUILTIN_TASKS) -> Dsn:
    """Parse ``text`` (``qg://key=value;…``); ``tasks`` are the task names
    this Gate knows (the built-in ones plus those its config adds).

    Values may be percent-encoded (``%3B`` for ``;``). A trailing ``;`` and
    spaces around keys and values are allowed. Raises DsnError.
    """
    known_tasks = tuple(tasks)
    if not isinstance(text, str):
        raise DsnError("a DSN must be a string")
    if len(text) > MAX_DSN_LEN:
        raise DsnError(f"longer than {MAX_DSN_LEN} characters")
    stripped = text.strip()
    if stripped[:5].lower() != SCHEME:
        head = stripped.split("=", 1)[0].split(";", 1)[0]
        raise DsnError(
            f"expected it to start with 'qg://', got {head[:20]!r}",
            suggestion=SCHEME + _SCHEME_TYPO_RE.sub("", stripped) if is_dsn(stripped) else None,
        )
    body = stripped[5:]
    fields: dict[str, str] = {}
    for raw in body.split(";"):
        if not raw.strip():
            continue
        key, sep, value = raw.partition("=")
        key = key.strip()
        value = value.strip()
        if not sep:
            suggestion = _suggest(key, KEYS)
            raise DsnError(
                f"{raw.strip()!r} is not a key=value pair", key=key or None, suggestion=suggestion
            )
        if not _KEY_RE.fullmatch(key):
            raise DsnError(
                f"{key!r} is not a valid key (lower-case letters, digits and '_')",
                key=key or None,
                suggestion=_suggest(key, KEYS),
            )
        if key not in KEYS:
            raise DsnError(f"unknown key {key!r}", key=key, suggestion=_suggest(key, KEYS))
        if key in fields:
            raise DsnError(f"duplicate key {key!r}", key=key)
        if not value:
            raise DsnError(f"{key} has an empty value", key=key)
        fields[key] = unquote(value) if "%" in value else value
    if not fields:
        raise DsnError("empty DSN: expected qg://key=value;…, e.g. qg://task=summarize")

    task = fields.get("task", DEFAULT_TASK)
    if task not in known_tasks:
        if not _TASK_RE.fullmatch(task):
            raise DsnError(f"task={task!r} is not a task name", key="task")
        raise DsnError(
            f"unknown task {task!r}; known tasks: {', '.join(known_tasks)}",
            key="task",
            suggestion=_suggest(task, known_tasks),
        )
    model = fields.get("model")
    if model is not None and not _NAME_RE.fullmatch(model):
        raise DsnError(f"model={model!r} is not a model family or id", key="model")
    budget = fields.get("budget")
    if budget is not None and not _BUDGET_RE.fullmatch(budget):
        raise DsnError(f"budget={budget!r} is not a budget name", key="budget")
    max_cost = fields.get("max_cost")
    latency = fields.get("max_latency_ms")
    context = fields.get("context")
    return Dsn(
        task=task,
        prefer=_choice("prefer", fields.get("prefer", "balanced"), PREFERENCES),
        model=model,
        max_cost=None if max_cost is None else _number("max_cost", max_cost),
        max_latency_ms=None
        if latency is None
        else _integer("max_latency_ms", latency, lo=1, hi=_MAX_LATENCY_MS, unit="milliseconds"),
        privacy=_choice("privacy", fields.get("privacy", "any"), PRIVACY),
        budget=budget,
        context=None
        if context is None
        else _integer("context", context, lo=1, hi=_MAX_CONTEXT, unit="tokens"),
    )
