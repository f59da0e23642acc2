"""Who may do what at a Gate: operator roles and the rights each one holds.

For: the vocabulary every door of the Gate checks against — the HTTP API
(:meth:`qmesh.web.auth.AppAuthenticator.require`), the Postgres mimic and
the command line that adds operators (``qmesh operators``). A principal is
an app of the state store; an *operator* is one with a role. Rights:

- ``metrics``: ``GET /metrics`` (a Prometheus job's key);
- ``view``: the dashboard and every read-only operator API (inventory,
  tunnel sessions, discovery, routing decisions, every app's budgets);
- ``operate``: what changes the running mesh without touching a secret —
  ending sessions, stopping and starting models, running a discovery scan,
  sending a request to one node directly;
- ``use``: the application surface — LLM and memory APIs, the Postgres
  mimic — as the principal itself, under its own policy and budget.

Roles are nested, each holding the rights of the one before: ``metrics`` ⊂
``viewer`` ⊂ ``operator`` ⊂ ``admin``. An operator of a narrower role than
``admin`` has no ``use`` right: a key that reads the dashboard or scrapes
metrics cannot spend a budget or open a database session. ``admin`` holds
everything (the app named ``admin`` made at setup is one). The vault's
secrets and the state's apps are changed from the command line on the
Gate's own machine, whose access to the state and master key is the right.
A principal without a role is an application: ``use`` only.

Not for: checking keys (:mod:`qmesh.web.auth`, :mod:`qmesh.pg.scram`) or
storing roles (:mod:`qmesh.state.store`).
"""

from __future__ import annotations

import enum
from typing import Final

__all__ = ["ADMIN_APP", "OPERATOR_ROLES", "Right", "describe_role", "rights_of"]

ADMIN_APP: Final = "admin"
"""The app made at setup; an app of this name is made an admin unless a
role is given (as it has been the operator's key from the start)."""


class Right(enum.Enum):
    METRICS = "metrics"
    VIEW = "view"
    OPERATE = "operate"
    USE = "use"


OPERATOR_ROLES: Final = ("metrics", "viewer", "operator", "admin")
"""Narrowest first: each role holds the rights of every role before it."""

_RIGHTS: Final[dict[str | None, frozenset[Right]]] = {
    None: frozenset({Right.USE}),
    "metrics": frozenset({Right.METRICS}),
    "viewer": frozenset({Right.METRICS, Right.VIEW}),
    "operator": frozenset({Right.METRICS, Right.VIEW, Right.OPERATE}),
    "admin": frozenset(Right),
}


def rights_of(role: str | None) -> frozenset[Right]:
    """What a principal of ``role`` (None: an application) may do; an
    unknown role (written by a newer version) holds nothing."""
    return _RIGHTS.get(role, frozenset())


def describe_role(role: str | None) -> str:
    rights = sorted(right.value for right in rights_of(role))
    return f"{role or 'application'}: {', '.join(rights) or 'nothing'}"
