"""A Trio stream over TLS whose connection a native relay can take over.

For: :class:`TlsStream`, TLS (``_core.TlsSession``, rustls, client or
server) over a TCP socket, used for what must happen in Python before a
session is relayed (the Gate's login to a database server, the MiniGate's
Postgres startup packet). Then ``TunnelStream.relay_native(stream.transport,
tls=stream.tls)`` moves the same TLS connection into the relay engine, which
reads and writes its records without Python.

Not for: deciding what to trust (the callers build the session: libpq's
``sslmode`` at the Gate, the configured certificate at the MiniGate).
"""

from __future__ import annotations

from typing import Final

import trio

from qmesh import _core

__all__ = ["TlsStream"]

RECEIVE_SIZE: Final = 64 * 1024


class TlsStream(trio.abc.Stream):
    """TLS over ``transport``; the connection itself is :attr:`tls`.

    Errors: ``_core.TlsError`` (an OSError) for what TLS refuses, and
    ``trio.BrokenResourceError`` for a peer that hangs up mid-handshake."""

    def __init__(self, transport: trio.SocketStream, tls: _core.TlsSession) -> None:
        self.transport = transport
        self.tls = tls
        self._plain = bytearray()
        self._eof = False

    def feed(self, ciphertext: bytes) -> None:
        """Bytes of the TLS stream already read from the socket (the start of
        a ClientHello read to recognise it)."""
        if ciphertext:
            self._plain += self.tls.receive(ciphertext)

    async def handshake(self) -> None:
        while self.tls.handshaking:
            await self._flush()
            if not self.tls.handshaking:
                break
            data = await self.transport.receive_some(RECEIVE_SIZE)
            if not data:
                raise trio.BrokenResourceError("the peer closed the connection during TLS")
            self._plain += self.tls.receive(data)
        await self._flush()

    async def _flush(self) -> None:
        out = self.tls.outgoing()
        if out:
            await self.transport.send_all(out)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.tls.send(bytes(data))
        await self._flush()

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        while not self._plain and not self._eof:
            data = await self.transport.receive_some(RECEIVE_SIZE)
            if not data:
                self._eof = True
                break
            self._plain += self.tls.receive(data)
            await self._flush()  # what the records asked for (a key update)
        n = len(self._plain) if max_bytes is None else max_bytes
        data = bytes(self._plain[:n])
        del self._plain[:n]
        return data

    def take_back(self) -> None:
        """The connection is back from a native relay: plaintext it
        decrypted and did not relay (the server's answers, past what the
        relay could pass on) is read from here first."""
        self._plain += self.tls.receive(b"")

    @property
    def buffered(self) -> bytes:
        """Plaintext received and not yet read (a relay must not take the
        connection over while there is some)."""
        return bytes(self._plain)

    def take_buffered(self) -> bytes:
        """Plaintext received and not yet read, which is now the caller's."""
        data = bytes(self._plain)
        self._plain.clear()
        return data

    async def aclose(self) -> None:
        if not self.tls.handed_over:
            try:
                self.tls.close()
                with trio.move_on_after(1):
                    await self._flush()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
        await self.transport.aclose()
