"""SCRAM-SHA-256 both ways against the RFC 7677 test vector, and the
failure cases: a wrong key, an unknown app (mock exchange), tampering."""

from __future__ import annotations

import base64
import hashlib
from collections import OrderedDict

import pytest

from qmesh.pg import scram
from qmesh.pg.scram import ScramClient, ScramError, ScramServer, md5_password
from qmesh.state import AppVerifier, scram_keys

# RFC 7677, section 3.
PASSWORD = "pencil"
CLIENT_NONCE = "rOprNGfwEbeRWgbNEkqO"
SERVER_NONCE_SUFFIX = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
CLIENT_FIRST = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
SERVER_FIRST = (
    b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
)
CLIENT_FINAL = (
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def verifier(password: str = PASSWORD) -> AppVerifier:
    stored, server = scram_keys(password, SALT, 4096)
    return AppVerifier(
        app_id="user", salt=SALT, iterations=4096, stored_key=stored, server_key=server,
        created_at=0.0,
    )  # fmt: skip


def test_server_matches_rfc_7677() -> None:
    server = ScramServer([verifier()], "user", b"m" * 32, nonce_suffix=SERVER_NONCE_SUFFIX)
    assert server.server_first(CLIENT_FIRST) == SERVER_FIRST
    assert server.server_final(CLIENT_FINAL) == SERVER_FINAL
    assert server.verified is not None


def test_client_matches_rfc_7677() -> None:
    client = ScramClient(PASSWORD, user="user", nonce=CLIENT_NONCE)
    assert client.client_first() == CLIENT_FIRST
    assert client.client_final(SERVER_FIRST) == CLIENT_FINAL
    client.verify_server_final(SERVER_FINAL)
    with pytest.raises(ScramError, match="signature"):
        client.verify_server_final(b"v=" + base64.b64encode(b"x" * 32))


def exchange(server: ScramServer, password: str) -> bytes:
    client = ScramClient(password)
    first = server.server_first(client.client_first())
    final = server.server_final(client.client_final(first))
    client.verify_server_final(final)
    return final


def test_wrong_key_and_unknown_app_fail_the_same_way() -> None:
    with pytest.raises(ScramError, match="wrong proof"):
        exchange(ScramServer([verifier()], "user", b"m" * 32), "not the key")
    mock = ScramServer([], "ghost", b"m" * 32)
    with pytest.raises(ScramError, match="wrong proof"):
        exchange(mock, PASSWORD)
    # The mock salt is stable per app id, so probing twice reveals nothing.
    again = ScramServer([], "ghost", b"m" * 32)
    first_a = mock.server_first(b"n,,n=,r=abc")
    first_b = again.server_first(b"n,,n=,r=abc")
    assert first_a.split(b",")[1:] == first_b.split(b",")[1:]


def test_any_verifier_of_a_rotation_overlap_is_accepted() -> None:
    old, new = verifier("old-key"), verifier("new-key")
    for password in ("old-key", "new-key"):
        exchange(ScramServer([new, old], "user", b"m" * 32), password)


@pytest.mark.parametrize(
    "client_first",
    [b"", b"x", b"p=tls-server-end-point,,n=,r=abc", b"n,a=admin,n=,r=abc", b"n,,r=abc",
     b"n,,n=,r=", b"n,,n=,r=a,b\xff"],
)  # fmt: skip
def test_malformed_client_first(client_first: bytes) -> None:
    with pytest.raises(ScramError):
        ScramServer([verifier()], "user", b"m" * 32).server_first(client_first)


def test_tampered_client_final() -> None:
    server = ScramServer([verifier()], "user", b"m" * 32, nonce_suffix=SERVER_NONCE_SUFFIX)
    server.server_first(CLIENT_FIRST)
    with pytest.raises(ScramError, match="nonce"):
        server.server_final(CLIENT_FINAL.replace(b"k0,", b"k1,"))
    server = ScramServer([verifier()], "user", b"m" * 32, nonce_suffix=SERVER_NONCE_SUFFIX)
    server.server_first(CLIENT_FIRST)
    with pytest.raises(ScramError, match="channel binding"):
        server.server_final(CLIENT_FINAL.replace(b"c=biws", b"c=eSws"))


def test_client_refuses_a_nonce_it_did_not_start() -> None:
    client = ScramClient(PASSWORD, nonce=CLIENT_NONCE)
    with pytest.raises(ScramError, match="nonce"):
        client.client_final(b"r=someoneelse,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096")
    with pytest.raises(ScramError, match="iteration"):
        client.client_final(SERVER_FIRST.replace(b"i=4096", b"i=99999999"))


def test_md5_answer() -> None:
    # "md5" + md5(md5(password + user) + salt), as libpq computes it.
    inner = hashlib.md5(b"secretalice").hexdigest().encode()
    expected = b"md5" + hashlib.md5(inner + b"\x01\x02\x03\x04").hexdigest().encode()
    assert md5_password("alice", "secret", b"\x01\x02\x03\x04") == expected


def test_the_client_computes_a_passwords_keys_once_per_salt(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """PostgreSQL keeps a role's salt until its password changes: the Gate's
    logins after the first take the keys from memory, each proof still
    right, and a new password or salt computes them afresh. What is kept is
    bounded and holds no password."""
    monkeypatch.setattr(scram, "_SALTED_KEYS", OrderedDict())
    server, other = (ScramServer([verifier()], "user", b"m" * 32) for _ in range(2))
    rounds: list[int] = []
    pbkdf2 = hashlib.pbkdf2_hmac

    def counted(name: str, password: bytes, salt: bytes, iterations: int) -> bytes:
        rounds.append(iterations)
        return pbkdf2(name, password, salt, iterations)

    monkeypatch.setattr(hashlib, "pbkdf2_hmac", counted)
    for _ in range(3):
        exchange(server, PASSWORD)
    assert rounds == [4096]
    with pytest.raises(ScramError, match="wrong proof"):
        exchange(other, "rotated")
    assert rounds == [4096, 4096]
    assert all(PASSWORD.encode() not in b"".join(k[:2]) for k in scram._SALTED_KEYS)
    for n in range(scram.SALTED_KEYS_KEPT + 10):
        client = ScramClient(PASSWORD, nonce="abc")
        client.client_final(f"r=abcd,s={base64.b64encode(b'salt%d' % n).decode()},i=1".encode())
    assert len(scram._SALTED_KEYS) == scram.SALTED_KEYS_KEPT
