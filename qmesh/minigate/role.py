"""The MiniGate role: a tunnel client plus the local listeners it serves."""

from __future__ import annotations

from typing import Any

import trio

from qmesh.config import Config, ConfigError, format_hostport, parse_hostport
from qmesh.forward.edge import serve_forward
from qmesh.identity import credential_or_join, dial_addresses
from qmesh.llm.edge import serve_llm
from qmesh.pg.dsn import unix_socket_path
from qmesh.pg.edge import serve_pg, tls_config
from qmesh.renewal import keep_joined_credential, keep_renewed, remember_gate_key
from qmesh.tunnel import TunnelClient


async def run_minigate(
    config: Config,
    *,
    gate_address: tuple[str, int] | None = None,
    task_status: trio.TaskStatus[dict[str, Any]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the MiniGate until cancelled. ``gate_address`` overrides the
    configured Gates and the credential's (``qmesh up`` passes the Gate's
    bound port)."""
    if config.minigate.credential_file is None:
        raise ConfigError("minigate.credential_file is required (see `qmesh enroll minigate`)")
    credential, joining = credential_or_join(
        config.minigate.credential_file, config.minigate.join_token_file, "minigate"
    )
    addresses = [gate_address] if gate_address else dial_addresses(config.minigate.gate, credential)
    pg_tls = None
    if config.minigate.pg_tls_cert is not None and config.minigate.pg_tls_key is not None:
        try:
            pg_tls = tls_config(config.minigate.pg_tls_cert, config.minigate.pg_tls_key)
        except OSError as exc:  # _core.TlsError is an OSError
            raise ConfigError(
                f"cannot use {config.minigate.pg_tls_cert} / {config.minigate.pg_tls_key}: {exc}",
                key="minigate.pg_tls_cert",
            ) from None
    client = TunnelClient(
        config.tunnel,
        name=credential.name,
        role="minigate",
        private_key=credential.private_key,
        gate_public_key=credential.gate_public_key,
        gate_addresses=addresses,
        join=None if joining is None else joining.proof(),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        nursery.start_soon(keep_renewed, client)
        client.on_gate_key = remember_gate_key(credential, config.minigate.credential_file)
        if joining is not None:
            nursery.start_soon(
                keep_joined_credential, client, credential, config.minigate.credential_file
            )
        forwards = []
        for forward in config.minigate.forwards:
            host, _ = parse_hostport(forward.listen)
            port = await nursery.start(serve_forward, client, forward.listen, forward.target)
            forwards.append({"listen": format_hostport(host, port), "target": forward.target})
        pg_host, _ = parse_hostport(config.minigate.pg_listen)
        unix_dir = config.minigate.pg_unix_socket_dir
        pg_port = await nursery.start(
            lambda task_status: serve_pg(
                client,
                config.minigate.pg_listen,
                tls=pg_tls,
                unix_socket_dir=unix_dir,
                unix_socket_mode=config.minigate.pg_unix_socket_mode,
                task_status=task_status,
            )
        )
        llm_host, _ = parse_hostport(config.minigate.llm_listen)
        llm_port = await nursery.start(serve_llm, client, config.minigate.llm_listen)
        task_status.started(
            {
                "name": credential.name,
                "gate": ",".join(format_hostport(*a) for a in addresses),
                "forwards": forwards,
                "pg": format_hostport(pg_host, pg_port),
                # None: no Unix-domain socket (minigate.pg_unix_socket_dir).
                "pg_socket": None if unix_dir is None else str(unix_socket_path(unix_dir, pg_port)),
                "llm": f"http://{format_hostport(llm_host, llm_port)}/v1",
                "client": client,
            }
        )
