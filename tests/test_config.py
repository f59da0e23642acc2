"""qmesh.config: defaults, validation errors with key and line, environment
overrides, and the port offset / ephemeral copies used by ``qmesh up``."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qmesh.config import (
    Config,
    ConfigError,
    ForwardConfig,
    format_hostport,
    forward_allowed,
    load_config,
    parse_hostport,
)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def load_error(path: Path | None, env: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path, env=env or {})
    return info.value


# -- defaults and a full file -------------------------------------------------------


def test_defaults_without_a_file(tmp_path: Path) -> None:
    config = load_config(None, env={"HOME": str(tmp_path)})
    assert config.data_dir == tmp_path / ".qmesh"
    assert config.state_db_path == tmp_path / ".qmesh" / "state.db"
    assert (config.log.level, config.log.format) == ("info", "text")
    t = config.tunnel
    assert (t.compression_level, t.max_frame_payload, t.stream_window, t.chunk_size) == (
        3,
        1048576,
        1048576,
        65536,
    )
    assert (t.heartbeat_interval_s, t.dead_after_s, t.resume_grace_s) == (5.0, 15.0, 60.0)
    assert (t.reconnect_initial_s, t.reconnect_max_s, t.handshake_timeout_s) == (0.05, 5.0, 10.0)
    g = config.gate
    assert (g.name, g.tunnel_listen, g.http_listen, g.forward_allow) == (
        "gate",
        "127.0.0.1:11439",
        "127.0.0.1:11480",
        (),
    )
    m = config.minigate
    assert (m.gate, m.credential_file, m.forwards) == ((), None, ())  # the credential's Gates
    assert (m.pg_listen, m.llm_listen) == ("127.0.0.1:11438", "127.0.0.1:11435")
    d = config.daemon
    assert (d.gate, d.credential_file, d.health_listen) == (
        (),
        None,
        "127.0.0.1:11450",
    )


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path)}
    assert load_config(write(tmp_path, ""), env=env) == load_config(None, env=env)


def test_full_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        data_dir = "state"

        [log]
        level = "debug"
        format = "json"

        [tunnel]
        compression_level = 19
        max_frame_payload = 65536
        chunk_size = 16384
        heartbeat_interval_s = 1
        dead_after_s = 2.5
        resume_grace_s = 0
        engine_poll_us = 200

        [gate]
        name = "gate-eu.1"
        tunnel_listen = "[::]:9000"
        forward_allow = ["db.internal:5432", "10.0.0.0/24:*", "[fd00::1]:80"]

        [gate.pg_audit]
        retention_days = 90

        [minigate]
        credential_file = "~/edge.cred"

        [[minigate.forward]]
        listen = "127.0.0.1:15432"
        target = "db.internal:5432"

        [[minigate.forward]]
        listen = "127.0.0.1:16379"
        target = "redis.cache:6379"

        [daemon]
        credential_file = "creds/daemon.cred"
        """,
    )
    config = load_config(path, env={"HOME": "/home/op"})
    assert config.data_dir == tmp_path / "state"  # relative to the file
    assert (config.log.level, config.log.format) == ("debug", "json")
    assert config.tunnel.compression_level == 19
    assert config.tunnel.heartbeat_interval_s == 1.0
    assert isinstance(config.tunnel.heartbeat_interval_s, float)
    assert config.tunnel.resume_grace_s == 0.0
    assert config.tunnel.engine_poll_us == 200
    assert config.gate.name == "gate-eu.1"
    assert config.gate.tunnel_listen == "[::]:9000"
    assert config.gate.forward_allow == ("db.internal:5432", "10.0.0.0/24:*", "[fd00::1]:80")
    assert config.gate.pg_audit.retention_days == 90.0
    assert config.minigate.credential_file == Path("/home/op/edge.cred")
    assert config.minigate.forwards == (
        ForwardConfig(listen="127.0.0.1:15432", target="db.internal:5432"),
        ForwardConfig(listen="127.0.0.1:16379", target="redis.cache:6379"),
    )
    assert config.daemon.credential_file == tmp_path / "creds" / "daemon.cred"


def test_small_max_frame_payload_shrinks_the_default_chunk(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "[tunnel]\nmax_frame_payload = 4096\n"), env={})
    assert config.tunnel.chunk_size == 4096


# -- validation errors: each names the key and its line -------------------------------

# (file text, dotted key, line, a fragment of the problem). Each file starts with
# comment lines so that the line numbers are not trivially 1.
INVALID = [
    ('[gate]\ntunnel_listen = "11439"', "gate.tunnel_listen", 3, 'expected "host:port"'),
    ('[gate]\nhttp_listen = "127.0.0.1:70000"', "gate.http_listen", 3, "0 to 65535"),
    ('[gate]\nhttp_listen = "::1:80"', "gate.http_listen", 3, "brackets"),
    ("[gate]\nhttp_listen = 11480", "gate.http_listen", 3, "expected a string"),
    ('[gate]\nname = ""', "gate.name", 3, "letters, digits"),
    ('[gate]\nforward_allow = "db:5432"', "gate.forward_allow", 3, "array"),
    ('[gate]\nforward_allow = ["db"]', "gate.forward_allow[0]", 3, "port"),
    ('[gate]\nforward_allow = ["db:1", 5]', "gate.forward_allow[1]", 3, "expected a string"),
    ("[tunnel]\ncompression_level = 0", "tunnel.compression_level", 3, "from 1 to 19"),
    ("[tunnel]\ncompression_level = 20", "tunnel.compression_level", 3, "from 1 to 19"),
    ('[tunnel]\ncompression_level = "3"', "tunnel.compression_level", 3, "integer"),
    ("[tunnel]\ncompression_level = true", "tunnel.compression_level", 3, "integer"),
    ("[tunnel]\ncompression_level = 3.5", "tunnel.compression_level", 3, "integer"),
    ("[tunnel]\nmax_frame_payload = 512", "tunnel.max_frame_payload", 3, "1024"),
    ("[tunnel]\nmax_frame_payload = 16777217", "tunnel.max_frame_payload", 3, "16777216"),
    ("[tunnel]\nstream_window = 65535", "tunnel.stream_window", 3, "at least 65536"),
    ("[tunnel]\nengine_poll_us = 1001", "tunnel.engine_poll_us", 3, "from 0 to 1000"),
    ("[gate.pg_audit]\nretention_days = -1", "gate.pg_audit.retention_days", 3, "at least 0"),
    (
        '[gate.pg_audit]\nretention_days = "30d"',
        "gate.pg_audit.retention_days",
        3,
        "expected a number of days",
    ),
    ("[gate.pg_audit]\nkeep_days = 3", "gate.pg_audit.keep_days", 3, "unknown"),
    ("[tunnel]\nengine_poll_us = -1", "tunnel.engine_poll_us", 3, "from 0 to 1000"),
    ("[tunnel]\nchunk_size = 1000", "tunnel.chunk_size", 3, "1024"),
    (
        "[tunnel]\nmax_frame_payload = 2048\nchunk_size = 4096",
        "tunnel.chunk_size",
        4,
        "max_frame_payload (2048)",
    ),
    ("[tunnel]\nheartbeat_interval_s = 0", "tunnel.heartbeat_interval_s", 3, "greater than 0"),
    ("[tunnel]\nheartbeat_interval_s = inf", "tunnel.heartbeat_interval_s", 3, "finite"),
    ("[tunnel]\ndead_after_s = 5", "tunnel.dead_after_s", 3, "greater than"),
    # Only the heartbeat was written, so it is the one blamed.
    ("[tunnel]\nheartbeat_interval_s = 20", "tunnel.heartbeat_interval_s", 3, "greater than"),
    ("[tunnel]\nresume_grace_s = -1", "tunnel.resume_grace_s", 3, "at least 0"),
    ("[tunnel]\nreconnect_initial_s = 0", "tunnel.reconnect_initial_s", 3, "greater than 0"),
    ("[tunnel]\nreconnect_max_s = 0.01", "tunnel.reconnect_max_s", 3, "at least"),
    ("[tunnel]\nhandshake_timeout_s = -2", "tunnel.handshake_timeout_s", 3, "greater than 0"),
    ('[tunnel]\nheartbeat_interval_s = "5s"', "tunnel.heartbeat_interval_s", 3, "number"),
    ('[log]\nlevel = "verbose"', "log.level", 3, 'one of "debug", "info"'),
    ('[log]\nformat = "xml"', "log.format", 3, '"text", "json"'),
    ("data_dir = 5", "data_dir", 2, "expected a string"),
    ('data_dir = ""', "data_dir", 2, "empty"),
    ("gate = 5", "gate", 2, "expected a table"),
    ('[minigate]\ncredential_file = ""', "minigate.credential_file", 3, "empty"),
    ('[minigate]\ngate = "gate.example"', "minigate.gate", 3, 'expected "host:port"'),
    ('[daemon]\nhealth_listen = "h:-1"', "daemon.health_listen", 3, "0 to 65535"),
    ('[daemon]\ngate = "h h:1"', "daemon.gate", 3, "host"),
    ("[daemon]\ngate = []", "daemon.gate", 3, 'at least one "host:port"'),
    ('[minigate]\ngate = ["g1:1", 5]', "minigate.gate[1]", 3, "expected a string"),
    ('[minigate]\ngate = "g1:1, g2"', "minigate.gate", 3, 'expected "host:port"'),
    (
        '[minigate]\npg_listen = "127.0.0.1:5"\nllm_listen = "127.0.0.1:5"',
        "minigate.llm_listen",
        4,
        "already used",
    ),
    # Keys written in other TOML forms are located too.
    ('gate.tunnel_listen = "x"', "gate.tunnel_listen", 2, 'expected "host:port"'),
    ('[gate]\n"tunnel_listen" = "x"', "gate.tunnel_listen", 3, 'expected "host:port"'),
    ('[ gate ]\n  tunnel_listen   =   "x"  # why', "gate.tunnel_listen", 3, "host:port"),
    ('[tunnel]\n\n\n[gate]\ntunnel_listen = "x"', "gate.tunnel_listen", 6, "host:port"),
    # An inline table: the line of the enclosing key.
    ('\n\ngate = { tunnel_listen = "x" }', "gate.tunnel_listen", 4, "host:port"),
]


@pytest.mark.parametrize(("text", "key", "line", "fragment"), INVALID)
def test_invalid_value_names_key_and_line(
    tmp_path: Path, text: str, key: str, line: int, fragment: str
) -> None:
    path = write(tmp_path, "# qmesh\n" + text + "\n")
    err = load_error(path)
    assert err.key == key
    assert err.line == line
    assert fragment in err.problem
    assert str(err).startswith(f"{path}:{line}: {key}: ")


def test_error_message_format_matches_the_documented_example(tmp_path: Path) -> None:
    path = write(tmp_path, '[gate]\n\ntunnel_listen = "11439"\n')
    assert (
        str(load_error(path)) == f'{path}:3: gate.tunnel_listen: expected "host:port", got "11439"'
    )


def test_array_of_tables_errors_point_at_the_right_element(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [[minigate.forward]]
        listen = "127.0.0.1:1"
        target = "a:1"

        [[minigate.forward]]
        listen = "127.0.0.1:2"
        target = "a:99999"
        """,
    )
    err = load_error(path)
    assert (err.key, err.line) == ("minigate.forward[1].target", 7)


def test_missing_forward_key_points_at_its_table_header(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [minigate]
        pg_listen = "127.0.0.1:5432"
        [[minigate.forward]]
        listen = "127.0.0.1:1"
        """,
    )
    err = load_error(path)
    assert (err.key, err.line) == ("minigate.forward[0]", 3)
    assert "missing key 'target'" in err.problem


def test_text_inside_multiline_values_is_not_taken_for_keys(tmp_path: Path) -> None:
    # A header and the key appear inside a multi-line string, a comment and a
    # multi-line array before the real key; the locator must report line 12.
    path = write(
        tmp_path,
        """
        [minigate]
        credential_file = '''
        [gate]
        tunnel_listen = "decoy"'''
        [gate]
        forward_allow = [
          "a:1", # tunnel_listen = "decoy"
          "[fd00::1]:2",
          "]:1",
        ]
        # tunnel_listen = "decoy"
        tunnel_listen = "bad"
        """,
    )
    err = load_error(path)
    assert (err.key, err.line) == ("gate.tunnel_listen", 12)


def test_unknown_key_suggests_the_closest(tmp_path: Path) -> None:
    path = write(tmp_path, '[gate]\nname = "g"\ntunel_listen = "127.0.0.1:1"\n')
    err = load_error(path)
    assert (err.key, err.line) == ("gate.tunel_listen", 3)
    assert "unknown key" in err.problem
    assert "did you mean 'tunnel_listen'?" in err.problem


def test_unknown_section_suggests_the_closest(tmp_path: Path) -> None:
    err = load_error(write(tmp_path, "# c\n[gaet]\nname = 'x'\n"))
    assert (err.key, err.line) == ("gaet", 2)
    assert "did you mean 'gate'?" in err.problem


def test_unknown_key_in_forward_table(tmp_path: Path) -> None:
    path = write(tmp_path, '[[minigate.forward]]\nlisten = "a:1"\ntarqet = "b:2"\n')
    err = load_error(path)
    assert (err.key, err.line) == ("minigate.forward[0].tarqet", 3)
    assert "did you mean 'target'?" in err.problem


def test_unknown_key_without_a_close_match_has_no_suggestion(tmp_path: Path) -> None:
    err = load_error(write(tmp_path, "[log]\nzzzzzz = 1\n"))
    assert err.key == "log.zzzzzz"
    assert err.problem == "unknown key"


def test_toml_syntax_error_keeps_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, "[gate]\nname = 'g'\n[tunnel\n")
    err = load_error(path)
    assert err.line == 3
    assert "invalid TOML" in err.problem
    assert "line 3, column" in err.problem
    assert str(err).startswith(f"{path}:3: invalid TOML")
    assert err.__cause__ is None and err.__suppress_context__


def test_toml_error_at_end_of_document(tmp_path: Path) -> None:
    err = load_error(write(tmp_path, "a = 1\nb =\n"))
    assert err.line == 2


def test_missing_file(tmp_path: Path) -> None:
    err = load_error(tmp_path / "nope.toml")
    assert err.origin == str(tmp_path / "nope.toml")
    assert "no such file" in str(err)


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(b"name = '\xff'\n")
    assert "UTF-8" in str(load_error(path))


# -- environment overrides -----------------------------------------------------------


def test_env_overrides_file_and_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, '[gate]\ntunnel_listen = "127.0.0.1:1"\nname = "from-file"\n')
    env = {
        "QMESH_GATE__TUNNEL_LISTEN": "127.0.0.1:9000",
        "QMESH_TUNNEL__HEARTBEAT_INTERVAL_S": "2",
        "QMESH_TUNNEL__COMPRESSION_LEVEL": "7",
        "QMESH_DATA_DIR": "/x",
        "QMESH_LOG__LEVEL": "debug",
        "QMESH_GATE__FORWARD_ALLOW": '["db:5432", "10.0.0.0/8:443"]',
        "QMESH_MINIGATE__FORWARD": '[{listen = "127.0.0.1:7", target = "t:8"}]',
        "PATH": "/bin",
    }
    config = load_config(path, env=env)
    assert config.gate.tunnel_listen == "127.0.0.1:9000"
    assert config.gate.name == "from-file"
    assert config.tunnel.heartbeat_interval_s == 2.0
    assert config.tunnel.compression_level == 7
    assert config.data_dir == Path("/x")
    assert config.log.level == "debug"
    assert config.gate.forward_allow == ("db:5432", "10.0.0.0/8:443")
    assert config.minigate.forwards == (ForwardConfig("127.0.0.1:7", "t:8"),)


def test_env_string_setting_keeps_the_exact_text() -> None:
    config = load_config(None, env={"QMESH_GATE__NAME": "123", "QMESH_DATA_DIR": "true"})
    assert config.gate.name == "123"
    assert config.data_dir == Path.cwd() / "true"


def test_unrelated_qmesh_variables_are_ignored() -> None:
    env = {"QMESH_TEST_PG_DSN": "postgresql://x", "QMESH_CONFIG": "/etc/q.toml"}
    assert load_config(None, env=env) == load_config(None, env={})


def test_bad_env_value_names_the_variable(tmp_path: Path) -> None:
    path = write(tmp_path, '[gate]\ntunnel_listen = "127.0.0.1:1"\n')
    err = load_error(path, {"QMESH_GATE__TUNNEL_LISTEN": "11439"})
    assert err.origin == "environment variable QMESH_GATE__TUNNEL_LISTEN"
    assert err.line is None
    assert str(err) == (
        "environment variable QMESH_GATE__TUNNEL_LISTEN: gate.tunnel_listen: "
        'expected "host:port", got "11439"'
    )


@pytest.mark.parametrize(
    ("name", "value", "key", "fragment"),
    [
        ("QMESH_TUNNEL__COMPRESSION_LEVEL", "high", "tunnel.compression_level", "integer"),
        ("QMESH_TUNNEL__DEAD_AFTER_S", "1", "tunnel.dead_after_s", "greater than"),
        ("QMESH_GATE__TUNEL_LISTEN", "a:1", "gate.tunel_listen", "did you mean 'tunnel_listen'"),
        ("QMESH_GAET__NAME", "x", "gaet", "did you mean 'gate'"),
        ("QMESH_LOG", "debug", "log", "expected a table"),
        ("QMESH_MINIGATE__FORWARD", '[{listen = "a:1"}]', "minigate.forward[0]", "target"),
    ],
)
def test_env_errors_name_the_variable(name: str, value: str, key: str, fragment: str) -> None:
    err = load_error(None, {name: value})
    assert err.origin == f"environment variable {name}"
    assert err.key == key
    assert fragment in err.problem


def test_malformed_env_name() -> None:
    err = load_error(None, {"QMESH_GATE____NAME": "x"})
    assert "QMESH_GATE____NAME" in str(err)


def test_file_error_under_an_env_override_blames_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "# c\ngate = 5\n")
    err = load_error(path, {"QMESH_GATE__NAME": "g"})
    assert (err.origin, err.line, err.key) == (str(path), 2, "gate")


# -- port offset and ephemeral ---------------------------------------------------------


def test_port_offset_moves_listeners_and_local_gate_addresses() -> None:
    base = load_config(
        None,
        env={
            "QMESH_MINIGATE__FORWARD": '[{listen = "127.0.0.1:15432", target = "db:5432"}]',
            "QMESH_MINIGATE__GATE": "127.0.0.1:11439, gate-2.example:11439",
            "QMESH_DAEMON__GATE": '["localhost:11439"]',
        },
    )
    moved = base.with_port_offset(100)
    assert moved.gate.tunnel_listen == "127.0.0.1:11539"
    assert moved.gate.http_listen == "127.0.0.1:11580"
    assert moved.minigate.pg_listen == "127.0.0.1:11538"
    assert moved.minigate.llm_listen == "127.0.0.1:11535"
    assert moved.minigate.forwards == (ForwardConfig("127.0.0.1:15532", "db:5432"),)
    assert moved.daemon.health_listen == "127.0.0.1:11550"
    # This Gate's address moves; another Gate's does not.
    assert moved.minigate.gate == ("127.0.0.1:11539", "gate-2.example:11439")
    assert moved.daemon.gate == ("localhost:11539",)
    assert load_config(None, env={}).minigate.gate == ()  # the credential's Gates
    assert moved.data_dir == base.data_dir and moved.tunnel == base.tunnel
    assert base.with_port_offset(0) is base
    assert base.with_port_offset(100).with_port_offset(-100) == base


def test_port_offset_leaves_remote_gates_and_port_zero_alone() -> None:
    config = load_config(
        None,
        env={
            "QMESH_GATE__TUNNEL_LISTEN": "0.0.0.0:11439",
            "QMESH_GATE__HTTP_LISTEN": "[::1]:0",
            "QMESH_MINIGATE__GATE": "gate.example.com:9999",
            "QMESH_DAEMON__GATE": "10.0.0.5:11439",
        },
    )
    moved = config.with_port_offset(10)
    assert moved.gate.tunnel_listen == "0.0.0.0:11449"
    assert moved.gate.http_listen == "[::1]:0"
    assert moved.minigate.gate == ("gate.example.com:9999",)  # another port: another gate
    assert moved.daemon.gate == ("10.0.0.5:11449",)  # the Gate listens on every interface


def test_port_offset_out_of_range() -> None:
    with pytest.raises(ConfigError) as info:
        Config().with_port_offset(60000)
    assert info.value.key == "gate.tunnel_listen"
    assert "outside 1..65535" in str(info.value)


def test_ephemeral_zeroes_every_listener() -> None:
    config = load_config(
        None,
        env={
            "QMESH_MINIGATE__FORWARD": '[{listen = "127.0.0.1:15432", target = "db:5432"}]',
            "QMESH_GATE__HTTP_LISTEN": "[::1]:8080",
            "QMESH_MINIGATE__GATE": "127.0.0.1:11439",
        },
    ).ephemeral()
    assert config.gate.tunnel_listen == "127.0.0.1:0"
    assert config.gate.http_listen == "[::1]:0"
    assert config.minigate.pg_listen == "127.0.0.1:0"
    assert config.minigate.llm_listen == "127.0.0.1:0"
    assert config.minigate.forwards == (ForwardConfig("127.0.0.1:0", "db:5432"),)
    assert config.daemon.health_listen == "127.0.0.1:0"
    assert config.minigate.gate == ("127.0.0.1:11439",)


# -- host:port and forward patterns ---------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:11439", ("127.0.0.1", 11439)),
        ("localhost:0", ("localhost", 0)),
        ("db.internal:65535", ("db.internal", 65535)),
        ("[::1]:80", ("::1", 80)),
        ("[fe80::1%eth0]:80", ("fe80::1%eth0", 80)),
    ],
)
def test_parse_hostport(text: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(text) == expected


@pytest.mark.parametrize(
    "text",
    ["11439", ":80", "host:", "host:65536", "host:-1", "host:８０", "::1:80", "[::1]80",
     "[::1", "[example.com]:80", "a b:1", "host:1:2"],
)  # fmt: skip
def test_parse_hostport_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_hostport(text)


@given(
    host=st.one_of(
        st.from_regex(r"[a-z0-9][a-z0-9.-]{0,20}", fullmatch=True),
        st.ip_addresses().map(str),
    ),
    port=st.integers(0, 65535),
)
def test_format_then_parse_round_trips(host: str, port: int) -> None:
    assert parse_hostport(format_hostport(host, port)) == (host, port)


def test_forward_allowed() -> None:
    # More cases, and the Gate's resolution of names: tests/test_forward.py.
    rules = ["db.internal:5432", "redis.cache:*", "10.0.0.0/24:80", "[fd00::1]:443"]
    assert forward_allowed(rules, "db.internal", 5432)
    assert forward_allowed(rules, "DB.Internal", 5432)
    assert not forward_allowed(rules, "db.internal", 5433)
    assert forward_allowed(rules, "redis.cache", 6379)
    assert not forward_allowed(rules, "redis.cache.evil.com", 6379)
    assert forward_allowed(rules, "10.0.0.7", 80)
    assert not forward_allowed(rules, "10.0.1.7", 80)
    assert not forward_allowed(rules, "10.0.0.7.evil.com", 80)
    assert forward_allowed(rules, "fd00::1", 443)
    assert not forward_allowed([], "db.internal", 5432)


def test_the_minigates_unix_socket_directory_and_mode(tmp_path: Path) -> None:
    assert load_config(None, env={}).minigate.pg_unix_socket_dir is None
    path = write(tmp_path, '[minigate]\npg_unix_socket_dir = "run"\npg_unix_socket_mode = 0o770\n')
    config = load_config(path, env={}).minigate
    assert config.pg_unix_socket_dir == tmp_path / "run"  # from the file's directory
    assert config.pg_unix_socket_mode == 0o770
    # As chmod takes it, in the file or the environment: octal digits.
    path = write(tmp_path, '[minigate]\npg_unix_socket_mode = "0700"\n')
    assert load_config(path, env={}).minigate.pg_unix_socket_mode == 0o700
    env = {"QMESH_MINIGATE__PG_UNIX_SOCKET_MODE": "770"}
    assert load_config(None, env=env).minigate.pg_unix_socket_mode == 0o770
    for bad, fragment in (('"0789"', "octal digits"), ('""', "octal digits"),
                          ("0o1777", "from \"0000\" to \"0777\""), ("true", "0777")):  # fmt: skip
        err = load_error(write(tmp_path, f"[minigate]\npg_unix_socket_mode = {bad}\n"))
        assert err.key == "minigate.pg_unix_socket_mode"
        assert fragment in err.problem, err.problem
