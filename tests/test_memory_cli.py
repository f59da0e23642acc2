"""``qmesh memory …`` as an operator runs it: real subprocesses on a real data
directory, its state in SQLite or (``gate.database_url``) in PostgreSQL."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from memory_corpus import DOCUMENTS

from qmesh.memory.records import OPERATOR, Access
from qmesh.memory.service import Memory
from qmesh.state import StateStore

_SUFFIX = {"text": ".txt", "markdown": ".md", "html": ".html"}


def test_memory_commands(tmp_path: Path, state_location: str | Path) -> None:
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("QMESH_")}
    if isinstance(state_location, str):
        env["QMESH_GATE__DATABASE_URL"] = state_location
    else:
        state_location = data / "state.db"

    def qmesh(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "qmesh", "--data-dir", str(data_dir), "memory", *args],
            capture_output=True, text=True, timeout=60, env=env,
        )  # fmt: skip

    files = []
    for document_id, (fmt, text) in DOCUMENTS.items():
        path = tmp_path / f"{document_id}{_SUFFIX[fmt]}"
        path.write_bytes(text.encode())
        files.append(str(path))
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))

    added = qmesh(data, "add", *files, str(tmp_path / "empty.txt"), str(tmp_path / "latin1.txt"))
    assert added.returncode == 2, added.stderr
    assert re.search(r"^added acme-history: 10 sentences, \d+ mentions, \d+ relations$",
                     added.stdout, re.M)  # fmt: skip
    assert added.stdout.count("added ") == len(DOCUMENTS)
    assert "empty.txt: text is empty" in added.stderr
    assert "latin1.txt is not UTF-8 text" in added.stderr
    again = qmesh(data, "add", files[0])
    assert again.returncode == 0 and again.stdout.startswith("unchanged acme-history")

    listing = qmesh(data, "list")
    assert listing.returncode == 0
    assert re.search(
        r"^acme-wiki\s+html\s+5\s+\(operator\)\s+\S+\s+Acme Corp\. – Wiki$", listing.stdout, re.M
    )

    ask = qmesh(data, "ask", "Who founded Acme?")
    assert ask.returncode == 0, ask.stderr
    answer, _, rest = ask.stdout.partition("\n\n")
    assert answer == (
        "Acme Corporation was founded in 1998 by Jane Doe in Springfield. [1] "
        "Acme Corp. was founded in 1999 by Jane Doe and John Smith. [2]"
    )
    citations = re.findall(r"^\[(\d+)\] (\S+) \[(\d+):(\d+)\] (.+)$", rest, re.M)
    assert [c[0] for c in citations] == ["1", "2"]
    with StateStore.open(state_location) as state:
        memory = Memory(state)
        for _, document_id, start, end, text in citations:
            assert memory.document(document_id, access=OPERATOR)[1][int(start) : int(end)] == text
    assert "note: sources disagree on Acme Corporation / founded: 1998 [1]; 1999 [2]" in rest

    missing = qmesh(data, "ask", "What is the capital of Mars?")
    assert missing.returncode == 1
    assert missing.stdout.startswith("not found\n")

    deleted = qmesh(data, "delete", "acme-wiki")
    assert deleted.returncode == 0, deleted.stderr
    assert deleted.stdout.startswith("deleted acme-wiki: 5 sentences; removed ")
    after = qmesh(data, "ask", "Who founded Acme?", "--json")
    assert after.returncode == 0
    assert '"document_id": "acme-wiki"' not in after.stdout
    unknown = qmesh(data, "delete", "acme-wiki")
    assert unknown.returncode == 2
    assert "no document with id 'acme-wiki'" in unknown.stderr

    shared = qmesh(data, "share", "acme-history")
    assert shared.returncode == 0 and "every app can read it" in shared.stdout
    listing = qmesh(data, "list")
    assert re.search(
        r"^acme-history\s+markdown\s+\d+\s+\(operator\) shared\s", listing.stdout, re.M
    )
    with StateStore.open(state_location) as state:
        readers = Memory(state).documents(access=Access.of_app("any-app"))
        assert [d.id for d in readers] == ["acme-history"]
    assert qmesh(data, "share", "acme-history", "--off").returncode == 0
    assert qmesh(data, "share", "nothing").returncode == 2

    check = qmesh(data, "check")
    assert check.returncode == 0 and check.stdout.startswith("ok:")
