"""Writing explicit memories (§3.1–3.3): encode each reference alone behind the reference prefix,
keep the K/V of the 8 tokens each memory head attends to most, after RoPE, with their positions.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from memory3.config import MemoryConfig, fingerprint
from memory3.errors import InputError
from memory3.model import Captured, Memory3Model


class MemoryFormatError(InputError):
    """Memories that do not fit the model or configuration reading them."""


@dataclass
class Memories:
    """A batch of M written memories.

    k, v: (M, Lm, K, S, D) post-RoPE keys and values of the kept tokens, sorted by position.
    positions: (M, Lm, K, S) int32 position each kept token had when written; -1 marks an empty
    slot (only when a reference has fewer than S tokens; then every head keeps the same tokens,
    so `valid` is one mask per memory).
    fingerprint: identifies the model weights and memory configuration that wrote them.
    """

    k: Tensor
    v: Tensor
    positions: Tensor
    fingerprint: str

    def __post_init__(self) -> None:
        if self.k.shape != self.v.shape or self.k.ndim != 5:
            raise MemoryFormatError(
                f"memory k and v must both be (M, Lm, K, S, D); got {tuple(self.k.shape)} and "
                f"{tuple(self.v.shape)}"
            )
        if self.positions.shape != self.k.shape[:4]:
            raise MemoryFormatError(
                f"memory positions must be (M, Lm, K, S) = {tuple(self.k.shape[:4])}, got "
                f"{tuple(self.positions.shape)}"
            )

    def __len__(self) -> int:
        return self.k.shape[0]

    @property
    def valid(self) -> Tensor:
        """(M, S) bool: slots holding a real token."""
        return self.positions[:, 0, 0] >= 0

    def __getitem__(self, idx: int | slice | Tensor | Sequence[int]) -> Memories:
        if isinstance(idx, int):
            idx = slice(idx, idx + 1)
        elif not isinstance(idx, slice):
            idx = torch.as_tensor(idx, dtype=torch.long)
        return Memories(self.k[idx], self.v[idx], self.positions[idx], self.fingerprint)

    @staticmethod
    def cat(items: Sequence[Memories]) -> Memories:
        if not items:
            raise ValueError("Memories.cat needs at least one batch of memories")
        fps = {m.fingerprint for m in items}
        if len(fps) > 1:
            raise MemoryFormatError(f"cannot mix memories written by different models: {fps}")
        return Memories(
            torch.cat([m.k for m in items]),
            torch.cat([m.v for m in items]),
            torch.cat([m.positions for m in items]),
            items[0].fingerprint,
        )

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Memories:
        return Memories(
            self.k.to(device=device, dtype=dtype),
            self.v.to(device=device, dtype=dtype),
            self.positions.to(device=device),
            self.fingerprint,
        )


def weights_digest(model: Memory3Model) -> str:
    """sha256 of every weight as float32, in name order (independent of the runtime dtype only
    for fp32 checkpoints; checkpoints store the digest of their own files instead)."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def model_fingerprint(model: Memory3Model) -> str:
    """Fingerprint of the model config and weights, cached on the module.
    `checkpoint.load_checkpoint` sets it from the digest stored with the checkpoint."""
    fp = getattr(model, "_memory3_fingerprint", None)
    if fp is None:
        fp = fingerprint(model.config, weights_digest(model))
        model._memory3_fingerprint = fp  # type: ignore[assignment]
    return fp


def reset_fingerprint(model: Memory3Model) -> None:
    """Call after changing weights (training) so that memories are checked against the new ones."""
    if hasattr(model, "_memory3_fingerprint"):
        del model._memory3_fingerprint


def memory_fingerprint(model: Memory3Model, config: MemoryConfig) -> str:
    fields = (config.prefix, config.reference_tokens, config.kept_tokens, config.selection, config.seed)
    return fingerprint(model_fingerprint(model), repr(fields))


def reference_prefix_ids(tokenizer: Any, bos_token_id: int, config: MemoryConfig) -> list[int]:
    """§3.1 the reference prefix `<s>Reference:` as token ids: BOS, then the prefix text."""
    return [bos_token_id, *tokenizer(config.prefix, add_special_tokens=False).input_ids]


def _grouped_logits(cap: Captured, valid: Tensor) -> Tensor:
    """Pre-RoPE q·k/√d within the reference, no causal mask, query heads grouped by kv head:
    (B, K, G, Ti, Tj), -inf for keys outside `valid`; invalid queries are left for the caller."""
    B, H, T, D = cap.q.shape
    K = cap.k_pre.shape[1]
    q = cap.q.float().view(B, K, H // K, T, D)
    logits = torch.einsum("bkgid,bkjd->bkgij", q, cap.k_pre.float()) / D**0.5
    return logits.masked_fill(~valid[:, None, None, None, :], float("-inf"))


def attention_scores(cap: Captured, valid: Tensor) -> Tensor:
    """§3.3 importance of each reference token for each kv head, as log Σ_i Σ_h exp(q_i·k_j/√d).

    Pre-RoPE q and k, no causal mask; queries and keys restricted to `valid` reference tokens
    (prefix and padding excluded); summed over the query heads that share the kv head.
    cap.q (B, H, T, D), cap.k_pre (B, K, T, D), valid (B, T) -> (B, K, T), -inf where not valid.
    """
    logits = _grouped_logits(cap, valid)
    logits = logits.masked_fill(~valid[:, None, None, :, None], float("-inf"))  # queries
    w = torch.logsumexp(logits.flatten(2, 3), dim=2)  # log-sum-exp over (heads in group, queries)
    return w.masked_fill(~valid[:, None, :], float("-inf"))


def attention_mean_scores(cap: Captured, valid: Tensor) -> Tensor:
    """Attention each token receives once every query's weights are normalised:
    Σ_i Σ_h softmax_j(q_i·k_j/√d), same queries, keys and masks as `attention_scores`. Unlike
    the paper's raw sum of exponentials, one query with large logits cannot decide alone."""
    p = torch.softmax(_grouped_logits(cap, valid), dim=-1)
    p = p.masked_fill(~valid[:, None, None, :, None], 0.0)  # drop invalid queries
    w = p.sum(dim=(2, 3))
    return w.masked_fill(~valid[:, None, :], float("-inf"))


def value_attention_scores(cap: Captured, valid: Tensor) -> Tensor:
    """`attention_mean_scores` × ‖v_j‖: what a token adds to the attention outputs, not only how
    much it is looked at (a token that draws attention but carries a small value adds little)."""
    w = attention_mean_scores(cap, valid) * cap.v.float().norm(dim=-1)
    return w.masked_fill(~valid[:, None, :], float("-inf"))  # -inf × 0 would be NaN


def key_norm_scores(cap: Captured, valid: Tensor) -> Tensor:
    """-‖k_j‖ (pre-RoPE): keys of small norm tend to draw attention; needs no queries."""
    w = -cap.k_pre.float().norm(dim=-1)
    return w.masked_fill(~valid[:, None, :], float("-inf"))


SCORES = {
    "attention": attention_scores,
    "attention-mean": attention_mean_scores,
    "value-attention": value_attention_scores,
    "key-norm": key_norm_scores,
}


class MemoryWriter:
    """Turns token ids of references into `Memories` with a given model (§3.1–3.3)."""

    def __init__(self, model: Memory3Model, prefix_ids: Sequence[int], config: MemoryConfig) -> None:
        if not prefix_ids:
            raise ValueError("the reference prefix must have at least one token (the BOS)")
        self.model = model
        self.config = config
        self.prefix_ids = list(prefix_ids)
        self.fingerprint = memory_fingerprint(model, config)

    @classmethod
    def for_model(cls, model: Memory3Model, tokenizer: Any, config: MemoryConfig) -> MemoryWriter:
        """The writer of `model`'s memories, with the reference prefix its tokenizer makes."""
        return cls(model, reference_prefix_ids(tokenizer, model.config.bos_token_id, config), config)

    @property
    def prefix_len(self) -> int:
        return len(self.prefix_ids)

    def write(self, references: Sequence[Sequence[int]], batch_size: int = 16) -> Memories:
        """Memories for each reference (token ids without BOS/prefix), in the input order.
        Gradients flow through the kept keys and values when grad is enabled (training)."""
        if not references:
            raise ValueError("no references to write")
        for i, r in enumerate(references):
            if not 0 < len(r) <= self.config.reference_tokens:
                raise ValueError(
                    f"reference {i} has {len(r)} tokens; a reference must have 1.."
                    f"{self.config.reference_tokens} tokens: chunk longer texts first"
                )
        # Sort by length so that a batch pads little; restore the order at the end.
        order = sorted(range(len(references)), key=lambda i: len(references[i]))
        parts = [
            self._write_batch([references[i] for i in order[s : s + batch_size]])
            for s in range(0, len(order), batch_size)
        ]
        mem = Memories.cat(parts)
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        return mem[inverse]

    def _write_batch(self, refs: Sequence[Sequence[int]]) -> Memories:
        p = self.prefix_len
        device = self.model.device
        B, T = len(refs), p + max(len(r) for r in refs)
        ids = torch.zeros(B, T, dtype=torch.long)
        valid = torch.zeros(B, T, dtype=torch.bool)  # reference tokens only
        for b, r in enumerate(refs):
            ids[b, : p + len(r)] = torch.tensor(self.prefix_ids + list(r))
            valid[b, p : p + len(r)] = True
        ids, valid = ids.to(device), valid.to(device)
        pos = torch.arange(T, device=device).expand(B, T)  # §3.2 prefix 0..p-1, tokens p..
        captured = self.model.capture_memory_layers(ids, pos)
        ks, vs, ps = [], [], []
        for layer, cap in enumerate(captured):
            idx, ok = self._select(cap, valid, layer)  # (B, K, S)
            D = cap.k.shape[-1]
            gather = idx[..., None].expand(-1, -1, -1, D)
            ks.append(torch.gather(cap.k, 2, gather) * ok[..., None])
            vs.append(torch.gather(cap.v, 2, gather) * ok[..., None])
            ps.append(torch.where(ok, idx, -1).to(torch.int32))
        return Memories(torch.stack(ks, 1), torch.stack(vs, 1), torch.stack(ps, 1).cpu(), self.fingerprint)

    def _select(self, cap: Captured, valid: Tensor, layer: int) -> tuple[Tensor, Tensor]:
        """Indices (B, K, S) of the kept tokens, sorted by position, and which are real."""
        cfg = self.config
        B, K, T, _ = cap.k.shape
        S = min(cfg.kept_tokens, T)
        with torch.no_grad():  # §3.5 the choice itself is not differentiated
            if cfg.selection in SCORES:
                score = SCORES[cfg.selection](cap, valid)
            elif cfg.selection == "random":  # a fixed random order of positions per layer and head,
                # so that a reference's memory does not depend on the batch it was written in
                g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + layer)
                order = torch.rand(K, self.prefix_len + cfg.reference_tokens, generator=g)
                score = order[:, :T].to(valid.device).expand(B, K, T)
                score = score.masked_fill(~valid[:, None, :], float("-inf"))
            else:  # all: keep every reference token in order
                score = torch.where(valid, -torch.arange(T, device=valid.device).float(), float("-inf"))
                score = score[:, None, :].expand(B, K, T)
            top = score.topk(S, dim=-1)
            idx, order = top.indices.sort(dim=-1)
            ok = torch.isfinite(top.values.gather(-1, order))
            # Sort real tokens by position and push empty slots (short references) to the end.
            key = torch.where(ok, idx, T + idx)
            key, order2 = key.sort(dim=-1)
            idx, ok = idx.gather(-1, order2), ok.gather(-1, order2)
        if cfg.kept_tokens > S:  # fewer tokens in the batch than slots: pad with empty slots
            pad = cfg.kept_tokens - S
            idx = torch.cat((idx, idx.new_zeros(B, K, pad)), -1)
            ok = torch.cat((ok, ok.new_zeros(B, K, pad)), -1)
        return idx, ok
