#!/usr/bin/env python3
"""A cluster of Gates, two parts: how long an application waits when its
edge's Gate is killed (failover of LLM requests and Postgres sessions; one
table per measurement, one column per ``tunnel.failover_jitter_s``), then
what a chat completion served by a daemon attached to another Gate adds to
one served by a daemon attached to the Gate asked. ``--only failover`` or
``--only remote`` runs one part.

Part 1, failover. What runs (real processes, 127.0.0.1 and free ports only, everything under
one temporary directory removed at the end):

- a throwaway PostgreSQL (scripts/pgcluster.py) holding the Gates' shared
  state (database ``qstate``) and the application's database (``orders``,
  its own login role; the real credentials are only in the Gate's vault);
- ``--gates`` (3) ``qmesh --role gate`` processes on that state, one data
  directory for the keys, each its own ``gate.name``, tunnel and HTTP port,
  ``[gate.cluster] heartbeat_interval_s = 0.25, gone_after_s = 1.0``;
- per value of ``--jitter`` (default ``0.5,0.1``), one ``qmesh --role
  minigate`` enrolled with every Gate (``qmesh enroll minigate NAME --gate A
  --gate B --gate C``), ``[tunnel] heartbeat_interval_s = 0.5, dead_after_s =
  3.0, failover_jitter_s = J``, JSON logs;
- the application, two threads of this process:
  LLM  the official ``openai`` client (``max_retries=0``: no client-side
       retry, one keep-alive connection, 30 s timeout) sending non-streamed
       chat completions with model ``qg://task=keywords`` (answered by the
       Gate itself) through the MiniGate's LLM port, one after another;
  PG   psycopg through the MiniGate's Postgres port as app ``shop`` to alias
       ``orders`` (``qmesh secrets set db.orders --dsn-stdin``, ``qmesh apps
       policy shop --databases orders``): ``SELECT 1`` every 10 ms on one
       connection; on any error it connects again at once (after 5 ms when
       the attempt failed in under 5 ms, so a refusing port is not spun on).

The registry (``qmesh gates --json``: each Gate's state and edge
sessions) is read with SQL from the ``gates`` table, as that command reads
it: polling the command itself would start a Python process (~0.5 CPU-s
here) whose ``StateStore.open`` takes the cluster's single-writer lock for
its migration check, the lock every Gate's heartbeat waits for.

Each kill round: every Gate that exited without being killed is counted
(with its last log line) and started again. The Gate the MiniGate is
attached to is the one named by its last ``connected to gate HOST:PORT``
log line, checked against its edge sessions in the registry (``/healthz``
counts the other Gates' fabric sessions too); once at least ``--steady``
answers and 2 ``SELECT 1`` have come in the round, it gets ``kill -9``.
Measured from the kill (wall clock, ``time.time()``; the MiniGate's log
timestamps have 1 ms resolution):

  lost     the MiniGate's ``connection to gate … lost`` line for the killed
           Gate (how long noticing the kill took)
  attach   the MiniGate's first ``connected to gate`` line for another Gate
  LLM      the first chat completion that ended after ``attach``: it came
           through the new Gate (one that ends just after the kill may
           still be the dead Gate's answer)
  PG       the first successful ``SELECT 1`` on a connection opened after
           the kill (every connection through the dead Gate ends)

A round whose attach, LLM and PG times are not all in within
``--round-timeout`` (60 s) is reported as failed, not waited for. The
killed Gate is then started again with the same configuration and waited
for until the registry shows it live with a ``started_at`` after the kill;
one that exits, or is not live within ``--round-timeout``, is started again
(3 attempts), each failure counted and its last log line shown. LLM
requests that raised (any exception; the target is 0) are counted per round
and in total, Postgres errors (a connection ending, a failed connect)
likewise: one per kill is expected (docs/cluster.md: a Postgres session on a dead Gate ends).

A thread reads the registry every 50 ms for the whole run: the oldest
heartbeat of a running, registered Gate, and how often one looked gone
(older than its ``gone_after_s``) while it ran: the other Gates then drop
their fabric links to it.

Printed: per jitter, p50/p99/max of the four times, failed/total LLM
requests, Postgres errors, failed restarts, Gates that exited on their own,
the heartbeat figures, the LLM request latency of requests no kill
interrupted; then one line per round; then the MiniGate's warnings in rounds
that failed, lost requests or were slow (over 3x the median), and every
restart failure and unkilled exit. p99 of 20 rounds is their maximum.
Everything runs on this machine (three Gates, a MiniGate, PostgreSQL and the
client), so a small machine's CPU count shows in the tail; compare the
columns of one run. Nothing is asserted. A warning names the files of
``qmesh/`` that changed during the run: a Gate restarted after that ran
other code than the rest.

Part 2, a remote node (docs/cluster.md, "One fabric"). A PostgreSQL and two
Gates (``gate-a``, ``gate-b``) as above, in their own directory, with
``[gate.routing] cooldown_s = 0`` (a failed request then costs only itself,
not 30 s of failures at that Gate: it is counted and the timing goes on); one
``qmesh --role daemon`` enrolled with gate-b only (``qmesh enroll daemon
bench-node --gate B``), ``llama_cpp = false``, its one runtime ``[[daemon.runtime]]
kind = "openai"``: an OpenAI-compatible server in a thread of this process
that answers at once (``GET /v1/models``: one model, ``bench-instant``;
``POST /v1/chat/completions``: ``ok``, one token, with usage; server-sent
events when asked to stream, as the daemon always does), so the mesh is
measured, not a model. Once ``GET /api/inventory`` (admin app key) shows the
node fresh at gate-b as its own (``"gate": null``) and at gate-a via gate-b
(``"gate": "gate-b"``), and the registry counts one edge session at gate-b
and none at gate-a, ``--requests`` (300) rounds, after 20 of warm-up, each
send one non-streamed chat completion for ``bench-instant`` (max_tokens 8)
on each of three paths, in an order that rotates every round:

  runtime directly   the instant server itself (the client's and the
                     server's own cost)
  local              gate-b's ``/v1/chat/completions``: gate-b → daemon
  remote             gate-a's: gate-a → gate-b over their fabric link →
                     daemon (gate-b splices the stream to the daemon)

Each path is ``http.client`` on one keep-alive connection (TCP_NODELAY),
timed with ``time.perf_counter`` around request and answer; an answer
counts only with HTTP 200, the content ``ok`` and, at a Gate,
``x-qmesh-route: node:bench-node/bench-instant`` (the daemon's candidate;
gate-a has no session of its own to the node, so there it went through
gate-b); anything else is an error, counted and printed with the request
numbers. Printed: p50/p99/mean/max per path (answers only), remote − local
(differences of those figures, and the median within a round), the CPU the
Gates and the daemon used per round (``/proc``), the daemon's calls to its
runtime per completion, and the Gates' and the daemon's warnings and
failovers ("trying the next") logged meanwhile. After the run the node must
still be placed as before, or the part fails.

    .venv/bin/python bench/cluster.py [--only failover|remote] [--kills 20]
        [--jitter 0.5,0.1] [--gates 3] [--steady 5] [--round-timeout 60]
        [--requests 300] [--logs DIR]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import functools
import hashlib
import http.client
import http.server
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import openai
import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from benchkit import cpu_seconds, stop  # noqa: E402
from pgcluster import PgCluster  # noqa: E402

MODEL = "qg://task=keywords"
SETUP_TIMEOUT_S = 60.0
RESTART_ATTEMPTS = 3
CONNECTED = re.compile(r"connected to gate ([0-9.]+):(\d+) \((new session|resumed)\)")
LOST = re.compile(r"connection to gate ([0-9.]+):(\d+) lost")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for(what: str, check: Callable[[], object], timeout: float = SETUP_TIMEOUT_S) -> None:
    end = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError, ValueError, KeyError):
            if check():
                return
        if time.monotonic() > end:
            raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


def percentile(ordered: list[float], fraction: float) -> float:
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def qmesh_env(url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QMESH_")}
    env["QMESH_GATE__DATABASE_URL"] = url
    return env


def healthz(http_port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz", timeout=5) as answer:
        body: dict[str, Any] = json.loads(answer.read())
        return body


def last_line(log: Path) -> str:
    lines = log.read_text(errors="replace").strip().splitlines()
    return lines[-1] if lines else ""


@attrs.frozen
class GateRow:
    """One row of the Gates' registry, as ``qmesh gates --json`` shows it."""

    name: str
    started_at: float
    heartbeat_at: float
    gone_after_s: float
    sessions: int
    stopped: bool
    read_at: float

    @property
    def age(self) -> float:
        return self.read_at - self.heartbeat_at

    @property
    def live(self) -> bool:
        return not self.stopped and self.age <= self.gone_after_s


def read_registry(conn: psycopg.Connection[Any]) -> dict[str, GateRow]:
    """The ``gates`` table, read directly: what ``qmesh gates --json`` prints
    (qmesh/cluster/registry.py: live = not stopped and the heartbeat no older
    than the Gate's own gone_after_s), without starting a Python process
    (~0.5 CPU-s here) whose ``StateStore.open`` takes the cluster's
    single-writer lock for its migration check, which every heartbeat waits for."""
    rows = conn.execute(
        "SELECT name, started_at, heartbeat_at, gone_after_s, sessions, stopped_at FROM gates"
    ).fetchall()
    now = time.time()
    return {
        str(r[0]): GateRow(
            str(r[0]), float(r[1]), float(r[2]), float(r[3]), int(r[4]), r[5] is not None, now
        )
        for r in rows
    }


class HeartbeatWatch:
    """Every 50 ms, the heartbeat age of each running, registered Gate."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.samples: list[tuple[float, float, int]] = []  # (time, oldest age, Gates gone)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeats", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        with (
            contextlib.suppress(psycopg.Error),
            psycopg.connect(self.cluster.url, autocommit=True, connect_timeout=10) as conn,
        ):
            while not self._stop.wait(0.05):
                rows = read_registry(conn)
                ages = []
                gone = 0
                for gate in self.cluster.gates.values():
                    row = rows.get(gate.name)
                    running = gate.process is not None and gate.process.poll() is None
                    if row is None or not running or row.started_at < gate.spawned_at - 1.0:
                        continue  # killed, or restarted and not registered yet
                    ages.append(row.age)
                    gone += not row.live
                if ages:
                    self.samples.append((rows_time(rows), max(ages), gone))


def rows_time(rows: dict[str, GateRow]) -> float:
    return next(iter(rows.values())).read_at


@attrs.define
class GateProc:
    name: str
    config: Path
    log: Path
    tunnel: int
    http: int
    process: subprocess.Popen[bytes] | None = None
    spawned_at: float = 0.0


@attrs.define
class Round:
    victim: str
    killed: float = 0.0  # wall clock
    successor: str = "-"
    lost_s: float | None = None  # kill → the MiniGate logged the connection's end
    attach_s: float | None = None
    llm_s: float | None = None
    pg_s: float | None = None
    llm_errors: int = 0
    pg_errors: int = 0
    note: str = ""
    warnings: list[str] = attrs.Factory(list)
    restart_failures: list[str] = attrs.Factory(list)
    died: list[str] = attrs.Factory(list)

    @property
    def complete(self) -> bool:
        return None not in (self.attach_s, self.llm_s, self.pg_s)


class Cluster:
    """The PostgreSQL, the Gates and the MiniGates of one run, in ``base``."""

    def __init__(self, base: Path, gates: int, gate_toml: str = "") -> None:
        self.base = base
        self.gate_toml = gate_toml  # appended to each Gate's configuration
        self.data = base / "gate-data"
        self.processes: list[subprocess.Popen[bytes]] = []
        self.pg = PgCluster(base / "pg")
        self.url = ""
        self.app_key = ""
        self.gates: dict[str, GateProc] = {}
        self.count = gates
        self._registry: psycopg.Connection[Any] | None = None

    def start(self) -> None:
        """Everything it starts is in ``processes`` and ``pg`` at once, so
        :meth:`close` stops it even when a later step fails."""
        base = self.base
        self.pg.start()
        state_password = secrets.token_urlsafe(18)
        self.pg.psql(f"CREATE ROLE qstate LOGIN PASSWORD '{state_password}'")
        self.pg.psql("CREATE DATABASE qstate OWNER qstate")
        self.url = self.pg.dsn_for("qstate", state_password, "qstate") + "?sslmode=disable"
        orders_password = secrets.token_urlsafe(18)
        self.pg.psql(f"CREATE ROLE orders LOGIN PASSWORD '{orders_password}'")
        self.pg.psql("CREATE DATABASE orders OWNER orders")
        orders = self.pg.dsn_for("orders", orders_password, "orders") + "?sslmode=disable"
        self.cli("keys", "init")
        self.cli("secrets", "init-master-key")
        self.app_key = self.cli("apps", "add", "shop").strip().splitlines()[-1]
        self.cli("secrets", "set", "db.orders", "--dsn-stdin", stdin=orders)
        self.cli("apps", "policy", "shop", "--databases", "orders")
        for i in range(self.count):
            name = f"gate-{chr(ord('a') + i)}"
            gate = GateProc(
                name, base / f"{name}.toml", base / f"{name}.log", free_port(), free_port()
            )
            gate.config.write_text(
                f'data_dir = "{self.data}"\n'
                f'[gate]\nname = "{name}"\ntunnel_listen = "127.0.0.1:{gate.tunnel}"\n'
                f'http_listen = "127.0.0.1:{gate.http}"\ndatabase_url = "{self.url}"\n'
                "[gate.cluster]\nheartbeat_interval_s = 0.25\ngone_after_s = 1.0\n" + self.gate_toml
            )
            self.gates[name] = gate
        for gate in self.gates.values():  # one at a time, each live before the next
            if failures := self.start_gate(gate, since=0.0, timeout=SETUP_TIMEOUT_S):
                print(f"{gate.name} did not start at once: {failures}", file=sys.stderr)

    def cli(self, *args: str, stdin: str | None = None) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "qmesh", "--data-dir", str(self.data), *args],
            env=qmesh_env(self.url),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=SETUP_TIMEOUT_S,
            check=False,
            cwd=ROOT,
        )
        if result.returncode != 0:
            raise RuntimeError(f"qmesh {' '.join(args[:2])} failed: {result.stderr.strip()}")
        return result.stdout

    def spawn(self, role: str, config: Path, log: Path) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "qmesh", "--role", role, "--config", str(config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=qmesh_env(self.url),
                cwd=ROOT,
                start_new_session=True,  # Ctrl-C reaches this script, which stops them in order
            )
        self.processes.append(process)
        return process

    def start_gate(self, gate: GateProc, since: float, timeout: float) -> list[str]:
        """Start the Gate and wait until it is live; a Gate that exits or is
        not live within ``timeout`` is started again, up to
        ``RESTART_ATTEMPTS`` times. What went wrong each time."""
        failures: list[str] = []
        for _ in range(RESTART_ATTEMPTS):
            gate.spawned_at = time.time()
            gate.process = self.spawn("gate", gate.config, gate.log)
            try:
                self.wait_live(gate, since, timeout)
                return failures
            except RuntimeError as exc:
                failures.append(str(exc))
                stop(gate.process)
        raise RuntimeError(f"{gate.name} did not start: {'; '.join(failures)}")

    def wait_live(self, gate: GateProc, since: float, timeout: float) -> None:
        """Until the Gate answers /healthz and the registry shows it live,
        started after ``since`` (wall clock). Raises RuntimeError at once
        when the process exits."""
        process = gate.process
        assert process is not None

        def exited() -> None:
            if (code := process.poll()) is not None:
                raise RuntimeError(f"exited ({code}): {last_line(gate.log)}")

        def answers() -> bool:
            exited()
            return bool(healthz(gate.http))

        def registered() -> bool:
            exited()
            row = self.registry()[gate.name]
            return row.live and row.started_at >= since - 1.0

        wait_for(f"{gate.name}'s /healthz", answers, timeout)
        wait_for(f"{gate.name} live in `qmesh gates`", registered, timeout)

    def registry(self) -> dict[str, GateRow]:
        """The Gates' registry rows, read with SQL (see :func:`read_registry`)."""
        if self._registry is None or self._registry.closed:
            self._registry = psycopg.connect(self.url, autocommit=True, connect_timeout=10)
        return read_registry(self._registry)

    def revive(self) -> tuple[list[str], list[str]]:
        """Start again every Gate that exited without being killed: what each
        said last, and what went wrong restarting it."""
        died, failures = [], []
        for gate in self.gates.values():
            if gate.process is not None and (code := gate.process.poll()) is not None:
                died.append(f"{gate.name} had exited ({code}): {last_line(gate.log)}")
                try:
                    failures += self.start_gate(gate, time.time(), SETUP_TIMEOUT_S)
                except RuntimeError as exc:
                    failures.append(str(exc))
        return died, failures

    def enroll_edge(self, name: str, jitter: float) -> tuple[Path, Path, int, int]:
        """A MiniGate's config: (config, log, llm port, pg port)."""
        credential = self.base / f"{name}.cred"
        self.cli(
            "enroll",
            "minigate",
            name,
            "--out",
            str(credential),
            *(a for g in self.gates.values() for a in ("--gate", f"127.0.0.1:{g.tunnel}")),
        )
        llm, pg = free_port(), free_port()
        config = self.base / f"{name}.toml"
        config.write_text(
            f'data_dir = "{self.base / name}"\n'
            f'[minigate]\ncredential_file = "{credential}"\n'
            f'pg_listen = "127.0.0.1:{pg}"\nllm_listen = "127.0.0.1:{llm}"\n'
            "[tunnel]\nheartbeat_interval_s = 0.5\ndead_after_s = 3.0\n"
            f"failover_jitter_s = {jitter}\n"
            '[log]\nformat = "json"\n'
        )
        return config, self.base / f"{name}.log", llm, pg

    def close(self) -> None:
        if self._registry is not None:
            self._registry.close()
        for process in reversed(self.processes):
            with contextlib.suppress(Exception):
                stop(process)
        self.pg.stop()


class EdgeLog:
    """The MiniGate's JSON log, read as it grows: its connections and warnings."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""
        self.connected: list[tuple[float, int]] = []  # (wall time, Gate tunnel port)
        self.lost: list[tuple[float, int]] = []
        self.warnings: list[tuple[float, str]] = []

    def poll(self) -> None:
        with contextlib.suppress(FileNotFoundError), self.path.open("rb") as f:
            f.seek(self._offset)
            data = f.read()
            self._offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n") if data else [self._partial]
        for line in lines:
            try:
                record = json.loads(line)
                ts = datetime.datetime.fromisoformat(record["ts"].replace("Z", "+00:00"))
            except (ValueError, KeyError, TypeError):
                continue
            when, msg = ts.timestamp(), str(record.get("msg", ""))
            if match := CONNECTED.search(msg):
                self.connected.append((when, int(match.group(2))))
            if match := LOST.search(msg):
                self.lost.append((when, int(match.group(2))))
            if record.get("level") in ("warning", "error", "critical"):
                self.warnings.append((when, f"{record['level']}: {msg}"))


class LlmTraffic:
    """Chat completions one after another on one keep-alive client."""

    def __init__(self, port: int, key: str) -> None:
        self.client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key=f"shop:{key}", max_retries=0, timeout=30
        )
        self.answers: list[tuple[float, float]] = []  # (start, end), wall clock
        self.errors: list[tuple[float, str]] = []  # (end, what)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llm", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)  # a request hung on a dead cluster is not waited for
        self.client.close()

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            started = time.time()
            try:
                reply = self.client.chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": f"request {n}: Gates fail over"}],
                )
                if not reply.choices or reply.choices[0].message.content is None:
                    raise ValueError("an answer without content")
                self.answers.append((started, time.time()))
            except Exception as exc:  # every error counts
                self.errors.append((time.time(), f"{type(exc).__name__}: {exc}"[:200]))


class PgTraffic:
    """``SELECT 1`` every 10 ms; reconnect at once on any error."""

    def __init__(self, port: int, key: str) -> None:
        self.kwargs: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": port,
            "user": "shop",
            "password": key,
            "dbname": "orders",
            "connect_timeout": 30,
        }
        self.selects: list[tuple[float, float]] = []  # (connection opened, end), wall clock
        self.errors: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pg", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            attempt = time.time()
            try:
                with psycopg.connect(**self.kwargs, autocommit=True) as conn:
                    while not self._stop.is_set():
                        if conn.execute("SELECT 1").fetchone() != (1,):
                            raise ValueError("SELECT 1 did not answer 1")
                        self.selects.append((attempt, time.time()))
                        time.sleep(0.01)
            except Exception as exc:  # every error counts; connect again
                self.errors.append((time.time(), f"{type(exc).__name__}: {exc}"[:200]))
                if time.time() - attempt < 0.005:
                    time.sleep(0.005)


def attached_gate(cluster: Cluster, log: EdgeLog) -> GateProc | None:
    """The Gate of the MiniGate's last connection, if it runs and the
    registry says it holds an edge session (``/healthz`` counts the other
    Gates' sessions too)."""
    log.poll()
    if not log.connected:
        return None
    port = log.connected[-1][1]
    gate = next((g for g in cluster.gates.values() if g.tunnel == port), None)
    if gate is None or gate.process is None or gate.process.poll() is not None:
        return None
    row = cluster.registry().get(gate.name)
    return gate if row is not None and row.live and row.sessions >= 1 else None


def kill_round(
    cluster: Cluster, log: EdgeLog, llm: LlmTraffic, pg: PgTraffic, args: argparse.Namespace
) -> Round:
    began = time.time()
    found: list[GateProc] = []

    def ready() -> bool:
        answered = sum(a[1] > began for a in llm.answers[-1000:])
        selected = sum(s[1] > began for s in pg.selects[-1000:])
        if answered < args.steady or selected < 2:
            return False
        gate = attached_gate(cluster, log)
        found[:] = [] if gate is None else [gate]
        return gate is not None

    wait_for("steady traffic through an attached Gate", ready, args.round_timeout)
    victim = found[0]
    assert victim.process is not None
    llm_errors, pg_errors = len(llm.errors), len(pg.errors)
    answers_at, selects_at = len(llm.answers), len(pg.selects)
    killed = time.time()
    victim.process.kill()  # SIGKILL
    victim.process.wait(timeout=SETUP_TIMEOUT_S)
    result = Round(victim.name, killed)
    deadline = time.monotonic() + args.round_timeout
    while not result.complete and time.monotonic() < deadline:
        time.sleep(0.01)
        log.poll()
        if result.lost_s is None:
            ended = [t for t, p in log.lost if t >= killed - 0.001 and p == victim.tunnel]
            if ended:
                result.lost_s = max(0.0, ended[0] - killed)
        if result.attach_s is None:
            moved = [(t, p) for t, p in log.connected if t >= killed - 0.001 and p != victim.tunnel]
            if moved:
                at, port = moved[0]
                result.attach_s = max(0.0, at - killed)
                result.successor = next(g.name for g in cluster.gates.values() if g.tunnel == port)
        if result.attach_s is not None and result.llm_s is None:
            after = killed + result.attach_s
            ends = [end for _, end in llm.answers[answers_at:] if end > after]
            if ends:
                result.llm_s = ends[0] - killed
        if result.pg_s is None:
            fresh = [end for opened, end in pg.selects[selects_at:] if opened > killed]
            if fresh:
                result.pg_s = fresh[0] - killed
    if not result.complete:
        missing = [
            n
            for n, v in (("attach", result.attach_s), ("LLM", result.llm_s), ("PG", result.pg_s))
            if v is None
        ]
        result.note = f"FAILED: no {'/'.join(missing)} within {args.round_timeout:g} s"
    try:
        result.restart_failures = cluster.start_gate(victim, killed, args.round_timeout)
    except RuntimeError as exc:
        result.restart_failures = [str(exc)]
        result.note = (result.note + "; " if result.note else "") + "not restarted"
    time.sleep(0.2)  # traffic still flowing, counted in this round
    log.poll()
    result.llm_errors = len(llm.errors) - llm_errors
    result.pg_errors = len(pg.errors) - pg_errors
    result.warnings = [
        f"+{1000 * (t - killed):6.0f} ms {w}" for t, w in log.warnings if t >= killed - 0.001
    ]
    log.warnings.clear()
    return result


@attrs.define
class Run:
    jitter: float
    rounds: list[Round]
    llm_total: int
    llm_errors: list[str]
    pg_errors: int
    steady_ms: tuple[float, float]  # p50/p99 of LLM request latency outside kills
    started: float
    ended: float


def run_jitter(cluster: Cluster, jitter: float, args: argparse.Namespace) -> Run:
    started = time.time()
    name = f"edge-j{str(jitter).replace('.', '')}"
    config, log_path, llm_port, pg_port = cluster.enroll_edge(name, jitter)
    edge = cluster.spawn("minigate", config, log_path)
    log = EdgeLog(log_path)
    llm = LlmTraffic(llm_port, cluster.app_key)
    pg = PgTraffic(pg_port, cluster.app_key)
    rounds: list[Round] = []
    try:
        wait_for(f"{name} attached to a Gate", lambda: attached_gate(cluster, log))
        wait_for(f"{name}'s LLM port", lambda: socket.create_connection(("127.0.0.1", llm_port), 1))
        llm.start()
        pg.start()
        for i in range(args.kills):
            died, failures = cluster.revive()
            try:
                result = kill_round(cluster, log, llm, pg, args)
            except RuntimeError as exc:  # no attached Gate or no traffic: give the round up
                result = Round("?", time.time(), note=f"FAILED: {exc}")
            result.died = died
            result.restart_failures[:0] = failures
            rounds.append(result)
            print(
                f"jitter {jitter:g}: round {i + 1}/{args.kills} {result.victim} → "
                f"{result.successor} llm {ms(result.llm_s)} pg {ms(result.pg_s)} ms"
                f"{' ' + result.note if result.note else ''}",
                file=sys.stderr,
            )
    finally:
        llm.stop()
        pg.stop()
        stop(edge)
    kills = [x.killed for x in rounds]
    latencies = sorted(
        end - start for start, end in llm.answers if not any(start <= k <= end for k in kills)
    )
    steady = (
        (percentile(latencies, 0.5) * 1000, percentile(latencies, 0.99) * 1000)
        if latencies
        else (float("nan"), float("nan"))
    )
    return Run(
        jitter,
        rounds,
        len(llm.answers) + len(llm.errors),
        [e for _, e in llm.errors],
        len(pg.errors),
        steady,
        started,
        time.time(),
    )


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        cells = [
            row[0].ljust(widths[0]),
            *(c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)),
        ]
        print("  ".join(cells).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def heartbeat_rows(runs: list[Run], watch: HeartbeatWatch) -> list[tuple[str, list[str]]]:
    """The registry as the Gates see it: how stale a running Gate's heartbeat got."""
    oldest, episodes, doubles = [], [], []
    for r in runs:
        samples = [x for x in watch.samples if r.started <= x[0] <= r.ended]
        oldest.append(f"{max((x[1] for x in samples), default=0.0) * 1000:.0f}")
        gone = [x[2] for x in samples]
        episodes.append(str(sum(1 for a, b in zip([0, *gone], gone, strict=False) if b and not a)))
        doubles.append(str(sum(1 for a, b in zip([0, *gone], gone, strict=False)
                               if b >= 2 and a < 2)))  # fmt: skip
    return [
        ("oldest heartbeat, a running Gate (ms)", oldest),
        ("times a running Gate looked gone", episodes),
        ("... 2 or more at once", doubles),
    ]


def report(runs: list[Run], args: argparse.Namespace, watch: HeartbeatWatch) -> None:
    print(
        f"\n{args.gates} Gates on one PostgreSQL state (heartbeat 0.25 s, gone after 1 s), "
        "one MiniGate enrolled with all (tunnel heartbeat 0.5 s, dead after 3 s), "
        f"{args.kills} × kill -9 of its Gate per column; {os.cpu_count()} CPUs, "
        "everything on this machine. Times in ms from the kill."
    )
    rows = [["failover_jitter_s", *(f"{r.jitter:g}" for r in runs)]]
    rows.append(
        ["rounds complete", *(f"{sum(x.complete for x in r.rounds)}/{len(r.rounds)}" for r in runs)]
    )
    measures: list[tuple[str, Callable[[Round], float | None]]] = [
        ("kill → MiniGate saw the connection end", lambda x: x.lost_s),
        ("kill → MiniGate at another Gate", lambda x: x.attach_s),
        ("kill → first LLM answer", lambda x: x.llm_s),
        ("kill → first SELECT 1, new conn", lambda x: x.pg_s),
    ]
    for label, get in measures:
        for name, fraction in (("p50", 0.5), ("p99", 0.99), ("max", 1.0)):
            cells = []
            for r in runs:
                values = sorted(v for x in r.rounds if (v := get(x)) is not None)
                cells.append(ms(percentile(values, fraction)) if values else "-")
            rows.append([f"{label} {name}", *cells])
    rows.append(
        ["LLM requests failed / total", *(f"{len(r.llm_errors)} / {r.llm_total}" for r in runs)]
    )
    rows.append(["Postgres errors (all rounds)", *(str(r.pg_errors) for r in runs)])
    rows.append(
        [
            "Gate restarts that failed",
            *(str(sum(len(x.restart_failures) for x in r.rounds)) for r in runs),
        ]
    )
    rows.append(
        [
            "Gates that exited unkilled",
            *(str(sum(len(x.died) for x in r.rounds)) for r in runs),
        ]
    )
    for label, cells in heartbeat_rows(runs, watch):
        rows.append([label, *cells])
    rows.append(
        [
            "LLM latency outside kills p50/p99",
            *(f"{r.steady_ms[0]:.1f}/{r.steady_ms[1]:.1f}" for r in runs),
        ]
    )
    table(rows)

    for r in runs:
        print(f"\nfailover_jitter_s = {r.jitter:g}, per round (ms from the kill):")
        per = [
            [
                "#",
                "killed",
                "attached to",
                "lost",
                "attach",
                "LLM",
                "PG",
                "LLM err",
                "PG err",
                "note",
            ]
        ]
        for i, x in enumerate(r.rounds, 1):
            per.append(
                [
                    str(i),
                    x.victim,
                    x.successor,
                    ms(x.lost_s),
                    ms(x.attach_s),
                    ms(x.llm_s),
                    ms(x.pg_s),
                    str(x.llm_errors),
                    str(x.pg_errors),
                    x.note,
                ]
            )
        table(per)

    print("\nNotes:")
    noted = False
    for r in runs:
        times = sorted(x.llm_s for x in r.rounds if x.llm_s is not None)
        slow = 3 * percentile(times, 0.5) if times else 0.0
        for i, x in enumerate(r.rounds, 1):
            if x.complete and not x.llm_errors and x.llm_s is not None and x.llm_s <= slow:
                continue
            noted = True
            why = x.note or (f"{x.llm_errors} LLM requests failed" if x.llm_errors else "slow")
            print(f"  jitter {r.jitter:g} round {i} ({why}); MiniGate warnings after the kill:")
            for line in x.warnings[:12] or ["(none)"]:
                print(f"    {line}")
        for error in sorted(set(r.llm_errors)):
            noted = True
            print(f"  jitter {r.jitter:g}: LLM error ×{r.llm_errors.count(error)}: {error}")
        for i, x in enumerate(r.rounds, 1):
            for line in x.died:
                noted = True
                print(f"  jitter {r.jitter:g} before round {i}: {line}")
            for failure in x.restart_failures:
                noted = True
                print(f"  jitter {r.jitter:g} round {i}: restarting {x.victim}: {failure}")
    if not noted:
        print(
            "  no failed round, no failed LLM request, no round over 3× the median, "
            "every Gate restarted at once."
        )


# -- a daemon attached to another Gate ----------------------------------------------------

NODE = "bench-node"
INSTANT_MODEL = "bench-instant"
ROUTE = f"node:{NODE}/{INSTANT_MODEL}"  # the x-qmesh-route of the daemon's candidate
ANSWER = "ok"
WARMUP = 20  # rounds before the measured ones
_USAGE = {"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10}
_MODELS_BODY = json.dumps(
    {"object": "list", "data": [{"id": INSTANT_MODEL, "object": "model", "owned_by": "bench"}]}
).encode()
_COMPLETION_BODY = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 0,
        "model": INSTANT_MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": ANSWER},
                "finish_reason": "stop",
            }
        ],
        "usage": _USAGE,
    }
).encode()
_CHUNK = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0}
_STREAM_BODY = (
    b"".join(
        b"data: " + json.dumps({**_CHUNK, "model": INSTANT_MODEL, **event}).encode() + b"\n\n"
        for event in (
            {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ANSWER}}]},
            {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
            {"choices": [], "usage": _USAGE},
        )
    )
    + b"data: [DONE]\n\n"
)


class InstantServer(http.server.ThreadingHTTPServer):
    """An OpenAI-compatible runtime that answers at once: ``GET /v1/models``
    lists one model; ``POST /v1/chat/completions`` answers ``ok`` (1 token),
    as server-sent events when the body asks ``stream`` (the daemon always
    does: qmesh/daemon/runtimes/openai.py) and as one JSON object otherwise.
    Requests are counted by method, path and whether the daemon sent them."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), InstantHandler)
        self.counts: collections.Counter[tuple[str, str, bool]] = collections.Counter()
        self._thread = threading.Thread(target=self.serve_forever, name="runtime", daemon=True)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self.shutdown()
        self.server_close()


class InstantHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive for the direct client
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        return None

    def _answer(self, status: int, content_type: str, body: bytes) -> None:
        server = self.server
        assert isinstance(server, InstantServer)
        server.counts[(self.command, self.path, self.headers.get("user-agent") == "qmesh")] += 1
        head = (
            f"HTTP/1.1 {status} {'OK' if status == 200 else 'Not Found'}\r\n"
            f"content-type: {content_type}\r\ncontent-length: {len(body)}\r\n\r\n"
        )
        self.wfile.write(head.encode() + body)  # one write: no Nagle/delayed-ACK stall

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            self._answer(200, "application/json", _MODELS_BODY)
        else:
            self._answer(404, "application/json", b'{"error":"not found"}')

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)) or b"{}")
        if self.path != "/v1/chat/completions" or body.get("model") != INSTANT_MODEL:
            self._answer(404, "application/json", b'{"error":"no such model"}')
        elif body.get("stream"):
            self._answer(200, "text/event-stream", _STREAM_BODY)
        else:
            self._answer(200, "application/json", _COMPLETION_BODY)


class ChatPath:
    """Non-streamed chat completions on one keep-alive connection (reopened
    after an error), each checked: HTTP 200, the answer ``ok`` and, at a
    Gate, ``x-qmesh-route`` naming the daemon's candidate."""

    def __init__(self, label: str, port: int, key: str | None, route: str | None) -> None:
        self.label = label
        self.port = port
        self.route = route
        self.headers = {"content-type": "application/json"}
        if key is not None:
            self.headers["authorization"] = f"Bearer {key}"
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.seconds: list[float] = []
        self.errors: list[tuple[int, str]] = []  # (request number, what)

    def ask(self, n: int) -> float:
        """One request's latency in seconds; raises ValueError or OSError."""
        body = json.dumps(
            {
                "model": INSTANT_MODEL,
                "messages": [{"role": "user", "content": f"request {n}: one hop or two"}],
                "max_tokens": 8,
            }
        ).encode()
        if self.conn.sock is None:
            self.conn.connect()
            assert self.conn.sock is not None
            self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        started = time.perf_counter()
        try:
            self.conn.request("POST", "/v1/chat/completions", body, self.headers)
            response = self.conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as exc:
            self.conn.close()
            raise OSError(f"{type(exc).__name__}: {exc}") from None
        elapsed = time.perf_counter() - started
        if response.status != 200:
            raise ValueError(f"HTTP {response.status}: {data[:200]!r}")
        route = response.getheader("x-qmesh-route")
        if self.route is not None and route != self.route:
            raise ValueError(f"routed to {route!r}, not {self.route!r}")
        answer = json.loads(data)
        if answer["choices"][0]["message"]["content"] != ANSWER:
            raise ValueError(f"an unexpected answer: {data[:200]!r}")
        return elapsed

    def measure(self, n: int) -> None:
        try:
            self.seconds.append(self.ask(n))
        except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
            self.errors.append((n, str(exc)[:240]))

    def close(self) -> None:
        self.conn.close()


def node_seen(http_port: int, admin_key: str) -> tuple[str, str | None] | None:
    """(state, gate) of the bench's node in the Gate's ``GET /api/inventory``,
    if it is listed with the instant model."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{http_port}/api/inventory",
        headers={"authorization": f"Bearer {admin_key}"},
    )
    with urllib.request.urlopen(request, timeout=5) as answer:
        body = json.loads(answer.read())
    for node in body["nodes"]:
        if node["name"] == NODE and any(m["id"] == INSTANT_MODEL for m in node["models"]):
            return str(node["state"]), node["gate"]
    return None


@attrs.define
class RemoteRun:
    paths: list[ChatPath]
    pairs: list[float]  # per round: remote − local, seconds
    runtime_calls: dict[str, float]  # the daemon's calls to its runtime, per completion
    cpu_ms: dict[str, float]  # CPU ms per measured round (one request on each path)
    log_lines: list[str]  # the Gates' and the daemon's warnings and failovers meanwhile


def start_daemon(cluster: Cluster, gate: GateProc, runtime_port: int) -> subprocess.Popen[bytes]:
    """``qmesh --role daemon`` enrolled with ``gate`` only, its one runtime
    the instant server, no llama.cpp."""
    credential = cluster.base / f"{NODE}.cred"
    cluster.cli(
        "enroll", "daemon", NODE, "--out", str(credential), "--gate", f"127.0.0.1:{gate.tunnel}"
    )
    config = cluster.base / f"{NODE}.toml"
    config.write_text(
        f'data_dir = "{cluster.base / NODE}"\n'
        f'[daemon]\ncredential_file = "{credential}"\nhealth_listen = "127.0.0.1:0"\n'
        "heartbeat_interval_s = 1.0\nllama_cpp = false\n"
        f'[[daemon.runtime]]\nkind = "openai"\nurl = "http://127.0.0.1:{runtime_port}"\n'
        'name = "instant"\n'
    )
    return cluster.spawn("daemon", config, cluster.base / f"{NODE}.log")


def run_remote(base: Path, args: argparse.Namespace) -> RemoteRun:
    base.mkdir()
    os.chmod(base, 0o755)  # as root the server runs as `postgres`
    # A failed request puts the node aside for gate.routing.cooldown_s (30 s),
    # failing every request for it at that Gate meanwhile: here a failure
    # costs that one request, counted as an error, and the timing goes on.
    cluster = Cluster(base, 2, "[gate.routing]\ncooldown_s = 0\n")
    runtime = InstantServer()
    paths: list[ChatPath] = []
    try:
        runtime.start()
        cluster.start()
        admin = "admin:" + cluster.cli("apps", "add", "admin").strip().splitlines()[-1]
        gate_a, gate_b = cluster.gates["gate-a"], cluster.gates["gate-b"]
        daemon = start_daemon(cluster, gate_b, runtime.port)

        def placed() -> bool:
            if daemon.poll() is not None:
                raise RuntimeError(f"the daemon exited: {last_line(base / f'{NODE}.log')}")
            rows = cluster.registry()
            return (
                node_seen(gate_a.http, admin) == ("fresh", "gate-b")
                and node_seen(gate_b.http, admin) == ("fresh", None)
                and rows["gate-a"].sessions == 0
                and rows["gate-b"].sessions == 1
            )

        wait_for(f"{NODE} fresh at gate-b (its own) and at gate-a (via gate-b)", placed)
        key = f"shop:{cluster.app_key}"
        paths = [
            ChatPath("runtime directly", runtime.port, None, None),
            ChatPath("gate-b → daemon (local node)", gate_b.http, key, ROUTE),
            ChatPath("gate-a → gate-b → daemon (remote)", gate_a.http, key, ROUTE),
        ]
        for path in paths:  # the first answer through each path, then a warm-up
            wait_for(f"an answer through {path.label}", functools.partial(path.ask, 0))
        for i in range(WARMUP):
            for path in paths:
                path.measure(i)
        for path in paths:
            path.seconds.clear()
            path.errors.clear()
        processes = {"gate-a": gate_a.process, "gate-b": gate_b.process, "daemon": daemon}
        cpu_before = {name: cpu_seconds(p.pid if p else None) for name, p in processes.items()}
        calls_before = runtime.counts.copy()
        offsets = {log: log.stat().st_size for log in base.glob("*.log")}
        pairs: list[float] = []
        for i in range(args.requests):
            order = paths[i % 3 :] + paths[: i % 3]  # each path first, second, third in turn
            done = {id(p): len(p.seconds) for p in paths}
            for path in order:
                path.measure(i + 1)
            local, remote = paths[1], paths[2]
            if len(local.seconds) > done[id(local)] and len(remote.seconds) > done[id(remote)]:
                pairs.append(remote.seconds[-1] - local.seconds[-1])
        cpu_ms = {
            name: 1000 * (cpu_seconds(p.pid if p else None) - cpu_before[name]) / args.requests
            for name, p in processes.items()
        }
        calls = runtime.counts - calls_before
        answered = len(paths[1].seconds) + len(paths[2].seconds)
        runtime_calls = {
            f"{method} {target}": count / max(1, answered)
            for (method, target, from_daemon), count in sorted(calls.items())
            if from_daemon
        }
        log_lines = [
            f"{log.stem}: {line}"
            for log, offset in sorted(offsets.items())
            for line in log.read_bytes()[offset:].decode(errors="replace").splitlines()
            if re.search(r"WARNING|ERROR|CRITICAL|trying the next", line)
        ]
        if not placed():
            raise RuntimeError(f"{NODE} is no longer attached to gate-b alone after the run")
        return RemoteRun(paths, pairs, runtime_calls, cpu_ms, log_lines)
    finally:
        for path in paths:
            path.close()
        with contextlib.suppress(Exception):
            cluster.close()
        runtime.stop()
        if args.logs is not None:
            args.logs.mkdir(parents=True, exist_ok=True)
            for log in base.glob("*.log"):
                shutil.copy(log, args.logs / f"remote-{log.name}")


def report_remote(run: RemoteRun, args: argparse.Namespace) -> None:
    print(
        "\nOne daemon attached to gate-b, asked at gate-b (a local node) and at gate-a (a "
        "remote node: gate-a → gate-b over their fabric link → daemon); 2 Gates on one "
        "PostgreSQL state, gate.routing.cooldown_s = 0; the daemon's runtime an instant "
        f"OpenAI-compatible server (a 1-token answer, no model). {args.requests} non-streamed "
        "chat completions per path, one at a time, the paths in turn, one keep-alive "
        f"connection each, after {WARMUP} rounds of warm-up; {os.cpu_count()} CPUs, "
        "everything on this machine. Latency in ms."
    )
    rows = [["path", "p50", "p99", "mean", "max", "answers", "errors"]]
    for path in run.paths:
        ordered = sorted(path.seconds)
        figures = (
            [percentile(ordered, 0.5), percentile(ordered, 0.99), mean(ordered), ordered[-1]]
            if ordered
            else []
        )
        cells = [f"{1000 * v:.2f}" for v in figures] or ["-"] * 4
        rows.append([path.label, *cells, str(len(ordered)), str(len(path.errors))])
    local, remote = (sorted(p.seconds) for p in run.paths[1:])
    if local and remote:
        rows.append(
            [
                "remote − local",
                *(
                    f"{1000 * (percentile(remote, f) - percentile(local, f)):+.2f}"
                    for f in (0.5, 0.99)
                ),
                f"{1000 * (mean(remote) - mean(local)):+.2f}",
                "",
                "",
                "",
            ]
        )
    table(rows)
    if run.pairs:
        print(
            f"remote − local within a round (its two requests), median "
            f"{1000 * percentile(sorted(run.pairs), 0.5):+.2f} ms over {len(run.pairs)} rounds"
        )
    print(
        "CPU ms per measured round (one request on each path): "
        + ", ".join(f"{name} {cpu:.2f}" for name, cpu in run.cpu_ms.items())
    )
    print(
        "the daemon's calls to its runtime per completion: "
        + (", ".join(f"{call} {n:.2f}" for call, n in run.runtime_calls.items()) or "none")
    )
    for path in run.paths:
        kinds: dict[str, list[int]] = {}
        for n, error in path.errors:
            kinds.setdefault(re.sub(r"\d+\.\d+ s\b", "N s", error), []).append(n)
        for error, numbers in kinds.items():
            shown = ", ".join(map(str, numbers[:10])) + (", …" if len(numbers) > 10 else "")
            print(f"  {path.label}: error ×{len(numbers)} (request {shown}): {error}")
    if run.log_lines:
        print("their logs meanwhile (warnings, failovers):")
        for line in run.log_lines[:20]:
            print(f"  {line[:300]}")


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def source_digests() -> dict[str, str]:
    """qmesh's source files: a Gate restarted mid-run loads them again."""
    return {
        str(path.relative_to(ROOT)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted((ROOT / "qmesh").rglob("*.py"))
    }


def interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_failover(base: Path, args: argparse.Namespace) -> None:
    """The first part: kill rounds per jitter value, then its report."""
    jitters = [float(j) for j in args.jitter.split(",")]
    cluster = Cluster(base, args.gates)
    watch = HeartbeatWatch(cluster)
    runs: list[Run] = []
    try:
        cluster.start()
        watch.start()
        for jitter in jitters:
            runs.append(run_jitter(cluster, jitter, args))
    finally:
        watch.stop()
        with contextlib.suppress(Exception):
            cluster.close()
        if args.logs is not None:
            args.logs.mkdir(parents=True, exist_ok=True)
            for log in base.glob("*.log"):
                shutil.copy(log, args.logs / log.name)
    report(runs, args, watch)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only", choices=("failover", "remote"), help="run one part (default: both, in turn)"
    )
    parser.add_argument("--kills", type=int, default=20, help="kill -9 rounds per jitter value")
    parser.add_argument(
        "--jitter", default="0.5,0.1", help="tunnel.failover_jitter_s values, one column each"
    )
    parser.add_argument("--gates", type=int, default=3, help="Gate processes (at least 2)")
    parser.add_argument(
        "--steady", type=int, default=5, help="LLM answers in a round before its kill"
    )
    parser.add_argument(
        "--round-timeout", type=float, default=60.0, help="seconds before a round counts as failed"
    )
    parser.add_argument(
        "--requests", type=int, default=300, help="remote part: chat completions per path"
    )
    parser.add_argument("--logs", type=Path, help="copy the processes' logs here at the end")
    args = parser.parse_args()
    if args.gates < 2:
        parser.error("--gates must be at least 2")
    if args.requests < 1:
        parser.error("--requests must be at least 1")
    # SIGTERM as Ctrl-C: the finally blocks stop every process and remove the directory.
    signal.signal(signal.SIGTERM, interrupt)
    base = Path(tempfile.mkdtemp(prefix="qmesh-cluster-bench-"))
    os.chmod(base, 0o755)  # as root the server runs as `postgres`
    sources = source_digests()
    try:
        if args.only in (None, "failover"):
            run_failover(base, args)
        if args.only in (None, "remote"):
            report_remote(run_remote(base / "remote", args), args)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    after = source_digests()
    changed = sorted(n for n in sources.keys() | after.keys() if sources.get(n) != after.get(n))
    if changed:
        print(
            f"\nWARNING: qmesh/ changed during the run (Gates restarted after that ran "
            f"other code): {', '.join(changed[:10])}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
