"""Counts the Gates of one state keep together: Postgres sessions per app
(``max_sessions``), pooled server connections per alias
(``gate.pg_pool.max_server_connections_per_alias``).

For: taking one more only while the live Gates hold fewer than a limit,
in one write transaction, so that two Gates at the limit cannot both take
the last one; a Gate that stopped or went silent no longer counts (its
rows are cleared when it registers again, :mod:`qmesh.cluster.registry`).

Not for: what is counted, or the limits (:mod:`qmesh.pg`).
"""

from __future__ import annotations

import contextlib
from typing import Final

from qmesh.state.db import Connection, WriteScope

__all__ = ["GateCounts"]

_Counter = tuple[str, str, str]
"""(table, key column, count column)."""
_APP_SESSIONS: Final[_Counter] = ("app_sessions", "app_id", "sessions")
_POOL_CONNECTIONS: Final[_Counter] = ("pool_connections", "alias", "connections")


class GateCounts:
    """The counting half of :class:`qmesh.state.StateStore`."""

    def _write(
        self, *, announce: bool = True, scope: WriteScope = "state"
    ) -> contextlib.AbstractContextManager[Connection]:
        raise NotImplementedError

    def claim_app_session(self, gate: str, app_id: str, limit: int, now: float) -> bool:
        """Count one more Postgres session of ``app_id`` at ``gate``, unless
        the Gates hold ``limit`` already (see :meth:`_claim`). False at the limit."""
        return self._claim(_APP_SESSIONS, gate, app_id, limit, now)

    def release_app_session(self, gate: str, app_id: str) -> None:
        """A session :meth:`claim_app_session` counted has ended."""
        self._release(_APP_SESSIONS, gate, app_id)

    def claim_server_connection(self, gate: str, alias: str, limit: int, now: float) -> bool:
        """Count one more pooled server connection to ``alias`` opened by
        ``gate``, unless the Gates hold ``limit`` already (see :meth:`_claim`)."""
        return self._claim(_POOL_CONNECTIONS, gate, alias, limit, now)

    def release_server_connection(self, gate: str, alias: str) -> None:
        """A connection :meth:`claim_server_connection` counted was closed."""
        self._release(_POOL_CONNECTIONS, gate, alias)

    def _claim(self, counter: _Counter, gate: str, key: str, limit: int, now: float) -> bool:
        """One more of ``key`` at ``gate``, unless ``gate`` and every live
        Gate of the registry hold ``limit`` together (a gone or stopped
        Gate's do not count). One write transaction: two Gates at the limit
        cannot both take the last one."""
        table, column, count = counter
        with self._write(announce=False) as conn:
            held = conn.execute(
                f"SELECT coalesce(sum(s.{count}), 0) FROM {table} AS s"
                " LEFT JOIN gates AS g ON g.name = s.gate"
                f" WHERE s.{column} = ? AND (s.gate = ? OR (g.stopped_at IS NULL"
                " AND ? - g.heartbeat_at <= g.gone_after_s))",
                (key, gate, now),
            ).fetchone()[0]
            if int(held) >= limit:
                return False
            conn.execute(
                f"INSERT INTO {table} (gate, {column}, {count}) VALUES (?, ?, 1)"
                f" ON CONFLICT (gate, {column}) DO UPDATE SET {count} = {table}.{count} + 1",
                (gate, key),
            )
            return True

    def _release(self, counter: _Counter, gate: str, key: str) -> None:
        table, column, count = counter
        with self._write(announce=False) as conn:
            conn.execute(
                f"UPDATE {table} SET {count} = {count} - 1"
                f" WHERE gate = ? AND {column} = ? AND {count} > 0",
                (gate, key),
            )
