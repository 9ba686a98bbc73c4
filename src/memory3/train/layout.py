"""Training batches laid out exactly as `memory3.generate` lays out inference (docs/design.md, "Reading memories"):

    [prefix <s>Reference: at positions 0..p-1] [text at positions p+R, p+R+1, …]

(R = reference_tokens). Every memory was written at positions p..p+R-1. The text is cut into
64-token chunks; chunk c reads the memory slots assigned to it, the prefix reads none (it is the
attention sink every head sees, as context). Sequences are right-padded; padding is masked as keys
and carries no loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from memory3.memory import layout
from memory3.memory.write import Memories
from memory3.model import MemoryInput


@dataclass
class Batch:
    ids: Tensor  # (B, T)
    pos: Tensor  # (B, T)
    valid: Tensor  # (B, T) real tokens
    targets: Tensor  # (B, T) next token where it is trained, else -100
    text_start: int  # index of the first text token (p with memory, 0 without)

    @property
    def n_tokens(self) -> int:
        return int(self.valid.sum())


def text_batch(
    seqs: Sequence[Sequence[int]],
    loss_from: Sequence[int] | None,
    prefix_ids: Sequence[int] | None,
    reference_tokens: int,
    pad_id: int,
) -> Batch:
    """Sequences of token ids (each predicting its own next tokens). `loss_from[b]`: first index
    of seqs[b] whose *prediction target* counts (answer-only loss); None = every target. With
    `prefix_ids` the memory layout is used, else plain positions from 0."""
    p = len(prefix_ids) if prefix_ids else 0
    first = layout.text_start(p, reference_tokens) if prefix_ids else 0
    B, n = len(seqs), max(len(s) for s in seqs)
    T = p + n
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    pos = torch.zeros(B, T, dtype=torch.long)
    valid = torch.zeros(B, T, dtype=torch.bool)
    targets = torch.full((B, T), -100, dtype=torch.long)
    for b, s in enumerate(seqs):
        L = len(s)
        if p:
            ids[b, :p] = torch.tensor(list(prefix_ids))  # type: ignore[arg-type]
            pos[b, :p] = torch.arange(p)
        ids[b, p : p + L] = torch.tensor(list(s))
        pos[b, p : p + L] = torch.arange(first, first + L)
        pos[b, p + L :] = first + L  # padding: any position, it is masked
        valid[b, : p + L] = True
        start = 1 if loss_from is None else max(1, loss_from[b])
        # the token at text index i is predicted by text index i-1
        targets[b, p + start - 1 : p + L - 1] = torch.tensor(list(s[start:L]))
    return Batch(ids, pos, valid, targets, p)


def shared_memory(mem: Memories, batch: Batch) -> MemoryInput:
    """Every text token of every sequence reads all memories of `mem` (one chunk's worth, as an
    SFT prompt of ≤ 64 tokens and its answer do at inference: the first decoded chunk keeps the
    last prompt chunk's memories). k, v: (Lm, B, K, M·S, D)."""
    M, Lm, K, S, D = mem.k.shape
    B, _T = batch.ids.shape
    k = mem.k.permute(1, 2, 0, 3, 4).reshape(Lm, 1, K, M * S, D).expand(Lm, B, K, M * S, D)
    v = mem.v.permute(1, 2, 0, 3, 4).reshape(Lm, 1, K, M * S, D).expand(Lm, B, K, M * S, D)
    text = batch.valid.clone()
    text[:, : batch.text_start] = False
    visible = text[:, :, None] & mem.valid.to(text.device).reshape(1, 1, M * S)
    return MemoryInput(k, v, visible)


def chunked_memory(mem: Memories, slots: Tensor, batch: Batch, chunk_tokens: int) -> MemoryInput:
    """Each 64-token chunk c of sequence b reads the memories slots[b, c] (indices into `mem`,
    -1 = none), e.g. its own reference and those of the previous 4 chunks (docs/design.md, "Training a model to read memory").

    slots: (B, C, J) long. k, v: (Lm, B, K, C·J·S, D); visible is block-diagonal over chunks.
    """
    T = batch.ids.shape[1]
    chunk = torch.full((T,), -1, dtype=torch.long, device=batch.valid.device)
    chunk[batch.text_start :] = torch.arange(T - batch.text_start, device=chunk.device) // chunk_tokens
    chunk = torch.where(batch.valid, chunk, -1)  # padding reads nothing
    return layout.chunked(mem, slots, chunk)
