"""``qmesh secrets rotate``: a new password on the real server and in the vault.

For: generating a strong password, applying it with ``ALTER ROLE … PASSWORD``
while logged in with the current credentials, and moving the vault to it
with no moment at which the password the server has is unknown to the vault.
The password is sent to the server already hashed, as a SCRAM-SHA-256
verifier (PostgreSQL stores such a string as it is), so the plain password
never reaches the server's logs, ``pg_stat_statements`` or
``pg_stat_activity``.

Not for: rotating app keys (:meth:`qmesh.state.StateStore.rotate_app_key`)
or the master key, and not for roles the Gate does not log in as.

The procedure, and why it is safe to interrupt at any point:

1. The new password is sealed into the alias's *pending* slot in the vault,
   in the same transaction that reads the current secret. The slot is also
   the rotation's lock (a lease of :data:`LEASE_S`).
2. A connection with the *current* credentials runs ``ALTER ROLE``. If the
   server refuses, or cannot be reached, the slot is cleared: nothing changed.
3. The pending secret is promoted to current, with retries.

A crash or a lost connection between 2 and 3 leaves the new password in the
pending slot. The next rotation of that alias finds it and settles it by
logging in: if the pending password works it is promoted, if the current
one works the pending one is discarded, and only then does it rotate. While
a rotation is pending a relay whose login fails can try
:meth:`qmesh.pg.vault.Vault.get_pending`.
"""

from __future__ import annotations

import base64
import secrets
import time
from collections.abc import Callable
from typing import Final

import attrs
import psycopg
from psycopg import sql

from qmesh.pg.errors import RotationError, VaultError
from qmesh.pg.vault import DatabaseSecret, Vault
from qmesh.state import SCRAM_ITERATIONS, StateError, scram_keys

__all__ = ["LEASE_S", "RotationResult", "new_password", "rotate_password", "scram_verifier"]

LEASE_S: Final = 300.0
"""How long a pending rotation locks its alias against another rotation.
Far longer than one rotation can take (connect and statement timeouts)."""
CONNECT_TIMEOUT_S: Final = 10
STATEMENT_TIMEOUT_MS: Final = 30_000
VAULT_RETRIES: Final = 5
PASSWORD_BYTES: Final = 32
"""256 bits of randomness, as 43 URL-safe characters (no quoting issues anywhere)."""


@attrs.frozen
class RotationResult:
    """What :func:`rotate_password` did."""

    secret: DatabaseSecret
    """The vault's secret now (``repr`` hides the password)."""
    settled: str | None
    """How an earlier, interrupted rotation was settled first: ``promoted``
    (the server had its password), ``discarded`` (it did not), or None."""
    verified: bool
    """Whether a fresh login with the new password succeeded."""


def new_password() -> str:
    return secrets.token_urlsafe(PASSWORD_BYTES)


def scram_verifier(
    password: str, *, salt: bytes | None = None, iterations: int = SCRAM_ITERATIONS
) -> str:
    """The SCRAM-SHA-256 secret PostgreSQL would store for ``password``:
    ``SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`` (base64).
    ``ALTER ROLE … PASSWORD`` given this string stores it unchanged."""
    salt = secrets.token_bytes(16) if salt is None else salt
    stored_key, server_key = scram_keys(password, salt, iterations)

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode("ascii")

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def _connect(secret: DatabaseSecret) -> psycopg.Connection[tuple[object, ...]]:
    kwargs: dict[str, str | int] = {
        "host": secret.host,
        "port": secret.port,
        "dbname": secret.dbname,
        "user": secret.user,
        "password": secret.password,
        "sslmode": secret.sslmode,
        "connect_timeout": CONNECT_TIMEOUT_S,
        "application_name": "qmesh secrets rotate",
    }
    if secret.sslrootcert is not None:
        kwargs["sslrootcert"] = secret.sslrootcert
    return psycopg.connect(autocommit=True, **kwargs)  # type: ignore[arg-type]


def _scrub(text: str, *passwords: str) -> str:
    # Server and libpq messages do not quote passwords, but the cost of being
    # wrong about that is a password on a terminal.
    for password in passwords:
        text = text.replace(password, "[REDACTED]")
    return " ".join(text.split())


def _logs_in(secret: DatabaseSecret) -> bool:
    try:
        with _connect(secret) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error:
        return False
    return True


def _finish(
    vault: Vault, alias: str, *, promote: bool, sleep: Callable[[float], None]
) -> Exception | None:
    """Promote or clear the pending slot, retrying; the last error if all tries fail."""
    error: Exception | None = None
    for attempt in range(VAULT_RETRIES):
        try:
            if not vault.finish_rotation(alias, promote=promote):
                return VaultError(
                    f"the vault entry for {alias!r} was replaced during the rotation "
                    "(`qmesh secrets set`?), so its pending password is gone"
                )
            return None
        except (VaultError, StateError, OSError) as exc:
            error = exc
            sleep(0.2 * 2**attempt)
    return error


def _settle(
    vault: Vault,
    current: DatabaseSecret,
    interrupted: DatabaseSecret,
    sleep: Callable[[float], None],
) -> str:
    """Decide an interrupted rotation by which password logs in."""
    alias = current.alias
    if _logs_in(interrupted):
        outcome, promote = "promoted", True
    elif _logs_in(current):
        outcome, promote = "discarded", False
    else:
        vault.release_rotation(alias)
        raise RotationError(
            f"an earlier rotation of {alias!r} was interrupted, and neither the vault's "
            f"current nor its pending password logs in as {current.user!r} at "
            f"{current.host}:{current.port}: the server is unreachable, or the password was "
            "changed outside qmesh (then store the right one with `qmesh secrets set`)",
            server_changed=True,
        )
    error = _finish(vault, alias, promote=promote, sleep=sleep)
    if error is not None:
        raise RotationError(
            f"could not settle the interrupted rotation of {alias!r}: {error}",
            server_changed=True,
        )
    return outcome


def rotate_password(
    vault: Vault, alias: str, *, sleep: Callable[[float], None] = time.sleep
) -> RotationResult:
    """Rotate ``alias``'s password; see the module docstring. Raises
    :class:`RotationError` (``server_changed`` says whether the server may
    already have the new password) or :class:`VaultError`."""
    password = new_password()
    current, interrupted = vault.begin_rotation(alias, password, stale_after_s=LEASE_S)
    settled: str | None = None
    if interrupted is not None:
        settled = _settle(vault, current, interrupted, sleep)
        current, interrupted = vault.begin_rotation(alias, password, stale_after_s=LEASE_S)
        if interrupted is not None:  # pragma: no cover - _settle just cleared the slot
            raise RotationError(f"the rotation of {alias!r} could not take its lock")
    target = f"{current.user!r} at {current.host}:{current.port}"

    try:
        conn = _connect(current)
    except psycopg.Error as exc:
        vault.finish_rotation(alias, promote=False)
        raise RotationError(
            f"cannot log in as {target} with the vault's current password, nothing was "
            f"changed: {_scrub(str(exc), current.password, password)}"
        ) from None
    try:
        with conn:
            conn.execute(sql.SQL("SET statement_timeout = {}").format(STATEMENT_TIMEOUT_MS))
            conn.execute(
                sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                    sql.Identifier(current.user), sql.Literal(scram_verifier(password))
                )
            )
    except psycopg.OperationalError as exc:
        # The connection broke: the ALTER may or may not have committed. The
        # pending slot keeps the new password; settle now if the server answers.
        detail = _scrub(str(exc), current.password, password)
        try:
            settled_now = _settle(vault, current, current.with_password(password), sleep)
        except RotationError:
            raise RotationError(
                f"lost the connection to {target} while changing the password ({detail}); "
                f"whether the server has the new one is unknown. It is kept, encrypted, as "
                f"the pending password of {alias!r}; run `qmesh secrets rotate db.{alias}` "
                "again once the server is reachable: it finds out which password the server "
                "has and settles the vault",
                server_changed=True,
            ) from None
        if settled_now == "discarded":
            raise RotationError(
                f"lost the connection to {target} before the password changed ({detail}); "
                "nothing was changed"
            ) from None
    except psycopg.Error as exc:
        vault.finish_rotation(alias, promote=False)
        raise RotationError(
            f"the server refused to change the password of {target}, nothing was changed: "
            f"{_scrub(str(exc), current.password, password)}"
        ) from None
    else:
        error = _finish(vault, alias, promote=True, sleep=sleep)
        if error is not None:
            try:
                vault.release_rotation(alias)
            except (VaultError, StateError, OSError):
                pass
            raise RotationError(
                f"the server now has the new password for {target}, but the vault could not "
                f"be updated: {error}. The new password is kept, "
                f"encrypted, as the pending password of {alias!r} (a Gate whose login fails "
                f"uses it); run `qmesh secrets rotate db.{alias}` again to finish: it finds "
                "the interrupted rotation, confirms the server has that password and makes "
                "it current",
                server_changed=True,
            )
    rotated = vault.get(alias)
    if rotated is None or rotated.password != password:
        raise RotationError(
            f"the vault entry for {alias!r} changed during the rotation; check it with "
            "`qmesh secrets list`",
            server_changed=True,
        )
    return RotationResult(secret=rotated, settled=settled, verified=_logs_in(rotated))
