"""Running qmesh roles as real processes in tests: start, stop, wait."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def free_port() -> int:
    """A port free on loopback right now (for configs that need a fixed one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """Start ``args`` with stdout and stderr appended to ``log``."""
    with log.open("ab") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)


def start_role(role: str, config: Path, log: Path) -> subprocess.Popen[bytes]:
    return start([sys.executable, "-m", "qmesh", "--role", role, "--config", str(config)], log)


def stop(process: subprocess.Popen[bytes], timeout: float = 15) -> None:
    """Ctrl-C, as an operator would; kill if it does not stop in time."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_for(what: str, check: Callable[[], object], timeout: float) -> float:
    """Poll ``check`` until it is true (errors of a service that is not up
    yet count as false); the seconds it took."""
    started = time.monotonic()
    while True:
        try:
            if check():
                return time.monotonic() - started
        except (OSError, KeyError, ValueError):
            pass
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


REPO = Path(__file__).resolve().parent.parent
EVENTUALLY_S = 60.0  # generous: the event must happen, how fast is for bench/


def qmesh_cli(
    config: Path, *args: str, ok: bool | None = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``qmesh --config CONFIG ARGS…`` as an operator runs it, without the
    caller's ``QMESH_`` settings (``env`` adds some); with ``ok`` True or
    False it must succeed or fail (None: the caller looks)."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("QMESH_")}
    environment.update(env or {})
    done = subprocess.run(
        [sys.executable, "-m", "qmesh", "--config", str(config), *args],
        capture_output=True, text=True, cwd=REPO, timeout=120, check=False, env=environment,
    )  # fmt: skip
    if ok is not None:
        assert (done.returncode == 0) == ok, (args, done.stdout, done.stderr)
    return done


def eventually(check: Callable[[], T], what: str, timeout: float = EVENTUALLY_S) -> T:
    """Poll ``check`` until it returns something true; that value."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout:g} s"
        time.sleep(0.05)
    return value


class LoopbackServer:
    """A threaded TCP server on 127.0.0.1 running ``handle(conn)`` for each
    connection in a thread of its own (services qmesh does not speak)."""

    def __init__(self, handle: Callable[[socket.socket], None]) -> None:
        self._handle = handle
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        with conn:
            try:
                self._handle(conn)
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()


def echo(conn: socket.socket) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


def send_garbage(conn: socket.socket) -> None:
    conn.sendall(b"\x8f\x00\x17garbage\xff\xfe not a protocol\r\n\r\n")


def forget_demo_database(data_dir: Path) -> None:
    """Stop and remove the demo PostgreSQL a ``qmesh up`` of ``data_dir``
    started (as root it lives in the postgres user's home, outside it)."""
    from qmesh.pg.demo import DemoDatabase, DemoDbUnavailable

    try:
        database = DemoDatabase.at(data_dir)
    except DemoDbUnavailable:
        return  # it could not have started
    database.stop()
    if database.cluster != database.base:
        shutil.rmtree(database.cluster, ignore_errors=True)
