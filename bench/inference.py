"""Inference through qmesh (client → Gate → daemon → llama.cpp) vs llama-cpp-python direct.

Usage (from the repository root, after scripts/setup.sh)::

    .venv/bin/python bench/inference.py                # 5 rounds, 64 tokens
    .venv/bin/python bench/inference.py --rounds 9 --tokens 128 --threads 1
    .venv/bin/python bench/inference.py --model PATH.gguf

A Gate and a daemon run as separate ``qmesh --role`` processes with a
throwaway data directory; the daemon serves the model through its
supervised llama.cpp server. The client streams ``POST
/api/daemons/NODE/v1/completions`` (server-sent events) from the Gate, and
in the same run calls ``llama_cpp.Llama.create_completion(stream=True)`` in
this process with the same file, context, threads, prompts and greedy
sampling (``repeat_penalty`` 1.0 on both sides: llama.cpp's server
defaults to 1.1, the library to 1.0). Rounds alternate direct and qmesh, each round with a prompt of
its own (so neither side reuses the other's prompt cache). Reported per
side: the median time to first token (TTFT) and decode tokens/s (tokens
after the first ÷ time after the first), and qmesh ÷ direct. Then the
quantization planner's prediction for this machine against both.

Nothing is asserted; the target is printed with met / NOT met.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = Path.home() / ".cache" / "qmesh" / "models" / "gemma-3-270m-q4_k_m.gguf"
TARGET_RATIO = 0.95
PROMPTS = [
    "The history of the city of Paris begins",
    "A recipe for bread needs flour, water and",
    "In the year 1905, Albert Einstein published",
    "The three largest oceans on Earth are",
    "To repair a bicycle tyre, first remove",
    "Photosynthesis is the process by which",
    "The rules of chess say that a knight",
    "Volcanoes form where tectonic plates",
    "A good night's sleep helps the brain",
    "The Roman Empire's roads connected",
    "Honey bees communicate with one another by",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Mesh:
    """A Gate and one daemon as processes, in a temporary directory."""

    def __init__(self, model: Path, threads: int, context: int) -> None:
        from qmesh.identity import GateKeys, enroll, write_private_file
        from qmesh.masterkey import ensure_master_key
        from qmesh.state import StateStore

        self.tmp = Path(tempfile.mkdtemp(prefix="qmesh-bench-inference-"))
        gate_dir = self.tmp / "gate"
        keys = GateKeys.create(gate_dir)
        ensure_master_key(gate_dir, env={})
        self.tunnel, self.http = free_port(), free_port()
        with StateStore.open(gate_dir / "state.db") as store:
            self.bearer = f"admin:{store.add_app('admin')}"
            credential = enroll(store, keys, "daemon", "bench-node", f"127.0.0.1:{self.tunnel}")
        cred_file = self.tmp / "node.cred"
        write_private_file(cred_file, (credential.encode() + "\n").encode())
        models = self.tmp / "models"
        models.mkdir()
        os.symlink(model, models / model.name)
        self.model_id = model.name.removesuffix(".gguf")
        (self.tmp / "gate.toml").write_text(
            f'data_dir = "{gate_dir}"\n[gate]\ntunnel_listen = "127.0.0.1:{self.tunnel}"\n'
            f'http_listen = "127.0.0.1:{self.http}"\n'
        )
        (self.tmp / "daemon.toml").write_text(
            f'data_dir = "{self.tmp / "node"}"\n[daemon]\ngate = "127.0.0.1:{self.tunnel}"\n'
            f'credential_file = "{cred_file}"\nhealth_listen = "127.0.0.1:0"\n'
            f'model_dirs = ["{models}"]\ncontext_length = {context}\nthreads = {threads}\n'
            "heartbeat_interval_s = 2.0\n"
        )
        self.processes: list[subprocess.Popen[bytes]] = []
        for role in ("gate", "daemon"):
            log = (self.tmp / f"{role}.log").open("wb")
            self.processes.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "qmesh",
                        "--role",
                        role,
                        "--config",
                        str(self.tmp / f"{role}.toml"),
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=ROOT,
                )
            )
            if role == "gate":
                self._wait(lambda: self._get("/healthz"), "the gate", 60)
        self._wait(self._fresh, "the daemon in the inventory", 60)

    def _get(self, path: str) -> Any:
        url = f"http://127.0.0.1:{self.http}{path}"
        request = urllib.request.Request(url, headers={"authorization": f"Bearer {self.bearer}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)

    def _fresh(self) -> bool:
        nodes = self._get("/api/inventory?state=fresh")["nodes"]
        return bool(nodes)

    def _wait(self, check: Any, what: str, seconds: float) -> None:
        end = time.monotonic() + seconds
        while True:
            try:
                if check():
                    return
            except OSError:
                pass
            if time.monotonic() > end:
                raise SystemExit(f"bench: {what} did not come up; logs in {self.tmp}")
            time.sleep(0.1)

    def inventory_model(self) -> dict[str, Any]:
        nodes = self._get("/api/inventory")["nodes"]
        model: dict[str, Any] = {m["id"]: m for m in nodes[0]["models"]}[self.model_id]
        return model

    def stream(
        self, prompt: str, tokens: int, *, url: str | None = None
    ) -> tuple[float, float, int, str]:
        """(TTFT s, decode tokens/s, tokens, text) for one streamed completion,
        through the Gate (or straight to ``url``)."""
        body = json.dumps(
            {
                "model": self.model_id,
                "prompt": prompt,
                "max_tokens": tokens,
                "temperature": 0,
                "repeat_penalty": 1.0,
                "stream": True,
            }
        ).encode()
        request = urllib.request.Request(
            url or f"http://127.0.0.1:{self.http}/api/daemons/bench-node/v1/completions",
            data=body,
            headers={"authorization": f"Bearer {self.bearer}", "content-type": "application/json"},
        )
        start = time.perf_counter()
        stamps: list[float] = []
        text: list[str] = []
        with urllib.request.urlopen(request, timeout=300) as response:
            for raw in response:
                line = raw.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                event = json.loads(line[6:])
                piece = event["choices"][0]["text"] if "choices" in event else ""
                if piece:
                    stamps.append(time.perf_counter())
                    text.append(piece)
        return (*_figures(start, stamps), "".join(text))

    def model_server_url(self) -> str:
        """The daemon's llama.cpp server for the model, to measure the hop it adds."""
        nodes = self._get("/api/inventory")["nodes"]
        (server,) = nodes[0]["runtimes"][0]["servers"]
        return f"http://127.0.0.1:{server['port']}/v1/completions"

    def close(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _figures(start: float, stamps: list[float]) -> tuple[float, float, int]:
    if not stamps:
        return float("nan"), float("nan"), 0
    ttft = stamps[0] - start
    tps = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")
    return ttft, tps, len(stamps)


class ModelServer:
    """The client straight to the daemon's model server: llama.cpp's own HTTP hop."""

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self.url = mesh.model_server_url()

    def stream(self, prompt: str, tokens: int) -> tuple[float, float, int, str]:
        return self.mesh.stream(prompt, tokens, url=self.url)


class Direct:
    def __init__(self, model: Path, threads: int, context: int) -> None:
        from llama_cpp import Llama

        self.llm = Llama(
            str(model), n_ctx=context, n_threads=threads, n_threads_batch=threads, verbose=False
        )

    def stream(self, prompt: str, tokens: int) -> tuple[float, float, int, str]:
        start = time.perf_counter()
        stamps: list[float] = []
        text: list[str] = []
        for chunk in self.llm.create_completion(
            prompt, max_tokens=tokens, temperature=0, stream=True
        ):
            piece = chunk["choices"][0]["text"]  # type: ignore[index]
            if piece:
                stamps.append(time.perf_counter())
                text.append(piece)
        return (*_figures(start, stamps), "".join(text))


def predicted_tps(
    model: Path, threads: int, context: int, data_dir: Path
) -> tuple[float, float, float]:
    """The planner's decode prediction for this machine: (tok/s at the
    bandwidth ``threads`` threads measured, tok/s at the best bandwidth, GB/s used)."""
    import attrs

    from qmesh.daemon.catalog import describe_gguf
    from qmesh.daemon.membench import cached_bandwidth
    from qmesh.daemon.quant import NodeSpec, Variant, place
    from qmesh.daemon.telemetry import TelemetryReader

    bandwidth = cached_bandwidth(data_dir, remeasure=True)  # now, not a cached figure
    reader = TelemetryReader(host_bandwidth_gbps=bandwidth.gbps)
    reader.start()
    node = NodeSpec.from_telemetry(reader.read())
    reader.close()
    variant = Variant.from_model(describe_gguf(model))
    at_threads = attrs.evolve(node, host_bandwidth_gbps=bandwidth.at_threads(threads))
    return (
        place(variant, at_threads, context).decode_tps,
        place(variant, node, context).decode_tps,
        bandwidth.at_threads(threads),
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=max((os.cpu_count() or 2) // 2, 1),
                        help="llama.cpp threads on both sides (default: half the CPUs, "
                        "llama-cpp-python's own default)")  # fmt: skip
    parser.add_argument("--context", type=int, default=1024)
    args = parser.parse_args()
    if not args.model.is_file():
        raise SystemExit(f"bench: no model at {args.model} (scripts/setup.sh assembles it)")
    print(
        f"model {args.model.name}, {args.tokens} tokens per request, {args.rounds} rounds, "
        f"{args.threads} llama.cpp thread(s), context {args.context}, {os.cpu_count()} CPUs"
    )
    mesh = Mesh(args.model, args.threads, args.context)
    try:
        direct = Direct(args.model, args.threads, args.context)
        # Warm-up: loads the model in the daemon's server, faults pages in on both sides.
        mesh.stream("Hello", 8)
        direct.stream("Hello", 8)
        server = ModelServer(mesh)
        results: dict[str, list[tuple[float, float, int, str]]] = {
            "direct": [], "server": [], "qmesh": []
        }  # fmt: skip
        same_text = 0
        sides: list[tuple[str, Direct | ModelServer | Mesh]] = [
            ("direct", direct), ("server", server), ("qmesh", mesh)
        ]  # fmt: skip
        for i in range(args.rounds):
            prompt = PROMPTS[i % len(PROMPTS)]
            order = sides[i % 3 :] + sides[: i % 3]  # each side leads in turn
            texts = {}
            for name, side in order:
                figures = side.stream(prompt, args.tokens)
                results[name].append(figures)
                texts[name] = figures[3]
            same_text += texts["direct"] == texts["qmesh"]
        model_entry = mesh.inventory_model()
    finally:
        mesh.close()

    def median(name: str, index: int) -> float:
        return statistics.median(float(r[index]) for r in results[name])

    print()
    print(f"{'':8} {'TTFT ms (median)':>17} {'decode tok/s (median)':>22} {'tokens':>7}")
    for name in ("direct", "server", "qmesh"):
        print(f"{name:8} {median(name, 0) * 1000:17.1f} {median(name, 1):22.2f} "
              f"{median(name, 2):7.0f}")  # fmt: skip
    print(
        "(server: the client straight to the daemon's llama.cpp model server, no Gate, no tunnel)"
    )
    ratio = median("qmesh", 1) / median("direct", 1)
    ttft_extra = (median("qmesh", 0) - median("direct", 0)) * 1000
    verdict = "met" if ratio >= TARGET_RATIO else "NOT met"
    print(f"qmesh / direct decode tok/s: {ratio:.3f} (target ≥ {TARGET_RATIO}: {verdict}); "
          f"TTFT {ttft_extra:+.1f} ms")  # fmt: skip
    hop = median("qmesh", 1) / median("server", 1)
    own = median("server", 1) / median("direct", 1)
    print(f"qmesh / server decode tok/s: {hop:.3f} (the Gate, the tunnel and the daemon's relay); "
          f"server / direct: {own:.3f} (llama.cpp's own server)")  # fmt: skip
    print(f"identical greedy text in {same_text}/{args.rounds} rounds")
    at_threads, best, gbps = predicted_tps(
        args.model, args.threads, args.context, Path(tempfile.gettempdir()) / "qmesh-bench-membench"
    )
    measured = median("direct", 1)
    print()
    print(f"planner, this machine: {gbps:.1f} GB/s read with {args.threads} thread(s) → "
          f"predicted {at_threads:.1f} tok/s (all threads: {best:.1f})")  # fmt: skip
    print(f"daemon's inventory said predicted_tps = {model_entry.get('predicted_tps')}")
    for name in ("direct", "qmesh"):
        value = median(name, 1)
        print(f"  measured {name:6} {value:6.2f} tok/s; prediction error "
              f"{(at_threads - value) / value * 100:+.0f}%")  # fmt: skip
    print(f"  (measured ÷ predicted = {measured / at_threads:.2f}: the share of the memory-bound "
          "ceiling this model reaches here)")  # fmt: skip


if __name__ == "__main__":
    main()
