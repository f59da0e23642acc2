"""The configuration classes outside ``[gate]``, and :class:`Config`, the whole tree.

For: ``[log]`` and ``[tunnel]`` (every role reads them), ``[minigate]`` and
``[daemon]`` (the edges), as frozen attrs classes with their defaults; and
:class:`Config` with the copies of it that ``qmesh up`` and the tests make
(listen ports moved by an offset, or made ephemeral). The ``[gate]``
classes are in :mod:`qmesh.config.gate_schema`.

Not for: reading or checking a file (:mod:`qmesh.config.loader`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

import attrs

from qmesh.config.address import format_hostport, parse_hostport
from qmesh.config.errors import ConfigError
from qmesh.config.gate_schema import GateConfig

__all__ = [
    "LOG_FORMATS",
    "LOG_LEVELS",
    "Config",
    "DaemonConfig",
    "DaemonRuntimeConfig",
    "ForwardConfig",
    "LogConfig",
    "MiniGateConfig",
    "TunnelConfig",
]

LOG_LEVELS: Final = ("debug", "info", "warning", "error")
LOG_FORMATS: Final = ("text", "json")

# Hosts that accept connections on every interface, and names for this machine.
# with_port_offset uses them to decide whether a `gate` address is this Gate.
_WILDCARD_HOSTS: Final = frozenset({"0.0.0.0", "::", "*", ""})
_LOOPBACK_HOSTS: Final = frozenset({"localhost", "127.0.0.1", "::1"})


@attrs.frozen
class LogConfig:
    """``[log]``: how the ``qmesh`` loggers write."""

    level: str = "info"
    """One of debug, info, warning, error."""
    format: str = "text"
    """``text`` (human-readable lines) or ``json`` (one object per line)."""


@attrs.frozen
class TunnelConfig:
    """``[tunnel]``: the MiniGate/Daemon ⇄ Gate tunnel, the same on both ends."""

    compression_level: int = 3
    """zstd level, 1..19."""
    max_frame_payload: int = 1_048_576
    """Largest plaintext payload in one frame, 1 KiB..16 MiB."""
    stream_window: int = 1_048_576
    """Per-stream flow-control window in bytes (at least 64 KiB)."""
    chunk_size: int = 65_536
    """Bytes read from a local socket per frame, 1 KiB..max_frame_payload."""
    heartbeat_interval_s: float = 5.0
    dead_after_s: float = 15.0
    """Silence after which a connection is declared dead (> heartbeat interval)."""
    resume_grace_s: float = 60.0
    """How long the Gate keeps a dropped session's state for a resume."""
    reconnect_initial_s: float = 0.05
    reconnect_max_s: float = 5.0
    failover_jitter_s: float = 0.5
    """An edge that cannot reach its Gate tries the next Gate of its list
    after a random pause of up to this long (see docs/cluster.md)."""
    handshake_timeout_s: float = 10.0
    """A connection that has not finished its handshake by then is closed."""
    max_handshakes_in_flight: int = 256
    """Unauthenticated connections the Gate handshakes at once; more are closed
    at once (a stranger's flood costs a socket accept each, nothing more)."""
    max_sessions_per_identity: int = 8
    """Live and detached sessions one enrolled key may hold at the Gate."""
    max_sessions: int = 0
    """Live and detached sessions the Gate holds in all; past it a new one
    is refused with ``gate_full`` and the edge tries the next Gate. 0: the
    open-file limit less an eighth (at least 64) kept for streams' sockets
    and files. Whatever the cap, a new session is refused while the
    descriptors in use reach into that reserve."""
    max_streams_per_session: int = 4096
    """Streams the peer may have open in one session; more OPENs are refused."""
    engine_poll_us: int = 0
    """How long, at most, this process's engine threads poll for the next
    message before they sleep (0..1000 µs; 0: they never poll). Trades CPU
    for latency: see docs/pg.md, "Engine threads that poll"."""


@attrs.frozen
class ForwardConfig:
    """One ``[[minigate.forward]]``: listen locally, relay to ``target`` through the Gate."""

    listen: str
    target: str


@attrs.frozen
class MiniGateConfig:
    """``[minigate]``: the edge sidecar."""

    gate: tuple[str, ...] = ()
    """The Gates' tunnel addresses to dial ("host:port"; a host name may
    resolve to several); empty: the credential's. See docs/cluster.md."""
    credential_file: Path | None = None
    join_token_file: Path | None = None
    """A one-time token (``qmesh tokens create``) to join with at the first
    start, when ``credential_file`` does not exist yet: the edge makes its
    own key, the Gate enrolls it, and the credential is written then."""
    forwards: tuple[ForwardConfig, ...] = ()
    """From the ``[[minigate.forward]]`` tables."""
    pg_listen: str = "127.0.0.1:11438"
    llm_listen: str = "127.0.0.1:11435"
    pg_tls_cert: Path | None = None
    """PEM certificate (chain) for TLS on ``pg_listen``; without it SSLRequest gets 'N'."""
    pg_tls_key: Path | None = None
    """PEM private key of ``pg_tls_cert`` (both or neither)."""
    pg_unix_socket_dir: Path | None = None
    """Also listen on the Unix-domain socket ``.s.PGSQL.PORT`` in this
    (existing) directory, PORT being ``pg_listen``'s; None: TCP only."""
    pg_unix_socket_mode: int = 0o777
    """The socket file's permissions (PostgreSQL's and PgBouncer's default:
    anyone on the host may connect, and must still log in with an app key)."""


@attrs.frozen
class DaemonRuntimeConfig:
    """One ``[[daemon.runtime]]``: a model server the daemon drives over HTTP."""

    kind: str
    """``ollama`` (its native API) or ``openai`` (any OpenAI-compatible server)."""
    url: str
    """``http://host:port`` of the server."""
    name: str = ""
    """How the inventory names it; default ``KIND@host:port``."""
    keep_alive: str = "10m"
    """Ollama only: how long a model stays loaded after use (Ollama's syntax)."""
    api_key_env: str | None = None
    """OpenAI only: the environment variable holding a bearer key, if it needs one."""


@attrs.frozen
class DaemonConfig:
    """``[daemon]``: a compute node (see docs/daemon.md)."""

    gate: tuple[str, ...] = ()
    """As ``minigate.gate``."""
    credential_file: Path | None = None
    join_token_file: Path | None = None
    """As ``minigate.join_token_file``."""
    health_listen: str = "127.0.0.1:11450"
    heartbeat_interval_s: float = 5.0
    """Telemetry heartbeats to the Gate; the Gate counts missed ones."""
    model_dirs: tuple[Path, ...] = ()
    """Directories searched (recursively) for ``*.gguf`` files for llama.cpp."""
    rescan_interval_s: float = 30.0
    memory_budget: int | None = None
    """Bytes llama.cpp models may hold together ("8GiB" in the file); None:
    90 % of the model memory (VRAM, or RAM on CPU-only nodes) free at start."""
    queue_limit: int = 4
    """Requests that may wait per model before the daemon answers busy."""
    parallel: int = 1
    """Generations at once per model."""
    context_length: int = 4096
    """llama.cpp ``n_ctx`` (capped at each model's own)."""
    threads: int | None = None
    """llama.cpp threads (generation and prompt batches); None:
    llama-cpp-python's defaults (half the CPUs; all of them for batches)."""
    gpu_layers: int | None = None
    """llama.cpp layers on the GPU; None: the quantization planner's split; -1: all."""
    load_timeout_s: float = 120.0
    llama_cpp: bool = True
    """Serve the GGUF files of ``model_dirs`` with llama.cpp."""
    runtimes: tuple[DaemonRuntimeConfig, ...] = ()
    """From the ``[[daemon.runtime]]`` tables."""


def _default_data_dir() -> Path:
    return Path.home() / ".qmesh"


@attrs.frozen
class Config:
    """The whole configuration. Every section is optional in the file."""

    data_dir: Path = attrs.field(factory=_default_data_dir)
    log: LogConfig = LogConfig()
    tunnel: TunnelConfig = TunnelConfig()
    # Frozen like the others; ruff cannot see that across modules.
    gate: GateConfig = GateConfig()  # noqa: RUF009
    minigate: MiniGateConfig = MiniGateConfig()
    daemon: DaemonConfig = DaemonConfig()

    @property
    def state_db_path(self) -> Path:
        """The Gate's SQLite state file (the graph memory's, whatever the backend)."""
        return self.data_dir / "state.db"

    @property
    def state_location(self) -> Path | str:
        """Where the Gate's state lives: ``gate.database_url``, else the SQLite file."""
        return self.gate.database_url or self.state_db_path

    def with_port_offset(self, offset: int) -> Config:
        """A copy with every listen port moved by ``offset``.

        Addresses in ``minigate.gate`` and ``daemon.gate`` move too when they
        point at this Gate's tunnel listener: the same port, and the same host, a loopback
        name for a loopback listener, or any host when the Gate listens on
        every interface. That is how ``qmesh up --port-offset`` runs a second
        local mesh beside the first. Port 0 (ephemeral) stays 0; forward
        targets never move. Raises ConfigError when a port would leave 1..65535.
        """
        if offset == 0:
            return self
        tunnel_host, tunnel_port = parse_hostport(self.gate.tunnel_listen)

        def shift(address: str, key: str) -> str:
            host, port = parse_hostport(address)
            if port == 0:
                return address
            moved = port + offset
            if not 1 <= moved <= 65535:
                raise ConfigError(
                    f"port {port} moved by {offset} is {moved}, outside 1..65535", key=key
                )
            return format_hostport(host, moved)

        def shift_gates(addresses: tuple[str, ...], key: str) -> tuple[str, ...]:
            moved = []
            for address in addresses:
                host, port = parse_hostport(address)
                if port != 0 and port == tunnel_port and _same_host(host, tunnel_host):
                    address = shift(address, key)
                moved.append(address)
            return tuple(moved)

        gate = attrs.evolve(
            self.gate,
            tunnel_listen=shift(self.gate.tunnel_listen, "gate.tunnel_listen"),
            http_listen=shift(self.gate.http_listen, "gate.http_listen"),
        )
        minigate = attrs.evolve(
            self.minigate,
            gate=shift_gates(self.minigate.gate, "minigate.gate"),
            pg_listen=shift(self.minigate.pg_listen, "minigate.pg_listen"),
            llm_listen=shift(self.minigate.llm_listen, "minigate.llm_listen"),
            forwards=tuple(
                attrs.evolve(f, listen=shift(f.listen, f"minigate.forward[{i}].listen"))
                for i, f in enumerate(self.minigate.forwards)
            ),
        )
        daemon = attrs.evolve(
            self.daemon,
            gate=shift_gates(self.daemon.gate, "daemon.gate"),
            health_listen=shift(self.daemon.health_listen, "daemon.health_listen"),
        )
        return attrs.evolve(self, gate=gate, minigate=minigate, daemon=daemon)

    def ephemeral(self) -> Config:
        """A copy with every listen port set to 0, hosts kept.

        The ``gate`` addresses that edges dial are left alone: the Gate's real
        port is only known once it has bound, so whoever starts the roles must
        pass it on (tests do this to run in parallel).
        """

        def zero(address: str) -> str:
            return format_hostport(parse_hostport(address)[0], 0)

        return attrs.evolve(
            self,
            gate=attrs.evolve(
                self.gate,
                tunnel_listen=zero(self.gate.tunnel_listen),
                http_listen=zero(self.gate.http_listen),
            ),
            minigate=attrs.evolve(
                self.minigate,
                pg_listen=zero(self.minigate.pg_listen),
                llm_listen=zero(self.minigate.llm_listen),
                forwards=tuple(
                    attrs.evolve(f, listen=zero(f.listen)) for f in self.minigate.forwards
                ),
            ),
            daemon=attrs.evolve(self.daemon, health_listen=zero(self.daemon.health_listen)),
        )


def _same_host(host: str, listener: str) -> bool:
    host, listener = host.lower(), listener.lower()
    if host == listener or listener in _WILDCARD_HOSTS:
        return True
    return host in _LOOPBACK_HOSTS and listener in _LOOPBACK_HOSTS
