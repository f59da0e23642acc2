"""TLS from the Gate to a database server, in the Rust core (rustls).

For: :func:`start_tls`, which runs the handshake on a TCP connection after
the server accepted an SSLRequest, verifying as libpq's ``sslmode`` says, and
:class:`ServerTls`, the Trio stream the login then runs over. When the
session is relayed natively, the same TLS connection moves into the relay
engine (:attr:`ServerTls.tls`, handed to ``TunnelStream.relay_native``):
records are read and written there, with no Python per message.

Verification, as libpq: ``verify-full`` checks the chain and the host name,
``verify-ca`` the chain only, ``require`` with an ``sslrootcert`` acts as
``verify-ca``, and ``require``/``prefer`` otherwise check nothing about the
certificate (the handshake's signatures still prove the server holds its
key, which channel binding relies on). Without ``sslrootcert`` the system's
certificate authorities are trusted (OpenSSL's default file).

Not for: the SSLRequest itself or the login (:mod:`qmesh.pg.login`).
"""

from __future__ import annotations

import os
import ssl
from functools import lru_cache
from pathlib import Path
from typing import Final

import trio

from qmesh import _core

__all__ = ["ServerTls", "start_tls", "verification"]

RECEIVE_SIZE: Final = 64 * 1024
_ALPN: Final = [b"postgresql"]
_SYSTEM_BUNDLES: Final = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt")


def verification(sslmode: str, sslrootcert: str | None) -> str:
    """``TlsClient``'s ``verify`` for a libpq ``sslmode``."""
    if sslmode == "verify-full":
        return "full"
    if sslmode == "verify-ca" or (sslmode == "require" and sslrootcert is not None):
        return "ca"
    return "none"


@lru_cache(maxsize=16)
def _read_roots(path: str, _mtime_ns: int) -> bytes:
    return Path(path).read_bytes()


def _roots(sslrootcert: str | None) -> bytes:
    """The trusted certificates (PEM): ``sslrootcert``, else the system's.
    Cached per file and modification time: a login must not re-read a
    bundle of a hundred certificates."""
    candidates = [sslrootcert] if sslrootcert else _system_bundles()
    for path in candidates:
        try:
            return _read_roots(path, os.stat(path).st_mtime_ns)
        except OSError:
            if sslrootcert:
                raise
    return b""


def _system_bundles() -> list[str]:
    paths = ssl.get_default_verify_paths()
    found = [p for p in (paths.cafile, paths.openssl_cafile) if p]
    return [*found, *_SYSTEM_BUNDLES]


class ServerTls(trio.abc.Stream):
    """A TLS stream to a database server over ``transport``, the TLS
    connection itself in :attr:`tls` (a ``_core.TlsClient``)."""

    def __init__(self, transport: trio.SocketStream, tls: _core.TlsClient) -> None:
        self.transport = transport
        self.tls = tls
        self._plain = bytearray()
        self._eof = False

    async def _flush(self) -> None:
        out = self.tls.outgoing()
        if out:
            await self.transport.send_all(out)

    async def _fill(self) -> None:
        """Read records until some plaintext or the end of the stream."""
        while not self._plain and not self._eof:
            data = await self.transport.receive_some(RECEIVE_SIZE)
            if not data:
                self.tls.receive_eof()
                self._eof = True
                break
            self._plain += self.tls.receive(data)
            await self._flush()  # what the records asked for (a key update)

    async def handshake(self) -> None:
        while self.tls.handshaking:
            await self._flush()
            if not self.tls.handshaking:
                break
            data = await self.transport.receive_some(RECEIVE_SIZE)
            if not data:
                raise trio.BrokenResourceError("the server closed the connection during TLS")
            self._plain += self.tls.receive(data)
        await self._flush()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.tls.send(bytes(data))
        await self._flush()

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await self._fill()
        n = len(self._plain) if max_bytes is None else max_bytes
        data = bytes(self._plain[:n])
        del self._plain[:n]
        return data

    @property
    def buffered(self) -> bytes:
        """Plaintext received and not yet read."""
        return bytes(self._plain)

    async def aclose(self) -> None:
        if not self.tls.handed_over:
            try:
                self.tls.close()
                with trio.move_on_after(1):
                    await self._flush()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
        await self.transport.aclose()


async def start_tls(
    tcp: trio.SocketStream, sslmode: str, sslrootcert: str | None, host: str
) -> ServerTls:
    """The TLS handshake with the server at ``host``; raises ``_core.TlsError``
    (an OSError) or ``trio.BrokenResourceError`` when it fails."""
    verify = verification(sslmode, sslrootcert)
    roots = await trio.to_thread.run_sync(_roots, sslrootcert) if verify != "none" else None
    tls = _core.TlsClient(host, verify=verify, root_certificates=roots, alpn=_ALPN)
    stream = ServerTls(tcp, tls)
    await stream.handshake()
    return stream
