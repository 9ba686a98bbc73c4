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
from memory3.model import MemoryInput


def gather(mem: Memories, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Memories picked by `index` (G, J) into `mem` (-1 = no memory, an empty slot group).

    Returns k, v (Lm, G, K, J·S, D) and valid (G, J·S)."""
    M, Lm, K, S, D = mem.k.shape
    G, J = index.shape
    device = mem.k.device
    idx = torch.where(index < 0, M, index).to(device).reshape(-1)  # missing -> an all-zero row
    zeros = torch.zeros((1, Lm, K, S, D), dtype=mem.k.dtype, device=device)
    k = torch.cat((mem.k, zeros))[idx].view(G, J, Lm, K, S, D)
    v = torch.cat((mem.v, zeros.to(mem.v.dtype)))[idx].view(G, J, Lm, K, S, D)
    valid = torch.cat((mem.valid.to(device), torch.zeros(1, S, dtype=torch.bool, device=device)))[idx]
    k = k.permute(2, 0, 3, 1, 4, 5).reshape(Lm, G, K, J * S, D)
    v = v.permute(2, 0, 3, 1, 4, 5).reshape(Lm, G, K, J * S, D)
    return k, v, valid.view(G, J * S)


def chunked(mem: Memories, index: Tensor, chunk_of_token: Tensor) -> MemoryInput:
    """Chunk c of sequence b reads memories index[b, c] (B, C, J); chunk_of_token (B, T) gives
    each context position's chunk (-1: reads no memory, e.g. the prefix and padding).

    k, v: (Lm, B, K, C·J·S, D); visible (B, T, C·J·S) is block-diagonal over chunks."""
    B, C, J = index.shape
    k, v, valid = gather(mem, index.reshape(B * C, J))
    Lm, _, K, N, D = k.shape  # N = J·S slots per chunk
    k = k.view(Lm, B, C, K, N, D).transpose(2, 3).reshape(Lm, B, K, C * N, D)
    v = v.view(Lm, B, C, K, N, D).transpose(2, 3).reshape(Lm, B, K, C * N, D)
    slot_chunk = torch.arange(C, device=k.device).repeat_interleave(N)  # (C·N,)
    visible = (chunk_of_token.to(k.device)[:, :, None] == slot_chunk) & valid.view(B, 1, C * N)
    return MemoryInput(k, v, visible)
