"""The Gate's side of the daemons: their reports in, and inference out.

For: :class:`InventoryService`, the tunnel service daemons open
(``inventory``: hello, full inventories, heartbeats → :class:`Inventory`),
with :meth:`InventoryService.sweep_forever` applying the missed-heartbeat
thresholds; and :class:`DaemonClient`, which runs one chat or completion
on a given node and model and streams the answer back::

    async with aclosing(daemons.stream("gpu-1", "gemma-3-270m", "completions",
                                       {"prompt": "Hello", "max_tokens": 16})) as events:
        async for event in events:
            if isinstance(event, TextDelta):
                print(event.text, end="")

:meth:`DaemonClient.control` stops, starts or unloads a model on a node
(an operator's ``qmesh models stop``).

Events: one :class:`Started`, then :class:`TextDelta` per piece of text as
the node produces it (token by token), then one :class:`Done`. Failures
raise the :class:`DaemonCallError` family, split by what the caller should
do next:

- :class:`NodeUnavailable`, :class:`NodeBusy`, :class:`ModelUnavailable`:
  nothing was generated — try an equivalent model elsewhere;
- :class:`RequestRejected`: the request itself is wrong — do not retry;
- :class:`InferenceFailed`: the node or its runtime failed; ``partial``
  says whether text was already streamed (then a retry elsewhere would
  repeat it to the client).

Not for: choosing the node (the router, :mod:`qmesh.llm`) or HTTP
(:mod:`qmesh.fleet.api`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import Any, Final

import attrs
import trio

from qmesh.daemon.wire import (
    CONTROL_SERVICE,
    INFER_SERVICE,
    LineDecoder,
    WireError,
    encode,
)
from qmesh.fleet.inventory import STALL_SLACK_S, Inventory
from qmesh.tunnel import Session, TunnelError, TunnelStream
from qmesh.tunnel.frames import ResetCode
from qmesh.tunnel.stream import StreamHost

__all__ = [
    "DaemonCallError",
    "DaemonClient",
    "Done",
    "InferenceFailed",
    "InventoryService",
    "ModelUnavailable",
    "NodeBusy",
    "NodeUnavailable",
    "RequestRejected",
    "Started",
    "TextDelta",
]

log = logging.getLogger(__name__)

ACCEPT_TIMEOUT_S: Final = 10.0
"""A node must acknowledge a request this fast (before any model load)."""
IDLE_TIMEOUT_S: Final = 600.0
"""Longest silence once accepted: a large model may take minutes to load."""
CONTROL_TIMEOUT_S: Final = 300.0
"""Longest wait for a stop or unload: the requests already running finish first."""


# -- errors ---------------------------------------------------------------------


class DaemonCallError(Exception):
    """Base class: a request to a daemon did not complete."""

    def __init__(self, message: str, *, node: str, model: str) -> None:
        super().__init__(message)
        self.node = node
        self.model = model


class NodeUnavailable(DaemonCallError):
    """The node is unknown, gone, not connected, or did not acknowledge in time."""


class NodeBusy(DaemonCallError):
    """The model's queue on that node is full."""


class ModelUnavailable(DaemonCallError):
    """The node has no such model, or could not load it."""


class RequestRejected(DaemonCallError):
    """The node found the request malformed (the caller's fault)."""


class InferenceFailed(DaemonCallError):
    """The runtime failed or the stream broke; ``partial``: text was already streamed."""

    def __init__(self, message: str, *, node: str, model: str, partial: bool) -> None:
        super().__init__(message, node=node, model=model)
        self.partial = partial


_ERRORS: Final[dict[str, type[DaemonCallError]]] = {
    "busy": NodeBusy,
    "unknown_model": ModelUnavailable,
    "stopped": ModelUnavailable,
    "load_failed": ModelUnavailable,
    "bad_request": RequestRejected,
    "shutting_down": NodeUnavailable,
}


# -- events ---------------------------------------------------------------------


@attrs.frozen
class Started:
    node: str
    model: str
    runtime: str
    queued_ms: float


@attrs.frozen
class TextDelta:
    text: str


@attrs.frozen
class Done:
    finish_reason: str
    prompt_tokens: int | None
    completion_tokens: int | None
    timings: dict[str, Any]


InferEvent = Started | TextDelta | Done


# -- the inventory service --------------------------------------------------------


class InventoryService:
    """Serves the ``inventory`` streams daemons open; feeds :class:`Inventory`."""

    def __init__(self, inventory: Inventory, *, clock: Callable[[], float] = time.time) -> None:
        self.inventory = inventory
        self.clock = clock

    async def __call__(self, stream: TunnelStream) -> None:
        session = stream.session
        name = session.peer
        if session.peer_role != "daemon":
            stream.reset(ResetCode.REFUSED, "only daemons report inventory")
            return
        decoder = LineDecoder()
        said_hello = False
        reason = "inventory stream closed by the daemon"
        try:
            while True:
                data = await stream.receive_some()
                for message in decoder.feed(data):
                    said_hello = self._apply(name, session, message, said_hello)
                if not data:
                    break
        except WireError as exc:
            reason = f"bad inventory report: {exc}"
            log.warning("daemon %s: %s", name, reason)
        except (TunnelError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            reason = f"session ended: {exc}"
        finally:
            self.inventory.disconnected(name, session, now=self.clock(), reason=reason)
            await trio.aclose_forcefully(stream)

    def _apply(
        self, name: str, session: StreamHost, message: dict[str, Any], said_hello: bool
    ) -> bool:
        kind = message["type"]
        now = self.clock()
        if kind == "hello":
            address = message.get("host")
            self.inventory.hello(
                name,
                now=now,
                kind=str(message.get("kind", "daemon")),
                source="tunnel",
                connection=session,
                address=str(address) if address else None,
                version=message.get("version"),
                heartbeat_interval_s=float(message.get("heartbeat_interval_s") or 5.0),
                extra={
                    k: message[k] for k in ("queue_limit", "started_at", "wire") if k in message
                },
            )
            return True
        if not said_hello:
            raise WireError(f"{kind!r} before 'hello'")
        node = None
        if kind == "inventory":
            node = self.inventory.report(
                name,
                now=now,
                models=[m for m in message.get("models") or () if isinstance(m, dict)],
                telemetry=message.get("telemetry"),
                runtimes=message.get("runtimes"),
            )
        elif kind == "heartbeat":
            node = self.inventory.report(
                name, now=now, telemetry=message.get("telemetry"), load=message.get("load") or {}
            )
        if node is not None:
            for key in ("memory", "bandwidth"):
                if isinstance(message.get(key), dict):
                    node.extra[key] = message[key]
        return True

    async def sweep_forever(
        self,
        interval_s: float = 0.5,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Apply the thresholds every ``interval_s``: state changes are logged as they happen.

        Waking up late means the Gate itself was held up (an overloaded
        machine): that time is excused (:meth:`Inventory.excuse`), and
        until this loop has caught up other sweeps wait for it, so heartbeats
        queued unread in the Gate's sockets are not counted as the nodes'
        silence — a slow node is not declared stale or gone (and dropped by
        the router) because the Gate was slow."""
        last = self.clock()
        task_status.started()
        while True:
            now = self.clock()
            late = now - last - interval_s
            if late > STALL_SLACK_S:
                log.info("the gate was held up for %.1fs; not counted as nodes' silence", late)
                self.inventory.excuse(late, now=now)
            self.inventory.listening = (now, interval_s)
            self.inventory.sweep(now)
            last = now
            await trio.sleep(interval_s)


# -- running requests ----------------------------------------------------------------


class DaemonClient:
    """Runs requests on daemons through their tunnel sessions."""

    def __init__(
        self,
        inventory: Inventory,
        *,
        clock: Callable[[], float] = time.time,
        accept_timeout_s: float = ACCEPT_TIMEOUT_S,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
    ) -> None:
        self.inventory = inventory
        self.clock = clock
        self.accept_timeout_s = accept_timeout_s
        self.idle_timeout_s = idle_timeout_s

    def _session(self, node_name: str, model: str) -> Session:
        node = self.inventory.get(node_name, now=self.clock())
        if node is None:
            raise NodeUnavailable(f"no node named {node_name!r}", node=node_name, model=model)
        # The tunnel session decides, not the heartbeat state: a node whose
        # heartbeats are late (a loaded machine: "stale", even "gone" after
        # a few seconds) but whose session is alive is slow, not dead. Failing
        # here would cool the node down (qmesh.llm.executor) and, with no
        # other equivalent node, fail every request for ``cooldown_s``. A node
        # that really died is caught by the accept timeout below, and the
        # router does not choose a non-fresh node in the first place.
        # (``Inventory.disconnected`` drops the connection of a node whose
        # report channel ended, so that case still fails here at once.)
        session = node.connection
        if not isinstance(session, Session) or session.lost:
            if node.state == "gone":
                raise NodeUnavailable(
                    f"node {node_name} is gone ({node.reason})", node=node_name, model=model
                )
            raise NodeUnavailable(f"node {node_name} is not connected", node=node_name, model=model)
        return session

    async def stream(
        self, node: str, model: str, endpoint: str, body: dict[str, Any]
    ) -> AsyncGenerator[InferEvent, None]:
        """Run an OpenAI-style ``body`` (``endpoint``: ``completions`` or
        ``chat.completions``) on ``model`` at ``node``, streaming. Close the
        iterator (``contextlib.aclosing``) to abandon the request early."""
        session = self._session(node, model)
        request = {"service": INFER_SERVICE, "model": model}
        attached = self.inventory.get(node, now=self.clock())
        if attached is not None and attached.gate is not None:
            request["node"] = node  # the Gate it is attached to relays the stream
        try:
            tunnel = session.open_stream(request)
        except TunnelError as exc:
            raise NodeUnavailable(f"node {node}: {exc}", node=node, model=model) from None
        decoder = LineDecoder()
        partial = False
        accepted = False
        try:
            await tunnel.send_all(
                encode({"type": "request", "model": model, "endpoint": endpoint, "body": body})
            )
            await tunnel.send_eof()
            while True:
                timeout = self.idle_timeout_s if accepted else self.accept_timeout_s
                # Only the receive is under the timeout: an async generator
                # must never yield from inside a cancel scope.
                with trio.move_on_after(timeout) as timer:
                    data = await tunnel.receive_some()
                if timer.cancelled_caught:
                    if not accepted:
                        raise NodeUnavailable(
                            f"node {node} did not acknowledge within {timeout:g}s",
                            node=node,
                            model=model,
                        )
                    raise InferenceFailed(
                        f"node {node} went silent for {timeout:g}s",
                        node=node,
                        model=model,
                        partial=partial,
                    )
                for message in decoder.feed(data):
                    kind = message["type"]
                    if kind == "accepted":
                        accepted = True
                    elif kind == "start":
                        accepted = True
                        yield Started(
                            node=node,
                            model=str(message.get("model", model)),
                            runtime=str(message.get("runtime", "")),
                            queued_ms=float(message.get("queued_ms") or 0.0),
                        )
                    elif kind == "delta":
                        partial = True
                        yield TextDelta(str(message.get("text", "")))
                    elif kind == "end":
                        usage = message.get("usage") or {}
                        yield Done(
                            finish_reason=str(message.get("finish_reason", "stop")),
                            prompt_tokens=usage.get("prompt_tokens"),
                            completion_tokens=usage.get("completion_tokens"),
                            timings=dict(message.get("timings") or {}),
                        )
                        return
                    elif kind == "error":
                        raise self._error(node, model, message, partial)
                if not data:
                    raise InferenceFailed(
                        f"node {node} ended the stream without an answer",
                        node=node,
                        model=model,
                        partial=partial,
                    )
        except WireError as exc:
            raise InferenceFailed(
                f"node {node} broke the protocol: {exc}", node=node, model=model, partial=partial
            ) from None
        except (TunnelError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise InferenceFailed(
                f"node {node}: the stream broke: {exc}", node=node, model=model, partial=partial
            ) from None
        finally:
            await trio.aclose_forcefully(tunnel)

    @staticmethod
    def _error(node: str, model: str, message: dict[str, Any], partial: bool) -> DaemonCallError:
        code = str(message.get("code", "runtime_failed"))
        text = f"node {node}: {message.get('message', code)} ({code})"
        error_class = _ERRORS.get(code)
        if error_class is None or partial:
            return InferenceFailed(text, node=node, model=model, partial=partial)
        return error_class(text, node=node, model=model)

    async def control(
        self, node: str, operation: str, model: str, *, timeout_s: float = CONTROL_TIMEOUT_S
    ) -> dict[str, Any]:
        """Stop, start or unload ``model`` on ``node`` (:mod:`qmesh.daemon.control`);
        the node's ``done`` line: model, state, stopped."""
        session = self._session(node, model)
        attached = self.inventory.get(node, now=self.clock())
        if attached is not None and attached.gate is not None:
            raise NodeUnavailable(
                f"node {node} is attached to gate {attached.gate}: control it through that Gate",
                node=node,
                model=model,
            )
        try:
            tunnel = session.open_stream({"service": CONTROL_SERVICE, "model": model})
        except TunnelError as exc:
            raise NodeUnavailable(f"node {node}: {exc}", node=node, model=model) from None
        decoder = LineDecoder(max_line=64 * 1024)
        try:
            await tunnel.send_all(encode({"type": operation, "model": model}))
            await tunnel.send_eof()
            with trio.move_on_after(timeout_s):
                while True:
                    data = await tunnel.receive_some()
                    for message in decoder.feed(data):
                        if message["type"] == "error":
                            raise self._error(node, model, message, False)
                        if message["type"] != "done":
                            raise WireError(f"unexpected {message['type']!r} line")
                        return message
                    if not data:
                        raise NodeUnavailable(
                            f"node {node} ended the control stream without an answer",
                            node=node,
                            model=model,
                        )
            raise NodeUnavailable(
                f"node {node} did not finish '{operation} {model}' within {timeout_s:g}s "
                "(requests still running on it)",
                node=node,
                model=model,
            )
        except WireError as exc:
            raise NodeUnavailable(
                f"node {node} broke the protocol: {exc}", node=node, model=model
            ) from None
        except (TunnelError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise NodeUnavailable(
                f"node {node}: the stream broke: {exc}", node=node, model=model
            ) from None
        finally:
            await trio.aclose_forcefully(tunnel)

    async def complete(
        self, node: str, model: str, endpoint: str, body: dict[str, Any]
    ) -> tuple[Started | None, str, Done]:
        """The whole answer: (start event, text, done event)."""
        started: Started | None = None
        pieces: list[str] = []
        done: Done | None = None
        async with aclosing(self.stream(node, model, endpoint, body)) as events:
            async for event in events:
                if isinstance(event, Started):
                    started = event
                elif isinstance(event, TextDelta):
                    pieces.append(event.text)
                else:
                    done = event
        assert done is not None
        return started, "".join(pieces), done
