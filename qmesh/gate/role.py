"""The Gate role: the tunnel listener with the services edges may open."""

from __future__ import annotations

import logging
from typing import Any

import trio

from qmesh.config import Config, format_hostport, parse_hostport
from qmesh.gate.api import add_routes
from qmesh.gate.auth import AppAuthenticator
from qmesh.gate.daemon_api import add_daemon_routes
from qmesh.gate.daemons import DaemonClient, InventoryService
from qmesh.gate.forward import ForwardService
from qmesh.gate.inventory import Inventory
from qmesh.gate.llm import LlmService
from qmesh.gate.llm_api import add_llm_routes
from qmesh.gate.llm_relay import LlmRelay
from qmesh.gate.ops_api import start_ops
from qmesh.gate.pg import PgService
from qmesh.gate.watch import StateWatcher
from qmesh.identity import GateKeys
from qmesh.memory.api import add_routes as add_memory_routes
from qmesh.memory.service import Memory
from qmesh.state import StateStore
from qmesh.tunnel import HandshakeRefused, TunnelServer
from qmesh.web.http import Router, serve_http

log = logging.getLogger(__name__)


class EnrolledEdges:
    """Authenticates edges against the identities in the Gate's state store.

    Each handshake reads the store, so ``qmesh revoke`` from another process
    takes effect at the edge's next handshake without a restart.
    """

    def __init__(self, store: StateStore) -> None:
        self.store = store

    async def authenticate(self, public_key: bytes) -> tuple[str, str]:
        identity = await trio.to_thread.run_sync(self.store.find_identity_by_key, public_key)
        if identity is None:
            raise HandshakeRefused("not_enrolled", "this key is not enrolled at the gate")
        if identity.revoked:
            raise HandshakeRefused("revoked", f"identity {identity.name!r} was revoked")
        return identity.name, identity.role


async def run_gate(
    config: Config, *, task_status: trio.TaskStatus[dict[str, Any]] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve the Gate until cancelled; ``started`` gets its endpoints."""
    keys = GateKeys.load(config.data_dir)
    store = StateStore.open(config.state_db_path)
    try:
        watcher = StateWatcher(store)
        pg = PgService.from_config(config, store)
        router = Router()
        llm = LlmService.from_config(config, store)
        inventory = Inventory(
            stale_after_missed=config.gate.daemon_stale_after_missed,
            gone_after_missed=config.gate.daemon_gone_after_missed,
        )
        inventory_service = InventoryService(inventory)
        daemons = DaemonClient(inventory)
        llm.attach_daemons(inventory, daemons)
        server = TunnelServer(
            config.tunnel,
            name=config.gate.name,
            private_key=keys.private_key,
            authenticate=EnrolledEdges(store).authenticate,
            services={
                "forward": ForwardService(config.gate.forward_allow),
                "inventory": inventory_service,
                "pg": pg.serve,
                "pg-cancel": pg.cancel,
                "llm": LlmRelay(router),
            },
        )
        auth = AppAuthenticator(store)
        add_routes(router, server, auth)
        add_daemon_routes(router, inventory, daemons, auth)
        memory = Memory(store)
        add_memory_routes(router, memory, auth, mesh=llm, config=config.gate.memory)
        llm.attach_memory(memory)
        add_llm_routes(router, llm, auth)
        ops = start_ops(
            config, router, auth=auth, server=server, inventory=inventory, llm=llm, store=store
        )
        host, port = parse_hostport(config.gate.tunnel_listen)
        http_host, http_port = parse_hostport(config.gate.http_listen)
        async with trio.open_nursery() as nursery:
            await nursery.start(watcher.run)
            await nursery.start(pg.run)
            await nursery.start(llm.run)
            await nursery.start(inventory_service.sweep_forever)
            await nursery.start(ops.run)
            bound = await nursery.start(server.serve, host, port)
            http_bound = await nursery.start(serve_http, router, http_host, http_port)
            task_status.started(
                {
                    "tunnel": format_hostport(host, bound),
                    "http": f"http://{format_hostport(http_host, http_bound)}",
                    "server": server,
                    "inventory": inventory,
                    "daemons": daemons,
                    "pg": pg,
                    "llm": llm,
                    "metrics": ops.metrics,
                    "scanner": ops.scanner,
                    "watcher": watcher,
                }
            )
    finally:
        store.close()
