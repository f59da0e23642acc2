"""The Daemon role: a compute node's agent, connected to the Gate.

Wires the parts together: a :class:`~qmesh.daemon.node.DaemonNode`
(telemetry, catalog, runtimes, scheduler), the tunnel client with the
services the Gate opens to it (``status``: one JSON document about the
node; ``infer``: :mod:`qmesh.daemon.infer`; ``control``:
:mod:`qmesh.daemon.control`), the ``inventory`` stream it
opens to the Gate (:mod:`qmesh.daemon.reporter`), and the local HTTP
endpoint on ``daemon.health_listen`` (``GET /healthz``, ``GET /api/node``:
the same document the Gate gets) for operators on the box.
"""

from __future__ import annotations

import json
import os
import platform
import time
from functools import partial
from typing import Any

import trio

from qmesh import __version__
from qmesh.config import Config, ConfigError, format_hostport, parse_hostport
from qmesh.daemon.control import serve_control
from qmesh.daemon.infer import serve_infer
from qmesh.daemon.node import DaemonNode
from qmesh.daemon.reporter import report_forever
from qmesh.daemon.wire import CONTROL_SERVICE, INFER_SERVICE
from qmesh.identity import credential_or_join, dial_addresses
from qmesh.renewal import keep_joined_credential, keep_renewed, remember_gate_key
from qmesh.tunnel import TunnelClient, TunnelStream
from qmesh.web.http import Request, Response, Router
from qmesh.web.native import serve_http

_STARTED = time.time()


async def status_service(stream: TunnelStream) -> None:
    """Answer one JSON document describing this node, then close."""
    report = {
        "host": platform.node(),
        "pid": os.getpid(),
        "software": f"qmesh/{__version__}",
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "uptime_s": round(time.time() - _STARTED, 3),
    }
    await stream.send_all(json.dumps(report).encode())
    await stream.send_eof()


def _local_routes(node: DaemonNode, client: TunnelClient) -> Router:
    router = Router()

    async def healthz(request: Request) -> Response:
        return Response.json(
            {"status": "ok", "node": node.name, "gate_connected": client.connected}
        )

    async def node_view(request: Request) -> Response:
        return Response.json({**node.hello(), "inventory": node.inventory()})

    router.add("GET", "/healthz", healthz)
    router.add("GET", "/api/node", node_view)
    return router


async def run_daemon(
    config: Config,
    *,
    gate_address: tuple[str, int] | None = None,
    task_status: trio.TaskStatus[dict[str, Any]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the daemon until cancelled."""
    if config.daemon.credential_file is None:
        raise ConfigError("daemon.credential_file is required (see `qmesh enroll daemon`)")
    credential, joining = credential_or_join(
        config.daemon.credential_file, config.daemon.join_token_file, "daemon"
    )
    addresses = [gate_address] if gate_address else dial_addresses(config.daemon.gate, credential)
    node = DaemonNode(config, credential.name)
    await node.prepare()
    assert node.scheduler is not None
    client = TunnelClient(
        config.tunnel,
        name=credential.name,
        role="daemon",
        private_key=credential.private_key,
        gate_public_key=credential.gate_public_key,
        gate_addresses=addresses,
        join=None if joining is None else joining.proof(),
        services={
            "status": status_service,
            INFER_SERVICE: partial(
                serve_infer,
                scheduler=node.scheduler,
                on_runtime_failure=node.request_refresh,
                on_measured=node.record_speed,
            ),
            CONTROL_SERVICE: partial(serve_control, node=node),
        },
    )
    host, port = parse_hostport(config.daemon.health_listen)
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        await nursery.start(client.run)
        nursery.start_soon(keep_renewed, client)
        client.on_gate_key = remember_gate_key(credential, config.daemon.credential_file)
        if joining is not None:
            nursery.start_soon(
                keep_joined_credential, client, credential, config.daemon.credential_file
            )
        bound = await nursery.start(
            partial(serve_http, purpose="the daemon's health endpoint"),
            _local_routes(node, client),
            host,
            port,
        )
        nursery.start_soon(report_forever, client, node)
        task_status.started(
            {
                "name": credential.name,
                "gate": ",".join(format_hostport(*a) for a in addresses),
                "health": f"http://{format_hostport(host, bound)}",
                "client": client,
                "node": node,
            }
        )
