"""The qg layer's exceptions, split by who is at fault.

- :class:`DsnError`: the caller wrote a bad ``qg://`` DSN (HTTP 400).
- :class:`NoRoute`: the DSN is valid but nothing may serve it under its
  constraints right now (HTTP 503, or 402 when a budget is the reason).
- :class:`UpstreamError` and its subclasses: the chosen candidate failed
  (a node or provider is busy, unreachable or broke off a stream); the
  failover loop catches them and tries the next candidate.
"""

from __future__ import annotations

__all__ = [
    "BudgetBlocked",
    "DsnError",
    "NoRoute",
    "QgError",
    "StreamBroken",
    "UpstreamBusy",
    "UpstreamError",
    "UpstreamFailed",
]


class QgError(Exception):
    """Base of every qg error."""


class DsnError(QgError, ValueError):
    """A ``qg://`` DSN is malformed: unknown key, bad value, duplicate key,
    empty DSN. ``key`` names the offending key when there is one and
    ``suggestion`` a likely intended spelling; ``str()`` says all of it."""

    def __init__(self, problem: str, *, key: str | None = None, suggestion: str | None = None):
        self.problem = problem
        self.key = key
        self.suggestion = suggestion
        hint = f" (did you mean {suggestion!r}?)" if suggestion else ""
        super().__init__(f"invalid qg:// DSN: {problem}{hint}")


class NoRoute(QgError):
    """No candidate survives the filters. ``reasons`` maps each rejected
    candidate to why, so the caller can explain the refusal."""

    def __init__(
        self, message: str, reasons: dict[str, str] | None = None, *, budget: bool = False
    ):
        super().__init__(message)
        self.reasons = reasons or {}
        self.budget = budget


class BudgetBlocked(NoRoute):
    """A hard budget is spent and no local candidate can take the request."""

    def __init__(self, message: str, reasons: dict[str, str] | None = None):
        super().__init__(message, reasons, budget=True)


class PolicyBlocked(NoRoute):
    """The app's policy refuses every candidate that could take the request."""


class UpstreamError(QgError):
    """A candidate could not serve the request. ``retryable`` is True when
    nothing reached the client yet, so another candidate may take over."""

    retryable = True


class UpstreamBusy(UpstreamError):
    """The node or provider refused for load (queue full, memory short, 429/503)."""


class UpstreamFailed(UpstreamError):
    """The node or provider failed before the first byte of the answer
    (connection refused, reset, timeout, 5xx)."""


class StreamBroken(UpstreamError):
    """The upstream failed after part of a streamed answer was sent to the
    client; the stream ends with an error event and is not retried."""

    retryable = False
