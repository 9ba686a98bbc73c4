"""The pieces every recipe's loop is made of: which tensors train, AdamW, the warmup-stable-decay
schedule, data-parallel gradient averaging, checkpoint and exact resume, progress.

`Run` is the skeleton the recipes (warmup.py, continual.py, sft.py) share: set-up, resume, the
optimizer step, logging, checkpoints and the final export. Each recipe stays a linear script that
builds its data and computes its loss per step; nothing here knows about memories.

Exact resume: a batch is a pure function of (seed, step, micro-step, rank), the learning rate a
function of the step, and a checkpoint holds the trainable tensors, the optimizer state and the
torch RNG state bit for bit (safetensors + JSON, no pickle). So a resumed run computes the same
next loss as one that was never interrupted (tests/train/test_train.py checks it).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from memory3.config import MemoryConfig, ModelConfig
from memory3.files import recover_dir, replace_dir
from memory3.lora import apply_lora, select_trainable
from memory3.model import Memory3Model
from memory3.train.adapters import save_adapter
from memory3.train.config import LoopConfig, LoRAConfig, OptimConfig, save_config

log = logging.getLogger(__name__)

CKPT_DIR = "checkpoint"
CONFIG_FILE = "train_config.json"
METRICS_FILE = "metrics.jsonl"


# --- the model -----------------------------------------------------------------------------------


def load_base(name: str, overrides: dict[str, Any] | None = None, seed: int = 0) -> tuple[Memory3Model, Any]:
    """(model in fp32, tokenizer) from "preset:<name>" (random init, SmolLM2 tokenizer: training from
    scratch) or anything `checkpoint.load_pretrained` takes (the bundled model, a directory)."""
    from memory3.checkpoint import load_pretrained

    if name.startswith("preset:"):
        tok = _bundled_tokenizer()
        kw = {"vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
        kw.update(overrides or {})
        config = ModelConfig.from_preset(name.removeprefix("preset:"), **kw)
        torch.manual_seed(seed)
        return Memory3Model(config).init_weights(seed), tok
    if overrides:
        raise ValueError(f"model_overrides {overrides} only apply to 'preset:<name>' models, not {name!r}")
    loaded = load_pretrained(name)
    return loaded.model, loaded.tokenizer


@functools.lru_cache(maxsize=1)
def _bundled_tokenizer() -> Any:
    from memory3.checkpoint import load_bundled_tokenizer

    return load_bundled_tokenizer()


def set_memory_layers(model: Memory3Model, layers: tuple[int, ...]) -> None:
    """Change which layers read (and the writer captures) memories, e.g. for a curriculum."""
    model.set_memory_layers(layers)


def prepare_trainable(model: Memory3Model, lora: LoRAConfig, seed: int) -> list[nn.Parameter]:
    """LoRA adapters when lora.rank > 0, else full training of `lora.trainable` (all if empty)."""
    if lora.rank > 0:
        names = apply_lora(model, lora, seed)
        log.info("LoRA rank %d on %d linear layers", lora.rank, len(names))
    else:
        names = select_trainable(model, lora.trainable)
    params = [p for p in model.parameters() if p.requires_grad]
    log.info(
        "training %.2fM of %.2fM parameters",
        sum(p.numel() for p in params) / 1e6,
        sum(p.numel() for p in model.parameters()) / 1e6,
    )
    return params


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable tensors by name (tied weights once)."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


# --- optimizer and schedule -----------------------------------------------------------------------


def make_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on norms' gains), as nanoGPT does."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, foreach=False)


def wsd_lr(step: int, total: int, cfg: OptimConfig) -> float:
    """Warmup-stable-decay: linear warmup over warmup_steps, constant, then a linear decay to
    lr·min_lr_ratio over the last decay_fraction of the steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = round(total * cfg.decay_fraction)
    decay_start = total - decay_steps
    if decay_steps == 0 or step < decay_start:
        return cfg.lr
    frac = (step - decay_start + 1) / decay_steps
    return cfg.lr * (1 - frac * (1 - cfg.min_lr_ratio))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


def autocast(enabled: bool, device: torch.device) -> Any:
    """bf16 autocast, on the CPU too; a no-op context when disabled."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if enabled else nullcontext()


# --- data parallel ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """Join the process group when launched by torchrun (RANK/WORLD_SIZE set), gloo on the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("gloo" if not torch.cuda.is_available() else "nccl")
    return Dist(dist.get_rank(), dist.get_world_size())


def finish_distributed() -> None:
    """Leave the process group, once every rank is done (rank 0 exports after the last step):
    a rank that exits with the group still up can abort in its teardown."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def average_gradients(params: list[nn.Parameter], d: Dist) -> None:
    """Data parallel by hand: every rank ran its own micro-batches; average the gradients (one
    flat all-reduce). Simpler than the DDP wrapper, which does not fit a step that runs the model
    twice (the memory writer, then the reader)."""
    if d.world == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= d.world
    offset = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def all_mean(value: float, d: Dist) -> float:
    if d.world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / d.world


# --- checkpoints --------------------------------------------------------------------------------------


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    tokens: int = 0  # tokens seen (all ranks)
    seconds: float = 0.0  # wall time spent training (all sessions)


def save_training(
    out: Path,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    state: TrainState,
    extra: Callable[[Path], Any] | None = None,
) -> Path:
    """Trainable tensors + optimizer state + RNG + counters, written atomically to out/checkpoint.
    `extra(directory)` writes a recipe's own state (e.g. the codec trained in the loop) inside it."""
    with replace_dir(out / CKPT_DIR, label="training") as tmp:
        if extra is not None:
            extra(tmp)
        save_file(trainable_state(model), tmp / "trainable.safetensors")
        sd = opt.state_dict()
        tensors = {
            f"{idx}.{k}": v.detach().cpu().contiguous()
            for idx, st in sd["state"].items()
            for k, v in st.items()
            if torch.is_tensor(v)
        }
        save_file(tensors or {"_empty": torch.zeros(0)}, tmp / "optimizer.safetensors")
        save_file({"cpu": torch.get_rng_state()}, tmp / "rng.safetensors")
        meta = {"state": state.__dict__, "param_groups": sd["param_groups"]}
        (tmp / "state.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out / CKPT_DIR


def load_trainable(ckpt: Path, model: nn.Module) -> None:
    """Copy a checkpoint's trainable tensors (`save_training`) into `model`, prepared as the run was."""
    own = dict(model.named_parameters())
    for name, t in load_file(ckpt / "trainable.safetensors").items():
        if name not in own:
            raise ValueError(f"{ckpt}: tensor {name!r} is not a parameter of this model; wrong config?")
        with torch.no_grad():
            own[name].copy_(t)


def load_training(out: Path, model: nn.Module, opt: torch.optim.Optimizer) -> TrainState | None:
    """Restore what `save_training` wrote; None when there is no checkpoint yet."""
    ckpt = recover_dir(out / CKPT_DIR)
    if not (ckpt / "state.json").exists():
        return None
    meta = json.loads((ckpt / "state.json").read_text())
    load_trainable(ckpt, model)
    tensors = load_file(ckpt / "optimizer.safetensors")
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if key == "_empty":
            continue
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = t
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(load_file(ckpt / "rng.safetensors")["cpu"])
    return TrainState(**meta["state"])


def start_run(out: Path, config: Any, resume: bool, d: Dist) -> None:
    """Create the run directory and save the config; refuse to resume a run made with another
    config (a silent mix would not be the run the config describes)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / CONFIG_FILE
    if path.exists() and (out / CKPT_DIR).exists() and resume:
        from memory3.train.config import from_dict, to_dict

        # fields added since the run started take their defaults
        saved = to_dict(from_dict(type(config), json.loads(path.read_text())))
        if json.loads(json.dumps(saved)) != json.loads(json.dumps(to_dict(config))):
            raise ValueError(
                f"{out} holds a run made with another config; pass a new --out, or --no-resume to start over"
            )
    if not resume and (out / CKPT_DIR).exists():
        shutil.rmtree(out / CKPT_DIR)
    if d.main:
        save_config(config, path)


# --- progress -----------------------------------------------------------------------------------------


class Progress:
    """A tqdm bar on stderr (loss, tokens/s) and one JSON line per logged step in metrics.jsonl."""

    def __init__(self, out: Path, loop: LoopConfig, state: TrainState, d: Dist) -> None:
        self.out, self.loop, self.d = out, loop, d
        self.bar = None
        if d.main:
            from tqdm import tqdm

            self.bar = tqdm(
                total=loop.steps,
                initial=state.step,
                file=sys.stderr,
                dynamic_ncols=True,
                mininterval=2.0,
                disable=None,
            )
        self.t0 = time.perf_counter()
        self.tokens0 = state.tokens
        self.losses: list[float] = []
        self.extra: dict[str, list[float]] = {}

    def update(
        self, state: TrainState, loss: float, lr: float, extra: dict[str, float] | None = None
    ) -> None:
        """extra: more figures of this step (a key absent when not computed this step); each is
        averaged over the steps of the logging interval that have it."""
        self.losses.append(loss)
        for k, v in (extra or {}).items():
            self.extra.setdefault(k, []).append(v)
        if self.bar is not None:
            dt = max(time.perf_counter() - self.t0, 1e-9)
            self.bar.set_postfix(
                loss=f"{loss:.3f}", tok_s=f"{(state.tokens - self.tokens0) / dt:.0f}", refresh=False
            )
            self.bar.update(1)
        if self.d.main and (state.step % self.loop.log_every == 0 or state.step == self.loop.steps):
            row = {
                "step": state.step,
                "loss": round(sum(self.losses) / len(self.losses), 5),
                "lr": lr,
                "tokens": state.tokens,
                "seconds": round(state.seconds, 1),
                **{k: round(sum(v) / len(v), 4) for k, v in self.extra.items()},
            }
            self.losses, self.extra = [], {}
            log.info("%s", json.dumps(row))
            with open(self.out / METRICS_FILE, "a") as f:
                f.write(json.dumps(row) + "\n")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@contextmanager
def threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def checkpoint_due(step: int, loop: LoopConfig, last_save: float) -> bool:
    if step == loop.steps or (loop.checkpoint_every and step % loop.checkpoint_every == 0):
        return True
    return bool(loop.checkpoint_minutes) and time.perf_counter() - last_save >= 60 * loop.checkpoint_minutes


# --- the run ---------------------------------------------------------------------------------------


class Run:
    """One training run: the model with its trainable tensors and optimizer, the state that resumes,
    progress and checkpoints. A recipe builds it, builds its data, then loops:

        run = Run(config, out, resume)
        data = ...                                   # before `steps`, which restores the RNG
        for step in run.steps(stop_after):
            lr = run.lr(step)
            ... loss.backward() ...
            run.optimizer_step()
            run.step_done(step, loss_value, tokens, lr)
        return run.finish(lambda: export(run.model, run.tok, config, run.out, run.state, command=run.command))

    `init(model)` runs after the trainable tensors exist and before the optimizer (e.g. to start
    from an earlier run's adapter); `fingerprint=False` skips hashing the weights while training.
    `save_extra(directory)` writes a recipe's own state into every checkpoint; `command` (the
    command line that runs the recipe) is recorded with the result."""

    def __init__(
        self,
        config: Any,
        out: str | Path,
        resume: bool = True,
        init: Callable[[Memory3Model], None] | None = None,
        fingerprint: bool = True,
        command: str = "",
    ) -> None:
        self.config, self.out, self.resume = config, Path(out), resume
        self.command = command  # recorded in the exported adapter: how to train it again
        self.d = init_distributed()
        start_run(self.out, config, resume, self.d)
        torch.manual_seed(config.loop.seed)
        if config.loop.threads:
            torch.set_num_threads(config.loop.threads)
        self.model, self.tok = load_base(config.model, config.model_overrides, config.loop.seed)
        self.params = prepare_trainable(self.model, config.lora, config.loop.seed)
        if init is not None:
            init(self.model)
        self.model._memory3_weights = None  # type: ignore[assignment]  # training changes them
        if not fingerprint:
            self.model._memory3_fingerprint = "training"  # type: ignore[assignment]
        self.model.train()
        self.opt = make_optimizer(self.model, config.optim)
        self.state = TrainState()
        self.save_extra: Callable[[Path], Any] | None = None

    def steps(self, stop_after: int | None = None) -> range:
        """Restore the last checkpoint (unless not resuming) and return the steps to run now: to
        the end, or `stop_after` more (a time-boxed session)."""
        loaded = load_training(self.out, self.model, self.opt) if self.resume else None
        self.state = loaded or TrainState()
        if self.state.step:
            log.info("resumed %s at step %d", self.out, self.state.step)
        self.progress = Progress(self.out, self.config.loop, self.state, self.d)
        self._last_save = self._t0 = time.perf_counter()
        self._seconds0 = self.state.seconds
        total = self.config.loop.steps
        return range(
            self.state.step, total if stop_after is None else min(total, self.state.step + stop_after)
        )

    def lr(self, step: int) -> float:
        """Set and return the learning rate of `step`."""
        lr = wsd_lr(step, self.config.loop.steps, self.config.optim)
        set_lr(self.opt, lr)
        return lr

    def optimizer_step(self) -> None:
        """Average the gradients over ranks, clip them, step and clear them."""
        average_gradients(self.params, self.d)
        torch.nn.utils.clip_grad_norm_(self.params, self.config.optim.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def step_done(
        self, step: int, loss: float, tokens: int, lr: float, extra: dict[str, float] | None = None
    ) -> None:
        """Count the step (`tokens`: over all ranks), log `loss` averaged over ranks, checkpoint
        when due."""
        self.state.step = step + 1
        self.state.tokens += tokens
        self.state.seconds = self._seconds0 + time.perf_counter() - self._t0
        self.progress.update(self.state, all_mean(loss, self.d), lr, extra)
        if checkpoint_due(self.state.step, self.config.loop, self._last_save):
            if self.d.main:
                save_training(self.out, self.model, self.opt, self.state, self.save_extra)
            self._last_save = time.perf_counter()

    def finish(self, export_fn: Callable[[], Any]) -> Path:
        """A run that has not reached its last step is checkpointed to resume later; a finished
        one runs `export_fn` (on the main rank). Returns the run directory."""
        self.progress.close()
        if self.state.step < self.config.loop.steps:
            if self.d.main:
                save_training(self.out, self.model, self.opt, self.state, self.save_extra)
            return self.out
        if self.d.main:
            export_fn()
        return self.out


def answer_logits(model: Memory3Model, batch: Any, memory: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Float logits and targets at the positions of `batch` whose target is trained, in order
    (row by row): (n, vocab), (n,). The vocabulary projection runs only there."""
    h = model(batch.ids, batch.pos, token_valid=batch.valid, memory=memory, return_hidden=True)
    sel = batch.targets != -100
    return model.lm_head(h[sel]).float(), batch.targets[sel]


def batch_loss(model: Memory3Model, batch: Any, memory: Any = None) -> tuple[torch.Tensor, int]:
    """Mean next-token loss of a `layout.Batch`; the vocabulary projection is applied only where a
    target is trained (with answer-only loss that is a few tokens per sequence)."""
    logits, targets = answer_logits(model, batch, memory)
    n = int(targets.numel())
    if n == 0:
        return logits.sum() * 0.0, 0
    return nn.functional.cross_entropy(logits, targets), n


def export(
    model: Any,
    tok: Any,
    config: Any,
    out: Path,
    state: TrainState,
    memory: MemoryConfig | None = None,
    command: str = "",
) -> Path:
    """The shippable result: adapter/ (LoRA tensors + config) or model/ (a full checkpoint).
    `memory`: how the trained model reads (default: the config's); `command`: what made it."""
    from memory3.train.config import to_dict

    info = {"steps": state.step, "tokens": state.tokens, "train_seconds": round(state.seconds, 1)}
    if config.lora.rank > 0:
        return save_adapter(model, out / "adapter", config, info, command, memory=memory)
    from memory3.checkpoint import save_checkpoint

    return save_checkpoint(
        model,
        out / "model",
        tok,
        source=f"train:{config.model}",
        extra={"train_config": to_dict(config), "train": info, "command": command},
    )
