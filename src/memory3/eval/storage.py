"""`memory3 bench storage`: what one explicit memory costs on disk, per codec (§3.3, App. B).

One memory holds, for each memory layer, keys and values (2) of each kv head for the S kept tokens:
Lm × 2 × K × S vectors of head-dim D. A codec stores each such vector in some bytes:

- "none": bf16, 2·D bytes (the uncompressed store);
- "fp16" / "fp32": 2·D / 4·D bytes;
- "faiss:<factory string>": a FAISS vector codec; its `sa_code_size()` is the bytes per vector
  (the paper's `OPQ20_80,Residual2x14,PQ8x10` stores 80 values in 14 bytes);
- any other name: a codec of `memory3.memory.codec` (imported only then).

Compared with the full KV cache of the same reference (every layer, every kv head, all of its
tokens, bf16) and with the reference's text itself (UTF-8). The kept tokens' positions (int32, one
per layer, head and slot) are counted apart as `position_bytes`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from memory3.config import MemoryConfig, ModelConfig

log = logging.getLogger(__name__)

KIB = 1024
PAPER_CODEC = "faiss:OPQ20_80,Residual2x14,PQ8x10"
DEFAULT_CODECS = ("none", "fp32", PAPER_CODEC)


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


def position_bytes(model: ModelConfig, memory: MemoryConfig) -> int:
    """The kept tokens' positions as `Memories.positions` holds them (int32, Lm × K × S)."""
    return model.n_memory_layers * model.n_kv_head * memory.kept_tokens * 4


def full_kv_bytes(model: ModelConfig, tokens: int, bytes_per_value: int = 2, heads: int | None = None) -> int:
    """The KV cache of `tokens` tokens in every layer: 2 × L × heads × tokens × D values
    (heads: the model's kv heads by default; its query heads give the cache of a model without
    grouped-query attention, which is how the paper counts its 160×)."""
    heads = model.n_kv_head if heads is None else heads
    return 2 * model.n_layer * heads * tokens * model.head_dim * bytes_per_value


def codec_size(name: str, head_dim: int) -> CodecSize:
    """Bytes per head-dim vector for a codec name (see the module docstring)."""
    if name in ("none", "bf16"):
        return CodecSize(name, 2 * head_dim, "bf16, uncompressed")
    if name == "fp16":
        return CodecSize(name, 2 * head_dim, "float16, uncompressed")
    if name == "fp32":
        return CodecSize(name, 4 * head_dim, "float32, uncompressed")
    if name.startswith("faiss:"):
        import faiss

        spec = name.removeprefix("faiss:")
        try:
            index = faiss.index_factory(head_dim, spec)
        except RuntimeError as e:
            raise ValueError(
                f"codec {name!r}: FAISS cannot build {spec!r} for {head_dim}-d vectors ({e})"
            ) from e
        return CodecSize(name, float(index.sa_code_size()), f"FAISS {spec}")
    return _project_codec(name, head_dim)


def _project_codec(name: str, head_dim: int) -> CodecSize:
    """A codec from `memory3.memory.codec`, asked for its bytes per vector."""
    try:
        from memory3.memory import codec as codecs  # type: ignore[attr-defined]
    except ModuleNotFoundError as e:
        raise ValueError(
            f"unknown codec {name!r}: use none, fp16, fp32 or faiss:<factory string>"
            " (memory3.memory.codec is not installed)"
        ) from e
    make = getattr(codecs, "get_codec", None) or getattr(codecs, "make_codec", None)
    if make is None:
        raise ValueError(f"unknown codec {name!r}: memory3.memory.codec offers no get_codec()")
    c = make(name, head_dim)
    for attr in ("bytes_per_vector", "code_size", "code_bytes"):
        v = getattr(c, attr, None)
        if v is not None:
            return CodecSize(name, float(v() if callable(v) else v), type(c).__name__)
    raise ValueError(f"codec {name!r} does not report its bytes per vector")


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
