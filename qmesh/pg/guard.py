"""Statement checks for the Gate's Postgres relay: keep a read-only session
read-only, keep a policy's statement_timeout in place.

For: deciding, from the text of a Query or Parse message, whether the
statement tries to lift the limits qmesh put on the session, and the SQL the
relay sends *instead* of a refused statement, so that the refusal is an
ordinary server-side error and the server's transaction state stays exactly
what the client believes it is.

Not for: being the enforcement. Read-only sessions are read-only because the
Gate starts them with ``default_transaction_read_only=on`` as a startup
parameter, which the server applies; the relay additionally watches the
server's ParameterStatus reports and ends a session whose
``default_transaction_read_only`` turns ``off`` (PostgreSQL 14+ reports it).
This module only refuses the obvious ways to turn it off, early and with a
clear error. Text inspection cannot follow dynamic SQL built at run time
(``EXECUTE 'SET default_' || 'transaction_read_only ...'``); the report watch
catches that one afterwards. A database role that only has read privileges
remains the hard guarantee (see docs/pg.md).

How it reads SQL: a small lexer blanks out comments (which can hide a
keyword split, ``SET/**/default_transaction_read_only``), unquotes quoted
identifiers (``SET "DEFAULT_TRANSACTION_READ_ONLY"``), lower-cases
everything and collapses white space; string literals and dollar-quoted
bodies stay in, so names inside ``set_config('…')`` and inside a ``DO``
block are seen. A string that merely mentions a guarded name makes the
statement refused: false refusals are possible and preferred to the
opposite.
"""

from __future__ import annotations

import re
from typing import Final

import attrs

__all__ = ["Refusal", "check_statement", "normalise", "refusal_sql", "screen_words"]

READ_ONLY_SQLSTATE: Final = "25006"  # read_only_sql_transaction
TIMEOUT_SQLSTATE: Final = "42501"  # insufficient_privilege


@attrs.frozen
class Refusal:
    """Why a statement may not run, as the client will see it."""

    sqlstate: str
    message: str


# Where something other than plain SQL text starts.
_SPECIAL: Final = re.compile(
    r"""--|/\*|(?<![A-Za-z0-9_])[eE]'|'|"|(?<![A-Za-z0-9_$])\$(?:[A-Za-z_][A-Za-z0-9_]*)?\$"""
)
_STANDARD_STRING: Final = re.compile(r"'(?:[^']|'')*'?")
_ESCAPE_STRING: Final = re.compile(r"[eE]'(?:[^'\\]|\\.|'')*'?", re.DOTALL)
_QUOTED_IDENT: Final = re.compile(r'"((?:[^"]|"")*)"?')
_BLOCK_COMMENT_EDGE: Final = re.compile(r"/\*|\*/")


def normalise(sql: str) -> str:
    """``sql`` lower-cased with comments removed, quoted identifiers
    unquoted and runs of white space made one space. String literals and
    dollar-quoted bodies are kept, with their quotes. An unterminated
    literal or comment runs to the end (the server would refuse it anyway)."""
    out: list[str] = []
    i, n = 0, len(sql)
    while i < n:
        match = _SPECIAL.search(sql, i)
        if match is None:
            out.append(sql[i:])
            break
        out.append(sql[i : match.start()])
        token = match.group()
        i = match.start()
        if token == "--":
            end = sql.find("\n", i)
            i = n if end < 0 else end
            out.append(" ")
        elif token == "/*":
            depth, j = 0, i
            for edge in _BLOCK_COMMENT_EDGE.finditer(sql, i):
                depth += 1 if edge.group() == "/*" else -1
                j = edge.end()
                if depth == 0:
                    break
            i = n if depth else j
            out.append(" ")
        elif token == "'":
            literal = _STANDARD_STRING.match(sql, i)
            assert literal is not None
            out.append(literal.group())
            i = literal.end()
        elif token in ("e'", "E'"):
            literal = _ESCAPE_STRING.match(sql, i)
            assert literal is not None
            out.append(literal.group())
            i = literal.end()
        elif token == '"':
            ident = _QUOTED_IDENT.match(sql, i)
            assert ident is not None
            out.append(ident.group(1).replace('""', '"'))
            i = ident.end()
        else:  # a dollar quote: the body runs to the same tag
            end = sql.find(token, match.end())
            end = n if end < 0 else end + len(token)
            out.append(sql[i:end])
            i = end
    return " ".join("".join(out).lower().split())


_UNICODE_ESCAPE_STARTS: Final = ("u&'", 'u&"')
# Every refusal below needs one of these words in the (lower-cased) text;
# quoting and comments can split or wrap words but not remove their letters.
_READ_ONLY_TRIGGERS: Final = ("read", "set_config", "pg_settings", "characteristics")
_TRIGGERS: Final = (*_READ_ONLY_TRIGGERS, "statement_timeout")
_READ_ONLY_NAMES: Final = re.compile(
    r"(?<![a-z0-9_])(?:default_)?transaction_read_only(?![a-z0-9_])"
)
_TIMEOUT_NAME: Final = re.compile(r"(?<![a-z0-9_])statement_timeout(?![a-z0-9_])")
_READ_ONLY_HARMLESS: Final = re.compile(
    r"(?<![a-z0-9_])(?:show (?:default_)?transaction_read_only"
    r"|current_setting ?\( ?'(?:default_)?transaction_read_only' ?(?:, ?(?:true|false) ?)?\))"
)
_TIMEOUT_HARMLESS: Final = re.compile(
    r"(?<![a-z0-9_])(?:show statement_timeout|reset statement_timeout"
    r"|current_setting ?\( ?'statement_timeout' ?(?:, ?(?:true|false) ?)?\))"
)
_READ_WRITE: Final = re.compile(r"(?<![a-z0-9_])read write(?![a-z0-9_])")
_CHARACTERISTICS: Final = re.compile(r"(?<![a-z0-9_])session characteristics(?![a-z0-9_])")
# set_config whose first argument is not a plain literal: the name could be
# anything, so it is refused in a guarded session.
_SET_CONFIG: Final = re.compile(r"(?<![a-z0-9_])set_config ?\((?! ?'[a-z0-9_.]*' ?,)")
_PG_SETTINGS_UPDATE: Final = re.compile(
    r"(?<![a-z0-9_])update (?:only )?(?:pg_catalog ?\. ?)?pg_settings(?![a-z0-9_])"
)


def screen_words(*, read_only: bool, guard_timeout: bool) -> list[bytes]:
    """Words one of which a statement must contain (ASCII letters in any
    case) for :func:`check_statement` to refuse it: the relay engine lets a
    statement that names none through without asking Python. The trigger
    words of the fast path below, and the start of a Unicode escape."""
    triggers = _TRIGGERS if guard_timeout else _READ_ONLY_TRIGGERS
    if not (read_only or guard_timeout):
        return []
    return [word.encode() for word in (*triggers, *_UNICODE_ESCAPE_STARTS)]


def check_statement(sql: str, *, read_only: bool, guard_timeout: bool) -> Refusal | None:
    """Why ``sql`` (one Query's or Parse's text) may not run in a session
    that is ``read_only`` and/or has a policy ``statement_timeout``
    (``guard_timeout``); None if it may."""
    if not (read_only or guard_timeout):
        return None
    lowered = sql.lower()
    if any(start in lowered for start in _UNICODE_ESCAPE_STARTS):
        # U&"transaction\\005fread_only" names a setting this module cannot
        # see; refuse rather than decode the escapes' grammar here.
        return _refuse(read_only, "Unicode-escaped names (U&) are not accepted")
    triggers = _TRIGGERS if guard_timeout else _READ_ONLY_TRIGGERS
    if not any(word in lowered for word in triggers):
        return None  # the common case: nothing that could name a guarded setting
    text = normalise(sql)
    if _SET_CONFIG.search(text) or _PG_SETTINGS_UPDATE.search(text):
        return _refuse(read_only, "settings may not be changed through set_config or pg_settings")
    if read_only:
        rest = _READ_ONLY_HARMLESS.sub(" ", text)
        if (
            _READ_ONLY_NAMES.search(rest)
            or _READ_WRITE.search(rest)
            or _CHARACTERISTICS.search(rest)
        ):
            return Refusal(
                READ_ONLY_SQLSTATE,
                "qmesh: this application's sessions are read-only; statements that change "
                "transaction_read_only, default_transaction_read_only or ask for READ WRITE "
                "are refused",
            )
    if guard_timeout and _TIMEOUT_NAME.search(_TIMEOUT_HARMLESS.sub(" ", text)):
        return Refusal(
            TIMEOUT_SQLSTATE,
            "qmesh: statement_timeout is set by this application's policy and may not be "
            "changed (SHOW and RESET work)",
        )
    return None


def _refuse(read_only: bool, what: str) -> Refusal:
    if read_only:
        return Refusal(
            READ_ONLY_SQLSTATE, f"qmesh: this application's sessions are read-only; {what}"
        )
    return Refusal(
        TIMEOUT_SQLSTATE, f"qmesh: this application's policy fixes statement_timeout; {what}"
    )


def refusal_sql(refusal: Refusal) -> str:
    """A statement that fails on the server with the refusal's SQLSTATE and
    message, and does nothing else (PL/pgSQL's RAISE inside a DO block).

    Sent in place of the refused statement so the server, not the relay,
    produces the ErrorResponse: in a transaction block it aborts the
    transaction exactly as a failing statement would, and ReadyForQuery
    comes from the server with the true status.
    """
    if not re.fullmatch(r"[0-9A-Z]{5}", refusal.sqlstate) or "$qm$" in refusal.message:
        raise ValueError("refusal with an unusable SQLSTATE or message")
    return (
        "DO $qmesh$BEGIN RAISE EXCEPTION USING ERRCODE = '"
        + refusal.sqlstate
        + "', MESSAGE = $qm$"
        + refusal.message
        + "$qm$; END$qmesh$"
    )


_PARAM: Final = re.compile(r"(?<![a-zA-Z0-9_$])\$([0-9]+)")
_LITERAL: Final = re.compile(r"'(?:[^']|'')*'")


def parameter_count(sql: str, declared: int) -> int:
    """How many parameters a Bind for ``sql`` will carry: the highest ``$n``
    in the text, or the declared count if higher. Used to prepare the
    refusal in place of a refused Parse so the client's Bind still fits."""
    code = _LITERAL.sub(" ", normalise(sql))  # "$1" in a comment or a string is not one
    highest = max((int(m.group(1)) for m in _PARAM.finditer(code)), default=0)
    return min(max(highest, declared), 65535)
