"""The GGUF catalog: the real Gemma file, files written with the gguf
package's own writer, and what a rescan reports."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from daemonkit import gemma_path

from qmesh.daemon.catalog import Catalog, CatalogError, describe_gguf, size_class, size_label
from qmesh.daemon.gguf_scan import GgufError, scan_gguf

gguf = pytest.importorskip("gguf")
np = pytest.importorskip("numpy")


def write_gguf(
    path: Path,
    *,
    arch: str = "llama",
    basename: str = "Meta-Llama-3.1",
    finetune: str | None = "Instruct",
    template: str | None = "{{ messages }}",
    experts: tuple[int, int] | None = None,
    tied: bool = False,
) -> Path:
    """A tiny but well-formed model: 2 blocks, f16 weights, a 300-token vocabulary."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("Test Model")
    writer.add_basename(basename)
    if finetune:
        writer.add_finetune(finetune)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_context_length(8192)
    writer.add_embedding_length(64)
    writer.add_block_count(2)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    if template:
        writer.add_chat_template(template)
    if experts:
        writer.add_expert_count(experts[0])
        writer.add_expert_used_count(experts[1])
    writer.add_token_list([f"tok{i}" for i in range(300)])  # long enough to be skipped
    writer.add_tensor("token_embd.weight", np.zeros((300, 64), dtype=np.float16))
    for block in range(2):
        writer.add_tensor(f"blk.{block}.attn_q.weight", np.zeros((64, 64), dtype=np.float16))
        if experts:
            writer.add_tensor(
                f"blk.{block}.ffn_up_exps.weight", np.zeros((experts[0], 64, 64), dtype=np.float16)
            )
    if not tied:
        writer.add_tensor("output.weight", np.zeros((300, 64), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gemma_metadata() -> None:
    started = time.perf_counter()
    info = describe_gguf(gemma_path())
    elapsed = time.perf_counter() - started
    assert elapsed < 2.0, "the 262k-token vocabulary must be skipped, not parsed"
    assert info.id == "gemma-3-270m-q4_k_m"
    assert (info.architecture, info.family, info.name) == ("gemma3", "gemma3", "Gemma 3 270m")
    assert (info.size_label, info.size_class, info.finetune) == ("270M", "xs", None)
    assert info.parameters == 268_098_176
    assert info.quantization == "Q4_K_M"
    assert info.context_length == 32768
    assert info.file_size == 253_113_024
    assert info.chat_template is False  # the base model has none
    assert info.layers == 18 and info.embedding_length == 640
    assert info.equivalence == "gemma3:270m"
    # Gemma ties its output layer to the embedding table: every token reads it.
    assert info.bytes_per_token == info.weights_bytes
    # f16 K and V: 18 layers × 1 KV head × (256 + 256) × 2 bytes.
    assert info.kv_bytes_per_token == 18 * 1 * 512 * 2


def test_written_model_metadata(tmp_path: Path) -> None:
    info = describe_gguf(write_gguf(tmp_path / "tiny-llama-f16.gguf"))
    assert (info.family, info.size_label, info.finetune) == ("llama3.1", "47K", "instruct")
    assert info.quantization == "F16" and info.chat_template is True
    assert info.parameters == 300 * 64 * 2 + 2 * 64 * 64
    assert info.weights_bytes == info.parameters * 2
    assert info.layer_bytes == 64 * 64 * 2
    # Untied output: the embedding is a row lookup, not read in full per token.
    assert info.bytes_per_token == info.weights_bytes - 300 * 64 * 2
    assert info.equivalence == "llama3.1:47k-instruct"
    header = scan_gguf(tmp_path / "tiny-llama-f16.gguf")
    tokens = header.metadata["tokenizer.ggml.tokens"]
    assert (tokens.item_type, tokens.length) == ("STRING", 300)


def test_experts_count_only_the_active_ones(tmp_path: Path) -> None:
    info = describe_gguf(write_gguf(tmp_path / "moe.gguf", experts=(8, 2), tied=True))
    experts = 2 * 8 * 64 * 64 * 2
    assert info.weights_bytes == 300 * 64 * 2 + 2 * 64 * 64 * 2 + experts
    assert info.bytes_per_token == info.weights_bytes - experts + experts * 2 // 8


@pytest.mark.parametrize(
    ("parameters", "label", "klass"),
    [(268_098_176, "270M", "xs"), (1_240_000_000, "1.2B", "s"), (7_241_732_096, "7.2B", "m"),
     (32_500_000_000, "32B", "l"), (70_550_000_000, "71B", "xl")],
)  # fmt: skip
def test_size_labels_and_classes(parameters: int, label: str, klass: str) -> None:
    assert size_label(parameters) == label
    assert size_class(parameters) == klass


def test_not_gguf_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + os.urandom(100))
    with pytest.raises(CatalogError, match="bad magic"):
        describe_gguf(bad)
    truncated = tmp_path / "cut.gguf"
    whole = write_gguf(tmp_path / "whole.gguf").read_bytes()
    truncated.write_bytes(whole[:200])
    with pytest.raises(GgufError, match=r"truncated|past the end"):
        scan_gguf(truncated)


def test_rescan_reports_changes(tmp_path: Path) -> None:
    models = tmp_path / "models"
    (models / "sub").mkdir(parents=True)
    write_gguf(models / "a.gguf")
    (models / "junk.gguf").write_bytes(b"not a model")
    catalog = Catalog([models, tmp_path / "missing"])
    change = catalog.scan()
    assert change.added == ("a",) and set(catalog.models) == {"a"}
    assert not catalog.scan()  # nothing changed: nothing re-read either
    write_gguf(models / "sub" / "b.gguf", basename="gemma-3", finetune=None, template=None)
    (models / "a.gguf").unlink()
    change = catalog.scan()
    assert change.added == ("b",) and change.removed == ("a",)
    assert catalog.models["b"].family == "gemma3" and not catalog.models["b"].chat_template
