"""llama.cpp as a runtime: one supervised model-server process per loaded model.

For: :class:`LlamaCppRuntime`. Loading a model starts
``python -m qmesh.daemon.runtimes.model_server PID --model FILE --model_alias ID``
(``llama_cpp.server``'s command line, served by
:mod:`~qmesh.daemon.runtimes.llama_server`) on a free loopback port, so that
the server dies with the daemon even when the daemon is killed, and waits until
its ``GET /v1/models`` lists the model (readiness); unloading terminates
the process, which returns every byte of RAM and VRAM it held. A process
that dies while loaded is restarted (with backoff, up to ``max_restarts``
times; then the model is marked failed and dropped). Generation streams
through the server's OpenAI-compatible API
(:func:`~qmesh.daemon.runtimes.openai.stream_openai`). "What is loaded" is
answered by asking each live process, not by our bookkeeping.

Why processes and not llama-cpp-python in worker threads of the daemon is
written down in docs/daemon.md: in short, a crash or abort inside llama.cpp
(a bad file, a failed CUDA allocation) must not take the daemon — and the
node's presence at the Gate — with it; killing a process is the only sure
way to give VRAM back; and llama-cpp-python's per-token Python work would
otherwise share the daemon's GIL with the tunnel.

Not for: deciding which model to evict (:mod:`qmesh.daemon.scheduler`) or
reading GGUF files (:mod:`qmesh.daemon.catalog`).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
from collections.abc import AsyncGenerator, Callable, Sequence
from pathlib import Path
from typing import Any, Final

import trio

from qmesh.daemon.catalog import Catalog, ModelInfo
from qmesh.daemon.errors import LoadFailed, RuntimeFailed, UnknownModel
from qmesh.daemon.quant import Variant, memory_need
from qmesh.daemon.runtimes.base import (
    GenerationEvent,
    GenerationRequest,
    Health,
    Runtime,
    RuntimeModel,
)
from qmesh.daemon.runtimes.openai import list_openai_models, stream_openai
from qmesh.fastsocket import free_loopback_port

__all__ = ["LlamaCppRuntime", "ModelServer"]

log = logging.getLogger(__name__)

READY_POLL_S: Final = 0.1
STOP_GRACE_S: Final = 5.0
RESTART_BACKOFF_S: Final = (0.5, 2.0, 5.0)
LOG_TAIL_BYTES: Final = 2000


def _tail(path: Path) -> str:
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - LOG_TAIL_BYTES))
            return f.read().decode("utf-8", errors="replace").strip()
    except OSError:
        return ""


class ModelServer:
    """The process serving one model, and its state."""

    def __init__(self, model: ModelInfo, log_path: Path) -> None:
        self.model = model
        self.log_path = log_path
        self.port = 0
        self.process: trio.Process | None = None
        self.state = "starting"  # starting → ready → (restarting → ready)* → stopped | failed
        self.restarts = 0
        self.scope = trio.CancelScope()
        self.ready = trio.Event()
        self.stopped = trio.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model.id,
            "state": self.state,
            "pid": self.pid,
            "port": self.port,
            "restarts": self.restarts,
            "log": str(self.log_path),
        }


class LlamaCppRuntime(Runtime):
    """Serves the GGUF files of ``catalog`` through supervised model servers.

    ``gpu_layers`` maps a model to ``--n_gpu_layers`` (0 on CPU-only nodes,
    the planner's split on GPU nodes); ``context_length`` is ``--n_ctx``,
    capped at the model's own.
    """

    kind = "llama.cpp"
    manages_memory = True

    def __init__(
        self,
        name: str,
        catalog: Catalog,
        *,
        log_dir: Path,
        context_length: int = 4096,
        threads: int | None = None,
        gpu_layers: Callable[[ModelInfo], int] | None = None,
        load_timeout_s: float = 120.0,
        max_restarts: int = 3,
        python: str = sys.executable,
        extra_args: Sequence[str] = (),
    ) -> None:
        super().__init__(name)
        self.catalog = catalog
        self.log_dir = log_dir
        self.context_length = context_length
        self.threads = threads
        self._gpu_layers = gpu_layers or (lambda model: 0)
        self.load_timeout_s = load_timeout_s
        self.max_restarts = max_restarts
        self.python = python
        self.extra_args = tuple(extra_args)
        self.servers: dict[str, ModelServer] = {}
        self._nursery: trio.Nursery | None = None
        self.installed = importlib.util.find_spec("llama_cpp") is not None
        self.on_change: Callable[[], None] = lambda: None
        """Called when a server changes state on its own (crash, restart, failure)."""

    # -- lifecycle -----------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None

    def context_for(self, model: ModelInfo) -> int:
        return min(self.context_length, model.context_length or self.context_length)

    def memory_for(self, model: ModelInfo) -> int:
        return memory_need(Variant.from_model(model), self.context_for(model))

    # -- the Runtime interface -------------------------------------------------

    async def list_models(self) -> list[RuntimeModel]:
        await trio.lowlevel.checkpoint()
        return [
            RuntimeModel(id=m.id, memory_bytes=self.memory_for(m), info=m)
            for m in self.catalog.models.values()
        ]

    async def loaded_models(self) -> list[str]:
        """Ask every live server which model it serves: the runtime's own state."""
        loaded: list[str] = []
        for server in list(self.servers.values()):
            if server.state != "ready" or server.process is None:
                continue
            if server.process.returncode is not None:
                continue
            try:
                models = await list_openai_models(server.url, wait_s=5.0)
            except RuntimeFailed:
                continue
            loaded += [m["id"] for m in models]
        return loaded

    async def load(self, model: str) -> None:
        info = self.catalog.models.get(model)
        if info is None:
            raise UnknownModel(f"no GGUF file for {model!r} in the model directories")
        if not self.installed:
            raise LoadFailed("llama-cpp-python is not installed (pip install 'qmesh[llama]')")
        existing = self.servers.get(model)
        if existing is not None:
            await existing.ready.wait()
            if existing.state != "ready":
                raise LoadFailed(f"{model}: the model server failed")
            return
        if self._nursery is None:
            raise RuntimeFailed("the llama.cpp runtime is not running")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        server = ModelServer(info, self.log_dir / f"llama-server-{model}.log")
        self.servers[model] = server
        try:
            await self._nursery.start(self._supervise, server)
        except BaseException:
            if self.servers.get(model) is server:
                del self.servers[model]
            raise

    async def unload(self, model: str) -> None:
        server = self.servers.get(model)
        if server is None:
            await trio.lowlevel.checkpoint()
            return
        server.scope.cancel()
        await server.stopped.wait()

    async def generate(
        self, model: str, request: GenerationRequest
    ) -> AsyncGenerator[GenerationEvent, None]:
        server = self.servers.get(model)
        if server is not None and server.state in ("starting", "restarting"):
            # A crashed server is being restarted: wait for it like for a load.
            with trio.move_on_after(self.load_timeout_s):
                await server.ready.wait()
        if server is None or server.state != "ready":
            raise RuntimeFailed(f"{model} is not loaded")
        async for event in stream_openai(server.url, request, model):
            yield event

    async def health(self) -> Health:
        await trio.lowlevel.checkpoint()
        if not self.installed:
            return Health(False, "llama-cpp-python is not installed")
        failed = [s.model.id for s in self.servers.values() if s.state == "failed"]
        if failed:
            return Health(False, f"model server failed: {', '.join(failed)}")
        ready = sum(1 for s in self.servers.values() if s.state == "ready")
        return Health(True, f"{ready} model server(s) ready")

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "installed": self.installed,
            "servers": [s.to_json() for s in self.servers.values()],
        }

    # -- supervision -------------------------------------------------------------

    def _command(self, server: ModelServer) -> list[str]:
        model = server.model
        command = [
            self.python, "-m", "qmesh.daemon.runtimes.model_server", str(os.getpid()),
            "--model", model.path,
            "--model_alias", model.id,
            "--host", "127.0.0.1",
            "--port", str(server.port),
            "--n_ctx", str(self.context_for(model)),
            "--n_gpu_layers", str(self._gpu_layers(model)),
        ]  # fmt: skip
        if self.threads:
            # Prompt batches too: on a small or shared machine a batch
            # thread that waits for a busy core stalls the whole batch.
            command += ["--n_threads", str(self.threads), "--n_threads_batch", str(self.threads)]
        chat_format = fallback_chat_format(model)
        if chat_format is not None:
            command += ["--chat_format", chat_format]
        return command + list(self.extra_args)

    async def _supervise(
        self, server: ModelServer, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        started = False
        try:
            with server.scope:
                while True:
                    try:
                        await self._start_once(server)
                    except LoadFailed:
                        if not started:
                            raise
                        server.restarts += 1
                        if server.restarts > self.max_restarts:
                            raise
                        continue
                    if not started:
                        started = True
                        task_status.started()
                    else:
                        self.on_change()
                    assert server.process is not None
                    code = await server.process.wait()
                    server.restarts += 1
                    log.warning(
                        "model server for %s exited with status %s%s",
                        server.model.id,
                        code,
                        "" if server.restarts > self.max_restarts else "; restarting",
                    )
                    if server.restarts > self.max_restarts:
                        raise RuntimeFailed(f"{server.model.id}: the model server keeps crashing")
                    server.state = "restarting"
                    server.ready = trio.Event()
                    self.on_change()
                    backoff = RESTART_BACKOFF_S[min(server.restarts, len(RESTART_BACKOFF_S)) - 1]
                    await trio.sleep(backoff)
            if not started:
                raise LoadFailed(f"{server.model.id}: unloaded while it was loading")
        except (LoadFailed, RuntimeFailed) as exc:
            if not started:
                raise
            server.state = "failed"
            log.error("giving up on %s: %s", server.model.id, exc)
        finally:
            with trio.CancelScope(shield=True):
                await self._stop_process(server)
            if server.state != "failed":
                server.state = "stopped"
            server.ready.set()
            server.stopped.set()
            if self.servers.get(server.model.id) is server:
                del self.servers[server.model.id]
            if started:
                self.on_change()

    async def _start_once(self, server: ModelServer) -> None:
        """Start the process and wait until it serves; LoadFailed if it does not."""
        for attempt in range(3):
            server.port = free_loopback_port()
            server.state = "starting" if server.restarts == 0 else "restarting"
            with server.log_path.open("ab") as log_file:
                log_file.write(f"--- qmesh: {' '.join(self._command(server))}\n".encode())
                log_file.flush()
                server.process = await trio.lowlevel.open_process(
                    self._command(server),
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                )
            log.info(
                "starting model server for %s (pid %d, port %d)",
                server.model.id,
                server.process.pid,
                server.port,
            )
            try:
                await self._wait_ready(server)
            except LoadFailed as exc:
                await self._stop_process(server)
                if "address already in use" in str(exc).lower() and attempt < 2:
                    continue
                raise
            server.state = "ready"
            server.ready.set()
            return

    async def _wait_ready(self, server: ModelServer) -> None:
        assert server.process is not None
        with trio.move_on_after(self.load_timeout_s):
            while True:
                if server.process.returncode is not None:
                    raise LoadFailed(
                        f"{server.model.id}: the model server exited with status "
                        f"{server.process.returncode}: {_tail(server.log_path)}"
                    )
                try:
                    models = await list_openai_models(server.url, wait_s=2.0)
                except RuntimeFailed:
                    models = []
                if any(m["id"] == server.model.id for m in models):
                    return
                await trio.sleep(READY_POLL_S)
        raise LoadFailed(
            f"{server.model.id}: the model server was not ready after {self.load_timeout_s:g}s"
        )

    async def _stop_process(self, server: ModelServer) -> None:
        process = server.process
        if process is None or process.returncode is not None:
            return
        process.terminate()
        with trio.move_on_after(STOP_GRACE_S):
            await process.wait()
        if process.returncode is None:
            log.warning("model server for %s ignored SIGTERM; killing it", server.model.id)
            process.kill()
            await process.wait()


# llama-cpp-python's names for the prompt formats of model families whose
# base models ship without a chat template.
_CHAT_FORMATS = {"gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma"}


def fallback_chat_format(model: ModelInfo) -> str | None:
    """The chat format to impose on a model without its own template.

    Without one, llama.cpp falls back to llama-2's [INST] format, which a
    Gemma model answers with an empty string; its own turn markers work even
    on the base model.
    """
    if model.chat_template:
        return None
    return _CHAT_FORMATS.get(model.architecture) or _CHAT_FORMATS.get(model.family)
