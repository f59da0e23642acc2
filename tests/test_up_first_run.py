"""``qmesh up`` on a first run, as a real process with no config file: its
daemon serves the model cache that ``scripts/setup.sh`` fills, the model
commands find the same models, a missing cache is one clear line, not a
failed start, the Gate probes this machine's usual service ports unless
told not to, and a throwaway PostgreSQL answers ``psql`` through the
MiniGate with nothing configured. (Other software may listen on those ports
here: the tests assert which addresses are probed, not what answers.)"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from processkit import forget_demo_database, stop, wait_for
from test_daemon_catalog import write_gguf  # skips this module without the gguf package

from qmesh.cli.up import LOCAL_SERVICES, local_discovery
from qmesh.config import Config, load_config
from qmesh.daemon.catalog import MODEL_CACHE_ENV, describe_gguf
from qmesh.pg.demo import PG_BIN_ENV

UP_TIMEOUT_S = 90.0  # generous: the first start measures memory bandwidth


def qmesh(cache: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qmesh", *args],
        env={**os.environ, MODEL_CACHE_ENV: str(cache)},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def up_json(data_dir: Path) -> dict[str, Any] | None:
    try:
        summary: dict[str, Any] = json.loads((data_dir / "up.json").read_text())
    except (OSError, ValueError):
        return None  # not written yet
    return summary


def psql(dsn: str, sql: str) -> str:
    result = subprocess.run(
        ["psql", dsn, "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def wait_for_banner(log: Path) -> None:
    wait_for("the banner", lambda: "Ctrl-C stops everything" in log.read_text(), UP_TIMEOUT_S)


def run_up(
    tmp_path: Path, cache: Path, *options: str, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], Path, Path]:
    data_dir = tmp_path / "data"
    log = tmp_path / "up.log"
    command = ["up", "--ephemeral", "--data-dir", str(data_dir), *options]
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "qmesh", *command],
            env={**os.environ, MODEL_CACHE_ENV: str(cache), **(env or {})},
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return process, data_dir, log


def test_the_daemon_of_up_serves_the_model_cache(tmp_path: Path) -> None:
    cache = tmp_path / "models"
    cache.mkdir()
    model = describe_gguf(write_gguf(cache / "tiny-f16.gguf"))
    model_id = model.id
    process, data_dir, log = run_up(tmp_path, cache, "--no-demo-db")
    try:
        wait_for_banner(log)
        summary = up_json(data_dir)
        assert summary is not None
        assert summary["daemon"]["models"] == [model_id]
        assert f"models    {model_id}" in log.read_text()
        assert "no model cache" not in log.read_text()
        # Discovery of this machine, on by default.
        local = [f"127.0.0.1:{port}" for _, port in LOCAL_SERVICES]
        assert summary["discovery"]["targets"] == local
        request = urllib.request.Request(
            summary["gate"]["http"] + "/api/discovery",
            headers={"Authorization": f"Bearer {summary['gate']['admin_key']}"},
        )
        with urllib.request.urlopen(request, timeout=30) as answer:
            scanner = json.load(answer)
        assert scanner["enabled"] is True
        assert [a["address"] for a in scanner["addresses"]] == local
        assert f"discovery probing {', '.join(local)}" in log.read_text()
    finally:
        stop(process)

    # The model commands look where the daemon of `qmesh up` looks.
    catalog = qmesh(cache, "node", "catalog", "--json", cwd=tmp_path)
    assert catalog.returncode == 0, catalog.stderr
    assert [m["id"] for m in json.loads(catalog.stdout)] == [model_id]
    plan = qmesh(cache, "quant", "plan", model_id, "--node", "cpu", cwd=tmp_path)
    assert plan.returncode == 0, plan.stderr
    assert plan.stdout.startswith(f"model {model.equivalence},")


def test_without_a_model_cache_up_says_so_in_one_line_and_starts(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-cache"
    no_binaries = tmp_path / "no-pg-bin"
    process, data_dir, log = run_up(
        tmp_path, missing, "--no-discovery", env={PG_BIN_ENV: str(no_binaries)}
    )
    try:
        wait_for_banner(log)
        summary = up_json(data_dir)
        assert summary is not None and summary["daemon"]["models"] == []
        text = log.read_text()
        (line,) = [line for line in text.splitlines() if line.startswith("qmesh up: no model")]
        assert str(missing) in line and "scripts/setup.sh" in line and MODEL_CACHE_ENV in line
        assert "models    none" in text
        assert summary["discovery"]["targets"] == [] and "discovery off" in text
        assert summary["demo_db"] is None
        (line,) = [line for line in text.splitlines() if line.startswith("qmesh up: no demo")]
        assert "no PostgreSQL server binaries" in line and PG_BIN_ENV in line
    finally:
        stop(process)

    nothing = qmesh(missing, "node", "catalog", cwd=tmp_path)
    assert nothing.returncode == 2
    assert str(missing) in nothing.stderr and "scripts/setup.sh" in nothing.stderr


def test_local_discovery_leaves_configured_targets_and_the_gates_own_port_alone(
    tmp_path: Path,
) -> None:
    default = local_discovery(load_config(None, env={"HOME": str(tmp_path)}))
    own = default.gate.http_listen.rpartition(":")[2]
    assert f"127.0.0.1:{own}" not in default.gate.discovery.targets
    assert len(default.gate.discovery.targets) == len(LOCAL_SERVICES) - 1
    config_file = tmp_path / "gate.toml"
    config_file.write_text('[gate.discovery]\ntargets = ["127.0.0.1:9"]\n')
    configured: Config = load_config(config_file, env={"HOME": str(tmp_path)})
    assert local_discovery(configured).gate.discovery.targets == ("127.0.0.1:9",)


@pytest.mark.skipif(shutil.which("psql") is None, reason="needs psql")
def test_the_demo_database_answers_psql_through_the_minigate_and_keeps_its_data(
    tmp_path: Path,
) -> None:
    cache = tmp_path / "models"
    data_dir = tmp_path / "data"
    sockets = tmp_path / "run"
    sockets.mkdir()
    try:
        # The first start also puts the MiniGate's Postgres port on a socket.
        for sql, expected, socket_dir in (
            ("CREATE TABLE notes (body text); INSERT INTO notes VALUES ('kept')", "INSERT 0 1",
             sockets),
            ("SELECT body FROM notes", "kept", None),
        ):  # fmt: skip
            env = {"QMESH_MINIGATE__PG_UNIX_SOCKET_DIR": str(socket_dir)} if socket_dir else {}
            process, data_dir, log = run_up(tmp_path, cache, "--no-discovery", env=env)
            try:
                wait_for_banner(log)
                summary = up_json(data_dir)
                assert summary is not None and summary["demo_db"] is not None, log.read_text()
                dsn = summary["demo_db"]["psql"]
                assert dsn.startswith(f"postgresql://demo:{summary['demo_app']['app_key']}@")
                assert dsn.endswith(f"@{summary['minigate']['pg']}/demo")
                assert psql(dsn, "SELECT 1") == "1"
                assert psql(dsn, sql).splitlines()[-1] == expected
                socket_file = summary["minigate"]["pg_socket"]
                if socket_dir is None:
                    assert socket_file is None
                else:
                    port = summary["minigate"]["pg"].rpartition(":")[2]
                    assert socket_file == str(socket_dir / f".s.PGSQL.{port}")
                    key = summary["demo_app"]["app_key"]
                    on_socket = f"postgresql://demo:{key}@/demo?host={socket_dir}&port={port}"
                    assert psql(on_socket, "SELECT count(*) FROM notes") == "1"
            finally:
                stop(process)
            assert "database  psql 'postgresql://demo:APP_KEY@" in log.read_text()
            if socket_dir is not None:
                assert f"or the Unix-domain socket {socket_file}" in log.read_text()
                assert not Path(socket_file).exists(), "the socket outlived the MiniGate"
            log.unlink()  # the next start writes its own
            (data_dir / "up.json").unlink()
    finally:
        forget_demo_database(data_dir)


def test_a_port_already_taken_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "qmesh", "up", "--no-demo-db", "--no-discovery",
             "--data-dir", str(tmp_path / "data")],
            env={**os.environ, "QMESH_GATE__TUNNEL_LISTEN": f"127.0.0.1:{port}"},
            cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if "error:" in line]
    assert f"cannot listen on 127.0.0.1:{port} for the Gate's tunnel: another program" in line
    assert "--port-offset N, or --ephemeral" in line  # what to do about it
