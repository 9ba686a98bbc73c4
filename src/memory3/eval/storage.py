"""`memory3 bench storage`: what one explicit memory costs on disk, per codec (§3.3, App. B).

One memory holds, for each memory layer, keys and values (2) of each kv head for the S kept tokens:
Lm × 2 × K × S vectors of head-dim D. A codec stores each such vector in some bytes:

- "none": bf16, 2·D bytes (the uncompressed store);
- "default": the memory bank's default FAISS codec (`memory3.memory.codec.DEFAULT_FACTORY`);
- "faiss:<factory string>": a FAISS vector codec; its `sa_code_size()` is the bytes per vector
  (the paper's `OPQ20_80,Residual2x14,PQ8x10` stores 80 values in 14 bytes);
- "tc<bits>": the transform codec (`memory3.memory.transform`), bits/8 bytes per vector on
  average over keys and values (its allocation spends the whole budget; a record rounds each
  part up to whole bytes);
- "fp16" / "fp32": 2·D / 4·D bytes (for comparison).

Compared with the full KV cache of the same reference (every layer, every kv head, all of its
tokens, bf16) and with the reference's text itself (UTF-8). The kept tokens' positions (one per
layer, head and slot; one byte each in the store when they fit) are counted apart as
`position_bytes`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from memory3.config import MemoryConfig, ModelConfig

KIB = 1024
PAPER_CODEC = "faiss:OPQ20_80,Residual2x14,PQ8x10"
DEFAULT_CODECS = ("none", "default", "tc96", PAPER_CODEC)


@dataclass(frozen=True)
class CodecSize:
    name: str
    bytes_per_vector: float  # bytes to store one head-dim vector (a key or a value of one token)
    note: str = ""


def memory_vectors(model: ModelConfig, memory: MemoryConfig) -> int:
    """Head-dim vectors in one memory: Lm × 2 (K and V) × kv heads × kept tokens."""
    return model.n_memory_layers * 2 * model.n_kv_head * memory.kept_tokens


def bytes_per_memory(model: ModelConfig, memory: MemoryConfig, bytes_per_vector: float) -> float:
    """Payload bytes of one memory (positions excluded)."""
    return memory_vectors(model, memory) * bytes_per_vector


def position_bytes(model: ModelConfig, memory: MemoryConfig, prefix_tokens: int = 8) -> int:
    """The kept tokens' positions as the store's codec records hold them: Lm × K × S positions,
    one byte each while prefix + reference fit in 0..254, else two."""
    per = 1 if prefix_tokens + memory.reference_tokens <= 254 else 2
    return model.n_memory_layers * model.n_kv_head * memory.kept_tokens * per


def full_kv_bytes(model: ModelConfig, tokens: int, bytes_per_value: int = 2, heads: int | None = None) -> int:
    """The KV cache of `tokens` tokens in every layer: 2 × L × heads × tokens × D values
    (heads: the model's kv heads by default; its query heads give the cache of a model without
    grouped-query attention, which is how the paper counts its 160×)."""
    heads = model.n_kv_head if heads is None else heads
    return 2 * model.n_layer * heads * tokens * model.head_dim * bytes_per_value


def codec_size(name: str, head_dim: int) -> CodecSize:
    """Bytes per head-dim vector for a codec name (see the module docstring). The memory bank's
    codecs are sized by `memory3.memory.codec.MemoryCodec` itself, so the table shows what the
    store writes."""
    if name == "fp16":
        return CodecSize(name, 2 * head_dim, "float16, uncompressed")
    if name == "fp32":
        return CodecSize(name, 4 * head_dim, "float32, uncompressed")
    from memory3.memory.codec import CodecConfig, MemoryCodec, MemoryShape

    parsed = CodecConfig.parse(name)
    if parsed.kind == "transform":
        bits = parsed.bits
        return CodecSize(name, bits / 8, f"transform codec, {bits} bits a vector, allocated by calibration")
    if name in ("none", "bf16"):
        config = CodecConfig(kind="none")
    elif name == "default":
        config = CodecConfig(kind="faiss")
    elif name.startswith("faiss:"):
        config = CodecConfig(kind="faiss", factory=name.removeprefix("faiss:"))
    else:
        raise ValueError(
            f"unknown codec {name!r}: use none, default, tc<bits>, fp16, fp32 or faiss:<factory string>"
        )
    codec = MemoryCodec(config, MemoryShape(1, 1, 1, head_dim))
    note = "bf16, uncompressed" if config.kind == "none" else f"FAISS {codec.config.factory}"
    return CodecSize(name, float(codec.code_bytes), note)


@dataclass(frozen=True)
class TextSample:
    """How much text a reference holds, measured on real references."""

    references: int
    tokens_per_reference: float
    utf8_bytes_per_reference: float

    @property
    def utf8_bytes_per_token(self) -> float:
        return self.utf8_bytes_per_reference / self.tokens_per_reference


def text_sample(texts: Sequence[str], tokenizer: Any, reference_tokens: int) -> TextSample:
    """Chunk texts into references (`memory.ingest.chunk_documents`) and measure them."""
    from memory3.memory.ingest import Document, chunk_documents

    docs = [Document(str(i), t) for i, t in enumerate(texts)]
    refs = list(chunk_documents(docs, tokenizer, reference_tokens))
    if not refs:
        raise ValueError("no references: give some text")
    return TextSample(
        len(refs),
        sum(len(r.token_ids) for r in refs) / len(refs),
        sum(len(r.text.encode("utf-8")) for r in refs) / len(refs),
    )


def storage_rows(
    model: ModelConfig,
    memory: MemoryConfig,
    codecs: Sequence[str] = DEFAULT_CODECS,
    text: TextSample | None = None,
) -> list[dict[str, Any]]:
    """One row per codec: bytes per memory, per reference token, and ratios against the full KV
    cache of a full reference (reference_tokens tokens) and against its text."""
    T = memory.reference_tokens
    kv = full_kv_bytes(model, T)
    kv_mha = full_kv_bytes(model, T, heads=model.n_head)
    rows = []
    for name in codecs:
        c = codec_size(name, model.head_dim)
        b = bytes_per_memory(model, memory, c.bytes_per_vector)
        row: dict[str, Any] = {
            "model": model.name,
            "codec": name,
            "bytes_per_vector": c.bytes_per_vector,
            "bytes_per_memory": b,
            "kib_per_memory": b / KIB,
            "bytes_per_reference_token": b / T,
            "position_bytes": position_bytes(model, memory),
            "full_kv_bytes": kv,
            "full_kv_over_memory": kv / b,
            "full_kv_query_heads_over_memory": kv_mha / b,
        }
        if text is not None:
            text_bytes = text.utf8_bytes_per_token * T
            row["text_bytes"] = text_bytes
            row["memory_over_text"] = b / text_bytes
        rows.append(row)
    return rows
