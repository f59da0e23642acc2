"""``qmesh up`` lets the demo app open the demo database through its policy
in the state, so that the operator's later ``qmesh apps policy demo …``
(which edits the stored policy) keeps the alias."""

from __future__ import annotations

from pathlib import Path

import attrs

from qmesh.cli.up import DEMO_APP, _let_the_demo_app_in
from qmesh.config import Config, GateAppConfig, GateConfig
from qmesh.pg.demo import DEMO_ALIAS
from qmesh.pg.policy import PolicyBook, policy_to_json
from qmesh.state import StateStore


def config_at(tmp_path: Path, **apps: GateAppConfig) -> Config:
    return attrs.evolve(Config(), data_dir=tmp_path, gate=attrs.evolve(GateConfig(), apps=apps))


def stored(config: Config) -> GateAppConfig | None:
    with StateStore.open(config.state_location) as store:
        book = PolicyBook(config)
        book.load(store)
        return book.stored.get(DEMO_APP)


def test_an_app_without_a_policy_gets_one_stored(tmp_path: Path) -> None:
    config = config_at(tmp_path)
    with StateStore.open(config.state_location) as store:
        store.add_app(DEMO_APP)  # qmesh up's first step
    assert _let_the_demo_app_in(config) is config
    policy = stored(config)
    assert policy is not None and policy.databases == (DEMO_ALIAS,)


def test_a_stored_policy_keeps_what_it_has_and_gains_the_alias(tmp_path: Path) -> None:
    config = config_at(tmp_path)
    with StateStore.open(config.state_location) as store:
        store.add_app(DEMO_APP)
        mine = GateAppConfig(databases=("orders",), pool_mode="transaction", pool_size=3)
        store.set_app_policy(DEMO_APP, policy_to_json(mine))
    _let_the_demo_app_in(config)
    policy = stored(config)
    assert policy == attrs.evolve(mine, databases=("orders", DEMO_ALIAS))
    _let_the_demo_app_in(config)  # a restart adds nothing twice
    assert stored(config) == policy


def test_a_configured_app_gets_the_alias_in_memory_only(tmp_path: Path) -> None:
    config = config_at(tmp_path, demo=GateAppConfig(databases=("orders",)))
    changed = _let_the_demo_app_in(config)
    assert changed.gate.apps[DEMO_APP].databases == ("orders", DEMO_ALIAS)
    assert stored(config) is None
