"""Who is calling the Gate's HTTP API: ``Authorization: Bearer APP_ID:APP_KEY``.

App keys are stored only as SCRAM-SHA-256 verifiers (PBKDF2, thousands of
rounds), which is right for storage and too slow to redo per request. A
successful check is therefore remembered, keyed by a SHA-256 of the token,
together with *which* stored verifier it matched. Trust changes bite at
once all the same:

- the Gate's :class:`~qmesh.state.watch.StateWatcher` calls :meth:`refresh`
  after every change to the state store (``qmesh apps rotate-key``,
  ``disable``, ``enable``, an app deleted, from any process); it re-reads
  each cached app's current verifiers and drops every entry whose verifier
  is gone or expired or whose app is disabled — a comparison of stored keys,
  no PBKDF2;
- an entry never outlives its verifier's ``expires_at`` (the end of a
  rotation overlap), with or without a change, nor ``CACHE_TTL_S``.

Failed checks are not cached; they cost PBKDF2, so they are rate-limited
per source address (a token bucket: ``gate.http.auth_failures_per_s``,
``auth_failure_burst``; beyond it 429 without hashing), and PBKDF2 runs in
threads of its own (``gate.http.hash_threads``, a ``trio.CapacityLimiter``
apart from trio's default one) so a flood of bogus keys never starves tunnel
handshakes or vault reads. Requests in progress per app are bounded too
(``gate.http.max_requests_per_app``; beyond it 429).

What a principal may do is its role's rights (:mod:`qmesh.operator_roles`),
checked by :meth:`AppAuthenticator.require`; the role is cached with the key
and re-read by every refresh, so ``qmesh operators set-role`` bites at once.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import Any, Final

import attrs
import trio

from qmesh.config import HttpConfig
from qmesh.operator_roles import ADMIN_APP, Right, describe_role, rights_of
from qmesh.state import SCRAM_ITERATIONS, AppKeys, StateStore, scram_keys
from qmesh.web.http import HttpError, Request
from qmesh.web.oidc import OidcError, OidcVerifier, looks_like_jwt

__all__ = ["ADMIN_APP", "CACHE_TTL_S", "AppAuthenticator", "TokenBuckets"]

log = logging.getLogger(__name__)

CACHE_TTL_S: Final = 60.0
"""The longest a successful check is remembered (a change shortens it: see above)."""
MAX_CACHED: Final = 10_000
"""Remembered tokens; beyond it the oldest go (each is only a saved PBKDF2)."""
MAX_SOURCES: Final = 65_536
"""Source addresses whose failures are tracked; beyond it the least recently seen go."""
THROTTLE_LOG_EVERY_S: Final = 10.0
# Unknown app ids still cost a PBKDF2, against this salt, so that the time a
# refusal takes does not tell which app ids exist.
_DUMMY_SALT: Final = hashlib.sha256(b"qmesh: no such app").digest()[:16]


class TokenBuckets:
    """One token bucket per source: ``rate`` tokens a second, at most
    ``burst`` saved. Bounded: past ``max_sources`` the least recently seen
    sources are forgotten (a forgotten source starts again with a full
    bucket, which costs at most ``burst`` extra attempts)."""

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        max_sources: int = MAX_SOURCES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate
        self.burst = burst
        self.max_sources = max_sources
        self._clock = clock
        self._buckets: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()

    def take(self, source: str) -> bool:
        """Spend a token of ``source``; False (nothing spent) when it has none."""
        now = self._clock()
        tokens = self._level(source, now)
        if tokens < 1:
            return False
        self._set(source, tokens - 1, now)
        return True

    def give_back(self, source: str) -> None:
        """Return a token spent on an attempt that succeeded."""
        now = self._clock()
        self._set(source, min(self.burst, self._level(source, now) + 1), now)

    def retry_after(self, source: str) -> float:
        """Seconds until ``source`` has a token again."""
        return max(0.0, (1 - self._level(source, self._clock())) / self.rate)

    def _level(self, source: str, now: float) -> float:
        saved = self._buckets.get(source)
        if saved is None:
            return float(self.burst)
        tokens, then = saved
        return min(float(self.burst), tokens + (now - then) * self.rate)

    def _set(self, source: str, tokens: float, now: float) -> None:
        self._buckets[source] = (tokens, now)
        self._buckets.move_to_end(source)
        while len(self._buckets) > self.max_sources:
            self._buckets.popitem(last=False)


@attrs.define
class _Verified:
    """A token that proved an app key: which verifier it matched, and until when."""

    app_id: str
    stored_key: bytes
    until: float  # monotonic: CACHE_TTL_S after the check
    expires_at: float | None  # wall clock: the verifier's end of overlap (None: current key)
    role: str | None  # an operator's role; a change is picked up by refresh()

    def fresh(self, monotonic_now: float, wall_now: float) -> bool:
        return self.until > monotonic_now and (
            self.expires_at is None or self.expires_at > wall_now
        )


class AppAuthenticator:
    """Checks bearer tokens for the HTTP API's handlers (:meth:`require`).

    ``wall_clock`` is what rotation overlaps are measured against (the
    state store's ``expires_at`` are wall-clock times); tests move it.
    """

    def __init__(
        self,
        store: StateStore,
        limits: HttpConfig | None = None,
        *,
        wall_clock: Callable[[], float] = time.time,
        oidc: OidcVerifier | None = None,
    ) -> None:
        self.store = store
        self.oidc = oidc
        """Checks operators' ID tokens (``[gate.oidc]``); None: not accepted."""
        self.limits = limits if limits is not None else HttpConfig()
        self._wall_clock = wall_clock
        self._verified: collections.OrderedDict[bytes, _Verified] = collections.OrderedDict()
        # Bumped by every refresh: a check that read the verifiers before a
        # refresh ran reads them again before it caches anything, so it
        # cannot bring back what the refresh dropped.
        self._generation = 0
        self._failures = TokenBuckets(
            self.limits.auth_failures_per_s, self.limits.auth_failure_burst
        )
        self.hash_limiter = trio.CapacityLimiter(self.limits.hash_threads)
        """PBKDF2 runs under this, never under trio's default thread limiter."""
        self._in_progress: dict[str, int] = {}
        # Checks under way, by token digest: a second request with the same
        # token waits for the first check instead of hashing again.
        self._checking: dict[bytes, trio.Event] = {}
        self._throttle_logged = -math.inf
        self.hashes = 0
        """PBKDF2 runs so far (for tests and metrics)."""
        self.draining = False
        self._on_idle: Callable[[], None] | None = None
        """A draining Gate answers new requests 503 (those in progress finish)."""
        self.control_audit: Callable[[str, str, dict[str, Any]], None] | None = None
        """Where :meth:`record` sends an operator's action (the Gate's
        ledger, which chains it into the control audit)."""
        self.on_keys_dropped: list[Callable[[], None]] = []
        """Told when a refresh found cached keys no longer valid (whatever
        else trusted them must look again)."""

    def share_limits(self, gates: int) -> None:
        """This Gate is one of ``gates`` live Gates: the failure limits are
        for the whole cluster, so each Gate allows its share (an address
        that spreads its guesses over every Gate gets no more than one Gate
        would give it)."""
        gates = max(1, gates)
        self._failures.rate = self.limits.auth_failures_per_s / gates
        self._failures.burst = max(1, self.limits.auth_failure_burst // gates)

    # -- checking a token ----------------------------------------------------------

    async def app_for(self, token: str | None, *, source: str = "") -> str | None:
        """The app id that ``token`` proves, or None. Raises HttpError 429
        when ``source`` failed too often, 403 for a disabled app's key."""
        principal = await self._principal_for(token, source)
        return None if principal is None else principal.app_id

    async def _principal_for(self, token: str | None, source: str) -> _Verified | None:
        if token and self.oidc is not None and looks_like_jwt(token):
            return await self._oidc_principal(token, source)
        if not token:
            return None
        app_id, sep, key = token.partition(":")
        if not sep or not app_id or not key:
            return None
        digest = hashlib.sha256(token.encode()).digest()
        while True:
            cached = self._verified.get(digest)
            if cached is not None:
                if cached.fresh(time.monotonic(), self._wall_clock()):
                    return cached
                del self._verified[digest]
            # An app that opens many connections at once (a pool starting, a
            # Gate restarting) sends one key many times before its first check
            # ends: one PBKDF2 serves them all, and they do not each reserve a
            # failure token, which would refuse a valid key with 429.
            under_way = self._checking.get(digest)
            if under_way is None:
                break
            await under_way.wait()
        done = self._checking[digest] = trio.Event()
        try:
            return await self._check(digest, app_id, key, source)
        finally:
            del self._checking[digest]
            done.set()

    async def _check(self, digest: bytes, app_id: str, key: str, source: str) -> _Verified | None:
        """One PBKDF2 check of ``key``, its result cached on success."""
        if not self._failures.take(source):
            wait = max(1, math.ceil(self._failures.retry_after(source)))
            self._log_throttled(source)
            raise HttpError(
                429,
                "too many failed app-key checks from this address; retry later "
                "(gate.http.auth_failures_per_s)",
                kind="rate_limit_error",
                code="auth_rate_limited",
                headers=(("retry-after", str(wait)),),
            )
        generation = self._generation
        keys = await self._read(app_id)
        matched = await self._match(keys, key)
        while matched is not None and generation != self._generation:
            # The state changed while the key was hashed, and the refresh
            # could not see this check: judge the match (no PBKDF2) against
            # the state after the change, so it is right to cache it.
            generation = self._generation
            keys = await self._read(app_id)
            verifier = (
                None
                if keys is None
                else keys.verifier_for(matched.stored_key, now=self._wall_clock())
            )
            matched = None if verifier is None else _Match(verifier.stored_key, verifier.expires_at)
        if matched is None:
            return None
        assert keys is not None
        if keys.disabled:
            raise HttpError(
                403,
                f"app {app_id!r} is disabled (qmesh apps enable {app_id})",
                kind="permission_error",
                code="app_disabled",
            )
        self._failures.give_back(source)
        return self._remember(digest, app_id, matched.stored_key, matched.expires_at, keys.role)

    async def _oidc_principal(self, token: str, source: str) -> _Verified:
        """An operator signed in with the identity provider, or 401 saying
        why not (a refused token costs a failure token, as a bad key does)."""
        assert self.oidc is not None
        digest = hashlib.sha256(token.encode()).digest()
        cached = self._verified.get(digest)
        if cached is not None and cached.fresh(time.monotonic(), self._wall_clock()):
            return cached
        if not self._failures.take(source):
            wait = max(1, math.ceil(self._failures.retry_after(source)))
            raise HttpError(
                429, "too many failed sign-ins from this address; retry later",
                kind="rate_limit_error", code="auth_rate_limited",
                headers=(("retry-after", str(wait)),),
            )  # fmt: skip
        try:
            principal = await trio.to_thread.run_sync(
                self.oidc.verify, token, limiter=self.hash_limiter
            )
        except OidcError as exc:
            raise HttpError(
                401, f"ID token refused: {exc}", kind="authentication_error",
                code="invalid_id_token",
            ) from None  # fmt: skip
        self._failures.give_back(source)
        return self._remember(
            digest, f"oidc:{principal.name}", b"", principal.expires_at, principal.role
        )

    def _log_throttled(self, source: str) -> None:
        # A flood is refused many times a second: say so now and then, not each time.
        now = time.monotonic()
        if now - self._throttle_logged >= THROTTLE_LOG_EVERY_S:
            self._throttle_logged = now
            log.warning(
                "app key checks from %s are refused for too many failures "
                "(gate.http.auth_failures_per_s); logged at most every %g s",
                source,
                THROTTLE_LOG_EVERY_S,
            )

    async def _read(self, app_id: str) -> AppKeys | None:
        now = self._wall_clock()
        return await trio.to_thread.run_sync(lambda: self.store.get_app_keys(app_id, now=now))

    async def _match(self, keys: AppKeys | None, key: str) -> _Match | None:
        """The verifier ``key`` matches, by one PBKDF2 in the hashing threads."""
        if keys is None:
            salt, iterations = _DUMMY_SALT, SCRAM_ITERATIONS
        else:
            salt, iterations = keys.verifiers[0].salt, keys.verifiers[0].iterations
        self.hashes += 1
        stored_key, _ = await trio.to_thread.run_sync(
            scram_keys, key, salt, iterations, limiter=self.hash_limiter
        )
        if keys is None:
            return None
        verifier = keys.verifier_for(stored_key, now=self._wall_clock())
        return None if verifier is None else _Match(verifier.stored_key, verifier.expires_at)

    def _remember(
        self,
        digest: bytes,
        app_id: str,
        stored_key: bytes,
        expires_at: float | None,
        role: str | None,
    ) -> _Verified:
        entry = self._verified[digest] = _Verified(
            app_id, stored_key, time.monotonic() + CACHE_TTL_S, expires_at, role
        )
        self._verified.move_to_end(digest)
        while len(self._verified) > MAX_CACHED:
            self._verified.popitem(last=False)
        return entry

    # -- after a change --------------------------------------------------------------

    async def refresh(self) -> None:
        """Forget every remembered token whose key is no longer valid: its
        verifier was replaced (a rotation without overlap) or has expired,
        or its app is disabled or gone. For the StateWatcher: one read per
        cached app, no PBKDF2."""
        self._generation += 1
        # Signed-in operators hold no key in the store: their tokens end at exp.
        apps = {e.app_id for e in self._verified.values() if not e.app_id.startswith("oidc:")}
        if not apps:
            return
        now = self._wall_clock()
        current = await trio.to_thread.run_sync(self._read_keys, apps, now)
        dropped = 0
        for digest, entry in list(self._verified.items()):
            if entry.app_id.startswith("oidc:"):
                continue
            keys = current.get(entry.app_id)
            verifier = None
            if keys is not None and not keys.disabled:
                verifier = keys.verifier_for(entry.stored_key, now=now)
            if verifier is None:
                # Absent while refresh awaited? Then it was dropped already.
                self._verified.pop(digest, None)
                dropped += 1
            else:
                # A current key becomes an old one with an expiry on rotation.
                assert keys is not None
                entry.expires_at = verifier.expires_at
                entry.role = keys.role
        if dropped:
            log.info("forgot %d cached app key(s) no longer valid", dropped)
            for forget in self.on_keys_dropped:
                forget()

    def _read_keys(self, apps: Iterable[str], now: float) -> dict[str, AppKeys | None]:
        return {app_id: self.store.get_app_keys(app_id, now=now) for app_id in apps}

    # -- for handlers -----------------------------------------------------------------

    async def require(self, request: Request, *any_of: Right) -> str:
        """The calling principal's app id; 401 without a valid key, 403 if its
        role holds none of ``any_of`` (default: ``use``; :mod:`qmesh.operator_roles`)
        or it is disabled,
        429 when the source failed too often or the principal has too many
        requests in progress."""
        if self.draining:
            raise HttpError(
                503, "this gate is draining: send the request to another gate of the cluster",
                kind="server_error", code="gate_draining",
                headers=(("retry-after", "1"), ("connection", "close")),
            )  # fmt: skip
        principal = await self._principal_for(request.bearer_token(), request.source)
        if principal is None:
            raise HttpError(
                401,
                "missing or invalid app key: send 'Authorization: Bearer APP_ID:APP_KEY'",
                kind="authentication_error",
                code="invalid_api_key",
            )
        needed = any_of or (Right.USE,)
        if rights_of(principal.role).isdisjoint(needed):
            wanted = " or ".join(repr(right.value) for right in needed)
            raise HttpError(
                403,
                f"{principal.app_id!r} ({describe_role(principal.role)}) lacks the "
                f"{wanted} right this needs",
                kind="permission_error",
                code="forbidden",
            )
        self._count_request(request, principal.app_id)
        return principal.app_id

    async def holds(self, request: Request, right: Right) -> bool:
        r"""Whether the caller (already :meth:`require`\ d) holds ``right`` too."""
        principal = await self._principal_for(request.bearer_token(), request.source)
        return principal is not None and right in rights_of(principal.role)

    async def record(self, request: Request, action: str, detail: dict[str, Any]) -> None:
        """Put an operator's action through this API in the control audit:
        who (the key's name), from where, what."""
        if self.control_audit is None:
            return
        principal = await self._principal_for(request.bearer_token(), request.source)
        actor = principal.app_id if principal is not None else "unknown"
        self.control_audit(actor, action, {**detail, "from": request.source})

    @property
    def requests_in_progress(self) -> int:
        """Every app's requests in progress (answers being streamed included)."""
        return sum(self._in_progress.values())

    def when_idle(self, callback: Callable[[], None] | None) -> None:
        """Call ``callback`` (now, or as the last request in progress ends,
        in that same step: no new request can slip in between); None forgets it."""
        if callback is not None and not self._in_progress:
            callback()
            return
        self._on_idle = callback

    def in_progress(self, app_id: str) -> int:
        """Requests of ``app_id`` in progress (answers being streamed included)."""
        return self._in_progress.get(app_id, 0)

    def _count_request(self, request: Request, app_id: str) -> None:
        if not request.scope.claim((self, app_id)):
            return  # a second require() in the same request
        limit = self.limits.max_requests_per_app
        if self._in_progress.get(app_id, 0) >= limit:
            raise HttpError(
                429,
                f"app {app_id!r} already has {limit} requests in progress "
                "(gate.http.max_requests_per_app); retry when one has finished",
                kind="rate_limit_error",
                code="too_many_requests",
                headers=(("retry-after", "1"),),
            )
        self._in_progress[app_id] = self._in_progress.get(app_id, 0) + 1
        request.scope.on_close(lambda: self._request_done(app_id))

    def _request_done(self, app_id: str) -> None:
        left = self._in_progress.get(app_id, 0) - 1
        if left > 0:
            self._in_progress[app_id] = left
        else:
            self._in_progress.pop(app_id, None)
            if not self._in_progress and self._on_idle is not None:
                callback, self._on_idle = self._on_idle, None
                callback()


@attrs.frozen
class _Match:
    stored_key: bytes
    expires_at: float | None
