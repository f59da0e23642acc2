"""The Gate's inventory as a state table (time passed in, no sleeping), and
the daemon wire's line decoder."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from qmesh.daemon.wire import LineDecoder, WireError, encode
from qmesh.fleet.daemons import InventoryService
from qmesh.fleet.inventory import Inventory

GEMMA: dict[str, Any] = {
    "id": "gemma-3-270m-q4_k_m", "runtime": "llama.cpp", "state": "available",
    "family": "gemma3", "size_class": "xs", "equivalence": "gemma3:270m",
    "quantization": "Q4_K_M", "parameters": 268098176, "context_length": 32768,
    "chat_template": False, "predicted_tps": 21.5, "path": "/m/gemma.gguf",
}  # fmt: skip


def hello(inventory: Inventory, name: str, now: float, connection: object) -> None:
    inventory.hello(
        name, now=now, kind="daemon", source="tunnel", connection=connection,
        address="box-1", version="qmesh/0.1.0", heartbeat_interval_s=1.0,
    )  # fmt: skip


def test_heartbeats_drive_fresh_stale_gone() -> None:
    inventory = Inventory(stale_after_missed=3, gone_after_missed=10)
    session = object()
    hello(inventory, "node-a", 100.0, session)
    inventory.report("node-a", now=100.0, models=[GEMMA], telemetry={"cpu_only": True})
    node = inventory.get("node-a", now=100.0)
    assert node is not None and node.state == "fresh" and node.first_seen == 100.0

    # (time, heartbeat sent?, expected state)
    steps = [
        (101.0, True, "fresh"), (103.9, False, "fresh"), (104.0, False, "stale"),
        (105.0, True, "fresh"), (114.9, False, "stale"), (115.0, False, "gone"),
        (200.0, False, "gone"), (201.0, True, "fresh"),
    ]  # fmt: skip
    for now, beat, expected in steps:
        if beat:
            inventory.report(
                "node-a", now=now, load={GEMMA["id"]: {"queue_depth": 2, "busy": True}}
            )
        node = inventory.get("node-a", now=now)
        assert node is not None
        assert node.state == expected, (now, node.reason)
    assert node.first_seen == 100.0 and node.last_seen == 201.0
    model = node.models[GEMMA["id"]]
    assert model.queue_depth == 2 and model.busy and model.family == "gemma3"
    assert model.metadata["path"] == "/m/gemma.gguf"


def test_reasons_and_transitions() -> None:
    inventory = Inventory(stale_after_missed=2, gone_after_missed=4)
    hello(inventory, "n", 0.0, object())
    assert inventory.sweep(1.9) == []
    (stale,) = inventory.sweep(2.0)
    assert (stale.old, stale.new) == ("fresh", "stale")
    assert stale.reason == "no heartbeat for 2.0s (2 missed at 1s intervals)"
    (gone,) = inventory.sweep(4.5)
    assert (gone.old, gone.new) == ("stale", "gone") and "4 missed" in gone.reason
    assert inventory.sweep(9.0) == []  # gone stays gone, without repeating itself


def test_session_end_is_gone_at_once_unless_a_newer_one_reported() -> None:
    inventory = Inventory()
    old, new = object(), object()
    hello(inventory, "n", 0.0, old)
    hello(inventory, "n", 5.0, new)  # the daemon restarted: a new session reports
    inventory.disconnected("n", old, now=6.0, reason="session ended")
    node = inventory.get("n", now=6.0)
    assert node is not None and node.state == "fresh" and node.connection is new
    inventory.disconnected("n", new, now=7.0, reason="session ended: goodbye")
    assert node.state == "gone" and node.reason == "session ended: goodbye"
    assert node.connection is None


def test_filters() -> None:
    inventory = Inventory(stale_after_missed=3, gone_after_missed=10)
    for name, at in (("a", 100.0), ("b", 95.0), ("c", 80.0)):
        hello(inventory, name, at, object())
    inventory.report("a", now=100.0, models=[GEMMA])

    def names(**filters: str | None) -> list[str]:
        return [n.name for n in inventory.nodes(now=100.0, **filters)]

    assert names() == ["a", "b", "c"]
    assert names(state="fresh") == ["a"] and names(state="stale") == ["b"]
    assert names(state="gone") == ["c"]
    assert names(model="gemma-3-270m-q4_k_m") == ["a"] and names(model="gemma3:270m") == ["a"]
    assert names(kind="daemon", model="nothing") == []
    assert names(kind="cloud") == []
    node = inventory.nodes(now=100.0, state="fresh")[0]
    data = node.to_json(now=100.0)
    assert data["models"][0]["id"] == GEMMA["id"] and data["address"] == "box-1"
    assert "connection" not in data


def test_thresholds_must_make_sense() -> None:
    with pytest.raises(ValueError):
        Inventory(stale_after_missed=5, gone_after_missed=5)


def test_line_decoder() -> None:
    decoder = LineDecoder(max_line=64)
    wire = encode({"type": "hello", "x": "é"}) + encode({"type": "heartbeat"})
    assert decoder.feed(wire[:5]) == []
    messages = decoder.feed(wire[5:])
    assert [m["type"] for m in messages] == ["hello", "heartbeat"] and messages[0]["x"] == "é"
    assert decoder.feed(b"") == []
    with pytest.raises(WireError, match="longer than 64"):
        LineDecoder(max_line=64).feed(b"x" * 65)
    with pytest.raises(WireError, match="malformed line"):
        LineDecoder().feed(b"{oops\n")
    with pytest.raises(WireError, match="nested too deep"):
        LineDecoder().feed(b"[" * 16_000 + b"\n")
    with pytest.raises(WireError, match="'type'"):
        LineDecoder().feed(b"[1, 2]\n")
    partial = LineDecoder()
    partial.feed(b'{"type": "he')
    with pytest.raises(WireError, match="inside a line"):
        partial.feed(b"")


async def test_a_held_up_gate_does_not_count_its_own_stall_as_silence(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The Gate's process stalls (an overloaded machine) for longer than
    ``gone_after_missed`` heartbeats while the node keeps sending them: they
    wait unread in the socket. Neither a request's sweep on waking (before
    the sweeper has run) nor the sweeper itself may call the node stale or
    gone for it — the router would drop the only node and fail requests."""
    clock = autojump_clock
    inventory = Inventory(stale_after_missed=3, gone_after_missed=8)
    service = InventoryService(inventory, clock=trio.current_time)
    async with trio.open_nursery() as nursery:
        await nursery.start(service.sweep_forever, 0.5)
        hello(inventory, "node-a", clock.current_time(), object())
        await trio.sleep(0.5)  # one on-time sweep
        node = inventory.get("node-a", now=clock.current_time())
        assert node is not None and node.state == "fresh"
        clock.jump(20.0)  # the Gate was held up; nothing ran, nothing was read
        # A request arrives first: the sweeper is overdue, so no verdict yet.
        node = inventory.get("node-a", now=clock.current_time())
        assert node is not None
        assert node.state == "fresh", node.reason
        await trio.sleep(0.01)  # the late sweeper runs: excuses the stall
        assert node.state == "fresh", node.reason
        # The node's own silence still counts: 3 missed heartbeats → stale.
        await trio.sleep(3.0)
        assert node.state == "stale", node.reason
        inventory.report("node-a", now=clock.current_time())
        assert node.state == "fresh"
        nursery.cancel_scope.cancel()
