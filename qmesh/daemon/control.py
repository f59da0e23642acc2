"""The daemon's ``control`` service: an operator's stop, start and unload of a model.

For: :func:`serve_control`. The Gate opens a stream ``{"service":
"control"}`` (only after checking an admin key), writes one line
``{"type": "stop" | "start" | "unload", "model": ID}`` and EOF; the daemon
answers one line, ``{"type": "done", "model", "state", "stopped"}`` once
the operation is complete — for ``stop`` and ``unload`` that is after the
requests already running have finished and the model left memory — or an
``error`` line (:mod:`qmesh.daemon.wire`). A stopped model refuses new
requests with the code ``stopped`` and stays stopped across daemon
restarts, until ``start``.

Not for: deciding who may do this (the Gate's admin API) or the state
machine itself (:mod:`qmesh.daemon.scheduler`).
"""

from __future__ import annotations

import logging

import trio

from qmesh.daemon.errors import BadRequest, DaemonError
from qmesh.daemon.infer import PEER_EOF_WAIT_S, read_request
from qmesh.daemon.node import DaemonNode
from qmesh.daemon.wire import CONTROL_OPERATIONS, encode, error_event
from qmesh.tunnel import TunnelStream

__all__ = ["serve_control"]

log = logging.getLogger(__name__)


async def serve_control(stream: TunnelStream, node: DaemonNode) -> None:
    """Serve one ``control`` stream; never raises for the peer's faults."""
    scheduler = node.scheduler
    assert scheduler is not None
    try:
        try:
            message = await read_request(stream)
            operation, model = message.get("type"), message.get("model")
            if operation not in CONTROL_OPERATIONS or not isinstance(model, str):
                raise BadRequest(
                    f"expected a line of type {', '.join(CONTROL_OPERATIONS)} naming a 'model'"
                )
            if operation == "stop":
                slot = await scheduler.stop(model)
            elif operation == "start":
                slot = scheduler.start(model)
            else:
                slot = await scheduler.unload(model)
            if operation != "unload":
                await trio.to_thread.run_sync(node.save_stopped, set(scheduler.stopped))
            reply = {
                "type": "done",
                "model": slot.id,
                "state": slot.state,
                "stopped": slot.id in scheduler.stopped,
            }
        except DaemonError as exc:
            reply = error_event(exc.code, str(exc))
        except OSError as exc:
            reply = error_event("runtime_failed", f"cannot record the stopped models: {exc}")
        await stream.send_all(encode(reply))
        await stream.send_eof()
        await stream.drain(PEER_EOF_WAIT_S)  # then the stream closes, not resets
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        log.debug("control stream %s closed by the gate", stream.id)
    finally:
        await trio.aclose_forcefully(stream)
