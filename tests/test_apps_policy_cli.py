"""``qmesh apps policy``: an app's Postgres rights, shown with their source,
changed into the state (which wins over ``[gate.apps.*]`` for the whole app)
and given back to the config, as an operator types it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qmesh.config import Config, GateAppConfig, GateConfig
from qmesh.pg.policy import PolicyBook
from qmesh.state import StateStore


def qmesh(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QMESH_")}
    return subprocess.run(
        [sys.executable, "-m", "qmesh", "--config", str(config), *args],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


@pytest.fixture
def config(tmp_path: Path) -> Path:
    file = tmp_path / "gate.toml"
    file.write_text(
        f'data_dir = "{tmp_path / "data"}"\n'
        '[gate.apps.shop]\ndatabases = ["orders"]\nstatement_timeout_ms = 5000\n'
    )
    for app in ("shop", "batch"):
        assert qmesh(file, "apps", "add", app).returncode == 0
    return file


def policy(config: Path, app: str, *args: str) -> dict[str, object]:
    result = qmesh(config, "apps", "policy", app, *args, "--json")
    assert result.returncode == 0, result.stderr
    data: dict[str, object] = json.loads(result.stdout)
    return data


def test_show_change_and_give_back(config: Path) -> None:
    shown = qmesh(config, "apps", "policy", "shop")
    assert shown.returncode == 0, shown.stderr
    assert "source                [gate.apps.shop] in this config" in shown.stdout
    assert "databases             orders" in shown.stdout
    assert "statement_timeout_ms  5000" in shown.stdout
    none = qmesh(config, "apps", "policy", "batch")
    assert "none: this app may open no database" in none.stdout

    # A change starts from the current policy and is stored in the state.
    changed = policy(config, "shop", "--databases", "orders, billing*", "--read-only",
                     "--max-sessions", "3", "--audit", "hash")  # fmt: skip
    assert changed == {
        "app_id": "shop",
        "source": "state",
        "policy": {
            "databases": ["orders", "billing*"],
            "read_only": True,
            "statement_timeout_ms": 5000,  # kept from the config's
            "max_sessions": 3,
            "audit_statements": "hash",
            "pool_mode": "session",
            "pool_size": 20,
            "pool_wait_ms": 30000,
            "llm": {},
        },
    }
    again = policy(config, "shop", "--statement-timeout-ms", "none", "--max-sessions", "none")
    assert again["policy"] == {**changed["policy"], "statement_timeout_ms": None,  # type: ignore[dict-item]
                               "max_sessions": None}  # fmt: skip
    assert policy(config, "batch", "--databases", "reports")["source"] == "state"

    back = policy(config, "shop", "--from-config")
    assert back["source"] == "config"
    assert back["policy"] == {
        "databases": ["orders"], "read_only": False, "statement_timeout_ms": 5000,
        "max_sessions": None, "audit_statements": "text", "pool_mode": "session",
        "pool_size": 20, "pool_wait_ms": 30000, "llm": {},
    }  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("nobody",), "no app with id 'nobody'"),
        (("shop", "--from-config", "--read-only"), "--from-config cannot be combined"),
        (("shop", "--max-sessions", "-1"), "expected a whole number or 'none', got '-1'"),
        (("shop", "--audit", "all"), "invalid choice: 'all'"),
        (("shop", "--read-only", "--read-write"), "not allowed with argument"),
        (("shop", "--pool-mode", "statement"), "invalid choice: 'statement'"),
        (("shop", "--pool-size", "0"), "--pool-size: expected a whole number from 1 to 10000"),
        (("shop", "--pool-size", "10001"), "expected a whole number from 1 to 10000"),
        (("shop", "--pool-wait-ms", "-5"), "expected a whole number from 1 to 3600000"),
        (("shop", "--pool-wait-ms", "3600001"), "from 1 to 3600000, got '3600001'"),
    ],
)
def test_mistakes_are_one_line(config: Path, args: tuple[str, ...], message: str) -> None:
    result = qmesh(config, "apps", "policy", *args)
    assert result.returncode == 2, result.stdout
    assert message in result.stderr and "Traceback" not in result.stderr
    assert policy(config, "shop")["source"] == "config"  # nothing was stored


@pytest.mark.parametrize(
    "stored",
    [
        "[" * 100_000,
        '{"databases": "orders"}',
        '{"databases": [], "sudo": true}',
        "x" * 70_000,
        '{"databases": ["orders"], "pool_mode": "statement"}',
        '{"databases": ["orders"], "pool_size": 0}',
    ],
)
def test_a_stored_policy_that_cannot_be_used_denies_its_app(tmp_path: Path, stored: str) -> None:
    """Whoever wrote the shared state, a Gate reading it neither crashes
    (nesting deep enough to exhaust the stack) nor falls back to the config."""
    config = Config(
        data_dir=tmp_path, gate=GateConfig(apps={"shop": GateAppConfig(databases=("orders",))})
    )
    with StateStore.open(tmp_path / "state.db") as store:
        store.add_app("shop")
        store.set_app_policy("shop", stored)
        book = PolicyBook(config)
        book.load(store)
    assert book.source("shop") == "state"
    assert book.policy_for("shop").max_sessions == 0
    assert not book.policy_for("shop").allows("orders")


def test_llm_rules_from_the_command_line_and_the_config(config: Path, tmp_path: Path) -> None:
    changed = policy(config, "shop", "--llm-models", "gemma*,qmesh-*", "--llm-privacy",
                     "private", "--llm-rpm", "30", "--llm-max-tokens", "256")  # fmt: skip
    assert changed["policy"]["llm"] == {  # type: ignore[index]
        "models": ["gemma*", "qmesh-*"], "privacy": "private", "requests_per_minute": 30,
        "max_tokens": 256,
    }  # fmt: skip
    # The Postgres rights are kept, and one LLM rule changes alone.
    assert changed["policy"]["databases"] == ["orders"]  # type: ignore[index]
    again = policy(config, "shop", "--llm-models", "any", "--llm-rpm", "none")
    assert again["policy"]["llm"] == {"privacy": "private", "max_tokens": 256}  # type: ignore[index]
    shown = qmesh(config, "apps", "policy", "shop").stdout
    assert "llm.privacy           at least private" in shown
    assert "llm.max_tokens        256" in shown

    file = tmp_path / "llm.toml"
    file.write_text(
        '[gate.apps.web.llm]\ntasks = ["chat"]\nproviders = ["acme"]\ntokens_per_minute = 9000\n'
    )
    from qmesh.config import load_config

    llm = load_config(file, env={}).gate.apps["web"].llm
    assert (llm.tasks, llm.providers, llm.tokens_per_minute) == (("chat",), ("acme",), 9000)
    file.write_text('[gate.apps.web.llm]\nprivacy = "secret"\n')
    refused = qmesh(file, "apps", "list")
    assert refused.returncode == 2
    assert "llm.toml:2: gate.apps.web.llm.privacy: expected one of any, private, local" in (
        refused.stderr
    )


def test_pool_settings_from_the_command_line(config: Path) -> None:
    """The pool fields start at their defaults, change one at a time like the
    others, and are shown in both outputs."""
    shown = qmesh(config, "apps", "policy", "shop").stdout
    assert "pool_mode             session\n" in shown
    assert "pool_size             20\n" in shown
    assert "pool_wait_ms          30000\n" in shown
    changed = policy(config, "shop", "--pool-mode", "transaction", "--pool-size", "5",
                     "--pool-wait-ms", "250")  # fmt: skip
    assert changed["source"] == "state"
    stored = changed["policy"]
    assert isinstance(stored, dict)
    assert (stored["pool_mode"], stored["pool_size"], stored["pool_wait_ms"]) == (
        "transaction", 5, 250,
    )  # fmt: skip
    # The other rights are kept from the config's table.
    assert (stored["databases"], stored["statement_timeout_ms"]) == (["orders"], 5000)
    again = policy(config, "shop", "--pool-size", "7")["policy"]
    assert again == {**stored, "pool_size": 7}
    shown = qmesh(config, "apps", "policy", "shop").stdout
    assert "pool_mode             transaction\n" in shown
    assert "pool_size             7\n" in shown
    assert "pool_wait_ms          250\n" in shown


def test_a_policy_stored_before_pooling_keeps_the_defaults(tmp_path: Path) -> None:
    config = Config(data_dir=tmp_path)
    old = ('{"audit_statements": "hash", "databases": ["orders"], "llm": {}, '
           '"max_sessions": 4, "read_only": true, "statement_timeout_ms": null}')  # fmt: skip
    with StateStore.open(tmp_path / "state.db") as store:
        store.add_app("shop")
        store.set_app_policy("shop", old)
        book = PolicyBook(config)
        book.load(store)
    policy = book.policy_for("shop")
    assert policy.allows("orders") and policy.max_sessions == 4
    assert (policy.pool_mode, policy.pool_size, policy.pool_wait_ms) == ("session", 20, 30000)
