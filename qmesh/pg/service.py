"""The Gate's ``pg`` and ``pg-cancel`` services: the far end of the ghost wire.

For: one Postgres session per ``pg`` tunnel stream. The MiniGate has
answered SSLRequest/GSSENCRequest and read the client's StartupMessage; it
opens the stream with the startup parameters and from then on only relays
bytes. Here the Gate

1. authenticates the application with SCRAM-SHA-256 against the verifiers
   in the state store (the app's user name is its app id, its password its
   app key; the SASL messages travel through the tunnel, so an edge never
   holds a verifier);
2. checks the app's policy (aliases, max_sessions), takes the real
   credentials of the alias from the vault and logs in to the real server
   (TLS as the alias's sslmode says; SCRAM-SHA-256, MD5 or, over TLS only,
   a cleartext password), with ``default_transaction_read_only=on`` and the
   policy's ``statement_timeout`` as startup parameters; a 28P01 from the
   server (a rotation in another process) makes it re-read the vault and try
   again;
3. hands the client the server's ParameterStatus messages, a BackendKeyData
   minted here (mapped to the real one for ``pg-cancel``) and ReadyForQuery;
4. relays both ways with the Rust scanner, looking only at the messages it
   must: Query/Parse text (read-only enforcement, audit), Bind/Execute/
   Close/Sync (audit bookkeeping), CommandComplete/ErrorResponse/
   ReadyForQuery (audit outcomes), ParameterStatus (read-only watch).
   DataRows and COPY data are never copied or buffered.

Not for: the policy, vault and audit themselves (:mod:`qmesh.pg`), the
client side of the startup (``qmesh.pg.edge``), SQL parsing beyond the
guard in :mod:`qmesh.pg.guard`.

Secrets: the real password exists here only inside the vault's
DatabaseSecret and the SCRAM/MD5 computations; the vault registers it with
:func:`qmesh.logs.register_secret`. Nothing sent to the client (and so to
the edge) is derived from it, and error texts from the server are passed on
only after the password is scrubbed from them.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

import attrs
import trio

from qmesh import _core
from qmesh.config import Config
from qmesh.logs import register_secret
from qmesh.masterkey import MasterKeyError
from qmesh.operator_roles import Right, describe_role, rights_of
from qmesh.pg.audit import AuditLog
from qmesh.pg.cancel import CancelKeys
from qmesh.pg.errors import VaultError
from qmesh.pg.login import (
    AUTH_OK,
    AUTH_SASL,
    AUTH_SASL_CONTINUE,
    AUTH_SASL_FINAL,
    ClientGone,
    MessageReader,
    PgSessionError,
    Upstream,
    UpstreamAuthRejected,
    UpstreamFailed,
    error_response,
    open_upstream,
    upstream_params,
)
from qmesh.pg.multiplex import PooledSession
from qmesh.pg.policy import AppPolicy, PolicyBook
from qmesh.pg.pool import PoolBook, PoolKey, ServerPool
from qmesh.pg.relay import Relay, send_quietly
from qmesh.pg.scram import (
    MECHANISM,
    ScramError,
    ScramServer,
)
from qmesh.pg.vault import DatabaseSecret, Vault, load_master_key
from qmesh.pg.watch import SessionOver, SessionWatch
from qmesh.state import (
    DATABASE_ERRORS,
    AppKeys,
    AppVerifier,
    InvalidValue,
    StateError,
    StateStore,
    check_name,
)
from qmesh.tunnel.frames import ResetCode
from qmesh.tunnel.stream import TunnelStream

__all__ = ["PgService", "PgSessionError", "UpstreamFailed"]

log = logging.getLogger(__name__)

LOGIN_TIMEOUT_S: Final = 30.0
"""The whole login: the app's SCRAM exchange and the Gate's login upstream."""
MAX_STARTUP_PARAMS: Final = 64
MAX_LOGIN_ROUNDS: Final = 8
"""Vault re-reads after the server refused the Gate's password, while each
finds one not yet tried or a rotation is in flight."""
ROTATION_WAIT_S: Final = 0.05
"""Between rounds while a rotation is in flight and nothing new was found:
its pending password becomes the server's any moment."""

_AUTH_RESPONSE = ord("p")


def _startup_params(request: dict[str, Any]) -> tuple[int, list[tuple[str, str]]]:
    version = request.get("version", _core.PG_PROTOCOL_3_0)
    params = request.get("params")
    if not isinstance(version, int) or version >> 16 != 3:
        raise PgSessionError("08P01", "unsupported frontend protocol")
    if (
        not isinstance(params, list)
        or len(params) > MAX_STARTUP_PARAMS
        or not all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p)
            for p in params
        )
    ):
        raise PgSessionError("08P01", "invalid startup parameters")
    return version, [(p[0], p[1]) for p in params]


KEY_REVOKED: Final = "57P01"
"""SQLSTATE of the FATAL that ends a live session whose app was disabled or
deleted, or whose app key stopped working (rotated without overlap, or its
overlap ended): admin_shutdown, as PostgreSQL's own pg_terminate_backend.
Clients and pools read it as "this connection is gone, open another"; the
next login then gets 28000 (disabled) or 28P01 (old key)."""


@attrs.define(eq=False)
class _LiveSession:
    """A session past authentication: which verifier let it in, so that a
    change to the app's keys can be judged without PBKDF2, and how to end it."""

    app_id: str
    stored_key: bytes
    expires_at: float | None
    """Wall clock: the end of the verifier's rotation overlap (None: the current key)."""
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    """Around admission, the login upstream and the relay."""
    relay: Relay | PooledSession | None = None
    ending: PgSessionError | None = None
    ended_by_relay: bool = False

    def end(self, error: PgSessionError) -> None:
        """End the session with ``error`` (a FATAL for the client); the first reason wins."""
        if self.ending is not None:
            return
        self.ending = error
        relay = self.relay
        if relay is not None and relay.scope is not None:
            # The relay sends the error itself, once it knows it is not
            # half-way through a message to the client.
            self.ended_by_relay = True
            relay.end(SessionOver(error))
        else:
            self.scope.cancel()


def _overlap_ended(session: _LiveSession) -> str:
    return (
        f'qmesh: the rotation overlap of the app key this session of "{session.app_id}" '
        "logged in with has ended; log in again with the current key"
    )


class PgService:
    """The ``pg`` and ``pg-cancel`` service handlers, and their shared state."""

    def __init__(
        self,
        config: Config,
        store: StateStore,
        *,
        vault: Vault | None,
        vault_problem: str | None = None,
        audit: AuditLog | None = None,
        mock_secret: bytes | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.policies = PolicyBook(config)
        """Every app's policy, the state's over the config's: reloaded on each change."""
        self.vault = vault
        self.vault_problem = vault_problem
        self.audit = audit if audit is not None else AuditLog.for_gate(store, config.gate.pg_audit)
        self._mock_secret = mock_secret or secrets.token_bytes(32)
        self.cancel_keys = CancelKeys()
        """The BackendKeyData minted for the sessions open now."""
        self._registered: set[str] = set()
        self.active: dict[str, int] = {}
        """Open sessions per app id."""
        self.ask_other_gates: Callable[[dict[str, Any]], Awaitable[None]] | None = None
        """Where a cancel request whose key this Gate did not mint goes: the
        other Gates of the cluster (qmesh.cluster.fabric), each of which
        honours it if it minted the key for that edge."""
        self.live: dict[str, set[_LiveSession]] = {}
        self.pools = PoolBook(
            config.gate.pg_pool,
            claim=self._claim_connection,
            release=self._release_connection,
        )
        """Server connections of the apps in transaction mode."""
        """Sessions past authentication, by app id: see :meth:`refresh_apps`."""
        self.sessions_ended = 0
        """Live sessions ended because their app or key lost its standing."""
        # Bumped by every refresh_apps: a login that read its app's keys
        # before a refresh ran checks them again once it is tracked.
        self._generation = 0
        self._expiry_changed = trio.Event()

    @classmethod
    def from_config(cls, config: Config, store: StateStore) -> PgService:
        """Open the vault with the operator's master key. Without a usable
        key the Gate still runs; ``pg`` sessions are refused with the reason."""
        try:
            master_key = load_master_key(config)
            opened = Vault.open(store, master_key)
            opened.reload = lambda: load_master_key(config)  # follows `qmesh secrets rekey`
            vault: Vault | None = opened
            problem = None
            mock = hmac.new(master_key, b"qmesh pg mock scram", hashlib.sha256).digest()
        except (MasterKeyError, VaultError) as exc:
            log.warning("the Postgres path is disabled: %s", exc)
            vault, problem, mock = None, str(exc), None
        return cls(config, store, vault=vault, vault_problem=problem, mock_secret=mock)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The service's own tasks: the audit log's writer, and the end of
        sessions whose key's rotation overlap runs out."""
        await trio.to_thread.run_sync(self.policies.load, self.store)
        async with trio.open_nursery() as nursery:
            await nursery.start(self.audit.run)
            await nursery.start(self.pools.run)
            nursery.start_soon(self._end_expired_sessions)
            task_status.started()

    # -- live sessions and trust changes -------------------------------------------

    async def refresh_apps(self) -> None:
        """Judge every live session again after a change to the state store
        (the Gate's StateWatcher calls this): a session ends with a FATAL
        (:data:`KEY_REVOKED`) when its app was disabled or deleted, or when
        the verifier it logged in with is no longer valid (``qmesh apps
        rotate-key --overlap 0``). Sessions on a key inside its overlap
        carry on — until the overlap ends (:meth:`_end_expired_sessions`).
        One read per app with live sessions; no PBKDF2. The apps' policies
        are read again too: new sessions follow a changed one at once."""
        await trio.to_thread.run_sync(self.policies.load, self.store)
        self._generation += 1
        if not self.live:
            return
        apps = list(self.live)
        current = await trio.to_thread.run_sync(self._read_keys, apps)
        for app_id, keys in current.items():
            for session in list(self.live.get(app_id, ())):
                self._judge(session, keys)

    def _read_keys(self, apps: Sequence[str]) -> dict[str, AppKeys | None]:
        return {app_id: self.store.get_app_keys(app_id) for app_id in apps}

    def _judge(self, session: _LiveSession, keys: AppKeys | None) -> None:
        app_id = session.app_id
        if keys is None:
            reason = f'qmesh: app "{app_id}" was deleted; its sessions are ended'
        elif keys.disabled:
            reason = f'qmesh: app "{app_id}" was disabled by the operator; its sessions are ended'
        elif Right.USE not in rights_of(keys.role):
            reason = (
                f'qmesh: "{app_id}" became an operator key ({keys.role}); its sessions are ended'
            )
        else:
            verifier = keys.verifier_for(session.stored_key)
            if verifier is not None:
                if verifier.expires_at != session.expires_at:
                    # A current key becomes a previous one, with an expiry, on rotation.
                    session.expires_at = verifier.expires_at
                    self._expiry_changed.set()
                return
            if session.expires_at is not None and session.expires_at <= time.time():
                # Its overlap ran out; this refresh came before the timer did.
                reason = _overlap_ended(session)
            else:
                reason = (
                    f'qmesh: the app key this session of "{app_id}" logged in with was revoked '
                    "(qmesh apps rotate-key); log in again with the current key"
                )
        self._end_session(session, reason)

    def _end_session(self, session: _LiveSession, reason: str) -> None:
        if session.ending is None:
            self.sessions_ended += 1
            log.warning("ending a pg session: %s", reason)
        session.end(PgSessionError(KEY_REVOKED, reason))

    def _track(self, app_id: str, verifier: AppVerifier) -> _LiveSession:
        session = _LiveSession(app_id, verifier.stored_key, verifier.expires_at)
        self.live.setdefault(app_id, set()).add(session)
        if session.expires_at is not None:
            self._expiry_changed.set()
        return session

    def _untrack(self, session: _LiveSession) -> None:
        sessions = self.live.get(session.app_id)
        if sessions is not None:
            sessions.discard(session)
            if not sessions:
                del self.live[session.app_id]

    async def _end_expired_sessions(self) -> None:
        """End each session on a previous app key when that key's overlap
        ends, whether or not anything else changes at that moment."""
        while True:
            soonest = min(
                (
                    s.expires_at
                    for sessions in self.live.values()
                    for s in sessions
                    if s.expires_at is not None and s.ending is None
                ),
                default=math.inf,
            )
            self._expiry_changed = trio.Event()
            with trio.move_on_after(max(0.0, soonest - time.time())):
                await self._expiry_changed.wait()
            now = time.time()
            for sessions in list(self.live.values()):
                for session in list(sessions):
                    if session.expires_at is not None and session.expires_at <= now:
                        self._end_session(session, _overlap_ended(session))

    # -- pg ----------------------------------------------------------------------

    async def serve(self, stream: TunnelStream) -> None:
        """Handle one ``pg`` stream (a client connection at an edge)."""
        peer = stream.session.peer
        app_id = alias = "?"
        reader = MessageReader(stream, frontend=True, what="the client")
        counted = claimed = False
        live: _LiveSession | None = None
        try:
            deadline = trio.current_time() + LOGIN_TIMEOUT_S
            try:
                version, params = _startup_params(stream.request)
                names = dict(params)
                app_id = names.get("user", "")
                alias = names.get("database") or app_id
                with trio.fail_at(deadline):
                    await self._negotiate_version(stream, version, params)
                    if names.get("replication", "false").lower() not in ("false", "off", "no", "0"):
                        raise PgSessionError(
                            "0A000", "qmesh: replication connections are not supported"
                        )
                    generation = self._generation
                    verifier = await self._authenticate(stream, reader, app_id)
            except trio.TooSlowError:
                raise PgSessionError("08006", "qmesh: the login took too long") from None
            # From here on a change to the app's keys can end the session.
            live = self._track(app_id, verifier)
            with live.scope:
                if generation != self._generation:
                    # A refresh ran while this login read the keys: it could
                    # not see this session yet, so judge it now.
                    keys = await trio.to_thread.run_sync(self.store.get_app_keys, app_id)
                    self._judge(live, keys)
                try:
                    with trio.fail_at(deadline):
                        policy = self.policies.policy_for(app_id)
                        secret = await self._admit(app_id, alias, policy)
                        if policy.max_sessions is not None:
                            await self._claim(app_id, policy.max_sessions)
                            claimed = True
                        self.active[app_id] = self.active.get(app_id, 0) + 1
                        counted = True
                        if policy.pool_mode == "transaction":
                            pool = await self._pool_for(app_id, alias, secret, params, policy)
                        else:
                            upstream = await self._login(alias, secret, params, policy)
                except trio.TooSlowError:
                    raise PgSessionError("08006", "qmesh: the login took too long") from None
                log.info("pg session: app %r, alias %r, from %s (%s mode)",
                         app_id, alias, peer, policy.pool_mode)  # fmt: skip
                if policy.pool_mode == "transaction":
                    await self._run_pooled(
                        stream,
                        reader.leftover(),
                        pool,
                        secret,
                        policy,
                        live,
                        names.get("application_name"),
                    )
                else:
                    await self._run_session(
                        stream, reader.leftover(), upstream, app_id, alias, secret, policy, live
                    )
            if live.ending is not None and not live.ended_by_relay:
                raise live.ending
        except PgSessionError as exc:
            level = logging.INFO if exc.sqlstate in ("28P01", "3D000") else logging.WARNING
            log.log(level, "pg session of app %r (alias %r, %s) ended: %s %s",
                    app_id, alias, peer, exc.sqlstate, exc.message)  # fmt: skip
            await send_quietly(stream, error_response(exc))
        except ClientGone:
            log.debug("pg client of app %r left during the login", app_id)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            # The stream was reset (the client's connection at the edge
            # closed, or the tunnel session was lost).
            log.debug("pg stream of app %r ended: %s", app_id, exc)
        except _core.PgWireError as exc:
            log.info("pg client of app %r broke the protocol during the login: %s", app_id, exc)
            await send_quietly(stream, error_response(PgSessionError("08P01", f"qmesh: {exc}")))
        finally:
            if live is not None:
                self._untrack(live)
            if counted:
                self.active[app_id] -= 1
                if not self.active[app_id]:
                    del self.active[app_id]
            await trio.aclose_forcefully(stream)
            if claimed:
                # Last: a stopping Gate is cancelled here, and its count no
                # longer matters (a stopped Gate's sessions are not counted).
                await self._release(app_id)

    async def _negotiate_version(
        self, stream: TunnelStream, version: int, params: Sequence[tuple[str, str]]
    ) -> None:
        # PostgreSQL answers a newer 3.x or `_pq_.` options with
        # NegotiateProtocolVersion and carries on in 3.0; so does qmesh.
        unknown = [name for name, _ in params if name.startswith("_pq_.")]
        if version & 0xFFFF or unknown:
            await stream.send_all(_core.encode_negotiate_protocol_version(0, unknown))

    async def _authenticate(
        self, stream: TunnelStream, reader: MessageReader, app_id: str
    ) -> AppVerifier:
        """The verifier the client's SCRAM proof matched. SCRAM's server side
        computes HMACs only (the client runs PBKDF2), so nothing here needs
        the HTTP API's hashing threads."""
        keys: AppKeys | None = None
        try:
            check_name(app_id, "app id")
            keys = await trio.to_thread.run_sync(self.store.get_app_keys, app_id)
        except InvalidValue:
            pass  # still run the exchange: no hint that the name is malformed
        verifiers = list(keys.verifiers) if keys is not None else []
        scram = ScramServer(verifiers, app_id, self._mock_secret)
        await stream.send_all(_core.encode_authentication(AUTH_SASL, MECHANISM.encode() + b"\0\0"))
        refused = PgSessionError("28P01", f'password authentication failed for user "{app_id}"')
        try:
            tag, raw = await reader.next()
            if tag != _AUTH_RESPONSE:
                raise PgSessionError("08P01", "qmesh: expected a SASL response")
            mechanism, data = _core.parse_sasl_initial_response(raw[5:])
            if mechanism != MECHANISM:
                raise PgSessionError("28000", f"qmesh: SASL mechanism {mechanism!r} is not offered")
            server_first = scram.server_first(data or b"")
            await stream.send_all(_core.encode_authentication(AUTH_SASL_CONTINUE, server_first))
            tag, raw = await reader.next()
            if tag != _AUTH_RESPONSE:
                raise PgSessionError("08P01", "qmesh: expected a SASL response")
            server_final = scram.server_final(raw[5:])
        except ScramError as exc:
            log.info("SCRAM for app %r failed: %s", app_id, exc)
            if str(exc) == "wrong proof":
                raise refused from None
            raise PgSessionError("08P01", f"qmesh: malformed SCRAM message ({exc})") from None
        assert scram.verified is not None
        if keys is not None and keys.disabled:
            # The proof checked, so saying why is no hint to someone guessing keys.
            raise PgSessionError(
                "28000", f'qmesh: app "{app_id}" is disabled by the operator (qmesh apps enable)'
            )
        if keys is not None and Right.USE not in rights_of(keys.role):
            raise PgSessionError(
                "28000",
                f'qmesh: "{app_id}" is an operator key ({describe_role(keys.role)}), '
                "not an application's: it opens no database sessions",
            )
        await stream.send_all(
            _core.encode_authentication(AUTH_SASL_FINAL, server_final)
            + _core.encode_authentication(AUTH_OK)
        )
        return scram.verified

    async def _admit(self, app_id: str, alias: str, policy: AppPolicy) -> DatabaseSecret:
        if not policy.allows(alias):
            raise PgSessionError(
                "3D000", f'qmesh: app "{app_id}" may not use database alias "{alias}"'
            )
        if self.vault is None:
            raise UpstreamFailed(
                "08001", f"qmesh: the gate's vault is not available ({self.vault_problem})"
            )
        secret = await self._read_vault(self.vault.get, alias)
        if secret is None:
            raise PgSessionError("3D000", f'qmesh: database alias "{alias}" does not exist')
        return secret

    async def _claim(self, app_id: str, limit: int) -> None:
        """Count the session against ``max_sessions`` across every live Gate
        of the state (:meth:`StateStore.claim_app_session`); 53300 at the limit."""
        try:
            admitted = await trio.to_thread.run_sync(
                self.store.claim_app_session, self.config.gate.name, app_id, limit, time.time()
            )
        except (StateError, *DATABASE_ERRORS) as exc:
            log.error("cannot count the sessions of app %r: %s", app_id, exc)
            raise PgSessionError(
                "53300", f'qmesh: cannot count the sessions of app "{app_id}" now; retry'
            ) from None
        if not admitted:
            raise PgSessionError(
                "53300", f'qmesh: too many sessions for app "{app_id}" (max_sessions = {limit})'
            )

    async def _release(self, app_id: str) -> None:
        try:
            await trio.to_thread.run_sync(
                self.store.release_app_session, self.config.gate.name, app_id
            )
        except (StateError, *DATABASE_ERRORS) as exc:
            log.warning("cannot uncount a session of app %r: %s", app_id, exc)

    async def _claim_connection(self, alias: str, cap: int) -> bool:
        """Count one more pooled server connection to ``alias`` across the
        Gates of the state (``max_server_connections_per_alias``). When the
        count cannot be read, no connection is opened: the cap protects
        the server."""
        try:
            admitted: bool = await trio.to_thread.run_sync(
                self.store.claim_server_connection, self.config.gate.name, alias, cap, time.time()
            )
        except (StateError, *DATABASE_ERRORS) as exc:
            log.error("cannot count the server connections of alias %r: %s", alias, exc)
            return False
        return admitted

    async def _release_connection(self, alias: str) -> None:
        try:
            await trio.to_thread.run_sync(
                self.store.release_server_connection, self.config.gate.name, alias
            )
        except Exception as exc:  # a system task: nothing may escape it
            log.warning("cannot uncount a server connection of alias %r: %s", alias, exc)

    async def _read_vault(self, get: Any, alias: str) -> DatabaseSecret | None:
        try:
            secret: DatabaseSecret | None = await trio.to_thread.run_sync(get, alias)
        except VaultError as exc:
            log.error("cannot read the vault entry of alias %r: %s", alias, exc)
            raise UpstreamFailed(
                "08001", f"qmesh: the gate cannot read the credentials of alias {alias!r}"
            ) from None
        if secret is not None and secret.password not in self._registered:
            # The vault registers what it decrypts too; this keeps the
            # promise here even if that changes. Once per password: each
            # registration recompiles the redaction pattern.
            self._registered.add(secret.password)
            register_secret(secret.password)
        return secret

    async def _login(
        self,
        alias: str,
        secret: DatabaseSecret,
        client_params: Sequence[tuple[str, str]],
        policy: AppPolicy,
    ) -> Upstream:
        candidates, tried = {secret.password: secret}, set[str]()
        assert self.vault is not None
        for attempt in range(MAX_LOGIN_ROUNDS):
            for password, candidate in candidates.items():
                tried.add(password)
                params = upstream_params(candidate, client_params, policy)
                try:
                    return await open_upstream(candidate, params, alias)
                except UpstreamAuthRejected:
                    log.info("the server of alias %r refused a stored password", alias)
            if attempt == MAX_LOGIN_ROUNDS - 1:
                break
            # Rotated by another process? A rotation writes its pending value
            # before the server changes: read it first (then it may be current).
            pending = await self._read_vault(self.vault.get_pending, alias)
            current = await self._read_vault(self.vault.get, alias)
            candidates = {s.password: s for s in (pending, current) if s is not None}
            if candidates.keys() <= tried:
                if pending is None:
                    break  # nothing new, and no rotation that could make it so
                # A rotation in flight: tried too early, its password may
                # be the server's by the next round.
                await trio.sleep(ROTATION_WAIT_S)
        log.error("the server of alias %r refuses the vault's credentials (28P01)", alias)
        raise UpstreamFailed(
            "08004",
            f"qmesh: the database server of alias {alias!r} refused the gate's credentials; "
            "the operator must update them (qmesh secrets set)",
        )

    async def _pool_for(
        self,
        app_id: str,
        alias: str,
        secret: DatabaseSecret,
        client_params: Sequence[tuple[str, str]],
        policy: AppPolicy,
    ) -> ServerPool:
        """The pool this client's transactions run in; its first login
        happens here, so a server that cannot be reached fails the client's
        login, as in session mode, rather than its first statement.

        Clients that differ only in their ``application_name`` share a
        pool: the server connections carry none, and each client is told
        its own."""
        shared = [(name, value) for name, value in client_params if name != "application_name"]
        params = upstream_params(secret, shared, policy)
        pool = self.pools.pool(
            PoolKey(app_id, alias, tuple(params)),
            lambda: self._login(alias, secret, shared, policy),
            size=policy.pool_size,
            wait_s=policy.pool_wait_ms / 1000,
        )
        if pool.hello is None:
            pool.release(await pool.acquire(), reusable=True)
        return pool

    async def _run_pooled(
        self,
        stream: TunnelStream,
        client_leftover: bytes,
        pool: ServerPool,
        secret: DatabaseSecret,
        policy: AppPolicy,
        live: _LiveSession,
        application_name: str | None,
    ) -> None:
        app_id, alias = pool.key.app_id, pool.key.alias
        edge = stream.session.peer
        minted = self.cancel_keys.mint(edge, secret, alias, lambda: session.server_key())
        watch = SessionWatch(self.audit, app_id, alias, policy, session=f"{edge}/{minted[0]}")
        session = PooledSession(stream, pool, watch)
        try:
            assert pool.hello is not None
            hello = list(pool.hello)
            if application_name is not None:
                hello.append(_core.encode_parameter_status("application_name", application_name))
            hello.append(_core.encode_backend_key_data(*minted))
            hello.append(_core.encode_ready_for_query("I"))
            await stream.send_all(b"".join(hello))
            live.relay = session  # no checkpoint until run() has its scope
            await session.run(client_leftover)
        finally:
            self.cancel_keys.forget(minted)

    async def _run_session(
        self,
        stream: TunnelStream,
        client_leftover: bytes,
        upstream: Upstream,
        app_id: str,
        alias: str,
        secret: DatabaseSecret,
        policy: AppPolicy,
        live: _LiveSession,
    ) -> None:
        minted: tuple[int, bytes] | None = None
        try:
            hello = [*upstream.notices, *upstream.statuses]
            if upstream.key is not None:
                real = upstream.key
                minted = self.cancel_keys.mint(stream.session.peer, secret, alias, lambda: real)
                hello.append(_core.encode_backend_key_data(*minted))
            hello.append(upstream.ready)
            await stream.send_all(b"".join(hello))
            edge = stream.session.peer
            relay = Relay(
                self.audit,
                stream,
                upstream,
                app_id,
                alias,
                policy,
                session=edge if minted is None else f"{edge}/{minted[0]}",
            )
            live.relay = relay  # no checkpoint until run() has its scope
            await relay.run(client_leftover)
        finally:
            if minted is not None:
                self.cancel_keys.forget(minted)
            await trio.aclose_forcefully(upstream.stream)

    # -- pg-cancel -----------------------------------------------------------------

    async def cancel(self, stream: TunnelStream) -> None:
        """Handle one ``pg-cancel`` stream: ``{"pid": int, "secret": hex}``.

        Like PostgreSQL, an unknown key is ignored without an answer; a key
        is only honoured from the edge that carries its session. A key this
        Gate did not mint may be another Gate's (the edge moved, or the
        application cancels through another edge of the same identity): it
        is passed to the other Gates, with the edge's name. Another Gate's
        request (role ``gate``) names the edge itself, and is never passed on.
        """
        request = stream.request
        from_gate = stream.session.peer_role == "gate"
        try:
            pid = int(request["pid"])
            key = bytes.fromhex(str(request["secret"]))
            edge = str(request["edge"]) if from_gate else stream.session.peer
        except (KeyError, ValueError, TypeError, OverflowError):  # Overflow: a pid of Infinity
            stream.reset(ResetCode.REFUSED, "malformed cancel request")
            return
        target = self.cancel_keys.target(pid, key)
        if target is not None and target.edge == edge:
            await self.cancel_keys.forward(target)
        elif target is None and not from_gate and self.ask_other_gates is not None:
            await self.ask_other_gates(
                {"service": "pg-cancel", "pid": pid, "secret": key.hex(), "edge": edge}
            )
        else:
            log.info("ignored a cancel request with an unknown key from %s", edge)
        try:
            await stream.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
