"""Logging for the ``qmesh`` logger hierarchy, with secrets kept out of it.

For: :func:`setup_logging` (human-readable lines, or one JSON object per
line), and redaction: values passed to :func:`register_secret` and anything
that looks like a credential (``qmesh-cred-v1.…``, ``password=…``, the
password in ``postgresql://user:pass@host``, the whole credential after
``Bearer`` or in an ``Authorization`` header, e.g. qmesh's own
``Bearer APP_ID:APP_KEY``, Basic credentials, ``app_key=…``) are replaced by
``[REDACTED]`` before a line is written, whether they arrive in the message,
its arguments, ``extra`` fields or an exception's text.

Not for: deciding what to log, metrics, or the audit chain (an audit record
is data, not a log line). Redaction is a safety net: code still must not log
secrets on purpose.
"""

from __future__ import annotations

import base64
import datetime
import json
import logging
import re
import sys
import threading
import time
from collections.abc import Callable
from typing import Final, TextIO

__all__ = ["RedactingFilter", "redact", "register_secret", "setup_logging"]

REDACTED: Final = "[REDACTED]"
LEVELS: Final = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
FORMATS: Final = ("text", "json")

# A credential token: everything up to whitespace, a quote or a bracket.
# "[" is excluded so that an already redacted "[REDACTED]" is never matched
# again, and ":" is included: qmesh's own bearer token is "APP_ID:APP_KEY",
# so stopping at the colon would hide the app id and print the key.
_TOKEN: Final = r"""[^\s"'`,;<>()\[\]{}]+"""


def _redact_basic(match: re.Match[str]) -> str:
    """``Basic <base64 of user:password>`` → ``Basic [REDACTED]``. Other words
    after "basic" (prose: "basic setup") do not decode to printable text with
    a colon in it, and are left alone."""
    encoded = match.group(2)
    try:
        decoded = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
        text = decoded.decode("utf-8")
    except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors
        return match.group(0)
    if ":" in text and text.isprintable():
        return f"{match.group(1)}{REDACTED}"
    return match.group(0)


# Patterns for secrets nobody registered: credentials handed to us by an
# operator, and the shapes in which passwords usually travel. Applied in
# order; each leaves "[REDACTED]" where a later one cannot match it again.
_PATTERNS: Final[tuple[tuple[re.Pattern[str], str | Callable[[re.Match[str]], str]], ...]] = (
    (re.compile(r"qmesh-cred-v1\.[A-Za-z0-9_-]+=*"), f"qmesh-cred-v1.{REDACTED}"),
    # userinfo in any URL: postgresql://user:secret@host, redis://:secret@host.
    # The password runs to the *last* "@" of the address, so one with "@",
    # ":" or "/" in it (postgresql://u:p@ss/w@host) goes whole.
    (
        re.compile(r"""([A-Za-z][A-Za-z0-9+.-]*://[^:/\s"'<>]*:)[^\s"'<>]*@"""),
        rf"\g<1>{REDACTED}@",
    ),
    # password=x, PGPASSWORD=x, "password": "x", api_key: x, "bearer": "id:key" ...
    (
        re.compile(
            r"""(?i)(password|passwd|pwd|secret|api[_-]?key|app[_-]?key|bearer"""
            r"""|(?:access|refresh|auth|id)[_-]?token)(["']?\s*[=:]\s*)"""
            # Not again over its own "[REDACTED]": formatters redact twice.
            r"""(?!\[REDACTED\])("[^"]*"|'[^']*'|[^\s,;&"'}\])]+)"""
        ),
        rf"\g<1>\g<2>{REDACTED}",
    ),
    # An Authorization header's credential, whatever its scheme (kept).
    (
        re.compile(
            r"""(?i)\b((?:proxy-)?authorization["']?\s*[=:]\s*["']?"""
            # Possessive: once a scheme matched, it is never taken for the token.
            rf"""(?:[A-Za-z][A-Za-z0-9_-]*\s+)?+){_TOKEN}"""
        ),
        rf"\g<1>{REDACTED}",
    ),
    # A bearer token anywhere: "Bearer demo:KEY" hides "demo:KEY" whole.
    (re.compile(rf"(?i)\b(bearer\s+){_TOKEN}"), rf"\g<1>{REDACTED}"),
    # Basic credentials outside a header line (a header list, a repr).
    (re.compile(r"(?i)\b(basic\s+)([A-Za-z0-9+/]{4,}={0,2})(?![A-Za-z0-9+/=])"), _redact_basic),
)

_registry_lock = threading.Lock()
_secrets: set[str] = set()
_secret_re: re.Pattern[str] | None = None


def register_secret(value: str | bytes) -> None:
    """Never let ``value`` reach a log line from now on (for this process).

    Bytes are also caught in the forms they are usually printed in: UTF-8
    text, hex, base64 (standard and URL-safe, with or without padding) and
    the inside of their ``repr``. The empty value is ignored.
    """
    global _secret_re
    if not value:
        return
    forms: set[str] = set()
    if isinstance(value, bytes):
        forms |= {
            value.hex(),
            base64.b64encode(value).decode(),
            base64.urlsafe_b64encode(value).decode(),
            repr(value)[2:-1],
        }
        forms |= {f.rstrip("=") for f in forms}
        try:
            forms.add(value.decode("utf-8"))
        except UnicodeDecodeError:
            pass
    else:
        forms |= {value, repr(value)[1:-1], json.dumps(value)[1:-1]}
    forms.discard("")
    with _registry_lock:
        _secrets.update(forms)
        # Longest first, so a secret that contains another is removed whole.
        alternatives = sorted(_secrets, key=len, reverse=True)
        _secret_re = re.compile("|".join(re.escape(s) for s in alternatives))


def redact(text: str) -> str:
    """``text`` with registered secrets and credential-shaped strings replaced."""
    pattern = _secret_re  # one read: register_secret swaps it whole
    if pattern is not None:
        text = pattern.sub(REDACTED, text)
    for regex, replacement in _PATTERNS:
        text = regex.sub(replacement, text)
    return text


# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD_ATTRS: Final = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys() | {"message", "asctime"}
)


def _extras(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS}


class RedactingFilter(logging.Filter):
    """Rewrites a record so its message, arguments and string ``extra`` fields
    are redacted. Attach it to a *handler*: a logger's own filters do not see
    records from its child loggers."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            # A format string that does not match its arguments. Formatting it
            # later would make logging print the raw arguments to stderr,
            # secrets included; keep the template and drop the arguments.
            message = f"{record.msg} [log arguments did not match the format]"
        record.msg = redact(message)
        record.args = None
        for key, value in _extras(record).items():
            if isinstance(value, str):
                setattr(record, key, redact(value))
        return True


class _TextFormatter(logging.Formatter):
    """``2026-01-02 03:04:05.678 INFO    qmesh.gate: message key=value``."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created))
        line = f"{stamp}.{int(record.msecs):03d} {record.levelname:<7} {record.name}: "
        line += record.getMessage()
        for key, value in _extras(record).items():
            line += f" {key}={value}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        # Last pass over the whole line: catches secrets in exception text
        # and in non-string extras.
        return redact(line)


def _redact_tree(value: object) -> object:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact(str(k)): _redact_tree(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_redact_tree(v) for v in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    return redact(str(value))


class _JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, then ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        obj: dict[str, object] = {
            "ts": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _extras(record).items():
            # An extra may not overwrite the fixed fields.
            obj[key if key not in obj else f"extra_{key}"] = value
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            obj["stack"] = self.formatStack(record.stack_info)
        # Redact the values before encoding: JSON escaping would otherwise
        # hide a secret with quotes or backslashes from the patterns.
        return json.dumps(_redact_tree(obj), ensure_ascii=False)


class _QmeshHandler(logging.StreamHandler[TextIO]):
    """The handler setup_logging installs (a type, so a second call can find it)."""


def setup_logging(level: str, fmt: str, *, stream: TextIO | None = None) -> None:
    """Send the ``qmesh`` loggers to ``stream`` (default stderr).

    ``level``: debug, info, warning or error. ``fmt``: ``text`` or ``json``.
    Calling it again replaces the previous setup. The ``qmesh`` logger stops
    propagating to the root logger, so an embedding program's root handlers
    do not print every line twice. Raises ValueError for an unknown level or
    format.
    """
    numeric = LEVELS.get(level.lower())
    if numeric is None:
        raise ValueError(f"unknown log level {level!r}; expected one of {', '.join(LEVELS)}")
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r}; expected one of {', '.join(FORMATS)}")
    logger = logging.getLogger("qmesh")
    for old in list(logger.handlers):
        if isinstance(old, _QmeshHandler):
            logger.removeHandler(old)
    handler = _QmeshHandler(stream if stream is not None else sys.stderr)
    handler.addFilter(RedactingFilter())
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _TextFormatter())
    logger.addHandler(handler)
    logger.setLevel(numeric)
    logger.propagate = False
