"""Trained adapters: saving a LoRA adapter with the config and command that made it (loading one,
merged into its base model, is `memory3.checkpoint.load_trained`).

An adapter directory holds
  adapter.safetensors   the LoRA A/B tensors (bf16: a few MB)
  adapter.json          {"format", "base", "lora", "memory_layers", "memory", "train", "train_config",
                         "command", "lineage" (the runs that made it, oldest first), "train_total"}

"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from memory3.checkpoint import ADAPTER_FILE, ADAPTER_FORMAT, adapter_dir
from memory3.config import MemoryConfig
from memory3.lora import load_lora_state, lora_state
from memory3.shipped import ADAPTER_META
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
    save_file(state, out / ADAPTER_FILE, metadata={"format": "pt"})
    meta = {
        "format": ADAPTER_FORMAT,
        "base": config.model,
        "lora": to_dict(config.lora),
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


def init_from_adapter(model: Any, name: str | Path) -> None:
    """Copy a saved adapter's tensors into a model prepared with the same LoRA config."""
    path = adapter_dir(name)
    state = {k: v.float() for k, v in load_file(path / ADAPTER_FILE).items()}
    load_lora_state(model, state)
    log.info("LoRA initialised from %s", path)
