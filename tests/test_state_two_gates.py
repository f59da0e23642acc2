"""Two Gate processes on one PostgreSQL state: what is changed through the
state — a new vault secret, an app's policy, an app-key rotation, an edge's
revocation — is in force at the other Gate without a restart, and what one
Gate's graph memory learns the other answers from, with the same citation.

Real processes throughout: ``qmesh --role gate`` twice (one data directory
for the keys, each Gate on its own ports), a ``qmesh --role minigate``
connected to the second Gate, ``qmesh`` commands for every change, psql's
library (psycopg) as the application and a real PostgreSQL as its database.
How fast each change bites is printed (``-s``); ``bench/trust.py`` is where
speed is measured, so the deadlines here are generous."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import clusterkit
import psycopg
from clusterkit import qmesh_ok as qmesh
from pgcluster import PgCluster
from pgkit import RealDb
from processkit import free_port, start_role, stop, wait_for

DEADLINE_S = 30.0


def gate_config(path: Path, data_dir: Path, url: str) -> tuple[int, int]:
    return clusterkit.gate_config(
        path, data_dir, url, path.stem,
        extra="[tunnel]\nheartbeat_interval_s = 0.5\ndead_after_s = 3.0\n",
    )  # fmt: skip


def status_of(url: str, bearer: str) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {bearer}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as error:
        return error.code


def post_json(url: str, bearer: str, body: dict[str, Any]) -> tuple[int, Any]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST",
        headers={"Authorization": f"Bearer {bearer}", "Content-Type": "application/json"},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return int(answer.status), json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def bites(what: str, check: Callable[[], object]) -> None:
    took = wait_for(what, check, DEADLINE_S)
    print(f"{what}: in force at the other Gate after {took * 1000:.0f} ms")


def test_changes_made_through_the_state_are_in_force_at_another_gate(
    tmp_path: Path, pg_cluster: PgCluster
) -> None:
    url = RealDb(pg_cluster, prefix="shared").dsn()
    orders = RealDb(pg_cluster, prefix="orders")
    data = tmp_path / "gate"
    qmesh(data, url, "keys", "init")
    qmesh(data, url, "secrets", "init-master-key")
    shop_key = qmesh(data, url, "apps", "add", "shop").stdout.strip().splitlines()[-1]
    _, a_http = gate_config(tmp_path / "a.toml", data, url)
    b_tunnel, b_http = gate_config(tmp_path / "b.toml", data, url)
    credential = tmp_path / "edge.cred"
    qmesh(data, url, "enroll", "minigate", "edge-1", "--gate", f"127.0.0.1:{b_tunnel}",
          "--out", str(credential))  # fmt: skip
    pg_port = free_port()
    (tmp_path / "edge.toml").write_text(
        f'data_dir = "{tmp_path / "edge"}"\n'
        f'[minigate]\ngate = "127.0.0.1:{b_tunnel}"\ncredential_file = "{credential}"\n'
        f'pg_listen = "127.0.0.1:{pg_port}"\nllm_listen = "127.0.0.1:{free_port()}"\n'
        "[tunnel]\nreconnect_max_s = 0.5\nheartbeat_interval_s = 0.5\ndead_after_s = 3.0\n"
    )
    gate_a = start_role("gate", tmp_path / "a.toml", tmp_path / "a.log")
    gate_b = start_role("gate", tmp_path / "b.toml", tmp_path / "b.log")
    edge = start_role("minigate", tmp_path / "edge.toml", tmp_path / "edge.log")
    models_b = f"http://127.0.0.1:{b_http}/v1/models"
    try:
        for port in (a_http, b_http):
            wait_for("a Gate's HTTP API", lambda p=port: status_of(  # type: ignore[misc]
                f"http://127.0.0.1:{p}/healthz", "") == 200, 60)  # fmt: skip
        assert status_of(models_b, f"shop:{shop_key}") == 200

        def select_one() -> bool:
            with psycopg.connect(
                host="127.0.0.1", port=pg_port, user="shop", password=shop_key,
                dbname="orders", connect_timeout=10,
            ) as conn:  # fmt: skip
                return conn.execute("SELECT 1").fetchone() == (1,)

        not_allowed = 'may not use database alias "orders"'

        def refused() -> bool:
            """The Gate refused the session for the app's policy (and for nothing else)."""
            try:
                select_one()
            except psycopg.OperationalError as exc:
                return not_allowed in str(exc)
            return False

        def served() -> bool:
            try:
                return select_one()
            except psycopg.OperationalError:
                return False

        # Before: no policy for the alias. Waiting for that answer also waits
        # for the edge to be up and connected to the other Gate.
        wait_for("the other Gate's refusal, through the edge", refused, 60)
        # A vault secret and a policy, written by commands: the other Gate uses both.
        qmesh(data, url, "secrets", "set", "db.orders", "--dsn-stdin", stdin=orders.dsn())
        qmesh(data, url, "apps", "policy", "shop", "--databases", "orders")
        bites("a new vault secret and policy", served)

        qmesh(data, url, "apps", "policy", "shop", "--databases", "reports")
        bites("a policy change", refused)

        # The graph memory is one for the cluster: learnt at A, cited at B.
        said = "Brindle Fish Market was founded in 1911 by Ada Brindle."
        code, added = post_json(f"http://127.0.0.1:{a_http}/v1/memory/documents",
                                f"shop:{shop_key}", {"text": said, "id": "brindle"})  # fmt: skip
        assert code == 201, added
        code, answer = post_json(f"http://127.0.0.1:{b_http}/v1/memory/query", f"shop:{shop_key}",
                                 {"question": "Who founded the Brindle Fish Market?"})  # fmt: skip
        assert code == 200, answer
        assert answer["found"] and [c["text"] for c in answer["citations"]] == [said]
        assert answer["citations"][0]["sentence_id"].startswith("brindle:")

        # A key rotation without overlap: the old key stops working at B.
        new_key = qmesh(data, url, "apps", "rotate-key", "shop", "--overlap", "0")
        rotated = new_key.stdout.strip().splitlines()[-1]
        bites("an app-key rotation", lambda: status_of(models_b, f"shop:{shop_key}") == 401)
        assert status_of(models_b, f"shop:{rotated}") == 200

        # A revocation: the edge's live session at B ends, and it cannot come back.
        qmesh(data, url, "revoke", "edge-1")
        started = time.monotonic()
        assert edge.wait(timeout=DEADLINE_S) == 2
        print(f"a revocation: the edge at the other Gate gave up after "
              f"{(time.monotonic() - started) * 1000:.0f} ms")  # fmt: skip
        assert "revoked" in (tmp_path / "edge.log").read_text()
        assert gate_a.poll() is None and gate_b.poll() is None
    finally:
        for process in (edge, gate_b, gate_a):
            stop(process)
    for log in tmp_path.glob("*.log"):
        text = log.read_text()
        assert "Traceback" not in text, text
        assert shop_key not in text and orders.password not in text  # no secret in a log
