"""The exception family of :mod:`qmesh.pg`.

For: the errors the vault, the DSN parser, policy and rotation raise for the
operator to act on. Every message is safe to print and to log: none contains
a password, a master key or any other secret, not even a fragment of one
(see :class:`DsnError` for how a DSN typo is described).

Not for: bugs (those stay ordinary Python exceptions) or errors of the wire
relay, which answers clients with Postgres ErrorResponses instead.
"""

from __future__ import annotations

__all__ = ["DsnError", "PgError", "RotationError", "VaultError"]


class PgError(Exception):
    """Base class: something the operator can fix about the Gate's databases."""


class VaultError(PgError):
    """The vault or its master key cannot be used as asked: no master key, a
    malformed one, a file with loose permissions, a secret encrypted with a
    different key, a ciphertext that fails authentication (tampered, or moved
    to another alias), or an invalid alias."""


class DsnError(VaultError, ValueError):
    """A DSN given to :meth:`qmesh.pg.vault.Vault.set` is malformed.

    The message names the bad part (``port``, ``sslmode``, the third
    ``key=value`` pair, ...) and what was expected, and never repeats a value
    taken from the DSN: a typo near the password could otherwise put a piece
    of it on the operator's terminal or in a log.
    """


class RotationError(PgError):
    """``qmesh secrets rotate`` could not complete.

    ``server_changed`` tells whether the real server may already have the
    new password: when True the vault keeps it (encrypted, as the pending
    password of the alias) and the message says how to finish.
    """

    def __init__(self, message: str, *, server_changed: bool = False) -> None:
        super().__init__(message)
        self.server_changed = server_changed
