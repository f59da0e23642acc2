"""``qmesh inventory [--json] [--watch]``: the running Gate's inventory in a terminal.

For: asking a Gate's ``GET /api/inventory`` (daemons and the services its
scans found) and printing a table, the JSON, or a table redrawn in place
every ``--interval`` seconds until Ctrl-C. ``--scan`` asks for a scan
first and waits for it. Which Gate: ``--gate URL``, else ``gate.http`` in
``DATA_DIR/up.json`` (written by ``qmesh up``), else ``gate.http_listen``
from the configuration. The admin key: ``--key``, else ``QMESH_ADMIN_KEY``,
else ``gate.admin_key`` in ``DATA_DIR/up.json``.

Not for: the inventory itself (:mod:`qmesh.gate.inventory`) or its HTTP
handlers (:mod:`qmesh.gate.daemon_api`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from qmesh.config import Config

__all__ = ["add_commands"]

KEY_ENV: Final = "QMESH_ADMIN_KEY"
EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1
EXIT_USAGE: Final = 2
_STATES: Final = ("fresh", "stale", "gone")
_COLOURS: Final = {"fresh": "32", "stale": "33", "gone": "90"}
_CLEAR: Final = "\x1b[H\x1b[J"
"""Cursor home, then clear to the end: the table redraws in place."""


class CliError(Exception):
    """Something the operator must fix; ``status`` is the exit status."""

    def __init__(self, message: str, status: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.status = status


def add_commands(inventory: argparse.ArgumentParser) -> None:
    inventory.add_argument("--json", action="store_true", help="print the Gate's JSON")
    inventory.add_argument(
        "--watch", action="store_true", help="redraw the table in place until Ctrl-C"
    )
    inventory.add_argument(
        "--interval", type=float, default=2.0, metavar="S", help="--watch period (default 2)"
    )
    inventory.add_argument("--kind", help="only this kind (daemon, ollama, openai, postgres, …)")
    inventory.add_argument("--state", choices=_STATES, help="only entries in this state")
    inventory.add_argument("--model", metavar="ID", help="only entries with this model")
    inventory.add_argument("--scan", action="store_true", help="scan the targets first and wait")
    add_gate_options(inventory)
    inventory.set_defaults(handler=cmd_inventory)


# -- where and who ------------------------------------------------------------------------


def _up_json(config: Config) -> dict[str, Any]:
    path = config.data_dir / "up.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    gate = data.get("gate") if isinstance(data, dict) else None
    return gate if isinstance(gate, dict) else {}


def gate_url(args: argparse.Namespace, config: Config) -> str:
    if args.gate:
        return str(args.gate).rstrip("/")
    up = _up_json(config).get("http")
    if isinstance(up, str) and up:
        return up.rstrip("/")
    from qmesh.config import format_hostport, parse_hostport

    host, port = parse_hostport(config.gate.http_listen)
    if host in ("0.0.0.0", "::", "*", ""):
        host = "127.0.0.1"
    return f"http://{format_hostport(host, port)}"


def admin_key(args: argparse.Namespace, config: Config) -> str:
    key = args.key or os.environ.get(KEY_ENV) or _up_json(config).get("admin_key")
    if not isinstance(key, str) or not key:
        raise CliError(
            f"no admin key: pass --key admin:KEY, set {KEY_ENV}, or run where "
            f"{Path(config.data_dir) / 'up.json'} exists (qmesh up writes it)"
        )
    return key


def add_gate_options(parser: argparse.ArgumentParser) -> None:
    """``--gate`` and ``--key``: which Gate, and the admin key for it."""
    parser.add_argument(
        "--gate", metavar="URL", help="the Gate's HTTP address (http://host:port)"
    )
    parser.add_argument(
        "--key",
        metavar="admin:KEY",
        help=f"the admin key (default: ${KEY_ENV} or up.json; on the command line `ps` shows it)",
    )


def call(
    method: str, url: str, key: str, *, body: Any = None, timeout: float = 30.0
) -> Any:
    """One admin API call; the JSON answer, or :class:`CliError` saying why not."""
    headers = {"authorization": f"Bearer {key}", "accept": "application/json"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["content-type"] = "application/json"
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read() or b"{}").get("error", {}).get("message") or str(exc)
        except ValueError:
            detail = str(exc)
        if exc.code in (401, 403):
            raise CliError(f"the Gate refused the key: {detail}") from None
        raise CliError(f"{method} {url}: HTTP {exc.code}: {detail}", EXIT_FAILURE) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise CliError(f"cannot reach the Gate at {url}: {reason}", EXIT_FAILURE) from None


def fetch(args: argparse.Namespace, base: str, key: str) -> dict[str, Any]:
    query = {k: v for k in ("kind", "state", "model") if (v := getattr(args, k, None))}
    url = f"{base}/api/inventory"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    data = call("GET", url, key)
    if not isinstance(data, dict) or not isinstance(data.get("nodes"), list):
        raise CliError(f"{url} did not answer with an inventory", EXIT_FAILURE)
    return data


# -- the table -------------------------------------------------------------------------------


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 90:
        return f"{seconds:.1f}s" if seconds < 10 else f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _models(node: dict[str, Any]) -> str:
    models = [m for m in node.get("models") or () if isinstance(m, dict)]
    if not models:
        return "-"
    parts = []
    for m in models[:3]:
        quant = f" {m['quantization']}" if m.get("quantization") else ""
        mark = "*" if m.get("state") == "loaded" else ""
        parts.append(f"{m.get('id')}{quant}{mark}")
    more = f" +{len(models) - 3}" if len(models) > 3 else ""
    return ", ".join(parts) + more


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


def format_table(data: dict[str, Any], *, colour: bool = False, width: int = 120) -> str:
    nodes = [n for n in data["nodes"] if isinstance(n, dict)]
    if not nodes:
        return "no inventory entries (no daemon has reported and no scan found anything)"
    rows = []
    for n in nodes:
        extra = n.get("extra") or {}
        software = " ".join(str(x) for x in (extra.get("server"), n.get("version")) if x)
        seen = None if n.get("kind") == "absent" else n.get("seconds_since_seen")
        rows.append(
            [
                str(n.get("name")),
                str(n.get("kind")),
                str(n.get("state")),
                str(n.get("source")),
                software or "-",
                _models(n),
                _ago(seen),
                str(n.get("reason") or ""),
            ]
        )
    head = ["NAME", "KIND", "STATE", "SOURCE", "SOFTWARE", "MODELS (* loaded)", "SEEN", "REASON"]
    widths = [max(len(head[i]), *(len(r[i]) for r in rows)) for i in range(len(head) - 1)]
    widths[4] = min(widths[4], 28)
    widths[5] = min(widths[5], 44)
    used = sum(widths) + 2 * (len(widths))
    reason_width = max(width - used, 20)
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, [*widths, 0], strict=True)).rstrip()]
    for row in rows:
        cells = [_cut(c, w).ljust(w) for c, w in zip(row[:-1], widths, strict=True)]
        if colour:
            code = _COLOURS.get(row[2])
            if code:
                cells[2] = f"\x1b[{code}m{cells[2]}\x1b[0m"
        lines.append("  ".join([*cells, _cut(row[-1], reason_width)]).rstrip())
    counts = {s: sum(1 for n in nodes if n.get("state") == s) for s in _STATES}
    lines.append("")
    lines.append(
        f"{len(nodes)} entries: {counts['fresh']} fresh, {counts['stale']} stale, "
        f"{counts['gone']} gone"
    )
    return "\n".join(lines)


# -- the command -------------------------------------------------------------------------------


def cmd_inventory(args: argparse.Namespace, config: Config) -> int:
    try:
        base = gate_url(args, config)
        key = admin_key(args, config)
        if args.scan:
            call("POST", f"{base}/api/discovery/scan", key, timeout=600)
        if not args.watch:
            data = fetch(args, base, key)
            if args.json:
                print(json.dumps(data, indent=2))
            else:
                print(format_table(data, colour=sys.stdout.isatty(), width=_width()))
            return EXIT_OK
        return _watch(args, base, key)
    except CliError as exc:
        print(f"qmesh: error: {exc}", file=sys.stderr)
        return exc.status


def _width() -> int:
    # Piped into another program: whole reasons, however wide.
    if not sys.stdout.isatty():
        return 10_000
    return shutil.get_terminal_size((140, 40)).columns


def _watch(args: argparse.Namespace, base: str, key: str) -> int:
    interval = max(float(args.interval), 0.2)
    try:
        while True:
            try:
                data = fetch(args, base, key)
                body = (
                    json.dumps(data, indent=2)
                    if args.json
                    else format_table(data, colour=sys.stdout.isatty(), width=_width())
                )
            except CliError as exc:
                if exc.status == EXIT_USAGE:
                    raise
                body = f"qmesh: {exc} (retrying every {interval:g}s)"
            stamp = time.strftime("%H:%M:%S")
            sys.stdout.write(f"{_CLEAR}{base}  {stamp}  every {interval:g}s, Ctrl-C stops\n\n")
            sys.stdout.write(body + "\n")
            sys.stdout.flush()
            time.sleep(interval)
    except KeyboardInterrupt:
        return EXIT_OK
