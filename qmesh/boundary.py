"""Where another party's bytes arrive, one failure ends one connection.

For: the per-connection handlers of every listener (the Gate's tunnel and
HTTP listeners, the MiniGate's Postgres, LLM and forward listeners). Inside
:func:`peer_boundary` anything a peer's input makes our code raise — a
``RecursionError``, a ``KeyError`` from a bug, an exception group — is logged
with the reason and ends that connection only; the listener, the process and
every other peer carry on.

Catches ``BaseException`` on purpose: a peer must not be able to end the
server with any exception type, ``SystemExit`` and exception groups
included. Cancellation, ``KeyboardInterrupt`` and ``GeneratorExit`` belong to
someone else (shutdown, the operator, the interpreter): they are split out of
groups and passed on.

Not for: expected failures (a peer closing, a protocol error the handler
answers itself), which handlers catch and report in their own words.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Final, TypeVar

import trio

__all__ = ["PASS_THROUGH", "PeerBoundary", "guarded", "peer_boundary", "split_failure"]

PASS_THROUGH: Final = (trio.Cancelled, KeyboardInterrupt, GeneratorExit)
"""Not a peer's doing, and must reach their catcher: cancellation (a
shutdown, a deadline), Ctrl-C, and a generator's close."""

log = logging.getLogger(__name__)

T = TypeVar("T")


def split_failure(exc: BaseException) -> tuple[BaseException | None, BaseException | None]:
    """``exc`` as (what must pass through, what the boundary ends here)."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(PASS_THROUGH)
    if isinstance(exc, PASS_THROUGH):
        return exc, None
    return None, exc


class PeerBoundary:
    """Ends whatever ``what`` (one connection) raised, with a logged reason:
    see :func:`peer_boundary`. A class, not a generator: entered once per
    request on the LLM fast path, where a generator's context manager cost
    several times as much."""

    __slots__ = ("args", "logger", "what")

    def __init__(self, what: str, logger: logging.Logger, args: tuple[object, ...] = ()) -> None:
        self.what = what
        self.logger = logger
        self.args = args

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        if exc is None:
            return False
        passed, caught = split_failure(exc)
        if caught is not None:
            # Formatted only now: no work per connection that ends well.
            what = self.what % self.args if self.args else self.what
            self.logger.error(
                "%s ended by an unexpected %s", what, type(caught).__name__, exc_info=caught
            )
        if passed is exc:
            return False
        if passed is not None:
            raise passed from None
        return True


def peer_boundary(what: str, logger: logging.Logger = log, *args: object) -> PeerBoundary:
    """Ends whatever ``what`` (one connection) raised, with a logged reason.
    With ``args``, ``what`` is a %-format for them, formatted only if the
    connection fails (a text from a peer belongs in ``args``, never in
    ``what``)."""
    return PeerBoundary(what, logger, args)


def guarded(
    handler: Callable[[T], Awaitable[None]], what: str, logger: logging.Logger = log
) -> Callable[[T], Awaitable[None]]:
    """``handler`` for one connection, inside :func:`peer_boundary`; for
    ``trio.serve_listeners`` and the like."""

    async def handle(connection: T) -> None:
        with peer_boundary(what, logger):
            await handler(connection)

    return handle
