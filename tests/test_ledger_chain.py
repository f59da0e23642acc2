"""The ledger's seals, computed in Rust, against their definition in Python.

Rows sealed before the Rust path existed, and by any Gate still running an
older version, were sealed over ``json.dumps``'s bytes: ``ledger verify``
accepts them only if Rust writes exactly those bytes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Sequence

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from qmesh import _core
from qmesh.finops.chain import GENESIS, Column

columns = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(),  # every code point but lone surrogates, control characters too
)
# Lists and tuples (the writer's rows); batches past the rows the Rust side
# encodes per hold of the GIL (64), so the chain crosses its groups.
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
