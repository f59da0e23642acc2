"""qmesh.identity and the ``qmesh`` command line: the Gate's key, credentials,
enrolment, revocation and apps, run as real subprocesses on real files."""

from __future__ import annotations

import base64
import json
import logging
import os
import stat
import subprocess
import sys
import types
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from qmesh import cli
from qmesh.config import Config
from qmesh.identity import (
    Credential,
    CredentialError,
    GateKeyError,
    GateKeyMissing,
    GateKeys,
    enroll,
    load_credential,
)
from qmesh.state import IdentityExists, StateStore

REPO = Path(__file__).resolve().parent.parent


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def encodings(secret: bytes) -> list[str]:
    """Ways a key could show up in printed output."""
    return [
        secret.hex(),
        base64.b64encode(secret).decode().rstrip("="),
        base64.urlsafe_b64encode(secret).decode().rstrip("="),
    ]


# -- GateKeys ------------------------------------------------------------------------


def test_create_writes_a_private_key_file(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    keys = GateKeys.create(data_dir)
    path = data_dir / "gate.key"
    assert mode(data_dir) == 0o700
    assert mode(path) == 0o600
    assert path.read_bytes() == keys.private_key
    assert len(keys.public_key) == 32 and keys.public_key != keys.private_key
    assert GateKeys.load(data_dir) == keys


def test_repr_never_shows_the_private_key(tmp_path: Path) -> None:
    keys = GateKeys.create(tmp_path)
    text = repr(keys) + str(keys)
    for form in [*encodings(keys.private_key), repr(keys.private_key)]:
        assert form not in text
    assert base64.urlsafe_b64encode(keys.public_key).decode().rstrip("=") in text


def test_create_refuses_to_replace_without_force(tmp_path: Path) -> None:
    first = GateKeys.create(tmp_path)
    with pytest.raises(GateKeyError, match="--force"):
        GateKeys.create(tmp_path)
    assert GateKeys.load(tmp_path) == first
    second = GateKeys.create(tmp_path, force=True)
    assert second != first
    assert GateKeys.load(tmp_path) == second
    assert mode(tmp_path / "gate.key") == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gate.key"]  # no temp file left


def test_load_or_create(tmp_path: Path) -> None:
    keys, created = GateKeys.load_or_create(tmp_path / "d")
    assert created
    again, created_again = GateKeys.load_or_create(tmp_path / "d")
    assert (again, created_again) == (keys, False)


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(GateKeyMissing, match="qmesh keys init"):
        GateKeys.load(tmp_path)
    (tmp_path / "gate.key").write_bytes(b"\x00" * 31)
    with pytest.raises(GateKeyError, match="32 raw bytes"):
        GateKeys.load(tmp_path)


def test_the_gate_key_from_the_environment(tmp_path: Path) -> None:
    """The Gates of a cluster share one key: ``QMESH_GATE_KEY`` (as
    ``base64 -w0 gate.key`` prints it) stands for the file."""
    keys = GateKeys.create(tmp_path / "first")
    exported = base64.b64encode((tmp_path / "first" / "gate.key").read_bytes()).decode()
    assert GateKeys.load(tmp_path / "nowhere", env={"QMESH_GATE_KEY": exported}) == keys
    for bad in ("not base64!", base64.b64encode(b"short").decode()):
        with pytest.raises(GateKeyError, match="QMESH_GATE_KEY is not the base64 of 32") as info:
            GateKeys.load(tmp_path, env={"QMESH_GATE_KEY": bad})
        assert bad not in str(info.value)


def test_load_warns_about_a_readable_key(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    GateKeys.create(tmp_path)
    (tmp_path / "gate.key").chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="qmesh.identity"):
        GateKeys.load(tmp_path)
    assert "chmod 600" in caplog.text


# -- credentials ---------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StateStore]:
    with StateStore.open(tmp_path / "state.db") as s:
        yield s


def test_enroll_stores_only_the_public_key(tmp_path: Path, store: StateStore) -> None:
    keys = GateKeys.create(tmp_path / "d")
    credential = enroll(store, keys, "minigate", "web-1", "gate.example:11439")
    assert credential.gate_public_key == keys.public_key
    identity = store.find_identity_by_key(credential.public_key)
    assert identity is not None and (identity.name, identity.role) == ("web-1", "minigate")
    raw = (tmp_path / "state.db").read_bytes() + (tmp_path / "state.db-wal").read_bytes()
    assert credential.private_key not in raw
    with pytest.raises(IdentityExists):
        enroll(store, keys, "daemon", "web-1", "gate.example:11439")


@pytest.mark.parametrize("address", ["gate.example", "gate:0", "gate:99999"])
def test_enroll_rejects_an_undialable_gate(tmp_path: Path, store: StateStore, address: str) -> None:
    keys = GateKeys.create(tmp_path / "d")
    with pytest.raises(CredentialError, match="gate address"):
        enroll(store, keys, "minigate", "web-1", address)
    assert store.list_identities() == []


def test_credential_round_trip_and_repr(tmp_path: Path, store: StateStore) -> None:
    keys = GateKeys.create(tmp_path / "d")
    credential = enroll(store, keys, "daemon", "gpu-1", "[::1]:11439")
    text = credential.encode()
    assert text.startswith("qmesh-cred-v1.")
    assert "=" not in text and "+" not in text and "/" not in text
    assert Credential.decode("  " + text + "\n") == credential
    for form in encodings(credential.private_key):
        assert form not in repr(credential)


def test_decode_errors_never_echo_the_input() -> None:
    good = Credential(
        name="web-1",
        role="minigate",
        private_key=b"\x01" * 32,
        gate_public_key=b"\x02" * 32,
        gate_address="g:1",
    ).encode()
    body = good[len("qmesh-cred-v1.") :]

    def json_cred(obj: object) -> str:
        raw = json.dumps(obj).encode()
        return "qmesh-cred-v1." + base64.urlsafe_b64encode(raw).decode().rstrip("=")

    fields = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    bad_inputs = {
        "SECRETSECRETSECRET": "not a qmesh credential",
        "qmesh-cred-v2.SECRETSECRET": "unsupported credential version",
        "qmesh-cred-v1.SECRET!SECRET": "corrupted",
        good[:-10]: "corrupted",
        json_cred(["SECRET"]): "not an object",
        json_cred({**fields, "key": "SECRETSECRET"}): "wrong length",
        json_cred({**fields, "role": "SECRET"}): "role",
        json_cred({**fields, "name": "SECRET SECRET"}): "name",
        json_cred({**fields, "gate": "SECRET"}): "gate address",
        json_cred({k: v for k, v in fields.items() if k != "gate_key"}): "'gate_key'",
    }
    for text, expected in bad_inputs.items():
        with pytest.raises(CredentialError) as info:
            Credential.decode(text)
        message = str(info.value)
        assert expected in message, text
        assert "SECRET" not in message
        assert body[:12] not in message
        assert info.value.__cause__ is None


def test_load_credential(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    credential = Credential(
        name="web-1",
        role="minigate",
        private_key=b"\x01" * 32,
        gate_public_key=b"\x02" * 32,
        gate_address="g:1",
    )
    path = tmp_path / "web-1.cred"
    path.write_text(credential.encode() + "\n")
    path.chmod(0o600)
    with caplog.at_level(logging.WARNING, logger="qmesh.identity"):
        assert load_credential(path) == credential
    assert caplog.text == ""
    path.chmod(0o640)
    with caplog.at_level(logging.WARNING, logger="qmesh.identity"):
        assert load_credential(path) == credential
    assert "can be read by other users" in caplog.text
    with pytest.raises(CredentialError, match="does not exist"):
        load_credential(tmp_path / "missing.cred")
    path.write_text("garbage")
    with pytest.raises(CredentialError, match=str(path)):
        load_credential(path)


# -- the command line, as a subprocess ----------------------------------------------------


def qmesh(
    *args: str, tmp_path: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("QMESH_")}
    clean["HOME"] = str(tmp_path / "home")  # never touch the real ~/.qmesh
    clean["PYTHONPATH"] = str(REPO)
    clean.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "qmesh", *args],
        capture_output=True,
        text=True,
        env=clean,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )


def test_keys_init_then_enroll(tmp_path: Path) -> None:
    data = tmp_path / "data"
    init = qmesh("--data-dir", str(data), "keys", "init", tmp_path=tmp_path)
    assert init.returncode == 0, init.stderr
    keys = GateKeys.load(data)
    assert init.stdout.strip() == base64.b64encode(keys.public_key).decode()
    assert mode(data / "gate.key") == 0o600
    for form in encodings(keys.private_key):
        assert form not in init.stdout + init.stderr

    # Options may also come after the command.
    enrolled = qmesh("enroll", "minigate", "web-1", "--data-dir", str(data), tmp_path=tmp_path)
    assert enrolled.returncode == 0, enrolled.stderr
    credential = Credential.decode(enrolled.stdout)
    assert (credential.name, credential.role) == ("web-1", "minigate")
    assert credential.gate_address == "127.0.0.1:11439"  # gate.tunnel_listen
    assert credential.gate_public_key == keys.public_key
    assert "shown only once" in enrolled.stderr
    assert mode(data / "state.db") == 0o600
    with StateStore.open(data / "state.db") as store:
        identity = store.find_identity_by_key(credential.public_key)
    assert identity is not None and identity.name == "web-1" and not identity.revoked

    again = qmesh("--data-dir", str(data), "keys", "init", tmp_path=tmp_path)
    assert again.returncode == 2
    assert "--force" in again.stderr
    assert GateKeys.load(data) == keys


def test_enroll_to_a_file_with_gate_from_config(tmp_path: Path) -> None:
    config = tmp_path / "gate.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n[gate]\ntunnel_listen = "0.0.0.0:9000"\n')
    assert qmesh("--config", str(config), "keys", "init", tmp_path=tmp_path).returncode == 0

    wildcard = qmesh("--config", str(config), "enroll", "daemon", "gpu-1", tmp_path=tmp_path)
    assert wildcard.returncode == 2
    assert "--gate" in wildcard.stderr

    out = tmp_path / "gpu-1.cred"
    result = qmesh(
        "--config", str(config), "enroll", "daemon", "gpu-1",
        "--gate", "gate.example:9000", "--out", str(out),
        tmp_path=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    assert "qmesh-cred" not in result.stdout + result.stderr
    assert mode(out) == 0o600
    credential = load_credential(out)
    assert (credential.role, credential.gate_address) == ("daemon", "gate.example:9000")

    exists = qmesh(
        "--config", str(config), "enroll", "daemon", "gpu-2", "--gate", "g:1", "--out", str(out),
        tmp_path=tmp_path,
    )  # fmt: skip
    assert exists.returncode == 2 and "already exists" in exists.stderr
    assert load_credential(out) == credential


def test_enroll_without_keys_explains_what_to_do(tmp_path: Path) -> None:
    result = qmesh("--data-dir", str(tmp_path / "d"), "enroll", "minigate", "x", tmp_path=tmp_path)
    assert result.returncode == 2
    assert "qmesh keys init" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_duplicate_name_and_bad_name(tmp_path: Path) -> None:
    data = str(tmp_path / "d")
    assert qmesh("--data-dir", data, "keys", "init", tmp_path=tmp_path).returncode == 0
    assert (
        qmesh("--data-dir", data, "enroll", "minigate", "web-1", tmp_path=tmp_path).returncode == 0
    )
    duplicate = qmesh("--data-dir", data, "enroll", "daemon", "web-1", tmp_path=tmp_path)
    assert duplicate.returncode == 2
    assert "'web-1' already exists" in duplicate.stderr
    assert "Traceback" not in duplicate.stderr and duplicate.stdout == ""
    bad = qmesh("--data-dir", data, "enroll", "daemon", "no spaces", tmp_path=tmp_path)
    assert bad.returncode == 2 and "letters, digits" in bad.stderr


def test_revoke_and_list_identities(tmp_path: Path) -> None:
    data = str(tmp_path / "d")
    qmesh("--data-dir", data, "keys", "init", tmp_path=tmp_path)
    qmesh("--data-dir", data, "enroll", "minigate", "web-1", tmp_path=tmp_path)
    qmesh("--data-dir", data, "enroll", "daemon", "gpu-1", tmp_path=tmp_path)

    revoked = qmesh("--data-dir", data, "revoke", "web-1", tmp_path=tmp_path)
    assert revoked.returncode == 0 and "revoked web-1" in revoked.stdout
    with StateStore.open(Path(data) / "state.db") as store:
        web, gpu = store.get_identity("web-1"), store.get_identity("gpu-1")
    assert web is not None and web.revoked
    assert gpu is not None and not gpu.revoked

    twice = qmesh("--data-dir", data, "revoke", "web-1", tmp_path=tmp_path)
    assert twice.returncode == 0 and "already revoked" in twice.stdout
    unknown = qmesh("--data-dir", data, "revoke", "nobody", tmp_path=tmp_path)
    assert unknown.returncode == 2 and "no identity named 'nobody'" in unknown.stderr

    listed = qmesh("--data-dir", data, "identities", "--json", tmp_path=tmp_path)
    rows = json.loads(listed.stdout)
    assert [(r["name"], r["role"], r["revoked"]) for r in rows] == [
        ("gpu-1", "daemon", False),
        ("web-1", "minigate", True),
    ]
    assert base64.b64decode(rows[0]["public_key"]) == gpu.public_key
    table = qmesh("--data-dir", data, "identities", tmp_path=tmp_path).stdout
    assert "revoked" in table and "active" in table and "gpu-1" in table


def test_apps_add_and_list(tmp_path: Path) -> None:
    data = str(tmp_path / "d")
    added = qmesh("--data-dir", data, "apps", "add", "shop", tmp_path=tmp_path)
    assert added.returncode == 0, added.stderr
    app_key = added.stdout.strip()
    with StateStore.open(Path(data) / "state.db") as store:
        assert store.verify_app_key("shop", app_key)
    duplicate = qmesh("--data-dir", data, "apps", "add", "shop", tmp_path=tmp_path)
    assert duplicate.returncode == 2 and "already exists" in duplicate.stderr
    listed = qmesh("--data-dir", data, "apps", "list", "--json", tmp_path=tmp_path)
    assert [a["app_id"] for a in json.loads(listed.stdout)] == ["shop"]
    assert app_key not in listed.stdout


def test_config_errors_exit_2_with_the_line(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[gate]\n\ntunnel_listen = "11439"\n')
    result = qmesh("--config", str(config), "identities", tmp_path=tmp_path)
    assert result.returncode == 2
    assert f'{config}:3: gate.tunnel_listen: expected "host:port"' in result.stderr
    assert "Traceback" not in result.stderr
    env_error = qmesh(
        "identities", tmp_path=tmp_path, env={"QMESH_TUNNEL__COMPRESSION_LEVEL": "99"}
    )
    assert env_error.returncode == 2
    assert "QMESH_TUNNEL__COMPRESSION_LEVEL" in env_error.stderr


def test_help_describes_roles_and_commands(tmp_path: Path) -> None:
    result = qmesh("--help", tmp_path=tmp_path)
    assert result.returncode == 0
    for word in (
        "gate",
        "minigate",
        "daemon",
        "--role",
        "--config",
        "enroll",
        "keys",
        "revoke",
        "identities",
        "apps",
        "up",
        "version",
        "QMESH_",
    ):
        assert word in result.stdout, word  # fmt: skip
    nothing = qmesh(tmp_path=tmp_path)
    assert nothing.returncode == 2 and "--role" in nothing.stderr


def test_version(tmp_path: Path) -> None:
    result = qmesh("version", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "qmesh 0.1.0"
    # The Rust extension may not be built in this checkout; both are fine.
    assert lines[1].startswith("wire protocol ")
    try:
        from qmesh import _core
    except ImportError:
        assert "not built" in lines[1]
    else:
        assert lines[1] == f"wire protocol {_core.PROTOCOL_VERSION}"


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert qmesh("--role", "router", tmp_path=tmp_path).returncode == 2
    assert qmesh("keys", tmp_path=tmp_path).returncode == 2
    both = qmesh("--role", "gate", "identities", tmp_path=tmp_path)
    assert both.returncode == 2 and "cannot be combined" in both.stderr


# -- the command line, in-process, with stand-ins for the lead's modules --------------------


@pytest.fixture
def restore_logging() -> Iterator[None]:
    logger = logging.getLogger("qmesh")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]


def fake_module(monkeypatch: pytest.MonkeyPatch, name: str, **attrs: object) -> None:
    module = types.ModuleType(name)
    if name == "qmesh.cli.runner":  # keep the real supervision, fake only the roles
        from qmesh.cli import runner

        module.run_until_stopped = runner.run_until_stopped  # type: ignore[attr-defined]
        module.RoleFailed = runner.RoleFailed  # type: ignore[attr-defined]
    for key, value in attrs.items():
        setattr(module, key, value)
    monkeypatch.setitem(sys.modules, name, module)


@pytest.mark.usefixtures("restore_logging")
def test_roles_run_under_trio(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Config, Sequence[str]]] = []

    async def run_roles(config: Config, roles: Sequence[str]) -> None:
        import trio.lowlevel

        await trio.lowlevel.checkpoint()  # fails outside trio.run
        calls.append((config, roles))

    fake_module(monkeypatch, "qmesh.cli.runner", run_roles=run_roles)
    config = tmp_path / "c.toml"
    config.write_text('[gate]\nname = "g7"\n')
    monkeypatch.delenv("QMESH_DATA_DIR", raising=False)
    code = cli.main(
        ["--role", "gate", "--role", "minigate", "--role", "gate", "--config", str(config),
         "--data-dir", str(tmp_path / "d"), "--log-level", "debug", "--log-json"]
    )  # fmt: skip
    assert code == 0
    ((seen, roles),) = calls
    assert tuple(roles) == ("gate", "minigate")
    assert seen.gate.name == "g7"
    assert seen.data_dir == tmp_path / "d"
    assert (seen.log.level, seen.log.format) == ("debug", "json")


@pytest.mark.usefixtures("restore_logging")
def test_ctrl_c_exits_quietly(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def run_roles(config: Config, roles: Sequence[str]) -> None:
        raise KeyboardInterrupt

    fake_module(monkeypatch, "qmesh.cli.runner", run_roles=run_roles)
    assert cli.main(["--role", "daemon"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


@pytest.mark.usefixtures("restore_logging")
def test_up_is_handed_its_options(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Config, int, bool, bool, bool]] = []

    def up_main(
        config: Config, *, port_offset: int, ephemeral: bool, discover: bool, demo_db: bool
    ) -> int:
        calls.append((config, port_offset, ephemeral, discover, demo_db))
        return 3

    fake_module(monkeypatch, "qmesh.cli.up", main=up_main)
    assert cli.main(["up", "--port-offset", "100"]) == 3
    assert cli.main(["up", "--ephemeral", "--no-discovery", "--no-demo-db"]) == 3
    assert [call[1:] for call in calls] == [(100, False, True, True), (0, True, False, False)]
    assert cli.main(["up", "--ephemeral", "--port-offset", "1"]) == 2
