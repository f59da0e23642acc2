"""Forwarding rules and the Gate's ``forward`` service.

Rules are IP addresses, CIDR blocks or exact host names, with a port; globs
are refused at load. The Gate resolves a name itself, checks every address
it resolved to, and connects only to a checked address. Targets are a real
TCP echo server on 127.0.0.1 (ephemeral port); names the tests make up are
answered by a fake resolver, so no test needs DNS.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import pytest
import trio
from processkit import free_port
from tunnelkit import roundtrip, start_edge, start_gate

from qmesh.config import (
    ConfigError,
    ForwardRule,
    forward_allowed,
    load_config,
    parse_forward_rule,
)
from qmesh.forward.service import ForwardService, resolve_tcp
from qmesh.tunnel import StreamReset, TunnelClient
from qmesh.tunnel.frames import ResetCode

# -- the rule grammar ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.5:6379", ForwardRule("10.0.0.5:6379", 6379, ipaddress.ip_network("10.0.0.5/32"))),
        (
            "10.0.0.0/24:6379",
            ForwardRule("10.0.0.0/24:6379", 6379, ipaddress.ip_network("10.0.0.0/24")),
        ),
        ("[fd00::/8]:5432", ForwardRule("[fd00::/8]:5432", 5432, ipaddress.ip_network("fd00::/8"))),
        ("[fd00::5]:*", ForwardRule("[fd00::5]:*", None, ipaddress.ip_network("fd00::5/128"))),
        ("DB.Internal.:5432", ForwardRule("DB.Internal.:5432", 5432, name="db.internal")),
    ],
)
def test_rule_grammar(text: str, expected: ForwardRule) -> None:
    assert parse_forward_rule(text) == expected


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("10.0.0.*:6379", "wildcards are not allowed"),
        ("*.cache:*", "wildcards are not allowed"),
        ("db?.internal:5432", "wildcards are not allowed"),
        ("10.0.0.5/24:6379", "host bits set"),
        ("fd00::1:80", "needs brackets"),
        ("[10.0.0.1]:80", "only IPv6"),
        ("[::ffff:10.0.0.0/120]:80", "IPv4 form"),
        ("10.0.0:80", "incomplete IP address"),
        ("db.internal", 'missing ":port"'),
        ("db.internal:0", "port must be"),
        ("db.internal:65536", "port must be"),
        ("db..internal:80", "host name"),
    ],
)
def test_bad_rules_are_refused_saying_why(text: str, problem: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_forward_rule(text)
    assert problem in str(info.value)


RULES = ["10.0.0.0/24:6379", "db.internal:5432", "[fd00::/8]:*", "192.0.2.7:*"]


@pytest.mark.parametrize(
    ("host", "port", "allowed"),
    [
        ("10.0.0.1", 6379, True),
        ("10.0.0.255", 6379, True),
        ("10.0.1.1", 6379, False),
        ("10.0.0.1", 6380, False),
        # The text of a name never matches an address rule.
        ("10.0.0.1.evil.example", 6379, False),
        ("::ffff:10.0.0.9", 6379, True),  # the same IPv4 address, mapped
        ("db.internal", 5432, True),
        ("DB.Internal.", 5432, True),
        ("db.internal", 5433, False),
        ("db.internal.evil.example", 5432, False),
        ("evil-db.internal", 5432, False),
        ("fd00::1", 1, True),
        ("fe80::1", 1, False),
        ("192.0.2.7", 65535, True),
        ("192.0.2.7", 0, False),
    ],
)
def test_forward_allowed_compares_addresses_and_exact_names(
    host: str, port: int, allowed: bool
) -> None:
    assert forward_allowed(RULES, host, port) is allowed


def test_config_reads_global_and_per_edge_rules(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        '[gate]\nforward_allow = ["10.0.0.0/24:6379", "[fd00::/8]:5432"]\n'
        "[gate.forward_allow_edges]\n"
        'shop-edge = ["db.internal:5432"]\n'
        "lab-1 = []\n"
    )
    gate = load_config(path, env={}).gate
    assert gate.forward_allow == ("10.0.0.0/24:6379", "[fd00::/8]:5432")
    assert dict(gate.forward_allow_edges) == {"shop-edge": ("db.internal:5432",), "lab-1": ()}


@pytest.mark.parametrize(
    ("toml", "key", "line", "rule"),
    [
        ('[gate]\nforward_allow = ["db:5432", "10.0.0.*:6379"]\n', "gate.forward_allow[1]", 2,
         '"10.0.0.*:6379"'),
        ('[gate]\n[gate.forward_allow_edges]\nedge-a = ["*.internal:5432"]\n',
         "gate.forward_allow_edges.edge-a[0]", 3, '"*.internal:5432"'),
    ],
)  # fmt: skip
def test_config_refuses_a_glob_naming_the_rule(
    tmp_path: Path, toml: str, key: str, line: int, rule: str
) -> None:
    path = tmp_path / "config.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    err = info.value
    assert (err.key, err.line) == (key, line)
    assert rule in err.problem and "wildcards are not allowed" in err.problem
    assert "CIDR block" in err.problem  # says what to write instead


def test_config_refuses_a_bad_edge_name(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[gate.forward_allow_edges]\n"-edge" = ["db:1"]\n')
    with pytest.raises(ConfigError, match="identity name") as info:
        load_config(path, env={})
    assert info.value.key == "gate.forward_allow_edges.-edge"


def test_the_service_refuses_a_glob_too() -> None:
    with pytest.raises(ValueError, match=r"forward_allow: bad forward rule '10\.0\.0\.\*:6379'"):
        ForwardService(["10.0.0.*:6379"])
    with pytest.raises(ValueError, match=r"forward_allow_edges\.e1: bad forward rule"):
        ForwardService([], {"e1": ["*:22"]})


# -- the Gate's forward service -------------------------------------------------------


async def echo_server(nursery: trio.Nursery) -> int:
    """A TCP echo server on 127.0.0.1 (only): its port."""

    async def echo(sock: trio.SocketStream) -> None:
        try:
            while data := await sock.receive_some(65536):
                await sock.send_all(data)
            await sock.send_eof()
        except trio.BrokenResourceError:
            pass
        finally:
            await trio.aclose_forcefully(sock)

    listeners = await nursery.start(partial(trio.serve_tcp, echo, 0, host="127.0.0.1"))
    port: int = listeners[0].socket.getsockname()[1]
    return port


class FakeResolver:
    """Answers for made-up names and records every question: a name that is
    refused without DNS leaves no call here."""

    def __init__(self, answers: dict[str, Sequence[Sequence[str]]]) -> None:
        self.answers = answers
        self.calls: list[str] = []

    async def __call__(self, host: str, port: int) -> Sequence[str]:
        await trio.lowlevel.checkpoint()
        self.calls.append(host)
        replies = self.answers.get(host)
        if not replies:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        # Later questions get later answers: a DNS server that rebinds.
        return replies[min(self.calls.count(host), len(replies)) - 1]


async def forward_ok(edge: TunnelClient, target: str) -> None:
    payload = b"through " + target.encode()
    stream = await edge.open_stream({"service": "forward", "target": target})
    with trio.fail_after(10):
        assert await roundtrip(stream, payload) == payload


async def forward_reset(edge: TunnelClient, target: str) -> StreamReset:
    stream = await edge.open_stream({"service": "forward", "target": target})
    with trio.fail_after(10), pytest.raises(StreamReset) as info:
        await stream.receive_some()
    return info.value


async def test_ip_and_cidr_rules_admit_addresses_and_resolved_names(
    nursery: trio.Nursery,
) -> None:
    port = await echo_server(nursery)
    other = await echo_server(nursery)
    forward = ForwardService([f"127.0.0.0/8:{port}", f"127.0.0.1:{other}"])
    gate = await start_gate(nursery, {"forward": forward})
    edge = await start_edge(nursery, gate, "edge-ip")
    await forward_ok(edge, f"127.0.0.1:{port}")
    await forward_ok(edge, f"[::ffff:127.0.0.1]:{other}")  # checked, and connected, as IPv4
    # A real name, resolved at the Gate: 127.0.0.1 is inside the block (an
    # ::1 it may also resolve to is not, and is dropped).
    await forward_ok(edge, f"localhost:{port}")
    for target in ["10.1.2.3:5432", f"127.0.0.1:{free_port()}"]:
        reset = await forward_reset(edge, target)
        assert reset.code == ResetCode.REFUSED and "not allowed" in reset.reason


async def test_a_name_that_resolves_to_nothing_allowed_is_refused(nursery: trio.Nursery) -> None:
    port = await echo_server(nursery)
    forward = ForwardService([f"10.0.0.0/8:{port}", f"[fd00::/8]:{port}"])
    gate = await start_gate(nursery, {"forward": forward})
    edge = await start_edge(nursery, gate, "edge-n")
    # localhost resolves (to loopback addresses), but to none of the blocks.
    reset = await forward_reset(edge, f"localhost:{port}")
    assert reset.code == ResetCode.REFUSED and "not allowed" in reset.reason


async def test_a_name_rule_admits_exactly_that_name(nursery: trio.Nursery) -> None:
    port = await echo_server(nursery)
    forward = ForwardService([f"localhost:{port}"])
    gate = await start_gate(nursery, {"forward": forward})
    edge = await start_edge(nursery, gate, "edge-name")
    await forward_ok(edge, f"localhost:{port}")
    await forward_ok(edge, f"LocalHost:{port}")
    # The name rule says nothing about addresses, nor about other names.
    for target in [f"127.0.0.1:{port}", f"localhost.evil.example:{port}"]:
        reset = await forward_reset(edge, target)
        assert reset.code == ResetCode.REFUSED


async def test_an_evil_suffix_is_refused_without_dns(nursery: trio.Nursery) -> None:
    """``10.0.0.*:6379`` once admitted ``10.0.0.1.evil.example``. The name is
    refused whatever it resolves to, and when no rule could admit it, without
    asking DNS at all."""
    resolver = FakeResolver({"10.0.0.1.evil.example": [["203.0.113.9"]]})
    forward = ForwardService(["10.0.0.0/24:6379", "db.internal:5432"], resolve=resolver)
    gate = await start_gate(nursery, {"forward": forward})
    edge = await start_edge(nursery, gate, "edge-evil")
    # Only a name rule for 5432, and this is another name: no question asked.
    for target in ["db.internal.evil.example:5432", "10.0.0.1.evil.example:5432"]:
        reset = await forward_reset(edge, target)
        assert reset.code == ResetCode.REFUSED and "not allowed" in reset.reason
    assert resolver.calls == []
    # A network rule for 6379: the name is resolved, and its address is not in it.
    reset = await forward_reset(edge, "10.0.0.1.evil.example:6379")
    assert reset.code == ResetCode.REFUSED
    # A name that does not resolve at all is refused the same way (not
    # "cannot connect", which would tell the edge which names exist).
    reset = await forward_reset(edge, "10.0.0.2.evil.example:6379")
    assert reset.code == ResetCode.REFUSED and "not allowed" in reset.reason
    assert resolver.calls == ["10.0.0.1.evil.example", "10.0.0.2.evil.example"]


async def test_the_gate_connects_to_the_address_it_checked(nursery: trio.Nursery) -> None:
    """No DNS-rebinding window: the name is resolved once; a second answer
    (outside the rules) is never asked for. ``.invalid`` names never resolve
    for real (RFC 6761), so re-resolving through the system would fail."""
    port = await echo_server(nursery)
    resolver = FakeResolver({"rebind.invalid": [["127.0.0.1"], ["192.0.2.66"]]})
    forward = ForwardService([f"127.0.0.1:{port}"], resolve=resolver)
    gate = await start_gate(nursery, {"forward": forward})
    edge = await start_edge(nursery, gate, "edge-rebind")
    await forward_ok(edge, f"rebind.invalid:{port}")
    assert resolver.calls == ["rebind.invalid"]


async def test_a_name_rule_admits_every_address_of_its_name(nursery: trio.Nursery) -> None:
    port = await echo_server(nursery)
    # 127.0.0.2 is loopback too but nothing listens there: refused at once,
    # so the Gate goes on to the next checked address.
    resolver = FakeResolver({"db.invalid": [["127.0.0.2", "127.0.0.1"]]})
    forward = ForwardService([f"db.invalid:{port}", f"gone.invalid:{port}"], resolve=resolver)
    gate = await start_gate(nursery, {"forward": forward})
    edge = await start_edge(nursery, gate, "edge-db")
    await forward_ok(edge, f"db.invalid:{port}")
    # An allowed name that does not resolve is the target's failure, not a refusal.
    reset = await forward_reset(edge, f"gone.invalid:{port}")
    assert reset.code == ResetCode.CONNECT_FAILED and "cannot connect" in reset.reason


async def test_rules_per_edge_add_to_the_global_ones(nursery: trio.Nursery) -> None:
    shared = await echo_server(nursery)
    own = await echo_server(nursery)
    forward = ForwardService([f"127.0.0.1:{shared}"], {"edge-a": [f"127.0.0.1:{own}"]})
    gate = await start_gate(nursery, {"forward": forward})
    edge_a = await start_edge(nursery, gate, "edge-a")
    edge_b = await start_edge(nursery, gate, "edge-b")
    await forward_ok(edge_a, f"127.0.0.1:{shared}")
    await forward_ok(edge_a, f"127.0.0.1:{own}")
    await forward_ok(edge_b, f"127.0.0.1:{shared}")
    reset = await forward_reset(edge_b, f"127.0.0.1:{own}")
    assert reset.code == ResetCode.REFUSED


async def test_resolve_tcp_answers_ip_addresses() -> None:
    assert await resolve_tcp("127.0.0.1", 80) == ["127.0.0.1"]
    addresses = await resolve_tcp("localhost", 80)
    assert addresses and all(ipaddress.ip_address(a).is_loopback for a in addresses)
