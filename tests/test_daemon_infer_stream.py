"""The daemon's ``infer`` exchange ends cleanly, however late the Gate ends
its side: the daemon waits for the Gate's end of stream before it closes,
so the Gate never takes a reset for a broken answer when the whole answer
had reached it (which cooled the node down for ``cooldown_s``).

A real tunnel session (tunnelkit) carries the real ``serve_infer``; the
scheduler and runtime are stand-ins that answer at once."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any

import attrs
import trio
from tunnelkit import start_edge, start_gate

from qmesh.daemon.infer import serve_infer
from qmesh.daemon.runtimes.base import Delta, Finished, GenerationEvent
from qmesh.daemon.wire import LineDecoder, encode


class InstantRuntime:
    name = "instant"

    async def generate(self, model: str, request: object) -> AsyncIterator[GenerationEvent]:
        yield Delta("ok")
        yield Finished("stop", prompt_tokens=1, completion_tokens=1)


@attrs.define
class Slot:
    id: str
    state: str = "loaded"
    waiting: int = 0
    runtime: InstantRuntime = attrs.field(factory=InstantRuntime)


class InstantScheduler:
    @contextlib.asynccontextmanager
    async def use(
        self, model: str, *, admitted: Callable[[Slot], Awaitable[None]]
    ) -> AsyncIterator[Slot]:
        slot = Slot(model)
        await admitted(slot)
        yield slot


async def test_a_gate_that_ends_its_side_late_still_gets_the_whole_answer(
    nursery: trio.Nursery,
) -> None:
    scheduler: Any = InstantScheduler()  # the part of a Scheduler serve_infer uses
    service = partial(serve_infer, scheduler=scheduler)
    gate = await start_gate(nursery, {"infer": service})
    # The Gate's end of the exchange, here the edge's: it opens the stream.
    opener = await start_edge(nursery, gate, "gate-side")
    request = {"type": "request", "model": "m", "endpoint": "completions",
               "body": {"prompt": "x", "max_tokens": 1}}  # fmt: skip
    for _ in range(20):
        stream = await opener.open_stream({"service": "infer", "model": "m"})
        await stream.send_all(encode(request))
        # A Gate whose task resumes late: the whole answer, and the daemon's
        # end of stream, are back before the Gate's end of stream goes out.
        # That must cost nothing.
        decoder, kinds = LineDecoder(), []
        with trio.fail_after(10):
            while data := await stream.receive_some():
                kinds += [m["type"] for m in decoder.feed(data)]
        assert kinds == ["accepted", "start", "delta", "end"]
        await stream.send_eof()  # raised StreamReset when the daemon closed first
        await stream.aclose()
