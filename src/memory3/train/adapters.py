"""Trained adapters: saving a LoRA adapter with the config and command that made it (loading one,
merged into its base model, is `memory3.checkpoint.load_trained`).

An adapter directory holds
  adapter_model.safetensors, adapter_config.json
                        the LoRA A/B tensors (bf16: a few MB) in PEFT's format: `peft` loads them
                        onto the base model's transformers twin
  adapter.json          {"format", "base", "memory_layers", "memory", "train", "train_config",
                         "command", "lineage" (the runs that made it, oldest first), "train_total"}

"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from memory3.checkpoint import ADAPTER_FILE, ADAPTER_FORMAT, adapter_dir, read_adapter
from memory3.config import MemoryConfig
from memory3.lora import (
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    LoRAConfig,
    load_lora_state,
    lora_state,
    peft_config,
    to_peft_state,
)
from memory3.shipped import ADAPTER_META, HF_IDS
from memory3.train.config import to_dict

log = logging.getLogger(__name__)


def save_adapter(
    model: Any,
    out: str | Path,
    config: Any,
    info: dict[str, Any],
    command: str = "",
    memory: MemoryConfig | None = None,
) -> Path:
    """Write the LoRA tensors (bf16) and everything needed to rebuild the model from its base.
    `memory`: how the trained model reads (default: the run config's `memory`)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.to(torch.bfloat16) for k, v in lora_state(model).items()}
    if not state:
        raise ValueError("the model has no LoRA layers to save; train with lora.rank > 0")
    write_peft(out, state, config.lora, config.model)
    (out / ADAPTER_FILE).unlink(missing_ok=True)  # a format-1 file of an adapter written before
    meta = {
        "format": ADAPTER_FORMAT,
        "base": config.model,
        "memory_layers": list(model.memory_layers),
        "memory": to_dict(memory or getattr(config, "memory", MemoryConfig())),
        "train": info,
        "train_config": to_dict(config),
        "command": command,
    }
    meta["lineage"], meta["train_total"] = _lineage(config, info, command)
    (out / ADAPTER_META).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def _lineage(config: Any, info: dict[str, Any], command: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The runs that made an adapter, oldest first (the `init_adapter` it started from, and that
    one's own lineage), and what they cost together: what a user must budget to train it again."""
    init = str(getattr(config, "init_adapter", "") or "")
    chain: list[dict[str, Any]] = []
    if init:
        try:
            parent = json.loads((adapter_dir(init) / ADAPTER_META).read_text())
        except FileNotFoundError:
            log.warning("init_adapter %s is gone: the lineage starts at this run", init)
        else:
            chain = parent.get("lineage") or [
                {**parent.get("train", {}), "command": parent.get("command", "")}
            ]
    loop = getattr(config, "loop", None)
    chain = [
        *chain,
        {**info, "command": command, "init_adapter": init, "threads": getattr(loop, "threads", None)},
    ]
    total = {
        "runs": len(chain),
        "tokens": sum(int(r.get("tokens", 0)) for r in chain),
        "train_seconds": round(sum(float(r.get("train_seconds", 0.0)) for r in chain), 1),
    }
    return chain, total


def write_peft(out: Path, state: dict[str, torch.Tensor], lora: LoRAConfig, base: str) -> None:
    """The LoRA tensors (memory3's names) and config in PEFT's files. The base is named by its
    Hugging Face id where it is one of the shipped models, so that other tools find it."""
    hub = {v: k for k, v in HF_IDS.items()}.get(str(base), str(base))
    save_file(to_peft_state(state), out / PEFT_WEIGHTS, metadata={"format": "pt"})
    (out / PEFT_CONFIG).write_text(json.dumps(peft_config(lora, hub), indent=2) + "\n")


def init_from_adapter(model: Any, name: str | Path) -> None:
    """Copy a saved adapter's tensors into a model prepared with the same LoRA config."""
    adapter = read_adapter(name)
    load_lora_state(model, {k: v.float() for k, v in adapter.state.items()})
    log.info("LoRA initialised from %s", adapter.path)
