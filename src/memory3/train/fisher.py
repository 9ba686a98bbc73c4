"""The Fisher matrices of a model's answer loss with respect to its memories' keys and values:
what a transform codec (`memory3.memory.transform`) allocates its bits by. `memory3 train
calibrate` (train/calibrate.py) measures them for a model; an SFT run through a transform codec
measures them between steps. See train/calibrate.py for the method."""

from __future__ import annotations

import random
import time
from typing import Any

import torch
from tqdm import tqdm

from memory3.config import MemoryConfig
from memory3.memory.transform import CodecCalibration, rotate
from memory3.memory.write import MemoryWriter, reference_prefix_ids
from memory3.model import MemoryInput
from memory3.train.layout import Batch, shared_memory, text_batch
from memory3.train.loop import batch_loss


def fisher_from_data(
    model: Any,
    tokenizer: Any,
    memory_config: MemoryConfig,
    data: Any,
    groups: int = 48,
    seed: int = 0,
    progress: bool = True,
) -> CodecCalibration:
    """The Fisher matrices of `groups` question groups drawn from `data` (an `SFTData`: its
    `group`, `reference_ids` and `qa_seqs`), the memories written with `memory_config`. The
    model's trainable flags and mode are restored afterwards, so a model in training can be
    calibrated between steps."""
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    t0 = time.perf_counter()
    prefix = reference_prefix_ids(tokenizer, model.config.bos_token_id, memory_config)
    writer = MemoryWriter(model, prefix, memory_config)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    theta = model.config.rope
    rng = random.Random(seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    was_training = model.training
    model.requires_grad_(False)
    model.eval()
    Fk = Fv = None
    slots = questions = 0
    try:
        for _ in tqdm(range(groups), desc="calibrate", disable=not progress, unit="group"):
            group = data.group(rng)
            with torch.no_grad():
                mem = writer.write([data.reference_ids(r) for r in group.references]).to(dtype=torch.float32)
            M = mem.k.shape[0]
            seqs, starts = data.qa_seqs(group.questions)
            b = text_batch(seqs, starts, prefix, memory_config.reference_tokens, pad)
            dev = model.device
            b = Batch(b.ids.to(dev), b.pos.to(dev), b.valid.to(dev), b.targets.to(dev), b.text_start)
            B = b.ids.shape[0]

            # every row reads its own copy of the memories, so each row's gradient is one question's
            shared = shared_memory(mem.to(dev), b)
            k, v = (x.detach().clone().requires_grad_(True) for x in (shared.k, shared.v))
            with torch.enable_grad():  # also when called under no_grad (a codec refit in training)
                loss, n = batch_loss(model, b, MemoryInput(k, v, shared.visible))
                (loss.float() * n).backward()  # a question's summed answer loss, not a token's mean

            pos = mem.positions.repeat(B, 1, 1, 1)
            keep = (pos >= 0).to(torch.float64)[..., None]
            gk = rotate(_per_memory(k.grad, M), pos, theta, -1).double() * keep  # RoPE is orthogonal
            gv = _per_memory(v.grad, M).double() * keep
            fk = torch.einsum("nlksd,nlkse->lkde", gk, gk).numpy()
            fv = torch.einsum("nlksd,nlkse->lkde", gv, gv).numpy()
            Fk = fk if Fk is None else Fk + fk
            Fv = fv if Fv is None else Fv + fv
            slots += int(mem.valid.sum())
            questions += B
    finally:
        for p in trainable:
            p.requires_grad_(True)
        model.train(was_training)
    assert Fk is not None and Fv is not None
    meta = {
        "groups": groups,
        "questions": questions,
        "seed": seed,
        "memory_config": memory_config.to_dict(),
        "data": {
            "factbook_fraction": data.config.factbook_fraction,
            "wikipedia_fraction": data.config.wikipedia_fraction,
            "questions_per_group": data.config.questions_per_group,
        },
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return CodecCalibration(Fk / slots, Fv / slots, meta)


def _per_memory(g: torch.Tensor, memories: int) -> torch.Tensor:
    """A (Lm, B, K, M·S, D) gradient of `shared_memory`'s keys or values -> (B·M, Lm, K, S, D),
    one memory per row."""
    Lm, B, K, N, D = g.shape
    S = N // memories
    g = g.float().cpu().reshape(Lm, B, K, memories, S, D)
    return g.permute(1, 3, 0, 2, 4, 5).reshape(B * memories, Lm, K, S, D)
