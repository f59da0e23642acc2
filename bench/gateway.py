"""The Gate's OpenAI-compatible endpoint vs the LiteLLM proxy, in front of
the same instant backend, measured with wrk (peak), oha (a constant offered
rate) and a streamed completion's time to first byte.

Usage:
    .venv/bin/python bench/gateway.py [--seconds 10] [--connections 1,64]
        [--litellm PATH] [--skip-litellm] [--pg-state] [--engine-threads]
        [--rate 1000] [--rate-connections 16] [--ttfb-requests 500] [--https-upstream]
        [--rounds 3]

What runs (all on loopback, each a separate process):
- backend: a small asyncio server (below) that answers every
  ``POST /v1/chat/completions`` at once with the same JSON completion,
  keep-alive, no parsing beyond the HTTP head and a look for
  ``"stream": true`` in the body; a streamed request gets an SSE answer
  (chunked: role, two content deltas, finish, usage, ``[DONE]``), its first
  event at once and each next one ``STREAM_GAP_S`` (2 ms) later;
- the Gate: ``python -m qmesh --role gate`` with one priced provider model
  (``bench-model``) pointing at the backend, log level warning; requests
  carry an app key (``Authorization: Bearer bench:KEY``), name the model,
  and go through auth, routing, the pooled upstream client and the ledger;
- with ``--engine-threads``, the same Gate a second time with its HTTP
  engine on the engine threads (``gate.http.engine_threads = true``) rather
  than inline on the event loop's thread (the default);
- with ``--https-upstream``, the same Gate a second time whose provider is
  a second backend serving https (a throwaway CA from scripts/testca.py,
  the only root that Gate trusts: ``SSL_CERT_FILE``), so the engine's TLS
  to upstreams is measured beside plain HTTP;
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

Pinning (``taskset``): wrk, oha, the streaming client and the backend share
CPU 0, the gateway under test gets CPU 1. wrk posts a fixed chat body (a Lua
script sets method, body and headers) with 1 and 64 connections for
``--seconds`` each, as fast as answers come (peak req/s). Added latency is
the gateway's percentile minus the direct backend's in the same
measurement; "of direct" is the gateway's req/s as a fraction of the direct
backend's in the same run.

Constant rate (oha, https://github.com/hatoo/oha, ``cargo install oha
--locked``; skipped with a note when it is missing): ``oha -q --rate`` (1,000
req/s) for ``--seconds`` on ``--rate-connections`` (16) keep-alive
connections, ``--latency-correction`` (each request's latency counts from
when it was due, so a stall is not hidden by the requests it delayed), ``-w``
(requests still out at the deadline are waited for). Printed: the rate
answered with 200, p50/p99/p99.9, added p50/p99, the target's CPU (% of one
core). A second backend on CPU 1 ("direct on CPU 1") shows what crossing
CPUs alone costs on this machine: oha and the backend share CPU 0, while a
request through the gateway crosses between the CPUs four times.

Time to first byte: ``--ttfb-requests`` (500) streamed chat completions,
after 50 of warm-up, to each target in turn (the direct backend, the one on
CPU 1, each gateway), on one keep-alive connection each (raw sockets, this
process pinned to CPU 0): from the request's send to the first ``data:``
after the response head; each stream is read to its end before the next
request.

On a shared machine one run's p99 moves by more than the targets' margins:
``--rounds N`` measures everything N times, round after round (wrk, oha and
the streams, each target in turn); each figure printed is the median of the
rounds', an added latency or a share of direct the median of the rounds'
paired differences or ratios, and the streams' percentiles are of all their
samples.

Targets, printed with met / NOT met under the tables; nothing is asserted:
added p50 ≤ 0.5 ms at 1 client; ≥ 4 % of the direct backend's req/s; ≥ 25×
LiteLLM's req/s; peak ≥ 5,000 req/s with the Gate on one core; p99 ≤ 5 ms at
64 connections; at 1,000 req/s offered, added p50 ≤ 0.3 ms and added p99
≤ 1 ms; a streamed completion's added time to first byte (p50) ≤ 0.3 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from benchkit import cpu_seconds, stop

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
STREAM_REQUEST = json.dumps({**json.loads(REQUEST), "stream": True}, separators=(",", ":"))


def _chunk(delta: dict[str, str], finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


# A streamed answer as OpenAI sends one: role, two content deltas, the finish,
# the usage chunk (the Gate always asks for it), then [DONE].
STREAM_EVENTS = [
    b"data: %s\n\n" % json.dumps(event, separators=(",", ":")).encode()
    for event in (
        _chunk({"role": "assistant", "content": ""}),
        _chunk({"content": "Hello from"}),
        _chunk({"content": " the bench backend."}),
        _chunk({}, "stop"),
        {
            **_chunk({}),
            "choices": [],
            "usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19},
        },
    )
] + [b"data: [DONE]\n\n"]
STREAM_GAP_S = 0.002
"""The backend sends the first event at once and each next one this much
later, so a first byte that comes back is the first event, not the whole
stream."""


# -- the instant backend (runs as `gateway.py --backend PORT`) -------------------


class _Backend(asyncio.Protocol):
    RESPONSE = (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
        % (len(COMPLETION), COMPLETION)
    )
    STREAM_HEAD = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
        b"transfer-encoding: chunked\r\n\r\n"
    )
    STREAM = re.compile(rb'"stream"\s*:\s*true')

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
            body = self.buffer[end + 4 : total]
            self.buffer = self.buffer[total:]
            if self.STREAM.search(body):
                self.stream()  # clients do not pipeline behind a stream
            else:
                self.transport.write(self.RESPONSE)

    def stream(self) -> None:
        chunks = [b"%x\r\n%s\r\n" % (len(event), event) for event in STREAM_EVENTS]
        chunks[-1] += b"0\r\n\r\n"
        self.transport.write(self.STREAM_HEAD + chunks[0])
        loop = asyncio.get_running_loop()
        for index, chunk in enumerate(chunks[1:], 1):
            loop.call_later(index * STREAM_GAP_S, self.send, chunk)

    def send(self, data: bytes) -> None:
        if not self.transport.is_closing():
            self.transport.write(data)


def run_backend(port: int, tls: list[str] | None = None) -> None:
    """Serve on ``port``; with ``tls`` (certificate and key files), https."""
    context = None
    if tls is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(*tls)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_Backend, "127.0.0.1", port, backlog=1024, ssl=context)
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


def wait_tls(port: int, ca: Path, *, timeout: float) -> None:
    """Until a TLS handshake with ``127.0.0.1:port``, verified by ``ca``, succeeds."""
    context = ssl.create_default_context(cafile=str(ca))
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                context.wrap_socket(sock, server_hostname="127.0.0.1").close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


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
    cpu_before = cpu_seconds(pid, children=True)
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout
    cpu = cpu_seconds(pid, children=True) - cpu_before
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


OHA_INSTALL = "cargo install oha --locked  (puts oha in ~/.cargo/bin)"
OHA_JSON = ["--output-format", "json"]


def find_oha() -> str | None:
    found = shutil.which("oha")
    if found:
        return found
    home = Path.home() / ".cargo/bin/oha"
    return str(home) if home.exists() else None


def oha(
    executable: str,
    url: str,
    token: str,
    rate: float,
    connections: int,
    seconds: float,
    pid: int | None = None,
) -> dict[str, float]:
    """A constant offered rate: oha sends ``rate`` requests a second whatever
    the answers' latency, and with --latency-correction counts each one from
    when it was due, not from when a free connection sent it (no coordinated
    omission)."""
    command = [
        *taskset(0),
        executable,
        "-q",
        f"{rate:g}",
        "-z",
        f"{seconds:g}s",
        "-w",  # requests still out at the deadline are waited for, not counted as errors
        "--latency-correction",
        "-c",
        str(connections),
        "-m",
        "POST",
        "-T",
        "application/json",
        "-H",
        f"Authorization: Bearer {token}",
        "-d",
        REQUEST,
        "--no-tui",
        *OHA_JSON,
        url,
    ]
    cpu_before = cpu_seconds(pid, children=True)
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    cpu = cpu_seconds(pid, children=True) - cpu_before
    report = json.loads(out)
    elapsed = float(report["summary"]["total"])
    percentiles = report["latencyPercentiles"]
    codes = report.get("statusCodeDistribution") or {}
    ok = float(codes.get("200", 0))
    errors = sum(float(n) for code, n in codes.items() if code != "200")
    errors += sum(float(n) for n in (report.get("errorDistribution") or {}).values())

    def ms(key: str) -> float:
        value = percentiles.get(key)
        return float(value) * 1000 if value is not None else float("nan")

    return {
        "rps": ok / elapsed,  # answered with 200 a second: the rate it kept up with
        "p50": ms("p50"),
        "p99": ms("p99"),
        "p999": ms("p99.9"),
        "errors": errors,
        "cpu": cpu / elapsed * 100 if pid is not None else float("nan"),
    }


def ttfb(urls: list[tuple[str, str]], count: int) -> list[list[float]]:
    """Time to the first SSE event of a streamed completion, ms: one
    keep-alive connection per URL, ``count`` rounds of one request to each in
    turn (so drift hits all alike), from the request's send to the first
    ``data:`` after the response head. The whole stream is read before the
    next request."""
    connections = []
    requests = []
    for url, token in urls:
        parts = urlsplit(url)
        assert parts.hostname and parts.port
        body = STREAM_REQUEST.encode()
        head = (
            f"POST {parts.path} HTTP/1.1\r\nhost: {parts.netloc}\r\n"
            f"content-type: application/json\r\nauthorization: Bearer {token}\r\n"
            f"content-length: {len(body)}\r\n\r\n"
        )
        requests.append(head.encode() + body)
        sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connections.append(sock)
    samples: list[list[float]] = [[] for _ in urls]
    try:
        for _ in range(count):
            for sock, request, times in zip(connections, requests, samples, strict=True):
                times.append(_one_stream(sock, request))
    finally:
        for sock in connections:
            sock.close()
    return samples


def _one_stream(sock: socket.socket, request: bytes) -> float:
    start = time.perf_counter()
    sock.sendall(request)
    buffer = b""
    first: float | None = None
    head_end = -1
    while True:
        data = sock.recv(65536)
        if not data:
            raise RuntimeError(f"connection closed mid-stream: {buffer[:300]!r}")
        buffer += data
        if head_end < 0:
            head_end = buffer.find(b"\r\n\r\n")
            if head_end < 0:
                continue
            if not buffer.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"not a 200: {buffer[:300]!r}")
        if first is None and b"data:" in buffer[head_end:]:
            first = time.perf_counter()
        if buffer.endswith(b"\r\n0\r\n\r\n"):  # the last chunk of a chunked body
            break
    if first is None or b"data: [DONE]" not in buffer:
        raise RuntimeError(f"no [DONE] in the stream: {buffer[-300:]!r}")
    return (first - start) * 1000


def over_rounds(found: list[dict[str, float]], direct: list[dict[str, float]]) -> dict[str, float]:
    """A target's rounds as one row: each figure the rounds' median, errors
    their sum; ``added50``/``added99`` (latency over the direct backend's)
    and ``share`` (its req/s as a fraction of direct's) the median of the
    rounds' paired differences and ratios, so that a slow round moves both
    sides of a pair alike."""
    row = {key: statistics.median(r[key] for r in found) for key in found[0]}
    for key in ("non2xx", "socket_errors", "errors"):
        if key in row:
            row[key] = sum(r[key] for r in found)
    pairs = list(zip(found, direct, strict=True))
    row["added50"] = statistics.median(r["p50"] - d["p50"] for r, d in pairs)
    row["added99"] = statistics.median(r["p99"] - d["p99"] for r, d in pairs)
    row["share"] = statistics.median(r["rps"] / d["rps"] for r, d in pairs)
    return row


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


LUA = """
wrk.method = "POST"
wrk.body = [[%s]]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("BENCH_TOKEN")
"""


# -- the contenders --------------------------------------------------------------------------


def start_gate(
    work: Path,
    backend_port: int,
    database_url: str | None = None,
    *,
    engine_threads: bool = False,
    trust: Path | None = None,
) -> tuple[subprocess.Popen[bytes], str, str]:
    """A Gate in front of the backend on ``backend_port``; with ``trust`` (a
    CA file, the only one the Gate trusts) over https."""
    name = "gate-pg" if database_url else "gate-threads" if engine_threads else "gate"
    name = "gate-https" if trust is not None else name
    scheme = "http" if trust is None else "https"
    data = work / name
    data.mkdir()
    port = free_port()
    config = work / f"{name}.toml"
    state = f'database_url = "{database_url}"\n' if database_url else ""
    config.write_text(
        f'data_dir = "{data}"\n[log]\nlevel = "warning"\n'
        f'[gate]\ntunnel_listen = "127.0.0.1:{free_port()}"\nhttp_listen = "127.0.0.1:{port}"\n'
        + state
        + ("[gate.http]\nengine_threads = true\n" if engine_threads else "")
        + f'[[gate.providers]]\nname = "bench"\nbase_url = "{scheme}://127.0.0.1:{backend_port}/v1"\n'
        f'[[gate.providers.models]]\nid = "{MODEL}"\nprice_in = 0.15\nprice_out = 0.6\n'
    )
    qmesh = [PYTHON, "-m", "qmesh", "--config", str(config)]
    subprocess.run([*qmesh, "keys", "init"], check=True, capture_output=True)
    subprocess.run([*qmesh, "secrets", "init-master-key"], check=True, capture_output=True)
    key = subprocess.run(
        [*qmesh, "apps", "add", "bench"], check=True, capture_output=True, text=True
    ).stdout.strip()
    env = dict(os.environ) if trust is None else {**os.environ, "SSL_CERT_FILE": str(trust)}
    process = subprocess.Popen(
        [*taskset(1), *qmesh, "--role", "gate"],
        stdout=subprocess.DEVNULL,
        stderr=(work / f"{name}.log").open("wb"),
        cwd=ROOT,
        env=env,
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--connections", default="1,64")
    parser.add_argument("--litellm", default=str(ROOT / ".cache/bench/litellm-venv/bin/litellm"))
    parser.add_argument("--skip-litellm", action="store_true")
    parser.add_argument(
        "--engine-threads",
        action="store_true",
        help="also a Gate whose HTTP engine runs on the engine threads",
    )
    parser.add_argument(
        "--pg-state", action="store_true", help="also a Gate whose state is in PostgreSQL"
    )
    parser.add_argument(
        "--rate", type=float, default=1000.0, help="oha's offered req/s (default 1000)"
    )
    parser.add_argument(
        "--rate-connections", type=int, default=16, help="oha's connections (default 16)"
    )
    parser.add_argument(
        "--ttfb-requests",
        type=int,
        default=500,
        help="streamed completions per target for time to first byte (0: skip)",
    )
    parser.add_argument(
        "--https-upstream",
        action="store_true",
        help="also a Gate whose provider is the backend over https (its own CA)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure everything this many times, round after round; each figure is the "
        "median of the rounds', each added latency the median of the rounds' differences",
    )
    parser.add_argument("--backend", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--backend-tls", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.backend is not None:
        run_backend(args.backend, args.backend_tls)
        return
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is missing: apt-get install -y wrk")
    counts = [int(c) for c in args.connections.split(",")]
    oha_path = find_oha()
    if oha_path is None:
        print(f"note: oha is missing, the constant-rate rows are skipped: {OHA_INSTALL}")
    work = Path(tempfile.mkdtemp(prefix="qmesh-gw-bench-"))
    lua = work / "post.lua"
    lua.write_text(LUA % REQUEST)
    processes: list[subprocess.Popen[bytes]] = []
    cleanups: list[Any] = []
    runs: dict[tuple[str, int], list[dict[str, float]]] = {}  # (target, conns): each round's
    rate_runs: dict[str, list[dict[str, float]]] = {}
    first_bytes: list[list[float]] = []
    contenders_names: list[str] = []
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
        if args.engine_threads:
            threads_gate, threads_url, threads_token = start_gate(
                work, backend_port, engine_threads=True
            )
            processes.append(threads_gate)
            post_once(threads_url, threads_token)
            contenders.append(("Gate, engine thr.", threads_url, threads_token, threads_gate.pid))
        if args.https_upstream:
            sys.path.insert(0, str(ROOT / "scripts"))
            from testca import make_ca_and_server

            ca, cert, key = make_ca_and_server(work / "tls", "bench")
            tls_port = free_port()
            serve_tls = ["--backend", str(tls_port), "--backend-tls", str(cert), str(key)]
            tls_backend = subprocess.Popen([*taskset(0), PYTHON, __file__, *serve_tls])
            processes.append(tls_backend)
            wait_tls(tls_port, ca, timeout=20)
            https_gate, https_url, https_token = start_gate(work, tls_port, trust=ca)
            processes.append(https_gate)
            post_once(https_url, https_token)
            contenders.append(("Gate, https up.", https_url, https_token, https_gate.pid))
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
        # The same backend on the gateway's CPU: what crossing CPUs alone
        # costs (direct crosses none, a request through the gateway four).
        across_port = free_port()
        across = subprocess.Popen([*taskset(1), PYTHON, __file__, "--backend", str(across_port)])
        processes.append(across)
        across_url = f"http://127.0.0.1:{across_port}/v1/chat/completions"
        wait_http(across_url, timeout=20)
        across_row = ("direct on CPU 1", across_url, "none", across.pid)
        with_across = [*contenders[:1], across_row, *contenders[1:]]
        contenders_names.extend(name for name, _, _, _ in with_across)
        targets = [(url, token) for _, url, token, _ in with_across]
        if args.ttfb_requests > 0:
            first_bytes = [[] for _ in targets]
        for round_ in range(args.rounds):
            for name, url, token, pid in contenders:
                for connections in counts:
                    if round_ == 0:  # a short warm-up, then the measured runs
                        wrk(url, token, connections, min(2.0, args.seconds), lua)
                    result = wrk(url, token, connections, args.seconds, lua, pid)
                    runs.setdefault((name, connections), []).append(result)
            if oha_path is not None:
                for name, url, token, pid in with_across:
                    result = oha(
                        oha_path, url, token, args.rate, args.rate_connections, args.seconds, pid
                    )
                    rate_runs.setdefault(name, []).append(result)
            if args.ttfb_requests > 0:
                if round_ == 0:
                    ttfb(targets, min(50, args.ttfb_requests))  # warm-up
                # The client shares CPU 0 with the backend, like wrk.
                affinity = os.sched_getaffinity(0)
                os.sched_setaffinity(0, {0})
                try:
                    for times, more in zip(
                        first_bytes, ttfb(targets, args.ttfb_requests), strict=True
                    ):
                        times.extend(more)
                finally:
                    os.sched_setaffinity(0, affinity)
    finally:
        for process in reversed(processes):
            stop(process)
        for cleanup in reversed(cleanups):
            cleanup()
    rows = [
        (name, connections, over_rounds(found, runs[("direct backend", connections)]))
        for (name, connections), found in runs.items()
    ]
    rate_rows = [
        (name, over_rounds(found, rate_runs["direct backend"])) for name, found in rate_runs.items()
    ]
    rounds = (
        f"; the median of {args.rounds} rounds (added latency and share of direct: the median "
        "of the rounds' paired differences and ratios)"
        if args.rounds > 1
        else ""
    )
    print(
        f"wrk -t1, {args.seconds:g} s per run; wrk + backend on CPU 0, the gateway on CPU 1; "
        f"POST /v1/chat/completions ({len(REQUEST)} B body){rounds}"
    )
    print(
        f"{'target':<16} {'conns':>5} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'+p50 ms':>8} {'+p99 ms':>8} {'of direct':>9} {'req/CPU-s':>10} {'errors':>7}"
    )
    for name, connections, r in rows:
        print(
            f"{name:<16} {connections:>5} {r['rps']:>10,.0f} {r['p50']:>8.3f} {r['p99']:>8.3f} "
            f"{r['added50']:>8.3f} {r['added99']:>8.3f} {r['share'] * 100:>8.2f}% "
            f"{r['cpu_rps']:>10,.0f} {int(r['non2xx']):>7}"
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
    rate_direct = next((r for n, r in rate_rows if n == "direct backend"), None)
    if rate_direct is not None:
        print()
        print(
            f"oha -q {args.rate:g} --latency-correction -c {args.rate_connections}, "
            f"{args.seconds:g} s per run, on CPU 0; latency from when each request was due" + rounds
        )
        print(
            f"{'target':<16} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'p99.9 ms':>9} "
            f"{'+p50 ms':>8} {'+p99 ms':>8} {'CPU %':>6} {'errors':>7}"
        )
        for name, r in rate_rows:
            print(
                f"{name:<16} {r['rps']:>8,.0f} {r['p50']:>8.3f} {r['p99']:>8.3f} "
                f"{r['p999']:>9.3f} {r['added50']:>8.3f} {r['added99']:>8.3f} {r['cpu']:>6.1f} "
                f"{int(r['errors']):>7}"
            )
        print("CPU %: of one core, the target process (and its children) over the run")
        print(
            "direct on CPU 1: the backend on the gateway's CPU, so its added latency is two "
            "crossings between the CPUs (a request through the gateway makes four)"
        )
    if first_bytes:
        print()
        print(
            f"streamed completion ({len(STREAM_EVENTS)} SSE events, the first at once, then one "
            f"every {STREAM_GAP_S * 1000:g} ms), {args.ttfb_requests} sequential requests per "
            "target on one keep-alive connection each"
            + (f" in each of {args.rounds} rounds (percentiles of all)" if args.rounds > 1 else "")
            + ", client on CPU 0; time from the request sent to the first data: event"
        )
        print(f"{'target':<16} {'p50 ms':>8} {'p99 ms':>8} {'+p50 ms':>8} {'+p99 ms':>8}")
        base50, base99 = (percentile(first_bytes[0], q) for q in (0.5, 0.99))
        for index, times in enumerate(first_bytes):
            p50, p99 = percentile(times, 0.5), percentile(times, 0.99)
            added50, added99 = (p50 - base50, p99 - base99) if index else (0.0, 0.0)
            name = contenders_names[index]
            print(f"{name:<16} {p50:>8.3f} {p99:>8.3f} {added50:>8.3f} {added99:>8.3f}")
    print()
    print("targets (the Gate, SQLite state, on CPU 1):")

    def verdict(label: str, value: float, limit: float, unit: str, most: bool) -> None:
        ok = value <= limit if most else value >= limit
        sign = "≤" if most else "≥"
        print(
            f"  {label:<44} {value:>9,.3f} {unit:<5} ({sign} {limit:g}) "
            f"{'met' if ok else 'NOT met'}"
        )

    if 1 in gate_rows:
        verdict("wrk, 1 connection: added p50", gate_rows[1]["added50"], 0.5, "ms", True)
    if gate_rows:
        peak = max(r["rps"] for r in gate_rows.values())
        verdict("wrk: peak req/s", peak, 5000, "req/s", False)
    for connections, r in gate_rows.items():
        share = r["share"] * 100
        verdict(f"wrk, {connections} connection(s): of direct req/s", share, 4, "%", False)
    if 64 in gate_rows:
        verdict("wrk, 64 connections: p99", gate_rows[64]["p99"], 5, "ms", True)
    for connections in counts:
        if connections in lite_rows:
            ratio = gate_rows[connections]["rps"] / lite_rows[connections]["rps"]
            verdict(f"wrk, {connections} connection(s): × LiteLLM req/s", ratio, 25, "x", False)
    gate_rate = next((r for n, r in rate_rows if n == "qmesh Gate"), None)
    if rate_direct is not None and gate_rate is not None:
        label = f"oha, {args.rate:g} req/s offered: added"
        verdict(f"{label} p50", gate_rate["added50"], 0.3, "ms", True)
        verdict(f"{label} p99", gate_rate["added99"], 1, "ms", True)
    elif oha_path is None:
        print(f"  oha, {args.rate:g} req/s offered: not measured (no oha: {OHA_INSTALL})")
    if len(first_bytes) > 2:
        added = percentile(first_bytes[2], 0.5) - percentile(first_bytes[0], 0.5)
        verdict("streamed completion: added time to first byte", added, 0.3, "ms", True)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
