"""The state's database fails over under load, and the Gates follow.

A PostgreSQL primary with a streaming replica (``pg_basebackup -R``), two
Gate processes whose ``gate.database_url`` lists both hosts with
``target_session_attrs=read-write``, and chat completions at both Gates
all along. The primary is stopped and the replica promoted: the Gates
write to the new primary within seconds (their heartbeats move again),
requests in the gap are answered or refused clearly (never left hanging),
and the ledger holds exactly one row per answered request, its chain
intact."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from clusterkit import gate_config, gates, qmesh
from pgcluster import PgCluster
from processkit import start_role, stop, wait_for

DEADLINE_S = 60.0


class Traffic:
    """Chat completions at one Gate's HTTP API, one after another, until stopped."""

    def __init__(self, url: str, bearer: str) -> None:
        self.url = url
        self.bearer = bearer
        self.answered = 0
        self.statuses: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _run(self) -> None:
        body = json.dumps(
            {"model": "qg://task=keywords", "messages": [{"role": "user", "content": "db fail"}]}
        ).encode()
        while not self._stop.is_set():
            headers = {"Authorization": f"Bearer {self.bearer}", "Content-Type": "application/json"}
            request = urllib.request.Request(self.url, data=body, method="POST", headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=30) as answer:
                    status = int(answer.status)
            except urllib.error.HTTPError as error:
                status = error.code
            except OSError:
                status = 0  # no answer at all: what the test must not see
            self.statuses[status] = self.statuses.get(status, 0) + 1
            self.answered += status == 200


def test_gates_follow_a_database_failover_under_load(tmp_path: Path) -> None:
    # Not under tmp_path: the server, run as ``postgres``, cannot enter it (conftest).
    base = Path(tempfile.mkdtemp(prefix="qmesh-pg-failover-"))
    os.chmod(base, 0o755)
    primary = PgCluster(base / "primary").start()
    replica: PgCluster | None = None
    processes: dict[str, subprocess.Popen[bytes]] = {}
    traffic: list[Traffic] = []
    try:
        primary.psql("CREATE DATABASE qmesh_state")
        replica = primary.standby(base / "replica")
        url = (
            f"postgresql://postgres:{primary.password}@127.0.0.1:{primary.port},"
            f"127.0.0.1:{replica.port}/qmesh_state"
            "?target_session_attrs=read-write&connect_timeout=2"
        )
        data = tmp_path / "gate"
        for command in (("keys", "init"), ("secrets", "init-master-key")):
            assert qmesh(data, url, *command).returncode == 0
        added = qmesh(data, url, "apps", "add", "shop")
        key = added.stdout.strip().splitlines()[-1]
        https: dict[str, int] = {}
        for name in ("gate-a", "gate-b"):
            _, https[name] = gate_config(tmp_path / f"{name}.toml", data, None, name)
            processes[name] = start_role_with_url(tmp_path, name, url)

        wait_for("both Gates live", lambda: [
            g["state"] for g in gates(data, url).values()
        ] == ["live"] * 2, DEADLINE_S)  # fmt: skip
        traffic = [
            Traffic(f"http://127.0.0.1:{port}/v1/chat/completions", f"shop:{key}")
            for port in https.values()
        ]
        wait_for("requests answered", lambda: all(t.answered >= 20 for t in traffic), DEADLINE_S)

        primary.stop()
        replica.promote()
        promoted = time.time()
        took = wait_for("both Gates heartbeating on the new primary", lambda: all(
            g["heartbeat_at"] > promoted for g in gates(data, url).values()
        ), DEADLINE_S)  # fmt: skip
        print(f"Gates writing to the promoted replica {took:.1f} s after the promotion")
        before = [t.answered for t in traffic]
        wait_for("requests answered after the failover", lambda: all(
            t.answered >= b + 20 for t, b in zip(traffic, before, strict=True)
        ), DEADLINE_S)  # fmt: skip
        for t in traffic:
            t.stop()
        statuses: dict[int, int] = {}
        for t in traffic:
            for status, count in t.statuses.items():
                statuses[status] = statuses.get(status, 0) + count
        print(f"answers by status: {statuses}")
        assert set(statuses) <= {200, 503}, statuses  # answered or clearly refused
        answered = sum(t.answered for t in traffic)
        for process in processes.values():
            stop(process)  # the last ledger batch is written on the way out
        verified = qmesh(data, url, "ledger", "verify")
        assert verified.returncode == 0, verified.stdout + verified.stderr
        assert f"ledger: {answered} rows, ok" in verified.stdout, (answered, verified.stdout)
    finally:
        for t in traffic:
            t.stop()
        for process in processes.values():
            stop(process)
        for cluster in (primary, replica):
            if cluster is not None:
                cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


def start_role_with_url(tmp_path: Path, name: str, url: str) -> subprocess.Popen[bytes]:
    """The Gate ``name``, its database URL from the environment (it holds a password)."""
    previous = os.environ.get("QMESH_GATE__DATABASE_URL")
    os.environ["QMESH_GATE__DATABASE_URL"] = url
    try:
        return start_role("gate", tmp_path / f"{name}.toml", tmp_path / f"{name}.log")
    finally:
        if previous is None:
            del os.environ["QMESH_GATE__DATABASE_URL"]
        else:
            os.environ["QMESH_GATE__DATABASE_URL"] = previous
