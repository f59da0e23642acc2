"""The relay's TCP stream: same contract as trio.SocketStream, over real sockets."""

from __future__ import annotations

import socket
import stat
import struct
from pathlib import Path

import pytest
import trio

from qmesh.fastsocket import (
    FastSocketStream,
    ListenError,
    connect_tcp,
    fast,
    runnable_counter,
    unix_listener,
)


async def connected_pair() -> tuple[FastSocketStream, trio.SocketStream]:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = await trio.open_tcp_stream("127.0.0.1", listener.getsockname()[1])
    accepted, _ = await listener.accept()
    listener.close()
    return FastSocketStream(client), trio.SocketStream(accepted)


async def test_bytes_both_ways_half_close_and_eof() -> None:
    ours, theirs = await connected_pair()
    payload = bytes(range(256)) * 20_000  # 5 MB: many partial writes
    received = bytearray()

    async def read_all() -> None:
        while data := await theirs.receive_some(65536):
            received.extend(data)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_all)
        await ours.send_all(payload)
        await ours.send_eof()
    assert received == payload
    await theirs.send_all(b"reply")
    await theirs.send_eof()
    assert await ours.receive_some() == b"reply"
    assert await ours.receive_some() == b""
    await ours.aclose()
    await theirs.aclose()


async def test_closed_and_reset_sockets_raise_trio_errors() -> None:
    ours, theirs = await connected_pair()
    await ours.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await ours.receive_some()
    with pytest.raises(trio.ClosedResourceError):
        await ours.send_all(b"x")
    await theirs.aclose()

    ours, theirs = await connected_pair()
    # An abortive close (RST) from the peer.
    theirs.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await theirs.aclose()
    with pytest.raises(trio.BrokenResourceError):
        await ours.receive_some()
    await ours.aclose()


async def test_a_stream_that_never_blocks_still_lets_other_tasks_run() -> None:
    ours, theirs = await connected_pair()
    await theirs.send_all(b"y" * 1000)  # fits the socket buffers: every read is immediate
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        await trio.lowlevel.checkpoint()
        ticks_before = ticks
        for _ in range(200):  # each read completes at once
            await ours.receive_some(1)
        assert ticks - ticks_before >= 200 // 16 - 1
        nursery.cancel_scope.cancel()
    await ours.aclose()
    await theirs.aclose()


async def test_cancellation_is_noticed_even_when_calls_complete_at_once() -> None:
    ours, theirs = await connected_pair()
    await theirs.send_all(b"y" * 1000)
    with trio.CancelScope() as scope:
        scope.cancel()
        await ours.receive_some(1)
        pytest.fail("a cancelled receive completed")
    assert scope.cancelled_caught
    await ours.aclose()
    await theirs.aclose()


async def test_fast_wraps_only_plain_tcp_streams() -> None:
    ours, theirs = await connected_pair()
    assert isinstance(fast(theirs), FastSocketStream)
    memory, _ = trio.testing.memory_stream_pair()
    assert fast(memory) is memory
    assert fast(ours) is ours
    await ours.aclose()
    await theirs.aclose()


async def test_runnable_counter_sees_tasks_ready_to_run() -> None:
    count = runnable_counter()
    assert count() == 0
    event = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(event.wait)
        assert count() == 1  # started, not yet run
        await trio.testing.wait_all_tasks_blocked()
        assert count() == 0  # parked on the event
        event.set()
        assert count() == 1


async def test_connect_tcp_to_literals_and_names() -> None:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    port = listener.getsockname()[1]
    for host in ("127.0.0.1", "localhost"):
        stream = await connect_tcp(host, port)
        accepted, _ = await listener.accept()
        await stream.send_all(b"ping")
        assert await accepted.recv(4) == b"ping"
        accepted.close()
        await stream.aclose()
    listener.close()
    with pytest.raises(OSError):
        await connect_tcp("127.0.0.1", port)  # nobody listens any more


async def test_a_unix_listener_serves_its_socket_file_and_removes_it(tmp_path: Path) -> None:
    path = tmp_path / ".s.PGSQL.5432"
    with unix_listener(path, mode=0o770, purpose="the test") as listener:
        assert stat.S_ISSOCK(path.lstat().st_mode)
        assert stat.S_IMODE(path.lstat().st_mode) == 0o770
        client = await trio.open_unix_socket(str(path))
        accepted = await listener.accept()
        await client.send_all(b"hello")
        assert await accepted.receive_some() == b"hello"
        await client.aclose()
        await accepted.aclose()
    assert not path.exists(), "the socket file outlived its listener"


async def test_a_dead_processs_socket_file_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # the file stays, and nothing listens on it
    with unix_listener(path, mode=0o777, purpose="the test") as listener:
        client = await trio.open_unix_socket(str(path))
        await (await listener.accept()).aclose()
        await client.aclose()


async def test_a_unix_listener_leaves_what_is_not_its_own_alone(tmp_path: Path) -> None:
    # Something listening there already: it keeps its socket.
    live_path = tmp_path / "live.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        live.bind(str(live_path))
        live.listen(1)
        with pytest.raises(ListenError, match=r"live\.sock for the test: another program listens"):
            with unix_listener(live_path, mode=0o777, purpose="the test"):
                pass
        assert stat.S_ISSOCK(live_path.lstat().st_mode)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.connect(str(live_path))  # still served
    # A file that is not a socket is never removed.
    regular = tmp_path / "notes.txt"
    regular.write_text("keep me")
    with pytest.raises(ListenError, match="a file that is not a socket is there"):
        with unix_listener(regular, mode=0o777, purpose="the test"):
            pass
    assert regular.read_text() == "keep me"
    # What the kernel cannot do is said before it is tried.
    with pytest.raises(ListenError, match="does not exist"):
        with unix_listener(tmp_path / "missing" / "s.sock", mode=0o777, purpose="the test"):
            pass
    with pytest.raises(ListenError, match="bytes long and a Unix-domain socket's can be 107"):
        with unix_listener(tmp_path / ("x" * 120), mode=0o777, purpose="the test"):
            pass


async def test_a_socket_file_replaced_meanwhile_is_not_removed(tmp_path: Path) -> None:
    path = tmp_path / "moved.sock"
    with unix_listener(path, mode=0o777, purpose="the test"):
        path.unlink()
        path.write_text("another program's file")
    assert path.read_text() == "another program's file"
