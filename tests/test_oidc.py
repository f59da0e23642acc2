"""Operators signed in with an identity provider (``[gate.oidc]``).

A local issuer on loopback publishes its discovery document and keys
(JWKS), as a real provider does; its ID tokens are signed with PyJWT. A real
Gate process checks them: a valid token is an operator with the role of its
claim; a forged, expired, foreign or role-less one is refused, saying why.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from daemonkit import GateDir, make_gate_dir
from processkit import start_role, stop

DEADLINE_S = 30.0
AUDIENCE = "qmesh-gate"


class Issuer:
    """An OpenID provider's public face: discovery and keys, on loopback."""

    def __init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        jwks = json.dumps({"keys": [{**jwk, "kid": "k1", "use": "sig", "alg": "RS256"}]})
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                return

            def do_GET(self) -> None:
                if self.path == "/.well-known/openid-configuration":
                    body = json.dumps({"issuer": issuer.url, "jwks_uri": issuer.url + "/jwks"})
                elif self.path == "/jwks":
                    body = jwks
                else:
                    self.send_error(404)
                    return
                data = body.encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def hs256_with_public_key(self) -> str:
        """A token an attacker makes: HS256, its "secret" the public key."""
        public = self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        header = {"alg": "HS256", "typ": "JWT", "kid": "k1"}
        now = int(time.time())
        claims = {"iss": self.url, "aud": AUDIENCE, "sub": "x", "exp": now + 300,
                  "qmesh_role": "admin"}  # fmt: skip

        def part(value: object) -> bytes:
            raw = json.dumps(value, separators=(",", ":")).encode()
            return base64.urlsafe_b64encode(raw).rstrip(b"=")

        signed = part(header) + b"." + part(claims)
        mac = hmac.new(public, signed, hashlib.sha256).digest()
        return (signed + b"." + base64.urlsafe_b64encode(mac).rstrip(b"=")).decode()

    def token(self, key: Any = None, kid: str = "k1", alg: str = "RS256", **claims: Any) -> str:
        now = int(time.time())
        values = {"iss": self.url, "aud": AUDIENCE, "sub": "u-1", "email": "alice@example.com",
                  "iat": now, "exp": now + 300, "qmesh_role": "viewer", **claims}  # fmt: skip
        values = {k: v for k, v in values.items() if v is not None}
        return jwt.encode(values, key or self.key, algorithm=alg, headers={"kid": kid})


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GateDir, Issuer]]:
    tmp = tmp_path_factory.mktemp("oidc")
    issuer = Issuer()
    gate = make_gate_dir(tmp)
    config = tmp / "gate.toml"
    config.write_text(
        gate.config_text() + f'[gate.oidc]\nissuer = "{issuer.url}"\naudience = "{AUDIENCE}"\n'
    )
    process = start_role("gate", config, tmp / "gate.log")
    try:
        deadline = time.monotonic() + DEADLINE_S
        while call(gate, "/healthz", "-")[0] != 200:
            assert time.monotonic() < deadline, "the Gate did not come up"
            time.sleep(0.05)
        yield gate, issuer
    finally:
        stop(process)
        issuer.server.shutdown()


def call(gate: GateDir, path: str, token: str, body: object = None) -> tuple[int, str]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{gate.http_port}{path}",
        data=None if body is None else json.dumps(body).encode(),
        headers={"authorization": f"Bearer {token}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError:
        return 0, ""


def test_a_signed_in_operator_holds_the_role_of_its_token(setup: tuple[GateDir, Issuer]) -> None:
    gate, issuer = setup
    viewer = issuer.token()
    assert call(gate, "/api/dashboard", viewer)[0] == 200
    status, answer = call(gate, "/api/models/stop", viewer, {"model": "m"})
    assert status == 403
    assert "'oidc:alice@example.com' (viewer:" in json.loads(answer)["error"]["message"]
    operator = issuer.token(qmesh_role="operator", email="bob@example.com")
    assert call(gate, "/api/models/stop", operator, {"model": "m"})[0] == 404  # allowed, no model
    assert call(gate, "/metrics", issuer.token(qmesh_role="metrics"))[0] == 200


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda i: i.token(exp=int(time.time()) - 3600), "expired"),
        (lambda i: i.token(aud="another-app"), "audience doesn't match"),
        (lambda i: i.token(iss="https://elsewhere.example"), "invalid issuer"),
        (lambda i: i.token(qmesh_role=None), "no qmesh role"),
        (lambda i: i.token(qmesh_role="root"), "no qmesh role"),
        (lambda i: i.token(key=rsa.generate_private_key(public_exponent=65537, key_size=2048)),
         "not valid"),  # signed by a key the issuer never published (same kid)
        (lambda i: i.token(kid="k9"), "no signing key"),
        # The algorithm confusion: "HMAC-signed" with the issuer's public key.
        (lambda i: i.hs256_with_public_key(), "not valid"),
    ],
    ids=["expired", "audience", "issuer", "no-role", "unknown-role", "forged", "unknown-kid",
         "hs256-confusion"],
)  # fmt: skip
def test_a_bad_token_is_refused_saying_why(
    setup: tuple[GateDir, Issuer], make: Any, reason: str
) -> None:
    gate, issuer = setup
    status, answer = call(gate, "/api/dashboard", make(issuer))
    assert status == 401, answer
    error = json.loads(answer)["error"]
    assert error["code"] == "invalid_id_token"
    assert reason in error["message"].lower()


def test_config_refuses_an_issuer_without_an_audience(tmp_path: Path) -> None:
    from qmesh.config import ConfigError, load_config

    file = tmp_path / "gate.toml"
    file.write_text('[gate.oidc]\nissuer = "https://id.example.com"\n')
    with pytest.raises(ConfigError, match="audience"):
        load_config(file, env={})
    file.write_text('[gate.oidc]\nissuer = "http://id.example.com"\naudience = "x"\n')
    with pytest.raises(ConfigError, match="https"):
        load_config(file, env={})
