"""PII redaction: e-mail addresses, phone numbers, card numbers, IBANs, IP
addresses, US social security numbers and API-key-like secrets.

For: ``task=redact`` (the text with each finding replaced by ``[KIND]``)
and ``task=extract`` (the findings themselves). One alternation regex
scans the text once; card numbers must pass the Luhn check and IBANs the
mod-97 check, so order numbers and dates are not taken for them.

Not for: names and street addresses (that needs a model; a daemon's LLM can
do it), or guarantees: redaction lowers risk, it does not prove absence.
"""

from __future__ import annotations

import re
from typing import Final

import attrs

__all__ = ["Finding", "find_pii", "redact"]

_PII_RE: Final = re.compile(
    r"(?P<EMAIL>\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b)"
    r"|(?P<SECRET>\b(?:sk|pk|rk|ghp|gho|xox[bap])[-_][A-Za-z0-9_-]{16,}\b"
    r"|\bAKIA[0-9A-Z]{16}\b)"
    r"|(?P<IBAN>\b[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b)"
    r"|(?P<CARD>\b(?:[0-9][ -]?){12,18}[0-9]\b)"
    r"|(?P<SSN>\b[0-9]{3}-[0-9]{2}-[0-9]{4}\b)"
    r"|(?P<IP>\b(?:(?:25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])\.){3}"
    r"(?:25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])\b)"
    r"|(?P<PHONE>(?<![\w.+(])(?:\+|\()?[0-9][0-9 ()./-]{7,16}[0-9](?!\w|[.-][0-9]))"
)
_DIGITS_RE: Final = re.compile(r"[0-9]")
_DATE_RE: Final = re.compile(
    r"[0-9]{4}[-/.][0-9]{1,2}[-/.][0-9]{1,2}|[0-9]{1,2}[-/.][0-9]{1,2}[-/.][0-9]{4}"
)


@attrs.frozen
class Finding:
    kind: str
    """EMAIL, PHONE, CARD, IBAN, IP, SSN or SECRET."""
    start: int
    end: int
    text: str


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _iban_ok(text: str) -> bool:
    compact = text.replace(" ", "")
    rearranged = compact[4:] + compact[:4]
    number = "".join(str(int(ch, 36)) for ch in rearranged)
    return int(number) % 97 == 1


def _accept(kind: str, text: str) -> bool:
    if kind == "CARD":
        digits = "".join(_DIGITS_RE.findall(text))
        return 13 <= len(digits) <= 19 and _luhn(digits)
    if kind == "IBAN":
        return _iban_ok(text)
    if kind == "PHONE":
        # At least 8 digits, and not a date or a plain decimal number.
        return len(_DIGITS_RE.findall(text)) >= 8 and not _DATE_RE.fullmatch(text)
    return True


def find_pii(text: str) -> list[Finding]:
    """Every finding in ``text``, in order."""
    found: list[Finding] = []
    for match in _PII_RE.finditer(text):
        kind = match.lastgroup
        assert kind is not None
        value = match.group()
        if _accept(kind, value):
            found.append(Finding(kind, match.start(), match.end(), value))
    return found


def redact(text: str) -> tuple[str, dict[str, int]]:
    """``text`` with each finding replaced by ``[KIND]``, and the count per kind."""
    counts: dict[str, int] = {}

    def replace(match: re.Match[str]) -> str:
        kind = match.lastgroup
        assert kind is not None
        value = match.group()
        if not _accept(kind, value):
            return value
        counts[kind] = counts.get(kind, 0) + 1
        return f"[{kind}]"

    return _PII_RE.sub(replace, text), counts
