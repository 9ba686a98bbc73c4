"""Where memories go in a forward pass: the one place that turns retrieved `Memories` into the
`MemoryInput` the model reads (§3.1–3.2). Used by generation, training and evaluation alike, so
that all three read memory exactly the same way.

A sequence's context is cut into chunks; chunk c reads J memories (J·S key slots). All chunks of
all sequences go into one tensor and a boolean mask says which query reads which slot.
"""

from __future__ import annotations

import torch
from torch import Tensor

from memory3.memory.write import Memories
from memory3.model import KVCache, MemoryInput


def text_start(prefix_len: int, reference_tokens: int) -> int:
    """Position of a text's first token in the memory layout: after the reference prefix
    (positions 0..p-1) and the interval p..p+R-1 at which every memory was written (§3.2), so
    that all memories sit before the text whatever reference they came from."""
    return prefix_len + reference_tokens


def _place(mem: Memories, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """index (B, C, J) into `mem` (-1 = no memory) -> k, v (Lm, B, K, C·J·S, D) and valid
    (B, C·J·S): memory index[b, c, j] in slots (c·J + j)·S … +S of row b.

    Each memory is copied once, straight into its slots (no intermediate gathered tensor and
    no permuted copy: at batch 32 that is hundreds of MB less traffic per prefill). The copies
    are differentiable, so training reads memories through the same code."""
    _, Lm, K, S, D = mem.k.shape
    B, C, J = index.shape
    device = mem.k.device
    k = mem.k.new_empty(Lm, B, K, C * J * S, D)
    v = mem.v.new_empty(Lm, B, K, C * J * S, D)
    valid = torch.zeros(B, C * J * S, dtype=torch.bool, device=device)
    mvalid = mem.valid.to(device)
    for b, row in enumerate(index.reshape(B, C * J).tolist()):
        for slot, m in enumerate(row):
            at = slice(slot * S, (slot + 1) * S)
            if m < 0:  # an empty slot group: zeros, never visible
                k[:, b, :, at] = 0
                v[:, b, :, at] = 0
            else:
                k[:, b, :, at] = mem.k[m]
                v[:, b, :, at] = mem.v[m]
                valid[b, at] = mvalid[m]
    return k, v, valid


def gather(mem: Memories, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Memories picked by `index` (G, J) into `mem` (-1 = no memory, an empty slot group).

    Returns k, v (Lm, G, K, J·S, D) and valid (G, J·S)."""
    G, J = index.shape
    return _place(mem, index.reshape(G, 1, J))


def into_cache(mem: Memories, index: Tensor, cache: KVCache) -> None:
    """`cache.set_memory(*gather(mem, index))` without the gathered tensor in between: memory
    index[g, j] (G, J; -1 = none) is copied straight into slots j·S … +S of row g of the cache's
    memory slots, one batched copy per memory layer. Slots of a -1 are not read (their contents
    are left as they are). At batch 32 this saves allocating and touching 88 MB per retrieval."""
    G, J = index.shape
    K, S, D = mem.k.shape[2:]
    present = (index >= 0).to(mem.k.device)
    valid = present.repeat_interleave(S, dim=1)  # (G, J·S)
    if mem.k.shape[0]:
        rows = index.clamp(min=0).reshape(-1).to(mem.k.device)
        valid &= mem.valid.to(mem.k.device)[rows].view(G, J * S)
        for j, (ks, vs) in enumerate(cache.memory_slots(J * S)):
            for dst, src in ((ks, mem.k), (vs, mem.v)):  # (G·J, K, S, D) → (G, K, J, S, D)
                picked = src[:, j].index_select(0, rows).view(G, J, K, S, D)
                dst.unflatten(2, (J, S)).copy_(picked.transpose(1, 2))
    cache.set_memory_valid(valid)


def chunked(mem: Memories, index: Tensor, chunk_of_token: Tensor) -> MemoryInput:
    """Chunk c of sequence b reads memories index[b, c] (B, C, J); chunk_of_token (B, T) gives
    each context position's chunk (-1: reads no memory, e.g. the prefix and padding).

    k, v: (Lm, B, K, C·J·S, D); visible (B, T, C·J·S) is block-diagonal over chunks."""
    _, C, J = index.shape
    k, v, valid = _place(mem, index)
    N = J * mem.k.shape[3]  # slots per chunk
    slot_chunk = torch.arange(C, device=k.device).repeat_interleave(N)  # (C·N,)
    visible = (chunk_of_token.to(k.device)[:, :, None] == slot_chunk) & valid[:, None, :]
    return MemoryInput(k, v, visible)
