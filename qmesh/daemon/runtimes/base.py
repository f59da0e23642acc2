"""The one interface every local model runtime is driven through.

For: :class:`Runtime` (list models, load, unload, generate with streaming,
health — what the scheduler needs from llama.cpp, Ollama or any
OpenAI-compatible server), the request it runs (:class:`GenerationRequest`,
parsed from an OpenAI-style body by :meth:`GenerationRequest.from_openai`)
and the events it yields (:class:`Delta` per token or piece of text, then
one :class:`Finished`).

Busy state and queue depth are not per-adapter: the scheduler
(:mod:`qmesh.daemon.scheduler`) counts requests for every runtime alike.

Not for: memory budgets and eviction (the scheduler), catalogues of files
(:mod:`qmesh.daemon.catalog`), or HTTP (:mod:`qmesh.daemon.runtimes.http`).
"""

from __future__ import annotations

import abc
from collections.abc import AsyncGenerator, Mapping
from typing import Any, Final, Literal

import attrs
import trio

from qmesh.daemon.catalog import ModelInfo
from qmesh.daemon.errors import BadRequest

__all__ = [
    "Delta",
    "Finished",
    "GenerationEvent",
    "GenerationRequest",
    "Health",
    "Runtime",
    "RuntimeModel",
]

Endpoint = Literal["completions", "chat.completions"]
ENDPOINTS: Final = ("completions", "chat.completions")
MAX_TOKENS_LIMIT: Final = 1 << 20
_ROLES: Final = frozenset({"system", "user", "assistant", "tool", "developer"})
SAMPLING: Final = (
    "max_tokens", "temperature", "top_p", "seed", "presence_penalty", "frequency_penalty",
    "top_k", "min_p", "repeat_penalty",
)  # fmt: skip
"""Fields passed on to the runtime when the request sets them."""


@attrs.frozen
class GenerationRequest:
    endpoint: Endpoint
    prompt: str | None = None
    messages: tuple[Mapping[str, str], ...] = ()
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    top_k: int | None = None
    """The common extensions llama.cpp, vLLM and Ollama all take."""
    min_p: float | None = None
    repeat_penalty: float | None = None

    @classmethod
    def from_openai(cls, endpoint: str, body: Any) -> GenerationRequest:
        """Validate an OpenAI ``/v1/completions`` or ``/v1/chat/completions``
        body; unknown fields are ignored. Raises BadRequest naming the field."""
        if endpoint not in ENDPOINTS:
            raise BadRequest(f"unknown endpoint {endpoint!r}; expected one of {ENDPOINTS}")
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        prompt: str | None = None
        messages: list[dict[str, str]] = []
        if endpoint == "completions":
            raw = body.get("prompt")
            if isinstance(raw, list) and len(raw) == 1 and isinstance(raw[0], str):
                raw = raw[0]
            if not isinstance(raw, str):
                raise BadRequest("'prompt' must be a string")
            prompt = raw
        else:
            raw_messages = body.get("messages")
            if not isinstance(raw_messages, list) or not raw_messages:
                raise BadRequest("'messages' must be a non-empty array")
            for i, message in enumerate(raw_messages):
                if not isinstance(message, dict) or message.get("role") not in _ROLES:
                    raise BadRequest(f"messages[{i}] needs a 'role' among {sorted(_ROLES)}")
                content = message.get("content")
                if isinstance(content, list):  # content parts: keep the text ones
                    content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
                if not isinstance(content, str):
                    raise BadRequest(f"messages[{i}].content must be a string")
                messages.append({"role": message["role"], "content": content})
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
        if max_tokens is not None and (
            isinstance(max_tokens, bool)
            or not isinstance(max_tokens, int)
            or not 1 <= max_tokens <= MAX_TOKENS_LIMIT
        ):
            raise BadRequest(f"'max_tokens' must be an integer from 1 to {MAX_TOKENS_LIMIT}")
        stop = body.get("stop")
        if isinstance(stop, str):
            stop = [stop]
        if stop is not None and (
            not isinstance(stop, list) or not all(isinstance(s, str) for s in stop)
        ):
            raise BadRequest("'stop' must be a string or an array of strings")
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise BadRequest("'seed' must be an integer")
        top_k = body.get("top_k")
        if top_k is not None and (
            isinstance(top_k, bool) or not isinstance(top_k, int) or not 0 <= top_k <= 1_000_000
        ):
            raise BadRequest("'top_k' must be an integer of at least 0")
        return cls(
            endpoint=endpoint,  # type: ignore[arg-type]
            prompt=prompt,
            messages=tuple(messages),
            max_tokens=max_tokens,
            temperature=_number(body, "temperature", 0.0, 2.0),
            top_p=_number(body, "top_p", 0.0, 1.0),
            stop=tuple(stop or ()),
            seed=seed,
            presence_penalty=_number(body, "presence_penalty", -2.0, 2.0),
            frequency_penalty=_number(body, "frequency_penalty", -2.0, 2.0),
            top_k=top_k,
            min_p=_number(body, "min_p", 0.0, 1.0),
            repeat_penalty=_number(body, "repeat_penalty", 0.0, 10.0),
        )

    def openai_body(self, model: str) -> dict[str, Any]:
        """This request as an OpenAI-compatible server takes it, streaming."""
        body: dict[str, Any] = {"model": model, "stream": True}
        if self.endpoint == "completions":
            body["prompt"] = self.prompt
        else:
            body["messages"] = [dict(m) for m in self.messages]
        for key in SAMPLING:
            value = getattr(self, key)
            if value is not None:
                body[key] = value
        if self.stop:
            body["stop"] = list(self.stop)
        return body

    def to_json(self) -> dict[str, Any]:
        data = attrs.asdict(self)
        data["messages"] = [dict(m) for m in self.messages]
        data["stop"] = list(self.stop)
        return data


def _number(body: Mapping[str, Any], key: str, lo: float, hi: float) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise BadRequest(f"'{key}' must be a number from {lo:g} to {hi:g}")
    return float(value)


@attrs.frozen
class Delta:
    """Generated text: one token, or a few when the runtime batches them."""

    text: str


@attrs.frozen
class Finished:
    finish_reason: str
    """``stop`` (end of text or a stop string) or ``length`` (max_tokens reached)."""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


GenerationEvent = Delta | Finished


@attrs.frozen
class RuntimeModel:
    """A model a runtime can serve."""

    id: str
    memory_bytes: int | None
    """What loading it costs, when known (weights + KV cache + buffers)."""
    info: ModelInfo | None = None
    """Catalogue metadata, for GGUF files this daemon owns."""
    details: Mapping[str, Any] = attrs.field(factory=dict)
    """What the runtime itself says (Ollama's family, parameter size, quantization…)."""

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"id": self.id, "memory_bytes": self.memory_bytes}
        if self.info is not None:
            data.update(self.info.to_json())
        data["details"] = dict(self.details)
        return data


@attrs.frozen
class Health:
    ok: bool
    detail: str


class Runtime(abc.ABC):
    """A model runtime. Methods raise :mod:`qmesh.daemon.errors` only.

    ``manages_memory`` is True when this daemon decides what is resident (so
    the scheduler budgets and evicts); False when the runtime decides (Ollama
    unloads on its own; an OpenAI-compatible server serves what it serves).
    """

    kind: str = "abstract"
    manages_memory: bool = False

    def __init__(self, name: str) -> None:
        self.name = name

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Background work (process supervision); the default has none."""
        task_status.started()
        await trio.sleep_forever()

    @abc.abstractmethod
    async def list_models(self) -> list[RuntimeModel]:
        """Every model this runtime can serve now."""

    @abc.abstractmethod
    async def loaded_models(self) -> list[str]:
        """Ids of the models resident now, as the runtime itself reports them."""

    @abc.abstractmethod
    async def load(self, model: str) -> None:
        """Make ``model`` resident (returns once it can serve)."""

    @abc.abstractmethod
    async def unload(self, model: str) -> None:
        """Free ``model``'s memory."""

    @abc.abstractmethod
    def generate(
        self, model: str, request: GenerationRequest
    ) -> AsyncGenerator[GenerationEvent, None]:
        """Stream the answer: :class:`Delta` events as text arrives, then one
        :class:`Finished`. Closing the iterator early abandons the request."""

    @abc.abstractmethod
    async def health(self) -> Health:
        """Whether the runtime answers, and what it said."""

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "manages_memory": self.manages_memory}
