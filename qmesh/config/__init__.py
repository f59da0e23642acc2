"""qmesh configuration: one TOML file plus ``QMESH_*`` environment overrides.

For: reading ``config.toml`` with :mod:`tomllib`, applying environment
overrides, validating every value and turning the result into frozen attrs
classes that the roles read. An error names the file and line (or the
environment variable), the dotted key and what was expected, so an operator
can fix it without reading code. Also the ``host:port`` grammar shared by the
whole package (:func:`parse_hostport`, :func:`format_hostport`) and the
grammar of the Gate's ``forward_allow`` rules (:func:`parse_forward_rule`,
:func:`forward_allowed`).

Not for: secrets (they live in the Gate's vault, never in this file), command
line parsing (:mod:`qmesh.cli` applies its flags on top of a loaded
:class:`Config`), or watching the file for changes.

Environment overrides: ``QMESH_<SECTION>__<KEY>=value``. A double underscore
separates levels and names are lower-cased, so ``QMESH_GATE__TUNNEL_LISTEN``
sets ``gate.tunnel_listen`` and ``QMESH_DATA_DIR`` sets the top-level
``data_dir``. The value is read as a TOML value when it parses as one (``2``,
``2.5``, ``true``, ``["a:1", "b:*"]``) and as a plain string otherwise; a
string setting keeps the variable's exact text (``QMESH_GATE__NAME=123`` is
the name ``"123"``). ``QMESH_`` variables without a double underscore that do
not name a top-level key are left alone: test suites and scripts use that
prefix for their own settings.

This module is the public face; import from it, not from the modules behind
it, which are (each importing only those above it):

- :mod:`~qmesh.config.errors`: :class:`ConfigError`.
- :mod:`~qmesh.config.address`: ``host:port``, sizes, ``forward_allow`` rules.
- :mod:`~qmesh.config.toml_lines`: key paths and the line each is written on.
- :mod:`~qmesh.config.env`: which ``QMESH_*`` variables are configuration.
- :mod:`~qmesh.config.gate_schema`, :mod:`~qmesh.config.schema`: the classes.
- :mod:`~qmesh.config.reader`: typed reads that raise with file and line.
- :mod:`~qmesh.config.router_sections`, :mod:`~qmesh.config.gate_sections`,
  :mod:`~qmesh.config.edge_sections`: each section's checks.
- :mod:`~qmesh.config.loader`: :func:`load_config`, which ties them together.
"""

from __future__ import annotations

from qmesh.config.address import (
    ForwardRule,
    IPAddress,
    format_hostport,
    forward_address,
    forward_allowed,
    normalize_forward_name,
    parse_forward_rule,
    parse_hostport,
    parse_size,
)
from qmesh.config.errors import ConfigError
from qmesh.config.gate_schema import (
    AUDIT_MODES,
    KEEP_MODES,
    MEMORY_EXTRACTORS,
    POOL_MODES,
    PRIVACY_FLOORS,
    BudgetConfig,
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
    ProviderConfig,
    ProviderModelConfig,
    RoutingConfig,
    llm_policy_to_json,
    parse_llm_policy,
)
from qmesh.config.loader import load_config
from qmesh.config.schema import (
    Config,
    DaemonConfig,
    DaemonRuntimeConfig,
    ForwardConfig,
    LogConfig,
    MiniGateConfig,
    TunnelConfig,
)

__all__ = [
    "AUDIT_MODES",
    "KEEP_MODES",
    "MEMORY_EXTRACTORS",
    "POOL_MODES",
    "PRIVACY_FLOORS",
    "BudgetConfig",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "DaemonConfig",
    "DaemonRuntimeConfig",
    "DiscoveryConfig",
    "ForwardConfig",
    "ForwardRule",
    "GateAppConfig",
    "GateConfig",
    "HttpConfig",
    "IPAddress",
    "LlmPolicyConfig",
    "LogConfig",
    "MemoryConfig",
    "MiniGateConfig",
    "OidcConfig",
    "PgAuditConfig",
    "PgPoolConfig",
    "ProviderConfig",
    "ProviderModelConfig",
    "RoutingConfig",
    "TunnelConfig",
    "format_hostport",
    "forward_address",
    "forward_allowed",
    "llm_policy_to_json",
    "load_config",
    "normalize_forward_name",
    "parse_forward_rule",
    "parse_hostport",
    "parse_llm_policy",
    "parse_size",
]
