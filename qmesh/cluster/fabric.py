"""One fabric across the Gates: a request at any Gate can use any daemon.

A daemon attaches to one Gate (the one its tunnel reached). The other Gates
reach it through that Gate, over the same sealed tunnel the edges use:
every Gate keeps one tunnel session to every other live Gate of the
registry (:class:`PeerLinks`), authenticated by the identity key all Gates
of a cluster share, with the role ``gate``. Over it a Gate

- follows the other's **inventory**: the ``gate-inventory`` stream carries
  the other Gate's own nodes (never the ones it learnt from a third Gate:
  a node is one hop away at most) as a snapshot a second, one line per node
  and an ``end`` line naming them all. They enter this Gate's inventory
  with ``gate`` set to where they are attached, so the router, ``qmesh
  inventory`` and the dashboard show the whole cluster; a node left out of
  a snapshot, or whose Gate's session ends, is gone here too;
- passes on a **cancel request** whose key it did not mint (``pg-cancel``),
  naming the edge: the Gate that minted the key for that edge acts on it;
- runs **inference** on them: the router's daemon call opens its ``infer``
  stream on the peer session instead of a daemon's, naming the node, and
  the other Gate (:class:`PeerServices`) splices it to that node's own
  ``infer`` stream. The request and the answer's lines pass through
  unchanged, so the daemon backend, its errors and its cancellation work as
  for a local node.

Why Gates forward rather than daemons connecting to every Gate: a daemon
keeps one session (its load, its queue and its telemetry have one
reader), a Gate joining or leaving the cluster changes nothing on the
daemons, and the peer sessions are N×(N−1) for N Gates, not daemons × N.
The cost is one more hop on a remote node's requests (``bench/cluster.py``).

Not for: choosing among nodes (the router, :mod:`qmesh.llm`), operator
control of a remote node (``qmesh models stop`` goes through the Gate the
node is attached to), or the registry itself (:mod:`qmesh.cluster.registry`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Final

import trio

from qmesh.cluster.registry import list_gates
from qmesh.config import TunnelConfig, parse_hostport
from qmesh.daemon.wire import INFER_SERVICE, LineDecoder, WireError, encode
from qmesh.fleet.inventory import Inventory, Node
from qmesh.state import DATABASE_ERRORS, StateError, StateStore
from qmesh.tunnel import TunnelClient, TunnelError, TunnelServer, TunnelStream
from qmesh.tunnel.frames import ResetCode
from qmesh.tunnel.services import splice
from qmesh.tunnel.session import Session

__all__ = [
    "GATE_INVENTORY_SERVICE",
    "GATE_ROLE",
    "PEER_SERVICES",
    "PeerLinks",
    "PeerServices",
    "edge_sessions",
]

log = logging.getLogger(__name__)

GATE_ROLE: Final = "gate"
"""The tunnel role of a Gate connected to another Gate."""
GATE_INVENTORY_SERVICE: Final = "gate-inventory"
PEER_SERVICES: Final = frozenset({GATE_INVENTORY_SERVICE, INFER_SERVICE, "pg-cancel"})
"""The tunnel services a Gate opens at another Gate."""
ASK_TIMEOUT_S: Final = 5.0
"""How long a request to every other Gate (a cancel) may take in all."""
SNAPSHOT_INTERVAL_S: Final = 1.0
"""How often a Gate sends its own nodes to the others; a remote node is
stale here after missing as many snapshots as a daemon may miss heartbeats."""
REFUSED_RETRY_S: Final = 5.0
"""A Gate that refused this one's handshake is asked again after this long."""
MAX_NODES: Final = 10_000
"""Nodes one snapshot carries at most (a peer's further lines are ignored)."""


def edge_sessions(server: TunnelServer) -> int:
    """The tunnel sessions of edges (MiniGates, daemons), not of other Gates."""
    return sum(1 for s in server.sessions.values() if s.peer_role != GATE_ROLE)


def remote(node: Node) -> bool:
    """Whether ``node`` is attached to another Gate."""
    return node.gate is not None


# -- the Gate the node is attached to ---------------------------------------------------


class PeerServices:
    """What this Gate serves to the other Gates of its cluster."""

    def __init__(self, inventory: Inventory, *, clock: Callable[[], float] = time.time) -> None:
        self.inventory = inventory
        self.clock = clock

    async def inventory_feed(self, stream: TunnelStream) -> None:
        """This Gate's own nodes, a snapshot every SNAPSHOT_INTERVAL_S."""
        try:
            while True:
                nodes = [
                    n for n in self.inventory.nodes(now=self.clock())
                    if not remote(n) and n.state != "gone" and isinstance(n.connection, Session)
                ][:MAX_NODES]  # fmt: skip
                lines = [encode({"type": "node", **_node_report(n)}) for n in nodes]
                lines.append(encode({"type": "end", "nodes": [n.name for n in nodes]}))
                await stream.send_all(b"".join(lines))
                await trio.sleep(SNAPSHOT_INTERVAL_S)
        except (TunnelError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.debug("inventory feed to %s ended: %s", stream.session.peer, exc)
        finally:
            await trio.aclose_forcefully(stream)

    async def infer(self, stream: TunnelStream) -> None:
        """Splice another Gate's ``infer`` stream to the named node of this Gate."""
        name = stream.request.get("node")
        model = stream.request.get("model")
        node = self.inventory.get(name, now=self.clock()) if isinstance(name, str) else None
        session = None if node is None or remote(node) else node.connection
        if not isinstance(session, Session) or session.lost or not isinstance(model, str):
            stream.reset(ResetCode.CONNECT_FAILED, f"no node {str(name)[:64]!r} attached here")
            return
        try:
            daemon = session.open_stream({"service": INFER_SERVICE, "model": model})
        except TunnelError as exc:
            stream.reset(ResetCode.CONNECT_FAILED, f"node {name}: {exc}")
            return
        await splice(stream, daemon)


def _node_report(node: Node) -> dict[str, Any]:
    return {
        "name": node.name,
        "kind": node.kind,
        "address": node.address,
        "version": node.version,
        "extra": node.extra,
        "models": [
            {
                **m.metadata,
                "state": m.state,
                "stopped": m.stopped,
                "queue_depth": m.queue_depth,
                "active": m.active,
                "busy": m.busy,
            }
            for m in node.models.values()
        ],
        "telemetry": node.telemetry,
        "runtimes": node.runtimes,
    }


# -- every other Gate -------------------------------------------------------------------


class PeerLinks:
    """This Gate's sessions to the other live Gates, and their nodes in its inventory."""

    def __init__(
        self,
        store: StateStore,
        inventory: Inventory,
        settings: TunnelConfig,
        *,
        name: str,
        private_key: bytes,
        public_key: bytes,
        interval_s: float,
        on_cluster_size: Callable[[int], None] = lambda gates: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.on_cluster_size = on_cluster_size
        """Told how many Gates are live (this one included) after each look
        at the registry: limits kept per Gate take their share."""
        self.inventory = inventory
        self.settings = settings
        self.name = name
        self._private_key = private_key
        self._public_key = public_key
        self.interval_s = interval_s
        self.clock = clock
        self.links: dict[str, tuple[str, trio.CancelScope]] = {}
        """Peer Gate name → (its tunnel address, the scope its link runs in)."""
        self.clients: dict[str, TunnelClient] = {}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Follow the registry: a link to each live Gate, none to the others."""
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                try:
                    gates = await trio.to_thread.run_sync(list_gates, self.store)
                except (StateError, *DATABASE_ERRORS) as exc:
                    log.warning("cannot read the Gate registry: %s", exc)
                else:
                    now = self.clock()
                    live = {
                        g.name: g.tunnel
                        for g in gates
                        # A draining Gate still serves its own nodes: keep its link.
                        if g.name != self.name and g.state(now) in ("live", "draining")
                    }
                    self.on_cluster_size(1 + len(live))
                    for peer, (address, scope) in list(self.links.items()):
                        if live.get(peer) != address:
                            scope.cancel()
                            del self.links[peer]
                    for peer, address in live.items():
                        if peer not in self.links:
                            scope = trio.CancelScope()
                            self.links[peer] = (address, scope)
                            nursery.start_soon(self._link, peer, address, scope)
                await trio.sleep(self.interval_s)

    async def _link(self, peer: str, address: str, scope: trio.CancelScope) -> None:
        """Stay linked to ``peer`` until ``scope`` is cancelled (it left the
        registry). A refused handshake (a Gate with another key: not of this
        cluster) is retried after a pause, and never ends this Gate."""
        with scope:
            log.info("linking to gate %s at %s", peer, address)
            try:
                while True:
                    client = TunnelClient(
                        self.settings,
                        name=f"gate:{self.name}",
                        role=GATE_ROLE,
                        private_key=self._private_key,
                        gate_public_key=self._public_key,
                        gate_addresses=[parse_hostport(address)],
                    )
                    try:
                        async with trio.open_nursery() as nursery:
                            await nursery.start(client.run)
                            self.clients[peer] = client
                            while True:
                                await self._follow(peer, client)
                                await trio.sleep(self.settings.reconnect_initial_s)
                    except* TunnelError as group:
                        log.warning("link to gate %s refused: %s; retrying in %gs",
                                    peer, group.exceptions[0], REFUSED_RETRY_S)  # fmt: skip
                    self.clients.pop(peer, None)
                    self._drop(peer, set(), f"gate {peer} refused this one")
                    await trio.sleep(REFUSED_RETRY_S)
            finally:
                self.clients.pop(peer, None)
                self._drop(peer, set(), f"gate {peer} left the cluster")

    async def _follow(self, peer: str, client: TunnelClient) -> None:
        """Apply ``peer``'s snapshots until its feed ends."""
        stream = await client.open_stream({"service": GATE_INVENTORY_SERVICE})
        session = stream.session
        decoder = LineDecoder()
        seen: dict[str, dict[str, Any]] = {}
        try:
            while data := await stream.receive_some():
                for message in decoder.feed(data):
                    if message.get("type") == "node" and len(seen) < MAX_NODES:
                        name = message.get("name")
                        if isinstance(name, str) and name:
                            seen[name] = message
                    elif message.get("type") == "end":
                        self._apply(peer, session, seen)
                        seen = {}
        except WireError as exc:
            log.warning("bad inventory from gate %s: %s", peer, exc)
        except (TunnelError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.info("inventory from gate %s ended: %s", peer, exc)
        finally:
            await trio.aclose_forcefully(stream)
            self._drop(peer, set(), f"gate {peer}'s session ended")

    def _apply(self, peer: str, session: object, reports: dict[str, dict[str, Any]]) -> None:
        now = self.clock()
        for name, report in reports.items():
            node = self.inventory.get(name, now=now)
            if node is not None and not remote(node) and node.state != "gone":
                continue  # attached here: this Gate's own report wins
            if node is None or node.connection is not session:
                self.inventory.hello(
                    name,
                    now=now,
                    kind=str(report.get("kind") or "daemon"),
                    source="gate",
                    connection=session,
                    address=_text(report.get("address")),
                    version=_text(report.get("version")),
                    heartbeat_interval_s=SNAPSHOT_INTERVAL_S,
                    extra=report.get("extra") if isinstance(report.get("extra"), dict) else None,
                    gate=peer,
                )
            models, telemetry = report.get("models"), report.get("telemetry")
            runtimes = report.get("runtimes")
            self.inventory.report(
                name,
                now=now,
                models=[m for m in models if isinstance(m, dict)]
                if isinstance(models, list)
                else [],
                telemetry=telemetry if isinstance(telemetry, dict) else None,
                runtimes=[r for r in runtimes if isinstance(r, dict)]
                if isinstance(runtimes, list)
                else [],
            )
        self._drop(peer, set(reports), f"no longer attached to gate {peer}")

    async def ask_all(self, request: dict[str, Any]) -> None:
        """Open ``request`` at every linked Gate at once and wait for each to
        close it (a cancel request: the Gate that minted the key acts)."""

        async def ask(peer: str, client: TunnelClient) -> None:
            try:
                stream = await client.open_stream(request)
                try:
                    await stream.send_eof()
                    while await stream.receive_some():
                        pass
                finally:
                    await trio.aclose_forcefully(stream)
            except (TunnelError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                log.info("gate %s did not take a %s request: %s", peer, request["service"], exc)

        with trio.move_on_after(ASK_TIMEOUT_S):
            async with trio.open_nursery() as nursery:
                for peer, client in list(self.clients.items()):
                    if client.session is not None and not client.session.lost:
                        nursery.start_soon(ask, peer, client)

    def _drop(self, peer: str, keep: set[str], reason: str) -> None:
        """``peer``'s nodes not in ``keep`` are gone here."""
        now = self.clock()
        for node in self.inventory.nodes(now=now):
            if node.gate == peer and node.name not in keep:
                self.inventory.disconnected(node.name, node.connection, now=now, reason=reason)


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None
