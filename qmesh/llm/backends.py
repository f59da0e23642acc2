"""What the executor calls to run a :class:`~qmesh.llm.calls.Call` on a
candidate, and the Gate's own backend: the internal NLP skills.

For: the :class:`Backend` protocol (``complete`` for a whole answer,
``stream`` for SSE events; both raise :mod:`qmesh.qg.errors` upstream
errors, so the failover loop treats every kind of worker alike) and
:class:`SkillBackend`, which answers chat, completion and embedding calls
with a skill's output in OpenAI's shapes.

Not for: remote providers (:mod:`qmesh.llm.providers`) or daemons (their
client, adapted in :mod:`qmesh.llm.daemon_backend`).
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Final, Protocol

import trio

from qmesh.llm.calls import (
    Answer,
    Call,
    Usage,
    chat_chunk,
    chat_completion,
    stream_end,
    text_completion,
)
from qmesh.nlp.skills import Skill, estimate_tokens
from qmesh.qg.candidates import Candidate
from qmesh.qg.errors import UpstreamFailed

__all__ = ["Backend", "ClientFault", "SkillBackend"]

# Above this many characters a skill runs in a worker thread, so one huge
# document cannot stall every other request on the Gate's event loop.
THREAD_ABOVE_CHARS: Final = 64 * 1024
STREAM_PIECE_CHARS: Final = 256


class ClientFault(Exception):
    """The upstream refused the request as the client's mistake (a 4xx other
    than overload): relayed to the client as is, never retried elsewhere."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"upstream answered {status}")
        self.status = status
        self.body = body


class Backend(Protocol):
    async def complete(self, candidate: Candidate, call: Call) -> Answer: ...

    def stream(self, candidate: Candidate, call: Call, usage: Usage) -> AsyncGenerator[bytes, None]:
        """SSE events (``data: …\\n\\n``), ending with ``data: [DONE]``."""
        ...


class SkillBackend:
    """Runs built-in skills. Every candidate's ``backend`` is one of these
    with the candidate's :class:`Skill` found by task."""

    def __init__(self, skills: dict[str, Skill]) -> None:
        self.skills = skills

    async def _run(self, candidate: Candidate, call: Call) -> tuple[Skill, str | list[float]]:
        task = next(iter(candidate.tasks))
        skill = self.skills[task]
        text = call.text()
        try:
            if skill.blocking or len(text) > THREAD_ABOVE_CHARS:
                return skill, await trio.to_thread.run_sync(skill.run, text)
            return skill, skill.run(text)
        except Exception as exc:  # a skill bug must not look like a client error
            raise UpstreamFailed(f"skill {task} failed: {exc}") from exc

    async def complete(self, candidate: Candidate, call: Call) -> Answer:
        if call.endpoint == "embeddings":
            return await self._embeddings(candidate, call)
        skill, output = await self._run(candidate, call)
        content = output if isinstance(output, str) else json.dumps(output)
        tokens_out = estimate_tokens(content)
        build = chat_completion if call.endpoint == "chat" else text_completion
        body = build(call.request_id, skill.model, content, call.tokens_in, tokens_out)
        return Answer(body, call.tokens_in, tokens_out, skill.model)

    async def _embeddings(self, candidate: Candidate, call: Call) -> Answer:
        skill = self.skills["embed"]
        raw = call.body.get("input")
        inputs = raw if isinstance(raw, list) else [raw]
        data = []
        tokens = 0
        for i, item in enumerate(inputs):
            text = item if isinstance(item, str) else json.dumps(item)
            tokens += estimate_tokens(text)
            vector = skill.run(text)
            data.append({"object": "embedding", "index": i, "embedding": vector})
        body = json.dumps(
            {
                "object": "list",
                "data": data,
                "model": skill.model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            },
            separators=(",", ":"),
        ).encode()
        return Answer(body, tokens, 0, skill.model)

    async def stream(self, candidate: Candidate, call: Call, usage: Usage) -> AsyncIterator[bytes]:
        skill, output = await self._run(candidate, call)
        content = output if isinstance(output, str) else json.dumps(output)
        usage.tokens_in = call.tokens_in
        usage.tokens_out = estimate_tokens(content)
        rid, model, endpoint = call.request_id, skill.model, call.endpoint
        if endpoint == "chat":
            yield chat_chunk(rid, model, role="assistant", content="")
        for start in range(0, len(content), STREAM_PIECE_CHARS):
            piece = content[start : start + STREAM_PIECE_CHARS]
            yield chat_chunk(rid, model, content=piece, endpoint=endpoint)
        for chunk in stream_end(call, model, usage, endpoint=endpoint):
            yield chunk
