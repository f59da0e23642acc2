"""The daemon's ``infer`` service: one generation per tunnel stream, streamed back.

For: :func:`serve_infer`. The Gate opens a stream ``{"service": "infer"}``,
writes one ``request`` line (model, endpoint, OpenAI-style body) and EOF.
The daemon answers with JSON lines (:mod:`qmesh.daemon.wire`):
``accepted`` as soon as the request has a place in the model's queue,
``start`` when generation begins (after any load), one ``delta`` per piece
of text as the runtime produces it — token by token — and ``end`` with the
finish reason, token counts and timings; or ``error`` with a code at any
point. See docs/daemon.md for the full exchange.

Not for: choosing a model or node (the Gate), or queueing and swapping
(:mod:`qmesh.daemon.scheduler`, which this calls).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import aclosing
from typing import Any, Final

import trio

from qmesh.daemon.errors import BadRequest, DaemonError, RuntimeFailed
from qmesh.daemon.runtimes.base import Delta, Finished, GenerationRequest
from qmesh.daemon.scheduler import Scheduler, Slot
from qmesh.daemon.wire import LineDecoder, WireError, encode, error_event
from qmesh.tunnel import TunnelStream

__all__ = ["PEER_EOF_WAIT_S", "read_request", "serve_infer"]

log = logging.getLogger(__name__)

STREAMED_SHARE: Final = 0.9
"""Pieces per token above which the stream is taken as token by token."""
PEER_EOF_WAIT_S: Final = 5.0
"""How long a finished exchange waits for the Gate to end its side (it ends
it right after its request; only a misbehaving Gate makes this wait)."""


async def read_request(stream: TunnelStream) -> dict[str, Any]:
    """The one request line a Gate writes on a stream it opens (then EOF)."""
    decoder = LineDecoder()
    while True:
        data = await stream.receive_some()
        try:
            messages = decoder.feed(data)
        except WireError as exc:
            raise BadRequest(f"malformed request: {exc}") from None
        if messages:
            return messages[0]
        if not data:
            raise BadRequest("the stream ended without a request line")


async def serve_infer(
    stream: TunnelStream,
    scheduler: Scheduler,
    *,
    on_runtime_failure: Callable[[], None] = lambda: None,
    on_measured: Callable[[str, float, int], None] | None = None,
) -> None:
    """Serve one ``infer`` stream; never raises for the peer's or the model's faults.
    ``on_measured(model, decode_tps, completion_tokens)`` hears each
    generation's decode speed when the stream gave a trustworthy one."""

    async def send(message: dict[str, Any]) -> None:
        await stream.send_all(encode(message))

    clock = trio.current_time
    received = clock()
    try:
        try:
            message = await read_request(stream)
            if message.get("type") != "request" or not isinstance(message.get("model"), str):
                raise BadRequest("expected a 'request' line naming a 'model'")
            model = message["model"]
            request = GenerationRequest.from_openai(
                str(message.get("endpoint", "completions")), message.get("body")
            )

            async def admitted(slot: Slot) -> None:
                await send(
                    {
                        "type": "accepted",
                        "model": slot.id,
                        "state": slot.state,
                        "queue_depth": slot.waiting,
                    }
                )

            async with scheduler.use(model, admitted=admitted) as slot:
                started = clock()
                await send(
                    {
                        "type": "start",
                        "model": slot.id,
                        "runtime": slot.runtime.name,
                        "queued_ms": round((started - received) * 1000, 3),
                    }
                )
                first: float | None = None
                pieces = 0
                async with aclosing(slot.runtime.generate(slot.id, request)) as events:
                    async for event in events:
                        if isinstance(event, Delta):
                            if first is None:
                                first = clock()
                            pieces += 1
                            await send({"type": "delta", "text": event.text})
                        elif isinstance(event, Finished):
                            end = _end(event, received, started, first, pieces, clock())
                            if on_measured is not None and end["timings"].get("per_token"):
                                tokens = end["usage"]["completion_tokens"]
                                on_measured(slot.id, end["timings"]["decode_tps"], tokens)
                            await send(end)
                            break
        except RuntimeFailed as exc:
            on_runtime_failure()
            log.warning("inference on %s failed: %s", stream.request.get("model"), exc)
            await send(error_event(exc.code, str(exc)))
        except DaemonError as exc:
            await send(error_event(exc.code, str(exc)))
        await stream.send_eof()
        # The Gate ends its side after the request line (as a rule, already
        # done): wait for that end, so the stream closes rather than resets.
        await stream.drain(PEER_EOF_WAIT_S)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        # The Gate gave up on this request (its client went away); the
        # generation was abandoned when the block above unwound.
        log.debug("infer stream %s closed by the gate", stream.id)
    finally:
        await trio.aclose_forcefully(stream)


def _end(
    event: Finished, received: float, started: float, first: float | None, pieces: int, now: float
) -> dict[str, Any]:
    completion = event.completion_tokens if event.completion_tokens is not None else pieces
    timings: dict[str, Any] = {
        "queued_ms": round((started - received) * 1000, 3),
        "ttft_ms": None if first is None else round((first - started) * 1000, 3),
        "total_ms": round((now - received) * 1000, 3),
    }
    if first is not None and completion > 1 and now > first:
        if pieces >= STREAMED_SHARE * completion:
            # Tokens after the first over the time after the first: decode
            # speed without the prompt's processing.
            timings["decode_tps"] = round((completion - 1) / (now - first), 3)
            timings["per_token"] = True
        elif now > started:
            # The runtime sent several tokens per piece, so the first piece
            # came late: every token over the whole generation (prompt
            # included) is the figure that cannot overstate the speed.
            timings["decode_tps"] = round(completion / (now - started), 3)
            timings["per_token"] = False
    return {
        "type": "end",
        "finish_reason": event.finish_reason,
        "usage": {
            "prompt_tokens": event.prompt_tokens,
            "completion_tokens": completion,
        },
        "timings": timings,
    }
