"""What each application may do on the Gate's Postgres path.

For: turning the ``[gate.apps.APP_ID]`` tables of the configuration
(:class:`qmesh.config.GateAppConfig`, validated there with file and line)
into the :class:`AppPolicy` the Gate's relay enforces, and answering "may
this app open this alias". An app with no table gets :data:`DENY_ALL`.

Not for: enforcement itself. The relay applies ``read_only`` on the server
(``default_transaction_read_only``, which the app must not be able to turn
off), ``statement_timeout_ms`` as the session's ``statement_timeout``, and
counts sessions for ``max_sessions``; auditing is :mod:`qmesh.pg.audit`.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Final

import attrs

from qmesh.config import AUDIT_MODES, Config

__all__ = ["AUDIT_MODES", "DENY_ALL", "AppPolicy", "policy_for"]


@attrs.frozen
class AppPolicy:
    """One application's rights on the Postgres path."""

    aliases: tuple[str, ...]
    """:mod:`fnmatch` patterns (case-sensitive) of the database aliases it may open."""
    read_only: bool
    statement_timeout_ms: int | None
    """The session's ``statement_timeout``; None: the server's own setting."""
    max_sessions: int | None
    """Concurrent sessions of this app through this Gate; None: no limit."""
    audit_statements: str
    """``text``, ``hash`` or ``off``: what :class:`qmesh.pg.audit.AuditLog` keeps."""

    def allows(self, alias: str) -> bool:
        """Whether this app may open ``alias``."""
        return any(fnmatchcase(alias, pattern) for pattern in self.aliases)


DENY_ALL: Final = AppPolicy(
    aliases=(),
    read_only=True,
    statement_timeout_ms=None,
    max_sessions=0,
    audit_statements="text",
)
"""The policy of an app the configuration does not mention: no database at all."""


def policy_for(config: Config, app_id: str) -> AppPolicy:
    """``app_id``'s policy from ``config.gate.apps``; :data:`DENY_ALL` if absent."""
    app = config.gate.apps.get(app_id)
    if app is None:
        return DENY_ALL
    return AppPolicy(
        aliases=app.databases,
        read_only=app.read_only,
        statement_timeout_ms=app.statement_timeout_ms,
        max_sessions=app.max_sessions,
        audit_statements=app.audit_statements,
    )
