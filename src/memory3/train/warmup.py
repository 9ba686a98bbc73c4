"""Stage 1, warmup (docs/design.md, "Training a model to read memory"): ordinary next-token training on text, no memory.

`run_warmup` is the whole recipe, top to bottom: model, trainable tensors, optimizer, token
stream; then for each step, `grad_accum` micro-batches of `batch_size` sequences, AdamW with
warmup-stable-decay, clipping, checkpoint; at the end the trained model (or adapter).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from memory3.train.config import LoopConfig, LoRAConfig, OptimConfig, load_config
from memory3.train.data import corpus_texts, sequence_at, tokenize_corpus
from memory3.train.layout import text_batch
from memory3.train.loop import (
    Progress,
    TrainState,
    all_mean,
    autocast,
    average_gradients,
    batch_loss,
    checkpoint_due,
    export,
    init_distributed,
    load_base,
    load_training,
    make_optimizer,
    prepare_trainable,
    save_training,
    set_lr,
    start_run,
    wsd_lr,
)

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
) -> Path:
    """Train without memory; returns the run directory (checkpoint/, model/ or adapter/).
    `stream`: a ready token array (tests, benchmarks); default: the config's corpus."""
    out = Path(out)
    d = init_distributed()
    start_run(out, config, resume, d)
    torch.manual_seed(config.loop.seed)
    if config.loop.threads:
        torch.set_num_threads(config.loop.threads)

    model, tok = load_base(config.model, config.model_overrides, config.loop.seed)
    params = prepare_trainable(model, config.lora, config.loop.seed)
    model.train()
    opt = make_optimizer(model, config.optim)
    if stream is None:
        name = "wikipedia" if config.corpus == "wikipedia" else Path(config.corpus).stem
        stream = tokenize_corpus(
            corpus_texts(config.corpus), tok, tok.eos_token_id, out.parent / ".cache" / f"tokens-{name}.npy"
        )
    state = (load_training(out, model, opt) if resume else None) or TrainState()
    progress = Progress(out, config.loop, state, d)
    last_save, t_start, seconds0 = time.perf_counter(), time.perf_counter(), state.seconds

    end = config.loop.steps if stop_after is None else min(config.loop.steps, state.step + stop_after)
    for step in range(state.step, end):
        lr = wsd_lr(step, config.loop.steps, config.optim)
        set_lr(opt, lr)
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
        average_gradients(params, d)
        torch.nn.utils.clip_grad_norm_(params, config.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        state.step = step + 1
        state.tokens += config.seq_len * config.batch_size * config.optim.grad_accum * d.world
        state.seconds = seconds0 + time.perf_counter() - t_start
        progress.update(state, all_mean(step_loss, d), lr)
        if checkpoint_due(state.step, config.loop, last_save):
            if d.main:
                save_training(out, model, opt, state)
            last_save = time.perf_counter()
    progress.close()
    if state.step < config.loop.steps:  # a time-boxed session: resume later
        if d.main:
            save_training(out, model, opt, state)
        return out
    if d.main:
        export(model, tok, config, out, state)
    return out


def main_from_file(
    path: str | Path, out: str | Path, resume: bool = True, stop_after: int | None = None
) -> Path:
    return run_warmup(load_config(WarmupConfig, path), out, resume, stop_after)
