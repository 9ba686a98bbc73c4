"""Stage 2, continual training with memory (docs/design.md, "Training a model to read memory"), and its offline reference pairing.

Pairing (`prepare_continual`, run once, stored with the dataset): the corpus is cut into training
sequences; each 64-token chunk of a sequence is paired with 1 reference of the knowledge base,
retrieved with the chunk's own text; a reference whose overlap with the whole sequence exceeds
0.9 (§4.4, Eq. 6: the sequence already contains it) is skipped and the next hit takes its place.

Training (`run_continual`): every chunk reads its own reference and those of the previous 4
chunks (5 memories, as at inference). The references of a batch are encoded on the fly by the
model being trained, up to its last memory layer; the top-8 choice is made without gradient and
the gradients flow through the kept keys and values. Layout as at inference (layout.py).

A dataset directory holds (numpy + JSON, no pickle):
  tokens.npy    int32 token stream of the corpus (documents separated by EOS)
  starts.npy    int64 start of each training sequence in the stream (seq_len + 1 tokens each)
  pairs.npy     int32 (sequences, chunks) reference index per chunk, -1 = none passed the filter
  refs.npy      int32 (references, reference_tokens) token ids, -1 padded
  pairing.json  PairingConfig and counts
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memory3.config import MemoryConfig, parse_memory_layers
from memory3.memory.write import Memories, MemoryWriter, reference_prefix_ids
from memory3.retrieval.leak import TRAIN_THRESHOLD, leaks
from memory3.train.adapters import init_from_adapter
from memory3.train.config import (
    LoopConfig,
    LoRAConfig,
    OptimConfig,
    from_dict,
    load_config,
    to_dict,
)
from memory3.train.layout import chunked_memory, text_batch
from memory3.train.loop import Run, autocast, batch_loss, export, set_memory_layers

log = logging.getLogger(__name__)


# --- offline pairing -------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairingConfig:
    seq_len: int = 256  # tokens per training sequence (the paper: 2048)
    chunk_tokens: int = 64  # §3.1
    reference_tokens: int = 128  # §3.1
    leak_threshold: float = TRAIN_THRESHOLD  # §4.4: 0.9 for training
    candidates: int = 8  # hits checked per chunk before giving up
    embedder: str = "minilm"

    def __post_init__(self) -> None:
        if self.seq_len % self.chunk_tokens:
            raise ValueError(
                f"seq_len ({self.seq_len}) must be a multiple of chunk_tokens ({self.chunk_tokens})"
            )


@dataclass
class PairedDataset:
    tokens: np.ndarray
    starts: np.ndarray
    pairs: np.ndarray
    refs: np.ndarray
    config: PairingConfig

    def __len__(self) -> int:
        return len(self.starts)

    def sequence(self, i: int) -> list[int]:
        s = int(self.starts[i])
        return self.tokens[s : s + self.config.seq_len + 1].tolist()

    def reference(self, r: int) -> list[int]:
        row = self.refs[r]
        return row[row >= 0].tolist()

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        for name in ("tokens", "starts", "pairs", "refs"):
            np.save(path / f"{name}.npy", getattr(self, name))
        meta = {
            "config": to_dict(self.config),
            "sequences": len(self),
            "references": len(self.refs),
            "paired_chunks": int((self.pairs >= 0).sum()),
            "chunks": int(self.pairs.size),
        }
        (path / "pairing.json").write_text(json.dumps(meta, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> PairedDataset:
        path = Path(path).expanduser()
        if not (path / "pairing.json").exists():
            raise FileNotFoundError(
                f"{path}: not a paired dataset (pairing.json missing); run `memory3 train pair`"
            )
        meta = json.loads((path / "pairing.json").read_text())
        arrays = {n: np.load(path / f"{n}.npy") for n in ("tokens", "starts", "pairs", "refs")}
        return cls(**arrays, config=from_dict(PairingConfig, meta["config"]))


def prepare_continual(
    texts: Sequence[str],
    kb_texts: Sequence[str],
    tokenizer: Any,
    config: PairingConfig = PairingConfig(),
    embedder: Any = None,
    max_sequences: int | None = None,
) -> PairedDataset:
    """Cut `texts` into sequences, `kb_texts` into references, and pair every chunk with one
    reference retrieved with the chunk's text and not leaking into the sequence."""
    from memory3.memory.ingest import Document, chunk_documents
    from memory3.retrieval.embed import get_embedder
    from memory3.retrieval.index import VectorIndex
    from memory3.train.data import tokenize_corpus

    embedder = embedder or get_embedder(config.embedder)
    tokens = tokenize_corpus(texts, tokenizer, tokenizer.eos_token_id)
    L, n = config.seq_len, config.chunk_tokens
    starts = np.arange(0, len(tokens) - L - 1, L, dtype=np.int64)[:max_sequences]
    refs = list(
        chunk_documents(
            (Document(str(i), t) for i, t in enumerate(kb_texts)), tokenizer, config.reference_tokens
        )
    )
    if not refs or not len(starts):
        raise ValueError(f"nothing to pair: {len(starts)} sequences, {len(refs)} references")
    ref_arr = np.full((len(refs), config.reference_tokens), -1, dtype=np.int32)
    for i, r in enumerate(refs):
        ref_arr[i, : len(r.token_ids)] = r.token_ids
    t0 = time.perf_counter()
    index = VectorIndex.build(embedder.embed([r.text for r in refs]), np.arange(len(refs)))
    C = L // n
    chunk_ids = [tokens[s + c * n : s + (c + 1) * n] for s in starts for c in range(C)]
    queries = tokenizer.batch_decode([c.tolist() for c in chunk_ids], skip_special_tokens=True)
    _, hits = index.search(embedder.embed(queries), config.candidates)
    pairs = np.full((len(starts), C), -1, dtype=np.int32)
    for i, s in enumerate(starts):
        seq = tokens[s : s + L + 1]
        for c in range(C):
            for h in hits[i * C + c]:
                if h >= 0 and not leaks(seq, ref_arr[h][ref_arr[h] >= 0], config.leak_threshold):
                    pairs[i, c] = h
                    break
    log.info(
        "paired %d/%d chunks of %d sequences with %d references in %.0f s",
        int((pairs >= 0).sum()),
        pairs.size,
        len(starts),
        len(refs),
        time.perf_counter() - t0,
    )
    return PairedDataset(tokens, starts, pairs, ref_arr, config)


def chunk_slots(pairs: np.ndarray, memories: int) -> np.ndarray:
    """(B, C) reference per chunk -> (B, C, memories): chunk c reads the references of chunks
    c-memories+1 .. c (its own and those of the previous ones), -1 where there is none."""
    B, C = pairs.shape
    out = np.full((B, C, memories), -1, dtype=np.int64)
    for c in range(C):
        for j in range(memories):
            src = c - memories + 1 + j
            if src >= 0:
                out[:, c, j] = pairs[:, src]
    return out


def memory_batch(
    model: Any,
    writer: MemoryWriter,
    data: PairedDataset,
    seq_ids: Sequence[int],
    prefix: list[int],
    memory: MemoryConfig,
    with_memory: bool = True,
) -> tuple[torch.Tensor, int]:
    """Loss of sequences `seq_ids` reading their paired memories (docs/design.md, "Training a model to read memory"), or none."""
    seqs = [data.sequence(i) for i in seq_ids]
    if not with_memory:
        return batch_loss(model, text_batch(seqs, None, None, 0, 0))
    slots = chunk_slots(data.pairs[list(seq_ids)], memory.memories_per_chunk)
    used = sorted({int(r) for r in slots.ravel() if r >= 0})
    batch = text_batch(seqs, None, prefix, memory.reference_tokens, 0)
    if not used:
        return batch_loss(model, batch)
    row = {r: i for i, r in enumerate(used)}
    local = np.vectorize(lambda r: row.get(int(r), -1))(slots)
    mem: Memories = writer.write([data.reference(r) for r in used])
    mi = chunked_memory(mem, torch.from_numpy(local), batch, memory.chunk_tokens)
    return batch_loss(model, batch, mi)


# --- training ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ContinualConfig:
    model: str = "preset:tiny"  # usually the warmup run's model/ directory
    model_overrides: dict[str, Any] = field(default_factory=dict)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    dataset: str = ""  # a directory written by prepare_continual
    batch_size: int = 8
    # which layers read memory: "" keeps the model's own, else "half", "all" or "first:<n>"
    memory_layers: str = ""
    init_adapter: str = ""  # start the LoRA from this adapter (a shipped name or a directory)
    shuffle: bool = True  # visit the sequences in an order drawn from loop.seed, not corpus order

    def __post_init__(self) -> None:
        if not self.dataset:
            raise ValueError(
                "continual training needs `dataset`: a directory written by `memory3 train pair`"
            )
        if self.memory_layers:
            parse_memory_layers(self.memory_layers, 1 << 16)  # the form is checked here, the range at load


def run_continual(
    config: ContinualConfig,
    out: str | Path,
    resume: bool = True,
    stop_after: int | None = None,
    data: PairedDataset | None = None,
    tokenizer: Any = None,
    command: str = "",
) -> Path:
    """Train with memory; returns the run directory (checkpoint/, model/ or adapter/).
    `data`: a dataset in memory instead of `config.dataset`; `tokenizer`: the one whose ids the
    data holds, for the reference prefix (default: the model's)."""

    def init(model: Any) -> None:
        if config.memory_layers:
            set_memory_layers(model, parse_memory_layers(config.memory_layers, model.config.n_layer))
        if config.init_adapter:
            init_from_adapter(model, config.init_adapter)

    run = Run(config, out, resume, init=init, fingerprint=False, command=command)
    model, tok, d = run.model, run.tok, run.d
    data = data or PairedDataset.load(config.dataset)
    if (
        data.config.chunk_tokens != config.memory.chunk_tokens
        or data.config.reference_tokens != config.memory.reference_tokens
    ):
        raise ValueError(
            f"dataset paired with chunk/reference tokens {data.config.chunk_tokens}/{data.config.reference_tokens}, "
            f"memory config has {config.memory.chunk_tokens}/{config.memory.reference_tokens}: pair it again"
        )
    prefix = reference_prefix_ids(tokenizer or tok, model.config.bos_token_id, config.memory)
    writer = MemoryWriter(model, prefix, config.memory)
    per_step = config.batch_size * config.optim.grad_accum * d.world
    order = (
        np.random.default_rng(config.loop.seed).permutation(len(data))
        if config.shuffle
        else np.arange(len(data))
    )
    for step in run.steps(stop_after):
        lr = run.lr(step)
        step_loss = 0.0
        for micro in range(config.optim.grad_accum):
            first = step * per_step + (micro * d.world + d.rank) * config.batch_size
            seq_ids = [int(order[(first + b) % len(data)]) for b in range(config.batch_size)]
            with autocast(config.loop.bf16, model.device):
                loss, _ = memory_batch(model, writer, data, seq_ids, prefix, config.memory)
            (loss / config.optim.grad_accum).backward()
            step_loss += loss.item() / config.optim.grad_accum
        run.optimizer_step()
        run.step_done(step, step_loss, per_step * data.config.seq_len, lr)
    return run.finish(lambda: export(model, tok, config, run.out, run.state, command=command))


@torch.no_grad()
def evaluate(
    model: Any,
    tok: Any,
    data: PairedDataset,
    memory: MemoryConfig,
    with_memory: bool,
    n: int | None = None,
    batch_size: int = 8,
    bf16: bool = False,
) -> float:
    """Mean next-token loss over the first `n` sequences of `data`, with or without memory."""
    was = model.training
    model.eval()
    prefix = reference_prefix_ids(tok, model.config.bos_token_id, memory)
    writer = MemoryWriter(model, prefix, memory)
    ids = list(range(len(data) if n is None else min(n, len(data))))
    total, count = 0.0, 0
    with autocast(bf16, model.device):
        for s in range(0, len(ids), batch_size):
            loss, k = memory_batch(model, writer, data, ids[s : s + batch_size], prefix, memory, with_memory)
            total += loss.item() * k
            count += k
    model.train(was)
    return total / max(count, 1)


def main_from_file(
    path: str | Path, out: str | Path, resume: bool = True, stop_after: int | None = None, command: str = ""
) -> Path:
    return run_continual(load_config(ContinualConfig, path), out, resume, stop_after, command=command)
