"""The README's walk through the seed, run verbatim against a fresh ``qmesh up``.

The section "The seed, step by step" is what a newcomer pastes after
``scripts/up.sh``. This test starts ``qmesh up --ephemeral --data-dir DIR``
itself, gives the section's variables this run's values (only
``QMESH_DATA_DIR`` differs), extracts the section's ``sh`` blocks from
README.md and runs them in order in one bash, so the README cannot drift
from the product: a command that fails fails the test, and what each step
promises is checked in its output."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from daemonkit import GEMMA_ID, gemma_path, require_llama
from processkit import forget_demo_database, stop, wait_for

REPO = Path(__file__).resolve().parent.parent
SECTION = "## The seed, step by step"
DATA_DIR_LINE = re.compile(r"^export QMESH_DATA_DIR=(\S+)", re.M)

pytestmark = pytest.mark.slow


def walk_blocks(readme: str) -> list[str]:
    """The ``sh`` blocks of the walk's section, in order."""
    start = readme.index(SECTION)
    end = readme.find("\n## ", start + len(SECTION))
    section = readme[start : end if end >= 0 else None]
    return re.findall(r"^```sh\n(.*?)^```$", section, re.S | re.M)


def with_data_dir(variables: str, data_dir: Path) -> str:
    """The variables block with this run's data directory, nothing else changed."""
    (readme_value,) = DATA_DIR_LINE.findall(variables)
    assert readme_value == "/tmp/qmesh"  # the one `scripts/up.sh` line above uses
    return DATA_DIR_LINE.sub(f"export QMESH_DATA_DIR={data_dir}", variables)


def lines_after(output: str, marker: str) -> list[str]:
    return output[output.index(marker) :].splitlines()


def test_the_readme_walk_runs_verbatim(tmp_path: Path) -> None:
    gemma_path()
    require_llama()
    if Path(sys.prefix).resolve() != (REPO / ".venv").resolve():
        pytest.skip("the walk sources .venv/bin/activate: run the tests from the repository's venv")
    blocks = walk_blocks((REPO / "README.md").read_text())
    assert len(blocks) == 10, "the variables, then one block per step"
    script = "\n".join(
        ["set -euo pipefail", with_data_dir(blocks[0], tmp_path / "data"), *blocks[1:]]
    )

    log = tmp_path / "up.log"
    data_dir = tmp_path / "data"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "qmesh", "up", "--ephemeral", "--data-dir", str(data_dir)],
            cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_for("qmesh up", lambda: "Ctrl-C stops everything" in log.read_text(), 90)
        walk = subprocess.run(
            ["bash", "-c", script],
            cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
            env={k: v for k, v in os.environ.items() if k != "QMESH_DATA_DIR"},
        )  # fmt: skip
    finally:
        stop(process)
        forget_demo_database(data_dir)
    output = walk.stdout
    assert walk.returncode == 0, f"{output}\n{walk.stderr}\n{log.read_text()}"
    # No warnings or stray log lines: a newcomer sees only the answers.
    assert walk.stderr.strip() == "", walk.stderr

    answers = [
        line for line in output.splitlines() if line.startswith(("qmesh-", GEMMA_ID, "error:"))
    ]
    # 1. The built-in summarizer; 2. the daemon's Gemma writes.
    assert answers[0].startswith("qmesh-summarize: Brindle is a harbour town")
    assert answers[1].startswith(f"{GEMMA_ID}:")  # sampled text: any words, even none
    # 3. The ghost wire: the app's key logs in as the real role; every statement audited.
    assert "| demo" in output
    assert "insert into notes (body) values ('through the ghost wire')" in output
    # 4. The fluid fabric: Gemma, then moved to the built-in skill, then a reason.
    assert answers[2].startswith(f"{GEMMA_ID}:")
    assert f"local-daemon: {GEMMA_ID} stopped (available)" in output
    assert answers[3].startswith("qmesh-summarize: ")
    assert answers[4] == (
        "error: no candidate can serve qg://task=creative_writing now "
        f"(node:local-daemon/{GEMMA_ID}: stopped on local-daemon by an operator "
        f"(qmesh models start {GEMMA_ID}))"
    )
    assert f"local-daemon: {GEMMA_ID} in service (available)" in output
    # 5. The single pane of glass: the node and its model, in both views.
    inventory = lines_after(output, "NAME ")
    assert any(line.startswith("local-daemon") and GEMMA_ID in line for line in inventory)
    models = lines_after(output, "NODE ")
    assert models[1].split()[:4] == ["local-daemon", GEMMA_ID, "Q4_K_M", "available"]
    # 6. Rotation under a live session.
    assert "rotated db.demo: a new password for demo" in output
    before, after = re.findall(r"^ (?:before|after) the rotation.*\|\s+(\d+)$", output, re.M)
    assert before == after  # the same server session went on
    assert "a new session with the same app key" in output
    # 7. Memory: the answer and its source sentence, for the CLI and for apps.
    assert "Mara Quill founded the Brindle Fish Market in 1921. [1]" in output
    assert "[1] brindle [" in output
    assert "qmesh-memory: Mara Quill founded the Brindle Fish Market in 1921. [1]" in output
    # 8. The quantization plan; 9. the books, and their chains verified.
    # The one variant there is, whether this machine's calibration says it
    # reaches 20 tok/s or not (a busy runner measures it slower).
    assert re.search(
        r"^chose Q4_K_M: the highest quality that fits and reaches 20 tok/s"
        r"|^no variant reaches 20 tok/s; chose the fastest that fits, Q4_K_M",
        output,
        re.M,
    )
    # Five answered requests (the 503 ran nothing), all on the demo app's account.
    assert re.search(r"^demo\s+5\s", output, re.M)
    assert "ledger: 5 rows, ok" in output
