"""The tunnel's exception family, split by who is at fault.

- :class:`PeerProtocolError`: the other end broke the protocol (a bad frame, a
  bad handshake message). The connection is torn down.
- :class:`ConnectionLost`: the network failed or went silent. A session
  survives it and resumes on a new connection.
- :class:`HandshakeRefused`: the Gate said no (not enrolled, revoked). Retrying
  with the same credential cannot help, unless the refusal is
  :attr:`~HandshakeRefused.retryable` (the Gate is starting, or full).
- :class:`HandshakeFailed`: the handshake did not complete for another reason
  (wrong Gate key, timeout, garbage).
- :class:`SessionLost`: the session ended for good; its streams are reset.
- :class:`StreamReset`: one stream was aborted by either end.

Low-level errors (``trio.BrokenResourceError``, ``qmesh._core.FrameError``)
are translated at the boundary, so callers see only these.
"""

from __future__ import annotations

from typing import Final

import trio


class TunnelError(Exception):
    """Base class of every error raised by :mod:`qmesh.tunnel`."""


class PeerProtocolError(TunnelError):
    """The peer sent something the protocol forbids; raised on the connection's side."""


class ConnectionLost(TunnelError):
    """The transport failed, closed or went silent past the dead-peer threshold."""


class PeerSilent(ConnectionLost):
    """The connection went silent past the dead-peer threshold (the peer may
    be hung or cut off, where a dead one refuses or resets)."""


class HandshakeFailed(TunnelError):
    """The handshake did not complete: wrong key, timeout or a malformed message."""


class HandshakeRefused(HandshakeFailed):
    """The Gate authenticated the edge's key and refused it (unknown or revoked).

    ``code`` is machine-readable: ``not_enrolled``, ``revoked``, ``replayed``,
    ``too_many_sessions``; and three that say "not now, not here":
    ``not_ready`` (the Gate is starting), ``gate_full`` (it holds all the
    sessions it can), ``version`` (it speaks no tunnel protocol version the
    edge does: in a cluster being upgraded, another Gate may) and
    ``draining`` (it is being stopped), after
    which an edge tries the next Gate (:attr:`retryable`).
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"gate refused the handshake: {message} ({code})")
        self.code = code
        self.reason = message

    @property
    def retryable(self) -> bool:
        """The refusal is about the Gate's state, not the edge's key."""
        return self.code in RETRYABLE_REFUSALS


RETRYABLE_REFUSALS: Final = frozenset({"not_ready", "gate_full", "version", "draining"})

GOAWAY_BETWEEN_ANSWERS: Final = 1
"""The GOAWAY code of a Gate that ends a session at a moment when none of its
answers is in progress (a drain's gap between requests): the edge may carry
its applications' idle connections over to another Gate. Code 0 says
nothing about that."""


class SessionLost(TunnelError):
    """The session cannot continue (peer said goodbye or its grace period ran out)."""

    def __init__(self, message: str, *, between_answers: bool = False) -> None:
        super().__init__(message)
        self.between_answers = between_answers
        """The peer ended it with GOAWAY :data:`GOAWAY_BETWEEN_ANSWERS`: no
        answer of its was in progress, so every answer sent was sent whole."""


class StreamReset(TunnelError, trio.BrokenResourceError):
    """A stream was aborted. Subclasses ``trio.BrokenResourceError`` so generic
    Trio stream code treats it as a broken stream."""

    def __init__(self, code: int, message: str, *, between_answers: bool = False) -> None:
        super().__init__(f"stream reset ({code}): {message}")
        self.code = code
        self.reason = message
        self.between_answers = between_answers
        """SESSION_LOST by a GOAWAY sent between answers (see :class:`SessionLost`)."""
