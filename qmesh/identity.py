"""The Gate's key pair and the credentials it issues to edges.

For: the Gate's X25519 key (``gate.key`` in the data directory: 32 raw
bytes, mode 0600, never world-readable even for an instant), edge
credentials (``qmesh-cred-v1.`` + base64url of a small JSON object holding
the edge's name, role and private key, and the Gate's public key and
address), enrolling an edge (a fresh key pair whose public half goes into the
state store), and reading a credential file.

Not for: the handshake that proves these keys on the wire (that is
:mod:`qmesh.tunnel` and the Rust Noise code) or deciding whether an identity
may connect (the Gate looks it up in :mod:`qmesh.state`, revocation included).

Private keys never appear in a ``repr``, an exception message or a log line.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import os
import re
import secrets
import stat
import struct
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

import attrs
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from qmesh.config import parse_hostport
from qmesh.logs import register_secret
from qmesh.roles import EDGE_ROLES
from qmesh.state import InvalidValue, StateStore, check_name

__all__ = [
    "CREDENTIAL_PREFIX",
    "GATE_KEY_ENV",
    "GATE_KEY_FILE",
    "JOIN_PREFIX",
    "Credential",
    "CredentialError",
    "GateKeyError",
    "GateKeyMissing",
    "GateKeys",
    "IdentityError",
    "JoinToken",
    "credential_or_join",
    "dial_addresses",
    "enroll",
    "load_credential",
    "parse_join_proof",
    "write_private_file",
]

CREDENTIAL_PREFIX: Final = "qmesh-cred-v1."
JOIN_PREFIX: Final = "qmesh-join-v1."
GATE_KEY_FILE: Final = "gate.key"
GATE_PREVIOUS_KEY_FILE: Final = "gate.key.previous"
"""The key a rotation replaced and the end of its overlap (``qmesh keys rotate``)."""
_UNTIL: Final = struct.Struct(">d")
GATE_KEY_ENV: Final = "QMESH_GATE_KEY"
"""The Gate key in the environment, as ``base64 -w0 gate.key`` prints it."""
KEY_LEN: Final = 32

log = logging.getLogger(__name__)


class IdentityError(Exception):
    """A key or credential the operator supplied is missing, unreadable or
    malformed. Messages never contain key material or the credential text."""


class CredentialError(IdentityError):
    """A credential (text or file) cannot be used: not a qmesh credential,
    corrupted, an unsupported version, or the file is missing."""


class GateKeyError(IdentityError):
    """The Gate's key file is unreadable or malformed, or already exists
    when creating one without ``force``."""


class GateKeyMissing(GateKeyError):
    """There is no ``gate.key`` in the data directory yet."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    """base64url with or without padding; binascii.Error if malformed."""
    if not re.fullmatch(r"[A-Za-z0-9_-]*={0,2}", text):
        raise binascii.Error("not base64url")
    text = text.rstrip("=")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def public_key_of(private_key: bytes) -> bytes:
    """The X25519 public key for a 32-byte private key."""
    return X25519PrivateKey.from_private_bytes(private_key).public_key().public_bytes_raw()


def _warn_if_shared(path: Path, what: str) -> None:
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return
    if mode & 0o077:
        log.warning(
            "%s %s can be read by other users (mode %04o); run: chmod 600 %s",
            what,
            path,
            mode,
            path,
        )


def write_private_file(path: Path, data: bytes, *, replace: bool = False) -> None:
    """Write ``data`` to a new file that is mode 0600 from the moment it exists.

    Without ``replace`` the file must not exist yet (FileExistsError). With
    ``replace`` the data goes to a temporary file beside it first and is
    renamed over ``path``, so readers see the old or the new file, whole.
    """
    target = path
    if replace:
        target = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    # O_EXCL: never open someone else's file (or a planted symlink) and never
    # widen the mode of an existing one; the mode is set by open() itself.
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(target, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(target)
        raise


@attrs.frozen(repr=False)
class GateKeys:
    """The Gate's static X25519 key pair. ``repr`` shows only the public key."""

    private_key: bytes
    public_key: bytes

    def __repr__(self) -> str:
        return f"GateKeys(public_key={_b64(self.public_key)!r})"

    @classmethod
    def from_private(cls, private_key: bytes) -> GateKeys:
        return cls(private_key=private_key, public_key=public_key_of(private_key))

    @staticmethod
    def path_in(data_dir: Path) -> Path:
        return data_dir / GATE_KEY_FILE

    @classmethod
    def load(cls, data_dir: Path, *, env: Mapping[str, str] | None = None) -> GateKeys:
        """``QMESH_GATE_KEY`` (base64 of the 32 bytes: the Gates of a cluster
        may get their shared key from a secret manager, as the master key),
        else ``data_dir/gate.key``. Raises GateKeyMissing or GateKeyError;
        logs a warning if other users can read the file."""
        value = (os.environ if env is None else env).get(GATE_KEY_ENV)
        if value:
            register_secret(value.strip())
            try:
                raw = base64.b64decode(value.strip(), validate=True)
            except (binascii.Error, ValueError):
                raw = b""
            if len(raw) != KEY_LEN:
                raise GateKeyError(f"{GATE_KEY_ENV} is not the base64 of {KEY_LEN} bytes")
            return cls.from_private(raw)
        path = cls.path_in(data_dir)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise GateKeyMissing(
                f"no gate key at {path}; create one with `qmesh keys init`"
            ) from None
        except OSError as exc:
            raise GateKeyError(f"cannot read gate key {path}: {exc.strerror or exc}") from None
        if len(raw) != KEY_LEN:
            raise GateKeyError(f"{path} is not a gate key (expected {KEY_LEN} raw bytes)")
        _warn_if_shared(path, "gate key")
        return cls.from_private(raw)

    @classmethod
    def create(cls, data_dir: Path, force: bool = False) -> GateKeys:
        """Generate a key pair and write ``data_dir/gate.key`` (the directory
        is created mode 0700 if missing). Without ``force`` an existing key is
        an error: replacing it invalidates every credential issued with it."""
        path = cls.path_in(data_dir)
        try:
            data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise GateKeyError(f"cannot create data directory {data_dir}: {exc}") from None
        keys = cls.from_private(X25519PrivateKey.generate().private_bytes_raw())
        try:
            write_private_file(path, keys.private_key, replace=force)
        except FileExistsError:
            raise GateKeyError(
                f"{path} already exists; pass --force to replace it "
                "(every credential issued with the old key stops working)"
            ) from None
        except OSError as exc:
            raise GateKeyError(f"cannot write gate key {path}: {exc}") from None
        return keys

    @staticmethod
    def previous_path_in(data_dir: Path) -> Path:
        return data_dir / GATE_PREVIOUS_KEY_FILE

    @classmethod
    def previous(cls, data_dir: Path, *, now: float | None = None) -> tuple[GateKeys, float] | None:
        """The key a rotation replaced and the end of its overlap, while it
        lasts (edges that still hold its public key are let in and told the
        new one); None after it, or when there was no rotation."""
        path = cls.previous_path_in(data_dir)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise GateKeyError(f"cannot read {path}: {exc.strerror or exc}") from None
        if len(raw) != KEY_LEN + _UNTIL.size:
            raise GateKeyError(f"{path} is not a previous gate key")
        (until,) = _UNTIL.unpack(raw[KEY_LEN:])
        if until <= (time.time() if now is None else now):
            return None
        return cls.from_private(raw[:KEY_LEN]), float(until)

    @classmethod
    def rotate(cls, data_dir: Path, overlap_s: float) -> tuple[GateKeys, GateKeys]:
        """A new key in ``gate.key``; the old one kept as the previous key for
        ``overlap_s``: ``(old, new)``. The previous key is written first, so
        no moment has the old key nowhere."""
        old = cls.load(data_dir, env={})
        until = time.time() + overlap_s
        write_private_file(
            cls.previous_path_in(data_dir), old.private_key + _UNTIL.pack(until), replace=True
        )
        new = cls.from_private(X25519PrivateKey.generate().private_bytes_raw())
        write_private_file(cls.path_in(data_dir), new.private_key, replace=True)
        return old, new

    @classmethod
    def load_or_create(cls, data_dir: Path) -> tuple[GateKeys, bool]:
        """The existing key pair, or a new one: ``(keys, created)``."""
        try:
            return cls.load(data_dir), False
        except GateKeyMissing:
            pass
        try:
            return cls.create(data_dir), True
        except GateKeyError:
            # Another process created it between our two calls.
            if cls.path_in(data_dir).exists():
                return cls.load(data_dir), False
            raise


@attrs.frozen(repr=False)
class Credential:
    """What an edge needs to reach and prove itself to its Gate."""

    name: str
    role: str
    private_key: bytes
    gate_public_key: bytes
    gate_address: str
    """The Gates' tunnel addresses, separated by commas (one in credentials
    from before Gates formed clusters, which read the same)."""

    def __repr__(self) -> str:
        return (
            f"Credential(name={self.name!r}, role={self.role!r}, "
            f"gate_address={self.gate_address!r}, public_key={_b64(self.public_key)!r})"
        )

    @property
    def public_key(self) -> bytes:
        return public_key_of(self.private_key)

    @property
    def gate_addresses(self) -> tuple[str, ...]:
        return tuple(part.strip() for part in self.gate_address.split(","))

    def encode(self) -> str:
        """``qmesh-cred-v1.`` + unpadded base64url of compact JSON."""
        body = {
            "name": self.name,
            "role": self.role,
            "key": _b64(self.private_key),
            "gate_key": _b64(self.gate_public_key),
            "gate": self.gate_address,
        }
        text = json.dumps(body, separators=(",", ":"), sort_keys=True)
        return CREDENTIAL_PREFIX + _b64(text.encode("utf-8"))

    @classmethod
    def decode(cls, text: str) -> Credential:
        """Parse :meth:`encode`'s output (surrounding whitespace allowed).
        Raises CredentialError; the message never repeats the input."""
        # Every `from None` below keeps the underlying error, which may quote
        # part of the input, out of tracebacks.
        if not isinstance(text, str):
            raise CredentialError("a credential must be text")
        text = text.strip()
        if not text.startswith(CREDENTIAL_PREFIX):
            if text.startswith("qmesh-cred-"):
                raise CredentialError(
                    "unsupported credential version (this qmesh reads qmesh-cred-v1)"
                )
            raise CredentialError(
                f"not a qmesh credential (expected text starting with {CREDENTIAL_PREFIX!r})"
            )
        try:
            body = json.loads(_unb64(text[len(CREDENTIAL_PREFIX) :]).decode("utf-8"))
        except (binascii.Error, ValueError):
            raise CredentialError("the credential is corrupted (cut short or altered?)") from None
        if not isinstance(body, dict):
            raise CredentialError("the credential is corrupted (not an object)")
        fields: dict[str, str] = {}
        for field in ("name", "role", "key", "gate_key", "gate"):
            value = body.get(field)
            if not isinstance(value, str):
                raise CredentialError(f"the credential has no valid {field!r} field")
            fields[field] = value
        try:
            private_key = _unb64(fields["key"])
            gate_public_key = _unb64(fields["gate_key"])
        except binascii.Error:
            raise CredentialError("the credential's keys are corrupted") from None
        if len(private_key) != KEY_LEN or len(gate_public_key) != KEY_LEN:
            raise CredentialError("the credential's keys have the wrong length")
        if fields["role"] not in EDGE_ROLES:
            raise CredentialError(f"the credential's role is not one of {', '.join(EDGE_ROLES)}")
        try:
            check_name(fields["name"])
        except InvalidValue:
            raise CredentialError("the credential's name is not valid") from None
        try:
            for address in fields["gate"].split(","):
                parse_hostport(address.strip())
        except ValueError:
            raise CredentialError("the credential's gate address is not host:port") from None
        return cls(
            name=fields["name"],
            role=fields["role"],
            private_key=private_key,
            gate_public_key=gate_public_key,
            gate_address=fields["gate"],
        )


@attrs.frozen
class JoinToken:
    """A one-time ticket to enroll: what ``qmesh tokens create`` prints and
    an edge trades, at its first start, for an identity whose private key
    it made itself (the token holds no key of the edge's)."""

    token_id: str
    secret: bytes = attrs.field(repr=False)
    name: str
    role: str
    gate_public_key: bytes
    gate_address: str

    def proof(self) -> str:
        """What the edge's HELLO carries (inside the Noise handshake)."""
        return f"{self.token_id}.{_b64(self.secret)}"

    def credential(self, private_key: bytes) -> Credential:
        """The credential the edge keeps once the Gate accepted the token."""
        return Credential(
            name=self.name, role=self.role, private_key=private_key,
            gate_public_key=self.gate_public_key, gate_address=self.gate_address,
        )  # fmt: skip

    def encode(self) -> str:
        body = {
            "id": self.token_id, "secret": _b64(self.secret), "name": self.name,
            "role": self.role, "gate_key": _b64(self.gate_public_key), "gate": self.gate_address,
        }  # fmt: skip
        return JOIN_PREFIX + _b64(json.dumps(body, separators=(",", ":")).encode())

    @classmethod
    def decode(cls, text: str) -> JoinToken:
        """Raises CredentialError; the message never repeats the input."""
        text = text.strip()
        if not text.startswith(JOIN_PREFIX):
            raise CredentialError(f"not a qmesh join token (expected {JOIN_PREFIX!r}…)")
        try:
            body = json.loads(_unb64(text[len(JOIN_PREFIX) :]).decode("utf-8"))
            token = cls(
                token_id=str(body["id"]), secret=_unb64(body["secret"]), name=str(body["name"]),
                role=str(body["role"]), gate_public_key=_unb64(body["gate_key"]),
                gate_address=str(body["gate"]),
            )  # fmt: skip
        except (binascii.Error, ValueError, KeyError, TypeError):
            raise CredentialError("the join token is corrupted (cut short or altered?)") from None
        if len(token.secret) != KEY_LEN or len(token.gate_public_key) != KEY_LEN:
            raise CredentialError("the join token's keys have the wrong length")
        if token.role not in EDGE_ROLES or not re.fullmatch(r"[0-9a-f]{16}", token.token_id):
            raise CredentialError("the join token is not valid")
        return token


def parse_join_proof(text: str) -> tuple[str, bytes]:
    """The (token id, secret) of a HELLO's ``join``; ValueError if malformed."""
    token_id, _, secret = text.partition(".")
    if not re.fullmatch(r"[0-9a-f]{16}", token_id):
        raise ValueError("malformed join token id")
    try:
        raw = _unb64(secret)
    except binascii.Error:
        raise ValueError("malformed join token secret") from None
    if len(raw) != KEY_LEN:
        raise ValueError("malformed join token secret")
    return token_id, raw


def credential_or_join(
    credential_file: Path, join_token_file: Path | None, role: str
) -> tuple[Credential, JoinToken | None]:
    """The edge's credential; at a first start with a join token instead,
    a credential with a key made here now and the token to present (the
    caller writes the credential once the Gate accepted it)."""
    if credential_file.exists() or join_token_file is None:
        return load_credential(credential_file), None
    try:
        text = join_token_file.read_text(encoding="utf-8")
    except OSError as exc:
        raise CredentialError(f"cannot read join token file {join_token_file}: {exc}") from None
    _warn_if_shared(join_token_file, "join token file")
    token = JoinToken.decode(text)
    if token.role != role:
        raise CredentialError(f"{join_token_file} is a join token for a {token.role}, not a {role}")
    return token.credential(X25519PrivateKey.generate().private_bytes_raw()), token


def enroll(
    store: StateStore,
    keys: GateKeys,
    role: str,
    name: str,
    gate_address: str,
    *,
    ttl_s: float | None = None,
) -> Credential:
    """Create an identity for a new edge and return its credential.

    The edge's key pair is generated here; only the public key is stored.
    The returned credential is the only copy of the private key.
    ``gate_address`` is one "host:port" or several separated by commas (the
    Gates of a cluster); ``ttl_s``: the credential expires that long from
    now unless the live edge renews it (None: never). Raises CredentialError for an unusable gate
    address and the store's errors (IdentityExists, InvalidValue) for the
    name and role.
    """
    for address in gate_address.split(","):
        address = address.strip()
        try:
            _, port = parse_hostport(address)
        except ValueError as exc:
            raise CredentialError(f"gate address {address!r} is not host:port: {exc}") from None
        if port == 0:
            raise CredentialError(
                f"gate address {address!r} has port 0; give the port edges should dial"
            )
    private = X25519PrivateKey.generate()
    private_key = private.private_bytes_raw()
    store.add_identity(name, role, private.public_key().public_bytes_raw(), ttl_s=ttl_s)
    return Credential(
        name=name,
        role=role,
        private_key=private_key,
        gate_public_key=keys.public_key,
        gate_address=gate_address,
    )


def dial_addresses(configured: Sequence[str], credential: Credential) -> list[tuple[str, int]]:
    """Where an edge dials: the Gates its configuration lists, else its credential's."""
    return [parse_hostport(address) for address in configured or credential.gate_addresses]


def load_credential(path: Path) -> Credential:
    """Read a credential file. Logs a warning if other users can read it."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CredentialError(f"credential file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise CredentialError(f"cannot read credential file {path}: {reason}") from None
    _warn_if_shared(path, "credential file")
    try:
        return Credential.decode(text)
    except CredentialError as exc:
        raise CredentialError(f"{path}: {exc}") from None
