"""Who is calling the Gate's HTTP API: ``Authorization: Bearer APP_ID:APP_KEY``.

App keys are stored only as SCRAM-SHA-256 verifiers (PBKDF2, thousands of
rounds), which is right for storage and too slow to redo per request. A
successful check is therefore remembered for ``CACHE_TTL_S``, keyed by a
SHA-256 of the token: a deleted or rotated key stops working within that
time. Failed checks are not cached (they cost the caller the full PBKDF2).

The application named ``admin`` is the operator (dashboard, tunnel status).
"""

from __future__ import annotations

import hashlib
import time

import trio

from qmesh.state import StateStore
from qmesh.web.http import HttpError, Request

ADMIN_APP = "admin"
CACHE_TTL_S = 60.0


class AppAuthenticator:
    def __init__(self, store: StateStore) -> None:
        self.store = store
        self._verified: dict[bytes, tuple[str, float]] = {}

    async def app_for(self, token: str | None) -> str | None:
        """The app id that ``token`` proves, or None."""
        if not token:
            return None
        app_id, sep, key = token.partition(":")
        if not sep or not app_id or not key:
            return None
        digest = hashlib.sha256(token.encode()).digest()
        now = time.monotonic()
        cached = self._verified.get(digest)
        if cached is not None and cached[1] > now:
            return cached[0]
        if not await trio.to_thread.run_sync(self.store.verify_app_key, app_id, key):
            return None
        self._verified[digest] = (app_id, now + CACHE_TTL_S)
        return app_id

    async def require(self, request: Request, *, admin: bool = False) -> str:
        """The calling app's id; 401 without a valid key, 403 if ``admin`` is
        required and the caller is another app."""
        app_id = await self.app_for(request.bearer_token())
        if app_id is None:
            raise HttpError(
                401,
                "missing or invalid app key: send 'Authorization: Bearer APP_ID:APP_KEY'",
                kind="authentication_error",
                code="invalid_api_key",
            )
        if admin and app_id != ADMIN_APP:
            raise HttpError(403, "this endpoint needs the admin key", kind="permission_error")
        return app_id
