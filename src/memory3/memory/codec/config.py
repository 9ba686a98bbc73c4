"""What a memory codec is: its config (`CodecConfig`, as `memory3 build --codec` spells it), the
shape of the memories it codes (`MemoryShape`), its error, and the names of its files."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Literal

from memory3.errors import ConfigError
from memory3.memory.transform import MAX_BITS
from memory3.memory.write import Memories

FORMAT_VERSION = 1
CONFIG_FILE = "codec.json"
TRANSFORM_FILE = "transform.safetensors"


class CodecError(ConfigError):
    """A codec that is untrained, damaged, or does not fit the memories given to it."""


# The default quantizer: 8-bit scalar quantization of every dimension, each dimension's range
# trained per memory layer (FAISS "SQ8"): one byte per dimension, 2× smaller than bf16, for any
# head dim. Chosen by what it costs in answers (`benchmarks/bench_codec_qa.py`, held-out questions,
# memory mode, reader E): SQ8 changes none of 182 answers against bf16, while the
# paper-style vector quantizer Residual2x10,PQ8 (11× smaller) loses 13.6 points even with E trained
# through it. With the shipped reader J at its default 32 tokens (bfloat16 KV cache) SQ8 loses 2
# of 182 (1.1 points), SQ6 1.1 and SQ4 6.0; at 48 tokens SQ8 1.1, SQ6 1.6 and SQ4 5.5. Smaller codecs
# stay one `--codec` away for banks where bytes matter more.
DEFAULT_FACTORY = "SQ8"


@dataclass(frozen=True)
class CodecConfig:
    """How memory vectors are compressed.

    kind: "none" keeps bf16; "faiss" quantizes with `factory` (a `faiss.index_factory` string;
      "" = `DEFAULT_FACTORY`, resolved when the codec is built); "transform" codes with
      `memory3.memory.transform` at `bits` per vector on average (at most `max_bits` per
      coefficient), every memory layer and head with its own basis (per_layer is implied).
    per_layer: one key and one value quantizer per memory layer instead of one shared pair.
    train_vectors: key (and value) vectors sampled from the training memories, per quantizer.
    positions: "uint8" (positions 0..254) or "int16" (0..32767).
    seed: drives the sampling of training vectors (FAISS's own k-means seeds are fixed, so the
      same vectors give the same codec).
    """

    kind: Literal["none", "faiss", "transform"] = "faiss"
    factory: str = ""
    per_layer: bool = True
    train_vectors: int = 65536
    positions: Literal["uint8", "int16"] = "uint8"
    seed: int = 0
    bits: int = 96
    max_bits: int = 12

    def __post_init__(self) -> None:
        if self.kind not in ("none", "faiss", "transform"):
            raise ValueError(f"codec kind must be 'none', 'faiss' or 'transform', got {self.kind!r}")
        if self.kind != "faiss" and self.factory:
            raise ValueError(
                f"codec kind {self.kind!r} takes no factory, got {self.factory!r}: use kind='faiss'"
            )
        if self.kind == "transform":
            if not 1 <= self.max_bits <= MAX_BITS:
                raise ValueError(f"max_bits must be 1..{MAX_BITS}, got {self.max_bits}")
            if self.bits < 1:
                raise ValueError(f"a transform codec needs bits >= 1 per vector, got {self.bits}")
        if self.positions not in ("uint8", "int16"):
            raise ValueError(f"positions must be 'uint8' or 'int16', got {self.positions!r}")
        if self.train_vectors < 1:
            raise ValueError(f"train_vectors must be positive, got {self.train_vectors}")

    def to_dict(self) -> dict[str, Any]:
        """The fields; `bits` and `max_bits` only for a transform codec, so that the records and
        fingerprints of other codecs are what they were before the transform codec existed."""
        d = dataclasses.asdict(self)
        if self.kind != "transform":
            del d["bits"], d["max_bits"]
        return d

    @property
    def name(self) -> str:
        """As `memory3 build --codec` spells it: none, a FAISS factory string, or tc<bits>."""
        if self.kind == "transform":
            default = CodecConfig.__dataclass_fields__["max_bits"].default
            return f"tc{self.bits}" + ("" if self.max_bits == default else f"m{self.max_bits}")
        return "none" if self.kind == "none" else (self.factory or DEFAULT_FACTORY)

    @classmethod
    def parse(cls, spec: str) -> CodecConfig:
        """`none`, `default`, `tc<bits>` (e.g. tc96), `tc<bits>m<max bits>` (e.g. tc96m8: at most 8
        bits a coefficient) or a FAISS factory string (e.g. SQ8)."""
        if spec == "none":
            return cls(kind="none")
        if spec == "default":
            return cls(kind="faiss")
        tc = re.fullmatch(r"tc(\d+)(?:m(\d+))?", spec)
        if tc:
            extra = {} if tc[2] is None else {"max_bits": int(tc[2])}
            return cls(kind="transform", bits=int(tc[1]), **extra)
        return cls(kind="faiss", factory=spec)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CodecConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        if set(d) - known:
            raise ValueError(f"CodecConfig: unknown field(s) {sorted(set(d) - known)}")
        return cls(**d)


@dataclass(frozen=True)
class MemoryShape:
    """The shape of one memory: (layers Lm, kv heads K, slots S, head dim D)."""

    layers: int
    kv_heads: int
    slots: int
    head_dim: int

    def __post_init__(self) -> None:
        for name, value in dataclasses.asdict(self).items():
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"MemoryShape.{name} must be a positive int, got {value!r}")

    @property
    def vectors(self) -> int:
        """Key (or value) vectors per memory: Lm·K·S."""
        return self.layers * self.kv_heads * self.slots

    @property
    def dims(self) -> tuple[int, int, int, int]:
        return (self.layers, self.kv_heads, self.slots, self.head_dim)

    @classmethod
    def of(cls, mem: Memories) -> MemoryShape:
        return cls(*(int(n) for n in mem.k.shape[1:]))
