"""The Daemon role: a compute node's agent, connected to the Gate.

The Gate opens streams *to* daemons; the ``status`` service answers what
the node is, so the Gate can tell live nodes from stale ones.
"""

from __future__ import annotations

import json
import os
import platform
import time
from typing import Any

import trio

from qmesh import __version__
from qmesh.config import Config, ConfigError, format_hostport, parse_hostport
from qmesh.identity import load_credential
from qmesh.tunnel import TunnelClient, TunnelStream

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


async def run_daemon(
    config: Config,
    *,
    gate_address: tuple[str, int] | None = None,
    task_status: trio.TaskStatus[dict[str, Any]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the daemon until cancelled."""
    if config.daemon.credential_file is None:
        raise ConfigError("daemon.credential_file is required (see `qmesh enroll daemon`)")
    credential = load_credential(config.daemon.credential_file)
    address = gate_address or parse_hostport(config.daemon.gate)
    client = TunnelClient(
        config.tunnel,
        name=credential.name,
        role="daemon",
        private_key=credential.private_key,
        gate_public_key=credential.gate_public_key,
        gate_address=address,
        services={"status": status_service},
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        task_status.started(
            {"name": credential.name, "gate": format_hostport(*address), "client": client}
        )
