"""Reading and checking the sections outside ``[gate]``: ``[log]``,
``[tunnel]``, ``[minigate]`` and ``[daemon]``.

For: the rules that tie values together (a chunk fits in a frame, a
connection is declared dead only after a missed heartbeat, two MiniGate
listeners never share an address, TLS files come in pairs), model
directories, memory budgets written as sizes, and the daemon's runtimes.
``[log]`` and ``[tunnel]`` are read by every role, the Gate included; they
are here because they are not the Gate's own.

Not for: ``[gate]`` (:mod:`qmesh.config.gate_sections`), or what the values
mean (:mod:`qmesh.config.schema`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from qmesh.config.address import parse_hostport, parse_size
from qmesh.config.reader import Reader, describe, field_names, require_key, table_at, table_paths
from qmesh.config.schema import (
    LOG_FORMATS,
    LOG_LEVELS,
    DaemonConfig,
    DaemonRuntimeConfig,
    ForwardConfig,
    LogConfig,
    MiniGateConfig,
    TunnelConfig,
)
from qmesh.config.toml_lines import KeyPath, dotted

__all__ = ["read_daemon", "read_log", "read_minigate", "read_tunnel"]


def read_log(r: Reader, root: Mapping[str, object]) -> LogConfig:
    path: KeyPath = ("log",)
    t = r.table(root, path)
    r.check_keys(t, path, ("level", "format"))
    d = LogConfig()
    return LogConfig(
        level=r.string(t, path, "level", d.level, choices=LOG_LEVELS),
        format=r.string(t, path, "format", d.format, choices=LOG_FORMATS),
    )


def read_tunnel(r: Reader, root: Mapping[str, object]) -> TunnelConfig:
    path: KeyPath = ("tunnel",)
    t = r.table(root, path)
    r.check_keys(t, path, field_names(TunnelConfig))
    d = TunnelConfig()
    max_frame_payload = r.integer(
        t, path, "max_frame_payload", d.max_frame_payload, lo=1024, hi=16_777_216
    )
    # A small max_frame_payload with no chunk_size written shrinks the default
    # chunk to fit rather than failing on a value the operator never wrote.
    default_chunk = min(d.chunk_size, max_frame_payload)
    chunk_size = r.integer(t, path, "chunk_size", default_chunk, lo=1024)
    if chunk_size > max_frame_payload:
        raise r.error(
            (*path, "chunk_size"),
            f"must not exceed tunnel.max_frame_payload ({max_frame_payload}), got {chunk_size}",
        )
    heartbeat = r.number(t, path, "heartbeat_interval_s", d.heartbeat_interval_s, positive=True)
    dead_after = r.number(t, path, "dead_after_s", d.dead_after_s, positive=True)
    if dead_after <= heartbeat:
        # Blame the key the operator wrote; dead_after_s when both are written.
        blamed = "dead_after_s" if "dead_after_s" in t else "heartbeat_interval_s"
        raise r.error(
            (*path, blamed),
            f"tunnel.dead_after_s ({dead_after}) must be greater than "
            f"tunnel.heartbeat_interval_s ({heartbeat})",
        )
    initial = r.number(t, path, "reconnect_initial_s", d.reconnect_initial_s, positive=True)
    maximum = r.number(t, path, "reconnect_max_s", d.reconnect_max_s, positive=True)
    if maximum < initial:
        blamed = "reconnect_max_s" if "reconnect_max_s" in t else "reconnect_initial_s"
        raise r.error(
            (*path, blamed),
            f"tunnel.reconnect_max_s ({maximum}) must be at least "
            f"tunnel.reconnect_initial_s ({initial})",
        )
    return TunnelConfig(
        compression_level=r.integer(t, path, "compression_level", d.compression_level, lo=1, hi=19),
        max_frame_payload=max_frame_payload,
        stream_window=r.integer(t, path, "stream_window", d.stream_window, lo=65_536),
        chunk_size=chunk_size,
        heartbeat_interval_s=heartbeat,
        dead_after_s=dead_after,
        resume_grace_s=r.number(t, path, "resume_grace_s", d.resume_grace_s, positive=False),
        reconnect_initial_s=initial,
        reconnect_max_s=maximum,
        failover_jitter_s=r.number(
            t, path, "failover_jitter_s", d.failover_jitter_s, positive=False
        ),
        handshake_timeout_s=r.number(
            t, path, "handshake_timeout_s", d.handshake_timeout_s, positive=True
        ),
        max_handshakes_in_flight=r.integer(
            t, path, "max_handshakes_in_flight", d.max_handshakes_in_flight, lo=1
        ),
        max_sessions_per_identity=r.integer(
            t, path, "max_sessions_per_identity", d.max_sessions_per_identity, lo=1
        ),
        max_sessions=r.integer(t, path, "max_sessions", d.max_sessions, lo=0),
        max_streams_per_session=r.integer(
            t, path, "max_streams_per_session", d.max_streams_per_session, lo=1
        ),
        engine_poll_us=r.integer(t, path, "engine_poll_us", d.engine_poll_us, lo=0, hi=1000),
    )


def _read_forwards(r: Reader, t: Mapping[str, object], path: KeyPath) -> tuple[ForwardConfig, ...]:
    if "forward" not in t:
        return ()
    where: KeyPath = (*path, "forward")
    value = t["forward"]
    if not isinstance(value, list):
        raise r.error(where, f"expected [[minigate.forward]] tables, got {describe(value)}")
    forwards: list[ForwardConfig] = []
    for i, item in enumerate(value):
        item_path: KeyPath = (*where, i)
        if not isinstance(item, dict):
            raise r.error(item_path, f"expected a table, got {describe(item)}")
        r.check_keys(item, item_path, ("listen", "target"))
        for required in ("listen", "target"):
            if required not in item:
                raise r.error(item_path, f'missing key {required!r} ("host:port")')
        forwards.append(
            ForwardConfig(
                listen=r.address(item, item_path, "listen", ""),
                target=r.address(item, item_path, "target", ""),
            )
        )
    return tuple(forwards)


def _read_mode(
    r: Reader, table: Mapping[str, object], path: KeyPath, key: str, default: int
) -> int:
    """File permissions: a TOML integer (``0o770``) or a string of octal
    digits (``"0770"``, as chmod takes them and an environment variable
    gives them)."""
    if key not in table:
        return default
    where = (*path, key)
    value = table[key]
    if isinstance(value, str) or where in r.env_raw:
        text = r.string(table, path, key, "")
        if not text or any(c not in "01234567" for c in text):
            raise r.error(where, f'expected octal digits such as "0770", got {describe(text)}')
        value = int(text, 8)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0o777:
        raise r.error(where, f'expected permissions from "0000" to "0777", got {describe(value)}')
    return value


def read_minigate(r: Reader, root: Mapping[str, object]) -> MiniGateConfig:
    path: KeyPath = ("minigate",)
    t = r.table(root, path)
    r.check_keys(
        t,
        path,
        (
            "gate", "credential_file", "join_token_file", "forward", "pg_listen",
            "llm_listen", "pg_tls_cert", "pg_tls_key", "pg_unix_socket_dir",
            "pg_unix_socket_mode",
        ),
    )  # fmt: skip
    d = MiniGateConfig()
    result = MiniGateConfig(
        gate=r.addresses(t, path, "gate"),
        credential_file=r.path(t, path, "credential_file"),
        join_token_file=r.path(t, path, "join_token_file"),
        forwards=_read_forwards(r, t, path),
        pg_listen=r.address(t, path, "pg_listen", d.pg_listen),
        llm_listen=r.address(t, path, "llm_listen", d.llm_listen),
        pg_tls_cert=r.path(t, path, "pg_tls_cert"),
        pg_tls_key=r.path(t, path, "pg_tls_key"),
        pg_unix_socket_dir=r.path(t, path, "pg_unix_socket_dir"),
        pg_unix_socket_mode=_read_mode(r, t, path, "pg_unix_socket_mode", d.pg_unix_socket_mode),
    )
    if (result.pg_tls_cert is None) != (result.pg_tls_key is None):
        given, missing = ("pg_tls_cert", "pg_tls_key")
        if result.pg_tls_cert is None:
            given, missing = missing, given
        raise r.error((*path, given), f"needs minigate.{missing} too (both or neither)")
    # Two MiniGate listeners on one fixed address would fail at bind time
    # with a less helpful message; port 0 never collides.
    seen: dict[tuple[str, int], str] = {}
    named: list[tuple[KeyPath, str]] = [
        ((*path, "pg_listen"), result.pg_listen),
        ((*path, "llm_listen"), result.llm_listen),
    ]
    named += [((*path, "forward", i, "listen"), f.listen) for i, f in enumerate(result.forwards)]
    for where, address in named:
        host, port = parse_hostport(address)
        if port == 0:
            continue
        other = seen.get((host.lower(), port))
        if other is not None:
            raise r.error(where, f"{address} is already used by {other}")
        seen[(host.lower(), port)] = dotted(where)
    return result


_DAEMON_RUNTIME_KINDS: Final = ("ollama", "openai")
_ENV_NAME_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _read_daemon_runtimes(
    r: Reader, t: Mapping[str, object], path: KeyPath
) -> tuple[DaemonRuntimeConfig, ...]:
    runtimes: list[DaemonRuntimeConfig] = []
    names: set[str] = set()
    for where in table_paths(r, t, path, "runtime"):
        item = table_at(t, where)
        r.check_keys(item, where, field_names(DaemonRuntimeConfig))
        require_key(r, item, where, "kind", "ollama or openai")
        require_key(r, item, where, "url", 'e.g. "http://127.0.0.1:11434"')
        kind = r.string(item, where, "kind", "", choices=_DAEMON_RUNTIME_KINDS)
        url = r.string(item, where, "url", "").rstrip("/")
        match = re.fullmatch(r"http://([^\s/?#]+)(/[^\s?#]*)?", url)
        if match is None:
            raise r.error((*where, "url"), f"expected an http://host:port URL, got {describe(url)}")
        name = r.string(item, where, "name", f"{kind}@{match.group(1)}")
        if not name or name in names or name == "llama.cpp":
            raise r.error((*where, "name"), f"runtime name {describe(name)} is empty or used twice")
        names.add(name)
        api_key_env = None
        if "api_key_env" in item:
            api_key_env = r.string(item, where, "api_key_env", "")
            if not _ENV_NAME_RE.fullmatch(api_key_env):
                raise r.error((*where, "api_key_env"), "expected an environment variable name")
        runtimes.append(
            DaemonRuntimeConfig(
                kind=kind,
                url=url,
                name=name,
                keep_alive=r.string(item, where, "keep_alive", "10m"),
                api_key_env=api_key_env,
            )
        )
    return tuple(runtimes)


def read_daemon(r: Reader, root: Mapping[str, object]) -> DaemonConfig:
    path: KeyPath = ("daemon",)
    t = r.table(root, path)
    allowed = [n for n in field_names(DaemonConfig) if n != "runtimes"]
    r.check_keys(t, path, [*allowed, "runtime"])
    d = DaemonConfig()
    model_dirs: list[Path] = []
    if "model_dirs" in t:
        where: KeyPath = (*path, "model_dirs")
        value = t["model_dirs"]
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise r.error(where, f"expected an array of directories, got {describe(value)}")
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item:
                raise r.error((*where, i), f"expected a directory, got {describe(item)}")
            model_dirs.append(r.resolve_path(item, (*where, i)))
    budget = None
    if "memory_budget" in t:
        where = (*path, "memory_budget")
        value = t["memory_budget"]
        if isinstance(value, str):
            try:
                value = parse_size(value)
            except ValueError as exc:
                raise r.error(where, str(exc)) from None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise r.error(where, f'expected a size like "8GiB" or bytes, got {describe(value)}')
        budget = value
    threads = gpu_layers = None
    if "threads" in t:
        threads = r.integer(t, path, "threads", 0, lo=1, hi=1024)
    if "gpu_layers" in t:
        gpu_layers = r.integer(t, path, "gpu_layers", 0, lo=-1, hi=100_000)
    return DaemonConfig(
        gate=r.addresses(t, path, "gate"),
        credential_file=r.path(t, path, "credential_file"),
        join_token_file=r.path(t, path, "join_token_file"),
        health_listen=r.address(t, path, "health_listen", d.health_listen),
        heartbeat_interval_s=r.number(
            t, path, "heartbeat_interval_s", d.heartbeat_interval_s, positive=True
        ),
        model_dirs=tuple(model_dirs),
        rescan_interval_s=r.number(
            t, path, "rescan_interval_s", d.rescan_interval_s, positive=True
        ),
        memory_budget=budget,
        queue_limit=r.integer(t, path, "queue_limit", d.queue_limit, lo=1, hi=100_000),
        parallel=r.integer(t, path, "parallel", d.parallel, lo=1, hi=1024),
        context_length=r.integer(t, path, "context_length", d.context_length, lo=64, hi=10_000_000),
        threads=threads,
        gpu_layers=gpu_layers,
        load_timeout_s=r.number(t, path, "load_timeout_s", d.load_timeout_s, positive=True),
        llama_cpp=r.boolean(t, path, "llama_cpp", d.llama_cpp),
        runtimes=_read_daemon_runtimes(r, t, path),
    )
