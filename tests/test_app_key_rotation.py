"""App keys that rotate with an overlap window (qmesh.state), the clock injected."""

from __future__ import annotations

import hashlib
import hmac
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from qmesh.state import (
    MIGRATIONS,
    SCRAM_ITERATIONS,
    AppVerifier,
    InvalidValue,
    StateStore,
    scram_keys,
)

T0 = 1_900_000_000.0


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StateStore]:
    with StateStore.open(tmp_path / "state.db") as store:
        yield store


def scram_login(key: str, verifiers: list[AppVerifier]) -> AppVerifier | None:
    """Both halves of a SCRAM-SHA-256 exchange (RFC 5802): the client proves
    ``key`` with the one salt the server sent; the server checks the proof
    against each verifier, as the Postgres mimic does."""
    salt, iterations = verifiers[0].salt, verifiers[0].iterations
    auth_message = b"n=app,r=abc,r=abcdef,s=...,i=4096,c=biws,r=abcdef"
    # client
    salted = hashlib.pbkdf2_hmac("sha256", key.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    signature = hmac.new(hashlib.sha256(client_key).digest(), auth_message, "sha256").digest()
    proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
    # server
    for verifier in verifiers:
        expected = hmac.new(verifier.stored_key, auth_message, "sha256").digest()
        recovered = bytes(a ^ b for a, b in zip(proof, expected, strict=True))
        if hmac.compare_digest(hashlib.sha256(recovered).digest(), verifier.stored_key):
            return verifier
    return None


def test_both_keys_work_during_the_overlap_then_the_old_one_expires(store: StateStore) -> None:
    old_key = store.add_app("shop")
    new_key, until = store.rotate_app_key("shop", 600, now=T0)
    assert until == T0 + 600 and new_key != old_key
    during = T0 + 599
    assert store.verify_app_key("shop", old_key, now=during)
    assert store.verify_app_key("shop", new_key, now=during)
    assert not store.verify_app_key("shop", old_key + "x", now=during)
    verifiers = store.get_app_verifiers("shop", now=during)
    assert len(verifiers) == 2
    newest, previous = verifiers
    assert (newest.expires_at, previous.expires_at) == (None, T0 + 600)
    assert newest.created_at == T0 > previous.created_at
    # One salt for all of them, so one SCRAM exchange can be checked against each.
    assert newest.salt == previous.salt and newest.iterations == previous.iterations
    assert scram_login(new_key, verifiers) is newest
    assert scram_login(old_key, verifiers) is previous
    assert store.get_app_verifier("shop") == newest  # the current key

    after = T0 + 600
    assert not store.verify_app_key("shop", old_key, now=after)
    assert store.verify_app_key("shop", new_key, now=after)
    assert store.get_app_verifiers("shop", now=after) == [newest]
    assert scram_login(old_key, store.get_app_verifiers("shop", now=after)) is None


def test_the_real_clock_is_the_default(store: StateStore) -> None:
    old_key = store.add_app("shop")
    new_key, _ = store.rotate_app_key("shop", 3600)
    assert store.verify_app_key("shop", old_key) and store.verify_app_key("shop", new_key)
    newest, _ = store.rotate_app_key("shop", 0)
    assert store.verify_app_key("shop", newest)
    for key in (old_key, new_key):
        assert not store.verify_app_key("shop", key)


def test_repeated_rotation_keeps_each_old_key_until_its_own_expiry(store: StateStore) -> None:
    k1 = store.add_app("shop")
    k2, _ = store.rotate_app_key("shop", 100, now=T0)
    k3, _ = store.rotate_app_key("shop", 1000, now=T0 + 50)
    at = T0 + 60
    assert all(store.verify_app_key("shop", k, now=at) for k in (k1, k2, k3))
    assert [v.expires_at for v in store.get_app_verifiers("shop", now=at)] == [
        None,
        T0 + 1050,
        T0 + 100,
    ]
    later = T0 + 200
    assert not store.verify_app_key("shop", k1, now=later)
    assert store.verify_app_key("shop", k2, now=later)
    # An overlap of 0 answers a leaked key: every previous key stops now.
    k4, until = store.rotate_app_key("shop", 0, now=later)
    assert until == later
    assert [store.verify_app_key("shop", k, now=later) for k in (k1, k2, k3, k4)] == [
        False,
        False,
        False,
        True,
    ]


def test_deleting_an_app_removes_its_old_keys(store: StateStore) -> None:
    old_key = store.add_app("shop")
    store.rotate_app_key("shop", 3600)
    assert store.delete_app("shop")
    new_key = store.add_app("shop")
    assert store.get_app_verifiers("shop") == [store.get_app_verifier("shop")]
    assert not store.verify_app_key("shop", old_key)
    assert store.verify_app_key("shop", new_key)
    assert store.get_app_verifiers("nobody") == []


def test_bad_rotations(store: StateStore) -> None:
    with pytest.raises(InvalidValue, match="no app"):
        store.rotate_app_key("nobody", 60)
    store.add_app("shop")
    for bad in (-1.0, float("nan")):
        with pytest.raises(InvalidValue, match="overlap"):
            store.rotate_app_key("shop", bad)


def test_apps_from_the_first_schema_keep_working(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    conn.execute("INSERT INTO schema_version VALUES (1)")
    for statement in MIGRATIONS[0]:
        conn.execute(statement)
    salt = b"s" * 16
    stored, server = scram_keys("old-key", salt, SCRAM_ITERATIONS)
    conn.execute(
        "INSERT INTO apps VALUES ('shop', ?, ?, ?, ?, ?)",
        (salt, SCRAM_ITERATIONS, stored, server, T0),
    )
    conn.close()
    with StateStore.open(path) as store:
        assert store.schema_version == len(MIGRATIONS)
        assert store.verify_app_key("shop", "old-key")
        verifier = store.get_app_verifier("shop")
        assert verifier is not None and verifier.created_at == T0
        new_key, _ = store.rotate_app_key("shop", 60)
        assert store.verify_app_key("shop", "old-key") and store.verify_app_key("shop", new_key)
