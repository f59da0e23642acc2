"""Per-app Postgres policy: ``[gate.apps.APP]`` in config.toml, validated with
file and line, and qmesh.pg.policy.policy_for."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from qmesh.config import Config, ConfigError, GateAppConfig, load_config
from qmesh.pg.policy import DENY_ALL, AppPolicy, policy_for


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def load_error(path: Path, env: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path, env=env or {})
    return info.value


def test_policies_from_toml(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [gate]
        name = "g1"
        master_key_file = "keys/master.key"

        [gate.apps.demo]
        databases = ["app*", "reports"]
        read_only = true
        statement_timeout_ms = 5000
        max_sessions = 20
        audit_statements = "hash"

        [gate.apps.etl]
        databases = ["*"]
        """,
    )
    config = load_config(path, env={})
    assert config.gate.master_key_file == tmp_path / "keys" / "master.key"
    assert config.gate.apps["demo"] == GateAppConfig(
        databases=("app*", "reports"),
        read_only=True,
        statement_timeout_ms=5000,
        max_sessions=20,
        audit_statements="hash",
    )
    demo = policy_for(config, "demo")
    assert demo == AppPolicy(
        aliases=("app*", "reports"),
        read_only=True,
        statement_timeout_ms=5000,
        max_sessions=20,
        audit_statements="hash",
    )
    assert demo.allows("app_orders") and demo.allows("reports")
    assert not demo.allows("reports2") and not demo.allows("App1")  # case-sensitive
    etl = policy_for(config, "etl")
    assert etl.allows("anything") and not etl.read_only
    assert (etl.statement_timeout_ms, etl.max_sessions, etl.audit_statements) == (
        None,
        None,
        "text",
    )
    with pytest.raises(TypeError):
        config.gate.apps["x"] = GateAppConfig()  # type: ignore[index]


def test_unlisted_apps_are_denied_everything(tmp_path: Path) -> None:
    config = Config(data_dir=tmp_path)
    assert config.gate.apps == {}
    policy = policy_for(config, "stranger")
    assert policy is DENY_ALL
    assert not policy.allows("postgres") and not policy.allows("")


def test_policy_from_the_environment(tmp_path: Path) -> None:
    env = {
        "QMESH_GATE__APPS__DEMO__DATABASES": '["app1"]',
        "QMESH_GATE__APPS__DEMO__READ_ONLY": "true",
    }
    config = load_config(None, env=env)
    assert policy_for(config, "demo").allows("app1")
    assert policy_for(config, "demo").read_only
    err = load_error(write(tmp_path, "[gate]\n"), env={"QMESH_GATE__APPS__DEMO__MAX_SESSIONS": "0"})
    assert err.origin == "environment variable QMESH_GATE__APPS__DEMO__MAX_SESSIONS"
    assert err.key == "gate.apps.demo.max_sessions"


@pytest.mark.parametrize(
    ("body", "line", "key", "problem"),
    [
        ('audit_statements = "sha"', 4, "gate.apps.demo.audit_statements", 'one of "text"'),
        ("read_only = 1", 4, "gate.apps.demo.read_only", "expected true or false"),
        ("statement_timeout_ms = 0", 4, "gate.apps.demo.statement_timeout_ms", "from 1 to"),
        ("statement_timeout_ms = 1.5", 4, "gate.apps.demo.statement_timeout_ms", "integer"),
        ("max_sessions = -2", 4, "gate.apps.demo.max_sessions", "from 1 to"),
        ('databases = "app*"', 4, "gate.apps.demo.databases", "expected an array"),
        ('databases = ["ok", "a b"]', 4, "gate.apps.demo.databases[1]", "without spaces"),
        ('databases = ["ok", 3]', 4, "gate.apps.demo.databases[1]", "integer 3"),
        ("raed_only = true", 4, "gate.apps.demo.raed_only", "did you mean 'read_only'?"),
    ],
)
def test_policy_errors_name_key_and_line(
    tmp_path: Path, body: str, line: int, key: str, problem: str
) -> None:
    path = write(tmp_path, f'[gate]\nname = "g"\n[gate.apps.demo]\n{body}\n')
    err = load_error(path)
    assert (err.origin, err.line, err.key) == (str(path), line, key)
    assert problem in err.problem
    assert str(err).startswith(f"{path}:{line}: {key}: ")


def test_bad_app_id_and_shape(tmp_path: Path) -> None:
    err = load_error(write(tmp_path, '[gate.apps."bad id"]\nread_only = true\n'))
    assert (err.line, err.key) == (1, 'gate.apps."bad id"')
    assert "app id" in err.problem
    err = load_error(write(tmp_path, "[gate]\napps = 3\n"))
    assert (err.line, err.key) == (2, "gate.apps")
    err = load_error(write(tmp_path, "[gate.apps]\ndemo = true\n"))
    assert (err.line, err.key, err.problem) == (
        2,
        "gate.apps.demo",
        "expected a table, got boolean true",
    )
