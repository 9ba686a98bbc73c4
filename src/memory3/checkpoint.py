"""Checkpoints: our own format (safetensors + JSON, no pickle), conversion from Hugging Face
directories of the supported families (memory3.families) and from GGUF files, and export back to
a Hugging Face directory.

A memory3 checkpoint directory holds:
  model.safetensors   weights with Hugging Face Llama names (lm_head omitted when tied)
  memory3.json        {"format": 1, "model": ModelConfig, "weights_sha256": ..., "source": ...}
  tokenizer files     as written by `tokenizer.save_pretrained`
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from memory3.config import MemoryConfig, ModelConfig, fingerprint
from memory3.errors import CheckpointError
from memory3.families import config_from_hf, state_from_hf, to_hf
from memory3.files import recover_dir, replace_dir
from memory3.lora import (
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    LoRAConfig,
    apply_lora,
    from_peft_state,
    load_lora_state,
    lora_config_from_peft,
    merge_lora,
)
from memory3.model import Memory3Model
from memory3.shipped import ADAPTER_META, BUNDLED, HF_IDS, TRAINED, bundled_gguf, models_dir, shipped_models

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
META_FILE = "memory3.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass
class Loaded:
    model: Memory3Model
    tokenizer: Any  # a transformers PreTrainedTokenizerFast
    path: Path
    meta: dict[str, Any]

    @property
    def memory_config(self) -> MemoryConfig:
        """How this model writes and reads memories: what it was trained with (a trained adapter
        saves it), else the paper's defaults."""
        saved = self.meta.get("memory_config")
        return MemoryConfig.from_dict(saved) if saved else MemoryConfig()


def home() -> Path:
    """Where converted checkpoints are cached: $MEMORY3_HOME or ~/.cache/memory3."""
    return Path(os.environ.get("MEMORY3_HOME", Path.home() / ".cache" / "memory3"))


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(
    model: Memory3Model, path: str | Path, tokenizer: Any = None, source: str = "", extra: dict | None = None
) -> Path:
    """Write atomically: a half-written checkpoint never replaces a good one."""
    path = Path(path)
    with replace_dir(path, label="checkpoint") as tmp:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        if model.config.tie_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        meta = {
            "format": FORMAT_VERSION,
            "model": model.config.to_dict(),
            "weights_sha256": _file_sha256(tmp / WEIGHTS_FILE),
            "source": source,
            **(extra or {}),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return path


def _set_fingerprint(model: Memory3Model, digest: str) -> None:
    """The fingerprint of `model` whose weights have `digest`; the digest is kept so that the
    fingerprint follows a change of memory layers (`Memory3Model.set_memory_layers`)."""
    model._memory3_weights = digest  # type: ignore[assignment]
    model._memory3_fingerprint = fingerprint(model.config, digest)  # type: ignore[assignment]


def load_checkpoint(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Loaded:
    path = recover_dir(path)
    meta_path = path / META_FILE
    if not meta_path.exists():
        if (path / "config.json").exists():
            return load_hf_checkpoint(path, device, dtype)
        raise CheckpointError(
            f"{path} is not a memory3 checkpoint ({META_FILE} missing) nor a Hugging Face model "
            f"directory (config.json missing). Give a directory written by `memory3 convert` or a "
            f"Hugging Face checkpoint (Llama, Mistral, Qwen2, Qwen3), or {BUNDLED!r} for the bundled model."
        )
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {meta.get('format')} but this memory3 reads format "
            f"{FORMAT_VERSION}; convert it again with `memory3 convert`"
        )
    config = ModelConfig.from_dict(meta["model"])
    with torch.device("meta"):
        model = Memory3Model(config)
    state = load_file(path / WEIGHTS_FILE)
    if config.tie_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model = model.to_empty(device="cpu")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match the config: missing {missing}, unexpected {unexpected}"
        )
    if config.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model = model.to(device=device, dtype=dtype).eval()
    _set_fingerprint(model, meta["weights_sha256"])
    return Loaded(model, _load_tokenizer(path), path, meta)


def _load_tokenizer(path: Path) -> Any:
    if not (path / "tokenizer.json").exists() and not (path / "tokenizer_config.json").exists():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def model_from_state_dict(config: ModelConfig, state: dict[str, torch.Tensor]) -> Memory3Model:
    model = Memory3Model(config)
    state = state_from_hf(state)
    if config.tie_embeddings:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"weights do not match the config: missing {missing}, unexpected {unexpected}")
    return model.eval()


def load_hf_checkpoint(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Loaded:
    """A Hugging Face directory of a supported family (memory3.families) with config.json and *.safetensors."""
    path = Path(path)
    hf = json.loads((path / "config.json").read_text())
    config = config_from_hf(hf, name=path.name)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors weights (pickled .bin files are not loaded)")
    state: dict[str, torch.Tensor] = {}
    h = hashlib.sha256()
    for f in files:
        state.update(load_file(f))
        h.update(_file_sha256(f).encode())
    model = model_from_state_dict(config, state).to(device=device, dtype=dtype)
    _set_fingerprint(model, h.hexdigest())
    return Loaded(model, _load_tokenizer(path), path, {"source": str(path), "model": config.to_dict()})


def export_hf(loaded: Loaded, out: str | Path) -> Path:
    """Write a model (an adapter merged into its base included) as a Hugging Face checkpoint of its
    family: config.json, model.safetensors and the tokenizer; loadable by transformers'
    `AutoModelForCausalLM` and by memory3 (`memory3 convert`, or directly as a model)."""
    from transformers.utils import logging as hf_logging

    out = Path(out)
    with replace_dir(out, label="export") as tmp:
        hf = to_hf(loaded.model)
        hf_logging.disable_progress_bar()  # one shard of a few files: no bar
        hf.save_pretrained(tmp)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(tmp)
    return out


def convert_gguf(gguf: str | Path, out: str | Path, preset: str | None = None) -> Path:
    """Dequantize a GGUF file of a supported family through transformers + gguf and save it in our format."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    log.info("converting %s (once) into %s", gguf, out)
    hf_model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = config_from_hf(hf_model.config.to_dict(), name=preset or gguf.stem)
    if preset:
        config = ModelConfig.from_preset(
            preset, bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id
        )
    model = model_from_state_dict(config, hf_model.state_dict())
    return save_checkpoint(model, out, tok, source=f"gguf:{gguf.name}")


def load_pretrained(
    name_or_path: str | Path = BUNDLED, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Loaded:
    """`smollm2-135m-instruct` (the bundled model, converted once and cached), a shipped trained
    model such as `smollm2-135m-instruct-memory3` (the bundled model with an adapter trained to read
    memory), a trained adapter directory, a memory3 checkpoint directory, or a Hugging Face
    directory of a supported family."""
    if is_adapter(name_or_path):
        return load_trained(name_or_path, device, dtype)
    if str(name_or_path) == BUNDLED:
        path = home() / "checkpoints" / BUNDLED
        if not (path / META_FILE).exists():
            convert_gguf(bundled_gguf(), path, preset="smollm2-135m")
        return load_checkpoint(path, device, dtype)
    path = Path(name_or_path)
    if not path.exists():
        raise FileNotFoundError(
            f"model {str(name_or_path)!r} not found: give a checkpoint or adapter directory, "
            f"{BUNDLED!r}, or a shipped model {shipped_models()}"
        )
    return load_checkpoint(path, device, dtype)


def load_bundled_tokenizer() -> Any:
    """The bundled SmolLM2 tokenizer alone (converting the checkpoint once if needed)."""
    path = home() / "checkpoints" / BUNDLED
    if not (path / META_FILE).exists():
        convert_gguf(bundled_gguf(), path, preset="smollm2-135m")
    return _load_tokenizer(path)


# --- trained adapters (a shipped model is its base plus one) --------------------------------------
# An adapter directory holds the LoRA tensors in PEFT's format (adapter_config.json and
# adapter_model.safetensors, loadable by `peft`) and adapter.json: base model, memory layers and
# config, and how it was trained (memory3.train.adapters writes it). Format 1 kept the tensors in
# adapter.safetensors with memory3's names, and is still read. A directory with PEFT's files alone
# (an adapter trained by `peft`) loads too: its base is its base_model_name_or_path, and it reads
# memory in the default memory layers.
ADAPTER_FORMAT = 2
ADAPTER_FILE = "adapter.safetensors"  # format 1


def is_adapter(name: str | Path) -> bool:
    """A shipped model's name or a directory holding a trained adapter (memory3's or PEFT's)."""
    path = Path(name).expanduser()
    return (
        (path / ADAPTER_META).exists()
        or (path / PEFT_CONFIG).exists()
        or (models_dir() / str(name) / ADAPTER_META).exists()
    )


def adapter_dir(name: str | Path) -> Path:
    path = Path(name).expanduser()
    if (path / ADAPTER_META).exists() or (path / PEFT_CONFIG).exists():
        return path
    shipped = models_dir() / str(name)
    if (shipped / ADAPTER_META).exists():
        return shipped
    raise FileNotFoundError(
        f"no trained adapter {str(name)!r}: give an adapter directory (with {ADAPTER_META} or PEFT's "
        f"{PEFT_CONFIG}) or one of the shipped models {shipped_models()}"
    )


@dataclass
class Adapter:
    """A trained adapter as read from its directory: memory3's metadata ({} for a PEFT-only
    adapter), its LoRA config, its tensors under memory3's names, and its base model."""

    path: Path
    meta: dict[str, Any]
    lora: LoRAConfig
    state: dict[str, torch.Tensor]
    base: str

    def canonical_bytes(self) -> bytes:
        """The tensors under memory3's names, serialized as format 1 stored them: the same
        adapter identifies the same in either format (banks written with it stay valid)."""
        from safetensors.torch import save

        return save(self.state, metadata={"format": "pt"})


def read_adapter(name: str | Path) -> Adapter:
    path = adapter_dir(name)
    meta = json.loads((path / ADAPTER_META).read_text()) if (path / ADAPTER_META).exists() else {}
    if meta and meta.get("format") not in (1, ADAPTER_FORMAT):
        raise CheckpointError(
            f"{path}: adapter format {meta.get('format')}, this memory3 reads formats 1 and {ADAPTER_FORMAT}; "
            "upgrade memory3"
        )
    peft = json.loads((path / PEFT_CONFIG).read_text()) if (path / PEFT_CONFIG).exists() else None
    try:
        if (path / PEFT_WEIGHTS).exists() and peft is not None:
            lora = lora_config_from_peft(peft)
            state = from_peft_state(load_file(path / PEFT_WEIGHTS))
        elif (path / ADAPTER_FILE).exists() and "lora" in meta:
            lora, state = LoRAConfig.from_dict(meta["lora"]), load_file(path / ADAPTER_FILE)
        else:
            raise CheckpointError(
                f"{path}: no adapter tensors ({PEFT_WEIGHTS} with {PEFT_CONFIG}, or {ADAPTER_FILE})"
            )
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    base = meta.get("base") or _peft_base(path, (peft or {}).get("base_model_name_or_path"))
    return Adapter(path, meta, lora, state, base)


def _peft_base(path: Path, name: str | None) -> str:
    """The base model a PEFT adapter names: the bundled model by its Hugging Face id, a memory3
    or Hugging Face directory (relative to the adapter or the working directory)."""
    if not name:
        raise CheckpointError(
            f"{path}/{PEFT_CONFIG} names no base_model_name_or_path; add the base model's directory"
        )
    if name in HF_IDS:
        return HF_IDS[name]
    for candidate in (Path(name).expanduser(), path / name):
        if candidate.exists():
            return str(candidate)
    raise CheckpointError(
        f"{path}: the base model {name!r} is not on this machine (nothing is downloaded): convert it "
        f"with `memory3 convert` or point base_model_name_or_path in {PEFT_CONFIG} at a local directory"
    )


def load_trained(
    name: str | Path = TRAINED, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Any:
    """The base model with the adapter merged (a plain Memory3Model) -> checkpoint.Loaded.
    The memory layers are those it was trained with, saved in adapter.json."""
    adapter = read_adapter(name)
    meta = dict(adapter.meta)
    base = load_pretrained(adapter.base)  # fp32, merged before any cast
    model = base.model
    try:
        apply_lora(model, adapter.lora)
        load_lora_state(model, {k: v.float() for k, v in adapter.state.items()})
    except ValueError as e:
        raise CheckpointError(f"{adapter.path}: {e}") from None
    merge_lora(model)
    for p in model.parameters():
        p.requires_grad_(False)
    if "memory_layers" in meta:
        model.set_memory_layers(tuple(meta["memory_layers"]))
    model = model.to(device=device, dtype=dtype).eval()
    digest = hashlib.sha256()
    digest.update(str(base.meta.get("weights_sha256", base.path)).encode())
    old = (adapter.path / ADAPTER_FILE).exists() and not (adapter.path / PEFT_WEIGHTS).exists()
    digest.update((adapter.path / ADAPTER_FILE).read_bytes() if old else adapter.canonical_bytes())
    _set_fingerprint(model, digest.hexdigest())
    meta.setdefault("base", adapter.base)
    meta["lora"] = dataclasses.asdict(adapter.lora)
    if "memory" in meta:
        meta["memory_config"] = MemoryConfig.from_dict(meta["memory"]).to_dict()
    return Loaded(model, base.tokenizer, adapter.path, meta)
