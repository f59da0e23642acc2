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
client side of the startup (``qmesh.minigate.pg``), SQL parsing beyond the
guard in :mod:`qmesh.gate.pgguard`.

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
import ssl
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, Final

import attrs
import trio

from qmesh import _core
from qmesh.config import Config
from qmesh.fastsocket import FastSocketStream, connect_tcp, fast
from qmesh.gate.pgguard import Refusal, check_statement, parameter_count, refusal_sql
from qmesh.gate.scram import (
    MECHANISM,
    MECHANISM_PLUS,
    ScramClient,
    ScramError,
    ScramServer,
    md5_password,
    tls_server_end_point,
)
from qmesh.logs import register_secret
from qmesh.pg.audit import AuditLog
from qmesh.pg.errors import VaultError
from qmesh.pg.policy import AppPolicy, policy_for
from qmesh.pg.vault import DatabaseSecret, Vault, load_master_key
from qmesh.state import AppKeys, AppVerifier, InvalidValue, StateStore, check_name
from qmesh.tunnel.frames import ResetCode
from qmesh.tunnel.stream import TapRecord, TunnelStream

__all__ = ["PgService", "PgSessionError", "UpstreamFailed"]

log = logging.getLogger(__name__)

LOGIN_TIMEOUT_S: Final = 30.0
"""The whole login: the app's SCRAM exchange and the Gate's login upstream."""
CONNECT_TIMEOUT_S: Final = 10.0
CANCEL_TIMEOUT_S: Final = 10.0
AUTH_MAX_MESSAGE: Final = 64 * 1024
"""Cap on a message during login (SASL, ParameterStatus, errors)."""
RECEIVE_SIZE: Final = 64 * 1024
MAX_TRACKED_STATEMENTS: Final = 10_000
"""Prepared statement and portal names remembered per session for the audit."""
MAX_STARTUP_PARAMS: Final = 64

# Authentication request codes.
AUTH_OK: Final = 0
AUTH_CLEARTEXT: Final = 3
AUTH_MD5: Final = 5
AUTH_SASL: Final = 10
AUTH_SASL_CONTINUE: Final = 11
AUTH_SASL_FINAL: Final = 12

_Q, _P, _B, _E, _C, _S, _F, _X = (ord(c) for c in "QPBECSFX")
_R, _K, _Z, _N, _I, _SUSPENDED, _V = (ord(c) for c in "RKZNIsv")
_ERROR = ord("E")
_PSTATUS = ord("S")
_AUTH_RESPONSE = ord("p")
_SET_CONFIG_OID: Final = 2078  # pg_catalog.set_config(text, text, boolean)
# A FunctionCall of OID 0: the server answers "function with OID 0 does not
# exist" and ReadyForQuery; sent in place of a refused fast-path call.
_NO_FUNCTION_CALL: Final = _core.encode_message(_F, b"\0\0\0\0\0\0\0\0\0\0")
_UNKNOWN_STATEMENT: Final = b"<statement prepared before the audit could see it>"


class PgSessionError(Exception):
    """Ends one Postgres session: the client gets an ErrorResponse with
    ``sqlstate`` and ``message`` (which never contain a secret), then the
    stream closes. Raised for the client's own faults (bad key, alias not
    allowed, protocol violations)."""

    def __init__(self, sqlstate: str, message: str, *, severity: str = "FATAL") -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message
        self.severity = severity


class UpstreamFailed(PgSessionError):
    """The real server could not be reached, refused TLS, refused the Gate's
    credentials or broke the protocol. The message names the alias, never
    the server's address or the credentials."""


class _UpstreamAuthRejected(Exception):
    """The real server answered 28P01 to the Gate's login (internal: retried)."""


class _ClientGone(Exception):
    """The client closed the stream during the login (e.g. psql going back
    to ask its user for a password): not an error worth a warning."""


@attrs.frozen
class _CancelTarget:
    edge: str
    host: str
    port: int
    sslmode: str
    sslrootcert: str | None
    alias: str
    pid: int
    secret: bytes = attrs.field(repr=False)


class _MessageReader:
    """Whole messages from a stream, for the login phases; remembers the
    bytes after the last message it returned (see :meth:`leftover`)."""

    def __init__(self, stream: trio.abc.ReceiveStream, *, frontend: bool, what: str) -> None:
        tags = _core.PG_FRONTEND_TAGS if frontend else _core.PG_BACKEND_TAGS
        self._scanner = _core.PgScanner(frontend=frontend, full=tags, max_message=AUTH_MAX_MESSAGE)
        self._stream = stream
        self._what = what
        self._pending = bytearray()
        self._ready: deque[tuple[int, bytes]] = deque()

    async def next(self) -> tuple[int, bytes]:
        while not self._ready:
            data = await self._stream.receive_some(RECEIVE_SIZE)
            if not data:
                raise _ClientGone(f"{self._what} closed the connection")
            self._pending += data
            self._ready.extend(self._scanner.feed(data))
        tag, raw = self._ready.popleft()
        del self._pending[: len(raw)]
        return tag, raw

    def leftover(self) -> bytes:
        """Bytes received after the last message :meth:`next` returned."""
        return bytes(self._pending)


def _error(exc: PgSessionError) -> bytes:
    return _core.encode_error_response(
        [("S", exc.severity), ("V", exc.severity), ("C", exc.sqlstate), ("M", exc.message)]
    )


async def _send_quietly(stream: TunnelStream, data: bytes) -> None:
    """Send ``data`` (an error) to the client and end the stream, giving up
    after 5 s and ignoring a broken stream."""
    try:
        with trio.move_on_after(5):
            await stream.send_all(data)
            await stream.send_eof()
            # Wait for the client to hang up, so the error is delivered
            # before the RESET that closing early would send.
            while await stream.receive_some():
                pass
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
        pass


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


def _upstream_params(
    secret: DatabaseSecret, client: Sequence[tuple[str, str]], policy: AppPolicy
) -> list[tuple[str, str]]:
    """The startup parameters for the real server: the vault's user and
    database, the client's other settings, then qmesh's limits. Direct
    parameters are applied after ``options``, and the last of a name wins,
    so a client's ``options=-c default_transaction_read_only=off`` cannot
    undo them."""
    dropped = {"user", "database", "replication"}
    if policy.read_only:
        dropped |= {"default_transaction_read_only", "transaction_read_only"}
    if policy.statement_timeout_ms is not None:
        dropped.add("statement_timeout")
    out = [("user", secret.user), ("database", secret.dbname)]
    out += [(n, v) for n, v in client if n not in dropped and not n.startswith("_pq_.")]
    if policy.read_only:
        out.append(("default_transaction_read_only", "on"))
    if policy.statement_timeout_ms is not None:
        out.append(("statement_timeout", str(policy.statement_timeout_ms)))
    return out


def _scrub(text: str, secret: DatabaseSecret) -> str:
    if secret.password:
        text = text.replace(secret.password, "[REDACTED]")
    return text


def _tls_context(sslmode: str, sslrootcert: str | None) -> ssl.SSLContext:
    """libpq's meaning of sslmode: ``verify-full`` checks the chain and the
    host name, ``verify-ca`` the chain only, ``require`` nothing unless a
    root certificate is given (then it acts as verify-ca), ``prefer``
    nothing. Without sslrootcert the system's CAs are used for verification."""
    verify = sslmode in ("verify-ca", "verify-full") or (
        sslmode == "require" and sslrootcert is not None
    )
    if not verify:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context = ssl.create_default_context(cafile=sslrootcert)
        context.check_hostname = sslmode == "verify-full"
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


async def _negotiate_tls(
    tcp: trio.SocketStream, sslmode: str, sslrootcert: str | None, host: str, alias: str
) -> trio.abc.Stream:
    """SSLRequest, then TLS if the server says 'S'. Returns the stream to use."""
    await tcp.send_all(_core.PG_SSL_REQUEST)
    # Exactly one byte: anything the server sends after 'S' before the TLS
    # handshake would be unauthenticated (CVE-2021-23222), so it is never read here.
    answer = await tcp.receive_some(1)
    if answer == b"S":
        stream = trio.SSLStream(tcp, _tls_context(sslmode, sslrootcert), server_hostname=host)
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError as exc:
            log.warning("TLS to the server of alias %r failed: %s", alias, exc.__cause__ or exc)
            raise UpstreamFailed(
                "08001", f"qmesh: TLS to the server of database alias {alias!r} failed"
            ) from None
        return stream
    if answer == b"N" and sslmode in ("disable", "prefer"):
        return tcp
    if answer == b"N":
        raise UpstreamFailed(
            "08001",
            f"qmesh: the server of database alias {alias!r} does not accept TLS, "
            f"which its sslmode ({sslmode}) requires",
        )
    raise UpstreamFailed(
        "08001", f"qmesh: the server of database alias {alias!r} answered SSLRequest oddly"
    )


@attrs.define
class _Upstream:
    stream: trio.abc.Stream
    statuses: list[bytes]
    notices: list[bytes]
    ready: bytes
    key: tuple[int, bytes] | None
    leftover: bytes


async def _open_upstream(
    secret: DatabaseSecret, params: list[tuple[str, str]], alias: str
) -> _Upstream:
    """Connect and log in to the real server; raise UpstreamFailed or
    _UpstreamAuthRejected (28P01)."""
    try:
        with trio.fail_after(CONNECT_TIMEOUT_S):
            tcp = await connect_tcp(secret.host, secret.port)
    except (OSError, trio.TooSlowError) as exc:
        log.warning("cannot connect to the server of alias %r: %s", alias, exc or "timeout")
        raise UpstreamFailed(
            "08001", f"qmesh: the gate cannot reach the server of database alias {alias!r}"
        ) from None
    stream: trio.abc.Stream = tcp
    try:
        if secret.sslmode != "disable":
            stream = await _negotiate_tls(
                tcp, secret.sslmode, secret.sslrootcert, secret.host, alias
            )
        tls = isinstance(stream, trio.SSLStream)
        binding = _channel_binding(stream) if isinstance(stream, trio.SSLStream) else None
        await stream.send_all(_core.encode_startup(params))
        reader = _MessageReader(stream, frontend=False, what="the database server")
        scram: ScramClient | None = None
        scram_done = authenticated = False
        statuses: list[bytes] = []
        notices: list[bytes] = []
        key: tuple[int, bytes] | None = None
        while True:
            tag, raw = await reader.next()
            body = raw[5:]
            if tag == _R:
                code, data = _core.parse_authentication(body)
                if code == AUTH_OK:
                    if scram is not None and not scram_done:
                        raise UpstreamFailed(
                            "08001",
                            f"qmesh: the server of database alias {alias!r} skipped the end "
                            "of SCRAM authentication",
                        )
                    if secret.channel_binding == "require" and not (scram and scram.bound):
                        raise UpstreamFailed(
                            "08001",
                            f"qmesh: database alias {alias!r} requires channel binding, but the "
                            "server let the gate in without it",
                        )
                    authenticated = True
                    continue
                answer = _answer_auth(code, data, body, secret, binding, tls, alias, scram)
                if code == AUTH_SASL:
                    scram = answer[1]
                elif code == AUTH_SASL_FINAL:
                    scram_done = True
                if answer[0]:
                    await stream.send_all(answer[0])
            elif tag == _ERROR:
                fields = _core.parse_error_fields(body)
                sqlstate = fields.get("C", "08001")
                if sqlstate == "28P01":
                    raise _UpstreamAuthRejected()
                message = _scrub(fields.get("M", ""), secret)
                log.warning(
                    "the server of alias %r refused the login: %s %s", alias, sqlstate, message
                )
                raise UpstreamFailed(
                    sqlstate, f"qmesh: database alias {alias!r}: the server said: {message}"
                )
            elif tag == _PSTATUS:
                statuses.append(raw)
            elif tag == _K:
                key = _core.parse_backend_key_data(body)
            elif tag == _N:
                notices.append(raw)
            elif tag == _Z:
                if not authenticated:
                    raise UpstreamFailed(
                        "08001", f"qmesh: the server of database alias {alias!r} broke the protocol"
                    )
                return _Upstream(stream, statuses, notices, raw, key, reader.leftover())
            elif tag == _V:
                continue  # NegotiateProtocolVersion: we asked for plain 3.0
            else:
                raise UpstreamFailed(
                    "08001", f"qmesh: the server of database alias {alias!r} broke the protocol"
                )
    except _ClientGone:
        await trio.aclose_forcefully(stream)
        raise UpstreamFailed(
            "08001", f"qmesh: the server of database alias {alias!r} closed the connection"
        ) from None
    except _core.PgWireError as exc:
        await trio.aclose_forcefully(stream)
        log.warning("protocol error from the server of alias %r: %s", alias, exc)
        raise UpstreamFailed(
            "08001", f"qmesh: the server of database alias {alias!r} broke the protocol"
        ) from None
    except ScramError as exc:
        await trio.aclose_forcefully(stream)
        log.warning("SCRAM with the server of alias %r failed: %s", alias, exc)
        raise UpstreamFailed(
            "08001", f"qmesh: SCRAM authentication with the server of alias {alias!r} failed"
        ) from None
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        await trio.aclose_forcefully(stream)
        log.warning("connection to the server of alias %r failed: %s", alias, exc)
        raise UpstreamFailed(
            "08001", f"qmesh: the connection to the server of database alias {alias!r} failed"
        ) from None
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise


def _channel_binding(stream: trio.SSLStream[trio.abc.Stream]) -> bytes | None:
    """The TLS connection's ``tls-server-end-point`` data; None when the
    server's certificate cannot give it."""
    certificate = stream.getpeercert(binary_form=True)
    if not certificate:
        return None
    try:
        return tls_server_end_point(certificate)
    except ValueError:
        return None


def _answer_auth(
    code: int,
    data: bytes,
    body: bytes,
    secret: DatabaseSecret,
    binding: bytes | None,
    tls: bool,
    alias: str,
    scram: ScramClient | None,
) -> tuple[bytes, ScramClient | None]:
    """The Gate's answer to one authentication request of the real server.

    ``binding``: the TLS channel's binding data, when there is one.
    """
    require_binding = secret.channel_binding == "require"
    if code == AUTH_SASL:
        mechanisms = _core.parse_sasl_mechanisms(body)
        use_binding = secret.channel_binding != "disable" and binding is not None
        if use_binding and MECHANISM_PLUS in mechanisms:
            client = ScramClient(secret.password, channel_binding=binding)
        elif require_binding:
            raise UpstreamFailed(
                "08001",
                f"qmesh: database alias {alias!r} requires channel binding, which the server "
                "does not offer over this connection",
            )
        elif MECHANISM in mechanisms:
            # "y": we could bind, the server did not offer it (a server that
            # did would see the downgrade); "n": there is no channel.
            client = ScramClient(secret.password, binding_supported=use_binding)
        else:
            raise UpstreamFailed(
                "08001", f"qmesh: the server of alias {alias!r} offers no SCRAM-SHA-256"
            )
        initial = _core.encode_sasl_initial_response(client.mechanism, client.client_first())
        return initial, client
    if require_binding and code in (AUTH_MD5, AUTH_CLEARTEXT):
        raise UpstreamFailed(
            "08001",
            f"qmesh: database alias {alias!r} requires channel binding, but the server asks "
            "for a password without SCRAM",
        )
    if code == AUTH_SASL_CONTINUE and scram is not None:
        return _core.encode_message(_AUTH_RESPONSE, scram.client_final(data)), scram
    if code == AUTH_SASL_FINAL and scram is not None:
        scram.verify_server_final(data)
        return b"", scram
    if code == AUTH_MD5 and len(data) == 4:
        answer = md5_password(secret.user, secret.password, data)
        return _core.encode_message(_AUTH_RESPONSE, answer + b"\0"), None
    if code == AUTH_CLEARTEXT:
        if not tls:
            raise UpstreamFailed(
                "08001",
                f"qmesh: the server of alias {alias!r} asks for a cleartext password over an "
                "unencrypted connection; the gate does not send it (use TLS or SCRAM)",
            )
        password = secret.password.encode("utf-8") + b"\0"
        return _core.encode_message(_AUTH_RESPONSE, password), None
    raise UpstreamFailed(
        "08001", f"qmesh: the server of alias {alias!r} asks for an authentication qmesh lacks"
    )


@attrs.define(slots=True)
class _Pending:
    """One statement (or a Sync/FunctionCall) waiting for its results."""

    kind: int  # _Q (simple query), _E (execute), _S (sync or function call)
    text: bytes
    started: float
    rows: int | None = None
    error: str | None = None


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
    relay: _Relay | None = None
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
            relay.end(_SessionOver(error))
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
        self.vault = vault
        self.vault_problem = vault_problem
        self.audit = audit if audit is not None else AuditLog(store)
        self._mock_secret = mock_secret or secrets.token_bytes(32)
        self._cancel_keys: dict[tuple[int, bytes], _CancelTarget] = {}
        self._registered: set[str] = set()
        self.active: dict[str, int] = {}
        """Open sessions per app id."""
        self.cancels_forwarded = 0
        self.live: dict[str, set[_LiveSession]] = {}
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
            vault: Vault | None = Vault.open(store, master_key)
            problem = None
            mock = hmac.new(master_key, b"qmesh pg mock scram", hashlib.sha256).digest()
        except VaultError as exc:
            log.warning("the Postgres path is disabled: %s", exc)
            vault, problem, mock = None, str(exc), None
        return cls(config, store, vault=vault, vault_problem=problem, mock_secret=mock)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The service's own tasks: the audit log's writer, and the end of
        sessions whose key's rotation overlap runs out."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.audit.run)
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
        One read per app with live sessions; no PBKDF2."""
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
        reader = _MessageReader(stream, frontend=True, what="the client")
        counted = False
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
                        policy = policy_for(self.config, app_id)
                        secret = await self._admit(app_id, alias, policy)
                        self.active[app_id] = self.active.get(app_id, 0) + 1
                        counted = True
                        upstream = await self._login(alias, secret, params, policy)
                except trio.TooSlowError:
                    raise PgSessionError("08006", "qmesh: the login took too long") from None
                log.info("pg session: app %r, alias %r, from %s", app_id, alias, peer)
                await self._run_session(
                    stream, reader.leftover(), upstream, app_id, alias, secret, policy, live
                )
            if live.ending is not None and not live.ended_by_relay:
                raise live.ending
        except PgSessionError as exc:
            level = logging.INFO if exc.sqlstate in ("28P01", "3D000") else logging.WARNING
            log.log(level, "pg session of app %r (alias %r, %s) ended: %s %s",
                    app_id, alias, peer, exc.sqlstate, exc.message)  # fmt: skip
            await _send_quietly(stream, _error(exc))
        except _ClientGone:
            log.debug("pg client of app %r left during the login", app_id)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            # The stream was reset (the client's connection at the edge
            # closed, or the tunnel session was lost).
            log.debug("pg stream of app %r ended: %s", app_id, exc)
        except _core.PgWireError as exc:
            log.info("pg client of app %r broke the protocol during the login: %s", app_id, exc)
            await _send_quietly(stream, _error(PgSessionError("08P01", f"qmesh: {exc}")))
        finally:
            if live is not None:
                self._untrack(live)
            if counted:
                self.active[app_id] -= 1
                if not self.active[app_id]:
                    del self.active[app_id]
            await trio.aclose_forcefully(stream)

    async def _negotiate_version(
        self, stream: TunnelStream, version: int, params: Sequence[tuple[str, str]]
    ) -> None:
        # PostgreSQL answers a newer 3.x or `_pq_.` options with
        # NegotiateProtocolVersion and carries on in 3.0; so does qmesh.
        unknown = [name for name, _ in params if name.startswith("_pq_.")]
        if version & 0xFFFF or unknown:
            await stream.send_all(_core.encode_negotiate_protocol_version(0, unknown))

    async def _authenticate(
        self, stream: TunnelStream, reader: _MessageReader, app_id: str
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
        limit = policy.max_sessions
        if limit is not None and self.active.get(app_id, 0) >= limit:
            raise PgSessionError(
                "53300", f'qmesh: too many sessions for app "{app_id}" (max_sessions = {limit})'
            )
        return secret

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
    ) -> _Upstream:
        tried = {secret.password}
        try:
            return await _open_upstream(
                secret, _upstream_params(secret, client_params, policy), alias
            )
        except _UpstreamAuthRejected:
            pass
        # The password may have just been rotated by another process: the
        # vault's current value, then a rotation's pending one.
        assert self.vault is not None
        for get in (self.vault.get, self.vault.get_pending):
            candidate = await self._read_vault(get, alias)
            if candidate is None or candidate.password in tried:
                continue
            tried.add(candidate.password)
            log.info("the server of alias %r refused the stored password; retrying", alias)
            try:
                return await _open_upstream(
                    candidate, _upstream_params(candidate, client_params, policy), alias
                )
            except _UpstreamAuthRejected:
                continue
        log.error("the server of alias %r refuses the vault's credentials (28P01)", alias)
        raise UpstreamFailed(
            "08004",
            f"qmesh: the database server of alias {alias!r} refused the gate's credentials; "
            "the operator must update them (qmesh secrets set)",
        )

    async def _run_session(
        self,
        stream: TunnelStream,
        client_leftover: bytes,
        upstream: _Upstream,
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
                minted = self._mint_key(stream.session.peer, secret, alias, upstream.key)
                hello.append(_core.encode_backend_key_data(*minted))
            hello.append(upstream.ready)
            await stream.send_all(b"".join(hello))
            relay = _Relay(self, stream, upstream, app_id, alias, policy)
            live.relay = relay  # no checkpoint until run() has its scope
            await relay.run(client_leftover)
        finally:
            if minted is not None:
                self._cancel_keys.pop(minted, None)
            await trio.aclose_forcefully(upstream.stream)

    def _mint_key(
        self, edge: str, secret: DatabaseSecret, alias: str, real: tuple[int, bytes]
    ) -> tuple[int, bytes]:
        while True:
            minted = (secrets.randbelow(2**31 - 1) + 1, secrets.token_bytes(4))
            if minted not in self._cancel_keys:
                break
        self._cancel_keys[minted] = _CancelTarget(
            edge=edge,
            host=secret.host,
            port=secret.port,
            sslmode=secret.sslmode,
            sslrootcert=secret.sslrootcert,
            alias=alias,
            pid=real[0],
            secret=real[1],
        )
        return minted

    # -- pg-cancel -----------------------------------------------------------------

    async def cancel(self, stream: TunnelStream) -> None:
        """Handle one ``pg-cancel`` stream: ``{"pid": int, "secret": hex}``.

        Like PostgreSQL, an unknown key is ignored without an answer; a key
        is only honoured from the edge that carries its session.
        """
        request = stream.request
        try:
            pid = int(request["pid"])
            key = bytes.fromhex(str(request["secret"]))
        except (KeyError, ValueError, TypeError, OverflowError):  # Overflow: a pid of Infinity
            stream.reset(ResetCode.REFUSED, "malformed cancel request")
            return
        target = self._cancel_keys.get((pid, key))
        if target is None or target.edge != stream.session.peer:
            log.info("ignored a cancel request with an unknown key from %s", stream.session.peer)
        else:
            await self._forward_cancel(target)
        try:
            await stream.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def _forward_cancel(self, target: _CancelTarget) -> None:
        conn: trio.abc.Stream | None = None
        try:
            with trio.fail_after(CANCEL_TIMEOUT_S):
                tcp = await connect_tcp(target.host, target.port)
                conn = tcp
                if target.sslmode != "disable":
                    conn = await _negotiate_tls(
                        tcp, target.sslmode, target.sslrootcert, target.host, target.alias
                    )
                await conn.send_all(_core.encode_cancel_request(target.pid, target.secret))
                # The server answers nothing and closes once it has acted.
                while await conn.receive_some(1024):
                    pass
            self.cancels_forwarded += 1
            log.info("forwarded a cancel request for alias %r", target.alias)
        except (OSError, trio.TooSlowError, trio.BrokenResourceError, UpstreamFailed) as exc:
            log.warning("cannot forward a cancel request for alias %r: %s", target.alias, exc)
        finally:
            if conn is not None:
                await trio.aclose_forcefully(conn)


class _SessionOver(Exception):
    """The relay must end; ``error`` (if any) is sent to the client first."""

    def __init__(self, error: PgSessionError | None) -> None:
        super().__init__(error.message if error else "session over")
        self.error = error


class _Relay:
    """Both directions of one logged-in session."""

    def __init__(
        self,
        service: PgService,
        client: TunnelStream,
        upstream: _Upstream,
        app_id: str,
        alias: str,
        policy: AppPolicy,
    ) -> None:
        self.client = client
        self.upstream = fast(upstream.stream)
        self.server_leftover = upstream.leftover
        self.app_id = app_id
        self.alias = alias
        self.read_only = policy.read_only
        self.guard_timeout = policy.statement_timeout_ms is not None
        self.audit_mode = policy.audit_statements
        self.audit = service.audit if self.audit_mode != "off" else None
        self.pending: deque[_Pending] = deque()
        self.statements: dict[bytes, bytes] = {}
        self.portals: dict[bytes, bytes] = {}
        self.sending_to_client = False
        self.guard = self.read_only or self.guard_timeout
        self.client_scanner = self._client_scanner()
        self.ending: _SessionOver | None = None
        self.scope: trio.CancelScope | None = None

    def _client_scanner(self) -> _core.PgScanner:
        if self.guard:
            # Relay mode: Query, Parse and FunctionCall are held until
            # complete so a refused one can be replaced before any of it
            # reaches the server.
            peek = b"BECS" if self.audit is not None else b""
            return _core.PgScanner(frontend=True, full=b"QPF", peek=peek, relay=True)
        if self.audit is not None:
            # Observe mode: the input is forwarded as it is; the scanner
            # reports the messages the audit needs.
            return _core.PgScanner(frontend=True, full=b"QP", peek=b"BECSF")
        return _core.PgScanner(frontend=True)  # framing and size checks only

    def end(self, ending: _SessionOver) -> None:
        """End the session from outside (its key lost its standing)."""
        self._end(ending)

    def _end(self, ending: _SessionOver | None) -> None:
        """End the session (both directions); the first reason given wins."""
        self.ending = self.ending or ending
        if self.scope is not None:
            self.scope.cancel()

    async def run(self, client_leftover: bytes) -> None:
        with trio.CancelScope() as self.scope:
            if self._native(client_leftover):
                await self._run_native()
            else:
                await self._run_in_python(client_leftover)
        self.scope = None
        ending = self.ending
        if ending is not None and ending.error is not None:
            exc = ending.error
            log.warning("pg session of app %r (alias %r) ended: %s %s",
                        self.app_id, self.alias, exc.sqlstate, exc.message)  # fmt: skip
            if not self.sending_to_client:
                await _send_quietly(self.client, _error(exc))
        else:
            with trio.move_on_after(5):
                try:
                    await self.client.send_eof()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass

    def _native(self, client_leftover: bytes) -> bool:
        """Whether the session's engine can relay this session: not over TLS
        to the server, and with nothing read ahead on either side (rare:
        clients wait for ReadyForQuery before their first query)."""
        return (
            not client_leftover
            and not self.server_leftover
            and isinstance(self.upstream, FastSocketStream | trio.SocketStream)
        )

    async def _run_native(self) -> None:
        """Relay in the tunnel engine: no Python per message. The engine
        checks the client's framing and limits and, with the audit on, hands
        the messages the audit needs to :meth:`_on_tap` in batches. With a
        statement guard it holds each Query, Parse and FunctionCall (and what
        follows) until :meth:`_on_tap` says what to send in its place: one
        trip through Python per statement, none per row or reply."""
        assert isinstance(self.upstream, FastSocketStream | trio.SocketStream)
        audit = self.audit is not None
        if self.guard:
            frontend = (b"", b"BECS" if audit else b"")
        else:
            frontend = (b"QP", b"BECSF") if audit else (b"", b"")
        # A read-only session's ParameterStatus reports are held until
        # checked: a session that got its read-only setting turned off is
        # ended before the client sees the statement succeed.
        outcome = await self.client.relay_native(
            self.upstream,
            # The session ends when the server's side ends.
            end_on_socket_eof=True,
            pg_frontend=frontend,
            pg_backend=b"CEIZs" if audit else (b"" if self.read_only else None),
            pg_guard=b"QPF" if self.guard else None,
            pg_backend_guard=b"S" if self.read_only else None,
            on_tap=self._on_tap if audit or self.guard else None,
        )
        if outcome.ending == "postgres":
            self._end(_SessionOver(PgSessionError("08P01", f"qmesh: {outcome.detail}")))
        elif outcome.failed:
            log.debug("pg relay for app %r ended: %s %s", self.app_id, outcome.ending,
                      outcome.detail)  # fmt: skip

    def _on_tap(self, records: list[TapRecord]) -> bytes | None:
        """Audit (and guard) what the engine saw, in order; the replacement
        for a held message, which ends the batch."""
        replacement = None
        try:
            for at, from_client, tag, raw, held in records:
                if from_client:
                    replacement = self._frontend_event(tag, raw, at)
                else:
                    self._backend_event(tag, raw, at)
                    replacement = raw if held else None
        except _SessionOver as exc:
            self._end(exc)
            return None
        return replacement

    async def _run_in_python(self, client_leftover: bytes) -> None:
        async def guarded(pump: Any, data: bytes) -> None:
            # The session ends when the server's side ends, or on any error.
            # A client that hangs up cleanly has its EOF passed to the server,
            # which then closes its side.
            try:
                await pump(data)
                if pump != self.server_to_client:
                    return
                self._end(None)
            except _SessionOver as exc:
                self._end(exc)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                log.debug("pg relay for app %r ended: %s", self.app_id, exc)
                self._end(None)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(guarded, self.client_to_server, client_leftover)
            nursery.start_soon(guarded, self.server_to_client, self.server_leftover)

    # -- client → server ---------------------------------------------------------

    async def client_to_server(self, data: bytes | bytearray) -> None:
        receive = self.client.receive_some
        send = self.upstream.send_all
        while True:
            if not data:
                data = await receive(RECEIVE_SIZE)
                if not data:
                    break
            data = self._from_client(data)
            if data:
                await send(data)
            data = b""
        try:
            self.client_scanner.eof()
        except _core.PgTruncated:
            raise _SessionOver(
                PgSessionError("08P01", "qmesh: the client's stream ended inside a message")
            ) from None
        # The client hung up (after Terminate, normally): let the server know.
        if isinstance(self.upstream, trio.abc.HalfCloseableStream):
            await self.upstream.send_eof()
        else:
            await trio.aclose_forcefully(self.upstream)

    def _from_client(self, data: bytes | bytearray) -> bytes | bytearray:
        """Scan client bytes; what to send the server in their place.
        Raises _SessionOver for input that must end the session."""
        on_event = self._frontend_event
        try:
            events = self.client_scanner.feed(data)
        except _core.PgWireError as exc:
            raise _SessionOver(PgSessionError("08P01", f"qmesh: {exc}")) from None
        now = time.monotonic()
        if self.guard:
            return b"".join([raw if tag == 0 else on_event(tag, raw, now) for tag, raw in events])
        for tag, raw in events:
            on_event(tag, raw, now)
        return data

    def _frontend_event(self, tag: int, raw: bytes, now: float) -> bytes:
        """Look at one reported client message, seen at ``now``
        (``time.monotonic()``); return the bytes to send in its place (relay
        mode uses them; observe mode ignores them)."""
        try:
            if tag == _Q:
                sql = raw[5:-1]
                if self.guard:
                    raw = self._guard_query(sql, raw)
                if self.audit is not None:
                    self.pending.append(_Pending(_Q, sql, now))
            elif tag == _P:
                name_end = raw.index(0, 5)
                name, sql_end = raw[5:name_end], raw.index(0, name_end + 1)
                sql = raw[name_end + 1 : sql_end]
                if self.guard:
                    raw = self._guard_parse(name, sql, raw)
                if self.audit is not None:
                    self._remember(self.statements, name, sql)
            elif tag == _B:
                names = _core.parse_bind_names(raw[5:])
                if names is not None and self.audit is not None:
                    portal_end = raw.index(0, 5)
                    portal = raw[5:portal_end]
                    statement = raw[portal_end + 1 : raw.index(0, portal_end + 1)]
                    text = self.statements.get(statement, _UNKNOWN_STATEMENT)
                    self._remember(self.portals, portal, text)
            elif tag == _E:
                if self.audit is not None:
                    portal = raw[5 : raw.index(0, 5)]
                    text = self.portals.get(portal, _UNKNOWN_STATEMENT)
                    self.pending.append(_Pending(_E, text, now))
            elif tag == _C:
                if self.audit is not None:
                    kind, _ = _core.parse_close(raw[5:])
                    name = raw[6 : raw.index(0, 6)]
                    (self.statements if kind == "S" else self.portals).pop(name, None)
            elif tag == _S:
                if self.audit is not None:
                    self.pending.append(_Pending(_S, b"", now))
            elif tag == _F:
                oid = int.from_bytes(raw[5:9], "big") if len(raw) >= 9 else -1
                if self.guard and oid == _SET_CONFIG_OID:
                    log.warning("refused a fast-path set_config call of app %r", self.app_id)
                    raw = _NO_FUNCTION_CALL
                if self.audit is not None:
                    self.pending.append(_Pending(_S, b"", now))
        except (ValueError, _core.PgWireError) as exc:
            raise _SessionOver(
                PgSessionError("08P01", f"qmesh: malformed client message: {exc}")
            ) from None
        return raw

    def _remember(self, names: dict[bytes, bytes], name: bytes, text: bytes) -> None:
        if name not in names and len(names) >= MAX_TRACKED_STATEMENTS:
            names.pop(next(iter(names)))  # oldest first; only the audit text is lost
        names[name] = text

    def _refusal(self, text: str, what: str) -> Refusal | None:
        """The guard's refusal of statement ``text`` (logged), or None."""
        refusal = check_statement(text, read_only=self.read_only, guard_timeout=self.guard_timeout)
        if refusal is not None:
            log.warning("refused %s of app %r: %s", what, self.app_id, refusal.message)
        return refusal

    def _guard_query(self, sql: bytes, raw: bytes) -> bytes:
        refusal = self._refusal(sql.decode("utf-8", "replace"), "a statement")
        if refusal is None:
            return raw
        return _core.encode_query(refusal_sql(refusal))

    def _guard_parse(self, name: bytes, sql: bytes, raw: bytes) -> bytes:
        text = sql.decode("utf-8", "replace")
        refusal = self._refusal(text, "a prepared statement")
        if refusal is None:
            return raw
        _, _, declared = _core.parse_parse(raw[5:])
        # bytea accepts any parameter bytes, in text or binary format, so
        # the client's Bind still fits and Execute is what fails.
        types = [17] * parameter_count(text, len(declared))
        return _core.encode_parse(name, refusal_sql(refusal), types)

    # -- server → client ---------------------------------------------------------

    async def server_to_client(self, data: bytes | bytearray) -> None:
        kinds = b""
        if self.audit is not None:
            kinds += b"CEIZs"
        if self.read_only:
            kinds += b"S"
        scanner = _core.PgScanner(frontend=False, full=kinds) if kinds else None
        on_event = self._backend_event
        receive = self.upstream.receive_some
        send = self.client.send_all
        while True:
            if not data:
                data = await receive(RECEIVE_SIZE)
                if not data:
                    return
            if scanner is not None:
                now = time.monotonic()
                for tag, raw in scanner.feed(data):
                    on_event(tag, raw, now)
            self.sending_to_client = True
            await send(data)
            self.sending_to_client = False
            data = b""

    def _backend_event(self, tag: int, raw: bytes, now: float) -> None:
        if tag == _PSTATUS:
            if self.read_only:
                name, value = _core.parse_parameter_status(raw[5:])
                if name == "default_transaction_read_only" and value != "on":
                    raise _SessionOver(
                        PgSessionError(
                            "25006",
                            "qmesh: this application's sessions are read-only and the session "
                            "tried to turn that off; it has been ended",
                        )
                    )
            return
        pending = self.pending
        if tag == _Z:
            self._ready(now)
            return
        if not pending:
            return
        head = pending[0]
        if tag == _C:
            _, rows = _core.parse_command_complete(raw[5:])
            if rows is not None:
                head.rows = (head.rows or 0) + rows
            if head.kind == _E:
                self._finish(pending.popleft(), "ok", now)
        elif tag == _ERROR:
            sqlstate = _core.parse_error_fields(raw[5:]).get("C", "XX000")
            if head.kind == _Q:
                head.error = head.error or sqlstate
            elif head.kind == _E:
                self._finish(pending.popleft(), f"error:{sqlstate}", now)
        elif tag in (_I, _SUSPENDED) and head.kind == _E:
            self._finish(pending.popleft(), "ok", now)

    def _ready(self, now: float) -> None:
        """ReadyForQuery ends a simple query, or everything up to a Sync."""
        pending = self.pending
        while pending:
            item = pending.popleft()
            if item.kind == _Q:
                self._finish(item, f"error:{item.error}" if item.error else "ok", now)
                break
            if item.kind == _S:
                break
            # An Execute the server skipped after an earlier error.
            self._finish(item, "skipped", now)

    def _finish(self, item: _Pending, outcome: str, now: float) -> None:
        assert self.audit is not None
        self.audit.record(
            app=self.app_id,
            alias=self.alias,
            statement=item.text,
            duration_s=now - item.started,
            rows=item.rows,
            outcome=outcome,
            mode=self.audit_mode,
        )
