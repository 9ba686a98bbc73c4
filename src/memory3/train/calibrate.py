"""`memory3 train calibrate`: what a model's answers are sensitive to in its memories.

A transform codec (`memory3.memory.transform`) counts a key or value error e by the rise of the
answer loss it causes, ½·eᵀFe, with F the Fisher matrix of that memory layer's and kv head's
vectors. This measures F: questions of SFT groups (the training mix of the config: invented
entities, train-split Factbook countries, Wikipedia) read their group's memories; the answer loss
(summed over answer tokens) is differentiated with respect to every memory slot's key (before
RoPE: the gradient is rotated back with the key) and value, *per question*, each batch row
reading its own copy of the memories, so F sums per-question outer products. No held-out question
is used. The result is saved as `codec_calibration.safetensors` beside the model, where
`memory3 build --codec tc96` finds it.
"""

from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from memory3.config import MemoryConfig
from memory3.memory.transform import CodecCalibration, rotate
from memory3.memory.write import MemoryWriter, reference_prefix_ids
from memory3.model import MemoryInput
from memory3.train.config import load_config
from memory3.train.layout import Batch, shared_memory, text_batch
from memory3.train.loop import batch_loss
from memory3.train.sft import SFTConfig, SFTData

# The question mix of the shipped reader's last runs (configs/train/sft-smollm2-reader-20-k48-ctl.json):
# 45% of the groups on train-split Factbook countries, 30% fill-in-the-blank on train-split
# Wikipedia articles, the rest on invented entities; 24 questions a group. Only `SFTData` is used.
SHIPPED_MIX = SFTConfig(
    factbook_fraction=0.45, wikipedia_fraction=0.3, questions_per_group=24, text_per_step=0
)


def fisher_matrices(
    model: Any,
    tokenizer: Any,
    memory_config: MemoryConfig,
    groups: int = 48,
    seed: int = 0,
    config: str | Path | None = None,
    data: SFTData | None = None,
    progress: bool = True,
) -> CodecCalibration:
    """The Fisher matrices of `groups` SFT groups' questions (drawn from `data`, or from the data
    of the SFT `config` file, by default the shipped reader's mix, read with `memory_config`). The model's trainable flags and mode are
    restored afterwards, so a model in training can be calibrated between steps."""
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    t0 = time.perf_counter()
    if data is None:
        base = SHIPPED_MIX if config is None else load_config(SFTConfig, config)
        cfg = dataclasses.replace(base, memory=memory_config)
        cache = Path.home() / ".cache" / "memory3" / "runs" / ".cache"
        data = SFTData(cfg, tokenizer, cache)
    prefix = reference_prefix_ids(tokenizer, model.config.bos_token_id, memory_config)
    writer = MemoryWriter(model, prefix, memory_config)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    theta = model.config.rope_theta
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


def layer_sensitivity(calibration: CodecCalibration) -> dict[str, list[float]]:
    """Trace of each memory layer's Fisher matrices (summed over kv heads), keys and values: how
    much the answers move per unit of squared error there."""
    return {
        "keys": np.trace(calibration.key_fisher, axis1=2, axis2=3).sum(1).tolist(),
        "values": np.trace(calibration.value_fisher, axis1=2, axis2=3).sum(1).tolist(),
    }
