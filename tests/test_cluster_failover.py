"""An edge that knows every Gate of a cluster survives the death of its own.

Real processes throughout: three ``qmesh --role gate`` on one PostgreSQL
state, a ``qmesh --role minigate`` whose credential lists all three, the
official ``openai`` client (no retries of its own) sending a steady stream
of chat completions through the MiniGate, and a psycopg loop that
reconnects when its connection is lost. The Gate the MiniGate is attached
to is killed with ``kill -9``: the chat completions see no error and go on
through another Gate; the Postgres session ends and the next connection
succeeds; afterwards the books of the whole cluster verify. How long the
failover took is printed (``-s``); ``bench/cluster.py`` measures it."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import psycopg
from clusterkit import Application, Traffic, gate_config, gates
from clusterkit import qmesh_ok as qmesh
from pgcluster import PgCluster
from pgkit import RealDb
from processkit import free_port, start_role, stop, wait_for

DEADLINE_S = 60.0


class Sessions(Application):
    """psycopg with a reconnect loop: ``SELECT 1`` over and over; a lost
    connection is counted (with its SQLSTATE) and a new one opened at once."""

    def __init__(self, **connect: Any) -> None:
        super().__init__()
        self.connect = connect
        self.queries: list[float] = []
        self.lost: list[tuple[str | None, str]] = []

    def run(self) -> None:
        while not self.stopping:
            try:
                with psycopg.connect(**self.connect, connect_timeout=10) as conn:
                    while not self.stopping:
                        assert conn.execute("SELECT 1").fetchone() == (1,)
                        self.queries.append(time.monotonic())
                        time.sleep(0.01)  # a steady trickle, not a busy loop
            except psycopg.OperationalError as exc:
                self.lost.append((exc.sqlstate, str(exc).strip().splitlines()[0]))


def test_an_edge_survives_the_kill_of_its_gate(tmp_path: Path, pg_cluster: PgCluster) -> None:
    url = RealDb(pg_cluster, prefix="failover").dsn()
    orders = RealDb(pg_cluster, prefix="orders")
    data = tmp_path / "gate"
    qmesh(data, url, "keys", "init")
    qmesh(data, url, "secrets", "init-master-key")
    key = qmesh(data, url, "apps", "add", "shop").stdout.strip().splitlines()[-1]
    qmesh(data, url, "secrets", "set", "db.orders", "--dsn-stdin", stdin=orders.dsn())
    qmesh(data, url, "apps", "policy", "shop", "--databases", "orders")
    tunnels = {name: free_port() for name in ("gate-a", "gate-b", "gate-c")}
    for name, tunnel in tunnels.items():
        gate_config(tmp_path / f"{name}.toml", data, url, name, tunnel=tunnel)
    credential = tmp_path / "edge.cred"
    qmesh(data, url, "enroll", "minigate", "edge-1", "--out", str(credential),
          *(arg for t in tunnels.values() for arg in ("--gate", f"127.0.0.1:{t}")))  # fmt: skip
    llm_port, pg_port = free_port(), free_port()
    (tmp_path / "edge.toml").write_text(
        f'data_dir = "{tmp_path / "edge"}"\n'
        f'[minigate]\ncredential_file = "{credential}"\n'
        f'pg_listen = "127.0.0.1:{pg_port}"\nllm_listen = "127.0.0.1:{llm_port}"\n'
        "[tunnel]\nheartbeat_interval_s = 0.5\ndead_after_s = 3.0\nfailover_jitter_s = 0.2\n"
    )
    processes = {
        name: start_role("gate", tmp_path / f"{name}.toml", tmp_path / f"{name}.log")
        for name in tunnels
    }
    traffic = Traffic(f"http://127.0.0.1:{llm_port}/v1", f"shop:{key}")
    sessions = Sessions(
        host="127.0.0.1", port=pg_port, user="shop", password=key, dbname="orders",
        sslmode="disable",
    )  # fmt: skip
    try:
        wait_for("three Gates live", lambda: [
            g["state"] for g in gates(data, url).values()
        ] == ["live"] * 3, DEADLINE_S)  # fmt: skip
        processes["edge"] = start_role("minigate", tmp_path / "edge.toml", tmp_path / "edge.log")

        def attached() -> str | None:
            held = [
                n for n, g in gates(data, url).items() if g["state"] == "live" and g["sessions"]
            ]
            return held[0] if len(held) == 1 else None

        wait_for("the edge attached to a Gate", attached, DEADLINE_S)
        victim = attached()
        assert victim is not None
        traffic.start()
        sessions.start()
        wait_for("requests and queries flowing",
                 lambda: len(traffic.answered) >= 20 and len(sessions.queries) >= 20,
                 DEADLINE_S)  # fmt: skip

        processes[victim].send_signal(signal.SIGKILL)
        processes[victim].wait(timeout=DEADLINE_S)
        killed = time.monotonic()
        wait_for("requests answered and queries run through another Gate",
                 lambda: sum(t > killed for t in traffic.answered) >= 20
                 and sum(t > killed for t in sessions.queries) >= 20, DEADLINE_S)  # fmt: skip
        first = min(t for t in traffic.answered if t > killed)
        again = min(t for t in sessions.queries if t > killed)
        print(f"kill -9 of {victim}: first chat answer after {first - killed:.3f} s, "
              f"first query on a new connection after {again - killed:.3f} s")  # fmt: skip
        traffic.stop()
        sessions.stop()
        assert traffic.errors == []
        # The Postgres session on the dead Gate ended with a connection
        # failure (SQLSTATE class 08), as from a server shutting down; the
        # reconnection succeeded.
        assert 1 <= len(sessions.lost) <= 3, sessions.lost
        assert all(state == "08006" for state, _ in sessions.lost), sessions.lost
        wait_for("the edge's session at a survivor", lambda: sum(
            g["sessions"] for n, g in gates(data, url).items() if n != victim
        ) == 1, DEADLINE_S)  # fmt: skip
        assert "trying the next" in (tmp_path / "edge.log").read_text()
        for name in tunnels:
            stop(processes[name])  # the survivors write their last ledger rows
        verified = qmesh(data, url, "ledger", "verify")
        assert "ledger: " in verified.stdout and ", ok" in verified.stdout, verified.stdout
    finally:
        traffic.stop()
        sessions.stop()
        for process in processes.values():
            stop(process)
