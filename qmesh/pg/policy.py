"""What each application may do on the Gate's Postgres path.

For: turning an app's policy into the :class:`AppPolicy` the Gate's relay
enforces, and answering "may this app open this alias". A policy comes from
one of two places:

- the state (``qmesh apps policy APP …``), shared by every Gate on it and
  changed without a restart: a running Gate reloads it when the state
  changes (its StateWatcher), and new sessions follow at once;
- the Gate's configuration, ``[gate.apps.APP_ID]``
  (:class:`qmesh.config.GateAppConfig`, validated there with file and line).

**The state wins, for the whole app**: an app with a stored policy is
judged by it alone, and ``[gate.apps.APP_ID]`` applies to apps without one
(``qmesh apps policy APP --from-config`` forgets the stored one). An app
with neither gets :data:`DENY_ALL`. :class:`PolicyBook` holds both and
answers from memory: no query per login.

Not for: enforcement itself. The relay applies ``read_only`` on the server
(``default_transaction_read_only``, which the app must not be able to turn
off), ``statement_timeout_ms`` as the session's ``statement_timeout``, and
counts sessions for ``max_sessions``; auditing is :mod:`qmesh.pg.audit`.
A changed policy applies to sessions that start after it; live sessions
keep the rights they logged in with.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from fnmatch import fnmatchcase
from typing import Any, Final

import attrs

from qmesh import peerjson
from qmesh.config import AUDIT_MODES, Config, GateAppConfig, llm_policy_to_json, parse_llm_policy
from qmesh.state import InvalidValue, StateStore

__all__ = [
    "AUDIT_MODES",
    "DENY_ALL",
    "AppPolicy",
    "PolicyBook",
    "policy_for",
    "policy_from_json",
    "policy_to_json",
]

log = logging.getLogger(__name__)


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

    @classmethod
    def of(cls, app: GateAppConfig) -> AppPolicy:
        return cls(
            aliases=app.databases,
            read_only=app.read_only,
            statement_timeout_ms=app.statement_timeout_ms,
            max_sessions=app.max_sessions,
            audit_statements=app.audit_statements,
        )


DENY_ALL: Final = AppPolicy(
    aliases=(),
    read_only=True,
    statement_timeout_ms=None,
    max_sessions=0,
    audit_statements="text",
)
"""The policy of an app that neither the state nor the configuration mentions:
no database at all."""


def policy_for(config: Config, app_id: str) -> AppPolicy:
    """``app_id``'s policy from ``config.gate.apps`` alone; :data:`DENY_ALL` if absent."""
    app = config.gate.apps.get(app_id)
    return DENY_ALL if app is None else AppPolicy.of(app)


# -- stored policies ---------------------------------------------------------------------

_MAX_INT: Final = 2**31 - 1
_MAX_POLICY_BYTES: Final = 64 * 1024


def policy_to_json(app: GateAppConfig) -> str:
    return json.dumps(
        {
            "databases": list(app.databases),
            "read_only": app.read_only,
            "statement_timeout_ms": app.statement_timeout_ms,
            "max_sessions": app.max_sessions,
            "audit_statements": app.audit_statements,
            "llm": llm_policy_to_json(app.llm),
        },
        sort_keys=True,
    )


def _optional_count(data: Mapping[str, Any], key: str, least: int) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not least <= value <= _MAX_INT:
        raise InvalidValue(f"{key} must be an integer from {least} to {_MAX_INT}, or none")
    return value


def policy_from_json(text: str) -> GateAppConfig:
    """A stored policy, checked as the configuration's reader checks a
    ``[gate.apps.*]`` table. Raises InvalidValue."""
    try:
        # The state is shared (every Gate and command on it writes it): parse
        # what comes back with its size and depth bounded.
        data = peerjson.loads(text, max_bytes=_MAX_POLICY_BYTES, max_depth=4, what="policy")
    except ValueError as exc:
        raise InvalidValue(f"a stored policy is not usable JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidValue("a stored policy is not a JSON object")
    unknown = set(data) - {"databases", "read_only", "statement_timeout_ms", "max_sessions",
                           "audit_statements", "llm"}  # fmt: skip
    if unknown:
        raise InvalidValue(f"unknown policy field(s): {', '.join(sorted(unknown))}")
    databases = data.get("databases", [])
    if not isinstance(databases, list) or not all(
        isinstance(d, str) and 0 < len(d) <= 200 for d in databases
    ):
        raise InvalidValue("databases must be a list of alias patterns")
    read_only = data.get("read_only", False)
    if not isinstance(read_only, bool):
        raise InvalidValue("read_only must be true or false")
    audit = data.get("audit_statements", "text")
    if audit not in AUDIT_MODES:
        raise InvalidValue(f"audit_statements must be one of {', '.join(AUDIT_MODES)}")
    llm = data.get("llm", {})
    if not isinstance(llm, dict):
        raise InvalidValue("llm must be a JSON object")
    try:
        llm_policy = parse_llm_policy(llm)
    except ValueError as exc:
        raise InvalidValue(f"llm.{exc.args[0]}: {exc.args[1]}") from None
    return GateAppConfig(
        llm=llm_policy,
        databases=tuple(databases),
        read_only=read_only,
        statement_timeout_ms=_optional_count(data, "statement_timeout_ms", 1),
        max_sessions=_optional_count(data, "max_sessions", 0),
        audit_statements=audit,
    )


class PolicyBook:
    """Every app's policy, from the state and the configuration, in memory."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.stored: dict[str, GateAppConfig] = {}

    def load(self, store: StateStore) -> None:
        """Read the stored policies again (at start, and after every change to
        the state). A stored policy that does not parse denies its app
        everything, and says so in the log, rather than falling back."""
        stored: dict[str, GateAppConfig] = {}
        for app_id, text in store.app_policies().items():
            try:
                stored[app_id] = policy_from_json(text)
            except InvalidValue as exc:
                log.warning("app %r: its stored policy is unusable (%s): denied", app_id, exc)
                stored[app_id] = GateAppConfig(max_sessions=0)
        self.stored = stored

    def source(self, app_id: str) -> str | None:
        """``state``, ``config`` or None: where ``app_id``'s policy comes from."""
        if app_id in self.stored:
            return "state"
        return "config" if app_id in self.config.gate.apps else None

    def settings(self, app_id: str) -> GateAppConfig | None:
        """``app_id``'s policy as configured or stored; None: it has none."""
        stored = self.stored.get(app_id)
        return stored if stored is not None else self.config.gate.apps.get(app_id)

    def policy_for(self, app_id: str) -> AppPolicy:
        settings = self.settings(app_id)
        return DENY_ALL if settings is None else AppPolicy.of(settings)
