"""The Gate role: the tunnel listener with the services edges may open."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import Any, Final

import trio

from qmesh.admission import RENEW_SERVICE, EnrolledEdges
from qmesh.cluster import GateRegistry
from qmesh.cluster.fabric import (
    GATE_INVENTORY_SERVICE,
    GATE_ROLE,
    PEER_SERVICES,
    PeerLinks,
    PeerServices,
    edge_sessions,
)
from qmesh.config import Config, format_hostport, parse_hostport
from qmesh.finops.control import attach_recorder
from qmesh.fleet.api import add_daemon_routes
from qmesh.fleet.daemons import DaemonClient, InventoryService
from qmesh.fleet.discovery import Scanner
from qmesh.fleet.inventory import Inventory
from qmesh.forward.service import ForwardService
from qmesh.identity import GateKeys
from qmesh.lifecycle import on_drain
from qmesh.llm.api import add_llm_routes
from qmesh.llm.relay import LlmRelay
from qmesh.llm.service import LlmService
from qmesh.memory.api import add_routes as add_memory_routes
from qmesh.memory.service import Memory
from qmesh.ops.api import start_ops
from qmesh.ops.sessions import add_routes
from qmesh.pg.service import PgService
from qmesh.state import StateStore
from qmesh.state.watch import StateWatcher
from qmesh.tunnel import TunnelServer
from qmesh.web.auth import AppAuthenticator
from qmesh.web.http import Router
from qmesh.web.native import serve_http
from qmesh.web.oidc import OidcVerifier
from qmesh.web.tls import load_or_create, tls_wanted

log = logging.getLogger(__name__)


SERVICES_BY_ROLE: Final[Mapping[str, frozenset[str]]] = {
    # A MiniGate relays its applications' connections; a Daemon reports its
    # inventory (the Gate opens streams to it, not the other way round).
    "minigate": frozenset({"pg", "pg-cancel", "llm", "forward", RENEW_SERVICE}),
    "daemon": frozenset({"inventory", RENEW_SERVICE}),
    # Another Gate of the cluster follows this one's nodes and runs requests on them.
    GATE_ROLE: PEER_SERVICES,
}
"""The tunnel services each edge role may open at the Gate."""


async def run_gate(
    config: Config, *, task_status: trio.TaskStatus[dict[str, Any]] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve the Gate until cancelled; ``started`` gets its endpoints."""
    keys = GateKeys.load(config.data_dir)
    store = StateStore.open(config.state_location)
    memory_store: StateStore | None = None
    forget_drain: Callable[[], None] | None = None
    try:
        watcher = StateWatcher(store)
        pg = PgService.from_config(config, store)
        router = Router(config.gate.http)
        llm = LlmService.from_config(config, store)
        inventory = Inventory(
            stale_after_missed=config.gate.daemon_stale_after_missed,
            gone_after_missed=config.gate.daemon_gone_after_missed,
        )
        inventory_service = InventoryService(inventory)
        daemons = DaemonClient(inventory)
        llm.attach_daemons(inventory, daemons)
        edges = EnrolledEdges(store, gate_public_key=keys.public_key, gate_name=config.gate.name)
        peers = PeerServices(inventory)
        llm_relay = LlmRelay(router)
        server = TunnelServer(
            config.tunnel,
            name=config.gate.name,
            private_key=keys.private_key,
            authenticate=edges.authenticate,
            services={
                "forward": ForwardService(
                    config.gate.forward_allow, config.gate.forward_allow_edges
                ),
                "inventory": inventory_service,
                "pg": pg.serve,
                "pg-cancel": pg.cancel,
                "llm": llm_relay,
                GATE_INVENTORY_SERVICE: peers.inventory_feed,
                "infer": peers.infer,
                RENEW_SERVICE: edges.renew,
            },
            services_by_role=SERVICES_BY_ROLE,
        )
        watcher.subscribe("revocations", lambda: edges.sweep(server))

        async def reload_gate_keys() -> None:
            # `qmesh keys rotate` wrote new key files and recorded it in the
            # state: new handshakes use the new key (and the old one, for
            # its overlap); live sessions are untouched.
            current, previous = await trio.to_thread.run_sync(_gate_keys, config)
            if current.public_key != edges.gate_public_key:
                log.info("the gate key was rotated: new handshakes use the new one")
            server.set_keys(current.private_key, None if previous is None else (
                previous[0].private_key, previous[1]))  # fmt: skip
            edges.gate_public_key = current.public_key
            edges.previous_gate_public_key = None if previous is None else previous[0].public_key

        await reload_gate_keys()
        watcher.subscribe("gate keys", reload_gate_keys)
        oidc = OidcVerifier(config.gate.oidc) if config.gate.oidc.issuer else None
        auth = AppAuthenticator(store, config.gate.http, oidc=oidc)
        auth.control_audit = llm.ledger.audit
        # Trust the Gate changes itself (an edge joining with a token) is
        # recorded like an operator's change, in the same transaction.
        attach_recorder(store, f"gate:{config.gate.name}", master_key=llm.master_key)
        watcher.subscribe("app keys (http)", auth.refresh)
        watcher.subscribe("app keys (pg)", pg.refresh_apps)
        watcher.subscribe("app policies (llm)", llm.reload_policies)
        add_routes(router, server, auth)
        add_daemon_routes(router, inventory, daemons, auth)
        # On SQLite, memory writes through a connection of its own: under WAL
        # the main connection's readers (handshakes, key checks, vault reads)
        # never wait for an ingest's transaction, and its writers wait only
        # for the SQL of one document (bounded by gate.memory.max_document_bytes).
        # On PostgreSQL the store's pool gives an ingest a connection of its
        # own, and the memory's writer lock is not the other tables'.
        if store.dialect == "sqlite":
            memory_store = StateStore.open(config.state_location)
        memory = Memory(memory_store or store)
        add_memory_routes(router, memory, auth, mesh=llm, config=config.gate.memory)
        llm.attach_memory(memory)
        add_llm_routes(router, llm, auth)
        scanner = Scanner(inventory, config.gate.discovery)
        ops = start_ops(
            config,
            router,
            auth=auth,
            server=server,
            inventory=inventory,
            scanner=scanner,
            llm=llm,
            store=store,
            pg_pools=pg.pools.stats,
            pg_audit=pg.audit,
        )
        host, port = parse_hostport(config.gate.tunnel_listen)
        http_host, http_port = parse_hostport(config.gate.http_listen)
        async with trio.open_nursery() as nursery:
            await nursery.start(watcher.run)
            await nursery.start(pg.run)
            await nursery.start(llm.run)
            await nursery.start(llm_relay.run)
            await nursery.start(inventory_service.sweep_forever)
            await nursery.start(ops.metrics.run)
            await nursery.start(scanner.run)
            nursery.start_soon(edges.expire_forever, server)
            bound = await nursery.start(server.serve, host, port)
            tls = (
                load_or_create(
                    config.data_dir,
                    cert_file=config.gate.http.tls_cert,
                    key_file=config.gate.http.tls_key,
                )
                if tls_wanted(config.gate.http.tls, http_host)
                else None
            )
            http_bound = await nursery.start(
                partial(
                    serve_http,
                    tls=tls,
                    purpose="the Gate's HTTP API",
                ),
                router,
                http_host,
                http_port,
            )
            scheme = "http" if tls is None else "https"
            registry = GateRegistry(
                store,
                config.gate.cluster,
                name=config.gate.name,
                tunnel=format_hostport(host, bound),
                http=f"{scheme}://{format_hostport(http_host, http_bound)}",
                sessions=lambda: edge_sessions(server),
            )
            await nursery.start(registry.run)
            links = PeerLinks(
                store,
                inventory,
                config.tunnel,
                name=config.gate.name,
                private_key=keys.private_key,
                public_key=keys.public_key,
                interval_s=config.gate.cluster.heartbeat_interval_s,
                on_cluster_size=auth.share_limits,
            )
            await nursery.start(links.run)
            pg.ask_other_gates = links.ask_all

            async def drain() -> None:
                await _drain(config, server, auth)

            forget_drain = on_drain(drain)
            nursery.start_soon(_drain_when_asked, registry, drain)
            task_status.started(
                {
                    "tunnel": format_hostport(host, bound),
                    "http": f"{scheme}://{format_hostport(http_host, http_bound)}",
                    "tls_fingerprint": None if tls is None else tls.fingerprint,
                    "server": server,
                    "inventory": inventory,
                    "daemons": daemons,
                    "pg": pg,
                    "llm": llm,
                    "metrics": ops.metrics,
                    "scanner": scanner,
                    "watcher": watcher,
                    "registry": registry,
                    "links": links,
                }
            )
    finally:
        if forget_drain is not None:
            forget_drain()
        if memory_store is not None:
            memory_store.close()
        store.close()


def _gate_keys(config: Config) -> tuple[GateKeys, tuple[GateKeys, float] | None]:
    return GateKeys.load(config.data_dir), GateKeys.previous(config.data_dir)


async def _drain(config: Config, server: TunnelServer, auth: AppAuthenticator) -> None:
    """Take nothing new, send the edges to the other Gates, and let the
    requests in flight at the HTTP API finish (up to ``gate.drain_timeout_s``)."""
    if server.draining:
        return
    server.draining = True  # no new sessions from here on
    sent: list[int] = []

    def send_edges_away(*, between_answers: bool) -> None:
        # Between requests: an answer being sent would be cut by GOAWAY, a
        # request not yet answered is sent again elsewhere by its MiniGate,
        # and an application's idle connection is carried over.
        sent.append(
            server.drain(
                "the gate is draining: use another gate of the cluster",
                between_answers=between_answers,
            )
        )

    with trio.move_on_after(config.gate.drain_timeout_s):
        gap = trio.Event()

        def at_gap() -> None:
            send_edges_away(between_answers=True)
            gap.set()

        auth.when_idle(at_gap)
        await gap.wait()
        auth.draining = True
        log.info("draining: %d edge session(s) sent to other gates", sent[0])
        while auth.requests_in_progress:  # noqa: ASYNC110 - counted by the requests' scopes
            await trio.sleep(0.05)
    if not sent:
        auth.when_idle(None)
        send_edges_away(between_answers=False)
        auth.draining = True
        log.info("draining: no gap between requests in %g s: %d edge session(s) sent away "
                 "with requests in flight", config.gate.drain_timeout_s, sent[0])  # fmt: skip
    log.info("drained (%d request(s) still in progress)", auth.requests_in_progress)


async def _drain_when_asked(registry: GateRegistry, drain: Callable[[], Awaitable[None]]) -> None:
    """``qmesh gates drain NAME``: drain, and keep running (refusing work) until stopped."""
    await registry.drain_requested.wait()
    await drain()
