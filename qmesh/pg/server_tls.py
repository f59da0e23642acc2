"""TLS from the Gate to a database server, in the Rust core (rustls).

For: :func:`start_tls`, which runs the handshake on a TCP connection after
the server accepted an SSLRequest, verifying as libpq's ``sslmode`` says,
and returns the :class:`~qmesh.tls.TlsStream` the login then runs over.
When the session is relayed natively, the same TLS connection moves into
the relay engine: records are read and written there, with no Python per
message.

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
from qmesh.tls import TlsStream

__all__ = ["ALPN", "start_tls", "verification"]

ALPN: Final = b"postgresql"
"""PostgreSQL's ALPN protocol name (PostgreSQL 17): offered to servers,
required of clients that start with direct TLS."""
_SYSTEM_BUNDLES: Final = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt")


def verification(sslmode: str, sslrootcert: str | None) -> str:
    """``TlsSession``'s ``verify`` for a libpq ``sslmode``."""
    if sslmode == "verify-full":
        return "full"
    if sslmode == "verify-ca" or (sslmode == "require" and sslrootcert is not None):
        return "ca"
    return "none"


_TRUST_NOTHING: Final = _core.TlsClientConfig(b"", verify="none", alpn=[ALPN])
"""``verify="none"``'s trust, the same for every server."""


@lru_cache(maxsize=16)
def _load_trust(verify: str, path: str | None, _mtime_ns: int) -> _core.TlsClientConfig:
    roots = Path(path).read_bytes() if path is not None else b""
    return _core.TlsClientConfig(roots, verify=verify, alpn=[ALPN])


def _trust(verify: str, sslrootcert: str | None) -> _core.TlsClientConfig:
    """What a connection verifying as ``verify`` trusts: ``sslrootcert``,
    else the system's certificates. Cached per file and modification time:
    reading and parsing a bundle of a hundred certificates takes most of a
    millisecond, which a login must not pay again."""
    if verify == "none":
        return _TRUST_NOTHING
    candidates = [sslrootcert] if sslrootcert else _system_bundles()
    for path in candidates:
        try:
            modified = os.stat(path).st_mtime_ns
        except OSError:
            if sslrootcert:
                raise
            continue
        return _load_trust(verify, path, modified)
    return _load_trust(verify, None, 0)  # no bundle: TlsError, no root to verify against


def _system_bundles() -> list[str]:
    paths = ssl.get_default_verify_paths()
    found = [p for p in (paths.cafile, paths.openssl_cafile) if p]
    return [*found, *_SYSTEM_BUNDLES]


async def start_tls(
    tcp: trio.SocketStream, sslmode: str, sslrootcert: str | None, host: str
) -> TlsStream:
    """The TLS handshake with the server at ``host``; raises ``_core.TlsError``
    (an OSError) or ``trio.BrokenResourceError`` when it fails."""
    verify = verification(sslmode, sslrootcert)
    # No file to look at for verify-nothing: no trip to a worker thread.
    trust = (
        _TRUST_NOTHING
        if verify == "none"
        else await trio.to_thread.run_sync(_trust, verify, sslrootcert)
    )
    tls = _core.TlsSession.client(host, config=trust)
    stream = TlsStream(tcp, tls)
    await stream.handshake()
    return stream
