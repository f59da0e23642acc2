"""Shared fixtures: a real PostgreSQL cluster (scripts/pgcluster.py)."""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

from pgcluster import PgCluster


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """One throwaway cluster for the whole run (initdb costs seconds).

    Not under pytest's tmp_path: as root the server runs as ``postgres``,
    which cannot enter pytest's private (0700) base directory. A directory
    of its own in the system temp dir can be opened up to it.
    """
    base = Path(tempfile.mkdtemp(prefix="qmesh-pg-"))
    try:
        with PgCluster(base) as cluster:
            yield cluster
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(autouse=True)
def _close_state_stores() -> Iterator[None]:
    """Set up before, so torn down after, every other fixture of the test."""
    from statekit import OPEN_STORES

    yield
    while OPEN_STORES:
        OPEN_STORES.pop().close()


@pytest.fixture(params=["sqlite", "postgresql"])
def state_location(request: pytest.FixtureRequest, tmp_path: Path) -> str | Path:
    """Where a test's Gate state lives, once per backend: a SQLite file, or
    a database of its own (and a role owning it) on the shared cluster."""
    if request.param == "sqlite":
        return tmp_path / "state.db"
    from pgkit import RealDb

    return RealDb(request.getfixturevalue("pg_cluster"), prefix="state").dsn()
