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


def test_a_disabled_app_keeps_its_keys_but_they_do_not_verify(store: StateStore) -> None:
    key = store.add_app("shop")
    store.add_app("blog")
    assert store.set_app_disabled("shop", True)
    assert not store.set_app_disabled("shop", True)  # already: the first time is kept
    keys = store.get_app_keys("shop")
    assert keys is not None and keys.disabled and len(keys.verifiers) == 1
    assert not store.verify_app_key("shop", key)
    assert [(a.app_id, a.disabled) for a in store.list_apps()] == [
        ("blog", False),
        ("shop", True),
    ]
    assert store.get_app_verifiers("shop") == list(keys.verifiers)  # still there, for enable
    assert store.set_app_disabled("shop", False)
    assert not store.set_app_disabled("shop", False)
    assert store.verify_app_key("shop", key)
    with pytest.raises(InvalidValue, match="no app"):
        store.set_app_disabled("nobody", True)


def test_verifier_for_matches_a_remembered_stored_key_only_while_valid(
    store: StateStore,
) -> None:
    store.add_app("shop")
    first = store.get_app_verifier("shop")
    assert first is not None
    store.rotate_app_key("shop", 600, now=T0)
    keys = store.get_app_keys("shop", now=T0 + 1)
    assert keys is not None
    previous = keys.verifier_for(first.stored_key, now=T0 + 1)
    assert previous is not None and previous.expires_at == T0 + 600
    assert keys.verifier_for(first.stored_key, now=T0 + 600) is None
    assert keys.verifier_for(b"\0" * 32, now=T0 + 1) is None
    store.rotate_app_key("shop", 0, now=T0 + 2)
    after = store.get_app_keys("shop", now=T0 + 2)
    assert after is not None and after.verifier_for(first.stored_key, now=T0 + 2) is None
    assert store.get_app_keys("nobody") is None


def test_apps_from_before_disabling_existed_are_enabled(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    before = MIGRATIONS.index(("ALTER TABLE apps ADD COLUMN disabled_at REAL NULL",))
    conn.execute("INSERT INTO schema_version VALUES (?)", (before,))
    for statements in MIGRATIONS[:before]:
        for statement in statements:
            conn.execute(statement)
    salt = b"s" * 16
    stored, server = scram_keys("old-key", salt, SCRAM_ITERATIONS)
    conn.execute(
        "INSERT INTO apps (app_id, scram_salt, scram_iterations, stored_key, server_key,"
        " created_at) VALUES ('shop', ?, ?, ?, ?, ?)",
        (salt, SCRAM_ITERATIONS, stored, server, T0),
    )
    conn.close()
    with StateStore.open(path) as store:
        assert store.schema_version == len(MIGRATIONS)
        (app,) = store.list_apps()
        assert not app.disabled and store.verify_app_key("shop", "old-key")
