"""Daemons as router candidates: the inventory's models in, inference out.

For: :func:`daemon_candidates` — one :class:`~qmesh.qg.candidates.Candidate`
per model on each known node, with the node's live figures (queue depth,
busy, predicted tokens/s, free model memory, GPU power draw, fresh or not);
and :class:`DaemonBackend`, the :class:`~qmesh.llm.backends.Backend` that
runs a call on a node through :class:`~qmesh.fleet.daemons.DaemonClient`
and answers in OpenAI's shapes. The daemon client's errors are translated
here, at the boundary, into the qg family the failover loop understands:
busy → :class:`UpstreamBusy`; unreachable node or model → :class:`UpstreamFailed`;
a failure after text was streamed → :class:`StreamBroken`; a rejected
request → the client's fault.

Not for: the tunnel exchange with the daemon (:mod:`qmesh.fleet.daemons`)
or the inventory's bookkeeping (:mod:`qmesh.fleet.inventory`).
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Iterable, Mapping
from contextlib import aclosing
from typing import Any, Final

from qmesh.fleet.daemons import (
    DaemonCallError,
    DaemonClient,
    Done,
    NodeBusy,
    RequestRejected,
    TextDelta,
)
from qmesh.fleet.inventory import InventoryModel, Node
from qmesh.llm.backends import ClientFault
from qmesh.llm.calls import (
    Answer,
    Call,
    Usage,
    chat_chunk,
    chat_completion,
    stream_end,
    text_completion,
)
from qmesh.nlp.skills import estimate_tokens
from qmesh.qg.candidates import DAEMON, SIZE_TIERS, Candidate
from qmesh.qg.errors import StreamBroken, UpstreamBusy, UpstreamFailed

__all__ = ["DAEMON_TASKS", "DaemonBackend", "daemon_candidates", "refresh_load"]

DAEMON_TASKS: Final = frozenset(
    {"chat", "creative_writing", "code", "translate", "summarize", "extract", "classify"}
)
"""What a chat model on a daemon is offered for: the client's own messages
carry the instruction, so any generative task fits."""
DEFAULT_LATENCY_MS: Final = 2000.0
TYPICAL_TOKENS: Final = 256


def _translate(error: DaemonCallError, *, streamed: bool) -> Exception:
    if isinstance(error, RequestRejected):
        body = {"error": {"message": str(error), "type": "invalid_request_error", "code": None}}
        return ClientFault(400, json.dumps(body).encode())
    if isinstance(error, NodeBusy):
        return UpstreamBusy(str(error))
    # Whether text reached *our client* decides, not whether the node had
    # streamed to the Gate: a non-streamed answer that broke half-way was
    # never seen, so another node can still take it whole.
    if streamed:
        return StreamBroken(str(error))
    return UpstreamFailed(str(error))


class DaemonBackend:
    """Runs calls on daemons; one per Gate, shared by every daemon candidate."""

    def __init__(self, client: DaemonClient) -> None:
        self.client = client

    @staticmethod
    def _request(candidate: Candidate, call: Call) -> tuple[str, str, str, dict[str, Any]]:
        if call.endpoint == "embeddings":
            raise ClientFault(
                400, b'{"error":{"message":"daemon models here do not serve embeddings"}}'
            )
        endpoint = "chat.completions" if call.endpoint == "chat" else "completions"
        body = dict(call.body)
        body["model"] = candidate.upstream_model or candidate.model
        body.pop("stream", None)
        body.pop("stream_options", None)
        node = candidate.node or ""
        return node, body["model"], endpoint, body

    async def complete(self, candidate: Candidate, call: Call) -> Answer:
        node, model, endpoint, body = self._request(candidate, call)
        pieces: list[str] = []
        done: Done | None = None
        try:
            async with aclosing(self.client.stream(node, model, endpoint, body)) as events:
                async for event in events:
                    if isinstance(event, TextDelta):
                        pieces.append(event.text)
                    elif isinstance(event, Done):
                        done = event
        except DaemonCallError as exc:
            raise _translate(exc, streamed=False) from None
        text = "".join(pieces)
        tokens_in = (done.prompt_tokens if done else None) or call.tokens_in
        tokens_out = (done.completion_tokens if done else None) or estimate_tokens(text)
        build = chat_completion if call.endpoint == "chat" else text_completion
        return Answer(
            build(call.request_id, candidate.model, text, tokens_in, tokens_out),
            tokens_in,
            tokens_out,
            candidate.model,
        )

    async def stream(
        self, candidate: Candidate, call: Call, usage: Usage
    ) -> AsyncGenerator[bytes, None]:
        node, model, endpoint, body = self._request(candidate, call)
        rid, name, kind = call.request_id, candidate.model, call.endpoint
        streamed = False
        finish = "stop"
        try:
            async with aclosing(self.client.stream(node, model, endpoint, body)) as events:
                async for event in events:
                    if isinstance(event, TextDelta):
                        if not streamed and kind == "chat":
                            yield chat_chunk(rid, name, role="assistant", content="")
                        streamed = True
                        usage.bytes_out += len(event.text)
                        yield chat_chunk(rid, name, content=event.text, endpoint=kind)
                    elif isinstance(event, Done):
                        finish = event.finish_reason or "stop"
                        usage.tokens_in = event.prompt_tokens or call.tokens_in
                        usage.tokens_out = event.completion_tokens or 0
        except DaemonCallError as exc:
            raise _translate(exc, streamed=streamed) from None
        if not streamed and kind == "chat":
            yield chat_chunk(rid, name, role="assistant", content="")
        for chunk in stream_end(call, name, usage, finish=finish, endpoint=kind):
            yield chunk


def _power_w(node: Node) -> float:
    telemetry = node.telemetry or {}
    watts = sum(float(g.get("power_w") or 0.0) for g in telemetry.get("gpus") or ())
    return watts


def _out_of_service(node: str, model: InventoryModel) -> str | None:
    if model.stopped:
        return f"stopped on {node} by an operator (qmesh models start {model.id})"
    if model.state == "failed":
        return f"failed to load on {node}: {model.error or 'no reason given'}"
    return None


def daemon_candidates(
    nodes: Iterable[Node],
    backend: DaemonBackend,
    *,
    equivalences: Mapping[str, str],
    previous: Mapping[str, Candidate],
    extra_tasks: Iterable[str] = (),
) -> list[Candidate]:
    """A candidate per (node, model), carrying over what was learnt about the
    same candidate before (latency EWMA, cool-down)."""
    tasks = DAEMON_TASKS | frozenset(extra_tasks)
    out: list[Candidate] = []
    for node in nodes:
        if node.state == "gone":
            continue
        queue_limit = int(node.extra.get("queue_limit") or 0)
        telemetry = node.telemetry or {}
        free = telemetry.get("model_memory_free")
        power = _power_w(node)
        for model in node.models.values():
            cid = f"node:{node.name}/{model.id}"
            family, size = model.family, model.size_class
            equivalence = (
                equivalences.get(model.id)
                or model.equivalence
                or (f"{family}:{size}" if family and size else None)
            )
            tps = float(model.predicted_tps or 0.0)
            old = previous.get(cid)
            candidate = Candidate(
                id=cid,
                kind=DAEMON,
                model=model.id,
                tasks=tasks,
                family=family,
                size_class=size,
                equivalence=equivalence,
                node=node.name,
                local=True,
                private=True,
                context=model.context_length or 4096,
                quality=SIZE_TIERS.get(size or "", 2),
                latency_ms=old.latency_ms
                if old is not None
                else (TYPICAL_TOKENS / tps * 1000 if tps > 0 else DEFAULT_LATENCY_MS),
                tokens_per_s=tps,
                queue_depth=model.queue_depth,
                queue_limit=queue_limit,
                busy=model.busy,
                free_memory_mb=None if free is None else float(free) / 1e6,
                healthy=node.state == "fresh",
                out_of_service=_out_of_service(node.name, model),
                cool_until=0.0 if old is None else old.cool_until,
                power_w=power,
                backend=backend,
            )
            out.append(candidate)
    return out


def refresh_load(candidates: Iterable[Candidate], nodes: Mapping[str, Node]) -> None:
    """Update live figures in place (a heartbeat changed only the load)."""
    for candidate in candidates:
        node = nodes.get(candidate.node or "")
        if node is None:
            continue
        model = node.models.get(candidate.model)
        if model is None:
            continue
        candidate.queue_depth = model.queue_depth
        candidate.busy = model.busy
        candidate.healthy = node.state == "fresh"
        candidate.tokens_per_s = float(model.predicted_tps or candidate.tokens_per_s)
