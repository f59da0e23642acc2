"""The CLI's client of a running Gate's admin API, over HTTP or pinned HTTPS.

For: commands that ask a live Gate (``qmesh inventory``, ``qmesh sessions``).
Which Gate: ``--gate URL``, else ``gate.http`` in ``DATA_DIR/up.json``
(written by ``qmesh up``), else ``gate.http_listen`` from the configuration.
The admin key: ``--key``, else ``QMESH_ADMIN_KEY``, else ``up.json``. For an
``https://`` Gate the certificate's fingerprint is pinned: ``--fingerprint``,
else ``QMESH_GATE_FINGERPRINT``, else ``gate.tls_fingerprint`` in
``up.json``; no request (and so no key) goes to a Gate that does not present
exactly that certificate (:func:`qmesh.web.tls.pinned_connection`).

Not for: the admin API itself (:mod:`qmesh.ops.sessions`), or applications.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import ssl
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import attrs

from qmesh.cmdline import EXIT_FAILURE, EXIT_USAGE
from qmesh.web.tls import pinned_connection

if TYPE_CHECKING:
    from qmesh.config import Config

__all__ = ["KEY_ENV", "PIN_ENV", "CliError", "GateApi", "add_gate_options"]

KEY_ENV: Final = "QMESH_ADMIN_KEY"
PIN_ENV: Final = "QMESH_GATE_FINGERPRINT"


class CliError(Exception):
    """Something the operator must fix; ``status`` is the exit status."""

    def __init__(self, message: str, status: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.status = status


def add_gate_options(parser: argparse.ArgumentParser) -> None:
    """``--gate``, ``--key`` and ``--fingerprint``: which Gate, how to trust it,
    and the admin key for it."""
    parser.add_argument(
        "--gate", metavar="URL", help="the Gate's HTTP address (http(s)://host:port)"
    )
    parser.add_argument(
        "--key",
        metavar="admin:KEY",
        help=f"the admin key (default: ${KEY_ENV} or up.json; on the command line `ps` shows it)",
    )
    parser.add_argument(
        "--fingerprint",
        metavar="sha256:HEX",
        help=f"an https Gate's certificate fingerprint (default: ${PIN_ENV} or up.json)",
    )


def _up_json(config: Config) -> dict[str, Any]:
    path = config.data_dir / "up.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    gate = data.get("gate") if isinstance(data, dict) else None
    return gate if isinstance(gate, dict) else {}


@attrs.frozen
class GateApi:
    base: str
    key: str = attrs.field(repr=False)
    fingerprint: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace, config: Config) -> GateApi:
        up = _up_json(config)
        key = args.key or os.environ.get(KEY_ENV) or up.get("admin_key")
        if not isinstance(key, str) or not key:
            raise CliError(
                f"no admin key: pass --key admin:KEY, set {KEY_ENV}, or run where "
                f"{Path(config.data_dir) / 'up.json'} exists (qmesh up writes it)"
            )
        pin = args.fingerprint or os.environ.get(PIN_ENV) or up.get("tls_fingerprint")
        return cls(_base_url(args, config, up), key, pin if isinstance(pin, str) else None)

    def call(self, method: str, path: str, *, body: Any = None, timeout: float = 30.0) -> Any:
        """One admin API call; the JSON answer, or :class:`CliError` saying why not."""
        url = self.base + path
        headers = {"authorization": f"Bearer {self.key}", "accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["content-type"] = "application/json"
        try:
            connection = self._connect(timeout)
            try:
                connection.request(method, _target(url), body=data, headers=headers)
                response = connection.getresponse()
                raw = response.read()
            finally:
                connection.close()
        except (OSError, http.client.HTTPException) as exc:
            raise CliError(f"cannot reach the Gate at {url}: {exc}", EXIT_FAILURE) from None
        if response.status >= 400:
            try:
                detail = json.loads(raw or b"{}").get("error", {}).get("message") or raw.decode()
            except (ValueError, AttributeError, UnicodeDecodeError):
                detail = f"HTTP {response.status}"
            if response.status in (401, 403):
                raise CliError(f"the Gate refused the key: {detail}")
            raise CliError(f"{method} {url}: HTTP {response.status}: {detail}", EXIT_FAILURE)
        try:
            return json.loads(raw)
        except ValueError:
            raise CliError(f"{method} {url} did not answer with JSON", EXIT_FAILURE) from None

    def _connect(self, timeout: float) -> http.client.HTTPConnection:
        parts = urllib.parse.urlsplit(self.base)
        host = parts.hostname or "127.0.0.1"
        if parts.scheme == "https":
            if not self.fingerprint:
                raise CliError(
                    f"{self.base} uses TLS: pin its certificate with --fingerprint sha256:…, "
                    f"{PIN_ENV}, or run where up.json names it (qmesh up prints it)"
                )
            try:
                return pinned_connection(host, parts.port or 443, self.fingerprint, timeout=timeout)
            except ssl.SSLError as exc:
                raise CliError(str(exc), EXIT_FAILURE) from None
        if parts.scheme != "http":
            raise CliError(f"--gate must be an http:// or https:// URL, got {self.base!r}")
        return http.client.HTTPConnection(host, parts.port or 80, timeout=timeout)


def _target(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


def _base_url(args: argparse.Namespace, config: Config, up: dict[str, Any]) -> str:
    if args.gate:
        return str(args.gate).rstrip("/")
    recorded = up.get("http")
    if isinstance(recorded, str) and recorded:
        return recorded.rstrip("/")
    from qmesh.config import format_hostport, parse_hostport
    from qmesh.web.tls import tls_wanted

    host, port = parse_hostport(config.gate.http_listen)
    scheme = "https" if tls_wanted(config.gate.http.tls, host) else "http"
    if host in ("0.0.0.0", "::", "*", ""):
        host = "127.0.0.1"
    return f"{scheme}://{format_hostport(host, port)}"
