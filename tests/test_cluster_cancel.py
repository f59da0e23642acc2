"""A CancelRequest that reaches a Gate other than the one holding the
session is passed on, and the query stops.

Two Gates in this process on one real PostgreSQL state, a MiniGate
attached to Gate A carrying psycopg's session to a real database, a query
that sleeps; the cancel request for that session's key then arrives at
Gate B from the same edge identity (as after the edge moved, or from a
second MiniGate of the same identity)."""

from __future__ import annotations

import secrets
import threading
from pathlib import Path
from typing import Any

import psycopg
import psycopg.errors
import trio
from clusterkit import start_gate
from daemonkit import FAST_TUNNEL, make_gate_dir, wait_until
from pgcluster import PgCluster
from pgkit import RealDb

from qmesh.config import GateAppConfig, load_config
from qmesh.identity import Credential, GateKeys, enroll, write_private_file
from qmesh.masterkey import ensure_master_key
from qmesh.minigate.role import run_minigate
from qmesh.pg.policy import policy_to_json
from qmesh.pg.vault import Vault
from qmesh.state import StateStore
from qmesh.tunnel import TunnelClient


async def test_a_cancel_request_at_another_gate_stops_the_query(
    nursery: trio.Nursery, tmp_path: Path, pg_cluster: PgCluster
) -> None:
    url = RealDb(pg_cluster, prefix="cancel").dsn()
    orders = RealDb(pg_cluster, prefix="orders")
    gate_dir = make_gate_dir(tmp_path)
    master_key = ensure_master_key(gate_dir.path, env={})
    with StateStore.open(url) as store:
        app_key = store.add_app("shop")
        store.set_app_policy("shop", policy_to_json(GateAppConfig(databases=("orders",))))
        Vault.open(store, master_key).set("orders", orders.dsn())
        credential = enroll(store, GateKeys.load(gate_dir.path), "minigate", "edge-1", "x:1")
    credential_file = tmp_path / "edge.cred"
    write_private_file(credential_file, (credential.encode() + "\n").encode())
    gate_a, gate_b = [await start_gate(nursery, tmp_path, gate_dir.path, url, name)
                      for name in ("gate-a", "gate-b")]  # fmt: skip
    await wait_until(lambda: "gate-b" in gate_a["links"].clients, 30)
    await wait_until(lambda: "gate-a" in gate_b["links"].clients, 30)
    edge_file = tmp_path / "edge.toml"
    edge_file.write_text(
        f'data_dir = "{tmp_path / "edge"}"\n[minigate]\ncredential_file = "{credential_file}"\n'
        'pg_listen = "127.0.0.1:0"\nllm_listen = "127.0.0.1:0"\n' + FAST_TUNNEL
    )
    host, port = gate_a["tunnel"].rsplit(":", 1)
    edge: dict[str, Any] = await nursery.start(
        lambda task_status: run_minigate(
            load_config(edge_file, env={}), gate_address=(host, int(port)), task_status=task_status
        )
    )
    pg_host, pg_port = edge["pg"].rsplit(":", 1)

    outcome: list[BaseException | None] = []
    started = threading.Event()

    def sleep_a_minute() -> None:
        with psycopg.connect(
            host=pg_host, port=int(pg_port), user="shop", password=app_key, dbname="orders",
            sslmode="disable", connect_timeout=10,
        ) as conn:  # fmt: skip
            started.set()
            try:
                conn.execute("SELECT pg_sleep(60)")
                outcome.append(None)
            except psycopg.Error as exc:
                outcome.append(exc)

    thread = threading.Thread(target=sleep_a_minute, daemon=True)
    thread.start()
    await wait_until(lambda: started.is_set() and len(gate_a["pg"].cancel_keys.keys()) == 1, 30)
    await wait_until(lambda: orders.superuser(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE query = 'SELECT pg_sleep(60)' AND state = 'active'"
    ).strip() == "1", 30)  # fmt: skip
    ((pid, key),) = gate_a["pg"].cancel_keys.keys()
    assert not gate_b["pg"].cancel_keys.keys()

    # The same edge identity, at Gate B.
    b_host, b_port = gate_b["tunnel"].rsplit(":", 1)
    other = TunnelClient(
        gate_a["server"].settings,
        name="edge-1",
        role="minigate",
        private_key=Credential.decode(credential.encode()).private_key,
        gate_public_key=credential.gate_public_key,
        gate_addresses=[(b_host, int(b_port))],
    )
    await nursery.start(other.run)
    stream = await other.open_stream({"service": "pg-cancel", "pid": pid, "secret": key.hex()})
    await stream.send_eof()
    with trio.fail_after(30):
        while await stream.receive_some():
            pass
        await trio.to_thread.run_sync(thread.join)
    (error,) = outcome
    assert isinstance(error, psycopg.errors.QueryCanceled), error
    assert gate_a["pg"].cancel_keys.forwarded == 1
    assert gate_b["pg"].cancel_keys.forwarded == 0
    # A key unknown everywhere stays unanswered, and cancels nothing.
    stray = await other.open_stream(
        {"service": "pg-cancel", "pid": pid + 1, "secret": secrets.token_hex(4)}
    )
    await stray.send_eof()
    with trio.fail_after(30):
        while await stray.receive_some():
            pass
    assert gate_a["pg"].cancel_keys.forwarded == 1
