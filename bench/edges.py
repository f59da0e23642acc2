"""Many edges holding idle tunnel sessions to one Gate: the Gate's memory per
session, its threads and descriptors, the time to accept them all, and a
chat completion's latency with all of them connected.

Usage:
    .venv/bin/python bench/edges.py [--edges 1000,5000,10000]
        [--per-process 2500] [--in-flight 128] [--requests 2000]
        [--settle 12] [--stall 20] [--connect-timeout 300]

What runs (all on 127.0.0.1 and OS-chosen free ports, each a separate
process; nothing is pinned, the machine's cores are shared by all):
- backend: ``bench/gateway.py --backend PORT``, the instant OpenAI-compatible
  server of bench/gateway.py (every chat completion answered at once with
  the same JSON);
- for each size in ``--edges``, a fresh Gate: ``python -m qmesh --role
  gate`` with its own throwaway data directory (``keys init``, ``secrets
  init-master-key``, ``apps add bench``), one priced provider model pointing
  at the backend, log level warning, and the default session cap (the
  open-file limit less an eighth kept in reserve: 17,500 under 20,000
  descriptors). Before it starts, the size's edges are enrolled in its
  state in one go (``qmesh.identity.enroll`` on one ``StateStore``: a key
  pair each, the public half stored; about 0.1 ms an edge);
- load processes (this script with ``--load``; ``ceil(edges /
  --per-process)`` of them, 2,500 edges each by default, so none holds
  more than about 5,000 descriptors): each is a Trio program with one real
  ``qmesh.tunnel.TunnelClient`` per edge (role ``minigate``, default tunnel
  settings: a heartbeat every 5 s, real Noise handshakes against the Gate's
  key and the enrolled edge keys). They start, build their clients, say
  ready, and on "go" (sent to all at once) connect with at most
  ``--in-flight`` handshakes under way across all of them (the Gate sheds
  handshakes past ``tunnel.max_handshakes_in_flight``, 256, and the edge
  retries after a back-off; the retries are counted). Every edge then holds
  its session, idle but for heartbeats, until the size is done.

Per size, in this order: the Gate up; 20 warm-up and ``--requests`` (2,000)
sequential chat completions (``POST /v1/chat/completions`` with the app key,
one keep-alive connection, non-streamed, each checked for a 200) with no
edge, giving p50/p99; the Gate's RSS (``VmRSS``), threads (``Threads``;
engine threads are those named ``qmesh-engine-*``) and descriptors (``ls
/proc/PID/fd``) from /proc; "go"; the time from "go" until the last edge's
session is up (the load processes report the moment their last edge
connects); ``--settle`` seconds (12: past one heartbeat, and past Trio's
10 s idle timeout for the worker threads that the handshakes' state
lookups used); the Gate's RSS, threads and descriptors again and the
Gate's own session count (``qmesh gates --json``); the same chat
completions with all edges connected; then the load processes and the Gate
are stopped. Memory per session is (RSS with the sessions - RSS before) /
sessions, both sampled after the no-edge chat completions so the HTTP path
is warm in both.

A size the machine cannot hold (here a process may hold at most 20,000
descriptors, ``ulimit -Hn``, and the Gate cannot raise its soft limit past
that) is measured with what fits: once the Gate holds its open-file limit
less 400 descriptors (room for the chat completions' connections), or no
edge has connected for ``--stall`` seconds, the edges still connecting are
stopped (the connected ones stay); the row then shows how many sessions
were up, and a note says why and after how long.

Printed: one table, two rows per size (the Gate with no edge, then with
them all): edges, sessions up (edges whose client is connected: the
divisor of the per-session figures), time to connect all, Gate RSS MiB,
KiB per session, threads (engine threads), descriptors and descriptors per
session, chat p50/p99 ms. Then per size: the load processes' threads,
descriptors and memory, handshakes retried, the CPU the Gate and the load
processes used while the sessions sat idle (over ``--settle``), the Gate's
peak threads and descriptors while accepting, its own session count and
the warnings in its log. Then the issue's targets with met / NOT met
(nothing is asserted): Gate memory per idle session ≤ 128 KiB; engine
threads ≤ cores; no thread per session anywhere (the threads the sessions
add to the Gate, and each load process's threads, fewer than one per 100
sessions, or than 8 for a small size); a chat completion's latency with
all connected ≤ 2× the figure with none (p50 and p99; 2,000 requests, so
that the p99 is the 20th slowest rather than, as with 200, the second: a
single stall of the shared machine no longer decides it); and the issue's descriptor
budget, under two descriptors a session (10,000 sessions in 20,000). The
time to accept them all is printed with no target.

Subprocesses and the temporary directory are removed on exit, Ctrl-C and
SIGTERM included. On a small shared machine the timings move by tens of
percent between runs.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any

from benchkit import cpu_seconds, stop

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
GATEWAY = ROOT / "bench" / "gateway.py"
ENV = {k: v for k, v in os.environ.items() if not k.startswith("QMESH_")}
MODEL = "bench-model"  # as bench/gateway.py's backend answers
REQUEST = json.dumps(
    {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 16,
    },
    separators=(",", ":"),
).encode()
WARMUP = 20
HEADROOM = 400
"""Descriptors the Gate keeps free when a size does not fit: the edges still
connecting are stopped once it holds its open-file limit less this many
(room for the chat completions' connections, and for the sessions that
finish their handshakes meanwhile)."""
MEMORY_TARGET_KIB = 128
LATENCY_TARGET = 2.0


# -- the load process (runs as `edges.py --load SPEC`) --------------------------------


class _Retries(logging.Handler):
    """Counts the tunnel client's "cannot reach gate" warnings (a refused
    or shed handshake, retried after a back-off)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0
        self.last = ""

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith("qmesh.tunnel"):
            self.count += 1
            with contextlib.suppress(Exception):
                self.last = record.getMessage()


def _proc_status(pid: int | str) -> dict[str, str]:
    text = Path(f"/proc/{pid}/status").read_text()
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def process_stats(pid: int | str) -> dict[str, int]:
    """RSS (KiB), threads, engine threads and open descriptors of a process."""
    status = _proc_status(pid)
    engine = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/task/{task}/comm").read_text().startswith("qmesh-engine"):
                engine += 1
    return {
        "rss_kib": int(status["VmRSS"].split()[0]),
        "threads": int(status["Threads"]),
        "engine": engine,
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
    }


def run_load(spec_path: str) -> None:
    import trio

    from qmesh.fastsocket import raise_open_file_limit

    raise_open_file_limit()
    retries = _Retries()
    logging.basicConfig(level=logging.WARNING, handlers=[retries])
    spec = json.loads(Path(spec_path).read_text())
    trio.run(_load, spec, retries)


def _say(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def _load(spec: dict[str, Any], retries: _Retries) -> None:
    import trio

    from qmesh.config import TunnelConfig
    from qmesh.tunnel import TunnelClient

    settings = TunnelConfig()
    gate_public = bytes.fromhex(spec["gate_public_key"])
    address = [("127.0.0.1", int(spec["port"]))]
    clients = [
        TunnelClient(
            settings,
            name=name,
            role="minigate",
            private_key=bytes.fromhex(private),
            gate_public_key=gate_public,
            gate_addresses=address,
        )
        for name, private in spec["edges"]
    ]
    scopes = [trio.CancelScope() for _ in clients]
    limiter = trio.CapacityLimiter(int(spec["in_flight"]))
    trying = [False] * len(clients)  # past the limiter: a handshake under way
    up = 0
    started = 0.0

    def report(**extra: Any) -> None:
        _say(
            {
                "up": up,
                "connected": sum(c.connected for c in clients),
                "retries": retries.count,
                "last_retry": retries.last,
                **process_stats("self"),
                **extra,
            }
        )

    async def edge(index: int) -> None:
        nonlocal up
        client = clients[index]
        with scopes[index]:
            async with trio.open_nursery() as own:
                async with limiter:
                    trying[index] = True
                    await own.start(client.run)
                    await client.wait_connected()
                up += 1
                if up == len(clients):
                    report(all=trio.current_time() - started)

    async def command() -> str:
        line: str = await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
        return line.strip()

    _say({"ready": len(clients)})
    if await command() != "go":
        return
    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        for index in range(len(clients)):
            nursery.start_soon(edge, index)

        async def reporter() -> None:
            while True:
                await trio.sleep(0.5)
                report()

        nursery.start_soon(reporter)
        while True:
            line = await command()
            if line == "stop":
                # Stop the edges that have not begun; those whose handshake
                # is under way get a few seconds to finish (cancelled mid-way,
                # the Gate could be left holding a session nobody uses);
                # then the ones still trying stop too. The connected stay.
                for index, scope in enumerate(scopes):
                    if not trying[index]:
                        scope.cancel()
                await trio.sleep(3)
                for client, scope in zip(clients, scopes, strict=True):
                    if not client.connected:
                        scope.cancel()
                await trio.sleep(1)
                report(stopped=True)
            else:  # EOF: the size is done
                nursery.cancel_scope.cancel()
                return


# -- helpers --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the process exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listened on port {port} within {timeout:g} s")


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def chat_latency(port: int, token: str, count: int) -> list[float]:
    """``WARMUP`` then ``count`` sequential chat completions on one keep-alive
    connection; each one's time in ms."""
    headers = {"content-type": "application/json", "authorization": f"Bearer {token}"}
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    times: list[float] = []
    try:
        for index in range(WARMUP + count):
            start = time.perf_counter()
            connection.request("POST", "/v1/chat/completions", REQUEST, headers)
            response = connection.getresponse()
            body = response.read()
            elapsed = (time.perf_counter() - start) * 1000
            if response.status != 200 or b"Hello" not in body:
                raise RuntimeError(f"chat completion: HTTP {response.status}: {body[:300]!r}")
            if index >= WARMUP:
                times.append(elapsed)
    finally:
        connection.close()
    return times


def _die_with_parent() -> None:
    """In a child, before exec: a SIGTERM when this script dies, however."""
    import ctypes

    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Load:
    """One load process and what it last reported."""

    def __init__(self, spec: Path, count: int) -> None:
        self.count = count
        self.process = subprocess.Popen(
            [PYTHON, __file__, "--load", str(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=(spec.parent / f"{spec.stem}.log").open("wb"),
            text=True,
            cwd=ROOT,
            preexec_fn=_die_with_parent,
        )
        self.ready = threading.Event()
        self.last: dict[str, Any] = {}
        self.done_at: float | None = None  # monotonic, when its last edge connected
        self.max_threads = 0
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            message = json.loads(line)
            if "ready" in message:
                self.ready.set()
                continue
            if "all" in message and self.done_at is None:
                self.done_at = time.monotonic()
            self.max_threads = max(self.max_threads, message.get("threads", 0))
            self.last = message

    def send(self, line: str) -> None:
        stdin: IO[str] | None = self.process.stdin
        assert stdin is not None
        with contextlib.suppress(OSError):
            stdin.write(line + "\n")
            stdin.flush()

    def close(self) -> None:
        if self.process.stdin is not None:
            with contextlib.suppress(OSError):
                self.process.stdin.close()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            stop(self.process, sig=signal.SIGKILL)

    def log_tail(self, spec_dir: Path, index: int) -> str:
        text = (spec_dir / f"load-{index}.log").read_text(errors="replace")
        return text[-1500:]


# -- one size --------------------------------------------------------------------------------


def start_gate(
    work: Path, backend_port: int, edges: int
) -> tuple[subprocess.Popen[bytes], int, str, Path]:
    """A Gate's data directory with ``edges`` enrolled edges, then the Gate."""
    from qmesh.config import load_config
    from qmesh.identity import GateKeys, enroll
    from qmesh.state import StateStore

    data = work / "data"
    tunnel_port, http_port = free_port(), free_port()
    config = work / "gate.toml"
    config.write_text(
        f'data_dir = "{data}"\n[log]\nlevel = "warning"\n'
        f'[gate]\ntunnel_listen = "127.0.0.1:{tunnel_port}"\n'
        f'http_listen = "127.0.0.1:{http_port}"\n'
        f'[[gate.providers]]\nname = "bench"\nbase_url = "http://127.0.0.1:{backend_port}/v1"\n'
        f'[[gate.providers.models]]\nid = "{MODEL}"\nprice_in = 0.15\nprice_out = 0.6\n'
    )
    cli(config, "keys", "init")
    cli(config, "secrets", "init-master-key")
    key = cli(config, "apps", "add", "bench").strip()
    settings = load_config(config, env={})
    keys = GateKeys.load(settings.data_dir, env={})
    address = f"127.0.0.1:{tunnel_port}"
    credentials = []
    with StateStore.open(settings.state_location) as store:
        for index in range(edges):
            credential = enroll(store, keys, "minigate", f"edge-{index}", address)
            credentials.append((credential.name, credential.private_key.hex()))
    per_file = work / "edges.json"
    per_file.write_text(
        json.dumps(
            {"gate_public_key": keys.public_key.hex(), "port": tunnel_port, "edges": credentials}
        )
    )
    gate = subprocess.Popen(
        [PYTHON, "-m", "qmesh", "--config", str(config), "--role", "gate"],
        stdout=subprocess.DEVNULL,
        stderr=(work / "gate.log").open("wb"),
        env=ENV,
        cwd=ROOT,
        preexec_fn=_die_with_parent,
    )
    wait_port(http_port, 60, gate)
    wait_port(tunnel_port, 60, gate)
    return gate, http_port, f"bench:{key}", config


def cli(config: Path, *args: str) -> str:
    """``qmesh --config CONFIG ARGS...``; its standard output."""
    return subprocess.run(
        [PYTHON, "-m", "qmesh", "--config", str(config), *args],
        check=True,
        capture_output=True,
        text=True,
        env=ENV,
        cwd=ROOT,
    ).stdout


def gate_sessions(config: Path) -> int | None:
    """The Gate's own count of its edge sessions, from its registry row."""
    with contextlib.suppress(ValueError, LookupError, TypeError, subprocess.CalledProcessError):
        return int(json.loads(cli(config, "gates", "--json"))[0]["sessions"])
    return None


def measure(work: Path, backend_port: int, edges: int, args: argparse.Namespace) -> dict[str, Any]:
    work.mkdir()
    result: dict[str, Any] = {"edges": edges, "note": ""}
    gate, http_port, token, config = start_gate(work, backend_port, edges)
    loads: list[Load] = []
    try:
        none = chat_latency(http_port, token, args.requests)
        result["none"] = process_stats(gate.pid)
        result["none_p50"], result["none_p99"] = percentile(none, 0.5), percentile(none, 0.99)
        result["limit"] = _soft_fd_limit(gate.pid)

        spec = json.loads((work / "edges.json").read_text())
        processes = max(1, math.ceil(edges / args.per_process))
        in_flight = max(1, math.ceil(args.in_flight / processes))
        share = math.ceil(edges / processes)
        for index in range(processes):
            part = spec["edges"][index * share : (index + 1) * share]
            path = work / f"load-{index}.json"
            path.write_text(json.dumps({**spec, "edges": part, "in_flight": in_flight}))
            loads.append(Load(path, len(part)))
        for index, load in enumerate(loads):
            if not load.ready.wait(120):
                raise RuntimeError(
                    f"load process {index} did not start: {load.log_tail(work, index)}"
                )
        result["processes"] = processes

        go = time.monotonic()
        for load in loads:
            load.send("go")
        peak_threads = peak_fds = 0
        progress, progress_at = 0, go
        while True:
            time.sleep(0.1)
            now = time.monotonic()
            with contextlib.suppress(OSError, KeyError):
                stats = process_stats(gate.pid)
                peak_threads = max(peak_threads, stats["threads"])
                peak_fds = max(peak_fds, stats["fds"])
            for index, load in enumerate(loads):
                if load.process.poll() is not None:
                    raise RuntimeError(
                        f"load process {index} exited ({load.process.returncode}): "
                        + load.log_tail(work, index)
                    )
            if gate.poll() is not None:
                raise RuntimeError(f"the Gate exited ({gate.returncode})")
            if all(load.done_at is not None for load in loads):
                result["connect_s"] = max(load.done_at or 0 for load in loads) - go
                break
            up = sum(load.last.get("up", 0) for load in loads)
            if up > progress:
                progress, progress_at = up, now
            full = peak_fds >= result["limit"] - HEADROOM
            if full or now - progress_at > args.stall or now - go > args.connect_timeout:
                why = (
                    f"the Gate held {peak_fds:,} descriptors of its {result['limit']:,} "
                    f"(~{peak_fds / max(1, up):.2f} a session)"
                    if full
                    else f"none more came up for {now - progress_at:.0f} s"
                )
                for load in loads:
                    load.send("stop")
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline and not all(
                    load.last.get("stopped") for load in loads
                ):
                    time.sleep(0.1)
                result["connect_s"] = None
                result["note"] = (
                    f"{edges:,} edges do not fit: {why} after {now - go:.1f} s, at {up:,} "
                    "sessions, so the edges still connecting were stopped; the row measures "
                    "the sessions that were up"
                )
                break
        result["peak_threads"], result["peak_fds"] = peak_threads, peak_fds

        pids = [gate.pid] + [load.process.pid for load in loads]
        cpu_before, cpu_start = [cpu_seconds(pid) for pid in pids], time.monotonic()
        time.sleep(args.settle)
        elapsed = time.monotonic() - cpu_start
        used = [cpu_seconds(pid) - before for pid, before in zip(pids, cpu_before, strict=True)]
        result["gate_cpu"] = used[0] / elapsed * 100
        result["load_cpu"] = sum(used[1:]) / elapsed * 100
        result["all"] = process_stats(gate.pid)
        result["up"] = sum(load.last.get("connected", 0) for load in loads)
        result["gate_sessions"] = gate_sessions(config)
        result["retries"] = sum(load.last.get("retries", 0) for load in loads)
        result["last_retry"] = next(
            (load.last["last_retry"] for load in loads if load.last.get("last_retry")), ""
        )
        result["load_threads"] = max(load.max_threads for load in loads)
        result["load_engine"] = max(load.last.get("engine", 0) for load in loads)
        result["load_fds"] = max(load.last.get("fds", 0) for load in loads)
        result["load_rss_kib"] = sum(load.last.get("rss_kib", 0) for load in loads)
        result["load_share"] = max(load.count for load in loads)
        try:
            loaded = chat_latency(http_port, token, args.requests)
            result["all_p50"] = percentile(loaded, 0.5)
            result["all_p99"] = percentile(loaded, 0.99)
        except (OSError, RuntimeError) as exc:
            result["all_p50"] = result["all_p99"] = None
            result["note"] += f"; chat completions with the edges connected failed: {exc}"
        # Still all there after the measurement?
        result["up_after"] = sum(load.last.get("connected", 0) for load in loads)
    finally:
        for load in loads:
            load.close()
        stop(gate)
    log = (work / "gate.log").read_text(errors="replace")
    lines = log.splitlines()
    result["gate_errors"] = sum(1 for line in lines if " ERROR " in line or "Traceback" in line)
    result["gate_warnings"] = sum(1 for line in lines if " WARNING " in line)
    return result


def _soft_fd_limit(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    return 0


# -- the report ------------------------------------------------------------------------------


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    cores = os.cpu_count() or 1

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    print(
        f"one Gate per size; edges in load processes of ≤ {args.per_process:,} each, "
        f"≤ {args.in_flight} handshakes in flight in all; default tunnel settings "
        f"(heartbeat 5 s); {cores} cores shared by everything; chat: {args.requests} "
        "sequential non-streamed completions on one keep-alive connection"
    )
    header = (
        f"{'edges':>7} {'sessions':>8} {'connect s':>9} {'RSS MiB':>8} {'KiB/sess':>8} "
        f"{'threads':>7} {'engine':>6} {'fds':>6} {'fds/sess':>8} {'chat p50':>8} "
        f"{'chat p99':>8}"
    )
    print(header)
    for r in results:
        if "none" not in r:
            print(f"{r['edges']:>7,} not measured: {r['error']}")
            continue
        base = r["none"]
        print(
            f"{0:>7} {0:>8} {'-':>9} {base['rss_kib'] / 1024:>8.1f} {'-':>8} "
            f"{base['threads']:>7} {base['engine']:>6} {base['fds']:>6,} {'-':>8} "
            f"{ms(r['none_p50']):>8} {ms(r['none_p99']):>8}"
        )
        if "all" not in r:
            print(f"{r['edges']:>7,} not measured: {r.get('error', '?')}")
            continue
        full = r["all"]
        up = r["up"]
        per_kib = (full["rss_kib"] - base["rss_kib"]) / up if up else float("nan")
        fds_per = (full["fds"] - base["fds"]) / up if up else float("nan")
        connect = "-" if r["connect_s"] is None else f"{r['connect_s']:.2f}"
        print(
            f"{r['edges']:>7,} {up:>8,} {connect:>9} {full['rss_kib'] / 1024:>8.1f} "
            f"{per_kib:>8.1f} {full['threads']:>7} {full['engine']:>6} {full['fds']:>6,} "
            f"{fds_per:>8.2f} {ms(r['all_p50']):>8} {ms(r['all_p99']):>8}"
        )
    print(
        "(each size: its Gate with no edge, then with all connected; chat in ms; KiB/sess and "
        "fds/sess: the growth over the no-edge row / sessions; threads and fds sampled "
        f"{args.settle:g} s after the last edge connected)"
    )
    print()
    for r in results:
        if "all" not in r:
            continue
        gate_count = "?" if r["gate_sessions"] is None else f"{r['gate_sessions']:,}"
        retried = f"{r['retries']:,} handshakes retried" + (
            f" (the last: {r['last_retry'][:100]})" if r["retries"] else ""
        )
        print(
            f"{r['edges']:,} edges: {r['processes']} load process(es) of ≤ {r['load_share']:,} "
            f"edges, each with ≤ {r['load_threads']} threads ({r['load_engine']} engine) and "
            f"≤ {r['load_fds']:,} descriptors, {r['load_rss_kib'] / 1024:.0f} MiB RSS in all; "
            f"{retried}\n"
            f"  while accepting, the Gate peaked at {r['peak_threads']} threads and "
            f"{r['peak_fds']:,} descriptors (limit {r['limit']:,})\n"
            f"  idle, over {args.settle:g} s: the Gate used {r['gate_cpu']:.1f} % of a core, "
            f"the load processes {r['load_cpu']:.1f} %\n"
            f"  the Gate counted {gate_count} sessions; {r['up_after']:,} edges still connected "
            f"after the chat run; the Gate's log: {r['gate_errors']} errors, "
            f"{r['gate_warnings']} warnings"
        )
        if r["note"]:
            print(f"note: {r['note']}")
    for r in results:
        if "all" not in r and r.get("error"):
            print(f"note: {r['edges']:,} edges: {r['error']}")
    print()
    print("targets:")

    def verdict(label: str, value: float, limit: float, unit: str, below: bool = False) -> None:
        ok = value < limit if below else value <= limit
        sign = "<" if below else "≤"
        shown = f"{value:,.0f}" if float(value).is_integer() else f"{value:,.2f}"
        verdict_text = "met" if ok else "NOT met"
        print(f"  {label:<50} {shown:>8} {unit:<8} ({sign} {limit:,.4g}) {verdict_text}")

    for r in results:
        if "all" not in r:
            print(f"  {r['edges']:,} edges: not measured, every target NOT met")
            continue
        base, full, up = r["none"], r["all"], r["up"]
        label = f"{up:,} sessions:"
        if up < r["edges"]:
            print(f"  {r['edges']:,} edges connected: only {up:,}   NOT met")
        if up:
            per_kib = (full["rss_kib"] - base["rss_kib"]) / up
            verdict(f"{label} Gate memory per idle session", per_kib, MEMORY_TARGET_KIB, "KiB")
        verdict(f"{label} Gate engine threads", full["engine"], cores, "(cores)")
        # No thread per session: fewer than one per 100 sessions (and than 8).
        verdict(
            f"{label} Gate threads added by the sessions",
            full["threads"] - base["threads"],
            max(8, up / 100),
            "threads",
            below=True,
        )
        verdict(
            f"{label} threads of a load process",
            r["load_threads"],
            max(8, r["load_share"] / 100),
            "threads",
            below=True,
        )
        if up:
            verdict(
                f"{label} Gate descriptors per session",
                (full["fds"] - base["fds"]) / up,
                2,
                "fds",
                below=True,
            )
        for q in ("p50", "p99"):
            loaded, idle = r[f"all_{q}"], r[f"none_{q}"]
            if loaded is None:
                print(f"  {label} chat {q}: not measured   NOT met")
            else:
                verdict(
                    f"{label} chat {q} with all / with none", loaded / idle, LATENCY_TARGET, "x"
                )
    print("  (descriptors: the issue's budget, 10,000 sessions in a process's 20,000)")
    sizes = [r for r in results if r.get("connect_s") is not None]
    if sizes:
        print(
            "  time to accept them all (no target): "
            + ", ".join(f"{r['edges']:,} in {r['connect_s']:.2f} s" for r in sizes)
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edges", default="1000,5000,10000", help="sizes, comma-separated")
    parser.add_argument(
        "--per-process", type=int, default=2500, help="edges per load process (2500)"
    )
    parser.add_argument(
        "--in-flight", type=int, default=128, help="handshakes under way at once, in all (128)"
    )
    parser.add_argument(
        "--requests", type=int, default=2000, help="chat completions per measurement (2000)"
    )
    parser.add_argument(
        "--settle", type=float, default=12.0, help="seconds between connected and sampling (12)"
    )
    parser.add_argument(
        "--stall", type=float, default=20.0, help="give up on a size after this long without "
        "a new session, and measure what came up (20)"
    )  # fmt: skip
    parser.add_argument("--connect-timeout", type=float, default=300.0)
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--load", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load is not None:
        run_load(args.load)
        return
    sizes = [int(s) for s in args.edges.split(",") if s.strip()]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = Path(tempfile.mkdtemp(prefix="qmesh-edges-bench-"))
    results: list[dict[str, Any]] = []
    backend: subprocess.Popen[bytes] | None = None
    try:
        backend_port = free_port()
        backend = subprocess.Popen(
            [PYTHON, str(GATEWAY), "--backend", str(backend_port)],
            cwd=ROOT,
            preexec_fn=_die_with_parent,
        )
        wait_port(backend_port, 20, backend)
        for size in sizes:
            print(f"... {size:,} edges", file=sys.stderr, flush=True)
            try:
                results.append(measure(work / f"edges-{size}", backend_port, size, args))
            except RuntimeError as exc:
                results.append({"edges": size, "error": str(exc)})
    finally:
        if backend is not None:
            stop(backend)
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    report(results, args)


if __name__ == "__main__":
    main()
