"""Training a `MemoryCodec` (§3.3: on the key and value vectors of uniformly sampled references),
and the straight-through pass that trains a writer and reader with the codec in the loop."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
import torch

from memory3.memory.codec.config import CodecConfig, CodecError, MemoryShape
from memory3.memory.codec.memory_codec import MemoryCodec
from memory3.memory.transform import CodecCalibration, TransformCoder, TransformError, unrotate
from memory3.memory.write import Memories
from memory3.rope import RoPE

log = logging.getLogger(__name__)


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
    rope_theta: RoPE | float | None = None,
    calibration: CodecCalibration | None = None,
) -> MemoryCodec:
    """A codec trained on the key/value vectors of sampled memories (§3.3: codecs are trained on
    K/V vectors of uniformly sampled references). A transform codec needs the model's
    RoPE as `rope_theta` (it codes keys before RoPE: a θ, or the model's `config.rope` when it
    scales RoPE) and uses the model's `calibration` when given."""
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
    rope_theta: RoPE | float | None,
    calibration: CodecCalibration | None,
) -> MemoryCodec:
    config = codec.config
    if rope_theta is None:
        raise CodecError("a transform codec codes keys before RoPE: pass train_codec(..., rope_theta=...)")
    ks, vs = [], []
    for mem in batches:
        pre = unrotate(mem.k.detach().float().cpu(), mem.positions.cpu(), rope_theta)
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
        coder = TransformCoder.fit(k, v, config.bits, rope_theta, calibration, config.max_bits)
    except TransformError as e:
        raise CodecError(str(e)) from None
    meta = {
        "metric": "fisher" if calibration is not None else "mse",
        # what was measured, not how long it took: the same calibration gives the same codec
        "calibration": None
        if calibration is None
        else {k: v for k, v in calibration.meta.items() if k != "seconds"},
        "bits_per_vector": {
            p: coder.bits_per_slot(p) / (codec.shape.layers * codec.shape.kv_heads) for p in ("k", "v")
        },
    }
    codec.set_transform(coder, meta)
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
