"""Ollama as a runtime, through its native HTTP API.

For: :class:`OllamaRuntime`. ``GET /api/tags`` lists the models (with
Ollama's own family, parameter size, quantization and size on disk),
``GET /api/ps`` says which are resident, ``POST /api/generate`` with no
prompt and a ``keep_alive`` loads one (``keep_alive: 0`` unloads it), and
``/api/generate`` (completions, sent ``raw`` so Ollama applies no prompt
template: the caller's prompt is the prompt) or ``/api/chat`` stream
newline-delimited JSON that becomes :class:`~qmesh.daemon.runtimes.base.Delta`
and :class:`~qmesh.daemon.runtimes.base.Finished` events.

Ollama schedules its own memory (it evicts on its own and unloads idle
models after ``keep_alive``), so ``manages_memory`` is False: the daemon's
scheduler only queues requests for it.

Not for: Ollama's OpenAI-compatible ``/v1`` endpoints (use
:class:`~qmesh.daemon.runtimes.openai.OpenAICompatRuntime` for those) or
pulling models.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from typing import Any, Final

from qmesh.daemon.errors import BadRequest, LoadFailed, RuntimeFailed, UnknownModel
from qmesh.daemon.runtimes.base import (
    SAMPLING,
    Delta,
    Finished,
    GenerationEvent,
    GenerationRequest,
    Health,
    Runtime,
    RuntimeModel,
)
from qmesh.daemon.runtimes.http import HttpClientError, HttpStatusError, request

__all__ = ["OllamaRuntime"]

READ_TIMEOUT_S: Final = 300.0
LOAD_TIMEOUT_S: Final = 600.0


class OllamaRuntime(Runtime):
    kind = "ollama"
    manages_memory = False

    def __init__(self, name: str, url: str, *, keep_alive: str = "10m") -> None:
        super().__init__(name)
        self.url = url.rstrip("/")
        self.keep_alive = keep_alive

    async def _get(self, path: str, wait_s: float = 10.0) -> Any:
        try:
            async with request("GET", self.url + path, read_timeout=wait_s) as response:
                return await response.json()
        except HttpClientError as exc:
            raise RuntimeFailed(str(exc)) from None

    async def list_models(self) -> list[RuntimeModel]:
        body = await self._get("/api/tags")
        models = []
        for entry in body.get("models") or ():
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                continue
            details = entry.get("details")
            if not isinstance(details, dict):
                details = {}
            models.append(
                RuntimeModel(
                    id=entry["name"],
                    memory_bytes=entry.get("size") if isinstance(entry.get("size"), int) else None,
                    details={
                        "family": details.get("family"),
                        "parameter_size": details.get("parameter_size"),
                        "quantization": details.get("quantization_level"),
                        "format": details.get("format"),
                        "digest": entry.get("digest"),
                    },
                )
            )
        return models

    async def loaded_models(self) -> list[str]:
        body = await self._get("/api/ps")
        return [
            m["name"]
            for m in body.get("models") or ()
            if isinstance(m, dict) and isinstance(m.get("name"), str)
        ]

    async def _post(self, path: str, body: dict[str, Any], wait_s: float) -> Any:
        try:
            async with request(
                "POST", self.url + path, json_body=body, read_timeout=wait_s
            ) as response:
                return await response.json()
        except HttpStatusError as exc:
            if exc.status == 404:
                raise UnknownModel(
                    f"ollama at {self.url} has no model {body.get('model')!r}"
                ) from None
            raise LoadFailed(str(exc)) from None
        except HttpClientError as exc:
            raise RuntimeFailed(str(exc)) from None

    async def load(self, model: str) -> None:
        await self._post(
            "/api/generate", {"model": model, "keep_alive": self.keep_alive}, LOAD_TIMEOUT_S
        )

    async def unload(self, model: str) -> None:
        await self._post("/api/generate", {"model": model, "keep_alive": 0}, 60.0)

    def _body(self, model: str, req: GenerationRequest) -> tuple[str, dict[str, Any]]:
        options: dict[str, Any] = {}
        if req.max_tokens is not None:
            options["num_predict"] = req.max_tokens
        for key in SAMPLING[1:]:  # Ollama's options share OpenAI's and llama.cpp's names
            value = getattr(req, key)
            if value is not None:
                options[key] = value
        if req.stop:
            options["stop"] = list(req.stop)
        body: dict[str, Any] = {
            "model": model,
            "stream": True,
            "keep_alive": self.keep_alive,
            "options": options,
        }
        if req.endpoint == "completions":
            body.update(prompt=req.prompt, raw=True)
            return "/api/generate", body
        body["messages"] = [dict(m) for m in req.messages]
        return "/api/chat", body

    async def generate(
        self, model: str, request_: GenerationRequest
    ) -> AsyncGenerator[GenerationEvent, None]:
        path, body = self._body(model, request_)
        final: dict[str, Any] | None = None
        try:
            async with request(
                "POST", self.url + path, json_body=body, read_timeout=READ_TIMEOUT_S
            ) as response:
                async for line in response.iter_lines():
                    if not line.strip():
                        continue
                    try:
                        event = json.loads(line)
                    except ValueError:
                        raise RuntimeFailed(
                            f"ollama sent a line that is not JSON: {line[:200]!r}"
                        ) from None
                    if event.get("error"):
                        raise RuntimeFailed(f"ollama: {event['error']}")
                    text = event.get("response")
                    if text is None:
                        text = (event.get("message") or {}).get("content")
                    if text:
                        yield Delta(text)
                    if event.get("done"):
                        final = event
                        break
        except HttpStatusError as exc:
            if exc.status == 404:
                raise UnknownModel(f"ollama at {self.url} has no model {model!r}") from None
            if exc.status == 400:
                raise BadRequest(f"ollama refused the request: {exc}") from None
            raise RuntimeFailed(str(exc)) from None
        except HttpClientError as exc:
            raise RuntimeFailed(str(exc)) from None
        if final is None:
            raise RuntimeFailed("ollama ended the stream without a final 'done' line")
        reason = final.get("done_reason") or "stop"
        yield Finished(
            finish_reason="length" if reason == "length" else "stop",
            prompt_tokens=final.get("prompt_eval_count"),
            completion_tokens=final.get("eval_count"),
        )

    async def health(self) -> Health:
        try:
            body = await self._get("/api/version", wait_s=5.0)
        except RuntimeFailed as exc:
            return Health(False, str(exc))
        return Health(True, f"ollama {body.get('version', '?')}")

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "url": self.url, "keep_alive": self.keep_alive}
