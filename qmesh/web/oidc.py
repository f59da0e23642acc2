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

import urllib.request
from typing import Any, Final

import attrs
import jwt

from qmesh import peerjson
from qmesh.config import OidcConfig
from qmesh.operator_roles import OPERATOR_ROLES

__all__ = ["OidcError", "OidcPrincipal", "OidcVerifier", "looks_like_jwt"]

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
        self._keys: jwt.PyJWKClient | None = None

    def _jwks(self) -> jwt.PyJWKClient:
        if self._keys is None:
            url = self.config.jwks_url or self._discovered_jwks_url()
            self._keys = jwt.PyJWKClient(
                url, cache_keys=True, lifespan=3600, timeout=int(FETCH_TIMEOUT_S)
            )
        return self._keys

    def _discovered_jwks_url(self) -> str:
        url = self.config.issuer.rstrip("/") + "/.well-known/openid-configuration"
        try:
            with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as response:
                document = peerjson.loads(
                    response.read(_MAX_DOCUMENT + 1), max_bytes=_MAX_DOCUMENT, what="discovery"
                )
        except (OSError, peerjson.PeerJsonError) as exc:
            raise OidcError(f"the issuer's discovery document is unavailable: {exc}") from None
        jwks_uri = document.get("jwks_uri") if isinstance(document, dict) else None
        if not isinstance(jwks_uri, str):
            raise OidcError("the issuer's discovery document has no jwks_uri")
        return jwks_uri

    def verify(self, token: str) -> OidcPrincipal:
        """The operator the token names; OidcError saying why not."""
        if len(token) > _MAX_TOKEN:
            raise OidcError("the token is too long")
        try:
            key = self._jwks().get_signing_key_from_jwt(token)
            claims: dict[str, Any] = jwt.decode(
                token, key.key, algorithms=list(ALGORITHMS), audience=self.config.audience,
                issuer=self.config.issuer, leeway=self.config.leeway_s,
                options={"require": ["exp", "iss", "aud"]},
            )  # fmt: skip
        except jwt.PyJWKClientError as exc:
            raise OidcError(f"no signing key for the token: {exc}") from None
        except jwt.InvalidTokenError as exc:
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
