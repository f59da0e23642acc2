"""Generic TCP forwarding at the Gate, for services qmesh does not speak natively.

An edge opens a ``forward`` stream naming ``target`` ("host:port"); the Gate
connects there only if its ``forward_allow`` rules admit it (deny by
default), then relays bytes both ways. Rules are IP addresses, CIDR blocks
and exact host names with a port (grammar: :func:`qmesh.config.parse_forward_rule`);
an edge may use the global rules plus its own from ``[gate.forward_allow_edges]``.

How a target is decided, so that what a name *looks like* never decides:

- an IP literal is admitted by a network rule containing it;
- a host name is resolved here, once, and every address it resolves to is
  checked: a name rule spelling that name admits all of them, otherwise each
  address must lie inside a network rule, and the ones that do not are
  dropped. Nothing admitted: refused. The Gate then connects to a checked
  address, never to the name again, so a second answer from DNS (rebinding)
  cannot move the connection elsewhere;
- when no rule could admit the target whatever it resolved to (no rule for
  that port, or only name rules and this is not one of them), it is refused
  without asking DNS at all.

Not for: the MiniGate's listening side (:mod:`qmesh.forward.edge`).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence

import trio

from qmesh.config import (
    ForwardRule,
    format_hostport,
    forward_address,
    normalize_forward_name,
    parse_forward_rule,
    parse_hostport,
)
from qmesh.fastsocket import connect_tcp
from qmesh.tunnel.frames import ResetCode
from qmesh.tunnel.services import splice
from qmesh.tunnel.stream import TunnelStream

__all__ = ["CONNECT_TIMEOUT_S", "ForwardService", "Resolver", "resolve_tcp"]

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0
"""Resolving the target and connecting to it, all addresses together."""

Resolver = Callable[[str, int], Awaitable[Sequence[str]]]
"""``(host, port)`` → the IP addresses to try, in order; OSError if none."""


async def resolve_tcp(host: str, port: int) -> list[str]:
    """The addresses ``host`` resolves to for TCP, in getaddrinfo's order,
    without duplicates (the default :data:`Resolver`)."""
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses: list[str] = []
    for family, _type, _proto, _canonname, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6):
            address = str(sockaddr[0])
            if address not in addresses:
                addresses.append(address)
    return addresses


class _Refused(Exception):
    """The target is not admitted (the edge learns only that)."""


class _Unreachable(Exception):
    """The target is admitted but cannot be reached; the text says why."""


def _parse_rules(rules: Iterable[str], where: str) -> tuple[ForwardRule, ...]:
    parsed: list[ForwardRule] = []
    for text in rules:
        try:
            parsed.append(parse_forward_rule(text))
        except ValueError as exc:
            raise ValueError(f"{where}: bad forward rule {text!r}: {exc}") from None
    return tuple(parsed)


class ForwardService:
    """The ``forward`` service handler.

    ``allow`` holds the rules for every edge, ``per_edge`` more rules by edge
    identity name. Raises ValueError naming a malformed rule (a glob among
    them): the config loader already refuses those, this guards other callers.
    ``resolve`` is for tests.
    """

    def __init__(
        self,
        allow: Sequence[str],
        per_edge: Mapping[str, Sequence[str]] | None = None,
        *,
        resolve: Resolver = resolve_tcp,
    ) -> None:
        self.allow = _parse_rules(allow, "forward_allow")
        self.per_edge = {
            edge: self.allow + _parse_rules(rules, f"forward_allow_edges.{edge}")
            for edge, rules in (per_edge or {}).items()
        }
        self._resolve = resolve

    def rules_for(self, edge: str) -> tuple[ForwardRule, ...]:
        """The rules that apply to ``edge``: global plus its own."""
        return self.per_edge.get(edge, self.allow)

    async def __call__(self, stream: TunnelStream) -> None:
        target = stream.request.get("target")
        peer = stream.session.peer
        try:
            host, port = parse_hostport(str(target))
        except ValueError:
            stream.reset(ResetCode.REFUSED, f"bad forward target {target!r}")
            return
        shown = format_hostport(host, port)
        try:
            with trio.fail_after(CONNECT_TIMEOUT_S):
                addresses = await self._admitted_addresses(peer, host, port)
                upstream = await _connect_first(addresses, port)
        except _Refused as exc:
            log.warning("%s may not forward to %s: %s", peer, shown, exc)
            stream.reset(ResetCode.REFUSED, f"forwarding to {shown} is not allowed")
            return
        except (_Unreachable, trio.TooSlowError) as exc:
            # The details (addresses behind the Gate) go to the log only.
            log.info("forward %s → %s failed: %s", peer, shown, exc or "timed out")
            stream.reset(ResetCode.CONNECT_FAILED, f"cannot connect to {shown}")
            return
        await splice(stream, upstream)

    async def _admitted_addresses(self, edge: str, host: str, port: int) -> list[str]:
        """The addresses of ``host`` that ``edge`` may reach on ``port``, in
        the order to try them. Raises _Refused or _Unreachable."""
        rules = [rule for rule in self.rules_for(edge) if rule.admits_port(port)]
        if not rules:
            raise _Refused("no rule for this port")
        address = forward_address(host)
        if address is not None:
            if not any(rule.admits(host, port) for rule in rules):
                raise _Refused(f"{address} is in no allowed network")
            # The IPv4 form of an IPv4-mapped address: the one that was checked.
            return [str(address) if address.version == 4 else host]
        name = normalize_forward_name(host)
        by_name = any(rule.name == name for rule in rules)
        networks = [rule for rule in rules if rule.network is not None]
        if not by_name and not networks:
            raise _Refused("not a name any rule allows")
        try:
            resolved = list(await self._resolve(host, port))
        except OSError as exc:
            if by_name:
                raise _Unreachable(f"cannot resolve {host}: {exc}") from None
            # Not an allowed name, and nothing it resolves to can be checked:
            # refused like any other, so the edge cannot use the Gate to
            # learn which names exist.
            raise _Refused(f"resolving it failed: {exc}") from None
        if by_name:
            if not resolved:
                raise _Unreachable(f"{host} resolves to no address")
            # A name rule admits whatever its own name resolves to.
            admitted = resolved
        else:
            admitted = [a for a in resolved if any(r.admits(a, port) for r in networks)]
            if len(admitted) < len(resolved):
                dropped = [a for a in resolved if a not in admitted]
                log.info("%s: %s resolves outside the allowed networks too: %s",
                         edge, host, ", ".join(dropped))  # fmt: skip
        if not admitted:
            raise _Refused(f"it resolves to no allowed address ({', '.join(resolved) or 'none'})")
        return admitted


async def _connect_first(addresses: Sequence[str], port: int) -> trio.SocketStream:
    """A connection to the first of ``addresses`` that answers, trying them in
    order (IP literals only: nothing is resolved again). Raises _Unreachable
    with every failure when none does."""
    failures: list[str] = []
    for address in addresses:
        try:
            return await connect_tcp(address, port)
        except OSError as exc:
            failures.append(f"{format_hostport(address, port)}: {exc.strerror or exc}")
    raise _Unreachable("; ".join(failures) or "no address")
