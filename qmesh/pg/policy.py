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
counts sessions for ``max_sessions``; auditing is :mod:`qmesh.pg.audit`;
``pool_mode``, ``pool_size`` and ``pool_wait_ms`` are the pool's
(:mod:`qmesh.pg.pool`).
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
from qmesh.config import (
    AUDIT_MODES,
    POOL_MODES,
    Config,
    GateAppConfig,
    llm_policy_to_json,
    parse_llm_policy,
)
from qmesh.state import InvalidValue, StateStore

__all__ = [
    "AUDIT_MODES",
    "DENY_ALL",
    "POOL_MODES",
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
    pool_mode: str = "session"
    """``session`` or ``transaction``: how long a session holds a server
    connection (see :class:`qmesh.config.GateAppConfig`)."""
    pool_size: int = 20
    """Server connections the app's pool holds per alias at this Gate."""
    pool_wait_ms: int = 30000
    """How long a session waits for a busy pool's connection before 53300."""

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
            pool_mode=app.pool_mode,
            pool_size=app.pool_size,
            pool_wait_ms=app.pool_wait_ms,
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


def policy_to_json(app: GateAppConfig, *, with_defaults: bool = False) -> str:
    """``app`` as stored. The pooling fields are written only where they
    differ from their defaults, so that a Gate of an earlier version (which
    refuses fields it does not know) keeps reading the policies of apps
    that do not pool; ``with_defaults`` writes them all, for people."""
    data: dict[str, Any] = {
        "databases": list(app.databases),
        "read_only": app.read_only,
        "statement_timeout_ms": app.statement_timeout_ms,
        "max_sessions": app.max_sessions,
        "audit_statements": app.audit_statements,
        "llm": llm_policy_to_json(app.llm),
    }
    defaults = GateAppConfig()
    for name in ("pool_mode", "pool_size", "pool_wait_ms"):
        if with_defaults or getattr(app, name) != getattr(defaults, name):
            data[name] = getattr(app, name)
    return json.dumps(data, sort_keys=True)


def _optional_count(data: Mapping[str, Any], key: str, least: int) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not least <= value <= _MAX_INT:
        raise InvalidValue(f"{key} must be an integer from {least} to {_MAX_INT}, or none")
    return value


def _count(data: Mapping[str, Any], key: str, default: int, least: int, most: int) -> int:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not least <= value <= most:
        raise InvalidValue(f"{key} must be an integer from {least} to {most}")
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
                           "audit_statements", "pool_mode", "pool_size", "pool_wait_ms",
                           "llm"}  # fmt: skip
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
    # Absent in policies stored before pooling existed: those keep the defaults.
    d = GateAppConfig()
    pool_mode = data.get("pool_mode", d.pool_mode)
    if pool_mode not in POOL_MODES:
        raise InvalidValue(f"pool_mode must be one of {', '.join(POOL_MODES)}")
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
        pool_mode=pool_mode,
        pool_size=_count(data, "pool_size", d.pool_size, 1, 10_000),
        pool_wait_ms=_count(data, "pool_wait_ms", d.pool_wait_ms, 1, 3_600_000),
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
