"""Exporting the adapter of an SFT run's last checkpoint (`memory3 train export`), finished or
not: the result of a time-boxed session."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file

from memory3.config import parse_memory_layers
from memory3.lora import apply_lora, load_lora_state
from memory3.train.adapters import save_adapter
from memory3.train.config import from_dict
from memory3.train.loop import CKPT_DIR, CONFIG_FILE, load_base, set_memory_layers
from memory3.train.sft import SFTConfig, final_memory_config, stage_at


def adapter_from_run(run: str | Path, out: str | Path, command: str = "") -> Path:
    """Export the adapter of a run's last checkpoint (an unfinished run too: the result of a
    time-boxed session), with the run's config and counters."""
    run = Path(run)
    config = from_dict(SFTConfig, json.loads((run / CONFIG_FILE).read_text()))
    meta = json.loads((run / CKPT_DIR / "state.json").read_text())
    model, _ = load_base(config.model)
    apply_lora(model, config.lora)
    state = load_file(run / CKPT_DIR / "trainable.safetensors")
    load_lora_state(model, state)
    step = meta["state"]["step"]
    set_memory_layers(
        model, parse_memory_layers(stage_at(config, max(step - 1, 0)).memory_layers, model.config.n_layer)
    )
    info = {**meta["state"], "finished": step >= config.loop.steps}
    info["train_seconds"] = round(info.pop("seconds"), 1)
    return save_adapter(model, out, config, info, command, memory=final_memory_config(config))
