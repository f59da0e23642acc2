"""The Gate's state store: SQLite (one file, the default) or PostgreSQL.

For: the durable records the Gate needs, starting with enrolled edge
identities (MiniGates and Daemons, by X25519 public key) and applications
(app ids with SCRAM-SHA-256 verifiers of their app keys), applying the
backend's schema versions (:mod:`qmesh.state.migrations`,
:mod:`qmesh.state.pg_schema`) as it opens; the capabilities' own stores
(the vault, the ledger, the audit, the memory) run their statements on its
connections through ``_read()`` and ``_write()``.

Not for: private keys (edges keep theirs; the Gate's is a file, see
:mod:`qmesh.identity`), secrets in clear (app keys are stored only as SCRAM
verifiers, so even a copy of the database cannot log in), or async I/O. The
store is synchronous; Trio code calls it with ``trio.to_thread.run_sync``.
How each backend shares itself between threads, processes and Gates, and
keeps one writer at a time: :mod:`qmesh.state.db`.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import attrs

from qmesh.operator_roles import ADMIN_APP, OPERATOR_ROLES
from qmesh.roles import EDGE_ROLES
from qmesh.state.db import DATABASE_ERRORS, Connection, Database, WriteScope, open_database
from qmesh.state.errors import (
    AppExists,
    IdentityExists,
    InvalidValue,
    StateUnavailable,
)
from qmesh.state.gate_counts import GateCounts
from qmesh.state.migrations import MIGRATIONS
from qmesh.state.pg_schema import POSTGRES_MIGRATIONS

__all__ = [
    "SCRAM_ITERATIONS",
    "App",
    "AppKeys",
    "AppVerifier",
    "Identity",
    "StateStore",
    "check_name",
    "scram_keys",
]

SCRAM_ITERATIONS: Final = 4096
"""PBKDF2 rounds for app-key verifiers: PostgreSQL's default for SCRAM-SHA-256."""
PUBLIC_KEY_LEN: Final = 32
MAX_TTL_S: Final = 10 * 365 * 86400.0
# Identity names and app ids: 1-63 characters. 63 is PostgreSQL's limit for a
# role name, and an app id is the user name an app gives the Postgres mimic.
_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def check_name(name: str, what: str = "name") -> str:
    """Return ``name`` if it is a valid identity name or app id, else raise InvalidValue."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise InvalidValue(
            f"{what} must be 1-63 letters, digits, '.', '_' or '-', "
            f"starting with a letter or digit; got {name!r}"
        )
    return name


def scram_keys(password: str, salt: bytes, iterations: int) -> tuple[bytes, bytes]:
    """``(StoredKey, ServerKey)`` for SCRAM-SHA-256 (RFC 5802, RFC 7677).

    SaltedPassword = PBKDF2-HMAC-SHA256(password, salt, iterations);
    ClientKey = HMAC(SaltedPassword, "Client Key"); StoredKey = SHA-256(ClientKey);
    ServerKey = HMAC(SaltedPassword, "Server Key"). The password is used as
    UTF-8 without SASLprep: the keys qmesh generates are ASCII, for which
    SASLprep changes nothing.
    """
    salted = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    return stored_key, server_key


@attrs.frozen
class Identity:
    """An enrolled MiniGate or Daemon."""

    name: str
    role: str
    public_key: bytes
    created_at: float
    revoked_at: float | None = None
    expires_at: float | None = None
    """When its credential stops working unless renewed; None: never."""
    ttl_s: float | None = None
    """What a renewal extends it to (from the renewal's time)."""

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and self.expires_at <= now


@attrs.frozen
class App:
    """An application, as listed (without its verifier)."""

    app_id: str
    created_at: float
    disabled_at: float | None = None
    """When ``qmesh apps disable`` switched it off; None while it is enabled."""
    role: str | None = None
    """An operator's role (:mod:`qmesh.operator_roles`); None for an application."""

    @property
    def disabled(self) -> bool:
        return self.disabled_at is not None


@attrs.frozen
class AppVerifier:
    """What the Postgres mimic needs to run SCRAM-SHA-256 for an app."""

    app_id: str
    salt: bytes
    iterations: int
    stored_key: bytes = attrs.field(repr=False)
    server_key: bytes = attrs.field(repr=False)
    created_at: float
    expires_at: float | None = None
    """None for the app's current key; for a previous key kept by
    :meth:`StateStore.rotate_app_key`, when it stops working."""


@attrs.frozen
class AppKeys:
    """Everything that decides whether an app's key is accepted, read at once:
    the verifiers valid at the time of reading (current first) and whether
    the operator disabled the app. A disabled app's keys verify but must be
    refused: callers that proved a key check :attr:`disabled` next."""

    app_id: str
    verifiers: tuple[AppVerifier, ...]
    disabled_at: float | None = None
    role: str | None = None
    """An operator's role (:mod:`qmesh.operator_roles`); None for an application."""

    @property
    def disabled(self) -> bool:
        return self.disabled_at is not None

    def verifier_for(self, stored_key: bytes, *, now: float | None = None) -> AppVerifier | None:
        """The verifier whose StoredKey is ``stored_key`` and that is still
        valid at ``now`` (default: the current time), or None. For callers
        that remember which verifier a key matched (a cache, a live session)
        and re-check it after a change without PBKDF2."""
        when = time.time() if now is None else now
        for verifier in self.verifiers:
            if hmac.compare_digest(verifier.stored_key, stored_key) and (
                verifier.expires_at is None or verifier.expires_at > when
            ):
                return verifier
        return None


def _check_role(role: str | None) -> None:
    if role is not None and role not in OPERATOR_ROLES:
        raise InvalidValue(f"no operator role {role!r}: one of {', '.join(OPERATOR_ROLES)}")


# For unknown app ids verify_app_key still runs PBKDF2, against this salt, so
# the time it takes does not tell a caller which app ids exist.
_DUMMY_SALT: Final = secrets.token_bytes(16)


def _identity(row: tuple[Any, ...]) -> Identity:
    return Identity(
        name=row[0], role=row[1], public_key=bytes(row[2]), created_at=row[3], revoked_at=row[4],
        expires_at=row[5], ttl_s=row[6],
    )  # fmt: skip


_IDENTITY_COLUMNS: Final = "name, role, public_key, created_at, revoked_at, expires_at, ttl_s"

ControlRecorder = Callable[[Connection, str, dict[str, object]], None]
"""(transaction, action, detail) for :attr:`StateStore.recorder`."""


class StateStore(GateCounts):
    """The Gate's state database, SQLite or PostgreSQL. Use :meth:`open`.

    Thread-safe: Trio tasks call it from worker threads
    (``trio.to_thread.run_sync``) concurrently; the backend serialises what
    must be (:mod:`qmesh.state.db`).
    """

    def __init__(self, database: Database) -> None:
        self._db = database
        self.dialect = database.dialect
        self.location = database.location
        """Where the state lives, for messages: a path, or a URL without its password."""
        self.path: Path | None = Path(database.location) if database.dialect == "sqlite" else None
        """The SQLite file; None on PostgreSQL."""
        self.recorder: ControlRecorder | None = None
        """Told of every control-plane change (enroll, revoke, apps, operators,
        policy, secrets) inside the write transaction that makes it, with
        names and never secrets: the control audit
        (:func:`qmesh.finops.control.attach_recorder`) appends it to the
        hash-chained trail, so no change commits without its record."""

    @classmethod
    def open(cls, location: Path | str, *, migrate: bool = True) -> StateStore:
        """Open the state at ``location`` — a SQLite file (created 0600 with
        its directory if missing) or a ``postgresql://`` URL — and bring its
        schema up to date (unless ``migrate`` is false: ``qmesh state
        status`` looks without changing anything). Raises StateUnavailable."""
        database = open_database(location)
        store = cls(database)
        try:
            if migrate:
                store._migrate()
        except DATABASE_ERRORS as exc:
            database.close()
            raise StateUnavailable(f"cannot use state database {database.location}: {exc}") from exc
        except BaseException:
            database.close()
            raise
        return store

    def close(self) -> None:
        """Close the database. Calling it again does nothing."""
        self._db.close()

    def __enter__(self) -> StateStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- plumbing --------------------------------------------------------

    def _read(self) -> contextlib.AbstractContextManager[Connection]:
        """Statements outside a transaction (each sees committed data)."""
        return self._db.read()

    def _snapshot(self) -> contextlib.AbstractContextManager[Connection]:
        """A read transaction: its statements see one committed state."""
        return self._db.snapshot()

    def _record(self, conn: Connection, action: str, detail: dict[str, object]) -> None:
        """A control-plane change, recorded in the transaction that makes it
        when someone is answerable for this store's writes (:attr:`recorder`)."""
        if self.recorder is not None:
            self.recorder(conn, action, detail)

    def _write(
        self, *, announce: bool = True, scope: WriteScope = "state"
    ) -> contextlib.AbstractContextManager[Connection]:
        """A write transaction: committed at the end of the block, rolled back
        on an exception; one writer at a time across every process and Gate.

        ``announce=False`` for writes that change nothing a running Gate
        reacts to (ledger and audit rows): they do not wake the Gates'
        state watchers, which would otherwise re-read trust after every
        batch (on SQLite, another process's commit is seen all the same).
        ``scope`` (see :data:`~qmesh.state.db.WriteScope`) lets the graph
        memory's long ingests run beside other writers on PostgreSQL."""
        return self._db.write(announce=announce, scope=scope)

    def change_marker(self) -> tuple[int, int]:
        """A value that differs after any commit to the database, by this
        process or another (``qmesh revoke`` from a shell, another Gate).
        Cheap: no table is read."""
        return self._db.change_marker()

    @property
    def migrations(self) -> tuple[tuple[str, ...], ...]:
        """This backend's schema steps (each backend numbers its own)."""
        return MIGRATIONS if self.dialect == "sqlite" else POSTGRES_MIGRATIONS

    @property
    def schema_version(self) -> int:
        """The version the database is at (0: nothing applied yet)."""
        with self._read() as conn:
            exists = conn.execute(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?"
                if self.dialect == "sqlite"
                else "SELECT count(*) FROM pg_tables WHERE schemaname = current_schema()"
                " AND tablename = ?",
                ("schema_version",),
            ).fetchone()[0]
            if not exists:
                return 0
            row = conn.execute("SELECT version FROM schema_version").fetchone()
            return int(row[0]) if row else 0

    def _migrate(self) -> None:
        """Apply the pending steps in one write transaction: the write lock
        (SQLite's, or the advisory lock on PostgreSQL) makes a second Gate
        starting at the same moment wait, then find nothing to do. A store
        already up to date (every open but the first) is seen with a read and
        takes no lock: a command opening the state does not queue behind the
        Gates' writers, nor they behind it."""
        steps = self.migrations
        if self.schema_version == len(steps):
            return
        with self._write() as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = conn.execute("SELECT version FROM schema_version").fetchone()
            if row is None:
                conn.execute("INSERT INTO schema_version (version) VALUES (0)")
                current = 0
            else:
                current = int(row[0])
            if current > len(steps):
                raise StateUnavailable(
                    f"state database {self.location} has schema version {current}, newer than "
                    f"this qmesh knows ({len(steps)}); upgrade qmesh"
                )
            for statements in steps[current:]:
                for statement in statements:
                    conn.execute(statement)
            conn.execute("UPDATE schema_version SET version = ?", (len(steps),))

    # -- identities -------------------------------------------------------

    def add_identity(
        self, name: str, role: str, public_key: bytes, *, ttl_s: float | None = None
    ) -> Identity:
        """Enroll an edge (whose credential expires ``ttl_s`` from now unless
        renewed; None: never). Raises IdentityExists if the name or key is
        taken, InvalidValue for a bad name, role, key or TTL."""
        if ttl_s is not None and not 0 < ttl_s <= MAX_TTL_S:
            raise InvalidValue(f"a credential's TTL is 1 s to {MAX_TTL_S:.0f} s")
        check_name(name)
        if role not in EDGE_ROLES:
            raise InvalidValue(f"role must be one of {', '.join(EDGE_ROLES)}; got {role!r}")
        if not isinstance(public_key, bytes) or len(public_key) != PUBLIC_KEY_LEN:
            raise InvalidValue(f"public key must be {PUBLIC_KEY_LEN} bytes")
        now = time.time()
        identity = Identity(
            name=name, role=role, public_key=public_key, created_at=now,
            expires_at=None if ttl_s is None else now + ttl_s, ttl_s=ttl_s,
        )  # fmt: skip
        with self._write() as conn:
            existing = conn.execute(
                "SELECT name FROM identities WHERE name = ? OR public_key = ?", (name, public_key)
            ).fetchone()
            if existing is not None:
                if existing[0] == name:
                    raise IdentityExists(f"an identity named {name!r} already exists")
                raise IdentityExists(f"this public key is already enrolled as {existing[0]!r}")
            conn.execute(
                "INSERT INTO identities (name, role, public_key, created_at, expires_at, ttl_s)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (name, role, public_key, identity.created_at, identity.expires_at, ttl_s),
            )
            self._record(conn, "identities.enroll", {"name": name, "role": role, "ttl_s": ttl_s})
        return identity

    def get_identity(self, name: str) -> Identity | None:
        with self._read() as conn:
            row = conn.execute(
                f"SELECT {_IDENTITY_COLUMNS} FROM identities WHERE name = ?", (name,)
            ).fetchone()
        return _identity(row) if row else None

    def find_identity_by_key(self, public_key: bytes) -> Identity | None:
        """The identity enrolled with ``public_key``, revoked or not: the
        caller must check :attr:`Identity.revoked`."""
        with self._read() as conn:
            row = conn.execute(
                f"SELECT {_IDENTITY_COLUMNS} FROM identities WHERE public_key = ?", (public_key,)
            ).fetchone()
        return _identity(row) if row else None

    def list_identities(self) -> list[Identity]:
        """All identities, revoked ones included, by name."""
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {_IDENTITY_COLUMNS} FROM identities ORDER BY name"
            ).fetchall()
        return [_identity(row) for row in rows]

    def revoke_identity(self, name: str) -> bool:
        """Mark ``name`` revoked. True if it was active; False if it does not
        exist or was already revoked (the first revocation time is kept)."""
        with self._write() as conn:
            cursor = conn.execute(
                "UPDATE identities SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL",
                (time.time(), name),
            )
            if cursor.rowcount != 1:
                return False
            self._record(conn, "identities.revoke", {"name": name})
            return True

    # -- join tokens ---------------------------------------------------------

    def create_join_token(
        self, role: str, name: str, ttl_s: float, *, credential_ttl_s: float | None = None
    ) -> tuple[str, bytes]:
        """A one-time token by which an edge enrolls itself as ``name``
        (``role``) within ``ttl_s``: ``(token id, secret)``; only the
        secret's SHA-256 is stored. Raises InvalidValue for a bad name,
        role or TTL, IdentityExists when the name is taken."""
        check_name(name)
        if role not in EDGE_ROLES:
            raise InvalidValue(f"role must be one of {', '.join(EDGE_ROLES)}; got {role!r}")
        if not 0 < ttl_s <= MAX_TTL_S:
            raise InvalidValue(f"a token's TTL is 1 s to {MAX_TTL_S:.0f} s")
        token_id, secret = secrets.token_hex(8), secrets.token_bytes(32)
        now = time.time()
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM identities WHERE name = ?", (name,)).fetchone():
                raise IdentityExists(f"an identity named {name!r} already exists")
            conn.execute(
                "INSERT INTO join_tokens (id, secret_hash, role, name, credential_ttl_s,"
                " created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (token_id, hashlib.sha256(secret).digest(), role, name, credential_ttl_s, now,
                 now + ttl_s),
            )  # fmt: skip
            self._record(conn, "tokens.create", {"token": token_id, "role": role, "name": name,
                                                 "expires_at": now + ttl_s})  # fmt: skip
        return token_id, secret

    def list_join_tokens(self) -> list[dict[str, object]]:
        """Every join token (never its secret): id, role, name, expiry, use."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT id, role, name, created_at, expires_at, used_at FROM join_tokens"
                " ORDER BY created_at"
            ).fetchall()
        keys = ("id", "role", "name", "created_at", "expires_at", "used_at")
        return [dict(zip(keys, row, strict=True)) for row in rows]

    def redeem_join_token(
        self, token_id: str, secret: bytes, role: str, public_key: bytes
    ) -> Identity:
        """Enroll ``public_key`` as the token's identity, once: the token is
        spent in the same transaction. Raises InvalidValue saying why not
        (unknown, wrong secret, spent, expired, another role) — the caller
        proved nothing but a key, so the reasons go to it only."""
        now = time.time()
        with self._write() as conn:
            row = conn.execute(
                "SELECT secret_hash, role, name, credential_ttl_s, expires_at, used_at"
                " FROM join_tokens WHERE id = ?",
                (token_id,),
            ).fetchone()
            if row is None or not hmac.compare_digest(
                bytes(row[0]), hashlib.sha256(secret).digest()
            ):
                raise InvalidValue("no such join token")
            if row[5] is not None:
                raise InvalidValue("this join token was used already")
            if row[4] <= now:
                raise InvalidValue("this join token has expired")
            if row[1] != role:
                raise InvalidValue(f"this join token is for a {row[1]}, not a {role}")
            ttl_s = row[3]
            identity = Identity(
                name=row[2], role=row[1], public_key=public_key, created_at=now,
                expires_at=None if ttl_s is None else now + ttl_s, ttl_s=ttl_s,
            )  # fmt: skip
            if conn.execute(
                "SELECT 1 FROM identities WHERE name = ? OR public_key = ?", (row[2], public_key)
            ).fetchone():
                raise InvalidValue(f"an identity named {row[2]!r} (or with this key) exists")
            conn.execute("UPDATE join_tokens SET used_at = ? WHERE id = ?", (now, token_id))
            conn.execute(
                "INSERT INTO identities (name, role, public_key, created_at, expires_at, ttl_s)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (identity.name, identity.role, public_key, now, identity.expires_at, ttl_s),
            )
            self._record(conn, "identities.join", {"name": identity.name, "role": identity.role,
                                                   "token": token_id, "ttl_s": ttl_s})  # fmt: skip
        return identity

    def renew_identity(self, name: str, *, now: float | None = None) -> float | None:
        """Extend ``name``'s credential to ``now`` + its TTL, for the edge
        itself, before it expires; the new expiry. None when it has no expiry.
        Raises InvalidValue when it is unknown, revoked or already expired
        (an expired credential is renewed by enrolling again)."""
        when = time.time() if now is None else now
        with self._write(announce=False) as conn:
            row = conn.execute(
                "SELECT revoked_at, expires_at, ttl_s FROM identities WHERE name = ?", (name,)
            ).fetchone()
            if row is None or row[0] is not None:
                raise InvalidValue(f"{name!r} is not an enrolled identity in good standing")
            if row[1] is None:
                return None
            if row[1] <= when:
                raise InvalidValue(f"the credential of {name!r} has expired")
            expires = max(float(row[1]), when + float(row[2]))
            conn.execute("UPDATE identities SET expires_at = ? WHERE name = ?", (expires, name))
            return expires

    def accept_hello_timestamp(self, public_key: bytes, timestamp: int) -> bool:
        """Record ``timestamp`` as the newest HELLO of ``public_key``; False
        (and nothing recorded) unless it is above every earlier one: then the
        HELLO is a replay. Atomic across processes sharing the database."""
        if not 0 <= timestamp < 2**63:  # SQLite's INTEGER, PostgreSQL's BIGINT
            return False
        with self._write() as conn:
            cursor = conn.execute(
                "INSERT INTO edge_hellos (public_key, last_ts) VALUES (?, ?)"
                " ON CONFLICT (public_key) DO UPDATE SET last_ts = excluded.last_ts"
                " WHERE excluded.last_ts > edge_hellos.last_ts",
                (public_key, timestamp),
            )
            return cursor.rowcount == 1

    # -- applications -----------------------------------------------------

    def add_app(self, app_id: str, *, role: str | None = None) -> str:
        """Create an application (with ``role``: an operator) and return its
        new app key. The key is returned this once: only its SCRAM verifier
        is stored. Raises AppExists, or InvalidValue for a bad app id or role."""
        check_name(app_id, "app id")
        _check_role(role)
        if role is None and app_id == ADMIN_APP:
            role = "admin"
        key = secrets.token_urlsafe(32)
        salt = secrets.token_bytes(16)
        stored_key, server_key = scram_keys(key, salt, SCRAM_ITERATIONS)
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM apps WHERE app_id = ?", (app_id,)).fetchone():
                raise AppExists(f"an app with id {app_id!r} already exists")
            conn.execute(
                "INSERT INTO apps (app_id, scram_salt, scram_iterations, stored_key, server_key,"
                " created_at, role) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (app_id, salt, SCRAM_ITERATIONS, stored_key, server_key, time.time(), role),
            )
            if role is None:
                self._record(conn, "apps.add", {"app": app_id})
            else:
                self._record(conn, "operators.add", {"operator": app_id, "role": role})
        return key

    def set_app_role(self, app_id: str, role: str | None) -> bool:
        """Make ``app_id`` an operator of ``role`` (None: an application
        again). True if that changed it. Raises InvalidValue for an unknown
        app or role."""
        _check_role(role)
        with self._write() as conn:
            row = conn.execute("SELECT role FROM apps WHERE app_id = ?", (app_id,)).fetchone()
            if row is None:
                raise InvalidValue(f"no app with id {app_id!r}")
            if row[0] == role:
                return False
            conn.execute("UPDATE apps SET role = ? WHERE app_id = ?", (role, app_id))
            self._record(
                conn, "operators.set_role", {"operator": app_id, "from": row[0], "to": role}
            )
            return True

    def get_app_verifier(self, app_id: str) -> AppVerifier | None:
        """The verifier of ``app_id``'s current key, None for an unknown app.
        During a rotation overlap the previous keys also verify: see
        :meth:`get_app_verifiers`."""
        keys = self.get_app_keys(app_id)
        return None if keys is None else keys.verifiers[0]

    def get_app_keys(self, app_id: str, *, now: float | None = None) -> AppKeys | None:
        """``app_id``'s verifiers valid at ``now`` (default: the current time)
        and whether it is disabled, read together; None for an unknown app."""
        when = time.time() if now is None else now
        order = "rowid" if self.dialect == "sqlite" else "seq"  # insertion order
        with self._read() as conn:
            row = conn.execute(
                "SELECT app_id, scram_salt, scram_iterations, stored_key, server_key,"
                " COALESCE(key_created_at, created_at), disabled_at, role FROM apps"
                " WHERE app_id = ?",
                (app_id,),
            ).fetchone()
            if row is None:
                return None
            rows = conn.execute(
                "SELECT stored_key, server_key, created_at, expires_at FROM app_old_verifiers"
                f" WHERE app_id = ? AND expires_at > ? ORDER BY created_at DESC, {order} DESC",
                (app_id, when),
            ).fetchall()
        current = AppVerifier(
            app_id=row[0],
            salt=bytes(row[1]),
            iterations=int(row[2]),
            stored_key=bytes(row[3]),
            server_key=bytes(row[4]),
            created_at=row[5],
        )
        old = [
            attrs.evolve(
                current,
                stored_key=bytes(old_row[0]),
                server_key=bytes(old_row[1]),
                created_at=old_row[2],
                expires_at=old_row[3],
            )
            for old_row in rows
        ]
        return AppKeys(app_id=row[0], verifiers=(current, *old), disabled_at=row[6], role=row[7])

    def get_app_verifiers(self, app_id: str, *, now: float | None = None) -> list[AppVerifier]:
        """Every verifier of ``app_id`` valid at ``now`` (default: the current
        time), newest first: the current key, then previous keys still inside
        their rotation overlap. Empty for an unknown app. A disabled app's
        verifiers are listed too: see :meth:`get_app_keys`.

        They all have the same salt and iterations, so a SCRAM server sends
        that salt and accepts the client's proof if it matches any of them.
        """
        keys = self.get_app_keys(app_id, now=now)
        return [] if keys is None else list(keys.verifiers)

    def verify_app_key(self, app_id: str, key: str, *, now: float | None = None) -> bool:
        """Whether ``key`` is one of ``app_id``'s valid app keys at ``now``
        (default: the current time) and the app is enabled; constant-time
        comparisons. Runs PBKDF2 (thousands of rounds): not for a hot path."""
        keys = self.get_app_keys(app_id, now=now)
        if keys is None:
            scram_keys(key, _DUMMY_SALT, SCRAM_ITERATIONS)
            return False
        # One PBKDF2 serves every verifier: they share the salt and iterations.
        first = keys.verifiers[0]
        stored_key, _ = scram_keys(key, first.salt, first.iterations)
        return keys.verifier_for(stored_key, now=now) is not None and not keys.disabled

    def set_app_disabled(self, app_id: str, disabled: bool) -> bool:
        """Disable or enable ``app_id``. True if that changed its state; False
        if it already was so (a disabled app keeps its first disabling time).
        A disabled app keeps its keys, which are refused until it is enabled
        again. Raises InvalidValue for an unknown app."""
        with self._write() as conn:
            row = conn.execute(
                "SELECT disabled_at FROM apps WHERE app_id = ?", (app_id,)
            ).fetchone()
            if row is None:
                raise InvalidValue(f"no app with id {app_id!r}")
            if (row[0] is not None) == disabled:
                return False
            conn.execute(
                "UPDATE apps SET disabled_at = ? WHERE app_id = ?",
                (time.time() if disabled else None, app_id),
            )
            self._record(conn, "apps.disable" if disabled else "apps.enable", {"app": app_id})
            return True

    def rotate_app_key(
        self, app_id: str, overlap_s: float, *, now: float | None = None
    ) -> tuple[str, float]:
        """Give ``app_id`` a new app key; return it (this once: only its
        verifier is stored) and the time until which the previous key keeps
        working, ``now + overlap_s``.

        The previous key stays valid for ``overlap_s`` seconds so that
        applications can be moved to the new key without an outage. Keys from
        earlier rotations keep their own expiry, except that an overlap of 0
        ends every previous key at once (the response to a leaked key). The
        new key reuses the app's salt and iterations (see
        :meth:`get_app_verifiers`). Raises InvalidValue for an unknown app or
        a negative overlap.
        """
        if not overlap_s >= 0:  # also catches NaN
            raise InvalidValue(f"overlap must be a number of seconds >= 0; got {overlap_s}")
        when = time.time() if now is None else now
        key = secrets.token_urlsafe(32)
        with self._write() as conn:
            row = conn.execute(
                "SELECT scram_salt, scram_iterations, stored_key, server_key,"
                " COALESCE(key_created_at, created_at) FROM apps WHERE app_id = ?",
                (app_id,),
            ).fetchone()
            if row is None:
                raise InvalidValue(f"no app with id {app_id!r}")
            salt, iterations, old_stored, old_server, old_created = row
            stored_key, server_key = scram_keys(key, bytes(salt), int(iterations))
            if overlap_s > 0:
                conn.execute(
                    "DELETE FROM app_old_verifiers WHERE app_id = ? AND expires_at <= ?",
                    (app_id, when),
                )
                conn.execute(
                    "INSERT INTO app_old_verifiers"
                    " (app_id, stored_key, server_key, created_at, expires_at)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (app_id, old_stored, old_server, old_created, when + overlap_s),
                )
            else:
                conn.execute("DELETE FROM app_old_verifiers WHERE app_id = ?", (app_id,))
            conn.execute(
                "UPDATE apps SET stored_key = ?, server_key = ?, key_created_at = ?"
                " WHERE app_id = ?",
                (stored_key, server_key, when, app_id),
            )
            self._record(conn, "apps.rotate_key", {"app": app_id, "overlap_s": overlap_s})
        return key, when + overlap_s

    def delete_app(self, app_id: str) -> bool:
        """Remove an application and its verifier. True if it existed."""
        with self._write() as conn:
            row = conn.execute("SELECT role FROM apps WHERE app_id = ?", (app_id,)).fetchone()
            if row is None:
                return False
            conn.execute("DELETE FROM apps WHERE app_id = ?", (app_id,))
            if row[0] is None:
                self._record(conn, "apps.delete", {"app": app_id})
            else:
                self._record(conn, "operators.remove", {"operator": app_id, "role": row[0]})
            return True

    # -- per-app policy ----------------------------------------------------

    def set_app_policy(self, app_id: str, policy: str) -> None:
        """Store ``app_id``'s policy (JSON, as :mod:`qmesh.pg.policy` writes
        it), replacing any. Raises InvalidValue for an unknown app."""
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM apps WHERE app_id = ?", (app_id,)).fetchone() is None:
                raise InvalidValue(f"no app with id {app_id!r}")
            conn.execute(
                "INSERT INTO app_policies (app_id, policy, updated_at) VALUES (?, ?, ?)"
                " ON CONFLICT (app_id) DO UPDATE SET policy = excluded.policy,"
                " updated_at = excluded.updated_at",
                (app_id, policy, time.time()),
            )
            self._record(conn, "apps.policy", {"app": app_id, "policy": policy})

    def clear_app_policy(self, app_id: str) -> bool:
        """Forget ``app_id``'s stored policy (the config file's applies again)."""
        with self._write() as conn:
            cursor = conn.execute("DELETE FROM app_policies WHERE app_id = ?", (app_id,))
            if cursor.rowcount != 1:
                return False
            self._record(conn, "apps.policy", {"app": app_id, "policy": None})
            return True

    def app_policies(self) -> dict[str, str]:
        """Every stored policy, by app id (JSON text)."""
        with self._read() as conn:
            rows = conn.execute("SELECT app_id, policy FROM app_policies").fetchall()
        return {str(row[0]): str(row[1]) for row in rows}

    def list_apps(self) -> list[App]:
        with self._read() as conn:
            rows = conn.execute(
                "SELECT app_id, created_at, disabled_at, role FROM apps ORDER BY app_id"
            ).fetchall()
        return [
            App(app_id=row[0], created_at=row[1], disabled_at=row[2], role=row[3]) for row in rows
        ]
