"""Llama-shaped GGUF files with made-up weights, for timing a runtime.

For: :func:`write_model`, which writes a model of a given :class:`Shape`
(layers, width, feed-forward width, heads, vocabulary) whose matrices are
all of one ggml type (``F16``, ``Q8_0``, ``Q4_K``…), and
:func:`matmul_elements`, the weights one generated token multiplies by.
The node calibration (:mod:`qmesh.daemon.calibrate`) times llama.cpp on
such files, and ``scripts/gpu_check.py`` writes its GPU test model with it.

How the weights are made: a small pool of random rows is quantized once
with ggml's own quantizer (``ggml_quantize_chunk`` in the ``libggml`` that
llama-cpp-python ships, so every type llama.cpp reads can be written, the
k-quants included — the ``gguf`` package quantizes only a few) and tiled
over each tensor. The values mean nothing; their cost to the runtime is
real. The vocabulary is SentencePiece with byte fallback (any text
tokenizes); the output rows of the special and byte tokens are zero, so
greedy decoding always picks an ordinary word piece and never stops early
on end-of-text.

:func:`write_clone` writes a model of another file's *layout* — its
architecture, hyper-parameters and the tensors of its first block, with
their shapes — but a few blocks, made-up weights of one type, and the same
small vocabulary: what llama.cpp's graph for that architecture costs per
block and per token, without the model itself.

Not for: anything that needs a model to say something sensible.
"""

from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path
from typing import Any, Final

import attrs

__all__ = ["SHAPES", "Shape", "clone_layer_elements", "matmul_elements", "write_clone",
           "write_model"]  # fmt: skip

SPECIAL_TOKENS: Final = 3 + 256
"""``<unk> <s> </s>`` and the 256 byte tokens: the rows greedy decoding must avoid."""
_FILE_TYPES: Final = {
    "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10,
    "Q3_K": 12, "Q4_K": 15, "Q5_K": 17, "Q6_K": 18, "IQ4_NL": 25, "IQ4_XS": 30, "BF16": 32,
}  # fmt: skip
"""``general.file_type`` (llama.cpp's ftype) for a model whose matrices are all one type."""
POOL_ROWS: Final = 128
"""Distinct rows per tensor shape; the rest repeats them."""
WEIGHT_TAILS: Final = 5
"""Degrees of freedom of the Student t the weights are drawn from, and
:data:`ROW_SPREAD` the standard deviation of each row's scale in octaves:
together they spread the scales of quantized blocks as real models do
(Gemma 3 270M's Q8_0 tensors: scales over five octaves, 0.3-0.5 octave
apart within a row, 220-380 of the 64-byte lines of a 256 KiB table).
Normal weights of one scale span under two octaves. That costs: a
llama.cpp built without F16C converts every block's fp16 scale through
that table, and blocks of few scales keep the few lines they touch in L1
— such weights ran Gemma 3's exact layout 25 % faster than the model
itself on this machine's wheel, all of it in the Q8_0 dot product."""
ROW_SPREAD: Final = 0.5


@attrs.frozen
class Shape:
    layers: int
    dim: int
    ffn: int
    heads: int
    kv_heads: int
    vocab: int

    @property
    def kv_dim(self) -> int:
        return self.dim // self.heads * self.kv_heads

    def layer_elements(self) -> int:
        """Weights of one block's matrices (attention q, k, v, o and the gated FFN)."""
        return 2 * self.dim * self.dim + 2 * self.kv_dim * self.dim + 3 * self.dim * self.ffn


SHAPES: Final = {
    "tiny": Shape(2, 256, 512, 4, 2, 512),
    "1b": Shape(16, 2048, 8192, 16, 8, 32000),
    "8b": Shape(32, 4096, 14336, 32, 8, 32000),  # Llama 3 8B's body, a smaller vocabulary
}
"""Named shapes for tools that write test models (scripts/gpu_check.py)."""


def matmul_elements(shape: Shape) -> int:
    """Weights one decoded token multiplies by: every block and the output
    head (the input embedding is a row lookup)."""
    return shape.layers * shape.layer_elements() + shape.vocab * shape.dim


@cache
def _ggml() -> Any:
    from llama_cpp._ggml import libggml

    libggml.ggml_quantize_chunk.restype = ctypes.c_size_t
    libggml.ggml_quantize_chunk.argtypes = [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
        ctypes.c_int64, ctypes.c_void_p,
    ]  # fmt: skip
    libggml.ggml_row_size.restype = ctypes.c_size_t
    libggml.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    libggml.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    libggml.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    return libggml


def writable(type_name: str) -> bool:
    """Whether :func:`write_model` can write matrices of ``type_name`` (the
    types that need an importance matrix to quantize cannot be)."""
    import gguf

    try:
        code = gguf.GGMLQuantizationType[type_name]
    except KeyError:
        return False
    if type_name in ("F32", "F16"):
        return True
    try:
        return not _ggml().ggml_quantize_requires_imatrix(code.value)
    except (ImportError, OSError, AttributeError):
        return False


class _Weights:
    """Tensors of one type, tiled from a quantized pool per row length."""

    def __init__(self, type_name: str, seed: int = 7) -> None:
        import gguf
        import numpy as np

        self.np = np
        self.type = gguf.GGMLQuantizationType[type_name]
        self.rng = np.random.default_rng(seed)
        self._pools: dict[int, Any] = {}

    def _floats(self, rows: int, cols: int) -> Any:
        """Weights as real models' are spread (see :data:`WEIGHT_TAILS`)."""
        np = self.np
        floats = self.rng.standard_t(WEIGHT_TAILS, (rows, cols)) * 0.02
        floats *= np.exp2(self.rng.normal(0.0, ROW_SPREAD, (rows, 1)))
        return floats.astype(np.float32)

    def _pool(self, cols: int) -> Any:
        """POOL_ROWS quantized rows of ``cols`` weights, and a zero row last."""
        pool = self._pools.get(cols)
        if pool is None:
            np = self.np
            floats = self._floats(POOL_ROWS + 1, cols)
            floats[-1] = 0.0
            if self.type.name == "F16":
                pool = floats.astype(np.float16)
            elif self.type.name == "F32":
                pool = floats
            else:
                ggml = _ggml()
                row = ggml.ggml_row_size(self.type.value, cols)
                pool = np.empty((POOL_ROWS + 1, row), dtype=np.uint8)
                written = ggml.ggml_quantize_chunk(
                    self.type.value, floats.ctypes.data, pool.ctypes.data, 0, POOL_ROWS + 1,
                    cols, None,
                )  # fmt: skip
                if written != pool.nbytes:
                    raise RuntimeError(f"ggml quantized {written} bytes, expected {pool.nbytes}")
            self._pools[cols] = pool
        return pool

    def matrix(self, rows: int, cols: int, *, zero_rows: int = 0) -> tuple[Any, Any]:
        """(array, raw_dtype) for ``GGUFWriter.add_tensor``: ``rows`` × ``cols``."""
        np = self.np
        pool = self._pool(cols)
        reps = -(-rows // POOL_ROWS)
        data = np.tile(pool[:POOL_ROWS], (reps, 1))[:rows]
        if zero_rows:
            data[:zero_rows] = pool[POOL_ROWS]
        data = np.ascontiguousarray(data)
        raw = None if self.type.name in ("F16", "F32") else self.type
        return data, raw


def write_model(
    path: Path,
    shape: Shape,
    *,
    weight_type: str = "F16",
    name: str = "qmesh synthetic (random weights)",
    context: int = 4096,
    tied: bool = False,
) -> Path:
    """Write a llama-architecture GGUF of ``shape`` with every matrix in
    ``weight_type``; norms are F32 as llama.cpp expects. ``tied``: no
    ``output.weight``, the token embedding doubles as the output head (as in
    Gemma, Qwen's small models, Llama 3.2 1B/3B). Returns ``path``."""
    import gguf
    import numpy as np

    if shape.vocab <= SPECIAL_TOKENS:
        raise ValueError(f"vocab {shape.vocab} leaves no ordinary tokens")
    file_type = _FILE_TYPES.get(weight_type, 1)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_basename("qmesh-synthetic")
    writer.add_file_type(file_type)
    writer.add_context_length(context)
    writer.add_embedding_length(shape.dim)
    writer.add_block_count(shape.layers)
    writer.add_feed_forward_length(shape.ffn)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_rope_dimension_count(shape.dim // shape.heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(shape.vocab)
    _tokenizer(writer, shape.vocab)
    writer.add_add_bos_token(True)
    weights = _Weights(weight_type)

    def add(tensor: str, rows: int, cols: int, *, zero_rows: int = 0) -> None:
        data, raw = weights.matrix(rows, cols, zero_rows=zero_rows)
        writer.add_tensor(tensor, data, raw_dtype=raw)

    def norm(tensor: str) -> None:
        writer.add_tensor(tensor, np.ones(shape.dim, dtype=np.float32))

    add("token_embd.weight", shape.vocab, shape.dim, zero_rows=SPECIAL_TOKENS if tied else 0)
    for i in range(shape.layers):
        norm(f"blk.{i}.attn_norm.weight")
        add(f"blk.{i}.attn_q.weight", shape.dim, shape.dim)
        add(f"blk.{i}.attn_k.weight", shape.kv_dim, shape.dim)
        add(f"blk.{i}.attn_v.weight", shape.kv_dim, shape.dim)
        add(f"blk.{i}.attn_output.weight", shape.dim, shape.dim)
        norm(f"blk.{i}.ffn_norm.weight")
        add(f"blk.{i}.ffn_gate.weight", shape.ffn, shape.dim)
        add(f"blk.{i}.ffn_up.weight", shape.ffn, shape.dim)
        add(f"blk.{i}.ffn_down.weight", shape.dim, shape.ffn)
    norm("output_norm.weight")
    if not tied:
        add("output.weight", shape.vocab, shape.dim, zero_rows=SPECIAL_TOKENS)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


MATRIX_MIN_ELEMENTS: Final = 65536


def _tokenizer(writer: Any, vocab: int) -> None:
    filler = vocab - SPECIAL_TOKENS
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"▁w{i}" for i in range(filler)]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_types([2, 3, 3] + [6] * 256 + [1] * filler)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)


def clone_layer_elements(header: Any) -> dict[str, int]:
    """Matrix weights of one block of ``header``'s layout, by the type
    :func:`write_clone` gives them."""
    found: dict[str, int] = {}
    for tensor in header.tensors:
        if tensor.name.startswith("blk.0.") and tensor.n_elements >= MATRIX_MIN_ELEMENTS:
            kind = _clone_type(tensor.shape)
            found[kind] = found.get(kind, 0) + tensor.n_elements
    return found


def _clone_type(shape: tuple[int, ...]) -> str:
    return "Q8_0" if shape and shape[0] % 32 == 0 else "F16"


def write_clone(path: Path, header: Any, layers: int, *, vocab: int = 512) -> Path:
    """A model of ``header``'s layout (a :class:`~qmesh.daemon.gguf_scan.GgufHeader`)
    with ``layers`` copies of its first block, Q8_0 matrices (F16 where a
    row does not split into Q8_0 blocks), F32 vectors, and a ``vocab``-token
    vocabulary. Per-layer metadata arrays are cut to ``layers``."""
    import gguf
    import numpy as np

    meta = header.metadata
    arch = meta["general.architecture"]
    blocks = meta.get(f"{arch}.block_count")
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("qmesh layout probe (random weights)")
    writer.add_file_type(7)
    for key, value in meta.items():
        if not key.startswith(f"{arch}.") or key in (f"{arch}.block_count", f"{arch}.vocab_size"):
            continue
        kind, item = header.value_types[key]
        if kind == "ARRAY":
            if not isinstance(value, list):
                continue  # a long array: no arch keeps anything the block needs there
            if blocks and len(value) == blocks:
                value = value[:layers]
            writer.add_key_value(
                key, value, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType[item or "UINT32"]
            )
        else:
            writer.add_key_value(key, value, gguf.GGUFValueType[kind])
    writer.add_block_count(layers)
    if f"{arch}.vocab_size" in meta:
        writer.add_vocab_size(vocab)
    _tokenizer(writer, vocab)
    pools: dict[str, _Weights] = {}

    def matrix(name: str, shape: tuple[int, ...], *, zero_rows: int = 0) -> None:
        kind = _clone_type(shape)
        weights = pools.setdefault(kind, _Weights(kind))
        rows = 1
        for dim in shape[1:]:
            rows *= dim
        data, raw = weights.matrix(rows, shape[0], zero_rows=zero_rows)
        if len(shape) > 2:  # expert stacks and the like: ggml's order, reversed
            data = data.reshape(*reversed(shape[1:]), data.shape[-1])
        writer.add_tensor(name, data, raw_dtype=raw)

    def vector(name: str, shape: tuple[int, ...]) -> None:
        writer.add_tensor(name, np.ones(tuple(reversed(shape)), dtype=np.float32))

    for tensor in header.tensors:
        name, shape = tensor.name, tensor.shape
        if name.startswith("blk."):
            if not name.startswith("blk.0."):
                continue
            for i in range(layers):
                copy = f"blk.{i}.{name[len('blk.0.') :]}"
                if tensor.n_elements >= MATRIX_MIN_ELEMENTS and len(shape) >= 2:
                    matrix(copy, shape)
                else:
                    vector(copy, shape)
        elif name in ("token_embd.weight", "output.weight"):
            matrix(name, (shape[0], vocab), zero_rows=SPECIAL_TOKENS)
        elif tensor.n_elements < MATRIX_MIN_ELEMENTS or len(shape) < 2:
            vector(name, shape)
        else:
            matrix(name, shape)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
