"""The Gate's HTTP endpoints for the inventory and for running a model on a named node.

For (all need the admin key):

- ``GET /api/inventory`` — every node with state, reason, models and
  telemetry; filters ``?kind=daemon&state=fresh&model=ID-or-equivalence``;
- ``GET /api/inventory/{node}`` — one node;
- ``POST /api/daemons/{node}/v1/completions`` and
  ``POST /api/daemons/{node}/v1/chat/completions`` — an OpenAI-style request
  run on that node (``model`` names the node's model), answered in OpenAI's
  shapes: JSON, or server-sent events token by token with ``"stream": true``.
  The answer also carries ``qmesh`` (node, runtime, timings);
- ``POST /api/models/stop``, ``/start``, ``/unload`` — body ``{"model": ID}``
  and optionally ``"node"``: take a model out of service on every node that
  has it (or one), put it back, or free its memory. Answers once every node
  is done: ``{"model", "nodes": [{"node", "ok", "state", "stopped",
  "error"}]}``; an error status only when no node succeeded.

The node-addressed endpoints are an operator's and a test's tool; clients
use the capability router's ``/v1/*`` (:mod:`qmesh.llm`), which picks the node.

Not for: the inventory's logic (:mod:`qmesh.fleet.inventory`) or the tunnel
exchange (:mod:`qmesh.fleet.daemons`).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

import trio

from qmesh.daemon.wire import CONTROL_OPERATIONS
from qmesh.fleet.daemons import (
    DaemonCallError,
    DaemonClient,
    Done,
    InferenceFailed,
    InferEvent,
    ModelUnavailable,
    NodeBusy,
    NodeUnavailable,
    RequestRejected,
    Started,
    TextDelta,
)
from qmesh.fleet.inventory import NODE_STATES, Inventory
from qmesh.operator_roles import Right
from qmesh.web.auth import AppAuthenticator
from qmesh.web.http import HttpError, Request, Response, Router

__all__ = ["add_daemon_routes"]


def _http_error(error: DaemonCallError) -> HttpError:
    if isinstance(error, RequestRejected):
        return HttpError(400, str(error), code="bad_request")
    if isinstance(error, NodeBusy):
        return HttpError(429, str(error), kind="server_error", code="busy")
    if isinstance(error, ModelUnavailable):
        return HttpError(404, str(error), code="model_unavailable")
    if isinstance(error, NodeUnavailable):
        return HttpError(503, str(error), kind="server_error", code="node_unavailable")
    return HttpError(502, str(error), kind="server_error", code="inference_failed")


def _query(request: Request, key: str) -> str | None:
    values = request.query.get(key)
    return values[-1] if values else None


def _chunk(endpoint: str, ident: str, model: str, created: int, text: str | None,
           finish: str | None, *, first: bool = False) -> dict[str, Any]:  # fmt: skip
    if endpoint == "completions":
        choice: dict[str, Any] = {
            "index": 0,
            "text": text or "",
            "logprobs": None,
            "finish_reason": finish,
        }
        kind = "text_completion"
    else:
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if text:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        kind = "chat.completion.chunk"
    return {"id": ident, "object": kind, "created": created, "model": model, "choices": [choice]}


def _usage(done: Done) -> dict[str, Any]:
    prompt = done.prompt_tokens
    completion = done.completion_tokens
    total = (
        (prompt or 0) + (completion or 0) if prompt is not None or completion is not None else None
    )
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": total}


def _sse(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def add_daemon_routes(
    router: Router,
    inventory: Inventory,
    client: DaemonClient,
    auth: AppAuthenticator,
    *,
    clock: Callable[[], float] = time.time,
) -> None:
    async def list_inventory(request: Request) -> Response:
        await auth.require(request, Right.VIEW)
        state = _query(request, "state")
        if state is not None and state not in NODE_STATES:
            raise HttpError(400, f"state must be one of {', '.join(NODE_STATES)}")
        now = clock()
        nodes = inventory.nodes(
            now=now, kind=_query(request, "kind"), state=state, model=_query(request, "model")
        )
        return Response.json(
            {
                "nodes": [n.to_json(now=now) for n in nodes],
                "stale_after_missed": inventory.stale_after_missed,
                "gone_after_missed": inventory.gone_after_missed,
                "version": inventory.version,
            }
        )

    async def one_node(request: Request) -> Response:
        await auth.require(request, Right.VIEW)
        now = clock()
        node = inventory.get(request.path_params["node"], now=now)
        if node is None:
            raise HttpError(404, f"no node named {request.path_params['node']!r}", code="not_found")
        return Response.json(node.to_json(now=now))

    def infer_handler(endpoint: str) -> Callable[[Request], Any]:
        async def handler(request: Request) -> Response:
            await auth.require(request, Right.OPERATE)
            body = request.json()
            if not isinstance(body, dict) or not isinstance(body.get("model"), str):
                raise HttpError(400, "the body must be a JSON object with a 'model'")
            node, model = request.path_params["node"], body["model"]
            ident = f"{'cmpl' if endpoint == 'completions' else 'chatcmpl'}-{uuid.uuid4().hex[:24]}"
            created = int(clock())
            events = client.stream(node, model, endpoint, body)
            if body.get("stream"):
                # Wait for the node to start before answering 200, so busy,
                # unknown model and unreachable node are proper HTTP errors.
                try:
                    first = await anext(events)
                except DaemonCallError as error:
                    await events.aclose()
                    raise _http_error(error) from None
                return Response.event_stream(
                    _stream(events, first, endpoint, ident, model, created)
                )
            try:
                started: Started | None = None
                pieces: list[str] = []
                done: Done | None = None
                async with aclosing(events):
                    async for event in events:
                        if isinstance(event, Started):
                            started = event
                        elif isinstance(event, TextDelta):
                            pieces.append(event.text)
                        else:
                            done = event
            except DaemonCallError as error:
                raise _http_error(error) from None
            assert done is not None
            text = "".join(pieces)
            if endpoint == "completions":
                choice: dict[str, Any] = {"index": 0, "text": text, "logprobs": None,
                                          "finish_reason": done.finish_reason}  # fmt: skip
                kind = "text_completion"
            else:
                choice = {"index": 0, "message": {"role": "assistant", "content": text},
                          "finish_reason": done.finish_reason}  # fmt: skip
                kind = "chat.completion"
            return Response.json(
                {
                    "id": ident,
                    "object": kind,
                    "created": created,
                    "model": model,
                    "choices": [choice],
                    "usage": _usage(done),
                    "qmesh": {
                        "node": node,
                        "runtime": None if started is None else started.runtime,
                        "timings": done.timings,
                    },
                }
            )

        return handler

    async def _stream(
        events: AsyncGenerator[InferEvent, None],
        first: InferEvent,
        endpoint: str,
        ident: str,
        model: str,
        created: int,
    ) -> AsyncIterator[bytes]:
        sent_role = False
        try:
            event: InferEvent | None = first
            while event is not None:
                if isinstance(event, Started):
                    if endpoint != "completions":
                        sent_role = True
                        yield _sse(_chunk(endpoint, ident, model, created, None, None, first=True))
                elif isinstance(event, TextDelta):
                    yield _sse(_chunk(endpoint, ident, model, created, event.text, None,
                                      first=not sent_role))  # fmt: skip
                    sent_role = True
                else:
                    final = _chunk(endpoint, ident, model, created, None, event.finish_reason)
                    final["usage"] = _usage(event)
                    final["qmesh"] = {"node": _node_of(first), "timings": event.timings}
                    yield _sse(final)
                    break
                event = await anext(events, None)
        except InferenceFailed as error:
            yield _sse({"error": {"message": str(error), "type": "server_error",
                                  "code": "inference_failed"}})  # fmt: skip
        except DaemonCallError as error:
            yield _sse({"error": {"message": str(error), "type": "server_error", "code": None}})
        finally:
            await events.aclose()
        yield _sse("[DONE]")

    async def control_model(request: Request) -> Response:
        await auth.require(request, Right.OPERATE)
        operation = request.path_params["operation"]
        if operation not in CONTROL_OPERATIONS:
            raise HttpError(
                404, f"no such operation {operation!r}: {', '.join(CONTROL_OPERATIONS)}"
            )
        body = request.json()
        model = body.get("model") if isinstance(body, dict) else None
        only = body.get("node") if isinstance(body, dict) else None
        if not isinstance(model, str) or not (only is None or isinstance(only, str)):
            raise HttpError(400, "the body must be a JSON object with a 'model' (and a 'node')")
        now = clock()
        nodes = [
            n.name
            for n in inventory.nodes(now=now, kind="daemon")
            if model in n.models and (only is None or n.name == only)
        ]
        if not nodes:
            where = f"node {only!r}" if only is not None else "no daemon"
            raise HttpError(404, f"{where} has no model {model!r}", code="not_found")
        results: dict[str, dict[str, Any]] = {}
        errors: list[DaemonCallError] = []
        await auth.record(request, f"models.{operation}", {"model": model, "nodes": nodes})

        async def one(node: str) -> None:
            try:
                done = await client.control(node, operation, model)
            except DaemonCallError as error:
                errors.append(error)
                results[node] = {"node": node, "ok": False, "error": str(error)}
                return
            state, stopped = str(done.get("state")), done.get("stopped") is True
            inventory.model_changed(node, model, state=state, stopped=stopped)
            results[node] = {
                "node": node,
                "ok": True,
                "state": state,
                "stopped": stopped,
                "error": None,
            }

        async with trio.open_nursery() as nursery:
            for node in nodes:
                nursery.start_soon(one, node)
        if len(errors) == len(nodes):
            raise _http_error(errors[0])
        return Response.json(
            {"model": model, "operation": operation, "nodes": [results[n] for n in nodes]}
        )

    router.add("GET", "/api/inventory", list_inventory)
    router.add("GET", "/api/inventory/{node}", one_node)
    router.add("POST", "/api/daemons/{node}/v1/completions", infer_handler("completions"))
    router.add("POST", "/api/daemons/{node}/v1/chat/completions", infer_handler("chat.completions"))
    router.add("POST", "/api/models/{operation}", control_model)


def _node_of(event: InferEvent) -> str | None:
    return event.node if isinstance(event, Started) else None
