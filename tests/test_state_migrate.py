"""``qmesh state migrate --to postgresql://…`` and ``qmesh state status``, as an
operator runs them: a SQLite state made by today's code (apps with a rotated
key, revoked edges, the vault, a provider key, the ledger and its chains,
the statement audit, the graph memory) copied into a real PostgreSQL, then
used there by the commands and by a Gate."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio
from daemonkit import GateDir, http_json, make_gate_dir
from pgcluster import PgCluster
from pgkit import RealDb

from qmesh.config import Config, load_config
from qmesh.finops.ledger import Ledger, LedgerEntry, read_rows
from qmesh.gate.role import run_gate
from qmesh.llm.provider_keys import load_key, store_key
from qmesh.masterkey import load_master_key
from qmesh.memory.query import Answer
from qmesh.memory.records import OPERATOR
from qmesh.memory.service import Memory
from qmesh.pg.audit import AuditLog, list_audit
from qmesh.pg.vault import Vault
from qmesh.state import POSTGRES_MIGRATIONS, StateStore
from qmesh.state.copy import SHARED_TABLES, table_counts

PASSWORD = "real-Pa55/word"


def qmesh(gate: GateDir, *args: str, url: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QMESH_")}
    if url is not None:
        env["QMESH_GATE__DATABASE_URL"] = url
    return subprocess.run(
        [sys.executable, "-m", "qmesh", "--data-dir", str(gate.path), *args],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def entry(n: int) -> LedgerEntry:
    return LedgerEntry(
        ts=time.time(), request_id=f"r{n}", app="shop", budget=None, task="summarize",
        candidate="skill:summarize", kind="internal", model="qmesh-summarize", provider=None,
        tokens_in=100 + n, tokens_out=20, cost_usd=0.000123 * n, shifted_from=None,
        avoided_usd=0.0, outcome="ok", hops="[]", reason="best by prefer=speed",
    )  # fmt: skip


ACME = (
    "Acme Corporation was founded in 1998 by Jane Doe in Springfield. "
    "Jane Doe is the CEO of Acme. Acme acquired Initech in 2005."
)
ALIAS = "International Business Machines (IBM) makes mainframes. IBM acquired Red Hat."


def cited(answer: Answer) -> list[tuple[str, int, int, str]]:
    return [(c.sentence_id, c.start, c.end, c.text) for c in answer.citations]


async def make_state(gate: GateDir) -> dict[str, str]:
    """Everything a running Gate writes, written by the code that writes it."""
    master_key = load_master_key(Config(data_dir=gate.path), env={})
    keys: dict[str, str] = {}
    with StateStore.open(gate.path / "state.db") as store:
        keys["shop-old"] = store.add_app("shop")
        keys["shop"], _ = store.rotate_app_key("shop", overlap_s=3600)
        keys["billing"] = store.add_app("billing")
        store.set_app_disabled("billing", True)
        store.add_identity("edge-1", "minigate", bytes([1]) * 32)
        store.add_identity("gpu-1", "daemon", bytes([2]) * 32)
        store.revoke_identity("edge-1")
        assert store.accept_hello_timestamp(bytes([2]) * 32, 1_700_000_000)
        vault = Vault.open(store, master_key)
        vault.set("orders", f"host=db.internal user=app password={PASSWORD} sslmode=require")
        vault.set("billing", f"postgresql://billing:{PASSWORD}x@db2/billing")
        store_key(store, master_key, "acme", "sk-acme-secret")
        ledger = Ledger(store)
        for n in range(25):
            ledger.record(entry(n))
        ledger.audit("operator", "budget.changed", {"budget": "team"})
        memory = Memory(store)
        memory.add(ACME, document_id="acme", added_by="shop")
        memory.add(ALIAS, document_id="ibm", shared=True)
        memory.delete("ibm", access=OPERATOR)  # ids with a gap: they are copied as they are
        memory.add(ALIAS, document_id="ibm", shared=True)
        await ledger.flush()
        audit = AuditLog(store)
        async with trio.open_nursery() as nursery:
            await nursery.start(audit.run)
            for n in range(7):
                audit.record(
                    app="shop", alias="orders", statement=f"SELECT {n}", duration_s=0.001,
                    rows=1, outcome="ok",
                )  # fmt: skip
            await audit.flush()
            nursery.cancel_scope.cancel()
    return keys


async def test_migrate_copies_everything_and_a_gate_serves_it(
    tmp_path: Path, pg_cluster: PgCluster
) -> None:
    gate = make_gate_dir(tmp_path)
    keys = await make_state(gate)
    url = RealDb(pg_cluster, prefix="migrated").dsn()
    questions = ("Who founded Acme?", "What did International Business Machines acquire?")
    with StateStore.open(gate.path / "state.db") as source:
        expected = table_counts(source)
        answers = [cited(Memory(source).ask(q, access=OPERATOR)) for q in questions]
    assert all(expected[t] for t in ("apps", "app_old_verifiers", "vault_secrets", "qg_ledger"))
    assert all(expected[t] for t in SHARED_TABLES if t.startswith("memory_"))
    assert all(answers)

    # Status before: SQLite, up to date; the target's status: nothing applied yet.
    status = qmesh(gate, "state", "status")
    assert status.returncode == 0, status.stderr
    assert f"state    sqlite at {gate.path / 'state.db'} (DATA_DIR)" in status.stdout
    pending = qmesh(gate, "state", "status", url=url)
    assert pending.returncode == 0, pending.stderr
    steps = len(POSTGRES_MIGRATIONS)
    assert f"schema   version 0 of {steps}: {steps} step(s) pending" in pending.stdout
    assert "real-" not in pending.stdout  # the URL's password is never shown

    done = qmesh(gate, "state", "migrate", "--to", url)
    assert done.returncode == 0, done.stdout + done.stderr
    for table in SHARED_TABLES:
        assert f"  {table}" in done.stdout and "differs" not in done.stdout
    assert "chain ledger: 25 rows verified on the target, ok" in done.stdout
    assert "chain audit: 1 rows verified on the target, ok" in done.stdout
    assert PASSWORD not in done.stdout + done.stderr

    with StateStore.open(url) as target:
        assert table_counts(target) == expected
        master_key = load_master_key(Config(data_dir=gate.path), env={})
        orders = Vault.open(target, master_key).get("orders")
        assert orders is not None and orders.password == PASSWORD  # still sealed, still opens
        assert load_key(target, master_key, "acme") == "sk-acme-secret"
        assert target.verify_app_key("shop", keys["shop"])
        assert target.verify_app_key("shop", keys["shop-old"])  # the overlap survived
        assert not target.verify_app_key("billing", keys["billing"])  # still disabled
        revoked = target.get_identity("edge-1")
        assert revoked is not None and revoked.revoked
        assert not target.accept_hello_timestamp(bytes([2]) * 32, 1_700_000_000)  # a replay
        assert [r["request_id"] for r in read_rows(target)][:3] == ["r0", "r1", "r2"]
        assert len(list_audit(target, limit=100)) == 7
        # The memory answers with the same citations, keeps who owns what,
        # and goes on: new rows get ids after the copied ones.
        memory = Memory(target)
        assert [cited(memory.ask(q, access=OPERATOR)) for q in questions] == answers
        assert [(d.id, d.added_by, d.shared) for d in memory.documents(access=OPERATOR)] == [
            ("acme", "shop", False), ("ibm", None, True)
        ]  # fmt: skip
        memory.add("Globex acquired Umbrella in 2011.", document_id="globex")
        assert memory.ask("What did Globex acquire?", access=OPERATOR).found
        assert not any(memory.store.integrity_problems().values())

    # The commands use it once gate.database_url says so.
    verified = qmesh(gate, "ledger", "verify", url=url)
    assert verified.returncode == 0, verified.stderr
    assert "ledger: 25 rows, ok" in verified.stdout
    status = qmesh(gate, "state", "status", url=url)
    assert f"schema   version {steps} of {steps}: up to date" in status.stdout
    assert "qg_ledger 25" in status.stdout and "memory_documents 3" in status.stdout

    # A Gate on the target serves the migrated app keys, and extends the chain.
    (tmp_path / "gate.toml").write_text(gate.config_text())
    config = load_config(tmp_path / "gate.toml", env={"QMESH_GATE__DATABASE_URL": url})
    assert config.gate.database_url == url
    async with trio.open_nursery() as nursery:
        endpoints = await nursery.start(run_gate, config)
        models = endpoints["http"] + "/v1/models"
        assert (await http_json("GET", models, bearer=f"shop:{keys['shop']}"))[0] == 200
        assert (await http_json("GET", models, bearer=f"shop:{keys['shop-old']}"))[0] == 200
        # Disabled, not unknown: the key is right, the app is refused (403, not 401).
        assert (await http_json("GET", models, bearer=f"billing:{keys['billing']}"))[0] == 403
        code, answer = await http_json(
            "POST", endpoints["http"] + "/v1/chat/completions", bearer=f"shop:{keys['shop']}",
            body={"model": "qg://task=keywords", "messages": [{"role": "user", "content": "cod"}]},
        )  # fmt: skip
        assert code == 200, answer
        await endpoints["llm"].ledger.flush()
        nursery.cancel_scope.cancel()
    verified = qmesh(gate, "ledger", "verify", url=url)
    assert verified.returncode == 0 and "ledger: 26 rows, ok" in verified.stdout, verified.stdout


async def test_migrate_refuses_a_target_with_rows_and_bad_urls(
    tmp_path: Path, pg_cluster: PgCluster
) -> None:
    gate = make_gate_dir(tmp_path)
    await make_state(gate)
    url = RealDb(pg_cluster, prefix="busy").dsn()
    with StateStore.open(url) as target:
        target.add_app("someone-else")
    refused = qmesh(gate, "state", "migrate", "--to", url)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    (line,) = refused.stderr.strip().splitlines()
    assert "already holds rows: apps (1); --replace empties those tables first" in line
    with StateStore.open(url) as target:
        assert [a.app_id for a in target.list_apps()] == ["someone-else"]  # nothing written
    replaced = qmesh(gate, "state", "migrate", "--to", url, "--replace")
    assert replaced.returncode == 0, replaced.stdout + replaced.stderr
    with StateStore.open(url) as target:
        assert [a.app_id for a in target.list_apps()] == ["admin", "billing", "shop"]

    for to, message in (
        ("/tmp/not-a-url.db", "--to expects a postgresql:// URL"),
        ("postgresql://nobody:pw@127.0.0.1:1/none", "cannot connect to postgresql://nobody@127.0.0.1:1/none"),
    ):  # fmt: skip
        failed = qmesh(gate, "state", "migrate", "--to", to)
        assert failed.returncode == 2, failed.stderr
        (line,) = failed.stderr.strip().splitlines()
        assert message in line and "pw" not in line, line


@pytest.mark.parametrize("command", [("state", "status"), ("state", "migrate", "--to", "x")])
def test_no_state_yet_is_one_line(tmp_path: Path, command: tuple[str, ...]) -> None:
    empty = GateDir(tmp_path / "nothing", 0, 0, "")
    result = qmesh(empty, *command)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
