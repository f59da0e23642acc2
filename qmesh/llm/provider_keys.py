"""Provider API keys, sealed at rest with the vault's master key.

For: ``qmesh providers set-key NAME`` (store), the Gate resolving a
provider's ``api_key = "store:NAME"`` at start-up (open), ``env:VAR`` keys,
and listing which names have a key. Each value is AES-256-GCM sealed with a
fresh nonce and the name as associated data (a ciphertext moved to another
name fails to open). Keys read are registered with
:func:`qmesh.logs.register_secret`, so they never reach a log line.

Not for: database credentials (:mod:`qmesh.pg.vault`) or rotating keys at
the provider.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from qmesh.logs import register_secret
from qmesh.masterkey import key_fingerprint
from qmesh.state import InvalidValue, StateError, StateStore
from qmesh.state.db import Connection

__all__ = [
    "ProviderKeyError",
    "delete_key",
    "list_keys",
    "load_key",
    "resolve_api_key",
    "store_key",
]


class ProviderKeyError(StateError):
    """A provider key is missing, unreadable, or sealed under another master key."""


def _aad(name: str) -> bytes:
    return b"qmesh-provider-key\x00" + name.encode()


def store_key(store: StateStore, master_key: bytes, name: str, api_key: str) -> None:
    if not name or len(name) > 64:
        raise InvalidValue("a provider name is 1-64 characters")
    if not api_key or api_key != api_key.strip():
        raise InvalidValue("the API key is empty or has surrounding white space")
    nonce = secrets.token_bytes(12)
    sealed = AESGCM(master_key).encrypt(nonce, api_key.encode(), _aad(name))
    with store._write() as conn:
        conn.execute(
            "INSERT INTO qg_provider_keys (name, key_fingerprint, nonce, ciphertext, updated_at)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET"
            " key_fingerprint = excluded.key_fingerprint, nonce = excluded.nonce,"
            " ciphertext = excluded.ciphertext, updated_at = excluded.updated_at",
            (name, key_fingerprint(master_key), nonce, sealed, time.time()),
        )


def load_key(store: StateStore, master_key: bytes, name: str) -> str:
    with store._read() as conn:
        row = conn.execute(
            "SELECT key_fingerprint, nonce, ciphertext FROM qg_provider_keys WHERE name = ?",
            (name,),
        ).fetchone()
    if row is None:
        raise ProviderKeyError(
            f"no API key stored for provider key {name!r} (see `qmesh providers set-key`)"
        )
    if bytes(row[0]) != key_fingerprint(master_key):
        raise ProviderKeyError(f"the key {name!r} was sealed with a different master key")
    try:
        value = AESGCM(master_key).decrypt(bytes(row[1]), bytes(row[2]), _aad(name)).decode()
    except InvalidTag:
        raise ProviderKeyError(f"the stored key {name!r} fails authentication") from None
    register_secret(value)
    return value


def delete_key(store: StateStore, name: str) -> bool:
    with store._write() as conn:
        return conn.execute("DELETE FROM qg_provider_keys WHERE name = ?", (name,)).rowcount == 1


def list_keys(store: StateStore) -> list[tuple[str, float]]:
    with store._read() as conn:
        rows = conn.execute(
            "SELECT name, updated_at FROM qg_provider_keys ORDER BY name"
        ).fetchall()
    return [(row[0], float(row[1])) for row in rows]


def resolve_api_key(
    spec: str | None,
    store: StateStore,
    master_key: bytes | None,
    env: Mapping[str, str] | None = None,
) -> str | None:
    """The key a provider's ``api_key`` setting names (``store:NAME`` or
    ``env:VAR``), or None when it names none. Raises ProviderKeyError."""
    if spec is None:
        return None
    source, _, name = spec.partition(":")
    if source == "env":
        value = (os.environ if env is None else env).get(name)
        if not value:
            raise ProviderKeyError(f"environment variable {name} (a provider API key) is not set")
        register_secret(value)
        return value
    if master_key is None:
        raise ProviderKeyError(f"provider key {spec!r} needs the vault's master key")
    return load_key(store, master_key, name)


def reseal_provider_keys(conn: Connection, old_key: bytes, new_key: bytes) -> int:
    """Seal every provider key again under ``new_key``, in the caller's write
    transaction (``qmesh secrets rekey``); how many."""
    old_print = key_fingerprint(old_key)
    rows = conn.execute("SELECT name, key_fingerprint, nonce, ciphertext FROM qg_provider_keys")
    done = 0
    for name, fingerprint, nonce, ciphertext in rows.fetchall():
        if bytes(fingerprint) != old_print:
            raise ProviderKeyError(f"the key {name!r} was sealed with another master key")
        try:
            value = AESGCM(old_key).decrypt(bytes(nonce), bytes(ciphertext), _aad(name))
        except InvalidTag:
            raise ProviderKeyError(f"the stored key {name!r} fails authentication") from None
        fresh = secrets.token_bytes(12)
        conn.execute(
            "UPDATE qg_provider_keys SET key_fingerprint = ?, nonce = ?, ciphertext = ?"
            " WHERE name = ?",
            (key_fingerprint(new_key), fresh, AESGCM(new_key).encrypt(fresh, value, _aad(name)),
             name),
        )  # fmt: skip
        done += 1
    return done
