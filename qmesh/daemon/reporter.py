"""Keeps the Gate's inventory of this node true: the ``inventory`` stream.

For: :func:`report_forever`. It opens a stream ``{"service": "inventory"}``
to the Gate and writes ``hello`` and a full ``inventory`` line, then a full
``inventory`` whenever the node changes (a model appears, loads, is
evicted, a queue turns busy) and a ``heartbeat`` with telemetry and queue
depths every ``heartbeat_interval_s`` otherwise. When the stream breaks
(the session was lost: the Gate restarted, or its grace period ran out) it
opens a new one on the next session and reports in full again, so a
reconnected daemon is fresh at once.

Not for: what the lines say (:class:`~qmesh.daemon.node.DaemonNode`) or
the Gate's side (:mod:`qmesh.fleet.daemons`).
"""

from __future__ import annotations

import logging
from typing import Final

import trio

from qmesh.daemon.node import DaemonNode
from qmesh.daemon.wire import INVENTORY_SERVICE, WIRE_VERSION, encode
from qmesh.tunnel import TunnelClient, TunnelError

__all__ = ["report_forever"]

log = logging.getLogger(__name__)

DEBOUNCE_S: Final = 0.05
"""Changes that come together (an eviction and a load) go out in one report."""
REOPEN_DELAY_S: Final = 0.2


async def report_forever(client: TunnelClient, node: DaemonNode) -> None:
    interval = node.settings.heartbeat_interval_s
    while True:
        try:
            stream = await client.open_stream(
                {"service": INVENTORY_SERVICE, "node": node.name, "wire": WIRE_VERSION}
            )
        except TunnelError as exc:
            log.debug("cannot open the inventory stream yet: %s", exc)
            await trio.sleep(REOPEN_DELAY_S)
            continue
        try:
            node.changed = trio.Event()
            await stream.send_all(encode(node.hello()) + encode(node.inventory()))
            log.info("reported inventory to the gate (%d models)", len(node.inventory()["models"]))
            while True:
                with trio.move_on_after(interval) as timer:
                    await node.changed.wait()
                    await trio.sleep(DEBOUNCE_S)
                await node.read_telemetry()
                if timer.cancelled_caught:
                    await stream.send_all(encode(node.heartbeat()))
                else:
                    node.changed = trio.Event()
                    await stream.send_all(encode(node.inventory()))
        except (TunnelError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.info("inventory stream ended (%s); reporting again on the next session", exc)
        finally:
            await trio.aclose_forcefully(stream)
        await trio.sleep(REOPEN_DELAY_S)
