"""Runs one or more roles in one Trio nursery (``qmesh --role``, ``qmesh up``).

When the Gate runs in the same process as edges, the edges connect to the
port the Gate actually bound, so ``--ephemeral`` works for all three roles.

Not for: the command line around it (:mod:`qmesh.cli.roles`). This module
imports every role's package, so the CLI imports it only to run roles.
"""

from __future__ import annotations

import gc
import logging
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Final

import trio

from qmesh import _core
from qmesh.config import Config, ConfigError, parse_hostport
from qmesh.fastsocket import raise_open_file_limit
from qmesh.lifecycle import drain
from qmesh.roles import ROLES

log = logging.getLogger(__name__)

SWITCH_INTERVAL_S: Final = 0.0005
"""How long a thread running Python may keep the GIL when another wants it."""
EVENT_LOOP_SLICE_S: Final = 0.0001
"""The time slice the event loop's thread asks the kernel for (its least)."""


class RoleFailed(Exception):
    """A role stopped on an error that the operator has to fix (bad config,
    missing keys, a refused credential, a port in use)."""


async def run_roles(
    config: Config,
    roles: Sequence[str],
    *,
    task_status: trio.TaskStatus[dict[str, dict[str, Any]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Start ``roles`` (gate first) and run them until cancelled.

    ``task_status.started`` receives each role's endpoints once all listen.
    """
    from qmesh.daemon.role import run_daemon
    from qmesh.gate.role import run_gate
    from qmesh.minigate.role import run_minigate

    unknown = [r for r in roles if r not in ROLES]
    if unknown or not roles:
        raise ConfigError(f"unknown role {unknown[0] if unknown else ''!r}; choose from {ROLES}")
    # A descriptor per connection, session and relayed stream: the soft
    # limit (often 1,024) would cap a Gate long before memory does.
    before, after = raise_open_file_limit()
    if after != before:
        log.info("open files: soft limit raised from %d to %d", before, after)
    endpoints: dict[str, dict[str, Any]] = {}
    try:
        async with trio.open_nursery() as nursery:
            gate_address: tuple[str, int] | None = None
            if "gate" in roles:
                endpoints["gate"] = await nursery.start(run_gate, config)
                gate_address = parse_hostport(endpoints["gate"]["tunnel"])
            if "minigate" in roles:
                endpoints["minigate"] = await nursery.start(
                    lambda task_status: run_minigate(
                        config, gate_address=gate_address, task_status=task_status
                    )
                )
            if "daemon" in roles:
                endpoints["daemon"] = await nursery.start(
                    lambda task_status: run_daemon(
                        config, gate_address=gate_address, task_status=task_status
                    )
                )
            # What the roles built at start (skills' tables, the state's
            # caches, the config) lives as long as the process: out of the
            # collector's reach, a full collection no longer walks it and
            # pauses every connection for tens of milliseconds. A request
            # allocates many short-lived objects, nearly all freed by
            # reference counting: the youngest generation is collected every
            # 50,000 allocations rather than every 700 (measured with
            # bench/gateway.py: at 1,000 req/s offered, added p99 37-120 ms
            # before, 7-10 ms after).
            gc.freeze()
            gc.set_threshold(50_000, 20, 20)
            # A worker thread running Python (the ledger's writer hashing
            # its chain, a skill) keeps the GIL for up to the switch
            # interval, and every request on the event loop waits behind
            # it: 5 ms by default, 0.5 ms here.
            sys.setswitchinterval(SWITCH_INTERVAL_S)
            _shorten_time_slice()
            _core.set_engine_poll(config.tunnel.engine_poll_us / 1e6)
            task_status.started(endpoints)
    except BaseExceptionGroup as group:
        operator_errors = _operator_errors(group)
        if operator_errors:
            raise RoleFailed("; ".join(operator_errors)) from None
        raise


def _shorten_time_slice() -> None:
    """The event loop's thread serves requests (an inline HTTP engine runs on
    it); worker threads do bulk work (an audit or ledger batch into SQLite,
    a skill). Woken by a request while such a thread runs, the loop waits
    out that thread's time slice, 1.5 ms or more on Linux's fair scheduler
    (6.12 on), unless its own slice is shorter. With a slice of 0.1 ms it
    preempts at once (``bench/gateway.py``, the Gate on one core, two paired
    runs: wrk's p99 at 1 connection 1.20–1.32 ms before, 0.69–0.95 after;
    at 64 connections 5.65–5.80 before, 4.82–4.93 after)."""
    try:
        took = _core.request_time_slice(EVENT_LOOP_SLICE_S)
    except OSError as exc:
        log.debug("event loop's time slice: the kernel refused: %s", exc)
        return
    log.debug("event loop's time slice: %s", "0.1 ms" if took else "the kernel's own")


async def _cancel_on_next(signals: AsyncIterator[int], scope: trio.CancelScope) -> None:
    async for _ in signals:
        scope.cancel()
        return


def run_until_stopped(main: Callable[[], Awaitable[object]]) -> None:
    """``trio.run(main)`` until it returns or the operator stops it.

    SIGTERM (systemd's stop) first drains what registered a drain
    (:mod:`qmesh.lifecycle`), then cancels everything in order, so edges say
    GOAWAY and listeners close; Ctrl-C cancels at once. Neither is an error.
    Other errors propagate.
    """

    async def supervise() -> None:
        with trio.open_signal_receiver(signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:

                async def run_main() -> None:
                    await main()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(run_main)
                async for _ in signals:
                    # Drain first (a Gate sends its edges elsewhere and lets
                    # requests in flight finish); a second SIGTERM ends it now.
                    with trio.CancelScope() as draining:
                        nursery.start_soon(_cancel_on_next, signals, draining)
                        await drain()
                    nursery.cancel_scope.cancel()
                    break

    try:
        trio.run(supervise)
    except KeyboardInterrupt:
        pass
    except BaseExceptionGroup as group:
        _interrupt, rest = group.split(KeyboardInterrupt)
        if rest is not None:
            # One failure (a role that could not start, wrapped by each
            # nursery it crossed) is raised as itself, so callers can catch it.
            leaves = _leaves(rest)
            if len(leaves) == 1:
                raise leaves[0] from None
            raise rest from None


def _leaves(error: BaseException) -> list[BaseException]:
    """The exceptions inside ``error``'s groups, however deeply nested."""
    if not isinstance(error, BaseExceptionGroup):
        return [error]
    return [leaf for inner in error.exceptions for leaf in _leaves(inner)]


def _operator_errors(group: BaseExceptionGroup[Any]) -> list[str]:
    """Messages of the leaf errors an operator can act on, or [] if any leaf
    is something else (a bug must keep its traceback)."""
    from qmesh.identity import IdentityError
    from qmesh.state import StateError
    from qmesh.tunnel import HandshakeRefused

    fixable = (ConfigError, IdentityError, StateError, HandshakeRefused, OSError)
    matched, rest = group.split(fixable)
    if matched is None or rest is not None:
        return []
    return [str(leaf) for leaf in _leaves(matched)]
