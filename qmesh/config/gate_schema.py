"""The Gate's configuration classes: ``[gate]`` and the tables under it.

For: the frozen attrs classes the Gate's services read (per-app database
policy, the qg:// router's providers, budgets and routing, memory,
discovery, the HTTP API's limits, the Postgres pools' server connections),
their defaults, and what each field means.

Not for: checking values (:mod:`qmesh.config.gate_sections` and
:mod:`qmesh.config.router_sections` do, with file and line), or the
sections outside ``[gate]`` (:mod:`qmesh.config.schema`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Final

import attrs

__all__ = [
    "AUDIT_MODES",
    "KEEP_MODES",
    "MEMORY_EXTRACTORS",
    "POOL_MODES",
    "PRIVACY_FLOORS",
    "BudgetConfig",
    "ClusterConfig",
    "DiscoveryConfig",
    "GateAppConfig",
    "GateConfig",
    "HttpConfig",
    "LlmPolicyConfig",
    "MemoryConfig",
    "OidcConfig",
    "PgAuditConfig",
    "PgPoolConfig",
    "ProviderConfig",
    "ProviderModelConfig",
    "RoutingConfig",
    "llm_policy_to_json",
    "parse_llm_policy",
]

AUDIT_MODES: Final = ("text", "hash", "off")
"""Values of ``gate.apps.APP.audit_statements``."""
POOL_MODES: Final = ("session", "transaction")
"""Values of ``gate.apps.APP.pool_mode``."""
KEEP_MODES: Final = ("nothing", "hash", "text")
"""Values of ``gate.apps.APP.llm.keep``."""
PRIVACY_FLOORS: Final = ("any", "private", "local")
"""Values of ``gate.apps.APP.llm.privacy``, weakest first (the DSN's own values)."""
_MAX_LIMIT: Final = 2**31 - 1


@attrs.frozen
class LlmPolicyConfig:
    """``[gate.apps.APP_ID.llm]``: what the app may do through the LLM API.
    Every field's default restricts nothing (an app without the table is
    served as before)."""

    tasks: tuple[str, ...] | None = None
    """Tasks its DSNs may ask for; None: any."""
    models: tuple[str, ...] | None = None
    """:mod:`fnmatch` patterns of model ids it may be served by; None: any."""
    providers: tuple[str, ...] | None = None
    """Cloud providers (``[[gate.providers]]`` names) it may reach; None: any.
    Daemons and built-in skills are not providers."""
    privacy: str = "any"
    """A floor: its DSNs' ``privacy`` is raised to at least this."""
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    """Counted at admission as OpenAI counts them: the prompt's estimate plus
    the request's ``max_tokens``."""
    max_tokens: int | None = None
    """The most a request may ask for; requests that name none get this."""
    keep: str = "nothing"
    """What the ledger keeps of each request's prompt and answer:
    ``nothing``, ``hash`` (their SHA-256) or ``text``."""

    @property
    def restricts(self) -> bool:
        return self != LlmPolicyConfig()


def parse_llm_policy(data: Mapping[str, object]) -> LlmPolicyConfig:
    """Check one ``llm`` table (from the config file or the state); raises
    ValueError ``(key, message)`` naming the first bad key."""
    fields = {f.name for f in attrs.fields(LlmPolicyConfig)}
    for key in data:
        if key not in fields:
            raise ValueError(key, f"unknown key (one of {', '.join(sorted(fields))})")

    def names(key: str) -> tuple[str, ...] | None:
        value = data.get(key)
        if value is None:
            return None
        if not isinstance(value, list) or not all(
            isinstance(v, str) and 0 < len(v) <= 200 and not v.isspace() for v in value
        ):
            raise ValueError(key, "expected an array of names or patterns")
        if len(value) > 1000:
            raise ValueError(key, "at most 1000 entries")
        return tuple(value)

    def limit(key: str) -> int | None:
        value = data.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _MAX_LIMIT:
            raise ValueError(key, f"expected a whole number from 1 to {_MAX_LIMIT}")
        return value

    keep = data.get("keep", "nothing")
    if keep not in KEEP_MODES:
        raise ValueError("keep", f"expected one of {', '.join(KEEP_MODES)}")
    privacy = data.get("privacy", "any")
    if privacy not in PRIVACY_FLOORS:
        raise ValueError("privacy", f"expected one of {', '.join(PRIVACY_FLOORS)}")
    return LlmPolicyConfig(
        tasks=names("tasks"),
        models=names("models"),
        providers=names("providers"),
        privacy=str(privacy),
        requests_per_minute=limit("requests_per_minute"),
        tokens_per_minute=limit("tokens_per_minute"),
        max_tokens=limit("max_tokens"),
        keep=str(keep),
    )


def llm_policy_to_json(policy: LlmPolicyConfig) -> dict[str, object]:
    """The fields that restrict something, as :func:`parse_llm_policy` reads them."""
    out: dict[str, object] = {}
    for field in attrs.fields(LlmPolicyConfig):
        value = getattr(policy, field.name)
        if value != field.default:
            out[field.name] = list(value) if isinstance(value, tuple) else value
    return out


@attrs.frozen
class GateAppConfig:
    """One ``[gate.apps.APP_ID]`` table: what that application may do through
    the Gate's Postgres path. An app without a table may use no database."""

    databases: tuple[str, ...] = ()
    """:mod:`fnmatch` patterns of the database aliases it may open (case-sensitive)."""
    read_only: bool = False
    statement_timeout_ms: int | None = None
    max_sessions: int | None = None
    """Concurrent sessions of this app through this Gate."""
    audit_statements: str = "text"
    """``text``, ``hash`` (SHA-256 of the statement only) or ``off``."""
    pool_mode: str = "session"
    """``session``: each client session holds one server connection from
    login to logout. ``transaction``: a server connection is lent to the
    session for one transaction and goes back to the pool at its end, so many
    clients share few server connections (as PgBouncer's transaction mode)."""
    pool_size: int = 20
    """Server connections this app's pool holds per database alias at one
    Gate: what the server carries for the app there, however many clients
    share them."""
    pool_wait_ms: int = 30000
    """How long a client waits for a server connection when all are busy
    before SQLSTATE 53300: a bounded queue, not a hang, when the pool is
    too small for the load."""
    llm: LlmPolicyConfig = LlmPolicyConfig()
    """What it may do through the LLM API (``[gate.apps.APP_ID.llm]``)."""


def _frozen_apps(value: Mapping[str, GateAppConfig]) -> Mapping[str, GateAppConfig]:
    # A read-only view: the config is frozen all the way down.
    return MappingProxyType(dict(value))


def _frozen_rules(value: Mapping[str, Sequence[str]]) -> Mapping[str, tuple[str, ...]]:
    return MappingProxyType({edge: tuple(rules) for edge, rules in value.items()})


@attrs.frozen
class ProviderModelConfig:
    """One ``[[gate.providers.models]]``: a model a provider serves, as the
    router sees it."""

    id: str
    """The model id clients name (and ``/v1/models`` lists)."""
    upstream: str | None = None
    """The provider's own name for it (default: ``id``)."""
    tasks: tuple[str, ...] = ("chat", "creative_writing", "code", "translate", "summarize")
    price_in: float = 0.0
    """USD per 1M input tokens."""
    price_out: float = 0.0
    """USD per 1M output tokens."""
    latency_ms: float = 1000.0
    """Expected latency of one request until measured."""
    context: int = 8192
    quality: int = 3
    """Quality tier 1-5 (daemons' size classes map to the same scale)."""
    family: str | None = None
    size_class: str | None = None
    """``xs``, ``s``, ``m``, ``l`` or ``xl``."""


@attrs.frozen
class ProviderConfig:
    """One ``[[gate.providers]]``: a remote model API the Gate may route to."""

    name: str
    base_url: str
    """``http(s)://host[:port]/prefix``; OpenAI-style requests go to ``BASE/chat/completions``."""
    kind: str = "openai"
    """``openai`` (any OpenAI-compatible server) or ``anthropic`` (``/v1/messages``)."""
    api_key: str | None = None
    """``store:NAME`` (``qmesh providers set-key NAME``), ``env:VAR``, or none."""
    private: bool = False
    """True for an endpoint under the operator's control (``privacy=private`` allows it)."""
    models: tuple[ProviderModelConfig, ...] = ()


@attrs.frozen
class BudgetConfig:
    """One ``[[gate.budgets]]``: a spend limit for an app or a team of apps."""

    name: str
    limit_usd: float
    period: str = "month"
    """``day`` or ``month`` (UTC)."""
    mode: str = "hard"
    """``hard``: paid providers blocked at 100 %; ``soft``: only warned."""
    apps: tuple[str, ...] = ()
    """The apps it pays for; an app's first budget in file order is its own."""


def _frozen_groups(value: Mapping[str, tuple[str, ...]]) -> Mapping[str, tuple[str, ...]]:
    return MappingProxyType(dict(value))


@attrs.frozen
class RoutingConfig:
    """``[gate.routing]``: how the qg:// router behaves."""

    extra_tasks: tuple[str, ...] = ()
    """Task names accepted in DSNs beyond the built-in ones."""
    cooldown_s: float = 30.0
    """How long a node or provider that failed is passed over."""
    max_hops: int = 4
    """Candidates tried for one request before giving up."""
    electricity_usd_per_kwh: float = 0.15
    gate_cpu_watts: float = 15.0
    """Power charged for the Gate's own skills (one core busy)."""
    local_rate_usd_per_1m: float | None = None
    """A flat rate for daemon work instead of power × time."""
    equivalences: Mapping[str, tuple[str, ...]] = attrs.field(
        factory=dict, converter=_frozen_groups, hash=False
    )
    """Group name → model ids that may stand in for each other."""


MEMORY_EXTRACTORS: Final = ("rules", "llm")


@attrs.frozen
class ClusterConfig:
    """``[gate.cluster]``: how Gates sharing one state know of each other (docs/cluster.md)."""

    heartbeat_interval_s: float = 1.0
    """How often this Gate writes its heartbeat into the state."""
    gone_after_s: float = 4.0
    """Silence after which the other Gates and ``qmesh gates`` call this Gate
    gone (at least twice the heartbeat interval). Each Gate states its own,
    in its row of the registry, so every reader applies the same deadline."""


@attrs.frozen
class MemoryConfig:
    """``[gate.memory]``: how the graph memory uses the mesh's models (see docs/memory.md)."""

    extractor: str = "rules"
    """Default for ``POST /v1/memory/documents``: ``rules``, or ``llm`` (rules plus
    the triples a model proposes through ``extract_dsn``, each checked against its sentence)."""
    extract_dsn: str = "qg://task=extract;prefer=quality"
    compose_dsn: str = "qg://task=chat;prefer=quality"
    """Where ``"compose": "llm"`` answers are composed."""
    max_document_bytes: int = 512 * 1024
    """Largest document ``POST /v1/memory/documents`` accepts, in bytes of
    UTF-8 text (413 beyond). Ingest time grows in proportion to it, and so
    does the one write transaction that stores a document (about 1.5 s per
    512 KiB of short sentences on a 2-core box), which the Gate's other
    writers wait behind."""
    threads: int = 2
    """Worker threads the memory's blocking work (ingest, queries) may use at
    once: a pool of its own, so documents never starve tunnel handshakes."""


@attrs.frozen
class DiscoveryConfig:
    """``[gate.discovery]``: what the Gate scans for services (see docs/inventory.md).

    Only what is listed here is ever probed: every ``targets`` address,
    and every address of ``networks`` and every name in ``hosts`` on each
    of ``ports``. Nothing listed: no scanning.
    """

    targets: tuple[str, ...] = ()
    """``host:port`` addresses; each is recorded even when nothing answers there."""
    networks: tuple[str, ...] = ()
    """CIDR blocks (``10.0.0.0/28``); addresses that answer on ``ports`` are recorded."""
    hosts: tuple[str, ...] = ()
    """Host names or addresses; those that answer on ``ports`` are recorded."""
    ports: tuple[int, ...] = ()
    """Ports scanned on ``networks`` and ``hosts`` (required with either)."""
    interval_s: float = 30.0
    """From the end of one scan to the start of the next."""
    concurrency: int = 32
    """Targets probed at once."""
    connect_timeout_s: float = 1.0
    probe_timeout_s: float = 2.0
    """One request and its answer."""
    target_timeout_s: float = 10.0
    """Every probe of one target together: a slow host costs at most this."""
    gone_after_misses: int = 3
    """Scans in a row that miss a service before it is gone (one miss: stale)."""
    max_targets: int = 4096
    """Refuse a configuration that expands to more addresses × ports than this."""

    @property
    def enabled(self) -> bool:
        return bool(self.targets or self.networks or self.hosts)


@attrs.frozen
class OidcConfig:
    """``[gate.oidc]``: operators sign in with the organisation's identity
    provider. Its ID tokens, sent as ``Authorization: Bearer TOKEN``, are
    operator credentials: the issuer's signature (its published keys), the
    issuer, the audience and the expiry are checked, and the role comes from
    a claim. Off while ``issuer`` is empty."""

    issuer: str = ""
    """The provider's issuer URL, exactly as its tokens' ``iss``."""
    audience: str = ""
    """This Gate's client id at the provider (the tokens' ``aud``)."""
    jwks_url: str = ""
    """Where its signing keys are; empty: from its discovery document
    (``ISSUER/.well-known/openid-configuration``)."""
    role_claim: str = "qmesh_role"
    """The claim that holds the operator's role (metrics, viewer, operator, admin)."""
    name_claim: str = "email"
    """The claim that names the operator in the audit (``sub`` when absent)."""
    leeway_s: float = 30.0
    """Clock skew allowed on ``exp`` and ``nbf``."""


@attrs.frozen
class HttpConfig:
    """``[gate.http]``: limits of the Gate's HTTP API — its own listener and
    the ``llm`` tunnel service, which serves the same routes — and of the
    app-key checks behind it (see docs/http.md). The defaults are safe for a
    Gate on the open network; each bounds what one peer can make it spend."""

    max_connections: int = 512
    """Open connections on the HTTP listener; beyond it a new one is answered
    503 and closed at once."""
    max_header_bytes: int = 65_536
    """Request line and headers of one request (431 beyond)."""
    max_body_bytes: int = 16 * 1024 * 1024
    """Body of one request (413 beyond)."""
    idle_timeout_s: float = 75.0
    """A kept-alive connection waiting for its next request is closed after this."""
    request_timeout_s: float = 30.0
    """From a request's first byte to the end of its body (408 beyond); also
    the longest one write of the answer may wait for a client that does not read."""
    max_requests_per_app: int = 64
    """Requests of one app in progress at once (streamed answers until their
    end); beyond it 429."""
    auth_failures_per_s: float = 10.0
    """Failed app-key checks allowed per source address, on average …"""
    auth_failure_burst: int = 20
    """… and in a burst; beyond them 429, without running PBKDF2."""
    hash_threads: int = 2
    """Threads that may run PBKDF2 for app keys at once (their own pool, so
    that key checks never starve tunnel handshakes or vault reads)."""
    engine_threads: bool = False
    """Run the HTTP engine on the engine threads rather than on the event
    loop's thread. Off (the default), a request crosses no thread and the
    tail latency is the lowest. On, answers being relayed keep flowing while
    the event loop is busy with other work: more requests a second and a
    lower median, but a longer tail while the event loop catches up with
    its bookkeeping (see :class:`qmesh.web.native.NativeHttpServer`)."""
    tls: str = "auto"
    """``auto``: TLS unless the listener is on a loopback address; ``on``;
    ``off`` (TLS ends at a proxy in front). See :mod:`qmesh.web.tls`."""
    tls_cert: Path | None = None
    """PEM certificate chain; with ``tls_key``. Unset: one is generated in
    the data directory at first start, and its fingerprint is the pin."""
    tls_key: Path | None = None


@attrs.frozen
class PgPoolConfig:
    """``[gate.pg_pool]``: how the Gate keeps the server connections its apps'
    pools hold (``pool_mode`` in ``[gate.apps.APP_ID]`` chooses pooling;
    ``pool_size`` sizes it). The same for every app and alias, because they
    answer to the servers' limits and the network, not to one app."""

    server_lifetime_s: float = 3600.0
    """A server connection is closed when it returns to the pool after living
    this long, so that no backend lives for ever and the memory one
    accumulates is given back to the server."""
    server_idle_timeout_s: float = 600.0
    """A server connection is closed after idling in the pool this long: a
    quiet app gives its backends back to the server."""
    server_check_delay_s: float = 30.0
    """A connection idle longer than this is checked with an empty query
    before it is reused, so that one the server or a firewall dropped while
    it idled is replaced instead of failing the client's transaction."""
    max_server_connections_per_alias: int = 0
    """Cap on the server connections the pools of every Gate on the state
    hold for one alias, the apps' pools together (set it below the server's
    ``max_connections``); counted in the state; 0: no cap."""
    max_prepared_per_server: int = 1000
    """Prepared statements qmesh keeps on one server connection; beyond it the
    connection is closed when it returns to the pool, so that clients that
    prepare without ever closing cannot grow a backend's memory without bound."""


@attrs.frozen
class PgAuditConfig:
    """``[gate.pg_audit]``: how long the statement audit keeps its records
    (what it keeps of each is the apps' ``audit_statements`` policy)."""

    retention_days: float = 0.0
    """Records older than this are deleted, a stored block at a time once
    the newest record in it is that old (blocks hold one batch, so at most
    a few seconds apart under load). 0: kept for ever."""


@attrs.frozen
class GateConfig:
    """``[gate]``: the central Gate."""

    name: str = "gate"
    tunnel_listen: str = "127.0.0.1:11439"
    http_listen: str = "127.0.0.1:11480"
    forward_allow: tuple[str, ...] = ()
    """Targets every edge may ask the Gate to forward to: IP, CIDR or exact
    host name rules with a port (see :func:`qmesh.config.parse_forward_rule`)."""
    forward_allow_edges: Mapping[str, tuple[str, ...]] = attrs.field(
        factory=dict, converter=_frozen_rules, hash=False
    )
    """From ``[gate.forward_allow_edges]``: more rules for one edge, by its
    identity name; that edge may use these and ``forward_allow``."""
    oidc: OidcConfig = OidcConfig()
    drain_timeout_s: float = 10.0
    """How long a draining Gate (SIGTERM, ``qmesh gates drain``) lets the
    requests in flight at its HTTP API finish before it stops (keep it below
    the service manager's stop timeout: systemd's unit here gives 30 s)."""
    master_key_file: Path | None = None
    """The vault's master key; None: ``DATA_DIR/master.key`` (see :mod:`qmesh.masterkey`)."""
    master_key_command: tuple[str, ...] | None = None
    """A command (argv, no shell) that prints the master key in base64 — a
    secret manager's or KMS's client — used instead of a file, so the key is
    never stored beside the state."""
    database_url: str | None = None
    """``postgresql://…`` (any libpq URL): the Gate's state in PostgreSQL,
    shared by every Gate given the same URL; None: ``DATA_DIR/state.db``
    (SQLite). See docs/state.md."""
    apps: Mapping[str, GateAppConfig] = attrs.field(
        factory=dict, converter=_frozen_apps, hash=False
    )
    """From the ``[gate.apps.APP_ID]`` tables, by app id: see :mod:`qmesh.pg.policy`."""
    routing: RoutingConfig = RoutingConfig()
    providers: tuple[ProviderConfig, ...] = ()
    """From the ``[[gate.providers]]`` tables: see ``docs/qg.md``."""
    budgets: tuple[BudgetConfig, ...] = ()
    """From the ``[[gate.budgets]]`` tables: see :mod:`qmesh.finops.budgets`."""
    daemon_stale_after_missed: int = 3
    """Heartbeats a daemon may miss before the inventory calls it stale."""
    daemon_gone_after_missed: int = 12
    """… and gone (more than ``daemon_stale_after_missed``)."""
    discovery: DiscoveryConfig = DiscoveryConfig()
    """From ``[gate.discovery]``: see :class:`DiscoveryConfig`."""
    memory: MemoryConfig = MemoryConfig()
    """From ``[gate.memory]``: see :class:`MemoryConfig`."""
    http: HttpConfig = HttpConfig()
    """From ``[gate.http]``: see :class:`HttpConfig`."""
    cluster: ClusterConfig = ClusterConfig()
    """From ``[gate.cluster]``: see :class:`ClusterConfig`."""
    pg_pool: PgPoolConfig = PgPoolConfig()
    """From ``[gate.pg_pool]``: see :class:`PgPoolConfig`."""
    pg_audit: PgAuditConfig = PgAuditConfig()
    """From ``[gate.pg_audit]``: see :class:`PgAuditConfig`."""
