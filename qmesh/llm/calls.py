"""One OpenAI-style call as the executor passes it around, and the answers.

For: :class:`Call` (the parsed request plus the raw bytes it came as, so a
backend that only forwards need not re-encode it), :class:`Answer`, a
:class:`Usage` that streaming backends fill in as they go, token usage
read from a response *without* decoding the whole body, and builders for
OpenAI-shaped responses (chat completion, completion, SSE chunks, error
events) that internal skills and translated providers answer with.

Not for: HTTP (``qmesh.llm.api``) or choosing a backend.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any, Final

import attrs

__all__ = [
    "DONE_EVENT",
    "Answer",
    "Call",
    "Usage",
    "chat_chunk",
    "chat_completion",
    "error_event",
    "estimate_call_tokens",
    "read_usage",
    "sse",
    "stream_end",
    "text_completion",
    "tokens_for_body",
]

DONE_EVENT: Final = b"data: [DONE]\n\n"
_PROMPT_TOKENS_RE: Final = re.compile(rb'"prompt_tokens"\s*:\s*(\d+)')
_COMPLETION_TOKENS_RE: Final = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')
_ANTHROPIC_IN_RE: Final = re.compile(rb'"input_tokens"\s*:\s*(\d+)')
_ANTHROPIC_OUT_RE: Final = re.compile(rb'"output_tokens"\s*:\s*(\d+)')
_USAGE_TAIL: Final = 4096


@attrs.frozen
class Call:
    """A request to run: ``endpoint`` is ``chat``, ``completions`` or ``embeddings``."""

    endpoint: str
    body: dict[str, Any]
    raw: bytes
    stream: bool
    request_id: str
    tokens_in: int
    """Estimated prompt tokens (for admission and the cost ceiling)."""
    max_tokens: int
    """The most completion tokens it may produce (for the cost ceiling)."""

    def text(self) -> str:
        """The input text for a skill: the last user message, the prompt, or the input."""
        if self.endpoint == "chat":
            for message in reversed(self.body.get("messages") or ()):
                if isinstance(message, dict) and message.get("role") == "user":
                    return _content_text(message.get("content"))
            return ""
        value = self.body.get("prompt" if self.endpoint == "completions" else "input")
        if isinstance(value, list):
            return "\n".join(str(v) for v in value)
        return "" if value is None else str(value)


def _content_text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": "…"}, …]
        return "\n".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


@attrs.define
class Usage:
    """Token counts, filled in while an answer streams."""

    tokens_in: int = 0
    tokens_out: int = 0
    bytes_out: int = 0

    def absorb(self, chunk: bytes) -> None:
        """Take usage figures from an SSE chunk if it has them."""
        self.bytes_out += len(chunk)
        if b'_tokens"' in chunk:
            found_in, found_out = read_usage(chunk)
            if found_in:
                self.tokens_in = found_in
            if found_out:
                self.tokens_out = found_out


@attrs.frozen
class Answer:
    """A whole (non-streamed) response body, already OpenAI-shaped JSON."""

    body: bytes
    tokens_in: int
    tokens_out: int
    model: str


def read_usage(body: bytes) -> tuple[int, int]:
    """``(prompt_tokens, completion_tokens)`` found in ``body``'s tail (usage
    is last in OpenAI responses; Anthropic's names are understood too), or zeros."""
    tail = body[-_USAGE_TAIL:]
    found_in = _PROMPT_TOKENS_RE.search(tail) or _ANTHROPIC_IN_RE.search(tail)
    found_out = _COMPLETION_TOKENS_RE.search(tail) or _ANTHROPIC_OUT_RE.search(tail)
    return (
        int(found_in.group(1)) if found_in else 0,
        int(found_out.group(1)) if found_out else 0,
    )


def estimate_call_tokens(raw: bytes) -> int:
    """Prompt tokens estimated from a request body's size: exact counts come
    back in usage. It errs high (≈ 4 bytes per token is typical for English,
    and the JSON around the text counts too) because it sizes the budget
    reservation, which must not be smaller than what the request really costs."""
    return tokens_for_body(len(raw))


def tokens_for_body(size: int) -> int:
    """:func:`estimate_call_tokens` for a body of ``size`` bytes."""
    return size // 3 + 16


def _usage(tokens_in: int, tokens_out: int) -> dict[str, int]:
    return {
        "prompt_tokens": tokens_in,
        "completion_tokens": tokens_out,
        "total_tokens": tokens_in + tokens_out,
    }


def sse(data: object) -> bytes:
    """One SSE ``data:`` event carrying ``data`` as compact JSON."""
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def chat_completion(
    request_id: str, model: str, content: str, tokens_in: int, tokens_out: int
) -> bytes:
    return json.dumps(
        {
            "id": f"chatcmpl-{request_id}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": "stop",
                }
            ],
            "usage": _usage(tokens_in, tokens_out),
        },
        separators=(",", ":"),
    ).encode()


def text_completion(
    request_id: str, model: str, text: str, tokens_in: int, tokens_out: int
) -> bytes:
    return json.dumps(
        {
            "id": f"cmpl-{request_id}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}],
            "usage": _usage(tokens_in, tokens_out),
        },
        separators=(",", ":"),
    ).encode()


def chat_chunk(
    request_id: str,
    model: str,
    *,
    content: str | None = None,
    role: str | None = None,
    finish: str | None = None,
    usage: tuple[int, int] | None = None,
    endpoint: str = "chat",
) -> bytes:
    """One SSE event of a streamed chat completion (or text completion)."""
    if endpoint == "completions":
        choice: dict[str, Any] = {"index": 0, "text": content or "", "finish_reason": finish}
        data: dict[str, Any] = {
            "id": f"cmpl-{request_id}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": [choice],
        }
    else:
        delta: dict[str, Any] = {}
        if role is not None:
            delta["role"] = role
        if content is not None:
            delta["content"] = content
        data = {
            "id": f"chatcmpl-{request_id}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
    if usage is not None:
        data["choices"] = []
        data["usage"] = _usage(*usage)
    return sse(data)


def error_event(message: str, *, kind: str = "upstream_error", code: str | None = None) -> bytes:
    """The SSE event that ends a broken stream: OpenAI clients raise on it."""
    body = {"error": {"message": message, "type": kind, "code": code}}
    return sse(body)


def stream_end(
    call: Call, model: str, usage: Usage, *, finish: str = "stop", endpoint: str = "chat"
) -> tuple[bytes, ...]:
    """The events that close a stream: the finish chunk, the usage chunk when
    the client asked for one (``stream_options.include_usage``), and ``[DONE]``."""
    rid = call.request_id
    chunks = [chat_chunk(rid, model, finish=finish, endpoint=endpoint)]
    if (call.body.get("stream_options") or {}).get("include_usage"):
        chunks.append(chat_chunk(rid, model, usage=(usage.tokens_in, usage.tokens_out)))
    chunks.append(DONE_EVENT)
    return tuple(chunks)
