"""Exporting a run's last checkpoint (`memory3 train export`), finished or not: the result of a
time-boxed session, or a point on a training curve. Any recipe: SFT, continual (stage 2) or warmup."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from memory3.checkpoint import save_checkpoint
from memory3.config import parse_memory_layers
from memory3.files import recover_dir
from memory3.train.adapters import save_adapter
from memory3.train.config import from_dict, to_dict
from memory3.train.loop import (
    CKPT_DIR,
    CONFIG_FILE,
    load_base,
    load_trainable,
    prepare_trainable,
    set_memory_layers,
)


def recipe_of(config: dict[str, Any]) -> str:
    """Which recipe saved a run's config: SFT has stages, continual a paired dataset, warmup a corpus."""
    for recipe, key in (("sft", "stages"), ("continual", "dataset"), ("warmup", "corpus")):
        if key in config:
            return recipe
    raise ValueError("not the config of a memory3 training run (no stages, dataset or corpus)")


def _config_class(recipe: str) -> Any:
    if recipe == "sft":
        from memory3.train.sft import SFTConfig

        return SFTConfig
    if recipe == "continual":
        from memory3.train.continual import ContinualConfig

        return ContinualConfig
    from memory3.train.warmup import WarmupConfig

    return WarmupConfig


def _memory_layers(recipe: str, config: Any, step: int) -> str:
    """The layers that read memory at `step` ("" keeps the model's own)."""
    if recipe == "sft":
        from memory3.train.sft import stage_at

        return stage_at(config, max(step - 1, 0)).memory_layers
    return getattr(config, "memory_layers", "")


def adapter_from_run(run: str | Path, out: str | Path, command: str = "", config_file: str = "") -> Path:
    """Export a run's last checkpoint: its adapter (LoRA runs) or model (full training), with the
    run's config and counters. `command`: the commands that made the run, recorded as given;
    without one, `config_file` (the config the run was started with) makes the recipe's command."""
    run = Path(run)
    if not (run / CONFIG_FILE).exists():
        raise FileNotFoundError(f"{run}: no {CONFIG_FILE}; give the --out directory of a `memory3 train` run")
    raw = json.loads((run / CONFIG_FILE).read_text())
    try:
        recipe = recipe_of(raw)
    except ValueError as e:
        raise ValueError(
            f"{run / CONFIG_FILE}: {e}; give the --out directory of a `memory3 train` run"
        ) from None
    if not command and config_file:
        command = f"memory3 train {recipe} --config {config_file} --out {run}"
    config = from_dict(_config_class(recipe), raw)
    ckpt = recover_dir(run / CKPT_DIR)
    if not (ckpt / "state.json").exists():
        raise FileNotFoundError(f"{run}: no checkpoint yet; export after the run has saved one")
    meta = json.loads((ckpt / "state.json").read_text())
    model, tok = load_base(config.model, config.model_overrides, config.loop.seed)
    prepare_trainable(model, config.lora, config.loop.seed)
    load_trainable(ckpt, model)
    step = meta["state"]["step"]
    layers = _memory_layers(recipe, config, step)
    if layers:
        set_memory_layers(model, parse_memory_layers(layers, model.config.n_layer))
    info = {**meta["state"], "finished": step >= config.loop.steps}
    info["train_seconds"] = round(info.pop("seconds"), 1)
    if config.lora.rank > 0:
        from memory3.train.sft import final_memory_config

        return save_adapter(model, out, config, info, command, memory=final_memory_config(config))
    return save_checkpoint(
        model,
        Path(out),
        tok,
        source=f"train:{config.model}",
        extra={"train_config": to_dict(config), "train": info, "command": command},
    )
