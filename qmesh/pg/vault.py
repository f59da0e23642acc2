"""The vault: real database credentials, encrypted at rest in the state store.

For: storing, reading, listing and deleting the credentials the Gate logs in
to real PostgreSQL servers with, one per *alias* (the database name an
application asks the MiniGate for). Each value is the DSN's parts as JSON,
sealed with AES-256-GCM under the operator's master key
(:mod:`qmesh.masterkey`): a fresh random 96-bit nonce per write, and the
alias as associated data, so a ciphertext moved to another alias's row fails
authentication instead of handing one alias's password to another. Each row
records the fingerprint of the key that sealed it, so a wrong master key is
reported as such rather than as tampering.

A row also has a *pending* slot: :mod:`qmesh.pg.rotate` seals the new
password there before it changes the server, and promotes it afterwards, so
no crash can leave the server with a password the vault does not know.

Not for: talking to Postgres (:mod:`qmesh.pg.rotate`, the Gate's relay),
policy, or keeping secrets in memory longer than a call: :meth:`Vault.get`
reads the store every time, so a rotation made by another process (``qmesh
secrets rotate`` beside a running Gate) is seen at once.

Every password read or written is registered with
:func:`qmesh.logs.register_secret`, and no repr, exception message or log
line made here contains one.
"""

from __future__ import annotations

import builtins
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable
from typing import Any, Final

import attrs
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from qmesh.logs import register_secret
from qmesh.masterkey import (
    MASTER_KEY_LEN,
    ensure_master_key,
    key_fingerprint,
    load_master_key,
)
from qmesh.pg.dsn import SSLMODES, DsnFields, parse_dsn
from qmesh.pg.errors import VaultError
from qmesh.state import StateError, StateStore
from qmesh.state.db import Connection

__all__ = [
    "DatabaseSecret",
    "Vault",
    "VaultEntry",
    "VaultError",
    "check_alias",
    "delete_secret",
    "ensure_master_key",
    "list_aliases",
    "load_master_key",
]

NONCE_LEN: Final = 12
# Same shape as an app id (qmesh.state.check_name): an alias is what a client
# sends as its database name, and PostgreSQL names are at most 63 bytes.
_ALIAS_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
# Associated data: a version label and the alias. Changing the format of the
# plaintext means a new label, so old rows can never be read as new ones.
_AD_PREFIX: Final = b"qmesh-vault-v1\x00"
_FIELDS: Final = (
    "host", "port", "dbname", "user", "password", "sslmode", "sslrootcert", "channel_binding",
)  # fmt: skip
# Fields added after the first release, with the value entries written before
# them mean.
_LATER_FIELDS: Final = {"channel_binding": "prefer"}


def check_alias(alias: str) -> str:
    """Return ``alias`` if it is a valid database alias, else raise VaultError."""
    if not isinstance(alias, str) or not _ALIAS_RE.fullmatch(alias):
        raise VaultError(
            "a database alias must be 1-63 letters, digits, '.', '_' or '-', starting "
            f"with a letter or digit; got {alias!r}"
        )
    return alias


@attrs.frozen
class DatabaseSecret:
    """The real credentials behind one alias. ``repr`` never shows the password."""

    alias: str
    host: str
    port: int
    dbname: str
    user: str
    password: str = attrs.field(repr=False)
    sslmode: str
    """One of ``disable``, ``prefer``, ``require``, ``verify-ca``, ``verify-full``,
    with libpq's meanings."""
    sslrootcert: str | None
    """CA file for ``verify-ca``/``verify-full``; None: the system's trust store."""
    channel_binding: str = "prefer"
    """``disable``, ``prefer`` or ``require``, with libpq's meanings: bind the
    SCRAM login to the TLS channel when possible, or insist on it."""

    def describe(self) -> str:
        """``user@host:port/dbname sslmode=…``: for messages, without the password."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        text = f"{self.user}@{host}:{self.port}/{self.dbname} sslmode={self.sslmode}"
        if self.channel_binding != "prefer":
            text += f" channel_binding={self.channel_binding}"
        return text

    def with_password(self, password: str) -> DatabaseSecret:
        return attrs.evolve(self, password=password)


@attrs.frozen
class VaultEntry:
    """One alias as listed: the secret, and whether a rotation is in flight."""

    secret: DatabaseSecret
    created_at: float
    updated_at: float
    pending_since: float | None
    """Set while ``qmesh secrets rotate`` runs, or after one was interrupted."""


def list_aliases(store: StateStore) -> list[str]:
    """Every alias in the vault of ``store``, sorted. Needs no master key."""
    with store._read() as conn:
        rows = conn.execute("SELECT alias FROM vault_secrets ORDER BY alias").fetchall()
    return [row[0] for row in rows]


def delete_secret(store: StateStore, alias: str) -> bool:
    """Remove ``alias`` from the vault of ``store``; True if it existed. Needs
    no master key, so secrets sealed with a lost key can still be removed."""
    with store._write() as conn:
        if conn.execute("DELETE FROM vault_secrets WHERE alias = ?", (alias,)).rowcount != 1:
            return False
        store._record(conn, "secrets.delete", {"alias": alias})
        return True


def reseal_vault(conn: Connection, old_key: bytes, new_key: bytes) -> int:
    """Seal every secret (and pending rotation) again under ``new_key``, in
    the caller's write transaction (``qmesh secrets rekey``); the number of
    secrets. Raises VaultError for one ``old_key`` did not seal or cannot open."""
    old, new = AESGCM(old_key), AESGCM(new_key)
    old_print, new_print = key_fingerprint(old_key), key_fingerprint(new_key)
    rows = conn.execute(
        "SELECT alias, key_fingerprint, nonce, ciphertext, pending_nonce, pending_ciphertext"
        " FROM vault_secrets"
    ).fetchall()
    for alias, fingerprint, *sealed in rows:
        if bytes(fingerprint) not in (old_print, new_print):
            raise VaultError(f"secret {alias!r} is sealed with neither key")
        ad = _AD_PREFIX + str(alias).encode()
        opener = old if bytes(fingerprint) == old_print else new
        values: list[bytes | None] = []
        for nonce, ciphertext in ((sealed[0], sealed[1]), (sealed[2], sealed[3])):
            if nonce is None:
                values += [None, None]
                continue
            try:
                plaintext = opener.decrypt(bytes(nonce), bytes(ciphertext), ad)
            except InvalidTag:
                raise VaultError(
                    f"secret {alias!r} fails authentication; nothing changed"
                ) from None
            fresh = os.urandom(NONCE_LEN)
            values += [fresh, new.encrypt(fresh, plaintext, ad)]
        conn.execute(
            "UPDATE vault_secrets SET key_fingerprint = ?, nonce = ?, ciphertext = ?,"
            " pending_nonce = ?, pending_ciphertext = ? WHERE alias = ?",
            (new_print, *values, alias),
        )
    return len(rows)


log = logging.getLogger(__name__)
RELOAD_INTERVAL_S: Final = 1.0


class Vault:
    """The vault in ``store``, opened with the master key. Use :meth:`open`.

    Thread-safe (the store serialises its connection; AES-GCM keeps no
    state between calls), so Trio code calls it through
    ``trio.to_thread.run_sync`` like the store itself.
    """

    def __init__(self, store: StateStore, master_key: bytes) -> None:
        self._store = store
        self._aead = AESGCM(master_key)
        self._fingerprint = key_fingerprint(master_key)
        self._registered: set[str] = set()
        self._registered_lock = threading.Lock()
        self.reload: Callable[[], bytes] | None = None
        """Where the master key comes from again (the Gate's key file or
        command): a secret sealed under another key — ``qmesh secrets rekey``
        ran — makes the vault read its key once more and follow it."""
        self._reloaded_at = -math.inf

    def _follow_rekey(self, fingerprint: bytes) -> bool:
        """Whether a fresh read of the master key opens ``fingerprint``'s
        secrets (then it is this vault's key from now on). At most once a
        second: a secret sealed with a key nobody has must not make every
        login run the key command."""
        now = time.monotonic()
        if self.reload is None or now - self._reloaded_at < RELOAD_INTERVAL_S:
            return False
        self._reloaded_at = now
        try:
            key = self.reload()
        except StateError as exc:
            log.warning("re-reading the master key after a rekey failed: %s", exc)
            return False
        if key_fingerprint(key) != fingerprint:
            return False
        self._aead, self._fingerprint = AESGCM(key), fingerprint
        log.info("the vault follows the new master key %s (a rekey)", fingerprint.hex()[:16])
        return True

    def __repr__(self) -> str:
        return f"<Vault in {self._store.location} key={self._fingerprint.hex()}>"

    @classmethod
    def open(cls, store: StateStore, master_key: bytes) -> Vault:
        """The vault in ``store``. Raises VaultError for a key that is not 32
        bytes, or when the vault has secrets and none was sealed with this key
        (the wrong key: better found at start than at the first login)."""
        if not isinstance(master_key, bytes) or len(master_key) != MASTER_KEY_LEN:
            raise VaultError(f"the master key must be {MASTER_KEY_LEN} bytes")
        vault = cls(store, master_key)
        with store._read() as conn:
            fingerprints = {
                bytes(row[0])
                for row in conn.execute(
                    "SELECT DISTINCT key_fingerprint FROM vault_secrets"
                ).fetchall()
            }
        if fingerprints and vault._fingerprint not in fingerprints:
            raise VaultError(vault._wrong_key_message(fingerprints))
        return vault

    @property
    def fingerprint(self) -> str:
        """The master key's fingerprint, in hex: safe to show."""
        return self._fingerprint.hex()

    def _wrong_key_message(self, stored: set[bytes]) -> str:
        listed = ", ".join(sorted(f.hex() for f in stored))
        return (
            f"wrong master key: the vault's secrets were encrypted with the key with "
            f"fingerprint {listed}, this key's fingerprint is {self._fingerprint.hex()} "
            "(check QMESH_MASTER_KEY or gate.master_key_file)"
        )

    # -- sealing -------------------------------------------------------------------

    def _remember(self, password: str) -> None:
        # register_secret recompiles the redaction pattern; do it once per password.
        with self._registered_lock:
            if password in self._registered:
                return
            self._registered.add(password)
        register_secret(password)

    def _seal(self, secret: DatabaseSecret) -> tuple[bytes, bytes]:
        self._remember(secret.password)
        plaintext = json.dumps({name: getattr(secret, name) for name in _FIELDS}).encode()
        nonce = os.urandom(NONCE_LEN)
        return nonce, self._aead.encrypt(nonce, plaintext, _AD_PREFIX + secret.alias.encode())

    def _open(
        self, alias: str, fingerprint: bytes, nonce: bytes, ciphertext: bytes
    ) -> DatabaseSecret:
        if fingerprint != self._fingerprint and not self._follow_rekey(fingerprint):
            raise VaultError(f"secret {alias!r}: " + self._wrong_key_message({fingerprint}))
        try:
            plaintext = self._aead.decrypt(nonce, ciphertext, _AD_PREFIX + alias.encode())
        except InvalidTag:
            raise VaultError(
                f"secret {alias!r} failed authentication: its stored value was altered or "
                "belongs to another alias; set it again with `qmesh secrets set`"
            ) from None
        try:
            data = json.loads(plaintext)
            values: dict[str, Any] = {
                name: data[name] if name in data else _LATER_FIELDS[name] for name in _FIELDS
            }
            secret = DatabaseSecret(alias=alias, **values)
        except (ValueError, KeyError, TypeError):
            # Authentic but unreadable: written by another qmesh version.
            raise VaultError(f"secret {alias!r} has a format this qmesh cannot read") from None
        self._remember(secret.password)
        return secret

    # -- the interface ---------------------------------------------------------------

    def get(self, alias: str) -> DatabaseSecret | None:
        """The current secret for ``alias``, None if there is none. Reads the
        store on every call. Raises VaultError if it cannot be decrypted."""
        with self._store._read() as conn:
            row = conn.execute(
                "SELECT key_fingerprint, nonce, ciphertext FROM vault_secrets WHERE alias = ?",
                (alias,),
            ).fetchone()
        if row is None:
            return None
        return self._open(alias, bytes(row[0]), bytes(row[1]), bytes(row[2]))

    def get_pending(self, alias: str) -> DatabaseSecret | None:
        """The secret a rotation in flight is moving ``alias`` to, if any.

        Between the server accepting the new password and the vault promoting
        it, :meth:`get` still returns the old one; a relay whose login with
        :meth:`get`'s password fails with 28P01 may try this one.
        """
        with self._store._read() as conn:
            row = conn.execute(
                "SELECT key_fingerprint, pending_nonce, pending_ciphertext FROM vault_secrets"
                " WHERE alias = ? AND pending_nonce IS NOT NULL",
                (alias,),
            ).fetchone()
        if row is None:
            return None
        return self._open(alias, bytes(row[0]), bytes(row[1]), bytes(row[2]))

    def set(self, alias: str, dsn: str) -> DatabaseSecret:
        """Parse ``dsn`` (a ``postgresql://`` URI or ``key=value`` pairs), seal
        it and store it under ``alias``, replacing what was there (and
        abandoning a pending rotation). Raises DsnError (a VaultError) naming
        the bad part of the DSN without repeating any of its values."""
        check_alias(alias)
        fields: DsnFields = parse_dsn(dsn)
        secret = DatabaseSecret(alias=alias, **fields)
        self.put(secret)
        return secret

    def put(self, secret: DatabaseSecret) -> None:
        """Store ``secret`` as the current value of its alias, as it is."""
        check_alias(secret.alias)
        if secret.sslmode not in SSLMODES:
            raise VaultError(f"sslmode must be one of {', '.join(SSLMODES)}")
        nonce, ciphertext = self._seal(secret)
        now = time.time()
        with self._store._write() as conn:
            conn.execute(
                "INSERT INTO vault_secrets (alias, key_fingerprint, nonce, ciphertext,"
                " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (alias) DO UPDATE SET key_fingerprint = excluded.key_fingerprint,"
                " nonce = excluded.nonce, ciphertext = excluded.ciphertext,"
                " pending_nonce = NULL, pending_ciphertext = NULL, pending_since = NULL,"
                " updated_at = excluded.updated_at",
                (secret.alias, self._fingerprint, nonce, ciphertext, now, now),
            )
            self._store._record(conn, "secrets.set", {"alias": secret.alias})

    def list(self) -> list[str]:
        """Every alias in the vault, sorted. Needs no decryption."""
        return list_aliases(self._store)

    def entries(self) -> builtins.list[VaultEntry]:
        """Every alias with its (decrypted) secret and timestamps, sorted."""
        with self._store._read() as conn:
            rows = conn.execute(
                "SELECT alias, key_fingerprint, nonce, ciphertext, created_at, updated_at,"
                " pending_since FROM vault_secrets ORDER BY alias"
            ).fetchall()
        return [
            VaultEntry(
                secret=self._open(row[0], bytes(row[1]), bytes(row[2]), bytes(row[3])),
                created_at=row[4],
                updated_at=row[5],
                pending_since=row[6],
            )
            for row in rows
        ]

    def delete(self, alias: str) -> bool:
        """Remove ``alias``. True if it existed."""
        return delete_secret(self._store, alias)

    # -- rotation support (qmesh.pg.rotate) -------------------------------------------

    def begin_rotation(
        self, alias: str, new_password: str, *, stale_after_s: float
    ) -> tuple[DatabaseSecret, DatabaseSecret | None]:
        """Seal ``new_password`` into ``alias``'s pending slot, atomically with
        reading the current secret; return ``(current, interrupted)``.

        The pending slot is the rotation's lock. If it is already taken and
        younger than ``stale_after_s``, another rotation is running: VaultError.
        If it is older, that rotation died; its pending secret is returned as
        ``interrupted`` (and left in place) so the caller can find out which
        password the server has before starting over.
        """
        now = time.time()
        with self._store._write() as conn:
            row = conn.execute(
                "SELECT key_fingerprint, nonce, ciphertext, pending_nonce, pending_ciphertext,"
                " pending_since FROM vault_secrets WHERE alias = ?",
                (alias,),
            ).fetchone()
            if row is None:
                raise VaultError(f"no secret for alias {alias!r} (see `qmesh secrets list`)")
            fingerprint = bytes(row[0])
            current = self._open(alias, fingerprint, bytes(row[1]), bytes(row[2]))
            if row[3] is not None:
                if now - row[5] < stale_after_s:
                    raise VaultError(
                        f"another rotation of {alias!r} started {now - row[5]:.0f} s ago and "
                        f"may still be running; try again in {stale_after_s:.0f} s"
                    )
                interrupted = self._open(alias, fingerprint, bytes(row[3]), bytes(row[4]))
                conn.execute(
                    "UPDATE vault_secrets SET pending_since = ? WHERE alias = ?", (now, alias)
                )
                return current, interrupted
            nonce, ciphertext = self._seal(current.with_password(new_password))
            conn.execute(
                "UPDATE vault_secrets SET pending_nonce = ?, pending_ciphertext = ?,"
                " pending_since = ? WHERE alias = ?",
                (nonce, ciphertext, now, alias),
            )
        return current, None

    def finish_rotation(self, alias: str, *, promote: bool) -> bool:
        """End the rotation of ``alias``: with ``promote`` the pending secret
        becomes the current one, without it the pending slot is cleared.
        True if there was a pending secret to act on."""
        with self._store._write() as conn:
            if promote:
                cursor = conn.execute(
                    "UPDATE vault_secrets SET nonce = pending_nonce,"
                    " ciphertext = pending_ciphertext, pending_nonce = NULL,"
                    " pending_ciphertext = NULL, pending_since = NULL, updated_at = ?"
                    " WHERE alias = ? AND pending_nonce IS NOT NULL",
                    (time.time(), alias),
                )
                if cursor.rowcount == 1:
                    self._store._record(conn, "secrets.rotate", {"alias": alias})
            else:
                cursor = conn.execute(
                    "UPDATE vault_secrets SET pending_nonce = NULL, pending_ciphertext = NULL,"
                    " pending_since = NULL WHERE alias = ? AND pending_nonce IS NOT NULL",
                    (alias,),
                )
            return cursor.rowcount == 1

    def release_rotation(self, alias: str) -> None:
        """Keep the pending secret but end its lease, so that the next
        rotation settles it at once instead of waiting for the lease to run
        out (used when a rotation gives up with its outcome unknown)."""
        with self._store._write() as conn:
            conn.execute(
                "UPDATE vault_secrets SET pending_since = 0"
                " WHERE alias = ? AND pending_nonce IS NOT NULL",
                (alias,),
            )
