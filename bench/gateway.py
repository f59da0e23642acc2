"""The Gate's OpenAI-compatible endpoint vs the LiteLLM proxy, in front of
the same instant backend, measured with wrk. One run, one table.

Usage:
    .venv/bin/python bench/gateway.py [--seconds 10] [--connections 1,64]
        [--litellm PATH] [--skip-litellm] [--pg-state]

What runs (all on loopback, each a separate process):
- backend: a small asyncio server (below) that answers every
  ``POST /v1/chat/completions`` at once with the same JSON completion,
  keep-alive, no parsing beyond the HTTP head;
- the Gate: ``python -m qmesh --role gate`` with one priced provider model
  (``bench-model``) pointing at the backend, log level warning; requests
  carry an app key (``Authorization: Bearer bench:KEY``), name the model,
  and go through auth, routing, the pooled upstream client and the ledger;
- with ``--pg-state``, the same Gate a second time with its state in
  PostgreSQL (``gate.database_url``, a throwaway cluster from
  scripts/pgcluster.py on the same machine), so the two backends are
  compared in one run;
- LiteLLM: ``litellm --config … --num_workers 1`` (from ``--litellm``, by
  default ``.cache/bench/litellm-venv/bin/litellm``; install it there with
  ``python3 -m venv .cache/bench/litellm-venv &&
  .cache/bench/litellm-venv/bin/pip install 'litellm[proxy]'``), offline
  (``LITELLM_LOCAL_MODEL_COST_MAP=True``, ``LITELLM_TELEMETRY_DISABLED=true``)
  with a master key.

Pinning (``taskset``): wrk and the backend share CPU 0, the gateway under
test gets CPU 1. wrk posts a fixed chat body (a Lua script sets method, body
and headers) with 1 and 64 connections for ``--seconds`` each. Added
latency is the gateway's wrk percentile minus the direct backend's at the
same connection count; "of direct" is the gateway's req/s as a fraction of
the direct backend's in the same run. Nothing is asserted.

Targets: added p50 ≤ 0.5 ms at 1 client; ≥ 4 % of the direct
backend's req/s; ≥ 25× LiteLLM's req/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
MODEL = "bench-model"
COMPLETION = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1700000000,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello from the bench backend."},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19},
    },
    separators=(",", ":"),
).encode()
REQUEST = json.dumps(
    {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 16,
    },
    separators=(",", ":"),
)


# -- the instant backend (runs as `gateway.py --backend PORT`) -------------------


class _Backend(asyncio.Protocol):
    RESPONSE = (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
        % (len(COMPLETION), COMPLETION)
    )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].lower()
            match = re.search(rb"content-length:\s*(\d+)", head)
            length = int(match.group(1)) if match else 0
            total = end + 4 + length
            if len(self.buffer) < total:
                return
            self.buffer = self.buffer[total:]
            self.transport.write(self.RESPONSE)


def run_backend(port: int) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_Backend, "127.0.0.1", port, backlog=1024)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


# -- helpers ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, *, timeout: float, headers: dict[str, str] | None = None) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            request = urllib.request.Request(url, headers=headers or {})
            with urllib.request.urlopen(request, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answers: up
        except OSError as exc:
            last = exc
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up in {timeout:g} s ({last})")


def post_once(url: str, token: str) -> dict[str, Any]:
    request = urllib.request.Request(
        url,
        data=REQUEST.encode(),
        headers={"content-type": "application/json", "authorization": f"Bearer {token}"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        result: dict[str, Any] = json.loads(response.read())
        return result


def taskset(cpu: int) -> list[str]:
    return ["taskset", "-c", str(cpu)] if shutil.which("taskset") else []


_WRK_LATENCY = re.compile(r"^\s*(50|99)%\s+([\d.]+)(us|ms|s)\s*$", re.M)


def cpu_seconds(pid: int | None) -> float:
    """CPU time of a process and its children (LiteLLM may fork a worker)."""
    if pid is None:
        return 0.0
    import psutil

    try:
        root = psutil.Process(pid)
        total = 0.0
        for process in (root, *root.children(recursive=True)):
            times = process.cpu_times()
            total += times.user + times.system
        return total
    except psutil.Error:
        return 0.0


def wrk(
    url: str, token: str, connections: int, seconds: float, lua: Path, pid: int | None = None
) -> dict[str, float]:
    command = [
        *taskset(0),
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{seconds:g}s",
        "--latency",
        "-s",
        str(lua),
        url,
    ]
    env = {**os.environ, "BENCH_TOKEN": token}
    cpu_before = cpu_seconds(pid)
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout
    cpu = cpu_seconds(pid) - cpu_before
    rps = float(re.search(r"Requests/sec:\s*([\d.]+)", out).group(1))  # type: ignore[union-attr]
    latency: dict[str, float] = {}
    for pct, value, unit in _WRK_LATENCY.findall(out):
        scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
        latency[pct] = float(value) * scale
    errors = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", out)
    socket_errors = re.search(r"Socket errors:.*", out)
    total = re.search(r"(\d+) requests in", out)
    requests = float(total.group(1)) if total else 0.0
    return {
        "cpu_rps": requests / cpu if cpu > 0 else float("nan"),
        "rps": rps,
        "p50": latency.get("50", float("nan")),
        "p99": latency.get("99", float("nan")),
        "non2xx": float(errors.group(1)) if errors else 0.0,
        "socket_errors": 1.0 if socket_errors else 0.0,
    }


LUA = """
wrk.method = "POST"
wrk.body = [[%s]]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("BENCH_TOKEN")
"""


# -- the contenders --------------------------------------------------------------------------


def start_gate(
    work: Path, backend_port: int, database_url: str | None = None
) -> tuple[subprocess.Popen[bytes], str, str]:
    name = "gate-pg" if database_url else "gate"
    data = work / name
    data.mkdir()
    port = free_port()
    config = work / f"{name}.toml"
    state = f'database_url = "{database_url}"\n' if database_url else ""
    config.write_text(
        f'data_dir = "{data}"\n[log]\nlevel = "warning"\n'
        f'[gate]\ntunnel_listen = "127.0.0.1:{free_port()}"\nhttp_listen = "127.0.0.1:{port}"\n'
        + state
        + f'[[gate.providers]]\nname = "bench"\nbase_url = "http://127.0.0.1:{backend_port}/v1"\n'
        f'[[gate.providers.models]]\nid = "{MODEL}"\nprice_in = 0.15\nprice_out = 0.6\n'
    )
    qmesh = [PYTHON, "-m", "qmesh", "--config", str(config)]
    subprocess.run([*qmesh, "keys", "init"], check=True, capture_output=True)
    subprocess.run([*qmesh, "secrets", "init-master-key"], check=True, capture_output=True)
    key = subprocess.run(
        [*qmesh, "apps", "add", "bench"], check=True, capture_output=True, text=True
    ).stdout.strip()
    process = subprocess.Popen(
        [*taskset(1), *qmesh, "--role", "gate"],
        stdout=subprocess.DEVNULL,
        stderr=(work / f"{name}.log").open("wb"),
        cwd=ROOT,
    )
    base = f"http://127.0.0.1:{port}"
    wait_http(base + "/healthz", timeout=60)
    return process, base + "/v1/chat/completions", f"bench:{key}"


def start_litellm(
    work: Path, backend_port: int, executable: str
) -> tuple[subprocess.Popen[bytes], str, str]:
    port = free_port()
    config = work / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        f"  - model_name: {MODEL}\n"
        "    litellm_params:\n"
        f"      model: openai/{MODEL}\n"
        f"      api_base: http://127.0.0.1:{backend_port}/v1\n"
        "      api_key: sk-backend\n"
        "litellm_settings:\n"
        "  telemetry: false\n"
    )
    key = "sk-bench-master"
    env = {
        **os.environ,
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_TELEMETRY_DISABLED": "true",
        "LITELLM_MASTER_KEY": key,
        "LITELLM_LOG": "ERROR",
    }
    process = subprocess.Popen(
        [
            *taskset(1),
            executable,
            "--config",
            str(config),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--num_workers",
            "1",
        ],
        stdout=(work / "litellm.log").open("wb"),
        stderr=subprocess.STDOUT,
        env=env,
    )
    base = f"http://127.0.0.1:{port}"
    wait_http(base + "/health/liveliness", timeout=180)
    return process, base + "/v1/chat/completions", key


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--connections", default="1,64")
    parser.add_argument("--litellm", default=str(ROOT / ".cache/bench/litellm-venv/bin/litellm"))
    parser.add_argument("--skip-litellm", action="store_true")
    parser.add_argument(
        "--pg-state", action="store_true", help="also a Gate whose state is in PostgreSQL"
    )
    parser.add_argument("--backend", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.backend is not None:
        run_backend(args.backend)
        return
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is missing: apt-get install -y wrk")
    counts = [int(c) for c in args.connections.split(",")]
    work = Path(tempfile.mkdtemp(prefix="qmesh-gw-bench-"))
    lua = work / "post.lua"
    lua.write_text(LUA % REQUEST)
    processes: list[subprocess.Popen[bytes]] = []
    cleanups: list[Any] = []
    rows: list[tuple[str, int, dict[str, float]]] = []
    try:
        backend_port = free_port()
        backend = subprocess.Popen([*taskset(0), PYTHON, __file__, "--backend", str(backend_port)])
        processes.append(backend)
        wait_http(f"http://127.0.0.1:{backend_port}/v1/chat/completions", timeout=20)
        contenders: list[tuple[str, str, str, int]] = [
            (
                "direct backend",
                f"http://127.0.0.1:{backend_port}/v1/chat/completions",
                "none",
                backend.pid,
            )
        ]
        gate, gate_url, gate_token = start_gate(work, backend_port)
        processes.append(gate)
        check = post_once(gate_url, gate_token)
        assert check["choices"][0]["message"]["content"].startswith("Hello"), check
        contenders.append(("qmesh Gate", gate_url, gate_token, gate.pid))
        if args.pg_state:
            sys.path.insert(0, str(ROOT / "scripts"))
            from pgcluster import PgCluster

            # Its own directory, open to the postgres user (the server runs as it under root).
            pg_base = Path(tempfile.mkdtemp(prefix="qmesh-gw-pg-"))
            os.chmod(pg_base, 0o755)
            cleanups.append(lambda: shutil.rmtree(pg_base, ignore_errors=True))
            cluster = PgCluster(pg_base / "pg").start()
            cleanups.append(cluster.stop)
            cluster.psql("CREATE DATABASE qmesh_state")
            url = cluster.dsn_for("postgres", cluster.password, "qmesh_state")
            pg_gate, pg_url, pg_token = start_gate(work, backend_port, url)
            processes.append(pg_gate)
            post_once(pg_url, pg_token)
            contenders.append(("Gate, PG state", pg_url, pg_token, pg_gate.pid))
        if not args.skip_litellm:
            if not Path(args.litellm).exists() and shutil.which(args.litellm) is None:
                print(f"note: no LiteLLM at {args.litellm}; its rows are skipped", file=sys.stderr)
            else:
                litellm, lite_url, lite_key = start_litellm(work, backend_port, args.litellm)
                processes.append(litellm)
                post_once(lite_url, lite_key)
                contenders.append(("LiteLLM proxy", lite_url, lite_key, litellm.pid))
        for name, url, token, pid in contenders:
            for connections in counts:
                # A short warm-up, then the measured run.
                wrk(url, token, connections, min(2.0, args.seconds), lua)
                result = wrk(url, token, connections, args.seconds, lua, pid)
                rows.append((name, connections, result))
    finally:
        for process in reversed(processes):
            stop(process)
        for cleanup in reversed(cleanups):
            cleanup()
    direct = {c: r for n, c, r in rows if n == "direct backend"}
    print(
        f"wrk -t1, {args.seconds:g} s per run; wrk + backend on CPU 0, the gateway on CPU 1; "
        f"POST /v1/chat/completions ({len(REQUEST)} B body)"
    )
    print(
        f"{'target':<16} {'conns':>5} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'+p50 ms':>8} {'+p99 ms':>8} {'of direct':>9} {'req/CPU-s':>10} {'errors':>7}"
    )
    for name, connections, r in rows:
        base = direct[connections]
        added50 = r["p50"] - base["p50"] if name != "direct backend" else 0.0
        added99 = r["p99"] - base["p99"] if name != "direct backend" else 0.0
        share = r["rps"] / base["rps"] * 100
        print(
            f"{name:<16} {connections:>5} {r['rps']:>10,.0f} {r['p50']:>8.3f} {r['p99']:>8.3f} "
            f"{added50:>8.3f} {added99:>8.3f} {share:>8.2f}% {r['cpu_rps']:>10,.0f} "
            f"{int(r['non2xx']):>7}"
        )
    print(
        "req/CPU-s: requests served per CPU-second the target process (and its children) "
        "used: its throughput on a core of its own, whatever else ran on the machine"
    )
    gate_rows = {c: r for n, c, r in rows if n == "qmesh Gate"}
    pg_rows = {c: r for n, c, r in rows if n == "Gate, PG state"}
    for connections in counts:
        if connections in pg_rows:
            ratio = pg_rows[connections]["rps"] / gate_rows[connections]["rps"]
            print(f"PG state / SQLite state at {connections} connection(s): {ratio:.2f}x req/s")
    lite_rows = {c: r for n, c, r in rows if n == "LiteLLM proxy"}
    for connections in counts:
        if connections in lite_rows:
            ratio = gate_rows[connections]["rps"] / lite_rows[connections]["rps"]
            cpu_ratio = gate_rows[connections]["cpu_rps"] / lite_rows[connections]["cpu_rps"]
            print(
                f"Gate / LiteLLM at {connections} connection(s): {ratio:.1f}x req/s, "
                f"{cpu_ratio:.1f}x req/CPU-s"
            )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
