"""The single pane of glass, as an operator would see it: a Gate process
scanning its configured addresses — two daemons (``qmesh --role daemon``
processes, enrolled, their own data directories), a separately started
``python -m llama_cpp.server`` with the Gemma model, a real PostgreSQL, an
address where nothing listens and one where a non-HTTP service sends
garbage — then ``qmesh inventory``, ``/metrics``, and the dashboard in
Debian's Chromium driven by Playwright (never Playwright's own browsers),
including ``kill -9`` of a daemon turning it stale on the page.

The screenshots go to ``test-artifacts/`` (gitignored). Measurements (scan
time, page load time) are printed; run with ``-s`` to see them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemonkit import (
    GEMMA_ID,
    daemon_config_text,
    free_port,
    gemma_path,
    make_gate_dir,
    model_dir_with,
    require_llama,
)
from daemonkit import _missing as missing
from pgcluster import PgCluster
from processkit import LoopbackServer, send_garbage, start_role, stop, wait_for
from processkit import start as start_process
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
HEARTBEAT_S = 0.3
STALE_AFTER, GONE_AFTER = 3, 12
SWEEP_S = 0.5
STREAM_GAP_S = 0.5  # the dashboard stream's snapshots are at most this far apart after a change
STALE_LIMIT_S = STALE_AFTER * HEARTBEAT_S + SWEEP_S + STREAM_GAP_S + 0.5


class Mesh:
    def __init__(self, tmp: Path, pg: PgCluster) -> None:
        self.tmp = tmp
        self.pg = pg
        self.processes: list[subprocess.Popen[bytes]] = []
        self.gate = make_gate_dir(tmp)
        self.http = f"http://127.0.0.1:{self.gate.http_port}"
        self.garbage = LoopbackServer(send_garbage)
        self.nothing = free_port()
        self.llama_port = free_port()
        self.health = {"node-a": free_port(), "node-b": free_port()}
        self.addresses = {
            "llama": f"127.0.0.1:{self.llama_port}",
            "postgres": f"127.0.0.1:{pg.port}",
            "garbage": f"127.0.0.1:{self.garbage.port}",
            "nothing": f"127.0.0.1:{self.nothing}",
            **{name: f"127.0.0.1:{port}" for name, port in self.health.items()},
        }
        self.daemons: dict[str, subprocess.Popen[bytes]] = {}

    def start(self) -> None:
        self.llama = start_process(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(gemma_path()),
             "--host", "127.0.0.1", "--port", str(self.llama_port), "--n_ctx", "512"],
            self.tmp / "llama-server.log",
        )  # fmt: skip
        self.processes.append(self.llama)
        targets = ", ".join(f'"{a}"' for a in self.addresses.values())
        config = self.tmp / "gate.toml"
        config.write_text(
            self.gate.config_text(stale=STALE_AFTER, gone=GONE_AFTER)
            + f"[gate.discovery]\ntargets = [{targets}]\ninterval_s = 30\n"
            "probe_timeout_s = 1.0\nconnect_timeout_s = 1.0\n"
            # A flat rate for daemon work, so local requests show on the budget.
            # Its limit is far above what they spend even as projected in the
            # first half hour of a UTC day (counted as 1/48 of the day): the
            # page must say "ok" at any hour the suite runs.
            "[gate.routing]\nlocal_rate_usd_per_1m = 100.0\n"
            '[[gate.budgets]]\nname = "ops"\nlimit_usd = 100.0\nperiod = "day"\n'
            'apps = ["admin"]\n'
        )
        self.processes.append(start_role("gate", config, self.tmp / "gate.log"))
        for name, port in self.health.items():
            credential = self.gate.enroll_daemon(name, self.tmp / f"{name}.cred")
            dirs = (model_dir_with(self.tmp, GEMMA_ID),) if name == "node-a" else ()
            text = daemon_config_text(
                self.tmp / name, credential, self.gate, model_dirs=dirs, heartbeat=HEARTBEAT_S
            ).replace('health_listen = "127.0.0.1:0"', f'health_listen = "127.0.0.1:{port}"')
            path = self.tmp / f"{name}.toml"
            path.write_text(text)
            self.daemons[name] = start_role("daemon", path, self.tmp / f"{name}.log")
            self.processes.append(self.daemons[name])
        wait_for("the llama-cpp-python server", lambda: self.get_plain("/v1/models"), 120)
        wait_for(
            "both daemons fresh",
            lambda: {n["name"]: n["state"] for n in self.api("/api/inventory")["nodes"]
                     if n["kind"] == "daemon"} == {"node-a": "fresh", "node-b": "fresh"},
            90,
        )  # fmt: skip
        # The Gate's first scan ran while the servers were starting: one more,
        # so each test sees the mesh as it is (the scan test times its own).
        self.api("/api/discovery/scan", method="POST")

    def get_plain(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://{self.addresses['llama']}{path}", timeout=5) as r:
            return json.load(r)

    def api(
        self, path: str, *, method: str = "GET", body: Any = None, key: str | None = None
    ) -> Any:
        request = urllib.request.Request(
            self.http + path,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"authorization": f"Bearer {key or self.gate.bearer}",
                     "content-type": "application/json"},
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=120) as response:
            data = response.read()
        return (
            json.loads(data) if response.headers.get_content_type() == "application/json" else data
        )

    def close(self) -> None:
        for process in reversed(self.processes):
            stop(process)
        self.garbage.close()

    def logs_without_tracebacks(self) -> None:
        for log in self.tmp.glob("*.log"):
            if log.name != "llama-server.log":
                assert "Traceback" not in log.read_text(), f"{log.name}:\n{log.read_text()[-3000:]}"


@pytest.fixture(scope="module")
def mesh(pg_cluster: PgCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    require_llama()
    gemma_path()
    the_mesh = Mesh(tmp_path_factory.mktemp("pane"), pg_cluster)
    try:
        the_mesh.start()
        yield the_mesh
    finally:
        the_mesh.close()


# -- discovery -------------------------------------------------------------------------------------


def test_scan_lists_exactly_the_real_services(mesh: Mesh) -> None:
    started = time.monotonic()
    report = mesh.api("/api/discovery/scan", method="POST")["scan"]
    took = time.monotonic() - started
    print(
        f"\nscan of {len(mesh.addresses)} configured targets: {report['duration_s']:.3f}s "
        f"in the Gate ({took:.3f}s for the whole call), slowest {report['slowest']} "
        f"({report['slowest_s']:.3f}s); kinds {report['kinds']}"
    )
    assert report["duration_s"] < 3.0, report
    a = mesh.addresses
    entries = {n["name"]: n for n in mesh.api("/api/inventory")["nodes"]}
    # The daemons' health ports merged into the daemons' own entries: no duplicates.
    assert set(entries) == {
        "node-a",
        "node-b",
        a["llama"],
        a["postgres"],
        a["garbage"],
        a["nothing"],
    }
    kinds = {name: (e["kind"], e["state"]) for name, e in entries.items()}
    assert kinds == {
        "node-a": ("daemon", "fresh"),
        "node-b": ("daemon", "fresh"),
        a["llama"]: ("openai", "fresh"),
        a["postgres"]: ("postgres", "fresh"),
        a["garbage"]: ("unknown", "fresh"),
        a["nothing"]: ("absent", "gone"),
    }
    llama = entries[a["llama"]]
    assert (llama["extra"]["server"], llama["version"], llama["source"]) == (
        "llama-cpp-python", _llama_cpp_version(), "configured"
    )  # fmt: skip
    (model,) = llama["models"]
    assert (model["id"], model["quantization"], model["state"]) == (GEMMA_ID, "Q4_K_M", "loaded")
    assert model["metadata"]["served_as"] == str(gemma_path())
    assert entries[a["postgres"]]["extra"]["ssl"] is False
    assert [m["id"] for m in entries["node-a"]["models"]] == [GEMMA_ID]
    assert entries["node-b"]["models"] == []
    for name in ("node-a", "node-b"):
        assert entries[name]["source"] == "tunnel"  # self-reported
        assert entries[name]["extra"]["health"]["address"] == a[name]
    assert "garbage" in entries[a["garbage"]]["reason"]
    assert "nothing listens" in entries[a["nothing"]]["reason"]
    # Filters.
    only = mesh.api("/api/inventory?kind=openai")["nodes"]
    assert [n["name"] for n in only] == [a["llama"]]
    with_gemma = {n["name"] for n in mesh.api(f"/api/inventory?model={GEMMA_ID}")["nodes"]}
    assert with_gemma == {"node-a", a["llama"]}
    mesh.logs_without_tracebacks()


def _llama_cpp_version() -> str:
    import llama_cpp

    return str(llama_cpp.__version__)


# -- the command line ------------------------------------------------------------------------------


def qmesh_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> Any:
    return subprocess.run(
        [sys.executable, "-m", "qmesh", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_inventory_command(mesh: Mesh, tmp_path: Path) -> None:
    a = mesh.addresses
    table = qmesh_cli("inventory", "--gate", mesh.http, "--key", mesh.gate.bearer)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:4] == ["NAME", "KIND", "STATE", "SOURCE"]
    for needle in ("node-a", "node-b", a["llama"], a["postgres"], "llama-cpp-python", "Q4_K_M*"):
        assert needle in table.stdout, needle
    assert "6 entries: 5 fresh, 0 stale, 1 gone" in table.stdout

    # The key and address from DATA_DIR/up.json, as `qmesh up` writes them.
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "up.json").write_text(
        json.dumps({"gate": {"http": mesh.http, "admin_key": mesh.gate.bearer}})
    )
    as_json = qmesh_cli("--data-dir", str(data_dir), "inventory", "--json", "--kind", "postgres")
    assert as_json.returncode == 0, as_json.stderr
    assert [n["name"] for n in json.loads(as_json.stdout)["nodes"]] == [a["postgres"]]

    from_env = qmesh_cli("inventory", "--gate", mesh.http, "--state", "gone",
                         env={"QMESH_ADMIN_KEY": mesh.gate.bearer})  # fmt: skip
    assert from_env.returncode == 0 and a["nothing"] in from_env.stdout
    assert "node-a" not in from_env.stdout

    refused = qmesh_cli("inventory", "--gate", mesh.http, "--key", "admin:wrong")
    assert refused.returncode == 2 and "refused the key" in refused.stderr
    unreachable = qmesh_cli(
        "inventory", "--gate", f"http://127.0.0.1:{free_port()}", "--key", "a:b"
    )
    assert unreachable.returncode == 1 and "cannot reach the Gate" in unreachable.stderr

    screen = tmp_path / "watch.out"
    with screen.open("w") as out:
        watch = subprocess.Popen(
            [sys.executable, "-m", "qmesh", "inventory", "--watch", "--interval", "0.3",
             "--gate", mesh.http, "--key", mesh.gate.bearer],
            stdout=out, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
    wait_for("three redraws", lambda: screen.read_text().count("\x1b[H\x1b[J") >= 3, 60)
    watch.send_signal(signal.SIGINT)
    _, err = watch.communicate(timeout=10)
    assert watch.returncode == 0, err
    assert screen.read_text().count("NAME  ") >= 3 and "Traceback" not in err


# -- metrics ---------------------------------------------------------------------------------------


def samples(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_metrics_of_the_mesh(mesh: Mesh) -> None:
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(mesh.http + "/metrics", timeout=10)
    assert refused.value.code == 401
    before = samples(mesh.api("/metrics").decode())
    assert before["qmesh_inventory_entries"][(("kind", "daemon"), ("state", "fresh"))] == 2
    assert before["qmesh_inventory_entries"][(("kind", "openai"), ("state", "fresh"))] == 1
    assert before["qmesh_inventory_entries"][(("kind", "absent"), ("state", "gone"))] == 1
    assert before["qmesh_tunnel_sessions"][(("attached", "true"), ("role", "daemon"))] == 2
    assert before["qmesh_node_up"][(("kind", "daemon"), ("node", "node-a"))] == 1
    assert before["qmesh_node_memory_total_bytes"][(("node", "node-a"),)] > 0
    assert (("node", "node-b"),) in before["qmesh_node_cpu_percent"]
    assert before["qmesh_discovery_scans_total"][()] >= 1

    # A routed request on the daemon's model: the counters move.
    body = {"model": f"qg://task=chat;model={GEMMA_ID}", "max_tokens": 8, "prompt": "Hello"}
    answer = mesh.api("/v1/completions", method="POST", body=body)
    assert answer["usage"]["completion_tokens"] >= 1
    after = samples(mesh.api("/metrics").decode())
    ok = (("kind", "daemon"), ("outcome", "ok"))
    assert (
        after["qmesh_llm_requests_total"][ok]
        == before.get("qmesh_llm_requests_total", {}).get(ok, 0) + 1
    )
    assert after["qmesh_llm_tokens_total"][(("direction", "out"), ("kind", "daemon"))] >= 1
    assert after["qmesh_route_decisions_total"][()] >= 1
    assert after["qmesh_llm_request_duration_seconds_count"][(("kind", "daemon"),)] >= 1
    assert after["qmesh_budget_spent_usd"][(("budget", "ops"),)] > 0
    chat_route = (("method", "POST"), ("route", "/v1/completions"), ("status", "200"))
    assert after["qmesh_http_requests_total"][chat_route] >= 1


# -- the dashboard in a real browser ---------------------------------------------------------------


def test_dashboard_in_chromium(mesh: Mesh) -> None:
    if not CHROMIUM.exists():
        missing(f"{CHROMIUM} is missing (scripts/setup.sh installs Debian's chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    ARTIFACTS.mkdir(exist_ok=True)
    requested: list[str] = []
    problems: list[str] = []
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM))
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            page.on("request", lambda r: requested.append(r.url))
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)

            # Without the key: a sign-in form, no data on the page, the data refused.
            page.goto(mesh.http + "/")
            page.wait_for_selector("#login-form", state="visible")
            assert page.is_hidden("#app")
            assert "node-a" not in page.content()
            status = page.evaluate("fetch('/api/dashboard').then(r => r.status)")
            assert status == 401
            stream_status = page.evaluate("fetch('/api/dashboard/stream').then(r => r.status)")
            assert stream_status == 401
            page.fill("#key", "admin:not-the-key")
            page.click("button[type=submit]")
            page.wait_for_selector("#login-error:not([hidden])")
            assert page.is_hidden("#app")
            problems.clear()  # the refused fetches log 401s to the console, as they should

            # With the key: loaded, both daemons and the model shown.
            started = time.monotonic()
            page.goto(mesh.http + "/")
            page.fill("#key", mesh.gate.bearer)
            page.click("button[type=submit]")
            page.wait_for_selector("body[data-loaded=true]")
            page.wait_for_selector("[data-node=node-a][data-state=fresh]")
            page.wait_for_selector("[data-node=node-b][data-state=fresh]")
            load_s = time.monotonic() - started
            print(f"\ndashboard: page + sign-in + first data in {load_s:.3f}s")
            timing = page.evaluate(
                "JSON.stringify(performance.getEntriesByType('navigation')[0].toJSON())"
            )
            navigation = json.loads(timing)
            print(
                f"dashboard: navigation {navigation['duration']:.0f} ms "
                f"(DOMContentLoaded {navigation['domContentLoadedEventEnd']:.0f} ms)"
            )
            assert page.is_visible(f"tr[data-model='{GEMMA_ID}'][data-where='node-a']")
            assert page.is_visible(
                f"tr[data-service='{mesh.addresses['llama']}'][data-kind=openai]"
            )
            assert page.is_visible(
                f"tr[data-service='{mesh.addresses['postgres']}'][data-kind=postgres]"
            )
            assert page.is_visible(
                f"tr[data-service='{mesh.addresses['garbage']}'][data-kind=unknown]"
            )
            assert page.is_visible("[data-budget=ops]")
            health = page.get_attribute("#health-pill", "data-health")
            assert health == "ok", page.inner_text("#problems")
            # The three routing charts have points (two or more draw a line).
            page.locator("#routing polyline.chart-line").nth(2).wait_for(state="attached")
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

            # kill -9 one daemon: stale on the page within the threshold, no reload.
            page.evaluate("window.__sameDocument = true")
            os.kill(mesh.daemons["node-b"].pid, signal.SIGKILL)
            mesh.daemons["node-b"].wait()
            killed = time.monotonic()
            page.wait_for_selector(
                "[data-node=node-b][data-state=stale]", timeout=(STALE_LIMIT_S + 3) * 1000
            )
            stale_after = time.monotonic() - killed
            print(f"dashboard: node-b stale on the page {stale_after:.2f}s after kill -9 "
                  f"(threshold {STALE_LIMIT_S:.2f}s)")  # fmt: skip
            assert stale_after <= STALE_LIMIT_S
            assert page.evaluate("window.__sameDocument") is True  # the same page, not reloaded
            assert "no heartbeat" in page.inner_text("[data-node=node-b] [data-reason]")
            assert page.get_attribute("#health-pill", "data-health") == "warn"
            assert page.is_visible("[data-node=node-a][data-state=fresh]")
            page.screenshot(path=str(ARTIFACTS / "dashboard-stale.png"), full_page=True)

            # Signing out forgets the key.
            page.click("#logout")
            page.wait_for_selector("#login-form", state="visible")
            assert page.evaluate("sessionStorage.length") == 0
        finally:
            browser.close()
    # No CDN: everything the page asked for came from the Gate.
    assert requested and all(url.startswith(mesh.http + "/") for url in requested), requested
    assert not problems, problems
    mesh.logs_without_tracebacks()


def test_artifacts_are_ignored_by_git() -> None:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    result = subprocess.run(
        ["git", "check-ignore", "-q", "test-artifacts/dashboard.png"], cwd=ROOT, check=False
    )
    assert result.returncode == 0
