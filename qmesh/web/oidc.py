"""Operators signed in with the organisation's identity provider (``[gate.oidc]``).

For: :class:`OidcVerifier`, which checks an ID token sent as a bearer token
— the issuer's signature against its published keys (fetched from its
discovery document or ``jwks_url``, cached, fetched again for a key id not
seen yet, at most once a minute), the issuer, the audience, ``exp`` and
``nbf`` (with ``leeway_s``) — with PyJWT, and reads the operator's name and
role from its claims. A token is judged on its own: nothing is stored, and
it stops working at its ``exp``. Only asymmetric algorithms are accepted (an
``HS256`` token "signed" with a public key, or ``none``, is refused).

Not for: keys of apps and operators made with ``qmesh operators add``
(:mod:`qmesh.web.auth`, which asks this module about JWTs only), or the
browser sign-in redirect (not built: the dashboard takes the token pasted).
"""

from __future__ import annotations

import base64
import math
import threading
import time
import urllib.request
from typing import Any, Final

import attrs
import jwt

from qmesh import peerjson
from qmesh.config import OidcConfig
from qmesh.operator_roles import OPERATOR_ROLES

__all__ = ["OidcError", "OidcPrincipal", "OidcVerifier", "looks_like_jwt"]

REFETCH_S: Final = 60.0
ALGORITHMS: Final = ("RS256", "RS384", "RS512", "ES256", "ES384", "PS256")
FETCH_TIMEOUT_S: Final = 10.0
_MAX_DOCUMENT: Final = 256 * 1024
_MAX_TOKEN: Final = 16 * 1024


class OidcError(Exception):
    """The token is not one this Gate accepts; the message says why."""


@attrs.frozen
class OidcPrincipal:
    name: str
    role: str
    expires_at: float


def looks_like_jwt(token: str) -> bool:
    return token.count(".") == 2 and token.startswith("eyJ") and ":" not in token


class OidcVerifier:
    """Checks ID tokens of one issuer. Blocking (it may fetch keys): call it
    from a worker thread."""

    def __init__(self, config: OidcConfig) -> None:
        self.config = config
        self._jwks_url = config.jwks_url
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = -math.inf
        self._lock = threading.Lock()

    def _get(self, url: str, what: str) -> Any:
        """A document of the issuer's, as peer JSON (size and depth bounded)."""
        try:
            with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as response:
                return peerjson.loads(
                    response.read(_MAX_DOCUMENT + 1), max_bytes=_MAX_DOCUMENT, what=what
                )
        except (OSError, peerjson.PeerJsonError) as exc:
            raise OidcError(f"the issuer's {what} is unavailable: {exc}") from None

    def _key(self, kid: str) -> jwt.PyJWK:
        """The issuer's key ``kid``; its key set is fetched again for a key
        id not seen, at most every :data:`REFETCH_S` (a stranger's made-up
        ids must not make every request wait on the issuer)."""
        with self._lock:
            if kid not in self._keys and time.monotonic() - self._fetched_at >= REFETCH_S:
                self._fetched_at = time.monotonic()
                if not self._jwks_url:
                    document = self._get(
                        self.config.issuer.rstrip("/") + "/.well-known/openid-configuration",
                        "discovery document",
                    )
                    jwks_uri = document.get("jwks_uri") if isinstance(document, dict) else None
                    if not isinstance(jwks_uri, str):
                        raise OidcError("the issuer's discovery document has no jwks_uri")
                    self._jwks_url = jwks_uri
                try:
                    keys = jwt.PyJWKSet.from_dict(self._get(self._jwks_url, "key set")).keys
                except jwt.PyJWKSetError as exc:
                    raise OidcError(f"the issuer's key set is unusable: {exc}") from None
                self._keys = {k.key_id: k for k in keys if k.key_id}
            key = self._keys.get(kid)
        if key is None:
            raise OidcError(f"no signing key for the token: the issuer publishes no key {kid!r}")
        return key

    def verify(self, token: str) -> OidcPrincipal:
        """The operator the token names; OidcError saying why not."""
        if len(token) > _MAX_TOKEN:
            raise OidcError("the token is too long")
        try:
            # The header is a stranger's JSON: PyJWT parses it unbounded.
            header = peerjson.loads(
                base64.urlsafe_b64decode(token.split(".")[0] + "=="), max_bytes=_MAX_TOKEN,
                max_depth=4, what="token header",
            )  # fmt: skip
        except (ValueError, peerjson.PeerJsonError) as exc:
            raise OidcError(f"the token is not valid: {exc}") from None
        kid = header.get("kid") if isinstance(header, dict) else None
        if not isinstance(kid, str):
            raise OidcError("the token is not valid: its header names no key (kid)")
        key = self._key(kid)
        try:
            claims: dict[str, Any] = jwt.decode(
                token, key.key, algorithms=list(ALGORITHMS), audience=self.config.audience,
                issuer=self.config.issuer, leeway=self.config.leeway_s,
                options={"require": ["exp", "iss", "aud"]},
            )  # fmt: skip
        except (jwt.InvalidTokenError, RecursionError) as exc:
            raise OidcError(f"the token is not valid: {exc}") from None
        name = claims.get(self.config.name_claim) or claims.get("sub")
        if not isinstance(name, str) or not name:
            raise OidcError(f"the token names nobody ({self.config.name_claim} and sub are empty)")
        role = claims.get(self.config.role_claim)
        if role not in OPERATOR_ROLES:
            raise OidcError(
                f"the token gives {name!r} no qmesh role (claim {self.config.role_claim!r}: "
                f"one of {', '.join(OPERATOR_ROLES)})"
            )
        exp = claims["exp"]
        return OidcPrincipal(name=name, role=str(role), expires_at=float(exp))
