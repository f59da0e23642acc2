"""Socket plumbing for the hot paths (relays, tunnel, HTTP):
:class:`FastSocketStream` (below), :func:`connect_tcp` (no resolver thread
for IP literals), :func:`runnable_counter` (is anything else about to run?)
and :func:`open_listeners` (a listener that cannot bind says where and what
to do about it), :func:`unix_listener` (a Unix-domain socket file, a stale
one replaced, removed again at the end), :func:`serve_listeners`,
:func:`out_of_descriptors` and
:func:`raise_open_file_limit` (running out of a resource refuses new work,
it never ends the process).

A TCP stream for the relay hot path: no scheduling round per call.

Trio's ``SocketStream`` yields to the scheduler after every successful
``recv``/``send`` (a full checkpoint), and wraps each call in a conflict
detector and a context manager. For an interactive protocol relayed through
two processes, those rounds are most of the CPU a message costs. This stream
makes the system call first and only parks when the kernel says it would
block. It still notices cancellation on every call, and yields for real
after a run of calls that never blocked, so a busy stream cannot starve
other tasks.

The file descriptor is looked up on every call (never cached), so a stream
closed by another task fails cleanly instead of touching a reused number.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import ipaddress
import logging
import os
import resource
import socket
import stat
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Final, TypeVar

import trio

StreamT = TypeVar("StreamT", bound=trio.abc.Stream)

__all__ = [
    "FastSocketStream",
    "ListenError",
    "YieldBudget",
    "accept",
    "connect_tcp",
    "descriptor_reserve",
    "fast",
    "free_loopback_port",
    "open_listeners",
    "out_of_descriptors",
    "raise_open_file_limit",
    "runnable_counter",
    "serve_listeners",
    "unix_listener",
    "within_descriptor_reserve",
]

log = logging.getLogger(__name__)

_DEFAULT_RECEIVE = 65536

_CAPACITY_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
"""Failures that mean "out of file descriptors or memory for now": what
needed them is refused, and the process goes on."""


def out_of_descriptors(exc: BaseException) -> bool:
    """Whether ``exc`` says the process (or the system) is out of file
    descriptors or memory for now (EMFILE, ENFILE, ENOMEM, ENOBUFS)."""
    return isinstance(exc, OSError) and exc.errno in _CAPACITY_ERRNOS


def descriptor_reserve(limit: int) -> int:
    """Descriptors a server keeps free for work other than new sessions
    (streams' sockets, files, its state store) under an open-file limit."""
    return max(64, limit // 8)


def within_descriptor_reserve(fd: int) -> bool:
    """Whether a connection just given descriptor ``fd`` eats into the
    process's reserve. Linux hands out the lowest free number, so at least
    ``fd`` descriptors were in use: one comparison, where counting them
    would list ``/proc/self/fd``."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return False
    return fd >= soft - descriptor_reserve(soft)


ACCEPT_RETRY_S: Final = 0.1
"""After accept() fails for want of descriptors or memory, wait this long."""


async def serve_listeners(
    handler: Callable[[trio.SocketStream], Awaitable[object]],
    listeners: Sequence[trio.SocketListener],
    *,
    what: str,
    handler_nursery: trio.Nursery | None = None,
) -> None:
    """``trio.serve_listeners`` (each connection closed once its handler
    returns), quieter when descriptors run out: accept
    waits :data:`ACCEPT_RETRY_S` and tries again, logging one line (no
    traceback) per second of shortage at most, so that a flood of
    connections neither ends the server nor floods the log."""
    async with trio.open_nursery() as nursery:
        handlers = handler_nursery or nursery
        for listener in listeners:
            nursery.start_soon(_accept_forever, handler, listener, what, handlers)


async def accept(listener: trio.SocketListener, *, what: str) -> trio.SocketStream:
    """The next connection. While descriptors or memory are short, waits
    :data:`ACCEPT_RETRY_S` between tries and logs one line (no traceback)
    per second of shortage at most; other errors are raised."""
    logged = -1.0
    while True:
        try:
            return await listener.accept()
        except OSError as exc:
            if not out_of_descriptors(exc):
                raise
            if logged < 0 or time.monotonic() - logged >= 1.0:
                logged = time.monotonic()
                log.warning("%s: cannot accept connections for now (%s)", what, exc)
            await trio.sleep(ACCEPT_RETRY_S)


async def _accept_forever(
    handler: Callable[[trio.SocketStream], Awaitable[object]],
    listener: trio.SocketListener,
    what: str,
    handlers: trio.Nursery,
) -> None:
    async with listener:
        while True:
            stream = await accept(listener, what=what)
            handlers.start_soon(_run_handler, handler, stream)


async def _run_handler(
    handler: Callable[[trio.SocketStream], Awaitable[object]], stream: trio.SocketStream
) -> None:
    # As trio.serve_listeners: the connection is closed once its handler is done.
    try:
        await handler(stream)
    finally:
        await trio.aclose_forcefully(stream)


def raise_open_file_limit() -> tuple[int, int]:
    """Raise this process's soft limit on open files to its hard limit, as
    servers that hold a descriptor per connection do (the soft limit is often
    1,024 while the hard one allows far more). Returns (before, after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft >= hard:
        return soft, soft
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError):
        return soft, soft
    return soft, target


class YieldBudget:
    """Checkpoints for a stream whose calls usually complete at once: each
    notices cancellation, and every ``every``-th yields to the scheduler
    for real. :meth:`reset` after a call that parked (which yielded)."""

    def __init__(self, every: int = 16) -> None:
        self.every = every
        self._unyielded = 0

    def reset(self) -> None:
        self._unyielded = 0

    async def checkpoint(self) -> None:
        self._unyielded += 1
        if self._unyielded >= self.every:
            self._unyielded = 0
            await trio.lowlevel.checkpoint()
        else:
            await trio.lowlevel.checkpoint_if_cancelled()


class FastSocketStream(trio.abc.HalfCloseableStream):
    """Wraps a connected :class:`trio.SocketStream`; closing either closes both."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.socket = stream.socket
        self._budget = YieldBudget()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        size = _DEFAULT_RECEIVE if max_bytes is None else max_bytes
        if size < 1:
            raise ValueError("max_bytes must be >= 1")
        while True:
            try:
                data = os.read(self._fileno(), size)
            except BlockingIOError:
                self._budget.reset()
                await trio.lowlevel.wait_readable(self.socket)
                continue
            except OSError as exc:
                raise _translate(exc) from exc
            await self._budget.checkpoint()
            return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        with memoryview(data) as view, view.cast("B") as remaining:
            while remaining:
                try:
                    sent = os.write(self._fileno(), remaining)
                except BlockingIOError:
                    self._budget.reset()
                    await trio.lowlevel.wait_writable(self.socket)
                    continue
                except OSError as exc:
                    raise _translate(exc) from exc
                remaining = remaining[sent:]
        await self._budget.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()

    def _fileno(self) -> int:
        fileno = self.socket.fileno()
        if fileno < 0:
            raise trio.ClosedResourceError("the socket was closed")
        return fileno


def _translate(exc: OSError) -> trio.BrokenResourceError | trio.ClosedResourceError:
    if exc.errno == errno.EBADF:
        return trio.ClosedResourceError("the socket was closed")
    return trio.BrokenResourceError(f"socket failed: {exc}")


def fast(stream: StreamT) -> StreamT | FastSocketStream:
    """``stream`` as a :class:`FastSocketStream` when it is a plain TCP
    stream; any other stream (TLS, in-memory) unchanged."""
    if isinstance(stream, trio.SocketStream):
        return FastSocketStream(stream)
    return stream


def runnable_counter() -> Callable[[], int]:
    """A function counting the tasks ready to run, for deciding whether
    something else is about to happen in this scheduling round.

    ``trio.lowlevel.current_statistics()`` answers that, but walks every
    registered file descriptor to build its I/O statistics: microseconds per
    call at a busy Gate, paid per message. Trio's run queue is one deque for
    the whole run, so its length is read directly where this Trio has it;
    elsewhere the public (slower) call is used. Call inside ``trio.run``.
    """
    runner = getattr(trio.lowlevel.current_task(), "_runner", None)
    queue = getattr(runner, "runq", None)
    if isinstance(queue, collections.deque):
        return queue.__len__
    return lambda: trio.lowlevel.current_statistics().tasks_runnable


async def connect_tcp(host: str, port: int) -> trio.SocketStream:
    """A TCP connection to ``host:port``, like ``trio.open_tcp_stream``.

    ``trio.open_tcp_stream`` sends every host, even ``127.0.0.1``, through
    ``getaddrinfo`` in a worker thread and a happy-eyeballs nursery: about
    250 µs per connection here, paid on every forwarded connection and
    Postgres login. An IP literal needs neither, so it connects directly;
    names still go the whole way. Raises OSError as that does.
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return await trio.open_tcp_stream(host, port)
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


def free_loopback_port() -> int:
    """A TCP port free on 127.0.0.1 right now, for a child server that takes
    its port on the command line. Bind-and-release: another process could
    take it first; the child then fails to bind, and its caller says so."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ListenError(OSError):
    """A listener could not bind; the message names the address, what it was
    for and what the operator can do (an :class:`OSError`, so a role that
    cannot start reports it in one line)."""


async def open_listeners(host: str, port: int, *, purpose: str) -> list[trio.SocketListener]:
    """``trio.open_tcp_listeners`` whose failure says which address, for what."""
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if exc.errno == errno.EADDRINUSE:
            why = (
                f"another program already listens there (`ss -ltnp 'sport = :{port}'` shows "
                "which); stop it, or choose another port in the config "
                "(qmesh up: --port-offset N, or --ephemeral for free ports)"
            )
        elif exc.errno == errno.EACCES:
            why = "permission denied (a port below 1024 needs CAP_NET_BIND_SERVICE)"
        elif exc.errno == errno.EADDRNOTAVAIL:
            why = "this machine has no such address"
        else:
            why = exc.strerror or str(exc)
        error = ListenError(f"cannot listen on {address} for {purpose}: {why}")
        error.errno = exc.errno
        raise error from None


UNIX_PATH_MAX: Final = 107
"""The longest path a Unix-domain socket can have on Linux (``sun_path`` less its NUL)."""
_LISTENED: Final = "another program listens there; stop it, or choose another directory"


@contextlib.contextmanager
def unix_listener(path: Path, *, mode: int, purpose: str) -> Iterator[trio.SocketListener]:
    """A listener on the Unix-domain socket ``path`` with permissions
    ``mode``, for as long as the ``with`` lasts; then the socket file is
    removed, unless something else has taken its place meanwhile.

    A socket file already there that nothing listens on (a process that
    died without removing it) is replaced. One that something still
    answers on, or a file that is not a socket, is left alone and
    reported: a :class:`ListenError` that says which path, for what, and
    why."""

    def refused(why: str) -> ListenError:
        return ListenError(f"cannot listen on {path} for {purpose}: {why}")

    encoded = os.fsencode(path)
    if len(encoded) > UNIX_PATH_MAX:
        raise refused(
            f"the path is {len(encoded)} bytes long and a Unix-domain socket's can be "
            f"{UNIX_PATH_MAX} at most; choose a shorter directory"
        )
    _clear_stale_socket(path, refused)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(encoded)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.ENOENT:
            raise refused(f"the directory {path.parent} does not exist") from None
        if exc.errno == errno.EADDRINUSE:
            raise refused("another process created it meanwhile") from None
        raise refused(exc.strerror or str(exc)) from None
    ours = None
    try:
        found = os.lstat(path)
        ours = (found.st_dev, found.st_ino)
        os.chmod(path, mode)
        sock.listen(socket.SOMAXCONN)
        yield trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    finally:
        sock.close()
        with contextlib.suppress(OSError):
            found = os.lstat(path)
            if (found.st_dev, found.st_ino) == ours:
                os.unlink(path)


def _clear_stale_socket(path: Path, refused: Callable[[str], ListenError]) -> None:
    """Remove ``path`` if it is a socket file nothing listens on."""
    try:
        found = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise refused(exc.strerror or str(exc)) from None
    if not stat.S_ISSOCK(found.st_mode):
        raise refused("a file that is not a socket is there; remove it or choose another directory")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        # Without blocking: a live listener whose backlog is full answers
        # EAGAIN, and is as alive as one that accepts.
        probe.setblocking(False)
        try:
            probe.connect(os.fsencode(path))
        except ConnectionRefusedError:
            pass  # nothing listens: a dead process's socket
        except FileNotFoundError:
            return  # removed meanwhile
        except BlockingIOError:
            raise refused(_LISTENED) from None
        except OSError as exc:
            raise refused(exc.strerror or str(exc)) from None
        else:
            raise refused(_LISTENED)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
