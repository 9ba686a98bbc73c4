"""Stage 1, warmup (docs/design.md, "Training a model to read memory"): ordinary next-token training on text, no memory.

`run_warmup` is the whole recipe, top to bottom: model, trainable tensors, optimizer, token
stream; then for each step, `grad_accum` micro-batches of `batch_size` sequences, AdamW with
warmup-stable-decay, clipping, checkpoint; at the end the trained model (or adapter).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memory3.train.config import LoopConfig, LoRAConfig, OptimConfig, load_config
from memory3.train.data import corpus_texts, sequence_at, tokenize_corpus
from memory3.train.layout import text_batch
from memory3.train.loop import Run, autocast, batch_loss, export

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WarmupConfig:
    model: str = "preset:tiny"  # "preset:<name>" trains from scratch
    model_overrides: dict[str, Any] = field(default_factory=dict)
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # rank 0, no filter: full training
    optim: OptimConfig = field(default_factory=OptimConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    corpus: str = "wikipedia"  # or a .txt / .jsonl file or a directory
    seq_len: int = 256
    batch_size: int = 8  # sequences per micro-batch and rank

    def __post_init__(self) -> None:
        if self.seq_len < 2 or self.batch_size < 1:
            raise ValueError(f"seq_len must be ≥ 2 and batch_size ≥ 1, got {self.seq_len}, {self.batch_size}")


def sequence_index(step: int, micro: int, rank: int, b: int, config: Any, world: int) -> int:
    """Which corpus window sample b of a micro-batch reads: every (step, micro, rank, b) its own."""
    per_step = config.optim.grad_accum * world * config.batch_size
    return step * per_step + (micro * world + rank) * config.batch_size + b


def run_warmup(
    config: WarmupConfig,
    out: str | Path,
    resume: bool = True,
    stop_after: int | None = None,
    stream: Any = None,
    command: str = "",
) -> Path:
    """Train without memory; returns the run directory (checkpoint/, model/ or adapter/).
    `stream`: a ready token array (tests, benchmarks); default: the config's corpus."""
    run = Run(config, out, resume, command=command)
    model, tok, d = run.model, run.tok, run.d
    if stream is None:
        name = "wikipedia" if config.corpus == "wikipedia" else Path(config.corpus).stem
        stream = tokenize_corpus(
            corpus_texts(config.corpus),
            tok,
            tok.eos_token_id,
            run.out.parent / ".cache" / f"tokens-{name}.npy",
        )
    for step in run.steps(stop_after):
        lr = run.lr(step)
        step_loss = 0.0
        for micro in range(config.optim.grad_accum):
            seqs = [
                sequence_at(
                    stream, config.seq_len, sequence_index(step, micro, d.rank, b, config, d.world)
                ).tolist()
                for b in range(config.batch_size)
            ]
            batch = text_batch(seqs, None, None, 0, 0)
            with autocast(config.loop.bf16, model.device):
                loss, _ = batch_loss(model, batch)
            (loss / config.optim.grad_accum).backward()
            step_loss += loss.item() / config.optim.grad_accum
        run.optimizer_step()
        run.step_done(
            step, step_loss, config.seq_len * config.batch_size * config.optim.grad_accum * d.world, lr
        )
    return run.finish(lambda: export(model, tok, config, run.out, run.state, command=command))


def main_from_file(
    path: str | Path, out: str | Path, resume: bool = True, stop_after: int | None = None, command: str = ""
) -> Path:
    return run_warmup(load_config(WarmupConfig, path), out, resume, stop_after, command=command)
