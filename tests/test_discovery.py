"""Discovery over real loopback sockets: fake Ollama and llama.cpp servers,
garbage, silence, resets, a full accept queue, a closed port and a real Gate
— what each is recorded as, how long a scan takes, and how entries age."""

from __future__ import annotations

import socket
import struct
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from daemonkit import http_json, make_gate_dir
from processkit import free_port as closed_port
from processkit import wait_for

from qmesh.config import ConfigError, DiscoveryConfig, load_config
from qmesh.fleet.discovery import Scanner, Target, probe_target, targets_from_config
from qmesh.fleet.inventory import Inventory
from qmesh.fleet.probes import Finding
from qmesh.gate.role import run_gate
from qmesh.web.http import Request, Response, Router
from qmesh.web.native import serve_http

FAST = DiscoveryConfig(
    connect_timeout_s=0.5, probe_timeout_s=0.5, target_timeout_s=2.0, interval_s=60.0
)


# -- servers that are (and are not) model servers --------------------------------------------------


def json_routes(routes: dict[str, Any]) -> Router:
    router = Router()
    for path, body in routes.items():

        async def handler(request: Request, body: Any = body) -> Response:
            return Response.json(body)

        router.add("GET", path, handler)
    return router


OLLAMA = {
    "/api/version": {"version": "0.5.7"},
    "/api/tags": {
        "models": [
            {"name": "llama3.2:1b", "size": 1_321_098_329,
             "details": {"family": "llama", "parameter_size": "1.2B",
                         "quantization_level": "Q8_0"}},
        ]
    },
    "/api/ps": {"models": []},
}  # fmt: skip
LLAMA_CPP = {
    "/props": {"total_slots": 2, "default_generation_settings": {"n_ctx": 4096},
               "build_info": "b4589-1a2b3c4"},
    "/health": {"status": "ok"},
    "/slots": [{"id": 0, "is_processing": False}, {"id": 1, "is_processing": False}],
    "/v1/models": {"object": "list", "data": [{"id": "/m/phi-3-mini-q4_k_m.gguf",
                                               "meta": {"n_params": 3_821_079_552}}]},
}  # fmt: skip


async def start_http(nursery: trio.Nursery, routes: dict[str, Any]) -> int:
    port: int = await nursery.start(serve_http, json_routes(routes), "127.0.0.1", 0)
    return port


async def start_tcp(
    nursery: trio.Nursery, behaviour: str, accepted: trio.Event | None = None
) -> int:
    """``garbage``: sends noise and hangs up; ``silent``: accepts and says
    nothing; ``reset``: accepts and resets the connection. ``accepted`` is
    set when a connection arrives."""

    async def handler(stream: trio.SocketStream) -> None:
        if accepted is not None:
            accepted.set()
        try:
            if behaviour == "garbage":
                await stream.send_all(b"\x8f\x00\x17garbage\xff\xfe\r\n\r\nnot http at all")
            elif behaviour == "silent":
                await trio.sleep_forever()
            elif behaviour == "reset":
                # SO_LINGER 0: close() sends RST instead of FIN.
                linger = struct.pack("ii", 1, 0)
                stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        finally:
            await trio.aclose_forcefully(stream)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    nursery.start_soon(trio.serve_listeners, handler, listeners)
    port: int = listeners[0].socket.getsockname()[1]
    return port


def accept_queue_full(server: socket.socket) -> bool:
    """Whether a listener's accept queue is full, so that Linux drops new
    SYNs: for a listening socket, TCP_INFO's ``tcpi_unacked`` is the queue's
    length and ``tcpi_sacked`` its backlog."""
    info = server.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 32)
    queued, backlog = struct.unpack_from("II", info, 24)
    return bool(queued > backlog)


@pytest.fixture
def blackhole() -> Iterator[int]:
    """A port whose accept queue is full: connects to it time out (SYNs are dropped)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        try:
            filler.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fillers.append(filler)
    wait_for("the black hole's accept queue to fill", lambda: accept_queue_full(server), 10)
    yield port
    for filler in fillers:
        filler.close()
    server.close()


# -- a whole scan through a real Gate --------------------------------------------------------------


async def test_scan_records_each_kind_and_nothing_stalls(
    nursery: trio.Nursery, tmp_path: Path, blackhole: int
) -> None:
    silent_probed = trio.Event()
    ports = {
        "ollama": await start_http(nursery, OLLAMA),
        "llama.cpp": await start_http(nursery, LLAMA_CPP),
        "garbage": await start_tcp(nursery, "garbage"),
        "silent": await start_tcp(nursery, "silent", silent_probed),
        "reset": await start_tcp(nursery, "reset"),
        "blackhole": blackhole,
        "closed": closed_port(),
    }
    gate_dir = make_gate_dir(tmp_path)
    ports["gate"] = gate_dir.http_port  # the Gate finds itself: another qmesh Gate's shape
    targets = ", ".join(f'"127.0.0.1:{p}"' for p in ports.values())
    config_file = tmp_path / "gate.toml"
    config_file.write_text(
        gate_dir.config_text() + f"[gate.discovery]\ntargets = [{targets}]\ninterval_s = 60\n"
        "connect_timeout_s = 0.5\nprobe_timeout_s = 0.5\ntarget_timeout_s = 2.0\n"
    )
    gate = await nursery.start(run_gate, load_config(config_file, env={}))
    bearer = gate_dir.bearer
    http = gate["http"]

    status, body = await http_json("POST", http + "/api/discovery/scan")
    assert status == 401
    # While a scan runs, the Gate keeps answering at once.
    async with trio.open_nursery() as inner:
        result: dict[str, Any] = {}

        async def scan() -> None:
            started = time.monotonic()
            result["status"], result["body"] = await http_json(
                "POST", http + "/api/discovery/scan", bearer=bearer
            )
            result["seconds"] = time.monotonic() - started

        inner.start_soon(scan)
        # A scan holds the silent target's connection for its exchange timeouts.
        with trio.fail_after(10):
            await silent_probed.wait()
        started = time.monotonic()
        status, _ = await http_json("GET", http + "/healthz")
        assert status == 200 and time.monotonic() - started < 0.5
        assert "status" not in result  # answered while the scan still ran
    assert result["status"] == 200, result
    report = result["body"]["scan"]
    # The silent one costs two exchange timeouts (HTTP, then PostgreSQL), the
    # black hole one connect timeout; they ran beside everything else.
    assert report["duration_s"] < 2.0, report
    assert report["slowest"] == f"127.0.0.1:{ports['silent']}"
    print(f"\nscan of {len(ports)} targets: {report['duration_s']:.3f}s, slowest {report}")

    status, body = await http_json("GET", http + "/api/inventory", bearer=bearer)
    assert status == 200
    entries = {n["name"]: n for n in body["nodes"]}
    by_port = {name: entries[f"127.0.0.1:{port}"] for name, port in ports.items()}
    kinds = {name: (e["kind"], e["state"]) for name, e in by_port.items()}
    assert kinds == {
        "ollama": ("ollama", "fresh"),
        "llama.cpp": ("llama.cpp", "fresh"),
        "gate": ("qmesh-gate", "fresh"),
        "garbage": ("unknown", "fresh"),
        "silent": ("unknown", "fresh"),
        "reset": ("unknown", "fresh"),
        "blackhole": ("absent", "gone"),
        "closed": ("absent", "gone"),
    }
    assert all(e["source"] == "configured" for e in by_port.values())
    (ollama_model,) = by_port["ollama"]["models"]
    assert (ollama_model["id"], ollama_model["quantization"], ollama_model["state"]) == (
        "llama3.2:1b", "Q8_0", "available"
    )  # fmt: skip
    (llama_model,) = by_port["llama.cpp"]["models"]
    assert (llama_model["id"], llama_model["quantization"], llama_model["context_length"]) == (
        "phi-3-mini-q4_k_m", "Q4_K_M", 4096
    )  # fmt: skip
    assert by_port["ollama"]["version"] == "0.5.7"
    assert by_port["llama.cpp"]["version"] == "b4589-1a2b3c4"
    # The real services were not held up by the slow ones.
    for name in ("ollama", "llama.cpp", "gate", "garbage", "closed"):
        assert by_port[name]["extra"]["probe_ms"] < 400, (name, by_port[name]["extra"])
    assert "garbage" in by_port["garbage"]["reason"]
    assert "silence" in by_port["silent"]["reason"]
    assert "reset" in by_port["reset"]["reason"]
    assert "host down or filtered" in by_port["blackhole"]["reason"]
    assert "nothing listens" in by_port["closed"]["reason"]

    status, body = await http_json(
        "GET", http + "/api/inventory?kind=ollama&state=fresh", bearer=bearer
    )
    assert [n["name"] for n in body["nodes"]] == [f"127.0.0.1:{ports['ollama']}"]
    status, body = await http_json("GET", http + "/api/inventory?model=llama3.2:1b", bearer=bearer)
    assert [n["kind"] for n in body["nodes"]] == ["ollama"]
    status, body = await http_json("GET", http + "/api/discovery", bearer=bearer)
    assert status == 200 and body["targets"] == len(ports) and body["scans"] >= 1


async def test_bounded_concurrency_bounds_the_scan(nursery: trio.Nursery) -> None:
    silent = [await start_tcp(nursery, "silent") for _ in range(6)]
    ollama = await start_http(nursery, OLLAMA)
    settings = DiscoveryConfig(
        targets=tuple(f"127.0.0.1:{p}" for p in [*silent, ollama]),
        concurrency=3,
        connect_timeout_s=0.5,
        probe_timeout_s=0.2,
        target_timeout_s=0.3,
    )
    scanner = Scanner(Inventory(), settings)
    report = await scanner.scan_once()
    # 7 targets, 3 at a time: at most 3 waves of the 0.3 s per-target limit.
    assert report.duration_s is not None and report.duration_s < 3 * 0.3 + 0.5
    assert report.kinds == {"unknown": 6, "ollama": 1}
    silent_entry = scanner.inventory.get(f"127.0.0.1:{silent[0]}", now=time.time())
    assert silent_entry is not None and "0.3s" in silent_entry.reason  # ran out of its time


async def test_entries_age_stale_then_gone_and_come_back(nursery: trio.Nursery) -> None:
    inventory = Inventory()
    async with trio.open_nursery() as server_nursery:
        port = await start_http(server_nursery, OLLAMA)
        settings = DiscoveryConfig(
            networks=("127.0.0.1/32",),  # swept, not configured: "discovered"
            ports=(port,),
            connect_timeout_s=0.5,
            probe_timeout_s=0.5,
            gone_after_misses=2,
        )
        scanner = Scanner(inventory, settings)
        await scanner.scan_once()
        name = f"127.0.0.1:{port}"
        entry = inventory.get(name, now=time.time())
        assert entry is not None and (entry.kind, entry.state, entry.source) == (
            "ollama", "fresh", "discovered"
        )  # fmt: skip
        first_seen = entry.first_seen
        server_nursery.cancel_scope.cancel()

    await scanner.scan_once()
    entry = inventory.get(name, now=time.time())
    assert entry is not None and (entry.kind, entry.state) == ("ollama", "stale")
    assert "nothing listens" in entry.reason and "1 scan(s) in a row" in entry.reason
    assert [m.id for m in entry.models.values()] == ["llama3.2:1b"]  # last known, kept

    await scanner.scan_once()
    entry = inventory.get(name, now=time.time())
    assert entry is not None and entry.state == "gone" and "2 scan(s)" in entry.reason

    # Back on the same port: fresh again, first seen unchanged.
    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    handler = await _http_handler(nursery, json_routes(OLLAMA))
    nursery.start_soon(trio.serve_listeners, handler, listeners)
    await scanner.scan_once()
    entry = inventory.get(name, now=time.time())
    assert entry is not None and entry.state == "fresh" and entry.first_seen == first_seen

    # A swept (not configured) address where nothing ever listened is not recorded.
    assert all(n.kind != "absent" for n in inventory.nodes(now=time.time()))


async def _http_handler(nursery: trio.Nursery, router: Router) -> Any:
    """Serves ``router`` on each connection it is given (through an HTTP engine)."""
    from qmesh.web.native import NativeHttpServer

    server = NativeHttpServer(router)
    await nursery.start(server.run)

    async def handler(stream: trio.SocketStream) -> None:
        server.adopt(stream.socket.detach(), "test:0")

    return handler


async def test_probe_target_postgres_like_answer(nursery: trio.Nursery) -> None:
    async def handler(stream: trio.SocketStream) -> None:
        data = await stream.receive_some(8)
        if data == b"\x00\x00\x00\x08\x04\xd2\x16\x2f":
            await stream.send_all(b"N")
            await stream.receive_some(1)
        await trio.aclose_forcefully(stream)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    nursery.start_soon(trio.serve_listeners, handler, listeners)
    port = listeners[0].socket.getsockname()[1]
    finding = await probe_target(Target("127.0.0.1", port, True), FAST)
    assert finding.kind == "postgres" and finding.details == {"ssl": False}


# -- coherence with daemons ------------------------------------------------------------------------


def test_daemon_health_port_is_not_a_second_entry() -> None:
    inventory = Inventory()
    now = time.time()
    session = object()
    inventory.hello("gpu-1", now=now, kind="daemon", source="tunnel", connection=session)
    scanner = Scanner(inventory, DiscoveryConfig(targets=("127.0.0.1:11450",)))
    target = scanner.targets[0]
    # Found before it connected, it had an entry of its own; now it merges.
    inventory.observe(target.address, now=now, kind="qmesh-daemon", source="configured",
                      address=target.address, reason="x", interval_s=30)  # fmt: skip
    finding = Finding("qmesh-daemon", "qmesh daemon 'gpu-1'", details={"node": "gpu-1"})
    scanner.apply(target, finding)
    names = [n.name for n in inventory.nodes(now=time.time())]
    assert names == ["gpu-1"]
    node = inventory.get("gpu-1", now=time.time())
    assert node is not None and node.extra["health"]["address"] == "127.0.0.1:11450"

    # A daemon that is not connected to this Gate is an entry of its own, not a router worker.
    other = Finding("qmesh-daemon", "qmesh daemon 'elsewhere'", details={"node": "elsewhere"})
    scanner.apply(Target("127.0.0.1", 11451, True), other)
    assert inventory.get("127.0.0.1:11451", now=time.time()).kind == "qmesh-daemon"  # type: ignore[union-attr]
    assert [n.name for n in inventory.nodes(now=time.time(), kind="daemon")] == ["gpu-1"]


def test_services_a_daemon_drives_say_so() -> None:
    inventory = Inventory()
    now = time.time()
    inventory.hello("gpu-1", now=now, kind="daemon", source="tunnel", connection=object(),
                    address="box")  # fmt: skip
    inventory.report("gpu-1", now=now, models=[],
                     runtimes=[{"name": "ollama@10.0.0.7:11434", "kind": "ollama",
                                "url": "http://10.0.0.7:11434"}])  # fmt: skip
    scanner = Scanner(inventory, DiscoveryConfig(targets=("10.0.0.7:11434",)), hostname="gate")
    assert scanner._managers() == {"10.0.0.7:11434": "gpu-1"}
    finding = Finding("ollama", "Ollama", server="ollama", version="0.5.7")
    scanner.apply(scanner.targets[0], finding, managed_by="gpu-1")
    entry = inventory.get("10.0.0.7:11434", now=time.time())
    assert entry is not None and entry.extra["managed_by"] == "gpu-1"


# -- configuration ---------------------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def test_discovery_config(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            """
            [gate.discovery]
            targets = ["10.0.0.5:11434", "[::1]:8080"]
            networks = ["192.168.7.0/30"]
            hosts = ["gpu-box.lan"]
            ports = [11434, 8080, 11434]
            interval_s = 15
            concurrency = 8
            connect_timeout_s = 0.5
            """,
        ),
        env={},
    )
    d = config.gate.discovery
    assert d.enabled and d.ports == (11434, 8080) and d.concurrency == 8
    assert (d.interval_s, d.connect_timeout_s, d.probe_timeout_s) == (15.0, 0.5, 2.0)
    targets = targets_from_config(d)
    addresses = [(t.address, t.configured) for t in targets]
    assert addresses[:2] == [("10.0.0.5:11434", True), ("[::1]:8080", True)]
    swept = {a for a, configured in addresses if not configured}
    assert swept == {
        "192.168.7.1:11434", "192.168.7.1:8080", "192.168.7.2:11434", "192.168.7.2:8080",
        "gpu-box.lan:11434", "gpu-box.lan:8080",
    }  # fmt: skip
    assert not load_config(None, env={"HOME": str(tmp_path)}).gate.discovery.enabled


WHERE = "config.toml:2: gate.discovery."


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('networks = ["10.0.0.0/24"]', WHERE + "networks: needs gate.discovery.ports"),
        ('networks = ["10.0.0.5/24"]\nports = [1]', WHERE + "networks[0]: expected a CIDR"),
        ('targets = ["10.0.0.5"]', WHERE + 'targets[0]: expected "host:port"'),
        ('targets = ["10.0.0.5:0"]', WHERE + "targets[0]: port 0 cannot be scanned"),
        ("ports = [70000]", WHERE + "ports[0]: expected a port from 1 to 65535"),
        ('hosts = ["a b"]\nports = [1]', WHERE + "hosts[0]: expected a host name"),
        ('networks = ["10.0.0.0/8"]\nports = [1]', "more than gate.discovery.max_targets (4096)"),
        ("concurency = 4", WHERE + "concurency: unknown key; did you mean 'concurrency'?"),
        ("gone_after_misses = 1", "expected an integer from 2"),
        ("probe_timeout_s = 0", "expected a number greater than 0"),
    ],
)
def test_discovery_config_errors(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "[gate.discovery]\n" + body + "\n"), env={})
    assert message in str(info.value)


# -- qmesh inventory against a Gate in this process ------------------------------------------------


async def test_inventory_command_table_json_and_up_json(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    import json
    import os
    import sys

    ollama = await start_http(nursery, OLLAMA)
    closed = closed_port()
    gate_dir = make_gate_dir(tmp_path)
    config_file = tmp_path / "gate.toml"
    config_file.write_text(
        gate_dir.config_text() + f'[gate.discovery]\ntargets = ["127.0.0.1:{ollama}", '
        f'"127.0.0.1:{closed}"]\ninterval_s = 60\nconnect_timeout_s = 0.5\n'
    )
    gate = await nursery.start(run_gate, load_config(config_file, env={}))
    env = {**os.environ, "QMESH_ADMIN_KEY": gate_dir.bearer}

    async def qmesh(*args: str, **options: Any) -> Any:
        with trio.fail_after(60):
            return await trio.run_process(
                [sys.executable, "-m", "qmesh", *args],
                capture_stdout=True, capture_stderr=True, check=False, **options,
            )  # fmt: skip

    table = await qmesh("inventory", "--scan", "--gate", gate["http"], env=env)
    assert table.returncode == 0, table.stderr
    text = table.stdout.decode()
    assert text.splitlines()[0].split()[:3] == ["NAME", "KIND", "STATE"]
    assert f"127.0.0.1:{ollama}  ollama" in text and "llama3.2:1b Q8_0" in text
    assert f"127.0.0.1:{closed}  absent" in text and "nothing listens there" in text
    assert "2 entries: 1 fresh, 0 stale, 1 gone" in text

    data_dir = tmp_path / "up"
    data_dir.mkdir()
    (data_dir / "up.json").write_text(
        json.dumps({"gate": {"http": gate["http"], "admin_key": gate_dir.bearer}})
    )
    as_json = await qmesh("--data-dir", str(data_dir), "inventory", "--json", "--state", "fresh")
    assert as_json.returncode == 0, as_json.stderr
    (entry,) = json.loads(as_json.stdout)["nodes"]
    assert entry["kind"] == "ollama" and entry["models"][0]["quantization"] == "Q8_0"

    without = {k: v for k, v in os.environ.items() if k != "QMESH_ADMIN_KEY"}
    no_key = await qmesh(
        "--data-dir", str(tmp_path / "empty"), "inventory", "--gate", gate["http"], env=without
    )
    assert no_key.returncode == 2 and b"no admin key" in no_key.stderr
