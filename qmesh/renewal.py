"""An edge keeps its credential alive: renewal before it expires.

For: :func:`keep_renewed`, run by the MiniGate and Daemon roles beside their
tunnel client. A credential enrolled with ``--ttl`` stops working at its
expiry unless renewed; the edge renews it through the Gate's ``renew``
service (:meth:`qmesh.admission.EnrolledEdges.renew`) when a third of its
life is left, so a live edge never loses its session to expiry while one
that is switched off, lost or stolen-and-shelved stops working on its own.
A failed renewal (no Gate reachable) is tried again soon, and keeps being
tried until the expiry: the session's loss is what tells the edge it is
too late. Nothing is written on the edge: the expiry lives in the Gate's
state, and the private key never changes hands.

At a first start with a one-time join token (``minigate.join_token_file``)
:func:`keep_joined_credential` writes the credential the edge made for
itself once the Gate has accepted the token.

Not for: the handshake (:mod:`qmesh.tunnel`) or who may renew
(:mod:`qmesh.admission`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

import attrs
import trio

from qmesh import peerjson
from qmesh.identity import Credential, write_private_file
from qmesh.tunnel import TunnelClient, TunnelError

__all__ = ["RENEW_AT_LEFT", "keep_joined_credential", "keep_renewed"]

log = logging.getLogger(__name__)

RENEW_AT_LEFT: Final = 1 / 3
"""Renew when this share of the credential's life is left."""
RETRY_S: Final = 5.0
NO_EXPIRY_CHECK_S: Final = 3600.0
"""A credential without an expiry is asked about again this often (an
operator may give it one by enrolling it again)."""
_ANSWER_LIMIT: Final = 4096


async def _renew_once(client: TunnelClient) -> float | None:
    """The new expiry (None: the credential has none). Raises TunnelError,
    OSError or ValueError when the Gate could not be asked or said no."""
    stream = await client.open_stream({"service": "renew"})
    async with stream:
        await stream.send_eof()
        answer = b""
        while data := await stream.receive_some(_ANSWER_LIMIT):
            answer += data
            if len(answer) > _ANSWER_LIMIT:
                raise ValueError("the Gate's answer is too long")
    reply = peerjson.loads(answer, max_bytes=_ANSWER_LIMIT, max_depth=2, what="renewal")
    if not isinstance(reply, dict) or reply.get("ok") is not True:
        error = reply.get("error") if isinstance(reply, dict) else None
        raise ValueError(str(error or "the Gate refused the renewal"))
    expires = reply.get("expires_at")
    if expires is None:
        return None
    if isinstance(expires, bool) or not isinstance(expires, int | float):
        raise ValueError("the Gate's expiry is not a number")
    try:
        value = float(expires)
    except OverflowError:
        raise ValueError("the Gate's expiry is out of range") from None
    if not math.isfinite(value):
        raise ValueError("the Gate's expiry is not finite")
    return value


async def keep_renewed(client: TunnelClient, *, ttl_hint_s: float = NO_EXPIRY_CHECK_S) -> None:
    """Renew ``client``'s credential for as long as this runs."""
    wait = 0.0  # ask at once: the edge learns its expiry
    while True:
        await trio.sleep(wait)
        try:
            with trio.fail_after(60):
                await client.wait_connected()
                expires = await _renew_once(client)
        except (
            TunnelError,
            OSError,
            ValueError,
            trio.TooSlowError,
            trio.BrokenResourceError,
        ) as exc:
            log.warning("renewing the credential failed (%s); trying again", exc)
            wait = RETRY_S
            continue
        if expires is None:
            wait = ttl_hint_s
            continue
        left = expires - time.time()
        log.info("credential renewed: it expires in %.0f s", left)
        # Renewal extends it to a full TTL from now: the next is due when a
        # third of that is left again (never more often than once a second).
        wait = max(1.0, left * (1 - RENEW_AT_LEFT))


async def keep_joined_credential(client: TunnelClient, credential: Credential, path: Path) -> None:
    """Write ``credential`` to ``path`` (0600) once the Gate has accepted
    the join token it came with: from then on the edge starts with it."""
    await client.joined.wait()
    write_private_file(path, (credential.encode() + "\n").encode())
    log.info("joined as %s %r; credential written to %s", credential.role, credential.name, path)


def remember_gate_key(credential: Credential, path: Path) -> Callable[[bytes], None]:
    """For :attr:`qmesh.tunnel.TunnelClient.on_gate_key`: after the Gate's key
    was rotated, rewrite the credential file with its new public key (the
    old one stops working when the rotation's overlap ends)."""
    current = credential

    def remember(gate_public_key: bytes) -> None:
        nonlocal current
        current = attrs.evolve(current, gate_public_key=gate_public_key)
        try:
            write_private_file(path, (current.encode() + "\n").encode(), replace=True)
        except OSError as exc:
            log.error("the gate's new key could not be written to %s (%s): the edge uses it "
                      "until it restarts; rewrite the credential before the overlap ends",
                      path, exc)  # fmt: skip
            return
        log.info("the gate's new key is written to %s", path)

    return remember
