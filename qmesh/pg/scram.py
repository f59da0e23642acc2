"""SCRAM-SHA-256 (RFC 5802, RFC 7677) as PostgreSQL speaks it, sans-IO.

For: the Gate's two ends of the ghost wire. :class:`ScramServer` checks an
application's proof against the verifiers the state store keeps (the Gate
never holds an app key, only StoredKey/ServerKey); :class:`ScramClient` logs
the Gate in to the real server with the vault's password and checks the
server's signature, so a server that does not know the password cannot pass
for the real one. :func:`md5_password` answers the legacy MD5 challenge.

Channel binding (``-PLUS``) is on the client side only: towards the real
server over TLS the Gate binds the channel (see :class:`ScramClient`); the
app's TLS ends at the MiniGate, so app logins have no channel to bind to.

Not for: sockets or message framing (``qmesh.pg.service`` moves the bytes).

Like PostgreSQL, the server ignores the user name inside the SCRAM messages
(the startup packet's ``user`` is the identity), and passwords are used as
UTF-8 without SASLprep (app keys are ASCII; a vault password with characters
SASLprep would change must be set as its normalised form).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Final

from qmesh.state import AppVerifier

__all__ = [
    "MECHANISM",
    "MECHANISM_PLUS",
    "ScramClient",
    "ScramError",
    "ScramServer",
    "md5_password",
    "tls_server_end_point",
]

MECHANISM: Final = "SCRAM-SHA-256"
MECHANISM_PLUS: Final = "SCRAM-SHA-256-PLUS"
_BINDING_TYPE: Final = "tls-server-end-point"
_NONCE_BYTES: Final = 18
_MAX_MESSAGE: Final = 2048
# A server asking for more rounds than this is refused: each round costs the
# Gate CPU, and PostgreSQL's default is 4096.
MAX_CLIENT_ITERATIONS: Final = 1_000_000
# How many (password, salt, iterations) the client keeps the keys of.
SALTED_KEYS_KEPT: Final = 256


class ScramError(Exception):
    """The exchange failed: a malformed message, a nonce mismatch, a wrong
    proof (server side) or a wrong server signature (client side). The text
    never contains a key, a proof or a password."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        raise ScramError(f"{what} is not valid base64") from None


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


def _attributes(message: str, what: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for part in message.split(","):
        if len(part) < 2 or part[1] != "=" or not part[0].isalpha():
            raise ScramError(f"malformed {what}")
        out.append((part[0], part[2:]))
    return out


def _printable_nonce(nonce: str) -> bool:
    return bool(nonce) and all(0x21 <= ord(c) <= 0x7E and c != "," for c in nonce)


class ScramServer:
    """One SCRAM-SHA-256 exchange on the server side.

    ``verifiers``: the app's current verifier and any still inside a
    rotation overlap (all with the same salt and iterations, see
    :meth:`qmesh.state.StateStore.get_app_verifiers`). Empty for an unknown
    app: the exchange then runs to the end against a salt derived from the
    app id and ``mock_secret`` and fails at the proof, so a client cannot
    tell unknown apps from wrong keys (PostgreSQL's "mock authentication").
    """

    def __init__(
        self,
        verifiers: Sequence[AppVerifier],
        app_id: str,
        mock_secret: bytes,
        *,
        nonce_suffix: str | None = None,
    ) -> None:
        """``nonce_suffix`` replaces the random server nonce; only for test vectors."""
        self._verifiers = list(verifiers)
        self._nonce_suffix = nonce_suffix
        if self._verifiers:
            first = self._verifiers[0]
            self._salt, self._iterations = first.salt, first.iterations
        else:
            self._salt = _hmac(mock_secret, b"qmesh mock salt\0" + app_id.encode())[:16]
            self._iterations = 4096
        self._client_first_bare = ""
        self._server_first = ""
        self._gs2_header = ""
        self._nonce = ""
        self.verified: AppVerifier | None = None

    def server_first(self, client_first: bytes) -> bytes:
        """Answer the client-first-message (the data of SASLInitialResponse)."""
        if len(client_first) > _MAX_MESSAGE:
            raise ScramError("client-first-message too long")
        try:
            text = client_first.decode("utf-8")
        except UnicodeDecodeError:
            raise ScramError("client-first-message is not UTF-8") from None
        # gs2-header: cbind-flag "," [authzid] ","
        flag, sep, rest = text.partition(",")
        authzid, sep2, bare = rest.partition(",")
        if not sep or not sep2:
            raise ScramError("malformed client-first-message")
        if flag.startswith("p="):
            raise ScramError("channel binding is not supported here (use SCRAM-SHA-256)")
        if flag not in ("n", "y"):
            raise ScramError("malformed channel-binding flag")
        if authzid:
            raise ScramError("an authorization identity is not supported")
        attrs = _attributes(bare, "client-first-message")
        if len(attrs) < 2 or attrs[0][0] != "n" or attrs[1][0] != "r":
            raise ScramError("malformed client-first-message")
        client_nonce = attrs[1][1]
        if not _printable_nonce(client_nonce):
            raise ScramError("malformed client nonce")
        self._gs2_header = f"{flag},{authzid},"
        self._client_first_bare = bare
        suffix = self._nonce_suffix or _b64(secrets.token_bytes(_NONCE_BYTES))
        self._nonce = client_nonce + suffix
        self._server_first = f"r={self._nonce},s={_b64(self._salt)},i={self._iterations}"
        return self._server_first.encode("ascii")

    def server_final(self, client_final: bytes) -> bytes:
        """Check the client-final-message; return the server-final-message.
        Raises ScramError for a wrong proof."""
        if not self._server_first:
            raise ScramError("client-final-message before client-first-message")
        if len(client_final) > _MAX_MESSAGE:
            raise ScramError("client-final-message too long")
        try:
            text = client_final.decode("ascii")
        except UnicodeDecodeError:
            raise ScramError("client-final-message is not ASCII") from None
        without_proof, sep, proof_attr = text.rpartition(",")
        if not sep or not proof_attr.startswith("p="):
            raise ScramError("malformed client-final-message")
        attrs = _attributes(without_proof, "client-final-message")
        if len(attrs) < 2 or attrs[0][0] != "c" or attrs[1][0] != "r":
            raise ScramError("malformed client-final-message")
        if _unb64(attrs[0][1], "channel binding") != self._gs2_header.encode("utf-8"):
            raise ScramError("channel binding data does not match")
        if not hmac.compare_digest(attrs[1][1].encode(), self._nonce.encode()):
            raise ScramError("nonce mismatch")
        proof = _unb64(proof_attr[2:], "proof")
        if len(proof) != hashlib.sha256().digest_size:
            raise ScramError("malformed proof")
        auth_message = ",".join(
            (self._client_first_bare, self._server_first, without_proof)
        ).encode("utf-8")
        for verifier in self._verifiers:
            signature = _hmac(verifier.stored_key, auth_message)
            client_key = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
            if hmac.compare_digest(hashlib.sha256(client_key).digest(), verifier.stored_key):
                self.verified = verifier
                server_signature = _hmac(verifier.server_key, auth_message)
                return f"v={_b64(server_signature)}".encode("ascii")
        raise ScramError("wrong proof")


# (SHA-256 of the password, salt, iterations): (ClientKey, ServerKey), the
# least recently used first. Keyed by a digest, so it holds no password.
_SALTED_KEYS: OrderedDict[tuple[bytes, bytes, int], tuple[bytes, bytes]] = OrderedDict()
_SALTED_KEYS_LOCK: Final = threading.Lock()


def _client_keys(password: str, salt: bytes, iterations: int) -> tuple[bytes, bytes]:
    """``(ClientKey, ServerKey)`` for a password, a salt and an iteration
    count, from PBKDF2 once and then from memory: PostgreSQL keeps a role's
    salt until its password changes, so each of the Gate's logins to a
    server would otherwise spend the same rounds again (4096 by default:
    about 2 ms of the event loop's thread), which PgBouncer also avoids.
    At most SALTED_KEYS_KEPT sets are kept."""
    password_bytes = password.encode("utf-8")
    key = (hashlib.sha256(password_bytes).digest(), salt, iterations)
    with _SALTED_KEYS_LOCK:
        keys = _SALTED_KEYS.get(key)
        if keys is not None:
            _SALTED_KEYS.move_to_end(key)
            return keys
    salted = hashlib.pbkdf2_hmac("sha256", password_bytes, salt, iterations)
    keys = _hmac(salted, b"Client Key"), _hmac(salted, b"Server Key")
    with _SALTED_KEYS_LOCK:
        _SALTED_KEYS[key] = keys
        while len(_SALTED_KEYS) > SALTED_KEYS_KEPT:
            _SALTED_KEYS.popitem(last=False)
    return keys


class ScramClient:
    """One SCRAM-SHA-256 exchange on the client side (the Gate logging in).

    Channel binding (RFC 5802 section 6, as libpq does it): with
    ``channel_binding`` (the ``tls-server-end-point`` data of the TLS
    connection, see :func:`tls_server_end_point`) the exchange is
    SCRAM-SHA-256-PLUS, and the proof covers the server's certificate, so a
    man in the middle who terminates TLS cannot relay it. Without it,
    ``binding_supported`` says "y" (over TLS, when the server offered no
    PLUS: a server that did would see the downgrade) instead of "n".
    """

    def __init__(
        self,
        password: str,
        *,
        user: str = "",
        nonce: str | None = None,
        channel_binding: bytes | None = None,
        binding_supported: bool = False,
    ) -> None:
        """PostgreSQL ignores the SCRAM ``user`` (libpq sends it empty);
        ``nonce`` replaces the random client nonce, only for test vectors."""
        if "," in user or "=" in user:
            raise ValueError("a SCRAM user name with ',' or '=' needs escaping; not supported")
        self._password = password
        self._nonce = nonce or _b64(secrets.token_bytes(_NONCE_BYTES))
        self._client_first_bare = f"n={user},r={self._nonce}"
        self._server_signature = b""
        if channel_binding is not None:
            self._gs2_header = f"p={_BINDING_TYPE},,"
        else:
            self._gs2_header = "y,," if binding_supported else "n,,"
        self._binding_data = channel_binding or b""
        self.mechanism = MECHANISM_PLUS if channel_binding is not None else MECHANISM
        """What to name in the SASLInitialResponse."""

    def __repr__(self) -> str:
        return f"<ScramClient {self.mechanism}>"

    @property
    def bound(self) -> bool:
        """Whether this exchange binds the TLS channel (SCRAM-SHA-256-PLUS)."""
        return self.mechanism == MECHANISM_PLUS

    def client_first(self) -> bytes:
        return f"{self._gs2_header}{self._client_first_bare}".encode("ascii")

    def client_final(self, server_first: bytes) -> bytes:
        try:
            text = server_first.decode("ascii")
        except UnicodeDecodeError:
            raise ScramError("server-first-message is not ASCII") from None
        attrs = dict(_attributes(text, "server-first-message"))
        nonce, salt_b64, iterations_text = attrs.get("r"), attrs.get("s"), attrs.get("i")
        if nonce is None or salt_b64 is None or iterations_text is None:
            raise ScramError("malformed server-first-message")
        if not nonce.startswith(self._nonce) or len(nonce) == len(self._nonce):
            raise ScramError("the server's nonce does not extend ours")
        salt = _unb64(salt_b64, "salt")
        if not iterations_text.isdigit() or not 1 <= int(iterations_text) <= MAX_CLIENT_ITERATIONS:
            raise ScramError("unacceptable iteration count")
        client_key, server_key = _client_keys(self._password, salt, int(iterations_text))
        stored_key = hashlib.sha256(client_key).digest()
        binding = _b64(self._gs2_header.encode("ascii") + self._binding_data)
        without_proof = f"c={binding},r={nonce}"
        auth_message = f"{self._client_first_bare},{text},{without_proof}".encode("ascii")
        signature = _hmac(stored_key, auth_message)
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        self._server_signature = _hmac(server_key, auth_message)
        return f"{without_proof},p={_b64(proof)}".encode("ascii")

    def verify_server_final(self, server_final: bytes) -> None:
        """Raise ScramError unless the server proved it knows the password."""
        if not self._server_signature:
            raise ScramError("server-final-message before server-first-message")
        try:
            text = server_final.decode("ascii")
        except UnicodeDecodeError:
            raise ScramError("server-final-message is not ASCII") from None
        attrs = dict(_attributes(text, "server-final-message"))
        if "e" in attrs:
            raise ScramError("the server reported a SCRAM error")
        signature = _unb64(attrs.get("v", ""), "server signature")
        if not hmac.compare_digest(signature, self._server_signature):
            raise ScramError("the server's signature is wrong (not the real server?)")


def md5_password(user: str, password: str, salt: bytes) -> bytes:
    """The answer to AuthenticationMD5Password: ``"md5" + md5(md5(password +
    user) + salt)`` in hex."""
    inner = hashlib.md5((password + user).encode("utf-8"), usedforsecurity=False).hexdigest()
    outer = hashlib.md5(inner.encode("ascii") + salt, usedforsecurity=False).hexdigest()
    return b"md5" + outer.encode("ascii")


def tls_server_end_point(certificate_der: bytes) -> bytes:
    """RFC 5929's ``tls-server-end-point`` channel binding data: the hash of
    the server's certificate, with the certificate's own signature hash, or
    SHA-256 when that is MD5 or SHA-1 (or unknown, as for Ed25519).
    Raises ValueError for bytes that are not a DER certificate."""
    # Imported here: only Gates that log in over TLS need it.
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    certificate = x509.load_der_x509_certificate(certificate_der)
    algorithm = certificate.signature_hash_algorithm
    if algorithm is None or isinstance(algorithm, hashes.MD5 | hashes.SHA1):
        algorithm = hashes.SHA256()
    digest = hashes.Hash(algorithm)
    digest.update(certificate_der)
    return digest.finalize()
