"""Read a GGUF file's metadata and tensor table without reading its weights.

For: :func:`scan_gguf`, which returns the scalar metadata (arrays of up to
:data:`KEEP_ARRAY` items too) and every tensor's name, type and byte size.
The format's enums and block sizes come from the ``gguf`` package
(``GGUFValueType``, ``GGMLQuantizationType``, ``GGML_QUANT_SIZES``), so a
new quantization type is a ``pip install -U gguf`` away.

Why not ``gguf.GGUFReader``: it turns every array into Python objects —
a 262 144-token vocabulary takes seconds to tens of seconds per file on a
small machine — and the catalog needs none of them. This scanner walks the
header over a memory map, steps over large arrays by their length prefixes,
and never touches tensor data, so a file is catalogued in milliseconds.

Not for: writing GGUF, reading tensor data, or deciding what a model is
(:mod:`qmesh.daemon.catalog` does that with what this returns). Raises
:class:`GgufError` for anything that is not a well-formed GGUF v2/v3 header.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any, Final

import attrs

try:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
except ImportError:  # the `llama` extra is not installed: the catalog says so
    GGUF_MISSING = "the gguf package is not installed (pip install 'qmesh[llama]')"
else:
    GGUF_MISSING = ""

__all__ = ["GgufError", "GgufHeader", "TensorInfo", "scan_gguf"]

MAGIC: Final = b"GGUF"
KEEP_ARRAY: Final = 64
"""Arrays longer than this are skipped (recorded as their length only)."""
MAX_STRING: Final = 1 << 26
"""A string longer than 64 MiB in a header is corruption, not metadata."""
MAX_COUNT: Final = 1 << 32
MAX_DIMS: Final = 8

_SCALARS: Final = (
    {
        GGUFValueType.UINT8: "<B",
        GGUFValueType.INT8: "<b",
        GGUFValueType.UINT16: "<H",
        GGUFValueType.INT16: "<h",
        GGUFValueType.UINT32: "<I",
        GGUFValueType.INT32: "<i",
        GGUFValueType.FLOAT32: "<f",
        GGUFValueType.BOOL: "<?",
        GGUFValueType.UINT64: "<Q",
        GGUFValueType.INT64: "<q",
        GGUFValueType.FLOAT64: "<d",
    }
    if not GGUF_MISSING
    else {}
)


class GgufError(Exception):
    """The file is not a GGUF model this scanner understands (bad magic,
    unsupported version, truncated or inconsistent header)."""


@attrs.frozen
class TensorInfo:
    name: str
    type_name: str
    n_elements: int
    n_bytes: int
    shape: tuple[int, ...] = ()
    """GGUF's dimension order: the row length first."""


@attrs.frozen
class SkippedArray:
    """An array too long to keep: only its element type and length."""

    item_type: str
    length: int


@attrs.frozen
class GgufHeader:
    version: int
    metadata: dict[str, Any]
    tensors: tuple[TensorInfo, ...]
    value_types: dict[str, tuple[str, str | None]] = attrs.field(factory=dict)
    """Each key's GGUF value type name, and an array's item type name."""


class _Cursor:
    def __init__(self, data: mmap.mmap | bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            raise GgufError("truncated header")
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        length = self.take("<Q")
        if length > MAX_STRING or self.pos + length > len(self.data):
            raise GgufError("string length past the end of the file")
        raw = self.data[self.pos : self.pos + length]
        self.pos += length
        return bytes(raw).decode("utf-8", errors="replace")

    def skip_strings(self, count: int) -> None:
        data, pos, end = self.data, self.pos, len(self.data)
        for _ in range(count):
            if pos + 8 > end:
                raise GgufError("truncated string array")
            (length,) = struct.unpack_from("<Q", data, pos)
            pos += 8 + length
        if pos > end:
            raise GgufError("truncated string array")
        self.pos = pos


def _value_type(code: int) -> GGUFValueType:
    try:
        return GGUFValueType(code)
    except ValueError:
        raise GgufError(f"unknown metadata value type {code}") from None


def _read_value(cursor: _Cursor, value_type: GGUFValueType) -> Any:
    if value_type == GGUFValueType.STRING:
        return cursor.string()
    if value_type == GGUFValueType.ARRAY:
        item_type = _value_type(cursor.take("<I"))
        count = cursor.take("<Q")
        if count > MAX_COUNT:
            raise GgufError("array length is implausible")
        if count > KEEP_ARRAY:
            if item_type == GGUFValueType.STRING:
                cursor.skip_strings(count)
            elif item_type in _SCALARS:
                size = struct.calcsize(_SCALARS[item_type]) * count
                if cursor.pos + size > len(cursor.data):
                    raise GgufError("truncated array")
                cursor.pos += size
            else:
                # Arrays of arrays have no fixed size: walk them.
                for _ in range(count):
                    _read_value(cursor, item_type)
            return SkippedArray(item_type.name, count)
        return [_read_value(cursor, item_type) for _ in range(count)]
    fmt = _SCALARS.get(value_type)
    if fmt is None:
        raise GgufError(f"unsupported metadata value type {value_type}")
    return cursor.take(fmt)


def _tensor_bytes(type_code: int, n_elements: int) -> tuple[str, int]:
    try:
        qtype = GGMLQuantizationType(type_code)
        block, type_size = GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise GgufError(f"unknown tensor type {type_code}") from None
    return qtype.name, n_elements // block * type_size


def scan_gguf(path: Path) -> GgufHeader:
    """The header of the GGUF file at ``path``. Raises GgufError or OSError."""
    if GGUF_MISSING:
        raise GgufError(GGUF_MISSING)
    with path.open("rb") as file:
        try:
            data = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # an empty file cannot be mapped
            raise GgufError("empty file") from None
        try:
            return _scan(_Cursor(data))
        finally:
            data.close()


def _scan(cursor: _Cursor) -> GgufHeader:
    if bytes(cursor.data[:4]) != MAGIC:
        raise GgufError("not a GGUF file (bad magic)")
    cursor.pos = 4
    version = cursor.take("<I")
    if version not in (2, 3):
        raise GgufError(f"unsupported GGUF version {version} (big-endian files are not read)")
    tensor_count = cursor.take("<Q")
    kv_count = cursor.take("<Q")
    if tensor_count > MAX_COUNT or kv_count > MAX_COUNT:
        raise GgufError("implausible tensor or key count")
    metadata: dict[str, Any] = {}
    value_types: dict[str, tuple[str, str | None]] = {}
    for _ in range(kv_count):
        key = cursor.string()
        value_type = _value_type(cursor.take("<I"))
        item = None
        if value_type == GGUFValueType.ARRAY:  # peek at the item type
            item = _value_type(struct.unpack_from("<I", cursor.data, cursor.pos)[0]).name
        metadata[key] = _read_value(cursor, value_type)
        value_types[key] = (value_type.name, item)
    tensors = []
    for _ in range(tensor_count):
        name = cursor.string()
        n_dims = cursor.take("<I")
        if n_dims > MAX_DIMS:
            raise GgufError(f"tensor {name!r} has {n_dims} dimensions")
        shape = tuple(cursor.take("<Q") for _ in range(n_dims))
        n_elements = 1
        for dim in shape:
            n_elements *= dim
        type_name, n_bytes = _tensor_bytes(cursor.take("<I"), n_elements)
        cursor.take("<Q")  # the data offset: the catalog does not read weights
        tensors.append(TensorInfo(name, type_name, n_elements, n_bytes, shape))
    return GgufHeader(
        version=version, metadata=metadata, tensors=tuple(tensors), value_types=value_types
    )
