"""Compression of explicit memories (§3.3, App. B): vector quantization of every key and value
head vector with FAISS, so that a memory takes a few KiB on disk instead of ~100 KiB of bf16.

A `MemoryCodec` turns a batch of `Memories` into fixed-size uint8 records and back:

    record = [ K codes (Lm·K·S × code_k) | V codes (Lm·K·S × code_v) | positions (Lm·K·S × 1 or 2) ]

in (layer, kv head, slot) order. Keys and values get separate quantizers, which can be shared by all
layers and heads (SPEC §2 [ours]) with `per_layer=False`; by default one pair per memory layer,
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

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from memory3.errors import ConfigError
from memory3.memory.transform import MAX_BITS, CodecCalibration, TransformCoder, TransformError, rotate
from memory3.memory.write import Memories, MemoryFormatError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CONFIG_FILE = "codec.json"
TRANSFORM_FILE = "transform.safetensors"
_UINT8_MAX_POSITION = 254  # uint8 stores position + 1; 0 is the empty slot


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


@contextmanager
def faiss_threads(n: int | None) -> Iterator[None]:
    """Run FAISS with n OpenMP threads inside the block (None: leave it alone). Torch resets the
    shared OpenMP thread count behind FAISS's back, so a fixed count is set around each call; on
    a busy machine FAISS's spinning threads make small jobs many times slower than one thread."""
    if n is None:
        yield
        return
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _as_f32(x: np.ndarray | torch.Tensor, what: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    if not isinstance(x, np.ndarray) or not np.issubdtype(x.dtype, np.floating):
        raise CodecError(f"{what} must be a float array, got {type(x).__name__} {getattr(x, 'dtype', '')}")
    x = np.ascontiguousarray(x, dtype=np.float32)  # FAISS takes float32 only
    if not np.isfinite(x).all():
        raise CodecError(f"{what} holds NaN or inf values: cannot quantize them")
    return x


def _bf16_bytes(x: np.ndarray) -> np.ndarray:
    """(..., D) float32 -> (..., 2D) uint8, round-to-nearest bf16 (as torch does)."""
    t = torch.from_numpy(np.ascontiguousarray(x)).to(torch.bfloat16).view(torch.int16)
    return t.numpy().view(np.uint8).reshape(*x.shape[:-1], 2 * x.shape[-1])


def _sq8_affine(indexes: list[Any], dim: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-dimension decoding of trained `IndexScalarQuantizer`s of type QT_8bit (FAISS stores
    vmin then vdiff in `sq.trained`; a code c decodes to vmin + (c + 0.5) / 255 · vdiff)."""
    import faiss

    scales, offsets = [], []
    for index in indexes:
        inner = faiss.downcast_index(index)
        if not isinstance(inner, faiss.IndexScalarQuantizer) or not inner.is_trained:
            return None
        sq = inner.sq
        trained = faiss.vector_to_array(sq.trained)
        if sq.qtype != faiss.ScalarQuantizer.QT_8bit or sq.d != dim or trained.shape != (2 * dim,):
            return None
        vmin, vdiff = trained[:dim].astype(np.float32), trained[dim:].astype(np.float32)
        scales.append(vdiff / 255.0)
        offsets.append(vmin + 0.5 * vdiff / 255.0)
    return np.stack(scales).astype(np.float32), np.stack(offsets).astype(np.float32)


def _from_bf16_bytes(b: np.ndarray) -> np.ndarray:
    """(..., 2D) uint8 -> (..., D) float32."""
    raw = np.ascontiguousarray(b).view(np.int16)
    return torch.from_numpy(raw.copy()).view(torch.bfloat16).float().numpy()


class MemoryCodec:
    """Fixed-size uint8 records for memories of one `MemoryShape` (train, encode, decode, save, load)."""

    def __init__(self, config: CodecConfig, shape: MemoryShape, threads: int | None = None) -> None:
        self.threads = threads  # FAISS OpenMP threads for train/encode/decode (None: FAISS default)
        if config.kind == "faiss" and not config.factory:
            config = dataclasses.replace(config, factory=DEFAULT_FACTORY)
        self.config = config
        self.shape = shape
        self._k: list[Any] = []  # faiss indexes: one, or one per layer
        self._v: list[Any] = []
        self._fingerprint: str | None = None
        self._affine: dict[int, tuple[np.ndarray, np.ndarray] | None] = {}  # see _sq8_affine
        self._tc: TransformCoder | None = None
        self.transform_meta: dict[str, Any] = {}  # how a transform codec's bits were allocated
        if config.kind == "transform":
            self._code = 0  # known once trained: see record_bytes
        elif config.kind == "faiss":
            self._k, self._v = self._new_indexes(), self._new_indexes()
            try:
                self._code = int(self._k[0].sa_code_size())
            except RuntimeError:
                raise CodecError(
                    f"FAISS index {config.factory!r} cannot encode standalone vectors (no sa_encode): "
                    f"use a quantizer such as {DEFAULT_FACTORY!r}"
                ) from None
        else:
            self._code = 2 * shape.head_dim

    def _new_indexes(self) -> list[Any]:
        import faiss

        n = self.shape.layers if self.config.per_layer else 1
        try:
            indexes = [faiss.index_factory(self.shape.head_dim, self.config.factory) for _ in range(n)]
        except RuntimeError as e:
            raise CodecError(
                f"FAISS cannot build {self.config.factory!r} for head dim {self.shape.head_dim}: "
                f"{str(e).splitlines()[-1]}; give a faiss index_factory string such as "
                f"{DEFAULT_FACTORY!r}"
            ) from None
        for index in indexes:
            # The factory's "PQ" turns on polysemous training, which only helps Hamming-distance
            # search and costs 10x the training time; we only encode and decode.
            inner = faiss.downcast_index(index)
            if isinstance(inner, faiss.IndexPreTransform):
                inner = faiss.downcast_index(inner.index)
            if hasattr(inner, "do_polysemous_training"):
                inner.do_polysemous_training = False
        return indexes

    # --- sizes ------------------------------------------------------------------------------
    @property
    def code_bytes(self) -> float:
        """Bytes per key (or value) vector (a transform codec's mean over keys and values)."""
        if self.config.kind == "transform":
            return (self.record_bytes - self.shape.vectors * self.position_bytes) / (2 * self.shape.vectors)
        return self._code

    def _part_bytes(self, part: str) -> int:
        if self.config.kind == "transform":
            if self._tc is None:
                raise CodecError("a transform codec's record size is known once it is trained: train_codec")
            return self._tc.part_bytes(part, self.shape.slots)
        return self.shape.vectors * self._code

    @property
    def position_bytes(self) -> int:
        return 1 if self.config.positions == "uint8" else 2

    @property
    def record_bytes(self) -> int:
        """Bytes per memory: K codes, V codes and positions."""
        n = self.shape.vectors
        return self._part_bytes("k") + self._part_bytes("v") + n * self.position_bytes

    @property
    def raw_bytes(self) -> int:
        """Bytes per memory in bf16 (K and V) with int16 positions, for comparison."""
        n = self.shape.vectors
        return 2 * n * 2 * self.shape.head_dim + 2 * n

    @property
    def trained(self) -> bool:
        if self.config.kind == "transform":
            return self._tc is not None
        return all(ix.is_trained for ix in self._k + self._v)

    # --- training ---------------------------------------------------------------------------
    def train(self, k_vectors: np.ndarray, v_vectors: np.ndarray) -> MemoryCodec:
        """Train the key and value quantizers on float vectors: (N, D), or (Lm, N, D) with
        per_layer=True. Excluding empty (zero) slots is the caller's job (`train_codec` does it)."""
        if self.config.kind == "none":
            return self
        if self.config.kind == "transform":
            raise CodecError(
                "a transform codec is fitted on whole memories (keys are coded before RoPE, which "
                "needs their positions): use train_codec(memories, config, rope_theta=...)"
            )
        for name, x, indexes in (("k_vectors", k_vectors, self._k), ("v_vectors", v_vectors, self._v)):
            x = _as_f32(x, name)
            want = "(Lm, N, D)" if self.config.per_layer else "(N, D)"
            ndim = 3 if self.config.per_layer else 2
            if x.ndim != ndim or x.shape[-1] != self.shape.head_dim:
                raise CodecError(f"{name} must be {want} with D = {self.shape.head_dim}, got {x.shape}")
            per = x if self.config.per_layer else x[None]
            if per.shape[0] != len(indexes):
                raise CodecError(f"{name} has {per.shape[0]} layers, the codec {len(indexes)}")
            for index, xs in zip(indexes, per, strict=True):
                try:
                    with faiss_threads(self.threads):
                        index.train(np.ascontiguousarray(xs))
                except RuntimeError as e:
                    raise CodecError(
                        f"training {self.config.factory!r} on {len(xs)} vectors failed: "
                        f"{str(e).splitlines()[-1]}; give more training vectors or a smaller codebook"
                    ) from None
        self._fingerprint = None
        self._affine.clear()
        return self

    # --- records ----------------------------------------------------------------------------
    def _check_trained(self) -> None:
        if not self.trained:
            raise CodecError("the codec is not trained: call train() or train_codec() first")

    def _encode_vectors(self, indexes: list[Any], x: np.ndarray) -> np.ndarray:
        """(M, Lm, K, S, D) float32 -> (M, Lm·K·S·code) uint8."""
        M, D = x.shape[0], x.shape[-1]
        if self.config.kind == "none":
            return _bf16_bytes(x).reshape(M, -1)
        if len(indexes) == 1:
            return indexes[0].sa_encode(x.reshape(-1, D)).reshape(M, -1)
        parts = [ix.sa_encode(np.ascontiguousarray(x[:, i]).reshape(-1, D)) for i, ix in enumerate(indexes)]
        return np.concatenate([p.reshape(M, -1) for p in parts], axis=1)

    def _sq8_affine(self, indexes: list[Any]) -> tuple[np.ndarray, np.ndarray] | None:
        """(scale, offset), each (len(indexes), D), when every index is FAISS's 8-bit scalar
        quantizer (the default codec): decoding is then `code · scale + offset` per dimension,
        which torch does for a whole batch at once in one fused multiply-add (2.4x numpy's three
        passes here, which were about twice as fast as one `sa_decode` per layer). None for any
        other codec."""
        key = id(indexes)
        if key not in self._affine:
            self._affine[key] = _sq8_affine(indexes, self.shape.head_dim)
        return self._affine[key]

    def _decode_vectors(self, indexes: list[Any], codes: np.ndarray) -> np.ndarray:
        """(M, Lm·K·S·code) uint8 -> (M, Lm, K, S, D) float32."""
        M = codes.shape[0]
        full = (M, *self.shape.dims)
        if self.config.kind == "none":
            return _from_bf16_bytes(codes.reshape(M, self.shape.vectors, self._code)).reshape(full)
        affine = self._sq8_affine(indexes)
        if affine is not None:
            scale, offset = (torch.from_numpy(a)[None, :, None, :] for a in affine)
            # The codes as they lie in the records (rows may be strided views of a read buffer):
            # no copy, and addcmul reads the uint8 codes directly, without a float temporary.
            # torch takes neither negative strides nor read-only memory: those are copied.
            if not codes.flags.writeable or any(st < 0 for st in codes.strides):
                codes = np.array(codes)
            c = torch.from_numpy(codes).reshape(M, len(indexes), -1, self._code)
            return torch.addcmul(offset, c, scale).numpy().reshape(full)  # (M, n, vectors, D)
        if len(indexes) == 1:
            return indexes[0].sa_decode(np.ascontiguousarray(codes).reshape(-1, self._code)).reshape(full)
        per = codes.reshape(M, len(indexes), -1, self._code)
        layers = [
            ix.sa_decode(np.ascontiguousarray(per[:, i]).reshape(-1, self._code))
            for i, ix in enumerate(indexes)
        ]
        return np.stack([y.reshape(M, *self.shape.dims[1:]) for y in layers], axis=1)

    def encode(self, mem: Memories) -> np.ndarray:
        """(M, record_bytes) uint8 records for a batch of memories."""
        self._check_trained()
        if not isinstance(mem, Memories):
            raise TypeError(f"encode takes Memories, got {type(mem).__name__}")
        if tuple(mem.k.shape[1:]) != self.shape.dims:
            raise MemoryFormatError(
                f"memories of shape (Lm, K, S, D) = {tuple(mem.k.shape[1:])} do not fit this codec, "
                f"trained for {self.shape.dims}: train a codec for this model and memory config"
            )
        pos = mem.positions.detach().cpu().numpy()
        if not np.issubdtype(pos.dtype, np.integer):
            raise MemoryFormatError(f"memory positions must be integers, got {pos.dtype}")
        high = _UINT8_MAX_POSITION if self.config.positions == "uint8" else np.iinfo(np.int16).max
        if pos.size and (pos.min() < -1 or pos.max() > high):
            raise CodecError(
                f"memory positions span {pos.min()}..{pos.max()}; positions={self.config.positions!r} "
                f"stores -1..{high}: use CodecConfig(positions='int16')"
            )
        M = len(mem)
        if self.config.positions == "uint8":
            pos_bytes = (pos + 1).astype(np.uint8).reshape(M, -1)
        else:
            pos_bytes = pos.astype("<i2").view(np.uint8).reshape(M, -1)
        k = _as_f32(mem.k, "memory keys")
        v = _as_f32(mem.v, "memory values")
        if self._tc is not None:
            positions = mem.positions.detach().cpu()
            k_codes = self._tc.encode("k", torch.from_numpy(k), positions)
            v_codes = self._tc.encode("v", torch.from_numpy(v), positions)
        else:
            with faiss_threads(self.threads):
                k_codes, v_codes = self._encode_vectors(self._k, k), self._encode_vectors(self._v, v)
        out = np.concatenate([k_codes, v_codes, pos_bytes], axis=1)
        assert out.shape == (M, self.record_bytes), (out.shape, self.record_bytes)
        return out

    def decode(
        self, records: np.ndarray | bytes, fingerprint: str = "", dtype: torch.dtype = torch.float32
    ) -> Memories:
        """Memories (on the CPU) from (M, record_bytes) uint8 records; empty slots come back as
        zeros with position -1. `fingerprint` is that of the model that wrote the memories (the
        store keeps it in its manifest)."""
        self._check_trained()
        if isinstance(records, (bytes, bytearray, memoryview)):
            records = np.frombuffer(records, dtype=np.uint8)
        if not isinstance(records, np.ndarray) or records.dtype != np.uint8:
            raise CodecError(
                f"records must be a uint8 array, got {type(records).__name__} {getattr(records, 'dtype', '')}"
            )
        if records.ndim == 1 and records.size % self.record_bytes == 0:
            records = records.reshape(-1, self.record_bytes)
        if records.ndim != 2 or records.shape[1] != self.record_bytes:
            raise CodecError(
                f"records must be (M, {self.record_bytes}) uint8 for this codec, got {records.shape}"
            )
        M = records.shape[0]
        kb, vb = self._part_bytes("k"), self._part_bytes("v")
        raw_pos = np.ascontiguousarray(records[:, kb + vb :])
        if self.config.positions == "uint8":
            pos = raw_pos.astype(np.int32) - 1
        else:
            pos = raw_pos.view("<i2").astype(np.int32)
        pos = pos.reshape(M, *self.shape.dims[:3])
        if self._tc is not None:
            positions = torch.from_numpy(pos)
            k = self._tc.decode("k", records[:, :kb], positions).numpy()
            v = self._tc.decode("v", records[:, kb : kb + vb], positions).numpy()
        else:
            with faiss_threads(self.threads):
                k = self._decode_vectors(self._k, records[:, :kb])
                v = self._decode_vectors(self._v, records[:, kb : kb + vb])
        empty = pos < 0
        if empty.any():
            k[empty], v[empty] = 0.0, 0.0  # as the writer leaves them
        return Memories(
            torch.from_numpy(k).to(dtype), torch.from_numpy(v).to(dtype), torch.from_numpy(pos), fingerprint
        )

    # --- identity and files -----------------------------------------------------------------
    def _index_bytes(self) -> list[bytes]:
        if self._tc is not None:
            state = self._tc.state()
            return [name.encode() + state[name].numpy().tobytes() for name in sorted(state)]
        import faiss

        return [faiss.serialize_index(ix).tobytes() for ix in self._k + self._v]

    @property
    def fingerprint(self) -> str:
        """Hash of the config, the shape and the trained quantizers: two codecs with the same
        fingerprint produce the same records."""
        if self._fingerprint is None:
            self._check_trained()
            h = hashlib.sha256(json.dumps(self._describe(), sort_keys=True).encode())
            for b in self._index_bytes():
                h.update(hashlib.sha256(b).digest())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def _describe(self) -> dict[str, Any]:
        d = {
            "format": FORMAT_VERSION,
            "config": self.config.to_dict(),
            "shape": dataclasses.asdict(self.shape),
            "record_bytes": self.record_bytes,
        }
        if self._tc is not None:
            d["transform"] = {"rope_theta": self._tc.rope_theta, **self.transform_meta}
        return d

    def _files(self) -> list[str]:
        if self.config.kind == "none":
            return []
        if self.config.kind == "transform":
            return [TRANSFORM_FILE]
        if not self.config.per_layer:
            return ["k.faiss", "v.faiss"]
        n = self.shape.layers
        return [f"k.{i:03d}.faiss" for i in range(n)] + [f"v.{i:03d}.faiss" for i in range(n)]

    def save(self, path: str | Path) -> Path:
        """Write the codec directory; `codec.json` goes last (atomically), so a directory with a
        `codec.json` is complete."""
        import faiss

        self._check_trained()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if self._tc is not None:
            from safetensors.torch import save_file

            save_file(self._tc.state(), str(path / TRANSFORM_FILE))
        else:
            for name, ix in zip(self._files(), self._k + self._v, strict=True):
                faiss.write_index(ix, str(path / name))
        meta = {**self._describe(), "files": self._files(), "fingerprint": self.fingerprint}
        tmp = path / (CONFIG_FILE + ".tmp")
        tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path / CONFIG_FILE)
        return path

    @classmethod
    def load(cls, path: str | Path, threads: int | None = None) -> MemoryCodec:
        """Read a codec directory and check that its files still give the saved fingerprint."""
        import faiss

        path = Path(path)
        meta_file = path / CONFIG_FILE
        if not meta_file.is_file():
            raise FileNotFoundError(f"{meta_file}: no codec here (save one with MemoryCodec.save)")
        meta = json.loads(meta_file.read_text())
        if meta.get("format") != FORMAT_VERSION:
            raise CodecError(
                f"{meta_file}: codec format {meta.get('format')!r}, this version reads {FORMAT_VERSION}"
            )
        codec = cls(CodecConfig.from_dict(meta["config"]), MemoryShape(**meta["shape"]), threads)
        if meta["files"] != codec._files():
            raise CodecError(f"{meta_file}: lists files {meta['files']}, expected {codec._files()}")
        for name in meta["files"]:
            if not (path / name).is_file():
                raise CodecError(f"{path / name}: codec file missing")
        if codec.config.kind == "transform":
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            info = meta.get("transform") or {}
            try:
                tensors = load_file(str(path / TRANSFORM_FILE))
                shape = codec.shape
                codec._tc = TransformCoder(
                    (shape.layers, shape.kv_heads, shape.head_dim), float(info["rope_theta"]), tensors
                )
            except (SafetensorError, TransformError, KeyError, OSError) as e:
                raise CodecError(
                    f"{path}: the transform codec is damaged ({e}); restore the codec directory or rebuild"
                ) from None
            codec.transform_meta = {k: v for k, v in info.items() if k != "rope_theta"}
        else:
            indexes = [faiss.read_index(str(path / name)) for name in meta["files"]]
            half = len(indexes) // 2
            codec._k, codec._v = indexes[:half], indexes[half:]
        codec._affine.clear()
        if codec.record_bytes != meta["record_bytes"] or codec.fingerprint != meta["fingerprint"]:
            raise CodecError(
                f"{path}: codec files give fingerprint {codec.fingerprint} and {codec.record_bytes}-byte "
                f"records, codec.json says {meta['fingerprint']} and {meta['record_bytes']}: the files "
                "were changed or damaged; restore them or retrain the codec"
            )
        return codec

    def __repr__(self) -> str:
        if self.config.kind == "transform":
            metric = self.transform_meta.get("metric", "untrained")
            size = f"{self.record_bytes} B/memory" if self.trained else "untrained"
            return f"MemoryCodec({self.config.name}, {metric}, {self.shape.dims}, {size})"
        kind = self.config.factory if self.config.kind == "faiss" else "bf16"
        layers = ", per layer" if self.config.per_layer else ""
        return f"MemoryCodec({kind}{layers}, {self.shape.dims}, {self.record_bytes} B/memory)"


def sample_vectors(
    memories: Memories | Iterable[Memories], n: int, per_layer: bool = False, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Up to n key and n value vectors of real (non-empty) slots, sampled uniformly without
    replacement: (N, D) each, or (Lm, N, D) per layer."""
    batches = [memories] if isinstance(memories, Memories) else list(memories)
    if not batches:
        raise ValueError("no memories to sample codec training vectors from")
    ks, vs = [], []
    for mem in batches:
        valid = (mem.positions >= 0).permute(1, 0, 2, 3).reshape(mem.k.shape[1], -1)  # (Lm, M·K·S)
        k = mem.k.detach().float().cpu().transpose(0, 1).reshape(*valid.shape, -1)  # (Lm, M·K·S, D)
        v = mem.v.detach().float().cpu().transpose(0, 1).reshape(*valid.shape, -1)
        # Every layer keeps as many real tokens (the writer pads short references alike).
        ks.append(torch.stack([k[i][valid[i]] for i in range(len(valid))]))
        vs.append(torch.stack([v[i][valid[i]] for i in range(len(valid))]))
    k_all, v_all = torch.cat(ks, 1).numpy(), torch.cat(vs, 1).numpy()  # (Lm, N, D)
    rng = np.random.default_rng(seed)
    if per_layer:
        N = k_all.shape[1]
        idx = np.sort(rng.choice(N, size=min(n, N), replace=False))
        return k_all[:, idx], v_all[:, idx]
    D = k_all.shape[-1]
    k_flat, v_flat = k_all.reshape(-1, D), v_all.reshape(-1, D)
    idx = np.sort(rng.choice(len(k_flat), size=min(n, len(k_flat)), replace=False))
    return k_flat[idx], v_flat[idx]


def train_codec(
    memories: Memories | Iterable[Memories],
    config: CodecConfig,
    threads: int | None = None,
    rope_theta: float | None = None,
    calibration: CodecCalibration | None = None,
) -> MemoryCodec:
    """A codec trained on the key/value vectors of sampled memories (§3.3: codecs are trained on
    K/V vectors of uniformly sampled references). A transform codec needs the model's
    `rope_theta` (it codes keys before RoPE) and uses the model's `calibration` when given."""
    batches = [memories] if isinstance(memories, Memories) else list(memories)
    if not batches:
        raise ValueError("no memories to train the codec on")
    codec = MemoryCodec(config, MemoryShape.of(batches[0]), threads)
    if config.kind == "none":
        return codec
    if config.kind == "transform":
        return _train_transform(codec, batches, rope_theta, calibration)
    k, v = sample_vectors(batches, config.train_vectors, config.per_layer, config.seed)
    log.info(
        "training codec %s on %d key and value vectors", config.factory or codec.config.factory, k.shape[-2]
    )
    return codec.train(k, v)


def _train_transform(
    codec: MemoryCodec,
    batches: list[Memories],
    rope_theta: float | None,
    calibration: CodecCalibration | None,
) -> MemoryCodec:
    config = codec.config
    if rope_theta is None:
        raise CodecError("a transform codec codes keys before RoPE: pass train_codec(..., rope_theta=...)")
    ks, vs = [], []
    for mem in batches:
        pre = rotate(mem.k.detach().float().cpu(), mem.positions.cpu(), rope_theta, -1)
        valid = mem.positions.cpu() >= 0  # (M, Lm, K, S); every layer and head keeps as many
        Lm, K, D = pre.shape[1], pre.shape[2], pre.shape[-1]
        per_unit = valid.permute(1, 2, 0, 3).reshape(Lm, K, -1)
        n = int(per_unit[0, 0].sum())
        ks.append(pre.permute(1, 2, 0, 3, 4).reshape(Lm, K, -1, D)[per_unit].reshape(Lm, K, n, D))
        vs.append(
            mem.v.detach()
            .float()
            .cpu()
            .permute(1, 2, 0, 3, 4)
            .reshape(Lm, K, -1, D)[per_unit]
            .reshape(Lm, K, n, D)
        )
    k, v = torch.cat(ks, 2), torch.cat(vs, 2)
    if k.shape[2] > config.train_vectors:
        pick = torch.from_numpy(
            np.sort(
                np.random.default_rng(config.seed).choice(k.shape[2], config.train_vectors, replace=False)
            )
        )
        k, v = k[:, :, pick], v[:, :, pick]
    log.info(
        "fitting transform codec %s on %d key and value vectors per layer and head (%s)",
        config.name,
        k.shape[2],
        "Fisher calibration" if calibration is not None else "no calibration: mean squared error",
    )
    try:
        codec._tc = TransformCoder.fit(k, v, config.bits, rope_theta, calibration, config.max_bits)
    except TransformError as e:
        raise CodecError(str(e)) from None
    codec.transform_meta = {
        "metric": "fisher" if calibration is not None else "mse",
        # what was measured, not how long it took: the same calibration gives the same codec
        "calibration": None
        if calibration is None
        else {k: v for k, v in calibration.meta.items() if k != "seconds"},
        "bits_per_vector": {
            p: codec._tc.bits_per_slot(p) / (codec.shape.layers * codec.shape.kv_heads) for p in ("k", "v")
        },
    }
    codec._fingerprint = None
    return codec


def straight_through(mem: Memories, codec: MemoryCodec) -> Memories:
    """The memories as a bank built with `codec` returns them, for training with the codec in the
    loop: the forward pass reads the decoded keys and values, and gradients reach the exact ones
    unchanged (straight-through estimator), so the writer and the reader learn to live with the
    quantization error."""
    dec = codec.decode(codec.encode(mem), mem.fingerprint).to(device=mem.k.device, dtype=mem.k.dtype)
    k = mem.k + (dec.k - mem.k).detach()
    v = mem.v + (dec.v - mem.v).detach()
    return Memories(k, v, mem.positions, mem.fingerprint)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """softmax(q·kᵀ/√D) v over memory slots. q (G, Q, D), k/v (G, N, D), valid (G, N) -> (G, Q, D)."""
    logits = torch.einsum("gqd,gnd->gqn", q, k) / k.shape[-1] ** 0.5
    logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
    return torch.softmax(logits, -1) @ v


def codec_report(
    mem: Memories,
    codec: MemoryCodec,
    group: int = 5,
    queries: torch.Tensor | int = 8,
    seed: int = 0,
) -> dict[str, Any]:
    """How much a codec costs and how much it changes what a memory layer reads.

    Returns bytes per memory (and bf16 bytes), the relative reconstruction error ‖x̂−x‖/‖x‖ of
    keys and values over real slots, and the relative error of a memory-layer attention output
    when decoded memories replace exact ones: for each layer and kv head, queries attend with one
    softmax over the slots of `group` memories (§3.1: a chunk reads 5 memories), nothing else.
    `queries` is either a count of random queries per group (Gaussian with the per-dimension
    mean and spread of that head's keys) or real post-RoPE queries (Lm, K, Q, D) grouped by the
    kv head they read. For scale, `attn_rel_error_other_memories` is the error of reading the
    wrong memories (the next group's) exactly; `_k_only`/`_v_only` decode only keys or values.
    """
    if len(mem) < 2 * group:
        raise ValueError(f"codec_report needs at least 2 × group = {2 * group} memories, got {len(mem)}")
    exact = mem.to(dtype=torch.float32)
    got = codec.decode(codec.encode(mem), mem.fingerprint)
    valid = exact.positions >= 0  # (M, Lm, K, S)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b)[valid].norm() / b[valid].norm())

    G = len(mem) // group
    Lm, K, S, D = codec.shape.dims

    def grouped(x: torch.Tensor) -> torch.Tensor:  # (M, Lm, K, S, ...) -> (Lm·K·G, group·S, ...)
        x = x[: G * group].reshape(G, group, Lm, K, S, *x.shape[4:])
        x = x.permute(2, 3, 0, 1, 4, *range(5, x.ndim))
        return x.reshape(Lm * K * G, group * S, *x.shape[5:])

    if isinstance(queries, int):
        # Queries with the mean and spread of each (layer, head)'s real keys.
        w = valid.float().sum(dim=(0, 3))[..., None].clamp(min=1)  # (Lm, K, 1)
        mean = (exact.k * valid[..., None]).sum(dim=(0, 3)) / w  # (Lm, K, D)
        std = (((exact.k - mean[None, :, :, None]) ** 2 * valid[..., None]).sum(dim=(0, 3)) / w).sqrt()
        gen = torch.Generator().manual_seed(seed)
        q = torch.randn(Lm, K, G, queries, D, generator=gen) * std[:, :, None, None] + mean[:, :, None, None]
    else:
        if queries.ndim != 4 or tuple(queries.shape[:2]) != (Lm, K) or queries.shape[-1] != D:
            raise ValueError(
                f"queries must be (Lm, K, Q, D) = ({Lm}, {K}, Q, {D}), got {tuple(queries.shape)}"
            )
        q = queries.float()[:, :, None].expand(Lm, K, G, *queries.shape[2:])
    q = q.reshape(Lm * K * G, -1, D)
    gk, gv, gvalid = grouped(exact.k), grouped(exact.v), grouped(valid)
    hk, hv = grouped(got.k), grouped(got.v)
    out = _attention(q, gk, gv, gvalid)

    def err(o: torch.Tensor) -> float:
        return float((o - out).norm() / out.norm())

    decoded = _attention(q, hk, hv, gvalid)
    per_layer = (decoded - out).view(Lm, -1).norm(dim=1) / out.view(Lm, -1).norm(dim=1)
    other = [t.view(Lm * K, G, *t.shape[1:]).roll(1, dims=1).view_as(t) for t in (gk, gv, gvalid)]
    return {
        "codec": repr(codec),
        "bytes_per_memory": codec.record_bytes,
        "bf16_bytes_per_memory": codec.raw_bytes,
        "compression": codec.raw_bytes / codec.record_bytes,
        "k_rel_error": rel(got.k, exact.k),
        "v_rel_error": rel(got.v, exact.v),
        "attn_rel_error": err(decoded),
        "attn_rel_error_k_only": err(_attention(q, hk, gv, gvalid)),
        "attn_rel_error_v_only": err(_attention(q, gk, hv, gvalid)),
        "attn_rel_error_other_memories": err(_attention(q, *other)),
        "attn_rel_error_per_layer": [round(float(e), 4) for e in per_layer],
    }
