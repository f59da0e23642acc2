"""The ``[daemon]`` settings and the Gate's daemon thresholds: values, defaults
and errors that name the file, the line and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from qmesh.config import Config, ConfigError, DaemonRuntimeConfig, load_config, parse_size


def load(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> Config:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return load_config(path, env={"HOME": str(tmp_path), **(env or {})})


def test_defaults(tmp_path: Path) -> None:
    config = load(tmp_path, "")
    daemon = config.daemon
    assert (daemon.heartbeat_interval_s, daemon.queue_limit, daemon.parallel) == (5.0, 4, 1)
    assert daemon.memory_budget is None and daemon.model_dirs == () and daemon.llama_cpp
    assert (config.gate.daemon_stale_after_missed, config.gate.daemon_gone_after_missed) == (3, 12)


def test_values(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        "[gate]\ndaemon_stale_after_missed = 2\ndaemon_gone_after_missed = 6\n"
        "[daemon]\n"
        'model_dirs = ["models", "~/more"]\n'
        'memory_budget = "8GiB"\nqueue_limit = 2\nthreads = 4\ngpu_layers = -1\n'
        "heartbeat_interval_s = 0.5\ncontext_length = 8192\nllama_cpp = false\n"
        '[[daemon.runtime]]\nkind = "ollama"\nurl = "http://gpu-box:11434/"\nkeep_alive = "1h"\n'
        '[[daemon.runtime]]\nkind = "openai"\nurl = "http://vllm:8000"\nname = "vllm"\n'
        'api_key_env = "VLLM_KEY"\n',
    )
    daemon = config.daemon
    assert daemon.model_dirs == (tmp_path / "models", tmp_path / "more")
    assert daemon.memory_budget == 8 * 2**30
    assert (daemon.queue_limit, daemon.threads, daemon.gpu_layers) == (2, 4, -1)
    assert daemon.runtimes == (
        DaemonRuntimeConfig("ollama", "http://gpu-box:11434", "ollama@gpu-box:11434", "1h"),
        DaemonRuntimeConfig("openai", "http://vllm:8000", "vllm", "10m", "VLLM_KEY"),
    )
    assert config.gate.daemon_gone_after_missed == 6
    env = load(tmp_path, "", env={"QMESH_DAEMON__MEMORY_BUDGET": "512MB"})
    assert env.daemon.memory_budget == 512_000_000


ERRORS = [
    ('[daemon]\nmemory_budget = "lots"\n', "config.toml:2: daemon.memory_budget: expected a size"),
    ("[daemon]\n\nqueue_limit = 0\n", "config.toml:3: daemon.queue_limit: expected an integer"),
    ("[daemon]\nmodel_dirs = [3]\n", "config.toml:2: daemon.model_dirs[0]: expected a directory"),
    ("[daemon]\nheartbeat_interval_s = 0\n", "daemon.heartbeat_interval_s: expected a number"),
    (
        '[[daemon.runtime]]\nkind = "tgi"\nurl = "http://x:1"\n',
        'config.toml:2: daemon.runtime[0].kind: expected one of "ollama", "openai"',
    ),
    (
        '[[daemon.runtime]]\nkind = "ollama"\nurl = "https://x"\n',
        "config.toml:3: daemon.runtime[0].url: expected an http://host:port URL",
    ),
    ('[[daemon.runtime]]\nkind = "ollama"\n', "daemon.runtime[0]: missing key 'url'"),
    ("[daemon]\nheartbeat = 1\n", "unknown key; did you mean 'heartbeat_interval_s'?"),
    (
        "[gate]\ndaemon_gone_after_missed = 2\n",
        "config.toml:2: gate.daemon_gone_after_missed: must be more than gate.daemon_stale",
    ),
]


@pytest.mark.parametrize(("text", "message"), ERRORS)
def test_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load(tmp_path, text)
    assert message in str(error.value)


def test_parse_size() -> None:
    assert parse_size("600MB") == 600_000_000
    assert parse_size("1.5GiB") == 1_610_612_736
    assert parse_size("2048") == 2048 and parse_size("4k") == 4000
    for bad in ("", "GiB", "-1MB", "1 parsec"):
        with pytest.raises(ValueError):
            parse_size(bad)
