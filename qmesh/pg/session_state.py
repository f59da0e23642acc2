"""Whether a statement leaves session state behind for the next transaction
on its connection.

For: transaction pooling (:mod:`qmesh.pg.multiplex`), which pins a session
to its server connection for such a statement, and resets what it knows of
the connection's prepared statements for one that drops them.

Not for: the statement guard (:mod:`qmesh.pg.guard`), whose normalised text
this reuses; text inspection cannot see state built by dynamic SQL.
"""

from __future__ import annotations

import re
from typing import Final

from qmesh.pg.guard import normalise

__all__ = ["session_state_of"]

_STATE_WORDS: Final = (b"set", b"listen", b"prepare", b"hold", b"temp", b"advisory",
                       b"load", b"deallocate", b"discard")  # fmt: skip
_STATEMENT_START: Final = r"(?:^|;) ?"
_PINS: Final = re.compile(
    "|".join(
        (
            # SET and SET SESSION; not SET LOCAL, SET TRANSACTION, SET CONSTRAINTS
            _STATEMENT_START + r"set (?!local |transaction |constraints )",
            _STATEMENT_START + r"(?:listen|prepare|load) ",
            r"(?<![a-z0-9_])with hold(?![a-z0-9_])",
            r"(?<![a-z0-9_])(?:create (?:or replace )?(?:(?:global|local) )?|into )"
            r"(?:temp|temporary) ",
            r"(?<![a-z0-9_])pg_(?:try_)?advisory_lock(?:_shared)? ?\(",
            r"(?<![a-z0-9_])set_config ?\(",
            _STATEMENT_START + r"deallocate (?!all|prepare all)",
        )
    )
)
_RESETS: Final = re.compile(
    _STATEMENT_START + r"(?:deallocate (?:prepare )?all|discard all)(?![a-z0-9_])"
)


def session_state_of(sql: bytes) -> str | None:
    """``pin`` if ``sql`` leaves session state behind for the next
    transaction, ``reset`` if it drops the session's prepared statements
    (and so the ones the connection shares), None if it is
    transaction-scoped. False pins are possible (a literal that merely
    contains ``SET x``), and harmless: they only cost sharing."""
    lowered = sql.lower()
    if not any(word in lowered for word in _STATE_WORDS):
        return None  # the common case
    text = normalise(sql.decode("utf-8", "replace"))
    if _RESETS.search(text):
        return "reset"
    if _PINS.search(text):
        return "pin"
    return None
