"""Requests and tokens per minute, per app, at this Gate.

For: :class:`AppRateLimits`, which the LLM API asks before routing
(:class:`~qmesh.config.LlmPolicyConfig`'s ``requests_per_minute`` and
``tokens_per_minute``). Each limit is a token bucket that holds a minute's
worth and refills continuously, so a steady app is never refused and a
burst is spread over the minute. Tokens are counted at admission as
OpenAI counts them: the prompt's estimate plus the request's ``max_tokens``.
A refusal says how long until the request would fit, which the API sends as
``Retry-After`` (what OpenAI's clients wait for before retrying).

The limits hold per Gate: with several Gates an app may get each Gate's
allowance (the edges spread an app's requests over the Gates they use).

Not for: budgets in money (:mod:`qmesh.finops.budgets`) or requests in
progress (:mod:`qmesh.web.auth`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import attrs

__all__ = ["AppRateLimits", "Limited", "TooLarge"]


@attrs.define
class _Bucket:
    capacity: float
    level: float
    at: float

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.at) * self.capacity / 60.0)
        self.at = now

    def wait_for(self, amount: float) -> float:
        """Seconds until ``amount`` fits (0: now)."""
        return max(0.0, (amount - self.level) * 60.0 / self.capacity)


class TooLarge(Exception):
    """A request bigger than a whole minute's allowance: no wait makes it fit."""


@attrs.frozen
class Limited:
    """A request that does not fit now."""

    retry_after_s: float
    reason: str
    headers: tuple[tuple[str, str], ...]


class AppRateLimits:
    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[tuple[str, str], _Bucket] = {}

    def _bucket(self, app: str, kind: str, capacity: int, now: float) -> _Bucket:
        bucket = self._buckets.get((app, kind))
        if bucket is None or bucket.capacity != capacity:  # new, or its limit changed
            bucket = self._buckets[(app, kind)] = _Bucket(capacity, float(capacity), now)
        bucket.refill(now)
        return bucket

    def take(
        self,
        app: str,
        tokens: int,
        *,
        requests_per_minute: int | None,
        tokens_per_minute: int | None,
    ) -> Limited | None:
        """Count one request of ``tokens`` for ``app``; a :class:`Limited`
        (nothing counted) when either limit has no room for it now."""
        now = self._clock()
        requests = (
            None
            if requests_per_minute is None
            else self._bucket(app, "requests", requests_per_minute, now)
        )
        tokens_bucket = (
            None
            if tokens_per_minute is None
            else self._bucket(app, "tokens", tokens_per_minute, now)
        )
        if tokens_bucket is not None and tokens > tokens_bucket.capacity:
            raise TooLarge(
                f"a request of ~{tokens} tokens (its prompt and max_tokens) can never fit "
                f"{tokens_per_minute} tokens per minute: ask for fewer max_tokens"
            )
        waits: list[tuple[float, str]] = []
        if requests is not None:
            waits.append((requests.wait_for(1), f"{requests_per_minute} requests per minute"))
        if tokens_bucket is not None:
            waits.append((tokens_bucket.wait_for(tokens), f"{tokens_per_minute} tokens per minute"))
        wait, which = max(waits, default=(0.0, ""))
        if wait > 0:
            headers = [("retry-after", str(max(1, math.ceil(wait)))),
                       ("retry-after-ms", str(max(1, math.ceil(wait * 1000))))]  # fmt: skip
            for name, limit, bucket in (
                ("requests", requests_per_minute, requests),
                ("tokens", tokens_per_minute, tokens_bucket),
            ):
                if bucket is not None:
                    headers.append((f"x-ratelimit-limit-{name}", str(limit)))
                    headers.append((f"x-ratelimit-remaining-{name}", str(int(bucket.level))))
            return Limited(wait, which, tuple(headers))
        if requests is not None:
            requests.level -= 1
        if tokens_bucket is not None:
            tokens_bucket.level -= tokens
        return None

    def forget(self, keep: Callable[[str], bool]) -> None:
        """Drop the buckets of apps ``keep`` says no longer have limits."""
        for key in [k for k in self._buckets if not keep(k[0])]:
            del self._buckets[key]
