"""TLS for the Gate's HTTP listener, and the pin the CLI checks it against.

Admin and app keys travel in ``Authorization`` headers: across a network
they must be encrypted. ``gate.http_tls`` decides:

- ``auto`` (the default): TLS unless the listener is on a loopback address
  (the box's own processes only: no network to cross);
- ``on``: always; ``off``: never (TLS ends at a proxy in front).

The certificate is ``gate.http_tls_cert``/``gate.http_tls_key`` when
configured (a CA-issued one, say); otherwise one is generated at first start
(ECDSA P-256, self-signed, ten years, key file 0600) in the data directory and
kept. Its SHA-256 fingerprint is the trust anchor: ``qmesh up`` prints it and
writes it to ``up.json``, and the CLI pins it (:func:`pinned_connection`), as
SSH pins a host key — no CA is needed and none is trusted for a pinned Gate.

Not for: the tunnel (Noise, :mod:`qmesh.tunnel.handshake`) or Postgres TLS.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import http.client
import ipaddress
import socket
import ssl
from pathlib import Path
from typing import Final

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from qmesh import _core
from qmesh.identity import write_private_file

__all__ = [
    "CERT_FILE",
    "KEY_FILE",
    "GateTls",
    "PinMismatch",
    "fingerprint_of",
    "generate_self_signed",
    "load_or_create",
    "pinned_connection",
    "tls_wanted",
]

CERT_FILE: Final = "gate-http.crt"
KEY_FILE: Final = "gate-http.key"
_VALID_FOR: Final = datetime.timedelta(days=3650)


class PinMismatch(ssl.SSLError):
    """The Gate's certificate is not the pinned one: someone else answered."""


@attrs.frozen
class GateTls:
    context: ssl.SSLContext
    """For the few answers written in Python (a connection refused over the limit)."""
    native: _core.TlsServerConfig
    """The same certificate and key for the HTTP engine, which serves the rest."""
    fingerprint: str
    """``sha256:`` and the certificate's SHA-256 in lower-case hex."""
    cert_file: Path


def tls_wanted(mode: str, host: str) -> bool:
    """Whether ``gate.http_tls = mode`` means TLS for a listener on ``host``."""
    if mode == "on":
        return True
    if mode == "off":
        return False
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True  # a name or a wildcard: reachable from the network


def fingerprint_of(der: bytes) -> str:
    return "sha256:" + hashlib.sha256(der).hexdigest()


def load_or_create(
    data_dir: Path, *, cert_file: Path | None = None, key_file: Path | None = None
) -> GateTls:
    """The server context: the configured pair, else the generated one
    (created on first use)."""
    if cert_file is None or key_file is None:
        cert_file, key_file = data_dir / CERT_FILE, data_dir / KEY_FILE
        if not cert_file.exists() or not key_file.exists():
            generate_self_signed(cert_file, key_file)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    # HTTP/1.1 only: the server speaks nothing else.
    context.set_alpn_protocols(["http/1.1"])
    chain = cert_file.read_bytes()
    native = _core.TlsServerConfig(chain, key_file.read_bytes(), alpn=[b"http/1.1"])
    der = ssl.PEM_cert_to_DER_cert(chain.decode("ascii"))
    return GateTls(context, native, fingerprint_of(der), cert_file)


def generate_self_signed(
    cert_file: Path, key_file: Path, *, valid_for: datetime.timedelta = _VALID_FOR
) -> None:
    """A new ECDSA P-256 key (written 0600) and a self-signed certificate for
    ``localhost``, this host's name and the loopback addresses."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "qmesh gate")])
    now = datetime.datetime.now(datetime.UTC)
    names: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.DNSName(socket.gethostname()),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + valid_for)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_private_file(key_file, key_pem, replace=True)
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def pinned_connection(
    host: str, port: int, fingerprint: str, *, timeout: float
) -> http.client.HTTPSConnection:
    """A connected HTTPS connection to a Gate whose certificate has exactly
    ``fingerprint``; raises :class:`PinMismatch` before a byte of the request
    (and so before any key) is sent to anyone else."""
    context = ssl.create_default_context()
    # The pin replaces CA and name checks: it is stricter than both.
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    connection = http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
    connection.connect()
    assert connection.sock is not None
    der = connection.sock.getpeercert(binary_form=True) or b""
    seen = fingerprint_of(der)
    if not hmac.compare_digest(seen, fingerprint.lower()):
        connection.close()
        raise PinMismatch(
            f"the Gate at {host}:{port} presented certificate {seen}, not the pinned "
            f"{fingerprint}: not connecting"
        )
    return connection
