"""Any OpenAI-compatible server as a runtime: vLLM, llama.cpp's server, LM Studio…

For: :class:`OpenAICompatRuntime` (``GET /v1/models`` to list,
``POST /v1/completions`` / ``/v1/chat/completions`` with ``stream: true``
to generate) and :func:`stream_openai`, the streaming call itself, which
the llama.cpp runtime reuses for the servers it supervises. Server-sent
events become :class:`~qmesh.daemon.runtimes.base.Delta` and
:class:`~qmesh.daemon.runtimes.base.Finished`; HTTP failures become
:mod:`qmesh.daemon.errors`.

The server owns its models: ``load`` only checks the model is listed and
``unload`` does nothing (the OpenAI API has no verb for either). Token
counts come from the stream's ``usage`` when the server sends one, else
one completion token per streamed chunk (what llama.cpp and vLLM send).

Not for: starting servers (:mod:`qmesh.daemon.runtimes.llamacpp`).
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncGenerator, Mapping
from typing import Any, Final

from qmesh.daemon.errors import BadRequest, RuntimeFailed, UnknownModel
from qmesh.daemon.runtimes.base import (
    Delta,
    Finished,
    GenerationEvent,
    GenerationRequest,
    Health,
    Runtime,
    RuntimeModel,
)
from qmesh.daemon.runtimes.http import HttpClientError, HttpStatusError, iter_sse, request

__all__ = ["OpenAICompatRuntime", "stream_openai"]

READ_TIMEOUT_S: Final = 300.0
"""Longest silence while streaming: a cold server may load a model first."""


async def stream_openai(
    base_url: str,
    request_: GenerationRequest,
    model: str,
    *,
    headers: Mapping[str, str] | None = None,
    read_timeout: float = READ_TIMEOUT_S,
) -> AsyncGenerator[GenerationEvent, None]:
    """Run ``request_`` on the server at ``base_url`` (``http://host:port``), streaming."""
    path = "/v1/completions" if request_.endpoint == "completions" else "/v1/chat/completions"
    url = base_url.rstrip("/") + path
    chunks = 0
    finish: str | None = None
    usage: dict[str, Any] = {}
    try:
        async with request(
            "POST",
            url,
            json_body=request_.openai_body(model),
            headers=headers,
            read_timeout=read_timeout,
        ) as response:
            async for data in iter_sse(response):
                if data.strip() == "[DONE]":
                    break
                try:
                    event = json.loads(data)
                except ValueError:
                    raise RuntimeFailed(
                        f"{url}: a stream event is not JSON: {data[:200]!r}"
                    ) from None
                if "error" in event:
                    raise RuntimeFailed(f"{url}: {event['error']}")
                if isinstance(event.get("usage"), dict):
                    usage = event["usage"]
                for choice in event.get("choices") or ():
                    text = choice.get("text")
                    if text is None:
                        text = (choice.get("delta") or {}).get("content")
                    if text or (text is not None and not choice.get("finish_reason")):
                        # A token, even one that renders as nothing; the bare
                        # closing chunk (no text, a finish reason) is not one.
                        chunks += 1
                    if text:
                        yield Delta(text)
                    if choice.get("finish_reason"):
                        finish = choice["finish_reason"]
    except HttpStatusError as exc:
        if exc.status == 404 and b"model" in exc.body.lower():
            raise UnknownModel(f"{base_url} has no model {model!r}") from None
        if 400 <= exc.status < 500 and exc.status not in (408, 429):
            raise BadRequest(f"{base_url} refused the request: {exc}") from None
        raise RuntimeFailed(str(exc)) from None
    except HttpClientError as exc:
        raise RuntimeFailed(str(exc)) from None
    yield Finished(
        finish_reason=finish or "stop",
        prompt_tokens=usage.get("prompt_tokens"),
        completion_tokens=usage.get("completion_tokens", chunks),
    )


async def list_openai_models(
    base_url: str, *, headers: Mapping[str, str] | None = None, wait_s: float = 10.0
) -> list[dict[str, Any]]:
    """The ``data`` of ``GET /v1/models``. Raises RuntimeFailed."""
    url = base_url.rstrip("/") + "/v1/models"
    try:
        async with request("GET", url, headers=headers, read_timeout=wait_s) as response:
            body = await response.json()
    except HttpClientError as exc:
        raise RuntimeFailed(str(exc)) from None
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        raise RuntimeFailed(f"{url}: no 'data' array in the answer")
    return [m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]


class OpenAICompatRuntime(Runtime):
    """A remote or local OpenAI-compatible server at ``url``."""

    kind = "openai"
    manages_memory = False

    def __init__(self, name: str, url: str, *, api_key_env: str | None = None) -> None:
        super().__init__(name)
        self.url = url.rstrip("/")
        self._api_key_env = api_key_env

    def _headers(self) -> dict[str, str]:
        # Read at each call so a rotated key in the environment is picked up
        # by a restart of nothing but this process's environment.
        key = os.environ.get(self._api_key_env) if self._api_key_env else None
        return {"authorization": f"Bearer {key}"} if key else {}

    async def list_models(self) -> list[RuntimeModel]:
        models = await list_openai_models(self.url, headers=self._headers())
        return [
            RuntimeModel(
                id=m["id"],
                memory_bytes=None,
                details={
                    k: v for k, v in m.items() if k in ("owned_by", "created", "max_model_len")
                },
            )
            for m in models
        ]

    async def loaded_models(self) -> list[str]:
        return [m.id for m in await self.list_models()]

    async def load(self, model: str) -> None:
        if model not in await self.loaded_models():
            raise UnknownModel(f"{self.url} does not serve {model!r}")

    async def unload(self, model: str) -> None:
        return None

    async def generate(
        self, model: str, request: GenerationRequest
    ) -> AsyncGenerator[GenerationEvent, None]:
        async for event in stream_openai(self.url, request, model, headers=self._headers()):
            yield event

    async def health(self) -> Health:
        try:
            models = await list_openai_models(self.url, headers=self._headers(), wait_s=5.0)
        except RuntimeFailed as exc:
            return Health(False, str(exc))
        return Health(True, f"{len(models)} model(s)")

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "url": self.url}
