"""The release wheel, installed in a fresh virtualenv, works on its own.

Builds the manylinux wheel with ``scripts/build-wheel.sh`` (or reuses a fresh
one from ``dist/``), installs it with pip in a new venv (its dependencies come
from PyPI) and runs the installed ``qmesh`` executable from a folder outside
the checkout, so that nothing is imported from the source tree: ``--help``,
``version`` and a short ``qmesh up --ephemeral`` that must write ``up.json``,
listen on the Gate's tunnel port and stop cleanly on Ctrl-C (SIGINT).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from processkit import forget_demo_database

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
BUILD_TIMEOUT_S = 1800
INSTALL_TIMEOUT_S = 900
UP_JSON_TIMEOUT_S = 60
SIGINT_EXIT_TIMEOUT_S = 15

# What goes into the wheel: a wheel older than any of these is stale. Build
# outputs and caches are not sources (the extension that setup.sh copies into
# qmesh/, bytecode, cargo-fuzz's corpus and artifacts).
_SOURCE_TREES = ("rust", "qmesh")
_SOURCE_FILES = ("pyproject.toml", "Cargo.toml", "Cargo.lock")
_NOT_SOURCE_DIRS = frozenset(
    {"__pycache__", "target", "corpus", "artifacts", ".mypy_cache", ".ruff_cache"}
)
_NOT_SOURCE_SUFFIXES = (".so", ".pyc", ".pyo")


@attrs.frozen
class Installed:
    venv: Path
    wheel: Path
    version: str
    workdir: Path  # outside the checkout: commands run here
    env: dict[str, str]

    def bin(self, name: str) -> str:
        return str(self.venv / "bin" / name)

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            args,
            cwd=self.workdir,
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


def _newest_source_mtime() -> float:
    newest = max((ROOT / name).stat().st_mtime for name in _SOURCE_FILES)
    for tree in _SOURCE_TREES:
        for dirpath, dirnames, filenames in os.walk(ROOT / tree):
            dirnames[:] = [d for d in dirnames if d not in _NOT_SOURCE_DIRS]
            for filename in filenames:
                if not filename.endswith(_NOT_SOURCE_SUFFIXES):
                    newest = max(newest, (Path(dirpath) / filename).stat().st_mtime)
    return newest


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _wheel() -> Path:
    # Reuse the newest wheel in dist/ when it is newer than every file under
    # rust/ and qmesh/ (and pyproject.toml, Cargo.toml, Cargo.lock): a wheel
    # build compiles the whole crate graph again for the zig-linked target and
    # takes minutes. Otherwise build one with scripts/build-wheel.sh, exactly
    # as a release would.
    wheels = sorted(
        (ROOT / "dist").glob("qmesh-*-cp311-abi3-manylinux*.whl"), key=lambda p: p.stat().st_mtime
    )
    if wheels and wheels[-1].stat().st_mtime > _newest_source_mtime():
        return wheels[-1]
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "build-wheel.sh")],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, (
        f"scripts/build-wheel.sh failed ({proc.returncode}):\n"
        f"{_tail(proc.stdout)}\n{_tail(proc.stderr)}"
    )
    wheel = Path(proc.stdout.strip().splitlines()[-1])
    assert wheel.is_file(), f"build-wheel.sh's last line is not a wheel: {wheel}"
    return wheel


def _clean_env(home: Path) -> dict[str, str]:
    """The caller's environment without anything that could make the venv see
    the checkout (PYTHONPATH, an activated venv) or change qmesh's settings
    (QMESH_* overrides, the home folder's config)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("QMESH_")
        and k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")
    }
    home.mkdir(exist_ok=True)
    env["HOME"] = str(home)
    env.pop("XDG_CONFIG_HOME", None)
    env.pop("XDG_DATA_HOME", None)
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    wheel = _wheel()
    version = wheel.name.split("-")[1]
    base = tmp_path_factory.mktemp("wheel")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", str(wheel)],
        cwd=base,
        env=pip_env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, f"pip install {wheel.name} failed:\n{_tail(proc.stderr)}"
    workdir = base / "work"
    workdir.mkdir()
    return Installed(venv, wheel, version, workdir, _clean_env(base / "home"))


def test_imports_come_from_the_venv(installed: Installed) -> None:
    proc = installed.run(
        installed.bin("python"),
        "-c",
        "import qmesh, qmesh._core, sys; print(qmesh.__file__); print(qmesh._core.__file__)",
    )
    assert proc.returncode == 0, proc.stderr
    venv = installed.venv.resolve()
    for line in proc.stdout.splitlines():
        path = Path(line).resolve()
        assert path.is_relative_to(venv), f"{path} is not inside {venv}"
        assert not path.is_relative_to(ROOT / "qmesh"), f"{path} comes from the checkout"


def test_help_mentions_the_roles(installed: Installed) -> None:
    proc = installed.run(installed.bin("qmesh"), "--help")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout.lower()
    for role in ("gate", "minigate", "daemon"):
        assert role in text, f"`qmesh --help` does not mention {role}:\n{proc.stdout}"


def test_version(installed: Installed) -> None:
    proc = installed.run(installed.bin("qmesh"), "version")
    assert proc.returncode == 0, proc.stderr
    assert f"qmesh {installed.version}" in proc.stdout
    # "unknown" here would mean the wheel's extension did not load.
    assert "wire protocol" in proc.stdout and "unknown" not in proc.stdout, proc.stdout


def _connect_address(hostport: str) -> tuple[str, int]:
    host, sep, port = hostport.rpartition(":")
    assert sep and port.isdigit(), f"gate.tunnel is not host:port: {hostport!r}"
    host = host.strip("[]")
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return host, int(port)


def _wait_for_up_json(proc: subprocess.Popen[bytes], path: Path, log: Path) -> dict[str, Any]:
    deadline = time.monotonic() + UP_JSON_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(
                f"qmesh up exited ({proc.returncode}) before writing {path.name}:\n"
                f"{_tail(log.read_text(errors='replace'))}"
            )
        if path.exists():
            try:
                data: dict[str, Any] = json.loads(path.read_text())
            except json.JSONDecodeError:
                pass  # not all there yet (it should be written atomically)
            else:
                return data
        time.sleep(0.1)
    pytest.fail(f"no {path} after {UP_JSON_TIMEOUT_S} s:\n{_tail(log.read_text(errors='replace'))}")


@pytest.fixture
def up_process(
    installed: Installed, tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[bytes], Path, Path]]:
    data_dir = tmp_path / "data"  # `qmesh up` creates it on first start
    log = tmp_path / "up.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [installed.bin("qmesh"), "up", "--ephemeral", "--data-dir", str(data_dir)],
            cwd=installed.workdir,
            env=installed.env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield proc, data_dir, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        forget_demo_database(data_dir)


def test_up_smoke(up_process: tuple[subprocess.Popen[bytes], Path, Path]) -> None:
    proc, data_dir, log = up_process
    up_json = data_dir / "up.json"
    summary = _wait_for_up_json(proc, up_json, log)

    mode = stat.S_IMODE(up_json.stat().st_mode)
    assert mode == 0o600, f"{up_json} has mode {mode:#o}, want 0o600"
    for key in ("gate", "minigate", "daemon", "demo_app"):
        assert key in summary, f"{key!r} missing from up.json: {sorted(summary)}"
    assert isinstance(summary["gate"].get("tunnel"), str), summary["gate"]
    demo = summary["demo_app"]
    assert isinstance(demo.get("app_id"), str) and demo["app_id"], demo.keys()
    assert isinstance(demo.get("app_key"), str) and demo["app_key"], demo.keys()

    # The Gate's tunnel listener accepts connections.
    with socket.create_connection(_connect_address(summary["gate"]["tunnel"]), timeout=5):
        pass

    proc.send_signal(signal.SIGINT)
    try:
        code = proc.wait(timeout=SIGINT_EXIT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(
            f"qmesh up still running {SIGINT_EXIT_TIMEOUT_S} s after SIGINT:\n"
            f"{_tail(log.read_text(errors='replace'))}"
        )
    assert code == 0, f"qmesh up exited {code} after SIGINT:\n{_tail(log.read_text())}"
