"""Helpers for tests of Gates that share one state: the ``qmesh`` command as
an operator runs it, a Gate's configuration file, ``qmesh gates``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import openai
import trio
from daemonkit import FAST_TUNNEL
from processkit import free_port

from qmesh.config import load_config
from qmesh.gate.role import run_gate


def qmesh(
    data_dir: Path, url: str, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """``qmesh --data-dir DATA_DIR ARGS…`` in a process of its own, its state
    at ``url`` (``QMESH_GATE__DATABASE_URL``; no other ``QMESH_`` setting)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QMESH_")}
    env["QMESH_GATE__DATABASE_URL"] = url
    return subprocess.run(
        [sys.executable, "-m", "qmesh", "--data-dir", str(data_dir), *args],
        env=env, input=stdin, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def qmesh_ok(
    data_dir: Path, url: str, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """:func:`qmesh`, which must succeed."""
    result = qmesh(data_dir, url, *args, stdin=stdin)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def gate_config(
    path: Path,
    data_dir: Path,
    url: str | None,
    name: str,
    *,
    tunnel: int | None = None,
    heartbeat_s: float = 0.25,
    gone_after_s: float = 1.0,
    extra: str = "",
) -> tuple[int, int]:
    """Write a Gate's configuration (``url`` None: it comes from the
    environment); its tunnel and HTTP ports."""
    tunnel, http = tunnel or free_port(), free_port()
    database = "" if url is None else f'database_url = "{url}"\n'
    path.write_text(
        f'data_dir = "{data_dir}"\n'
        f'[gate]\nname = "{name}"\ntunnel_listen = "127.0.0.1:{tunnel}"\n'
        f'http_listen = "127.0.0.1:{http}"\n{database}'
        f"[gate.cluster]\nheartbeat_interval_s = {heartbeat_s}\ngone_after_s = {gone_after_s}\n"
        + extra
    )
    return tunnel, http


def gates(data_dir: Path, url: str) -> dict[str, dict[str, Any]]:
    """``qmesh gates --json``, by name."""
    listed = qmesh_ok(data_dir, url, "gates", "--json")
    return {g["name"]: g for g in json.loads(listed.stdout)}


async def start_gate(
    nursery: trio.Nursery, tmp_path: Path, data: Path, url: str, name: str
) -> dict[str, Any]:
    """A Gate of the cluster in this process; its endpoints (``run_gate``'s)."""
    file = tmp_path / f"{name}.toml"
    gate_config(file, data, url, name, extra=FAST_TUNNEL)
    endpoints: dict[str, Any] = await nursery.start(run_gate, load_config(file, env={}))
    return endpoints


class Application:
    """A loop in a thread of its own, as an application runs one, until stopped."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:  # started (a test may fail before it starts it)
            self._thread.join(timeout=60)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self) -> None:
        raise NotImplementedError


class Traffic(Application):
    """Chat completions one after another on one keep-alive client."""

    def __init__(self, base_url: str, key: str) -> None:
        super().__init__()
        self.client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=30)
        self.answered: list[float] = []
        self.errors: list[str] = []

    def run(self) -> None:
        n = 0
        while not self.stopping:
            n += 1
            try:
                reply = self.client.chat.completions.create(
                    model="qg://task=keywords",
                    messages=[{"role": "user", "content": f"failover request {n} about gates"}],
                )
                assert reply.choices[0].message.content, reply
                self.answered.append(time.monotonic())
            except Exception as exc:  # every error is what the test counts
                self.errors.append(f"{type(exc).__name__}: {exc}")

    def answered_since(self, moment: float) -> int:
        return sum(t > moment for t in self.answered)
