"""Per-app Postgres policy: ``[gate.apps.APP]`` in config.toml, validated with
file and line, qmesh.pg.policy.policy_for and the policy's JSON form in the
state; and ``[gate.pg_pool]``, the Gate's settings for pooled server
connections."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from qmesh.config import Config, ConfigError, GateAppConfig, PgPoolConfig, load_config
from qmesh.pg.policy import DENY_ALL, AppPolicy, policy_for, policy_from_json, policy_to_json
from qmesh.state import InvalidValue


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
        ('pool_mode = "statement"', 4, "gate.apps.demo.pool_mode", 'one of "session"'),
        ("pool_mode = 1", 4, "gate.apps.demo.pool_mode", "expected a string"),
        ("pool_size = 0", 4, "gate.apps.demo.pool_size", "from 1 to 10000, got 0"),
        ("pool_size = 10001", 4, "gate.apps.demo.pool_size", "from 1 to 10000"),
        ('pool_size = "5"', 4, "gate.apps.demo.pool_size", "expected an integer"),
        ("pool_wait_ms = 0", 4, "gate.apps.demo.pool_wait_ms", "from 1 to 3600000"),
        ("pool_wait_ms = 3600001", 4, "gate.apps.demo.pool_wait_ms", "from 1 to 3600000"),
        ("pool_wait_ms = 1.5", 4, "gate.apps.demo.pool_wait_ms", "expected an integer"),
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


def test_pool_settings_of_an_app(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [gate.apps.demo]
        databases = ["app*"]
        pool_mode = "transaction"
        pool_size = 5
        pool_wait_ms = 250

        [gate.apps.etl]
        databases = ["*"]
        """,
    )
    config = load_config(path, env={})
    demo = config.gate.apps["demo"]
    assert (demo.pool_mode, demo.pool_size, demo.pool_wait_ms) == ("transaction", 5, 250)
    policy = policy_for(config, "demo")
    assert (policy.pool_mode, policy.pool_size, policy.pool_wait_ms) == ("transaction", 5, 250)
    etl = policy_for(config, "etl")
    assert (etl.pool_mode, etl.pool_size, etl.pool_wait_ms) == ("session", 20, 30000)
    assert (DENY_ALL.pool_mode, DENY_ALL.max_sessions, DENY_ALL.aliases) == ("session", 0, ())
    env = {"QMESH_GATE__APPS__DEMO__POOL_MODE": "transaction",
           "QMESH_GATE__APPS__DEMO__POOL_SIZE": "3"}  # fmt: skip
    from_env = policy_for(load_config(None, env=env), "demo")
    assert (from_env.pool_mode, from_env.pool_size) == ("transaction", 3)


def test_pool_settings_round_trip_through_the_state() -> None:
    app = GateAppConfig(
        databases=("orders",), pool_mode="transaction", pool_size=10_000, pool_wait_ms=3_600_000
    )
    text = policy_to_json(app)
    assert json.loads(text)["pool_mode"] == "transaction"
    assert policy_from_json(text) == app
    assert policy_from_json(policy_to_json(GateAppConfig())) == GateAppConfig()
    low = GateAppConfig(pool_size=1, pool_wait_ms=1)
    assert policy_from_json(policy_to_json(low)) == low
    # Stored before pooling existed: the defaults.
    old = policy_from_json('{"databases": ["orders"], "audit_statements": "hash"}')
    assert (old.pool_mode, old.pool_size, old.pool_wait_ms) == ("session", 20, 30000)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"pool_mode": "statement"}, "pool_mode must be one of session, transaction"),
        ({"pool_mode": None}, "pool_mode must be one of"),
        ({"pool_size": 0}, "pool_size must be an integer from 1 to 10000"),
        ({"pool_size": 10_001}, "pool_size must be an integer from 1 to 10000"),
        ({"pool_size": True}, "pool_size must be an integer"),
        ({"pool_size": None}, "pool_size must be an integer"),
        ({"pool_wait_ms": 0}, "pool_wait_ms must be an integer from 1 to 3600000"),
        ({"pool_wait_ms": 3_600_001}, "pool_wait_ms must be an integer from 1 to 3600000"),
        ({"pool_wait_ms": 2.5}, "pool_wait_ms must be an integer"),
        ({"pool_sizes": 5}, "unknown policy field(s): pool_sizes"),
    ],
)
def test_bad_pool_settings_in_the_state(fields: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidValue) as info:
        policy_from_json(json.dumps({"databases": ["orders"], **fields}))
    assert message in str(info.value)


def test_pg_pool_section(tmp_path: Path) -> None:
    assert load_config(None, env={}).gate.pg_pool == PgPoolConfig()
    assert PgPoolConfig() == PgPoolConfig(
        server_lifetime_s=3600.0,
        server_idle_timeout_s=600.0,
        server_check_delay_s=30.0,
        max_server_connections_per_alias=0,
        max_prepared_per_server=1000,
    )
    path = write(
        tmp_path,
        """
        [gate.pg_pool]
        server_lifetime_s = 1800
        server_idle_timeout_s = 60.5
        server_check_delay_s = 5
        max_server_connections_per_alias = 90
        max_prepared_per_server = 200
        """,
    )
    pool = load_config(path, env={}).gate.pg_pool
    assert pool == PgPoolConfig(
        server_lifetime_s=1800.0,
        server_idle_timeout_s=60.5,
        server_check_delay_s=5.0,
        max_server_connections_per_alias=90,
        max_prepared_per_server=200,
    )
    assert isinstance(pool.server_lifetime_s, float)
    env = {"QMESH_GATE__PG_POOL__SERVER_IDLE_TIMEOUT_S": "300"}
    assert load_config(None, env=env).gate.pg_pool.server_idle_timeout_s == 300.0


@pytest.mark.parametrize(
    ("body", "key", "problem"),
    [
        ("server_lifetime_s = 0", "server_lifetime_s", "expected a number greater than 0, got 0"),
        ("server_idle_timeout_s = -1", "server_idle_timeout_s", "greater than 0"),
        ('server_check_delay_s = "30s"', "server_check_delay_s", "expected a number"),
        ("max_server_connections_per_alias = -1", "max_server_connections_per_alias",
         "of at least 0"),
        ("max_prepared_per_server = 0", "max_prepared_per_server", "of at least 1"),
        ("max_prepared_per_server = 2.5", "max_prepared_per_server", "expected an integer"),
        ("server_lifetime = 60", "server_lifetime", "did you mean 'server_lifetime_s'?"),
        ("pool_size = 10", "pool_size", "unknown key"),
    ],
)  # fmt: skip
def test_pg_pool_errors_name_key_and_line(
    tmp_path: Path, body: str, key: str, problem: str
) -> None:
    path = write(tmp_path, f'[gate]\nname = "g"\n[gate.pg_pool]\n{body}\n')
    err = load_error(path)
    assert (err.origin, err.line, err.key) == (str(path), 4, f"gate.pg_pool.{key}")
    assert problem in err.problem
    err = load_error(write(tmp_path, "[gate]\npg_pool = 3\n"))
    assert (err.line, err.key) == (2, "gate.pg_pool")
