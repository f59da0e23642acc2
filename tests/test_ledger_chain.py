"""The ledger's seals, computed in Rust, against their definition in Python.

Rows sealed before the Rust path existed, and by any Gate still running an
older version, were sealed over ``json.dumps``'s bytes: ``ledger verify``
accepts them only if Rust writes exactly those bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from qmesh import _core
from qmesh.finops.chain import GENESIS, Column
from qmesh.state.db import insert_many

columns = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(),  # every code point but lone surrogates, control characters too
)
# Lists and tuples (the writer's rows) of differing lengths in one batch,
# up to 150 rows.
rows = st.lists(
    st.one_of(st.lists(columns, max_size=8), st.tuples(columns, columns, columns)),
    min_size=1,
    max_size=150,
)


def python_canonical(row_id: int, values: Sequence[Column]) -> bytes:
    return json.dumps([row_id, *values], separators=(",", ":"), ensure_ascii=False).encode()


@settings(max_examples=400, derandomize=True)
@given(st.integers(min_value=0, max_value=2**62), st.lists(columns, max_size=12))
def test_a_row_is_sealed_over_the_bytes_json_dumps_writes(
    row_id: int, values: list[Column]
) -> None:
    assert _core.canonical_row(row_id, values) == python_canonical(row_id, values)


@settings(max_examples=100, derandomize=True)
@given(st.binary(min_size=1, max_size=64), st.integers(min_value=1, max_value=2**40), rows)
@example(b"k", 1, [(i, f"row {i}", i / 7) for i in range(150)])
def test_a_batch_is_sealed_as_a_chain_of_hmacs(
    key: bytes, first_id: int, batch: list[Sequence[Column]]
) -> None:
    seals = [GENESIS]
    expected: list[object] = []
    for row_id, values in enumerate(batch, start=first_id):
        message = seals[-1] + python_canonical(row_id, values)
        seals.append(hmac.new(key, message, hashlib.sha256).digest())
        expected += [row_id, *values, seals[-2], seals[-1]]
    sealed, last = _core.seal_rows(key, GENESIS, first_id, batch)
    # Each row as an INSERT takes it: its id, values, the seal before it and its own.
    assert sealed == expected and last == seals[-1]
    assert {type(value) for value in sealed[-2:]} == {bytearray}
    assert (
        _core.seal_row(key, seals[1], first_id + 1, [1])
        == hmac.new(key, seals[1] + python_canonical(first_id + 1, [1]), hashlib.sha256).digest()
    )


def test_what_json_cannot_write_is_refused() -> None:
    with pytest.raises(TypeError, match="not bytes"):
        _core.canonical_row(1, [b"raw"])  # type: ignore[list-item]
    with pytest.raises(OverflowError):
        _core.canonical_row(1, [2**64])
    with pytest.raises(UnicodeEncodeError):
        _core.canonical_row(1, ["\ud800"])  # json.dumps(...).encode() fails alike
    with pytest.raises(ValueError, match="32 bytes"):
        _core.seal_rows(b"k", b"short", 1, [[1]])


def _table(conn: sqlite3.Connection, name: str, width: int) -> str:
    names = ", ".join(f"c{i}" for i in range(width))
    conn.execute(f"CREATE TABLE {name} (id INTEGER PRIMARY KEY, {names}, prev_hash, hash)")
    return f"INSERT INTO {name} (id, {names}, prev_hash, hash)"


def _stored(conn: sqlite3.Connection, name: str, width: int) -> list[tuple[object, ...]]:
    # Each value with the type SQLite stored it as: the seal is over Python's
    # value, so both writers must store the same.
    cells = ", ".join(f"c{i}, typeof(c{i})" for i in range(width))
    return conn.execute(f"SELECT id, {cells}, prev_hash, hash FROM {name} ORDER BY id").fetchall()


@settings(max_examples=60, derandomize=True)
@given(st.integers(min_value=1, max_value=6).flatmap(
    lambda width: st.lists(st.lists(columns, min_size=width, max_size=width), min_size=1,
                           max_size=80)))  # fmt: skip
# Past one statement's 64 rows, every type in every column.
@example([[i, f"row {i}", i / 7, i % 2 == 0, None][i % 5 :] + [i, "x", 0.5, True, None][: i % 5]
          for i in range(150)])  # fmt: skip
def test_sqlite_rows_inserted_natively_are_those_the_sqlite3_module_inserts(
    batch: list[list[Column]],
) -> None:
    width = len(batch[0])
    with contextlib.closing(sqlite3.connect(":memory:", isolation_level=None)) as conn:
        by_module, natively = _table(conn, "by_module", width), _table(conn, "natively", width)
        in_turns = _table(conn, "in_turns", width)
        conn.execute("BEGIN IMMEDIATE")
        sealed, last = _core.seal_rows(b"key", GENESIS, 7, batch)
        insert_many(conn, by_module, sealed, width + 3)
        assert _core.insert_sealed(conn, natively, b"key", GENESIS, 7, batch) == last
        # Yielding the core between statements changes nothing written.
        assert (
            _core.insert_sealed(conn, in_turns, b"key", GENESIS, 7, batch, take_turns=True) == last
        )
        conn.execute("COMMIT")
        assert _stored(conn, "natively", width) == _stored(conn, "by_module", width)
        assert _stored(conn, "in_turns", width) == _stored(conn, "by_module", width)


def test_a_native_insert_that_fails_raises_the_sqlite3_modules_error_and_writes_nothing(
    tmp_path: Path,
) -> None:
    assert _core.native_sqlite()  # CPython 3.11 to 3.14: the ledger takes this path
    with contextlib.closing(sqlite3.connect(tmp_path / "t.db", isolation_level=None)) as conn:
        insert = _table(conn, "t", 1)
        with pytest.raises(RuntimeError, match="inside the caller's transaction"):
            _core.insert_sealed(conn, insert, b"k", GENESIS, 1, [[1]])
        conn.execute("BEGIN IMMEDIATE")
        _core.insert_sealed(conn, insert, b"k", GENESIS, 1, [[1], [2], [3]])
        with pytest.raises(sqlite3.IntegrityError, match="UNIQUE constraint failed"):
            _core.insert_sealed(conn, insert, b"k", GENESIS, 3, [[3]])  # id 3 is taken
        with pytest.raises(sqlite3.OperationalError, match="5 values for 4 columns"):
            _core.insert_sealed(conn, insert, b"k", GENESIS, 9, [[1, 2]])
        with pytest.raises(ValueError, match="differ in length"):
            _core.insert_sealed(conn, insert, b"k", GENESIS, 9, [[1], [1, 2]])
        with pytest.raises(TypeError, match="not bytes"):
            _core.insert_sealed(conn, insert, b"k", GENESIS, 9, [[b"raw"]])  # type: ignore[list-item]
        with pytest.raises(sqlite3.OperationalError, match="no such table"):
            gone = "INSERT INTO gone (id, c0, prev_hash, hash)"
            _core.insert_sealed(conn, gone, b"k", GENESIS, 9, [[1]])
        conn.execute("ROLLBACK")
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (0,)
    with pytest.raises(RuntimeError, match="closed"):
        _core.insert_sealed(conn, insert, b"k", GENESIS, 1, [[1]])
    with pytest.raises(RuntimeError, match=r"not a sqlite3\.Connection"):
        _core.insert_sealed(object(), insert, b"k", GENESIS, 1, [[1]])  # type: ignore[arg-type]
