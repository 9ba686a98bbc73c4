"""Compression of explicit memories (§3.3, App. B): vector quantization of every key and value
head vector with FAISS, so that a memory takes a few KiB on disk instead of ~100 KiB of bf16.

A `MemoryCodec` turns a batch of `Memories` into fixed-size uint8 records and back:

    record = [ K codes (Lm·K·S × code_k) | V codes (Lm·K·S × code_v) | positions (Lm·K·S × 1 or 2) ]

in (layer, kv head, slot) order. Keys and values get separate quantizers, which can be shared by all
layers and heads (docs/design.md, "Writing a memory" [ours]) with `per_layer=False`; by default one pair per memory layer,
which measured clearly better at the same size. The paper used `OPQ20_80,Residual2x14,PQ8x10` for
head dim 80 (14 bytes per vector); its equivalent for head dim 64 is `Residual2x10,PQ8` (11 bytes).
The default is 8-bit scalar quantization (`DEFAULT_FACTORY`), chosen by what each costs in answers.
kind="none" stores bf16 as is (exact for bf16-representable values). kind="transform" is the
transform coder of `memory3.memory.transform` (`--codec tc96`: 96 bits per key or value vector on
average, 1/10 of bf16), with its bits allocated by the model's Fisher calibration when it has one.

Positions are stored as uint8 `position + 1` (0 = empty slot) by default: references are written
at positions p..p+127 behind a short prefix, so they fit in one byte; int16 is there for longer
prefixes or references.

A codec directory holds `codec.json` (config, shape, fingerprint) and one FAISS index file per
quantizer (`faiss.write_index`, no pickle), or `transform.safetensors` for a transform codec.
"""

from memory3.memory.codec.config import (
    CONFIG_FILE,
    DEFAULT_FACTORY,
    FORMAT_VERSION,
    TRANSFORM_FILE,
    CodecConfig,
    CodecError,
    MemoryShape,
)
from memory3.memory.codec.memory_codec import MemoryCodec, faiss_threads
from memory3.memory.codec.training import sample_vectors, straight_through, train_codec

__all__ = [
    "CONFIG_FILE",
    "DEFAULT_FACTORY",
    "FORMAT_VERSION",
    "TRANSFORM_FILE",
    "CodecConfig",
    "CodecError",
    "MemoryCodec",
    "MemoryShape",
    "faiss_threads",
    "sample_vectors",
    "straight_through",
    "train_codec",
]
