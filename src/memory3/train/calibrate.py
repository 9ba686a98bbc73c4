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
from pathlib import Path
from typing import Any

import numpy as np

from memory3.config import MemoryConfig
from memory3.memory.transform import CodecCalibration
from memory3.train.config import load_config
from memory3.train.fisher import fisher_from_data
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
    progress: bool = True,
) -> CodecCalibration:
    """The Fisher matrices of `groups` SFT groups' questions, drawn from the data of the SFT
    `config` file (by default the shipped reader's mix), read with `memory_config`."""
    base = SHIPPED_MIX if config is None else load_config(SFTConfig, config)
    cfg = dataclasses.replace(base, memory=memory_config)
    cache = Path.home() / ".cache" / "memory3" / "runs" / ".cache"
    data = SFTData(cfg, tokenizer, cache)
    return fisher_from_data(model, tokenizer, memory_config, data, groups, seed, progress)


def layer_sensitivity(calibration: CodecCalibration) -> dict[str, list[float]]:
    """Trace of each memory layer's Fisher matrices (summed over kv heads), keys and values: how
    much the answers move per unit of squared error there."""
    return {
        "keys": np.trace(calibration.key_fisher, axis1=2, axis2=3).sum(1).tolist(),
        "values": np.trace(calibration.value_fisher, axis1=2, axis2=3).sum(1).tolist(),
    }
