"""Shared fixtures: a real PostgreSQL cluster (scripts/pgcluster.py)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

from pgcluster import PgCluster


@pytest.fixture(scope="session")
def pg_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgCluster]:
    """One throwaway cluster for the whole run (initdb costs seconds)."""
    with PgCluster(tmp_path_factory.mktemp("pg")) as cluster:
        yield cluster
