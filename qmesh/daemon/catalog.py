"""The GGUF models on this node: what each file is, and which are equivalent.

For: :func:`describe_gguf` (one file → :class:`ModelInfo`: architecture,
family, parameter count and size class, quantization, context length, file
size, chat template, and the figures the planner needs — bytes per layer,
bytes read per generated token, KV-cache bytes per token) and
:class:`Catalog`, which scans the configured directories, remembers files by
(size, mtime) so a rescan only reads new or changed files, and reports what
changed.

Equivalence: two models are interchangeable for the Gate when their
:attr:`ModelInfo.equivalence` matches — the same family, size label and
fine-tune (base vs instruct), whatever their quantization. That is what lets
the router send work to "the same model" on another node.

Not for: loading or running models (:mod:`qmesh.daemon.runtimes`) or
choosing a quantization (:mod:`qmesh.daemon.quant`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import attrs

from qmesh.daemon.gguf_scan import GgufError, GgufHeader, SkippedArray, scan_gguf

__all__ = [
    "MODEL_CACHE_ENV",
    "SIZE_CLASSES",
    "Catalog",
    "CatalogError",
    "ModelInfo",
    "TypeRead",
    "describe_gguf",
    "model_cache",
    "quant_name",
    "serving_dirs",
    "size_class",
    "size_label",
]

log = logging.getLogger(__name__)

MODEL_CACHE_ENV: Final = "QMESH_MODEL_CACHE"
"""Where ``scripts/setup.sh`` puts the models it fetches, if not the default."""


def model_cache(environ: Mapping[str, str] = os.environ) -> Path:
    """The model cache that ``scripts/setup.sh`` fills (``~/.cache/qmesh/models``
    unless ``QMESH_MODEL_CACHE`` says otherwise), whether or not it exists."""
    configured = environ.get(MODEL_CACHE_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "qmesh" / "models"


def serving_dirs(
    model_dirs: Sequence[Path], environ: Mapping[str, str] = os.environ
) -> tuple[Path, ...]:
    """``model_dirs`` and, where it exists, the model cache: what the daemon
    of ``qmesh up`` serves, and where the model commands look up an id."""
    cache = model_cache(environ)
    if not cache.is_dir() or any(_same_dir(cache, d) for d in model_dirs):
        return tuple(model_dirs)
    return (*model_dirs, cache)


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


SIZE_CLASSES: Final = (
    ("xs", 1.0e9),
    ("s", 4.0e9),
    ("m", 15.0e9),
    ("l", 40.0e9),
    ("xl", float("inf")),
)
"""(class, parameter count below which it applies): xs < 1B ≤ s < 4B ≤ m <
15B ≤ l < 40B ≤ xl — the router's size tiers (``qmesh.qg.candidates``). The
bands follow how models are deployed: phones and CPUs, one consumer GPU,
one big GPU, several GPUs."""

# general.file_type values (llama.cpp's LLAMA_FTYPE_*), named like the files are.
_FILE_TYPES: Final = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
    10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S",
    15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS",
    20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S",
    25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M",
    30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0",
    38: "MXFP4_MOE",
}  # fmt: skip
_LAYER_RE: Final = re.compile(r"blk\.(\d+)\.")
KV_BYTES_PER_ELEMENT: Final = 2
"""llama.cpp's default KV cache type is f16."""
MATRIX_MIN_ELEMENTS: Final = 65536
"""Tensors smaller than this (norms, biases) are not counted as matrix reads."""


class CatalogError(Exception):
    """A model file cannot be catalogued (not GGUF, or missing what every model has)."""


@attrs.frozen
class TypeRead:
    """The weights of one ggml type that generating a token multiplies by:
    in the transformer blocks (all layers together) and outside them (the
    output head). What the speed model (:mod:`qmesh.daemon.speed`) prices."""

    type: str
    layer_elements: int
    layer_bytes: int
    other_elements: int = 0
    other_bytes: int = 0

    @classmethod
    def from_json(cls, data: Any) -> TypeRead:
        if isinstance(data, TypeRead):
            return data
        if isinstance(data, dict):
            return cls(**{f.name: data[f.name] for f in attrs.fields(cls) if f.name in data})
        return cls(*data)


def _type_reads(value: Any) -> tuple[TypeRead, ...]:
    return tuple(TypeRead.from_json(item) for item in value or ())


@attrs.frozen
class ModelInfo:
    id: str
    """The name requests use: the file name without ``.gguf``."""
    path: str
    runtime: str
    architecture: str
    family: str
    name: str
    size_label: str
    size_class: str
    finetune: str | None
    parameters: int
    quantization: str
    bits_per_weight: float
    context_length: int | None
    file_size: int
    chat_template: bool
    layers: int
    embedding_length: int | None
    weights_bytes: int
    """Bytes of all tensors (what loading costs, before the KV cache)."""
    layer_bytes: int
    """Average bytes of one transformer block (what offloading one layer moves)."""
    bytes_per_token: int
    """Bytes read to generate one token: every weight used, the embedding
    table only when it doubles as the output layer, the active experts only."""
    kv_bytes_per_token: int
    """f16 K and V for one token of context across all layers."""
    vocab_size: int | None = None
    layout: str | None = None
    """What a transformer block of this model is, whatever its quantization:
    the architecture, its block's tensors and shapes, its hyper-parameters
    (a digest). The node calibration times each layout it serves
    (:mod:`qmesh.daemon.calibrate`): Gemma 3's block costs llama.cpp more
    than a Llama block of the same matrices."""
    reads: tuple[TypeRead, ...] = attrs.field(default=(), converter=_type_reads)
    """:attr:`bytes_per_token` by ggml type, blocks and head apart (empty when
    the catalogue entry came from elsewhere, e.g. an older daemon)."""

    @property
    def equivalence(self) -> str:
        """Models with the same key can stand in for each other."""
        tune = f"-{self.finetune}" if self.finetune else ""
        return f"{self.family}:{self.size_label.lower()}{tune}"

    def to_json(self) -> dict[str, Any]:
        data = attrs.asdict(self)
        data["equivalence"] = self.equivalence
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelInfo:
        names = {f.name for f in attrs.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def size_class(parameters: int) -> str:
    for name, below in SIZE_CLASSES:
        if parameters < below:
            return name
    return SIZE_CLASSES[-1][0]


def size_label(parameters: int) -> str:
    """``268_098_176`` → ``"270M"``, ``7_241_732_096`` → ``"7B"`` (two significant digits)."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if parameters >= scale:
            value = float(f"{parameters / scale:.2g}")
            return f"{value:g}{unit}"
    return str(parameters)


def quant_name(file_type: int | None, tensors: Sequence[Any] = ()) -> str:
    """The quantization as files name it (``Q4_K_M``); from the tensors' most
    common type by bytes when the header has no known ``general.file_type``."""
    if file_type is not None and file_type in _FILE_TYPES:
        return _FILE_TYPES[file_type]
    weights: dict[str, int] = {}
    for tensor in tensors:
        weights[tensor.type_name] = weights.get(tensor.type_name, 0) + tensor.n_bytes
    return max(weights, key=lambda k: weights[k]) if weights else "unknown"


def _family(metadata: dict[str, Any], architecture: str) -> str:
    basename = metadata.get("general.basename")
    if isinstance(basename, str) and basename.strip():
        # "gemma-3" → "gemma3", "Meta-Llama-3.1" → "llama3.1": the model line, not the vendor.
        text = re.sub(r"^(meta|google|microsoft|mistralai|qwen)[-_ ]+(?=.)", "", basename.lower())
        return re.sub(r"[-_ ]+", "", text)
    return architecture


def describe_gguf(
    path: Path, *, runtime: str = "llama.cpp", header: GgufHeader | None = None
) -> ModelInfo:
    """Catalogue one file. Raises CatalogError (or OSError if it cannot be read)."""
    try:
        header = header or scan_gguf(path)
    except GgufError as exc:
        raise CatalogError(f"{path}: {exc}") from None
    meta = header.metadata
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise CatalogError(f"{path}: no general.architecture")

    def arch_int(key: str) -> int | None:
        value = meta.get(f"{arch}.{key}")
        if isinstance(value, list):  # per-layer values (some archs): take the largest
            value = max(value) if value else None
        return (
            int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
        )

    parameters = sum(t.n_elements for t in header.tensors)
    weights = sum(t.n_bytes for t in header.tensors)
    layer_totals: dict[int, int] = {}
    for tensor in header.tensors:
        match = _LAYER_RE.match(tensor.name)
        if match:
            index = int(match.group(1))
            layer_totals[index] = layer_totals.get(index, 0) + tensor.n_bytes
    layers = arch_int("block_count") or len(layer_totals)
    names = {t.name for t in header.tensors}
    experts, experts_used = arch_int("expert_count"), arch_int("expert_used_count")
    per_token = 0
    reads: dict[str, list[int]] = {}
    for tensor in header.tensors:
        if tensor.name == "token_embd.weight" and "output.weight" in names:
            continue  # an input embedding is a row lookup, not a full read
        share, elements = tensor.n_bytes, tensor.n_elements
        if "_exps." in tensor.name and experts and experts_used:
            share = share * experts_used // experts
            elements = elements * experts_used // experts
        per_token += share
        if elements < MATRIX_MIN_ELEMENTS:
            continue  # norms and biases: vectors, priced with the layer's fixed cost
        row = reads.setdefault(tensor.type_name, [0, 0, 0, 0])
        offset = 0 if _LAYER_RE.match(tensor.name) else 2
        row[offset] += elements
        row[offset + 1] += share
    head_count = arch_int("attention.head_count")
    kv_heads = arch_int("attention.head_count_kv") or head_count
    embedding = arch_int("embedding_length")
    head_dim = embedding // head_count if embedding and head_count else None
    key_length = arch_int("attention.key_length") or head_dim or 0
    value_length = arch_int("attention.value_length") or head_dim or 0
    kv_per_token = KV_BYTES_PER_ELEMENT * layers * (kv_heads or 0) * (key_length + value_length)

    vocab = arch_int("vocab_size")
    tokens = meta.get("tokenizer.ggml.tokens")
    if vocab is None and isinstance(tokens, SkippedArray | list):
        vocab = tokens.length if isinstance(tokens, SkippedArray) else len(tokens)
    label = meta.get("general.size_label")
    label = label if isinstance(label, str) and label else size_label(parameters)
    file_type = meta.get("general.file_type")
    chat_template = meta.get("tokenizer.chat_template")
    finetune = meta.get("general.finetune")
    display = meta.get("general.name")
    file_size = path.stat().st_size
    return ModelInfo(
        id=path.name.removesuffix(".gguf"),
        path=str(path),
        runtime=runtime,
        architecture=arch,
        family=_family(meta, arch),
        name=display if isinstance(display, str) and display else path.stem,
        size_label=label,
        size_class=size_class(parameters),
        finetune=finetune.lower() if isinstance(finetune, str) and finetune else None,
        parameters=parameters,
        quantization=quant_name(file_type if isinstance(file_type, int) else None, header.tensors),
        bits_per_weight=round(weights * 8 / parameters, 3) if parameters else 0.0,
        context_length=arch_int("context_length"),
        file_size=file_size,
        chat_template=isinstance(chat_template, str | SkippedArray) and bool(chat_template),
        layers=layers,
        embedding_length=embedding,
        weights_bytes=weights,
        layer_bytes=sum(layer_totals.values()) // len(layer_totals) if layer_totals else 0,
        bytes_per_token=per_token,
        kv_bytes_per_token=kv_per_token,
        vocab_size=vocab,
        layout=layout_of(header),
        reads=tuple(TypeRead(t, *row) for t, row in sorted(reads.items())),
    )


def layout_of(header: GgufHeader) -> str | None:
    """The digest of a file's block layout (:attr:`ModelInfo.layout`), or None
    for a file without transformer blocks."""
    arch = header.metadata.get("general.architecture")
    block = sorted((t.name[len("blk.0.") :], t.shape) for t in header.tensors
                   if t.name.startswith("blk.0."))  # fmt: skip
    if not isinstance(arch, str) or not block:
        return None
    skip = {f"{arch}.block_count", f"{arch}.context_length", f"{arch}.vocab_size"}
    hyper = sorted(
        (k, repr(v)) for k, v in header.metadata.items()
        if k.startswith(f"{arch}.") and k not in skip
    )  # fmt: skip
    text = repr((arch, block, hyper))
    return f"{arch}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


@attrs.frozen
class CatalogChange:
    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[str, ...]

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)


class Catalog:
    """The GGUF files under ``directories`` (searched recursively for ``*.gguf``).

    :meth:`scan` blocks (file reads): call it from a worker thread. Files
    that are not valid GGUF are logged once and left out; two files with the
    same id keep the first found (directories in order, then sorted paths).
    """

    def __init__(self, directories: Iterable[Path], *, runtime: str = "llama.cpp") -> None:
        self.directories = tuple(directories)
        self.runtime = runtime
        self.models: dict[str, ModelInfo] = {}
        self._seen: dict[Path, tuple[int, int, ModelInfo | None]] = {}

    def scan(self) -> CatalogChange:
        found: dict[str, ModelInfo] = {}
        seen: dict[Path, tuple[int, int, ModelInfo | None]] = {}
        for directory in self.directories:
            if not directory.is_dir():
                log.warning("model directory %s does not exist", directory)
                continue
            for path in sorted(directory.rglob("*.gguf")):
                try:
                    stat = path.stat()
                except OSError:
                    continue
                key = (stat.st_size, stat.st_mtime_ns)
                previous = self._seen.get(path)
                if previous is not None and previous[:2] == key:
                    info = previous[2]
                else:
                    info = self._describe(path)
                seen[path] = (*key, info)
                if info is None:
                    continue
                if info.id in found:
                    log.warning("%s: a model named %r was already found; skipped", path, info.id)
                    continue
                found[info.id] = info
        before = self.models
        change = CatalogChange(
            added=tuple(sorted(found.keys() - before.keys())),
            removed=tuple(sorted(before.keys() - found.keys())),
            changed=tuple(sorted(k for k in found.keys() & before.keys() if found[k] != before[k])),
        )
        self.models, self._seen = found, seen
        return change

    def _describe(self, path: Path) -> ModelInfo | None:
        try:
            return describe_gguf(path, runtime=self.runtime)
        except (CatalogError, OSError) as exc:
            log.warning("not cataloguing %s: %s", path, exc)
            return None
