"""Operator roles at a running Gate: each right of each role, allowed and refused.

A real ``qmesh --role gate`` process; operators made with ``qmesh operators
add`` as an operator makes them; every endpoint called over a real socket
with each role's key. Allowed means the Gate did the work (any answer but
401 and 403); refused means 403 naming the right.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
from daemonkit import GateDir, make_gate_dir
from processkit import qmesh_cli as qmesh
from processkit import start_role, stop

from qmesh.operator_roles import OPERATOR_ROLES, Right, rights_of

DEADLINE_S = 30.0  # generous: the event must happen, how fast is for bench/

# (method, path, body, the right it needs; a tuple: any of them)
ENDPOINTS: list[tuple[str, str, object, tuple[Right, ...]]] = [
    ("GET", "/metrics", None, (Right.METRICS,)),
    ("GET", "/api/dashboard", None, (Right.VIEW,)),
    ("GET", "/api/inventory", None, (Right.VIEW,)),
    ("GET", "/api/tunnel", None, (Right.VIEW,)),
    ("GET", "/api/discovery", None, (Right.VIEW,)),
    ("GET", "/qg/v1/decisions", None, (Right.VIEW,)),
    ("POST", "/api/sessions/kill", {"target": "no-such-edge"}, (Right.OPERATE,)),
    ("POST", "/api/models/stop", {"model": "no-such-model"}, (Right.OPERATE,)),
    ("POST", "/api/discovery/scan", {}, (Right.OPERATE,)),
    ("GET", "/v1/models", None, (Right.USE,)),
    ("POST", "/v1/memory/query", {"question": "who?"}, (Right.USE,)),
    ("GET", "/qg/v1/budgets", None, (Right.USE, Right.VIEW)),
]
PRINCIPALS = (*OPERATOR_ROLES, None)  # None: an application


@attrs.define
class Gate:
    dir: GateDir
    config: Path
    tokens: dict[str | None, str]

    def call(self, token: str, method: str, path: str, body: object = None) -> tuple[int, str]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.dir.http_port}{path}",
            data=data,
            method=method,
            headers={"authorization": f"Bearer {token}", "content-type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()


def _eventually(check: object, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {DEADLINE_S}s")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def gate(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gate]:
    tmp = tmp_path_factory.mktemp("roles")
    gate_dir = make_gate_dir(tmp)
    config = tmp / "gate.toml"
    config.write_text(gate_dir.config_text())
    tokens: dict[str | None, str] = {}
    for role in OPERATOR_ROLES:
        made = qmesh(config, "operators", "add", f"op-{role}", "--role", role)
        assert made.returncode == 0, made.stderr
        tokens[role] = made.stdout.strip()
        assert tokens[role].startswith(f"op-{role}:")
        assert "shown only once" in made.stderr
    made = qmesh(config, "apps", "add", "plain-app")
    assert made.returncode == 0, made.stderr
    tokens[None] = f"plain-app:{made.stdout.strip()}"
    process = start_role("gate", config, tmp / "gate.log")
    try:
        probe = Gate(gate_dir, config, tokens)
        _eventually(lambda: _answers(probe), "the Gate's HTTP listener")
        yield probe
    finally:
        stop(process)


def _answers(gate: Gate) -> bool:
    try:
        return gate.call(gate.dir.bearer, "GET", "/healthz")[0] == 200
    except OSError:
        return False


@pytest.mark.parametrize("principal", PRINCIPALS, ids=lambda p: p or "application")
@pytest.mark.parametrize(
    ("method", "path", "body", "needs"), ENDPOINTS, ids=[f"{m} {p}" for m, p, _, _ in ENDPOINTS]
)
def test_each_right_of_each_role(
    gate: Gate,
    principal: str | None,
    method: str,
    path: str,
    body: object,
    needs: tuple[Right, ...],
) -> None:
    status, answer = gate.call(gate.tokens[principal], method, path, body)
    if rights_of(principal).isdisjoint(needs):
        assert status == 403, (status, answer)
        error = json.loads(answer)["error"]
        assert error["code"] == "forbidden"
        assert all(right.value in error["message"] for right in needs), error
    else:
        assert status not in (401, 403), (status, answer)


def test_the_setup_admin_app_is_an_admin(gate: Gate) -> None:
    listed = json.loads(qmesh(gate.config, "operators", "list", "--json").stdout)
    assert {o["name"]: o["role"] for o in listed} == {
        "admin": "admin",
        **{f"op-{role}": role for role in OPERATOR_ROLES},
    }
    assert gate.call(gate.dir.bearer, "POST", "/api/discovery/scan", {})[0] == 409


def test_a_role_change_and_a_removal_bite_at_once(gate: Gate, tmp_path: Path) -> None:
    made = qmesh(gate.config, "operators", "add", "on-call", "--role", "viewer")
    token = made.stdout.strip()
    assert gate.call(token, "GET", "/api/dashboard")[0] == 200  # now cached at the Gate
    changed = qmesh(gate.config, "operators", "set-role", "on-call", "metrics")
    assert changed.returncode == 0 and "metrics" in changed.stdout
    _eventually(lambda: gate.call(token, "GET", "/api/dashboard")[0] == 403, "the demotion")
    assert gate.call(token, "GET", "/metrics")[0] == 200
    removed = qmesh(gate.config, "operators", "remove", "on-call")
    assert removed.returncode == 0
    _eventually(lambda: gate.call(token, "GET", "/metrics")[0] == 401, "the removal")
    # An application is not turned into an operator by set-role, nor removed as one.
    assert (
        qmesh(gate.config, "operators", "set-role", "plain-app", "admin", ok=False).returncode == 2
    )
    assert qmesh(gate.config, "operators", "remove", "plain-app", ok=False).returncode == 2
    assert qmesh(gate.config, "operators", "add", "x", "--role", "root", ok=False).returncode == 2
