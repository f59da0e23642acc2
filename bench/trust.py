"""How fast trust changes bite on a running Gate: revocation, session kill,
app-key rotation with no overlap, app disable. One run, one table.

Usage:
    .venv/bin/python bench/trust.py [--trials 10]

What runs: a real Gate (``run_gate``, SQLite state store) in this process on
loopback ports, with a TCP echo server it may forward to. Each trial makes
the change through *another* connection to the state database — exactly what
the ``qmesh revoke`` / ``qmesh apps …`` processes do — and times, from the
moment that write commits, until its effect is observable:

- revoke: the edge's live forward stream is reset (the edge then learns
  "revoked" at its next handshake);
- sessions kill: ``POST /api/sessions/kill`` answered and the stream reset;
- rotate-key --overlap 0: the old key gets 401 on ``GET /v1/models``;
- apps disable: the app's key gets 403 (``app_disabled``).

The bound is 1 s for each. The Gate notices a change by polling the
store's ``PRAGMA data_version`` every 100 ms (qmesh.state.watch), so about
50 ms on average is expected plus the work each change triggers. Nothing is
asserted: the tests assert that each effect happens; this measures how fast.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from daemonkit import http_json, make_gate_dir  # noqa: E402
from tunnelkit import fast_settings, keypair  # noqa: E402

from qmesh.config import load_config  # noqa: E402
from qmesh.gate.role import run_gate  # noqa: E402
from qmesh.identity import GateKeys  # noqa: E402
from qmesh.state import StateStore  # noqa: E402
from qmesh.tunnel import TunnelClient, TunnelError  # noqa: E402

POLL_S = 0.001


async def _echo(stream: trio.SocketStream) -> None:
    async with stream:
        while data := await stream.receive_some(65536):
            await stream.send_all(data)


async def _until(condition: Callable[[], Awaitable[bool]]) -> None:
    with trio.fail_after(10):
        while not await condition():  # noqa: ASYNC110 - polls what a user would see
            await trio.sleep(POLL_S)


async def _measure(tmp: Path, trials: int) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {
        "revoke": [],
        "sessions kill": [],
        "rotate-key --overlap 0": [],
        "apps disable": [],
    }
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, _echo, 0)
        echo_port = listeners[0].socket.getsockname()[1]
        gate_dir = make_gate_dir(tmp)
        text = gate_dir.config_text().replace(
            "[tunnel]", f'forward_allow = ["127.0.0.1:{echo_port}"]\n[tunnel]'
        )
        (tmp / "gate.toml").write_text(text)
        gate = await nursery.start(run_gate, load_config(tmp / "gate.toml", env={}))
        keys = GateKeys.load(gate_dir.path)
        db = gate_dir.path / "state.db"
        other = StateStore.open(db)  # "another process"
        target = {"service": "forward", "target": f"127.0.0.1:{echo_port}"}

        async def live_stream(name: str) -> tuple[TunnelClient, trio.CancelScope]:
            private, public = keypair()
            other.add_identity(name, "minigate", public)
            client = TunnelClient(
                fast_settings(),
                name=name,
                role="minigate",
                private_key=private,
                gate_public_key=keys.public_key,
                gate_addresses=[("127.0.0.1", gate_dir.tunnel_port)],
            )
            scope = trio.CancelScope()

            async def run() -> None:
                with scope:
                    try:
                        await client.run()
                    except TunnelError:
                        pass

            nursery.start_soon(run)
            return client, scope

        async def stream_cut(client: TunnelClient) -> Callable[[], Awaitable[bool]]:
            stream = await client.open_stream(target)
            await stream.send_all(b"x")
            assert await stream.receive_some() == b"x"
            cut = trio.Event()

            async def watch() -> None:
                try:
                    while await stream.receive_some():
                        pass
                except (TunnelError, trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                cut.set()

            nursery.start_soon(watch)

            async def is_cut() -> bool:
                await trio.lowlevel.checkpoint()
                return cut.is_set()

            return is_cut

        for trial in range(trials):
            client, scope = await live_stream(f"rev-{trial}")
            is_cut = await stream_cut(client)
            started = time.perf_counter()
            other.revoke_identity(f"rev-{trial}")
            await _until(is_cut)
            results["revoke"].append(time.perf_counter() - started)
            scope.cancel()

            client, scope = await live_stream(f"kill-{trial}")
            is_cut = await stream_cut(client)
            started = time.perf_counter()
            status, _ = await http_json(
                "POST",
                gate["http"] + "/api/sessions/kill",
                bearer=gate_dir.bearer,
                body={"target": f"kill-{trial}"},
            )
            assert status == 200
            await _until(is_cut)
            results["sessions kill"].append(time.perf_counter() - started)
            scope.cancel()

            app = f"app-{trial}"
            key = other.add_app(app)

            def refused(bearer: str) -> Callable[[], Awaitable[bool]]:
                async def check() -> bool:
                    status, _ = await http_json("GET", gate["http"] + "/v1/models", bearer=bearer)
                    return status in (401, 403)  # 403 app_disabled

                return check

            status, _ = await http_json("GET", gate["http"] + "/v1/models", bearer=f"{app}:{key}")
            assert status == 200  # cached from here on
            started = time.perf_counter()
            new_key, _ = other.rotate_app_key(app, 0)
            await _until(refused(f"{app}:{key}"))
            results["rotate-key --overlap 0"].append(time.perf_counter() - started)

            status, _ = await http_json(
                "GET", gate["http"] + "/v1/models", bearer=f"{app}:{new_key}"
            )
            assert status == 200
            started = time.perf_counter()
            other.set_app_disabled(app, True)
            await _until(refused(f"{app}:{new_key}"))
            results["apps disable"].append(time.perf_counter() - started)
        other.close()
        nursery.cancel_scope.cancel()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = trio.run(_measure, Path(tmp), args.trials)
    print("| change | trials | p50 ms | max ms | bound |\n|---|---|---|---|---|")
    for name, seconds in results.items():
        ms = sorted(s * 1000 for s in seconds)
        print(f"| {name} | {len(ms)} | {statistics.median(ms):.1f} | {ms[-1]:.1f} | 1000 |")


if __name__ == "__main__":
    main()
