"""``qmesh up``: the whole mesh on one box, with nothing to prepare.

On first start it creates the data directory, the Gate's keys, credentials
for a local MiniGate and Daemon, and a demo application; later starts reuse
them. It then runs the three roles in one process, writes
``DATA_DIR/up.json`` (mode 0600) with every endpoint and the demo app's
credentials, and prints how to use them.

Its daemon serves the GGUF files of the model cache that ``scripts/setup.sh``
fills (``QMESH_MODEL_CACHE``, default ``~/.cache/qmesh/models``) besides any
``daemon.model_dirs``, so ``qg://task=creative_writing`` has a model on the
first run; without a cache it says so in one line and starts anyway. Its
Gate probes this machine's usual service ports (:data:`LOCAL_SERVICES`)
unless the configuration names discovery targets of its own or
``--no-discovery`` is given, so the dashboard and ``qmesh inventory`` show
what already runs here.

Not for: parsing ``qmesh up``'s options (:mod:`qmesh.cli.roles`).
"""

from __future__ import annotations

import base64
import json
import os
import sys
from pathlib import Path
from typing import Any, Final

import attrs
import trio

from qmesh import __version__
from qmesh.cli.runner import run_roles, run_until_stopped
from qmesh.config import Config, GateAppConfig, format_hostport, parse_hostport
from qmesh.daemon.catalog import MODEL_CACHE_ENV, model_cache, serving_dirs
from qmesh.identity import GateKeys, enroll, load_credential, write_private_file
from qmesh.masterkey import ensure_master_key
from qmesh.pg.demo import DEMO_ALIAS, DemoDatabase, DemoDbUnavailable
from qmesh.pg.policy import AppPolicy, PolicyBook, policy_to_json
from qmesh.pg.vault import Vault
from qmesh.roles import EDGE_ROLES, ROLES
from qmesh.state import StateStore
from qmesh.web.auth import ADMIN_APP

DEMO_APP = "demo"
LOCAL_SERVICES: Final = (
    ("Ollama", 11434),
    ("llama.cpp server", 8080),
    ("vLLM", 8000),
    ("LM Studio", 1234),
    ("PostgreSQL", 5432),
    ("qmesh Gate", 11480),
)
"""The usual loopback ports of what a machine running qmesh may already serve."""
DEFAULT_TUNNEL_PORT = 11439


@attrs.frozen
class LocalSetup:
    """What ``qmesh up`` prepared in the data directory."""

    gate_public_key: bytes
    minigate_credential: Path
    daemon_credential: Path
    demo_app_key: str
    admin_key: str


def _local_credential(
    store: StateStore, keys: GateKeys, role: str, directory: Path, gate_address: str
) -> Path:
    """Reuse ``directory/ROLE.cred`` while the Gate still honours it; otherwise
    enroll a fresh local identity (``local-ROLE``, ``local-ROLE-2``, …)."""
    path = directory / f"{role}.cred"
    if path.exists():
        credential = load_credential(path)
        identity = store.find_identity_by_key(credential.public_key)
        if identity is not None and not identity.revoked:
            return path
    suffix = 1
    while True:
        name = f"local-{role}" if suffix == 1 else f"local-{role}-{suffix}"
        if store.get_identity(name) is None:
            break
        suffix += 1
    credential = enroll(store, keys, role, name, gate_address)
    write_private_file(path, (credential.encode() + "\n").encode(), replace=True)
    return path


def _app_key(store: StateStore, directory: Path, app_id: str) -> str:
    """The key of local app ``app_id``, kept in ``directory`` (0600): the store
    holds only its verifier, so a lost key file means a new key."""
    key_file = directory / f"app-{app_id}.key"
    if store.get_app_verifier(app_id) is None or not key_file.exists():
        store.delete_app(app_id)
        write_private_file(key_file, (store.add_app(app_id) + "\n").encode(), replace=True)
    return key_file.read_text().strip()


def prepare(config: Config) -> LocalSetup:
    """Create (or reuse) keys, local credentials and the demo app."""
    keys, _created = GateKeys.load_or_create(config.data_dir)
    # The vault's master key: the Gate needs it for real database secrets.
    ensure_master_key(config.data_dir)
    credentials = config.data_dir / "credentials"
    credentials.mkdir(mode=0o700, exist_ok=True)
    # The local edges always dial the port the Gate actually bound (runner);
    # the address in their credentials only matters when copied elsewhere.
    host, port = parse_hostport(config.gate.tunnel_listen)
    recorded = format_hostport(host, port or DEFAULT_TUNNEL_PORT)
    with StateStore.open(config.state_location) as store:
        minigate = _local_credential(store, keys, "minigate", credentials, recorded)
        daemon = _local_credential(store, keys, "daemon", credentials, recorded)
        demo_key = _app_key(store, credentials, DEMO_APP)
        admin_key = _app_key(store, credentials, ADMIN_APP)
    return LocalSetup(keys.public_key, minigate, daemon, demo_key, admin_key)


def start_demo_database(config: Config) -> tuple[Config, DemoDatabase | None]:
    """Start the demo database, store it in the vault and let the demo app
    open it; or say in one line why not, and go on without it."""
    try:
        database = DemoDatabase.at(config.data_dir)
        with StateStore.open(config.state_location) as store:
            vault = Vault.open(store, ensure_master_key(config.data_dir))
            if DEMO_ALIAS in vault.list() and not database.exists:
                raise DemoDbUnavailable(
                    f"the vault's alias {DEMO_ALIAS!r} is the operator's own; qmesh up leaves it"
                )
            database.start()
            try:
                vault.set(DEMO_ALIAS, database.dsn())
            except BaseException:
                database.stop()
                raise
    except DemoDbUnavailable as exc:
        print(f"qmesh up: no demo database: {exc}", file=sys.stderr)
        return config, None
    return _let_the_demo_app_in(config), database


def _let_the_demo_app_in(config: Config) -> Config:
    """The demo app may open the demo database. The alias goes into the
    app's policy in the state (made now if it has none), so that a later
    ``qmesh apps policy demo …``, which edits the stored policy, keeps it;
    only an app that ``[gate.apps.demo]`` configures gets it in memory."""
    with StateStore.open(config.state_location) as store:
        book = PolicyBook(config)
        book.load(store)
        settings = book.settings(DEMO_APP) or GateAppConfig()
        if AppPolicy.of(settings).allows(DEMO_ALIAS):
            return config
        with_demo = attrs.evolve(settings, databases=(*settings.databases, DEMO_ALIAS))
        if book.source(DEMO_APP) != "config":
            store.set_app_policy(DEMO_APP, policy_to_json(with_demo))
            return config
    apps = {**config.gate.apps, DEMO_APP: with_demo}
    return attrs.evolve(config, gate=attrs.evolve(config.gate, apps=apps))


def _summary(
    config: Config, setup: LocalSetup, endpoints: dict[str, Any], *, demo_db: bool
) -> dict[str, Any]:
    gate = endpoints["gate"]
    minigate = endpoints["minigate"]
    daemon = endpoints["daemon"]
    psql = f"postgresql://{DEMO_APP}:{setup.demo_app_key}@{minigate['pg']}/{DEMO_ALIAS}"
    return {
        "version": __version__,
        "pid": os.getpid(),
        "data_dir": str(config.data_dir),
        "gate": {
            "tunnel": gate["tunnel"],
            "http": gate["http"],
            "tls_fingerprint": gate["tls_fingerprint"],
            "admin_key": f"{ADMIN_APP}:{setup.admin_key}",
            "public_key": base64.b64encode(setup.gate_public_key).decode(),
        },
        "minigate": {
            "name": minigate["name"],
            "pg": minigate["pg"],
            "pg_socket": minigate["pg_socket"],
            "llm": minigate["llm"],
            "forwards": minigate["forwards"],
        },
        "daemon": {"name": daemon["name"], "models": sorted(daemon["node"].catalog.models)},
        "demo_db": {"alias": DEMO_ALIAS, "psql": psql} if demo_db else None,
        "discovery": {
            "targets": list(config.gate.discovery.targets),
            "interval_s": config.gate.discovery.interval_s,
        },
        "demo_app": {
            "app_id": DEMO_APP,
            "app_key": setup.demo_app_key,
            "bearer": f"{DEMO_APP}:{setup.demo_app_key}",
        },
    }


def _print_banner(summary: dict[str, Any], up_json: Path) -> None:
    lines = [
        f"qmesh {summary['version']} is up (pid {summary['pid']}), data in {summary['data_dir']}",
        f"  gate      tunnel listening on {summary['gate']['tunnel']}",
        f"            http API on {summary['gate']['http']} (health: /healthz)",
        *(
            [f"            TLS certificate {pin} (qmesh commands pin it from up.json)"]
            if (pin := summary["gate"]["tls_fingerprint"])
            else []
        ),
        f"  minigate  {summary['minigate']['name']}, connected to the gate",
        f"            Postgres  postgresql://{DEMO_APP}:APP_KEY@{summary['minigate']['pg']}/ALIAS",
        *(
            [f"                      or the Unix-domain socket {socket}"]
            if (socket := summary["minigate"]["pg_socket"])
            else []
        ),
        f"            LLM API   {summary['minigate']['llm']}  (Bearer {DEMO_APP}:APP_KEY,"
        " model='qg://task=summarize')",
    ]
    for forward in summary["minigate"]["forwards"]:
        lines.append(f"            forward {forward['listen']} → {forward['target']}")
    if not summary["minigate"]["forwards"]:
        lines.append("            no forwards configured ([[minigate.forward]] in --config)")
    lines.append(
        f"            database  psql 'postgresql://{DEMO_APP}:APP_KEY@{summary['minigate']['pg']}"
        f"/{DEMO_ALIAS}'  (a throwaway PostgreSQL in DATA_DIR/demo-db)"
        if summary["demo_db"]
        else "            database  no demo database (--no-demo-db, or the reason above)"
    )
    discovery = summary["discovery"]
    lines.append(
        f"  discovery probing {', '.join(discovery['targets'])} every {discovery['interval_s']:g} s"
        " (--no-discovery turns it off)"
        if discovery["targets"]
        else "  discovery off"
    )
    lines += [
        f"  daemon    {summary['daemon']['name']}, connected to the gate",
        "            models    "
        + (", ".join(summary["daemon"]["models"]) or "none (see daemon.model_dirs)"),
        f"  demo app  id '{DEMO_APP}'; its key, the admin key and every endpoint are in",
        f"            {up_json} (mode 0600)",
        "Ctrl-C stops everything.",
    ]
    print("\n".join(lines), flush=True)


async def _run(config: Config, setup: LocalSetup, *, demo_db: bool) -> None:
    async with trio.open_nursery() as nursery:
        endpoints = await nursery.start(run_roles, config, ROLES)
        for role in EDGE_ROLES:
            with trio.fail_after(config.tunnel.handshake_timeout_s):
                await endpoints[role]["client"].wait_connected()
        summary = _summary(config, setup, endpoints, demo_db=demo_db)
        up_json = config.data_dir / "up.json"
        write_private_file(up_json, (json.dumps(summary, indent=2) + "\n").encode(), replace=True)
        _print_banner(summary, up_json)
        await trio.sleep_forever()


def local_discovery(config: Config) -> Config:
    """``config`` with the Gate probing :data:`LOCAL_SERVICES` on loopback,
    unless it names discovery targets of its own. The Gate's own HTTP port
    is left out: it would find itself."""
    if config.gate.discovery.enabled:
        return config
    _, own_port = parse_hostport(config.gate.http_listen)
    targets = tuple(
        format_hostport("127.0.0.1", port) for _, port in LOCAL_SERVICES if port != own_port
    )
    discovery = attrs.evolve(config.gate.discovery, targets=targets)
    return attrs.evolve(config, gate=attrs.evolve(config.gate, discovery=discovery))


def main(
    config: Config,
    *,
    port_offset: int = 0,
    ephemeral: bool = False,
    discover: bool = True,
    demo_db: bool = True,
) -> int:
    if ephemeral:
        config = config.ephemeral()
    elif port_offset:
        config = config.with_port_offset(port_offset)
    if discover:
        config = local_discovery(config)
    setup = prepare(config)
    model_dirs = serving_dirs(config.daemon.model_dirs)
    if not model_cache().is_dir():
        serves = "daemon.model_dirs only" if model_dirs else "no models"
        print(
            f"qmesh up: no model cache at {model_cache()} (scripts/setup.sh fills it; "
            f"{MODEL_CACHE_ENV} moves it): the daemon serves {serves}",
            file=sys.stderr,
        )
    config = attrs.evolve(
        config,
        minigate=attrs.evolve(config.minigate, credential_file=setup.minigate_credential),
        daemon=attrs.evolve(
            config.daemon, credential_file=setup.daemon_credential, model_dirs=model_dirs
        ),
    )
    database = None
    if demo_db:
        config, database = start_demo_database(config)
    try:
        run_until_stopped(lambda: _run(config, setup, demo_db=database is not None))
    finally:
        if database is not None:
            database.stop()
    print("qmesh up: stopped", file=sys.stderr)
    return 0
