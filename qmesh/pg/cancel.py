"""Cancel requests at the Gate: the keys it mints for its clients'
sessions, and the forwarding of a client's cancel to the server connection
running its query.

For: :class:`CancelKeys`, one per Gate. A client is told a BackendKeyData
minted here, never the server's (which would let it cancel whatever the
connection runs for another client of the pool). A cancel request with a
minted key is honoured only from the edge that carries the session, and is
sent to the server with the real key of the connection that runs the
client's query at that moment.

Not for: the ``pg-cancel`` stream and asking the other Gates of a cluster
(:mod:`qmesh.pg.service`).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from typing import Final

import attrs
import trio

from qmesh import _core
from qmesh.pg.login import UpstreamFailed, asks_for_tls, connect_server, negotiate_tls
from qmesh.pg.vault import DatabaseSecret

__all__ = ["CANCEL_TIMEOUT_S", "CancelKeys", "CancelTarget"]

log = logging.getLogger(__name__)

CANCEL_TIMEOUT_S: Final = 10.0
"""Connecting to the server, TLS, and its acting on the request."""


@attrs.frozen
class CancelTarget:
    """Where a minted key's cancel goes."""

    edge: str
    host: str
    port: int
    sslmode: str
    sslrootcert: str | None
    alias: str
    real_key: Callable[[], tuple[int, bytes] | None] = attrs.field(repr=False)
    """The server's BackendKeyData for the session's query now: fixed in
    session mode; in transaction mode that of the connection lent to the
    client at the moment (None between its transactions)."""


class CancelKeys:
    """The keys this Gate minted, for the sessions open now."""

    def __init__(self) -> None:
        self._targets: dict[tuple[int, bytes], CancelTarget] = {}
        self.forwarded = 0
        """Cancel requests sent on to a server."""

    def keys(self) -> list[tuple[int, bytes]]:
        """The keys of the sessions open now."""
        return list(self._targets)

    def mint(
        self,
        edge: str,
        secret: DatabaseSecret,
        alias: str,
        real_key: Callable[[], tuple[int, bytes] | None],
    ) -> tuple[int, bytes]:
        """A new key for a session of ``edge`` on ``alias`` (whose server
        ``secret`` names); :meth:`forget` it when the session ends."""
        while True:
            minted = (secrets.randbelow(2**31 - 1) + 1, secrets.token_bytes(4))
            if minted not in self._targets:
                break
        self._targets[minted] = CancelTarget(
            edge=edge,
            host=secret.host,
            port=secret.port,
            sslmode=secret.sslmode,
            sslrootcert=secret.sslrootcert,
            alias=alias,
            real_key=real_key,
        )
        return minted

    def forget(self, minted: tuple[int, bytes]) -> None:
        self._targets.pop(minted, None)

    def target(self, pid: int, key: bytes) -> CancelTarget | None:
        return self._targets.get((pid, key))

    async def forward(self, target: CancelTarget) -> None:
        """Send the server a CancelRequest for the query ``target``'s
        session runs now, if it runs one; failures are logged, not raised."""
        real = target.real_key()
        if real is None:
            log.info("ignored a cancel request for alias %r: no query in progress", target.alias)
            return
        conn: trio.abc.Stream | None = None
        try:
            with trio.fail_after(CANCEL_TIMEOUT_S):
                tcp = await connect_server(target.host, target.port)
                conn = tcp
                if asks_for_tls(target.sslmode, target.host):
                    conn = await negotiate_tls(
                        tcp, target.sslmode, target.sslrootcert, target.host, target.alias
                    )
                if target.real_key() != real:
                    # Transaction mode: the client's transaction ended while
                    # this connected, and the connection may now run another
                    # client's. (The window left is that of any pooler.)
                    log.info("dropped a cancel request for alias %r: the query ended",
                             target.alias)  # fmt: skip
                    return
                await conn.send_all(_core.encode_cancel_request(*real))
                # The server answers nothing and closes once it has acted.
                while await conn.receive_some(1024):
                    pass
            self.forwarded += 1
            log.info("forwarded a cancel request for alias %r", target.alias)
        except (OSError, trio.TooSlowError, trio.BrokenResourceError, UpstreamFailed) as exc:
            log.warning("cannot forward a cancel request for alias %r: %s", target.alias, exc)
        finally:
            if conn is not None:
                await trio.aclose_forcefully(conn)
