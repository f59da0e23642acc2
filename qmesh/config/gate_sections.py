"""Reading and checking ``[gate]``, the Gate's own section.

For: the Gate's name and listeners; ``forward_allow`` rules, each parsed at
load so that a glob or a typo stops the Gate at start rather than refusing
at run time; per-app database policy; daemon staleness thresholds;
discovery, memory, the HTTP API's limits and the Postgres pools' server
connections. The qg:// router's tables are read by
:mod:`qmesh.config.router_sections`.

Not for: what the values mean (:mod:`qmesh.config.gate_schema`), or the
sections outside ``[gate]`` (:mod:`qmesh.config.edge_sections`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping

from qmesh.config.address import HOSTNAME_RE, parse_forward_rule, parse_hostport
from qmesh.config.gate_schema import (
    AUDIT_MODES,
    MEMORY_EXTRACTORS,
    POOL_MODES,
    ClusterConfig,
    DiscoveryConfig,
    GateAppConfig,
    GateConfig,
    HttpConfig,
    LlmPolicyConfig,
    MemoryConfig,
    OidcConfig,
    PgAuditConfig,
    PgPoolConfig,
    parse_llm_policy,
)
from qmesh.config.reader import APP_ID_RE, GATE_NAME_RE, Reader, describe, field_names
from qmesh.config.router_sections import read_budgets, read_providers, read_routing
from qmesh.config.toml_lines import KeyPath

__all__ = ["read_gate"]


def read_gate(r: Reader, root: Mapping[str, object]) -> GateConfig:
    path: KeyPath = ("gate",)
    t = r.table(root, path)
    r.check_keys(t, path, field_names(GateConfig))
    d = GateConfig()
    name = r.string(t, path, "name", d.name)
    if not GATE_NAME_RE.fullmatch(name):
        raise r.error(
            (*path, "name"),
            "expected 1-64 letters, digits, '.', '_' or '-' starting with a letter or "
            f"digit, got {describe(name)}",
        )
    return GateConfig(
        name=name,
        tunnel_listen=r.address(t, path, "tunnel_listen", d.tunnel_listen),
        http_listen=r.address(t, path, "http_listen", d.http_listen),
        forward_allow=_read_forward_rules(r, t, (*path, "forward_allow")),
        forward_allow_edges=_read_forward_allow_edges(r, t, path),
        drain_timeout_s=r.number(t, path, "drain_timeout_s", d.drain_timeout_s, positive=True),
        master_key_file=r.path(t, path, "master_key_file"),
        master_key_command=_read_command(r, t, (*path, "master_key_command")),
        database_url=_read_database_url(r, t, path),
        apps=_read_gate_apps(r, t, path),
        routing=read_routing(r, t, path),
        providers=read_providers(r, t, path),
        budgets=read_budgets(r, t, path),
        discovery=_read_discovery(r, t, path),
        memory=_read_memory(r, t, path),
        http=_read_http(r, t, path),
        oidc=_read_oidc(r, t, path),
        cluster=_read_cluster(r, t, path),
        pg_pool=_read_pg_pool(r, t, path),
        pg_audit=_read_pg_audit(r, t, path),
        **_read_daemon_thresholds(r, t, path),
    )


def _read_command(r: Reader, t: Mapping[str, object], path: KeyPath) -> tuple[str, ...] | None:
    if path[-1] not in t:
        return None
    value = t[str(path[-1])]
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(part, str) and part for part in value)
    ):
        raise r.error(path, f'expected a command as an array like ["kms", "decrypt"], '
                            f"got {describe(value)}")  # fmt: skip
    return tuple(value)


def _read_database_url(r: Reader, t: Mapping[str, object], path: KeyPath) -> str | None:
    if "database_url" not in t:
        return None
    url = r.string(t, path, "database_url", "")
    if not url.startswith(("postgresql://", "postgres://")):
        raise r.error(
            (*path, "database_url"),
            "expected a postgresql:// URL (leave it out for the SQLite state in DATA_DIR)",
        )
    return url


def _read_forward_rules(r: Reader, t: Mapping[str, object], where: KeyPath) -> tuple[str, ...]:
    """An array of forward_allow rules at ``where``, each checked now, so that
    a glob or a typo stops the Gate at start rather than refusing at run time."""
    key = str(where[-1])
    if key not in t:
        return ()
    value = t[key]
    if not isinstance(value, list):
        raise r.error(where, f'expected an array of "host:port" rules, got {describe(value)}')
    rules: list[str] = []
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise r.error((*where, i), f"expected a string, got {describe(item)}")
        try:
            parse_forward_rule(item)
        except ValueError as exc:
            raise r.error((*where, i), f"bad forward rule {describe(item)}: {exc}") from None
        rules.append(item)
    return tuple(rules)


def _read_forward_allow_edges(
    r: Reader, gate: Mapping[str, object], gate_path: KeyPath
) -> dict[str, tuple[str, ...]]:
    path: KeyPath = (*gate_path, "forward_allow_edges")
    t = r.table(gate, path)
    edges: dict[str, tuple[str, ...]] = {}
    for edge in t:
        if not APP_ID_RE.fullmatch(edge):
            raise r.error(
                (*path, edge),
                "an edge's identity name must be 1-63 letters, digits, '.', '_' or '-' "
                "starting with a letter or digit",
            )
        edges[edge] = _read_forward_rules(r, t, (*path, edge))
    return edges


def _read_cluster(r: Reader, gate: Mapping[str, object], gate_path: KeyPath) -> ClusterConfig:
    path: KeyPath = (*gate_path, "cluster")
    t = r.table(gate, path)
    r.check_keys(t, path, field_names(ClusterConfig))
    d = ClusterConfig()
    interval = r.number(t, path, "heartbeat_interval_s", d.heartbeat_interval_s, positive=True)
    gone = r.number(t, path, "gone_after_s", d.gone_after_s, positive=True)
    if gone < 2 * interval:
        raise r.error(
            (*path, "gone_after_s" if "gone_after_s" in t else "heartbeat_interval_s"),
            f"must be at least twice gate.cluster.heartbeat_interval_s ({interval:g}), "
            f"got gone after {gone:g}",
        )
    return ClusterConfig(heartbeat_interval_s=interval, gone_after_s=gone)


def _read_daemon_thresholds(r: Reader, t: Mapping[str, object], path: KeyPath) -> dict[str, int]:
    d = GateConfig()
    stale = r.integer(t, path, "daemon_stale_after_missed", d.daemon_stale_after_missed, lo=1)
    gone = r.integer(t, path, "daemon_gone_after_missed", d.daemon_gone_after_missed, lo=2)
    if gone <= stale:
        blamed = "daemon_gone_after_missed"
        if blamed not in t:
            blamed = "daemon_stale_after_missed"
        raise r.error(
            (*path, blamed),
            f"must be more than gate.daemon_stale_after_missed ({stale}), "
            f"got gone after {gone} and stale after {stale}",
        )
    return {"daemon_stale_after_missed": stale, "daemon_gone_after_missed": gone}


def _read_gate_apps(
    r: Reader, gate: Mapping[str, object], gate_path: KeyPath
) -> dict[str, GateAppConfig]:
    path: KeyPath = (*gate_path, "apps")
    t = r.table(gate, path)
    apps: dict[str, GateAppConfig] = {}
    for app_id in t:
        where: KeyPath = (*path, app_id)
        if not APP_ID_RE.fullmatch(app_id):
            raise r.error(
                where,
                "an app id must be 1-63 letters, digits, '.', '_' or '-' starting with a "
                "letter or digit",
            )
        table = r.table(t, where)
        r.check_keys(table, where, field_names(GateAppConfig))
        d = GateAppConfig()
        patterns: list[str] = []
        if "databases" in table:
            value = table["databases"]
            dbs: KeyPath = (*where, "databases")
            if not isinstance(value, list):
                raise r.error(
                    dbs,
                    f'expected an array of alias patterns like ["app*"], got {describe(value)}',
                )
            for i, item in enumerate(value):
                if not isinstance(item, str) or not item or any(c.isspace() for c in item):
                    raise r.error(
                        (*dbs, i),
                        f"expected an alias pattern without spaces, got {describe(item)}",
                    )
                patterns.append(item)
        timeout = max_sessions = None
        if "statement_timeout_ms" in table:
            timeout = r.integer(table, where, "statement_timeout_ms", 0, lo=1, hi=2_147_483_647)
        if "max_sessions" in table:
            max_sessions = r.integer(table, where, "max_sessions", 0, lo=1, hi=1_000_000)
        apps[app_id] = GateAppConfig(
            databases=tuple(patterns),
            read_only=r.boolean(table, where, "read_only", d.read_only),
            statement_timeout_ms=timeout,
            max_sessions=max_sessions,
            audit_statements=r.string(
                table, where, "audit_statements", d.audit_statements, choices=AUDIT_MODES
            ),
            pool_mode=r.string(table, where, "pool_mode", d.pool_mode, choices=POOL_MODES),
            pool_size=r.integer(table, where, "pool_size", d.pool_size, lo=1, hi=10_000),
            pool_wait_ms=r.integer(
                table, where, "pool_wait_ms", d.pool_wait_ms, lo=1, hi=3_600_000
            ),
            llm=_read_llm_policy(r, table, where),
        )
    return apps


def _read_llm_policy(r: Reader, app: Mapping[str, object], where: KeyPath) -> LlmPolicyConfig:
    path: KeyPath = (*where, "llm")
    table = r.table(app, path)
    try:
        return parse_llm_policy(table)
    except ValueError as exc:
        key, message = exc.args
        raise r.error((*path, key), message) from None


def _read_discovery(r: Reader, gate: Mapping[str, object], gate_path: KeyPath) -> DiscoveryConfig:
    path: KeyPath = (*gate_path, "discovery")
    t = r.table(gate, path)
    r.check_keys(t, path, field_names(DiscoveryConfig))
    d = DiscoveryConfig()

    def array(key: str) -> list[object]:
        value = t.get(key, [])
        if not isinstance(value, list):
            raise r.error((*path, key), f"expected an array, got {describe(value)}")
        return value

    targets: list[str] = []
    for i, item in enumerate(array("targets")):
        where: KeyPath = (*path, "targets", i)
        if not isinstance(item, str):
            raise r.error(where, f'expected "host:port", got {describe(item)}')
        r.check_address(item, where)
        if parse_hostport(item)[1] == 0:
            raise r.error(where, "port 0 cannot be scanned")
        targets.append(item)
    networks: list[str] = []
    addresses = 0
    for i, item in enumerate(array("networks")):
        where = (*path, "networks", i)
        try:
            # strict: "10.0.0.5/24" (host bits set) is more likely a typo than a wish.
            network = ipaddress.ip_network(item, strict=True) if isinstance(item, str) else None
        except ValueError as exc:
            raise r.error(where, f'expected a CIDR block like "10.0.0.0/28" ({exc})') from None
        if network is None:
            raise r.error(where, f'expected a CIDR block like "10.0.0.0/28", got {describe(item)}')
        networks.append(str(network))
        addresses += network.num_addresses
    hosts: list[str] = []
    for i, item in enumerate(array("hosts")):
        where = (*path, "hosts", i)
        text = item[1:-1] if isinstance(item, str) and item.startswith("[") else item
        if (
            not isinstance(text, str)
            or not text
            or not (HOSTNAME_RE.fullmatch(text) or _is_ip(text))
        ):
            raise r.error(where, f"expected a host name or address, got {describe(item)}")
        hosts.append(text)
    ports: list[int] = []
    for i, item in enumerate(array("ports")):
        where = (*path, "ports", i)
        if isinstance(item, bool) or not isinstance(item, int) or not 1 <= item <= 65535:
            raise r.error(where, f"expected a port from 1 to 65535, got {describe(item)}")
        if item not in ports:
            ports.append(item)
    if (networks or hosts) and not ports:
        blamed = "networks" if networks else "hosts"
        raise r.error(
            (*path, blamed), "needs gate.discovery.ports: the ports to scan on these addresses"
        )
    max_targets = r.integer(t, path, "max_targets", d.max_targets, lo=1, hi=1_000_000)
    total = len(targets) + (addresses + len(hosts)) * len(ports)
    if total > max_targets:
        raise r.error(
            (*path, "networks" if networks else "targets"),
            f"expands to {total} addresses × ports, more than gate.discovery.max_targets "
            f"({max_targets}); narrow the networks or raise max_targets",
        )
    return DiscoveryConfig(
        targets=tuple(targets),
        networks=tuple(networks),
        hosts=tuple(hosts),
        ports=tuple(ports),
        interval_s=r.number(t, path, "interval_s", d.interval_s, positive=True),
        concurrency=r.integer(t, path, "concurrency", d.concurrency, lo=1, hi=4096),
        connect_timeout_s=r.number(
            t, path, "connect_timeout_s", d.connect_timeout_s, positive=True
        ),
        probe_timeout_s=r.number(t, path, "probe_timeout_s", d.probe_timeout_s, positive=True),
        target_timeout_s=r.number(t, path, "target_timeout_s", d.target_timeout_s, positive=True),
        gone_after_misses=r.integer(
            t, path, "gone_after_misses", d.gone_after_misses, lo=2, hi=1_000_000
        ),
        max_targets=max_targets,
    )


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return False
    return True


def _read_memory(r: Reader, gate: Mapping[str, object], gate_path: KeyPath) -> MemoryConfig:
    path: KeyPath = (*gate_path, "memory")
    t = r.table(gate, path)
    r.check_keys(t, path, field_names(MemoryConfig))
    d = MemoryConfig()
    dsns: dict[str, str] = {}
    for key in ("extract_dsn", "compose_dsn"):
        value = r.string(t, path, key, getattr(d, key))
        if not value.startswith("qg://"):
            raise r.error((*path, key), f"expected a qg:// DSN, got {describe(value)}")
        dsns[key] = value
    return MemoryConfig(
        extractor=r.string(t, path, "extractor", d.extractor, choices=MEMORY_EXTRACTORS),
        max_document_bytes=r.integer(
            t, path, "max_document_bytes", d.max_document_bytes, lo=1024, hi=64 * 1024 * 1024
        ),
        threads=r.integer(t, path, "threads", d.threads, lo=1, hi=64),
        **dsns,
    )


def _read_oidc(r: Reader, gate: Mapping[str, object], gate_path: KeyPath) -> OidcConfig:
    path: KeyPath = (*gate_path, "oidc")
    t = r.table(gate, path)
    r.check_keys(t, path, field_names(OidcConfig))
    d = OidcConfig()
    config = OidcConfig(
        issuer=r.string(t, path, "issuer", d.issuer),
        audience=r.string(t, path, "audience", d.audience),
        jwks_url=r.string(t, path, "jwks_url", d.jwks_url),
        role_claim=r.string(t, path, "role_claim", d.role_claim),
        name_claim=r.string(t, path, "name_claim", d.name_claim),
        leeway_s=r.number(t, path, "leeway_s", d.leeway_s, positive=False),
    )
    for key in ("issuer", "jwks_url"):
        value = getattr(config, key)
        if value and not value.startswith(("https://", "http://127.0.0.1", "http://localhost")):
            raise r.error((*path, key), "expected an https:// URL (http only on loopback)")
    if config.issuer and not config.audience:
        raise r.error((*path, "audience"), "required with an issuer: this Gate's client id")
    return config


def _read_http(r: Reader, gate: Mapping[str, object], gate_path: KeyPath) -> HttpConfig:
    path: KeyPath = (*gate_path, "http")
    t = r.table(gate, path)
    r.check_keys(t, path, field_names(HttpConfig))
    d = HttpConfig()
    tls_cert, tls_key = r.path(t, path, "tls_cert"), r.path(t, path, "tls_key")
    if (tls_cert is None) != (tls_key is None):
        blamed = "tls_key" if tls_key is None else "tls_cert"
        raise r.error((*path, blamed), "tls_cert and tls_key go together: set both or neither")
    return HttpConfig(
        max_connections=r.integer(t, path, "max_connections", d.max_connections, lo=1),
        max_header_bytes=r.integer(
            t, path, "max_header_bytes", d.max_header_bytes, lo=1024, hi=16 * 1024 * 1024
        ),
        max_body_bytes=r.integer(t, path, "max_body_bytes", d.max_body_bytes, lo=1024),
        idle_timeout_s=r.number(t, path, "idle_timeout_s", d.idle_timeout_s, positive=True),
        request_timeout_s=r.number(
            t, path, "request_timeout_s", d.request_timeout_s, positive=True
        ),
        max_requests_per_app=r.integer(
            t, path, "max_requests_per_app", d.max_requests_per_app, lo=1
        ),
        auth_failures_per_s=r.number(
            t, path, "auth_failures_per_s", d.auth_failures_per_s, positive=True
        ),
        auth_failure_burst=r.integer(t, path, "auth_failure_burst", d.auth_failure_burst, lo=1),
        hash_threads=r.integer(t, path, "hash_threads", d.hash_threads, lo=1, hi=256),
        engine_threads=r.boolean(t, path, "engine_threads", d.engine_threads),
        tls=r.string(t, path, "tls", d.tls, choices=("auto", "on", "off")),
        tls_cert=tls_cert,
        tls_key=tls_key,
    )


def _read_pg_pool(r: Reader, gate: Mapping[str, object], gate_path: KeyPath) -> PgPoolConfig:
    path: KeyPath = (*gate_path, "pg_pool")
    t = r.table(gate, path)
    r.check_keys(t, path, field_names(PgPoolConfig))
    d = PgPoolConfig()
    return PgPoolConfig(
        server_lifetime_s=r.number(
            t, path, "server_lifetime_s", d.server_lifetime_s, positive=True
        ),
        server_idle_timeout_s=r.number(
            t, path, "server_idle_timeout_s", d.server_idle_timeout_s, positive=True
        ),
        server_check_delay_s=r.number(
            t, path, "server_check_delay_s", d.server_check_delay_s, positive=True
        ),
        max_server_connections_per_alias=r.integer(
            t,
            path,
            "max_server_connections_per_alias",
            d.max_server_connections_per_alias,
            lo=0,
        ),
        max_prepared_per_server=r.integer(
            t, path, "max_prepared_per_server", d.max_prepared_per_server, lo=1
        ),
    )


def _read_pg_audit(r: Reader, gate: Mapping[str, object], gate_path: KeyPath) -> PgAuditConfig:
    path: KeyPath = (*gate_path, "pg_audit")
    t = r.table(gate, path)
    r.check_keys(t, path, field_names(PgAuditConfig))
    d = PgAuditConfig()
    retention = r.number(t, path, "retention_days", d.retention_days, positive=False, unit="days")
    return PgAuditConfig(retention_days=retention)
