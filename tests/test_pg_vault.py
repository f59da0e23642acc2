"""qmesh.pg.dsn, qmesh.masterkey and qmesh.pg.vault on a real state store,
SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from statekit import stored_bytes

from qmesh.config import Config, GateConfig
from qmesh.masterkey import (
    MASTER_KEY_ENV,
    MasterKeyError,
    create_master_key,
    ensure_master_key,
    load_master_key,
)
from qmesh.pg.dsn import is_socket_directory, parse_dsn, unix_socket_path
from qmesh.pg.errors import DsnError, VaultError
from qmesh.pg.vault import DatabaseSecret, Vault, delete_secret, list_aliases
from qmesh.state import StateStore

PASSWORD = "Pa55-w0rd/with@odd:chars"
KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


@pytest.fixture
def store(state_location: Path | str) -> Iterator[StateStore]:
    with StateStore.open(state_location) as store:
        yield store


@pytest.fixture
def vault(store: StateStore) -> Vault:
    return Vault.open(store, KEY)


# -- DSN parsing ---------------------------------------------------------------------------


def test_uri_and_key_value_forms_agree() -> None:
    uri = parse_dsn("postgresql://alice:s%40cret@db.internal:6432/orders?sslmode=verify-full\n")
    pairs = parse_dsn(
        "host=db.internal port = 6432 dbname=orders user=alice password='s@cret' "
        "sslmode=verify-full"
    )
    assert uri == pairs
    assert uri == {
        "host": "db.internal",
        "port": 6432,
        "dbname": "orders",
        "user": "alice",
        "password": "s@cret",
        "sslmode": "verify-full",
        "sslrootcert": None,
        "channel_binding": "prefer",
    }


def test_dsn_defaults_and_special_characters() -> None:
    parsed = parse_dsn(f"postgres://bob:{PASSWORD}@[::1]")
    assert parsed["password"] == PASSWORD  # unencoded '/', '@', ':' up to the last '@'
    assert (parsed["host"], parsed["port"], parsed["dbname"]) == ("::1", 5432, "bob")
    assert parsed["sslmode"] == "prefer"
    quoted = parse_dsn(r"host=h user=u password='it\'s a \\ secret' sslrootcert=ca.pem")
    assert quoted["password"] == "it's a \\ secret"
    assert quoted["sslrootcert"] == str(Path.cwd() / "ca.pem")


def test_a_host_that_is_a_directory_is_the_servers_unix_socket() -> None:
    """As libpq reads it: the socket is .s.PGSQL.PORT in that directory."""
    for dsn in (
        f"host=/var/run/postgresql port=6432 user=u password={PASSWORD} dbname=shop",
        f"postgresql://u:{PASSWORD}@%2Fvar%2Frun%2Fpostgresql:6432/shop",
        f"postgresql://u:{PASSWORD}@/shop?host=/var/run/postgresql&port=6432&sslmode=disable",
    ):
        parsed = parse_dsn(dsn)
        assert (parsed["host"], parsed["port"], parsed["dbname"]) == (
            "/var/run/postgresql", 6432, "shop"
        ), dsn  # fmt: skip
        assert is_socket_directory(parsed["host"])
        assert unix_socket_path(parsed["host"], parsed["port"]) == Path(
            "/var/run/postgresql/.s.PGSQL.6432"
        )
    assert not is_socket_directory(parse_dsn(f"host=db user=u password={PASSWORD}")["host"])


@pytest.mark.parametrize(
    ("dsn", "named"),
    [
        (f"host=h user=u pasword={PASSWORD}", "unknown key 'pasword'; did you mean 'password'?"),
        (f"host=h user=u password={PASSWORD} port=54x32", "port: expected a number"),
        (f"host=h user=u password={PASSWORD} sslmode=requir", "sslmode: expected one of"),
        (f"host=h user=u password={PASSWORD} channel_binding=on", "channel_binding: expected"),
        (
            f"host=h user=u password={PASSWORD} sslmode=disable channel_binding=require",
            "channel_binding=require needs TLS",
        ),
        (f"host=h user=u password=Pa55 {PASSWORD[4:]}", "the 4th key=value pair"),
        (f"host=h user=u password=Pa55 w0rd={PASSWORD}", "the 4th key=value pair: unknown key"),
        (f"host=h user=u password='{PASSWORD}", "the quoted value has no closing '"),
        (f"host=h user=u password={PASSWORD} connect_timeout=3", "'connect_timeout' is a libpq"),
        (f"user=u password={PASSWORD}", "host is missing"),
        (f"host=h password={PASSWORD}", "user is missing"),
        ("host=h user=u", "password is missing"),
        (f"postgresql://u:{PASSWORD}@h:5432:1/db", "port: expected a number"),
        (f"postgresql://u:{PASSWORD}@h1,h2/db", "several hosts"),
        (f"postgresql://u:{PASSWORD}@h/db?sslmod=require", "did you mean 'sslmode'?"),
        (f"postgresql://u:{PASSWORD}@h/db?{PASSWORD[:4]}", "URI query parameter 1"),
        # An '@' after the host is ambiguous with the lenient rule: still no echo.
        (f"postgresql://u:{PASSWORD}@h/db?{PASSWORD}", "port: expected a number"),
        (f"postgresql://u:{PASSWORD}@/db", "host is missing"),
        (f"postgresql://u:pa%zzss{PASSWORD}@h/db", "password: '%' must be followed"),
        (f"postgresql://u:{PASSWORD}@/db?host=/run&sslmode=require", "no TLS is used on a Unix"),
        (f"host=/run user=u password={PASSWORD} sslmode=verify-full", "verify-full: no TLS"),
        (f"host=/run user=u password={PASSWORD} channel_binding=require", "which a Unix-domain"),
        (f"host=/{'d' * 100} user=u password={PASSWORD}", "longer than 107 bytes"),
        (f"host=/run,/tmp user=u password={PASSWORD}", "several hosts"),
        (f"postgresql://u:{PASSWORD}@h/db?host=h2", "host is given twice"),
        (f"mysql://u:{PASSWORD}@h/db", "scheme must be postgresql://"),
        (f"host=h user=u password={PASSWORD} user=v", "user is given twice"),
        ("   \n", "the DSN is empty"),
    ],
)
def test_dsn_errors_name_the_part_but_never_the_password(dsn: str, named: str) -> None:
    with pytest.raises(DsnError) as info:
        parse_dsn(dsn)
    message = str(info.value)
    assert named in message
    # Neither the password nor any sizeable piece of it.
    for i in range(len(PASSWORD) - 4):
        assert PASSWORD[i : i + 5] not in message, message


# -- the master key ------------------------------------------------------------------------


def test_master_key_file_is_created_private_and_never_replaced(tmp_path: Path) -> None:
    path = tmp_path / "data" / "master.key"
    key = create_master_key(path)
    assert len(key) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert base64.b64decode(path.read_text()) == key
    config = Config(data_dir=tmp_path / "data")
    assert load_master_key(config, env={}) == key
    with pytest.raises(MasterKeyError, match="already exists; refusing"):
        create_master_key(path)
    assert load_master_key(config, env={}) == key
    assert sorted(p.name for p in path.parent.iterdir()) == ["master.key"]  # no temp file


def test_master_key_from_env_wins(tmp_path: Path) -> None:
    config = Config(data_dir=tmp_path)
    env = {MASTER_KEY_ENV: base64.b64encode(KEY).decode()}
    assert load_master_key(config, env=env) == KEY
    urlsafe = {MASTER_KEY_ENV: base64.urlsafe_b64encode(KEY).decode().rstrip("=")}
    assert load_master_key(config, env=urlsafe) == KEY
    assert ensure_master_key(tmp_path, env=env) == KEY
    assert not (tmp_path / "master.key").exists()


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (base64.b64encode(bytes(16)).decode(), "got 16 bytes"),
        ("not base64!", "expected 32 bytes in base64"),
        ("", "set but empty"),
    ],
)
def test_bad_master_key_in_env(tmp_path: Path, value: str, problem: str) -> None:
    with pytest.raises(MasterKeyError, match=problem) as info:
        load_master_key(Config(data_dir=tmp_path), env={MASTER_KEY_ENV: value})
    assert MASTER_KEY_ENV in str(info.value)
    if value:
        assert value not in str(info.value)


def test_master_key_file_problems(tmp_path: Path) -> None:
    config = Config(data_dir=tmp_path, gate=GateConfig(master_key_file=tmp_path / "mk"))
    with pytest.raises(MasterKeyError, match=r"does not exist.*init-master-key"):
        load_master_key(config, env={})
    path = tmp_path / "mk"
    path.write_text(base64.b64encode(KEY).decode() + "\n")
    os.chmod(path, 0o640)
    with pytest.raises(MasterKeyError, match=r"mode 0640.*chmod 600"):
        load_master_key(config, env={})
    os.chmod(path, 0o600)
    assert load_master_key(config, env={}) == KEY
    path.write_bytes(KEY)  # 32 raw bytes are accepted too
    assert load_master_key(config, env={}) == KEY
    path.write_text("short\n")
    with pytest.raises(MasterKeyError, match="not a master key"):
        load_master_key(config, env={})


def test_ensure_master_key_creates_once(tmp_path: Path) -> None:
    first = ensure_master_key(tmp_path / "d", env={})
    assert ensure_master_key(tmp_path / "d", env={}) == first
    assert stat.S_IMODE((tmp_path / "d" / "master.key").stat().st_mode) == 0o600


# -- the vault -----------------------------------------------------------------------------


def test_round_trip_and_repr(store: StateStore, vault: Vault, state_location: Path | str) -> None:
    secret = vault.set("orders", f"postgresql://app:{PASSWORD}@db:5433/orders?sslmode=require")
    assert secret == DatabaseSecret(
        alias="orders",
        host="db",
        port=5433,
        dbname="orders",
        user="app",
        password=PASSWORD,
        sslmode="require",
        sslrootcert=None,
    )
    assert PASSWORD not in repr(secret) + str(secret) + secret.describe()
    assert vault.get("orders") == secret
    assert vault.get("missing") is None
    # A second process (another connection to the same file) sees it too.
    with StateStore.open(state_location) as other:
        assert Vault.open(other, KEY).get("orders") == secret
    vault.set("billing", f"host=db2 user=b password={PASSWORD}x")
    assert vault.list() == ["billing", "orders"] == list_aliases(store)
    assert [e.secret.alias for e in vault.entries()] == ["billing", "orders"]


def test_entries_written_before_channel_binding_read_as_prefer(
    store: StateStore, vault: Vault, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qmesh.pg import vault as vault_module

    with monkeypatch.context() as old_writer:
        old_fields = tuple(f for f in vault_module._FIELDS if f != "channel_binding")
        old_writer.setattr(vault_module, "_FIELDS", old_fields)
        vault.set("old", f"postgresql://app:{PASSWORD}@db/orders?sslmode=require")
    secret = Vault.open(store, KEY).get("old")
    assert secret is not None and secret.channel_binding == "prefer"
    strict = vault.set("new", f"host=db user=u password={PASSWORD} channel_binding=require")
    assert Vault.open(store, KEY).get("new") == strict
    assert strict.describe().endswith("sslmode=prefer channel_binding=require")


def test_secret_is_not_stored_in_clear(store: StateStore, vault: Vault) -> None:
    vault.set("orders", f"host=db.example user=zebulon password={PASSWORD}")
    raw = stored_bytes(store)
    assert b"orders" in raw  # the alias is in clear: the check can see the stored data
    for clear in (PASSWORD.encode(), b"zebulon", b"db.example"):  # all parts are sealed
        assert clear not in raw and clear.hex().encode() not in raw


def test_every_write_uses_a_fresh_nonce(store: StateStore, vault: Vault) -> None:
    nonces = set()
    for _ in range(5):
        vault.set("orders", f"host=db user=app password={PASSWORD}")
        with store._read() as conn:
            nonces.add(conn.execute("SELECT nonce FROM vault_secrets").fetchone()[0])
    assert len(nonces) == 5


def test_rotation_in_another_process_is_seen(
    store: StateStore, vault: Vault, state_location: Path | str
) -> None:
    vault.set("orders", f"host=db user=app password={PASSWORD}")
    with StateStore.open(state_location) as other:
        Vault.open(other, KEY).set("orders", "host=db user=app password=rotated")
    secret = vault.get("orders")
    assert secret is not None and secret.password == "rotated"


def test_wrong_master_key(store: StateStore, vault: Vault, tmp_path: Path) -> None:
    vault.set("orders", f"host=db user=app password={PASSWORD}")
    with pytest.raises(VaultError, match="wrong master key") as info:
        Vault.open(store, OTHER_KEY)
    assert vault.fingerprint in str(info.value)
    assert KEY.hex() not in str(info.value)
    with pytest.raises(VaultError, match="32 bytes"):
        Vault.open(store, b"short")
    # An empty vault accepts any key (nothing to compare with).
    with StateStore.open(tmp_path / "empty.db") as empty:
        Vault.open(empty, OTHER_KEY)


def test_a_row_sealed_with_another_key_is_reported(store: StateStore, vault: Vault) -> None:
    vault.set("orders", f"host=db user=app password={PASSWORD}")
    other = Vault(store, OTHER_KEY)  # bypasses open()'s check, as a mixed vault would
    other.set("billing", f"host=db user=app password={PASSWORD}")
    with pytest.raises(VaultError, match=r"'billing'.*wrong master key"):
        vault.get("billing")


def test_tampered_ciphertext_is_rejected(store: StateStore, vault: Vault) -> None:
    vault.set("orders", f"host=db user=app password={PASSWORD}")
    with store._write() as conn:
        (ciphertext,) = conn.execute("SELECT ciphertext FROM vault_secrets").fetchone()
        flipped = bytes([ciphertext[0] ^ 1]) + ciphertext[1:]
        conn.execute("UPDATE vault_secrets SET ciphertext = ?", (flipped,))
    with pytest.raises(VaultError, match="'orders' failed authentication"):
        vault.get("orders")


def test_ciphertexts_cannot_be_swapped_between_aliases(store: StateStore, vault: Vault) -> None:
    vault.set("orders", "host=db user=orders password=orders-pw")
    vault.set("billing", "host=db user=billing password=billing-pw")
    with store._write() as conn:
        rows = dict(
            (alias, (nonce, ct))
            for alias, nonce, ct in conn.execute(
                "SELECT alias, nonce, ciphertext FROM vault_secrets"
            )
        )
        for alias, other in (("orders", "billing"), ("billing", "orders")):
            conn.execute(
                "UPDATE vault_secrets SET nonce = ?, ciphertext = ? WHERE alias = ?",
                (*rows[other], alias),
            )
    for alias in ("orders", "billing"):
        with pytest.raises(VaultError, match="failed authentication"):
            vault.get(alias)


def test_delete_and_invalid_alias(store: StateStore, vault: Vault) -> None:
    vault.set("orders", f"host=db user=app password={PASSWORD}")
    assert vault.delete("orders") is True
    assert vault.delete("orders") is False
    assert vault.get("orders") is None
    vault.set("orders", f"host=db user=app password={PASSWORD}")
    assert delete_secret(store, "orders") is True  # without the key
    with pytest.raises(VaultError, match="alias must be"):
        vault.set("bad alias", f"host=db user=app password={PASSWORD}")


def test_rotation_slot_is_a_lock(vault: Vault) -> None:
    vault.set("orders", f"host=db user=app password={PASSWORD}")
    current, interrupted = vault.begin_rotation("orders", "new-pw", stale_after_s=300)
    assert current.password == PASSWORD and interrupted is None
    pending = vault.get_pending("orders")
    assert pending is not None and pending.password == "new-pw"
    assert vault.get("orders") == current  # the current secret is unchanged meanwhile
    with pytest.raises(VaultError, match="another rotation"):
        vault.begin_rotation("orders", "other-pw", stale_after_s=300)
    # A stale lease hands the interrupted secret to the next rotation.
    again, interrupted = vault.begin_rotation("orders", "other-pw", stale_after_s=0)
    assert again == current and interrupted == pending
    assert vault.finish_rotation("orders", promote=True) is True
    promoted = vault.get("orders")
    assert promoted is not None and promoted.password == "new-pw"
    assert vault.get_pending("orders") is None
    assert vault.finish_rotation("orders", promote=True) is False
    with pytest.raises(VaultError, match="no secret"):
        vault.begin_rotation("missing", "x", stale_after_s=300)
