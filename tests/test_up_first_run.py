"""``qmesh up`` on a first run, as a real process with no config file: its
daemon serves the model cache that ``scripts/setup.sh`` fills, the model
commands find the same models, and a missing cache is one clear line, not
a failed start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from processkit import stop, wait_for
from test_daemon_catalog import write_gguf  # skips this module without the gguf package

from qmesh.daemon.catalog import MODEL_CACHE_ENV, describe_gguf

UP_TIMEOUT_S = 90.0  # generous: the first start measures memory bandwidth


def qmesh(cache: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qmesh", *args],
        env={**os.environ, MODEL_CACHE_ENV: str(cache)},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def up_json(data_dir: Path) -> dict[str, Any] | None:
    try:
        summary: dict[str, Any] = json.loads((data_dir / "up.json").read_text())
    except (OSError, ValueError):
        return None  # not written yet
    return summary


def run_up(tmp_path: Path, cache: Path) -> tuple[subprocess.Popen[bytes], Path, Path]:
    data_dir = tmp_path / "data"
    log = tmp_path / "up.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "qmesh", "up", "--ephemeral", "--data-dir", str(data_dir)],
            env={**os.environ, MODEL_CACHE_ENV: str(cache)},
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return process, data_dir, log


def test_the_daemon_of_up_serves_the_model_cache(tmp_path: Path) -> None:
    cache = tmp_path / "models"
    cache.mkdir()
    model = describe_gguf(write_gguf(cache / "tiny-f16.gguf"))
    model_id = model.id
    process, data_dir, log = run_up(tmp_path, cache)
    try:
        wait_for("the banner", lambda: "Ctrl-C stops everything" in log.read_text(), UP_TIMEOUT_S)
        summary = up_json(data_dir)
        assert summary is not None
        assert summary["daemon"]["models"] == [model_id]
        assert f"models    {model_id}" in log.read_text()
        assert "no model cache" not in log.read_text()
    finally:
        stop(process)

    # The model commands look where the daemon of `qmesh up` looks.
    catalog = qmesh(cache, "node", "catalog", "--json", cwd=tmp_path)
    assert catalog.returncode == 0, catalog.stderr
    assert [m["id"] for m in json.loads(catalog.stdout)] == [model_id]
    plan = qmesh(cache, "quant", "plan", model_id, "--node", "cpu", cwd=tmp_path)
    assert plan.returncode == 0, plan.stderr
    assert plan.stdout.startswith(f"model {model.equivalence},")


def test_without_a_model_cache_up_says_so_in_one_line_and_starts(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-cache"
    process, data_dir, log = run_up(tmp_path, missing)
    try:
        wait_for("the banner", lambda: "Ctrl-C stops everything" in log.read_text(), UP_TIMEOUT_S)
        summary = up_json(data_dir)
        assert summary is not None and summary["daemon"]["models"] == []
        text = log.read_text()
        (line,) = [line for line in text.splitlines() if "no model cache" in line]
        assert str(missing) in line and "scripts/setup.sh" in line and MODEL_CACHE_ENV in line
        assert "models    none" in text
    finally:
        stop(process)

    nothing = qmesh(missing, "node", "catalog", cwd=tmp_path)
    assert nothing.returncode == 2
    assert str(missing) in nothing.stderr and "scripts/setup.sh" in nothing.stderr
