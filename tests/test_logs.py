"""qmesh.logs: text and JSON output, and secrets that never reach either."""

from __future__ import annotations

import io
import json
import logging
import secrets
from collections.abc import Iterator

import pytest

from qmesh.logs import REDACTED, redact, register_secret, setup_logging


@pytest.fixture(autouse=True)
def restore_qmesh_logger() -> Iterator[None]:
    logger = logging.getLogger("qmesh")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]


def capture(fmt: str, level: str = "debug") -> io.StringIO:
    stream = io.StringIO()
    setup_logging(level, fmt, stream=stream)
    return stream


def json_lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_text_lines() -> None:
    out = capture("text")
    logging.getLogger("qmesh.gate").info("listening on %s", "127.0.0.1:11439", extra={"peer": 7})
    line = out.getvalue()
    assert line.endswith("\n") and line.count("\n") == 1
    assert "INFO" in line
    assert "qmesh.gate: listening on 127.0.0.1:11439 peer=7" in line


def test_json_lines() -> None:
    out = capture("json")
    log = logging.getLogger("qmesh.tunnel")
    log.warning("stream %d reset", 5, extra={"stream_id": 5, "peer": "web-1"})
    log.debug("second")
    first, second = json_lines(out)
    assert first["level"] == "warning"
    assert first["logger"] == "qmesh.tunnel"
    assert first["msg"] == "stream 5 reset"
    assert first["stream_id"] == 5 and first["peer"] == "web-1"
    assert isinstance(first["ts"], str) and first["ts"].endswith("Z")
    assert second["msg"] == "second"


def test_extra_cannot_overwrite_fixed_fields() -> None:
    out = capture("json")
    logging.getLogger("qmesh").info("hello", extra={"level": "fake"})
    (obj,) = json_lines(out)
    assert obj["level"] == "info"
    assert obj["extra_level"] == "fake"


def test_level_filters_and_setup_is_idempotent() -> None:
    capture("text", "debug")
    out = capture("text", "warning")
    logger = logging.getLogger("qmesh")
    logger.info("quiet")
    logger.warning("loud")
    assert "quiet" not in out.getvalue()
    assert out.getvalue().count("loud") == 1  # one handler, not two


def test_bad_level_or_format() -> None:
    with pytest.raises(ValueError, match="level"):
        setup_logging("verbose", "text")
    with pytest.raises(ValueError, match="format"):
        setup_logging("info", "xml")


def test_json_exception_field() -> None:
    out = capture("json")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("qmesh").exception("failed")
    (obj,) = json_lines(out)
    assert "RuntimeError: boom" in str(obj["exc"])


# -- secrets ------------------------------------------------------------------------


def emit_everywhere(secret: str) -> None:
    """Log ``secret`` through every path a log line is built from."""
    log = logging.getLogger("qmesh.gate.vault")
    log.info("in the message " + secret)
    log.info("in an argument %s", secret)
    log.info("in a repr argument %r", secret)
    log.info("in extra", extra={"token_value": secret, "nested": {"k": [secret]}})
    log.info("bad format call %s %s", secret)  # one argument short
    try:
        raise ValueError(f"exception text {secret}")
    except ValueError:
        log.exception("with exception")


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_registered_secret_never_appears(fmt: str) -> None:
    secret = "s3cr3t-" + secrets.token_hex(8) + '-"quoted\\'
    register_secret(secret)
    out = capture(fmt)
    emit_everywhere(secret)
    text = out.getvalue()
    assert text.count(REDACTED) >= 6
    assert secret not in text
    assert secrets_fragment(secret) not in text
    if fmt == "json":
        assert len(json_lines(out)) == 6


def secrets_fragment(secret: str) -> str:
    # The random middle of the secret: present in any escaped rendering.
    return secret.split("-")[1]


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_registered_bytes_secret_in_its_usual_renderings(fmt: str) -> None:
    key = secrets.token_bytes(32)
    register_secret(key)
    out = capture(fmt)
    log = logging.getLogger("qmesh")
    log.info("hex %s", key.hex())
    log.info("repr %r", key)
    import base64

    log.info("b64 %s url %s", base64.b64encode(key).decode(), base64.urlsafe_b64encode(key))
    text = out.getvalue()
    assert key.hex() not in text
    assert base64.b64encode(key).decode().rstrip("=") not in text
    assert base64.urlsafe_b64encode(key).decode().rstrip("=") not in text
    assert repr(key)[2:-1] not in text


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_credential_never_appears(fmt: str) -> None:
    credential = "qmesh-cred-v1." + secrets.token_urlsafe(120)
    out = capture(fmt)
    emit_everywhere(credential)
    text = out.getvalue()
    assert credential not in text
    assert credential[len("qmesh-cred-v1.") :][:20] not in text
    assert "qmesh-cred-v1.[REDACTED]" in text


@pytest.mark.parametrize("fmt", ["text", "json"])
@pytest.mark.parametrize(
    ("template", "hidden"),
    [
        ("connecting to postgresql://shop:Pa55w0rd!x@db:5432/shop", "Pa55w0rd!x"),
        ("connecting to postgres://shop:Pa55w0rd!x@db/shop", "Pa55w0rd!x"),
        ("login password=Pa55w0rd!x user=shop", "Pa55w0rd!x"),
        ("env PGPASSWORD=Pa55w0rd!x", "Pa55w0rd!x"),
        ("dict {'password': 'Pa55 w0rd!x'}", "Pa55 w0rd!x"),
        ('json {"password": "Pa55w0rd!x"}', "Pa55w0rd!x"),
        ("header Authorization: Bearer sk-Pa55w0rdx", "sk-Pa55w0rdx"),
        # qmesh's own bearer is APP_ID:APP_KEY, and the
        # key after the colon used to be printed.
        ("header Authorization: Bearer demo:Pa55w0rdx_-Q", "Pa55w0rdx_-Q"),
        ("calling with bearer demo:Pa55w0rdx_-Q now", "Pa55w0rdx_-Q"),
        ("headers [(b'authorization', b'Bearer demo:Pa55w0rdx_-Q')]", "Pa55w0rdx_-Q"),
        ('up.json {"bearer": "demo:Pa55w0rdx_-Q"}', "Pa55w0rdx_-Q"),
        ("flags app_key=Pa55w0rdx_-Q", "Pa55w0rdx_-Q"),
        ("header Authorization: Basic ZGVtbzpQYTU1dzByZHhfLVE=", "ZGVtbzpQYTU1dzByZHhfLVE"),
        ("headers [(b'authorization', b'Basic ZGVtbzpQYTU1dzByZHhfLVE=')]", "ZGVtbzpQYTU1dzBy"),
        ("header Authorization: Pa55w0rdx_-Q", "Pa55w0rdx_-Q"),
        ("header x-api-key: Pa55w0rdx_-Q", "Pa55w0rdx_-Q"),
        # A password with the URL's own delimiters in it goes whole.
        ("dsn postgresql://demo:Pa55@w0rd:x/y@localhost:11438/shop", "w0rd:x/y"),
        ("dsn postgresql://me@corp.example:Pa55w0rdx@db/shop", "Pa55w0rdx"),
    ],
)
def test_password_patterns_never_appear(fmt: str, template: str, hidden: str) -> None:
    out = capture(fmt)
    logging.getLogger("qmesh").info("%s", template)
    text = out.getvalue()
    assert hidden not in text
    assert REDACTED in text


def test_redaction_keeps_the_useful_parts() -> None:
    assert redact("postgresql://shop:pw@db:5432/x") == f"postgresql://shop:{REDACTED}@db:5432/x"
    assert redact("password=pw user=shop") == f"password={REDACTED} user=shop"
    assert redact("tokens=120 cost=0.01") == "tokens=120 cost=0.01"
    assert redact("Bearer demo:KEY sent") == f"Bearer {REDACTED} sent"
    assert redact("Authorization: Basic ZGVtbzpLRVk=") == f"Authorization: Basic {REDACTED}"
    # "basic" in prose is not a credential (nothing that decodes to "user:pass").
    assert redact("a basic setup, basic information") == "a basic setup, basic information"
    assert redact("postgresql://shop@db:5432/x") == "postgresql://shop@db:5432/x"


@pytest.mark.parametrize(
    "text",
    [
        "password=pw",
        "app_key: pw",
        '{"bearer": "demo:KEY"}',
        "Authorization: Bearer demo:KEY",
        "Authorization: Basic ZGVtbzpLRVk=",
        "postgresql://u:p@ss@h/db",
    ],
)
def test_redacting_twice_changes_nothing(text: str) -> None:
    # The filter redacts the message and the text formatter the whole line
    # again: a second pass must not mangle "[REDACTED]" or eat the scheme.
    once = redact(text)
    assert REDACTED in once
    assert redact(once) == once


def test_a_text_line_is_redacted_once_cleanly() -> None:
    out = capture("text")
    logging.getLogger("qmesh").info("auth %s then %s", "Authorization: Bearer demo:K", "app_key=K")
    line = out.getvalue()
    assert f"Authorization: Bearer {REDACTED} then app_key={REDACTED}\n" in line
    assert "demo:K" not in line and "]]" not in line


def test_empty_secret_is_ignored() -> None:
    register_secret("")
    register_secret(b"")
    assert redact("nothing to hide") == "nothing to hide"
