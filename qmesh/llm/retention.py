"""What the ledger keeps of prompts and answers, per app (``llm.keep``).

For: :func:`kept_record`, which turns a request's body and its answer into
the :class:`~qmesh.finops.ledger.KeptPrompt` its app's policy asks for —
``hash``: the SHA-256 of each (proof of what was asked and said, without
keeping it), ``text``: both as they were — and :func:`collect_stream`,
which passes a streamed answer's server-sent events through while it reads
their text. Apps that keep nothing (the default) never come here: their
answers stay on the engine's path, unread by Python.

Not for: writing (:class:`~qmesh.finops.ledger.Ledger` chains the rows) or
deciding who keeps what (:class:`~qmesh.config.LlmPolicyConfig`).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Final

from qmesh import peerjson
from qmesh.finops.ledger import KeptPrompt

__all__ = ["MAX_ANSWER_BYTES", "answer_text", "collect_stream", "kept_record", "prompt_text"]

MAX_ANSWER_BYTES: Final = 64 * 1024 * 1024
"""The largest answer (or event) whose text is read for keeping."""


def prompt_text(body: dict[str, Any]) -> str:
    """The request's prompt: chat messages as JSON, else the prompt or input."""
    if "messages" in body:
        return json.dumps(body["messages"], ensure_ascii=False, separators=(",", ":"))
    value = body.get("prompt", body.get("input", ""))
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _choices(data: bytes) -> list[Any]:
    """An upstream answer's ``choices`` (a provider is a peer: its JSON is
    bounded like any peer's); [] when there are none to read."""
    try:
        parsed = peerjson.loads(data, max_bytes=MAX_ANSWER_BYTES, what="answer")
    except peerjson.PeerJsonError:
        return []
    choices = parsed.get("choices") if isinstance(parsed, dict) else None
    return choices if isinstance(choices, list) else []


def answer_text(answer: bytes) -> str:
    """The text of a whole (non-streamed) OpenAI answer; '' for embeddings."""
    choices = _choices(answer)
    parts = []
    for choice in choices:
        if isinstance(choice, dict):
            message = choice.get("message")
            text = message.get("content") if isinstance(message, dict) else choice.get("text")
            parts.append(text if isinstance(text, str) else "")
    return "".join(parts)


def _delta_text(event: bytes) -> str:
    parts = []
    for line in event.split(b"\n"):
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        for choice in _choices(line[6:]):
            if isinstance(choice, dict):
                delta = choice.get("delta")
                text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
                if isinstance(text, str):
                    parts.append(text)
    return "".join(parts)


async def collect_stream(
    events: AsyncIterator[bytes], done: Callable[[str], None]
) -> AsyncIterator[bytes]:
    """``events`` unchanged; ``done(text)`` once they end (not if they break off)."""
    texts: list[str] = []
    async for event in events:
        texts.append(_delta_text(event))
        yield event
    done("".join(texts))


def kept_record(mode: str, request_id: str, app: str, prompt: str, answer: str) -> KeptPrompt:
    if mode == "hash":
        prompt = hashlib.sha256(prompt.encode()).hexdigest()
        answer = hashlib.sha256(answer.encode()).hexdigest()
    return KeptPrompt(time.time(), request_id, app, mode, prompt, answer)
