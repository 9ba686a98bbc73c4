"""`MemoryCodec`: memories of one `MemoryShape` to fixed-size uint8 records and back (FAISS
quantizers, bf16, or a transform coder), with its directory on disk (save, load, fingerprint)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memory3.memory.codec.config import (
    CONFIG_FILE,
    DEFAULT_FACTORY,
    FORMAT_VERSION,
    TRANSFORM_FILE,
    CodecConfig,
    CodecError,
    MemoryShape,
)
from memory3.memory.transform import TransformCoder, TransformError
from memory3.memory.write import Memories, MemoryFormatError
from memory3.rope import RoPE

_UINT8_MAX_POSITION = 254  # uint8 stores position + 1; 0 is the empty slot


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

    def set_transform(self, coder: TransformCoder, meta: dict[str, Any]) -> None:
        """Install a fitted transform coder (`train_codec` fits one) and `meta`, how its bits were
        allocated (kept in `codec.json` and the fingerprint)."""
        if self.config.kind != "transform":
            raise CodecError(f"a {self.config.kind!r} codec takes no transform coder")
        self._tc = coder
        self.transform_meta = meta
        self._fingerprint = None

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
            rope = self._tc.rope.to_dict() if self._tc.rope.scaling else {"rope_theta": self._tc.rope.theta}
            d["transform"] = {**rope, **self.transform_meta}
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
                    (shape.layers, shape.kv_heads, shape.head_dim), RoPE.from_dict(info), tensors
                )
            except (SafetensorError, TransformError, KeyError, OSError) as e:
                raise CodecError(
                    f"{path}: the transform codec is damaged ({e}); restore the codec directory or rebuild"
                ) from None
            rope_keys = ("rope_theta", "rope_scaling", "max_position")
            codec.transform_meta = {k: v for k, v in info.items() if k not in rope_keys}
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
