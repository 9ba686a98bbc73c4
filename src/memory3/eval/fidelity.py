"""The fidelity of a memory codec: its size, how far decoded keys and values land from the exact
ones, and how much that changes what a memory layer's attention reads."""

from __future__ import annotations

from typing import Any

import torch

from memory3.memory.codec import MemoryCodec
from memory3.memory.write import Memories


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
