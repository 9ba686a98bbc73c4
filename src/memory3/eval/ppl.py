"""`memory3 eval ppl`: perplexity of held-out text with and without explicit memory.

"none" is the plain model on the text's tokens. "memory" uses the layout of `generate.py`:

    [reference prefix at positions 0..p-1] [text at positions p+R, p+R+1, …]      (R = 128)

and cuts the text into 64-token chunks, each reading its own k memories through one block-masked
forward pass (§3.1). Which memories a chunk reads is the choice that matters here:

    chunk c reads the memories retrieved with the text of chunk c-1; chunk 0 reads none
    (or, with `first_query="title"`, those retrieved with the document's title).

A chunk retrieving with its own text, as a prompt chunk does in generation, would let every token
of the chunk read references chosen by the tokens it is about to predict: the future leaks in. The
previous chunk's text is all the past a chunk has, and it is what decoding does too (after every 64
generated tokens the next memories are retrieved with those 64 tokens).

Leak filter (§4.4): a reference whose overlap with the scored text exceeds 2/3 is dropped (its
next hit takes the slot). The whole scored text is the leak text, not just the chunk, because
overlap is measured relative to the reference (128 tokens), longer than a chunk.

"prefix" is the control: the memory layout (prefix, text shifted to p+R) with no memory read, so
that the effect of the memories is told apart from that of the layout.

All modes score the same tokens: every token of the text but the first (which has no context in
"none"); perplexity = exp(total NLL / scored tokens).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from memory3.config import MemoryConfig
from memory3.memory import layout
from memory3.memory.write import MemoryFormatError, memory_fingerprint, reference_prefix_ids
from memory3.model import Memory3Model, MemoryInput
from memory3.retrieval.base import Hit, Retriever
from memory3.retrieval.leak import EVAL_THRESHOLD

log = logging.getLogger(__name__)

PPLMode = Literal["none", "prefix", "memory"]
PPL_MODES: tuple[str, ...] = ("none", "prefix", "memory")


@dataclass(frozen=True)
class PPLConfig:
    max_tokens: int = 512  # tokens kept of each text (from its start)
    min_tokens: int = 65  # shorter texts are skipped: they have no second chunk to read memory
    k: int | None = None  # memories per chunk; None: the memory config's memories_per_chunk
    leak_threshold: float | None = EVAL_THRESHOLD
    first_query: Literal["none", "title"] = "none"
    batch_size: int = 4

    def __post_init__(self) -> None:
        if self.min_tokens < 2 or self.max_tokens < self.min_tokens:
            raise ValueError(
                f"need 2 ≤ min_tokens ≤ max_tokens, got min_tokens={self.min_tokens}, max_tokens={self.max_tokens}"
            )
        if (self.k is not None and self.k < 1) or self.batch_size < 1:
            raise ValueError(f"k and batch_size must be ≥ 1, got {self.k}, {self.batch_size}")
        if self.first_query not in ("none", "title"):
            raise ValueError(f"first_query must be 'none' or 'title', got {self.first_query!r}")


@dataclass(frozen=True)
class PPLText:
    text: str
    title: str = ""


@dataclass
class PPLResult:
    mode: str
    nll: float  # summed over scored tokens (nats)
    tokens: int  # scored tokens
    texts: int
    per_text: list[float] = field(default_factory=list)  # perplexity of each text
    retrievals: int = 0  # chunks that read at least one memory

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "perplexity": self.perplexity}


def tokenize_texts(
    tokenizer: Any, texts: Sequence[PPLText], config: PPLConfig
) -> list[tuple[PPLText, list[int]]]:
    """Token ids of each text (the tokenizer's own special tokens), cut to `max_tokens`; texts
    shorter than `min_tokens` are dropped."""
    out = []
    for t in texts:
        ids = tokenizer(t.text, add_special_tokens=True).input_ids[: config.max_tokens]
        if len(ids) >= config.min_tokens:
            out.append((t, list(ids)))
    return out


def token_nll(logits: Tensor, ids: Tensor, valid: Tensor) -> Tensor:
    """Summed NLL of ids[:, 1:] given logits[:, :-1], over positions where `valid[:, 1:]`.
    logits (B, T, V), ids (B, T), valid (B, T) -> (B,) float32."""
    lp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -lp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (nll * valid[:, 1:]).sum(-1)


@torch.inference_mode()
def perplexity(
    model: Memory3Model,
    tokenizer: Any,
    texts: Sequence[PPLText],
    mode: PPLMode = "none",
    retriever: Retriever | None = None,
    memory_config: MemoryConfig | None = None,
    config: PPLConfig = PPLConfig(),
    progress: bool = False,
) -> PPLResult:
    """Perplexity of `texts` under the model, without memory or with memories retrieved per chunk
    from the previous chunk's text (see the module docstring)."""
    if mode not in PPL_MODES:
        raise ValueError(f"mode must be one of {PPL_MODES}, got {mode!r}")
    mcfg = memory_config or MemoryConfig()
    if config.k is None:
        config = dataclasses.replace(config, k=mcfg.memories_per_chunk)
    if mode == "memory":
        if retriever is None:
            raise ValueError("perplexity with memory needs a retriever (--store or --kb)")
        ours = memory_fingerprint(model, mcfg)
        if retriever.memory_fingerprint != ours:
            raise MemoryFormatError(
                f"memories written by another model or memory config ({retriever.memory_fingerprint}) "
                f"than the one evaluated ({ours}); rebuild the memory bank with this model"
            )
    encoded = tokenize_texts(tokenizer, texts, config)
    if not encoded:
        raise ValueError(f"no text has at least min_tokens={config.min_tokens} tokens")
    from tqdm.auto import tqdm

    result = PPLResult(mode, 0.0, 0, len(encoded))
    B = config.batch_size
    for s in tqdm(range(0, len(encoded), B), desc=f"ppl {mode}", unit="batch", disable=not progress):
        batch = encoded[s : s + B]
        if mode == "none":
            nll = _nll_plain(model, [ids for _, ids in batch])
        else:
            nll, n_read = _nll_layout(
                model, tokenizer, batch, retriever if mode == "memory" else None, mcfg, config
            )
            result.retrievals += n_read
        for (_, ids), v in zip(batch, nll.tolist(), strict=True):
            result.nll += v
            result.tokens += len(ids) - 1
            result.per_text.append(math.exp(v / (len(ids) - 1)))
    log.info("ppl %s: %.3f over %d tokens of %d texts", mode, result.perplexity, result.tokens, result.texts)
    return result


def _right_pad(seqs: Sequence[Sequence[int]], pad: int, device: torch.device) -> tuple[Tensor, Tensor]:
    T = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    valid = torch.zeros(len(seqs), T, dtype=torch.bool)
    for b, x in enumerate(seqs):
        ids[b, : len(x)] = torch.tensor(list(x))
        valid[b, : len(x)] = True
    return ids.to(device), valid.to(device)


def _nll_plain(model: Memory3Model, seqs: list[list[int]]) -> Tensor:
    ids, valid = _right_pad(seqs, 0, model.device)  # right padding: causal, no mask needed
    logits = model(ids)
    return token_nll(logits, ids, valid)


def chunk_queries(tokenizer: Any, ids: Sequence[int], chunk: int, title: str, first_query: str) -> list[str]:
    """The retrieval query of each chunk: the previous chunk's text; chunk 0 gets the title (with
    `first_query="title"`) or "" (no memory)."""
    n = (len(ids) + chunk - 1) // chunk
    first = title if first_query == "title" else ""
    return [first] + [
        tokenizer.decode(ids[(c - 1) * chunk : c * chunk], skip_special_tokens=True) for c in range(1, n)
    ]


def chunk_memory_input(
    retriever: Retriever,
    hits: list[list[list[Hit]]],
    lens: Sequence[int],
    prefix_len: int,
    memory_config: MemoryConfig,
    k: int,
    device: torch.device,
    dtype: torch.dtype,
) -> MemoryInput:
    """The memories of every chunk of every sequence as one MemoryInput (§3.1).

    hits[b][c]: the hits chunk c of sequence b reads (at most k). Sequences are laid out as the
    prefix then the text, right-padded to prefix_len + max(lens). Slots: C chunks × k memories ×
    S kept tokens per sequence; text token j of sequence b sees the valid slots of chunk j // 64.
    """
    n = memory_config.chunk_tokens
    B, C = len(hits), max(len(h) for h in hits)
    unique = sorted({h.ref_id for per_seq in hits for per_chunk in per_seq for h in per_chunk[:k]})
    T = prefix_len + max(lens)
    if not unique:
        return MemoryInput(
            torch.zeros(0), torch.zeros(0), torch.zeros(B, T, 0, dtype=torch.bool, device=device)
        )
    mem = retriever.memories(unique).to(device=device, dtype=dtype)
    row = {rid: i for i, rid in enumerate(unique)}
    index = torch.full((B, C, k), -1, dtype=torch.long)  # -1: no memory in that slot group
    for b, per_seq in enumerate(hits):
        for c, per_chunk in enumerate(per_seq):
            for j, h in enumerate(per_chunk[:k]):
                index[b, c, j] = row[h.ref_id]
    chunk_of = torch.full((B, T), -1, dtype=torch.long)  # -1: prefix and padding read no memory
    for b, L in enumerate(lens):
        chunk_of[b, prefix_len : prefix_len + L] = torch.arange(L) // n
    return layout.chunked(mem, index, chunk_of)


def _nll_layout(
    model: Memory3Model,
    tokenizer: Any,
    batch: list[tuple[PPLText, list[int]]],
    retriever: Retriever | None,
    mcfg: MemoryConfig,
    config: PPLConfig,
) -> tuple[Tensor, int]:
    """NLL in the memory layout; with a retriever each chunk reads its memories, without one
    none (the "prefix" control)."""
    device = model.device
    prefix = reference_prefix_ids(tokenizer, model.config.bos_token_id, mcfg)
    p, R = len(prefix), mcfg.reference_tokens
    # retrieval: one search for every chunk of the batch that has a query
    queries = [
        chunk_queries(tokenizer, ids, mcfg.chunk_tokens, t.title, config.first_query) for t, ids in batch
    ]
    leak = [tokenizer.decode(ids, skip_special_tokens=True) for _, ids in batch]
    flat = [
        (b, c)
        for b, qs in enumerate(queries)
        for c, q in enumerate(qs)
        if q.strip() and retriever is not None
    ]
    found = (
        retriever.search(  # type: ignore[union-attr]
            [queries[b][c] for b, c in flat],
            config.k,
            leak_texts=[leak[b] for b, _ in flat] if config.leak_threshold is not None else None,
            leak_threshold=config.leak_threshold,
        )
        if flat
        else []
    )
    hits: list[list[list[Hit]]] = [[[] for _ in qs] for qs in queries]
    for (b, c), h in zip(flat, found, strict=True):
        hits[b][c] = h
    lens = [len(ids) for _, ids in batch]
    memory = None
    if flat:
        assert retriever is not None
        memory = chunk_memory_input(retriever, hits, lens, p, mcfg, config.k, device, model.dtype)

    seqs = [prefix + ids for _, ids in batch]
    ids, valid = _right_pad(seqs, 0, device)
    T = ids.shape[1]
    pos = torch.zeros(len(batch), T, dtype=torch.long)
    pos[:, :p] = torch.arange(p)
    start = layout.text_start(p, R)  # the text starts after the memories' interval
    pos[:, p:] = torch.arange(start, start + T - p)
    pos = pos.to(device)
    if memory is not None and not memory.visible.shape[-1]:
        memory = None  # no chunk found anything
    logits = model(ids, pos, token_valid=valid, memory=memory)
    # score text tokens 1.. from the logits at text tokens 0..: the same tokens as "none"
    nll = token_nll(logits[:, p:], ids[:, p:], valid[:, p:])
    return nll, sum(1 for per_seq in hits for h in per_seq if h)
