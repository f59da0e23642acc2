"""The Gate's scanner: probe the configured addresses, keep the inventory current.

For: :func:`targets_from_config` (``[gate.discovery]`` expanded into
addresses: every ``targets`` entry, every address of ``networks`` and
every name in ``hosts`` on each of ``ports`` — nothing else is ever
probed), :func:`probe_target` (one address over real sockets: a
connection per exchange, a connect timeout, a time limit per exchange and
one for the whole address) and :class:`Scanner`, the Gate's service that
scans every ``interval_s`` with at most ``concurrency`` addresses in
flight and records each finding in the :class:`Inventory` as soon as it
has it.

How a finding lands in the inventory, under the address as its name:

- a service (Ollama, llama.cpp, an OpenAI-compatible server, PostgreSQL,
  another qmesh Gate or daemon, any HTTP server) is ``fresh``, with kind,
  version, models and a one-line reason; source ``configured`` when its
  address is listed in ``targets``, ``discovered`` when a sweep of
  ``networks``/``hosts`` found it;
- something that answers but speaks neither HTTP nor PostgreSQL is
  ``unknown`` (fresh: it is there), with what it sent;
- a configured address where nothing accepts is ``absent`` and ``gone``;
  swept addresses where nothing listens are not recorded (a /24 would
  fill the table with nothing);
- a service that stops answering is ``stale`` after one missed scan and
  ``gone`` after ``gone_after_misses``, keeping its last-known models;
- a daemon's health port whose daemon is connected to this Gate is not a
  second entry: the daemon's own entry gets ``extra.health`` instead;
  services that a connected daemon drives (its ``[[daemon.runtime]]``
  URLs) get ``extra.managed_by``.

A slow or hostile address costs at most ``target_timeout_s`` and one of
the ``concurrency`` slots; the rest of the scan goes on beside it.

Not for: what an answer means (:mod:`qmesh.fleet.probes`, sans-IO) or how
the inventory ages entries (:mod:`qmesh.fleet.inventory`).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import math
import platform
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, Final
from urllib.parse import urlsplit

import attrs
import trio

from qmesh.config import DiscoveryConfig, format_hostport, parse_hostport
from qmesh.fastsocket import connect_tcp
from qmesh.fleet.inventory import Inventory
from qmesh.fleet.probes import Exchange, Finding, Outcome, TargetProbe

__all__ = ["Scanner", "Target", "probe_target", "run_exchange", "targets_from_config"]

log = logging.getLogger(__name__)

RECEIVE_SIZE: Final = 65536
CONFIGURED: Final = "configured"
DISCOVERED: Final = "discovered"
_LOOPBACK: Final = frozenset({"127.0.0.1", "::1", "localhost"})


@attrs.frozen
class Target:
    host: str
    port: int
    configured: bool
    """Listed in ``targets``: recorded even when nothing answers."""

    @property
    def address(self) -> str:
        return format_hostport(self.host, self.port)


def targets_from_config(settings: DiscoveryConfig) -> list[Target]:
    """Every address the configuration lists, each once (a ``targets`` entry
    that a network also covers stays ``configured``)."""
    found: dict[tuple[str, int], Target] = {}
    for text in settings.targets:
        host, number = parse_hostport(text)
        found[(host, number)] = Target(host, number, configured=True)
    hosts: list[str] = []
    for block in settings.networks:
        network = ipaddress.ip_network(block)
        # A /31 or /32 (and /127, /128) has no network or broadcast address to skip.
        hosts += [str(a) for a in (network.hosts() if network.num_addresses > 2 else network)]
    hosts += settings.hosts
    for host in hosts:
        for port in settings.ports:
            found.setdefault((host, port), Target(host, port, configured=False))
    return list(found.values())


# -- one address ----------------------------------------------------------------------------


def _refused(exc: BaseException) -> bool:
    if isinstance(exc, ConnectionRefusedError):
        return True
    # trio.open_tcp_stream raises OSError("all attempts … failed") from a
    # group holding each attempt's own error.
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup):
        return all(_refused(e) for e in cause.exceptions)
    return isinstance(exc, OSError) and exc.errno == errno.ECONNREFUSED


async def run_exchange(
    host: str, port: int, exchange: Exchange, *, connect_timeout_s: float, exchange_timeout_s: float
) -> Outcome:
    """One exchange on a fresh connection; never raises for what the peer does."""
    try:
        with trio.fail_after(connect_timeout_s):
            stream = await connect_tcp(host, port)
    except trio.TooSlowError:
        return Outcome.failed("connect_timeout", f"{connect_timeout_s:g}s")
    except OSError as exc:
        if _refused(exc):
            return Outcome.failed("refused")
        first: BaseException = exc
        if isinstance(exc.__cause__, BaseExceptionGroup) and exc.__cause__.exceptions:
            first = exc.__cause__.exceptions[0]
        detail = first.strerror if isinstance(first, OSError) and first.strerror else str(first)
        return Outcome.failed("unreachable", detail)
    try:
        with trio.move_on_after(exchange_timeout_s):
            await stream.send_all(exchange.start())
            while True:
                data = await stream.receive_some(RECEIVE_SIZE)
                outcome = exchange.feed(data)
                if outcome is not None:
                    return outcome
                if not data:  # the exchange should have decided at EOF
                    return Outcome.failed("closed", "closed the connection mid-answer")
        return exchange.timed_out(exchange_timeout_s)
    except (trio.BrokenResourceError, OSError):
        # ECONNRESET and friends, keeping whatever the peer sent first.
        return Outcome.failed("reset", "", exchange.received)
    finally:
        await trio.aclose_forcefully(stream)


async def probe_target(
    target: Target, settings: DiscoveryConfig, *, postgres_first: bool = False
) -> Finding:
    """Everything one address is, within ``settings.target_timeout_s``."""
    probe = TargetProbe(target.address, target.port, postgres_first=postgres_first)
    with trio.move_on_after(settings.target_timeout_s) as budget:
        while (exchange := probe.next_exchange()) is not None:
            outcome = await run_exchange(
                target.host,
                target.port,
                exchange,
                connect_timeout_s=settings.connect_timeout_s,
                exchange_timeout_s=settings.probe_timeout_s,
            )
            probe.feed(outcome)
    return probe.finding(out_of_time=settings.target_timeout_s if budget.cancelled_caught else None)


# -- the service -------------------------------------------------------------------------------


@attrs.define
class ScanReport:
    """One pass over every target."""

    started: float
    finished: float | None = None
    kinds: Counter[str] = attrs.field(factory=Counter)
    slowest_s: float = 0.0
    slowest: str | None = None

    @property
    def duration_s(self) -> float | None:
        return None if self.finished is None else self.finished - self.started

    def to_json(self) -> dict[str, Any]:
        return {
            "started": self.started,
            "finished": self.finished,
            "duration_s": None if self.duration_s is None else round(self.duration_s, 3),
            "kinds": dict(sorted(self.kinds.items())),
            "slowest": self.slowest,
            "slowest_s": round(self.slowest_s, 3),
        }


class Scanner:
    """Scans the configured addresses periodically; see the module docstring."""

    def __init__(
        self,
        inventory: Inventory,
        settings: DiscoveryConfig,
        *,
        clock: Callable[[], float] = time.time,
        hostname: str | None = None,
    ) -> None:
        self.inventory = inventory
        self.settings = settings
        self.clock = clock
        self.hostname = hostname or platform.node()
        self.targets = targets_from_config(settings)
        self.scans = 0
        self.last: ScanReport | None = None
        self.current: ScanReport | None = None
        self.next_scan_at: float | None = None
        self._misses: dict[str, int] = {}
        self._postgres: set[str] = set()
        self._warned: set[str] = set()
        self._wake = trio.Event()
        self._done = trio.Event()
        # How long an entry may go without a scan before the inventory's
        # own sweep ages it: a period plus the longest a scan can take.
        waves = math.ceil(len(self.targets) / settings.concurrency) if self.targets else 0
        self.period_s = settings.interval_s + waves * settings.target_timeout_s

    # -- running --------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Scan now, then every ``interval_s`` after the previous scan ends
        (sooner when :meth:`scan_soon` asks), until cancelled."""
        task_status.started()
        if not self.targets:
            return
        log.info(
            "discovery: %d address(es), every %gs, %d at a time",
            len(self.targets),
            self.settings.interval_s,
            self.settings.concurrency,
        )
        while True:
            await self.scan_once()
            self.next_scan_at = self.clock() + self.settings.interval_s
            with trio.move_on_after(self.settings.interval_s):
                await self._wake.wait()
            self._wake = trio.Event()

    def scan_soon(self) -> None:
        self._wake.set()

    async def scan_now(self) -> ScanReport | None:
        """Ask for a scan and wait until one that started after this call ends."""
        if not self.targets:
            return None
        wanted = self.scans + (2 if self.current is not None else 1)
        while self.scans < wanted:
            done = self._done
            self.scan_soon()
            await done.wait()
        return self.last

    async def scan_once(self) -> ScanReport:
        report = ScanReport(started=self.clock())
        self.current = report
        managers = self._managers()
        limiter = trio.CapacityLimiter(self.settings.concurrency)
        try:
            async with trio.open_nursery() as nursery:
                for target in self.targets:
                    nursery.start_soon(self._scan_target, target, limiter, report, managers)
        finally:
            self.current = None
        report.finished = self.clock()
        self.last = report
        self.scans += 1
        self._done.set()
        self._done = trio.Event()
        log.info(
            "discovery: scan %d took %.2fs: %s",
            self.scans,
            report.duration_s,
            ", ".join(f"{n} {k}" for k, n in sorted(report.kinds.items())) or "nothing",
        )
        return report

    async def _scan_target(
        self,
        target: Target,
        limiter: trio.CapacityLimiter,
        report: ScanReport,
        managers: dict[str, str],
    ) -> None:
        async with limiter:
            started = time.monotonic()
            finding = await probe_target(
                target, self.settings, postgres_first=target.address in self._postgres
            )
            took = time.monotonic() - started
        if took > report.slowest_s:
            report.slowest_s, report.slowest = took, target.address
        report.kinds[finding.kind] += 1
        self.apply(target, finding, took_s=took, managed_by=managers.get(target.address))

    # -- findings → inventory ------------------------------------------------------------------

    def apply(
        self,
        target: Target,
        finding: Finding,
        *,
        took_s: float = 0.0,
        managed_by: str | None = None,
    ) -> None:
        """Record ``finding`` for ``target`` (see the module docstring)."""
        now = self.clock()
        name = target.address
        if finding.kind == "postgres":
            self._postgres.add(name)
        else:
            self._postgres.discard(name)
        if finding.kind == "qmesh-daemon" and self._merge_daemon(name, finding, now):
            return
        existing = self.inventory.get(name, now=now)
        if not finding.alive:
            if existing is not None and existing.kind != "absent":
                misses = self._misses.get(name, 0) + 1
                self._misses[name] = misses
                self.inventory.missed(
                    name,
                    now=now,
                    gone=misses >= self.settings.gone_after_misses,
                    reason=f"{finding.reason} ({misses} scan(s) in a row)",
                )
                return
            if not target.configured:
                if finding.reason.startswith("unreachable") and target.host not in self._warned:
                    # A host name that does not resolve is the operator's typo
                    # more often than a machine that is off: say it once.
                    self._warned.add(target.host)
                    log.warning("discovery: %s: %s", target.host, finding.reason)
                return
        self._misses.pop(name, None)
        extra: dict[str, Any] = {
            "server": finding.server,
            "probe_ms": round(took_s * 1000, 1),
            "last_checked": now,
            **({"managed_by": managed_by} if managed_by else {}),
            **{k: v for k, v in finding.details.items() if v is not None},
        }
        self.inventory.observe(
            name,
            now=now,
            kind=finding.kind,
            source=CONFIGURED if target.configured else DISCOVERED,
            address=name,
            reason=finding.reason,
            interval_s=self.period_s,
            version=finding.version,
            models=list(finding.models) if finding.is_service else [],
            extra=extra,
            telemetry=finding.telemetry,
            answered=finding.alive,
        )

    def _merge_daemon(self, address: str, finding: Finding, now: float) -> bool:
        """A daemon connected to this Gate found at its health port: note the
        port on its own entry instead of adding a second one."""
        node_name = finding.details.get("node")
        if not isinstance(node_name, str):
            return False
        node = self.inventory.get(node_name, now=now)
        if node is None or node.kind != "daemon" or node.connection is None:
            return False
        node.extra["health"] = {"address": address, "checked": now, "reason": finding.reason}
        if self.inventory.get(address, now=now) is not None:
            self.inventory.forget(address)
        return True

    def _managers(self) -> dict[str, str]:
        """Address → name of the connected daemon that drives the server there."""
        out: dict[str, str] = {}
        for node in self.inventory.nodes(now=self.clock(), kind="daemon"):
            on_this_host = node.address in (self.hostname, *_LOOPBACK)
            for runtime in node.runtimes:
                url = runtime.get("url")
                if isinstance(url, str):
                    parts = urlsplit(url)
                    if parts.hostname and parts.port:
                        host = parts.hostname
                        if host in _LOOPBACK and not on_this_host:
                            continue  # the daemon's loopback is not ours
                        out[format_hostport(host, parts.port)] = node.name
                for server in runtime.get("servers") or ():
                    port = server.get("port") if isinstance(server, dict) else None
                    if on_this_host and isinstance(port, int):
                        out[format_hostport("127.0.0.1", port)] = node.name
        return out

    # -- views -------------------------------------------------------------------------------------

    def view(self) -> dict[str, Any]:
        return {
            "enabled": bool(self.targets),
            "targets": len(self.targets),
            "configured": sum(1 for t in self.targets if t.configured),
            "interval_s": self.settings.interval_s,
            "concurrency": self.settings.concurrency,
            "timeouts_s": {
                "connect": self.settings.connect_timeout_s,
                "probe": self.settings.probe_timeout_s,
                "target": self.settings.target_timeout_s,
            },
            "scans": self.scans,
            "scanning": self.current is not None,
            "last": None if self.last is None else self.last.to_json(),
            "next_scan_at": self.next_scan_at,
        }
