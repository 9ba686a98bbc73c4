"""Checkpoints: our own format (safetensors + JSON, no pickle), conversion from Hugging Face
Llama-family directories and from the bundled SmolLM2 GGUF file.

A memory3 checkpoint directory holds:
  model.safetensors   weights with Hugging Face Llama names (lm_head omitted when tied)
  memory3.json        {"format": 1, "model": ModelConfig, "weights_sha256": ..., "source": ...}
  tokenizer files     as written by `tokenizer.save_pretrained`
"""

from __future__ import annotations

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
from memory3.files import recover_dir, replace_dir
from memory3.lora import LoRAConfig, apply_lora, load_lora_state, merge_lora
from memory3.model import Memory3Model
from memory3.shipped import ADAPTER_META, BUNDLED, TRAINED, bundled_gguf, models_dir, shipped_models

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
            f"Hugging Face Llama checkpoint, or {BUNDLED!r} for the bundled model."
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


def config_from_hf(hf: dict[str, Any], name: str = "hf") -> ModelConfig:
    """Map a Hugging Face Llama-family config.json to our ModelConfig."""
    arch = (hf.get("architectures") or ["LlamaForCausalLM"])[0]
    if hf.get("model_type", "llama") not in ("llama", "mistral", "qwen2") and "Llama" not in arch:
        raise CheckpointError(f"model type {hf.get('model_type')!r} ({arch}) is not Llama-family")
    if hf.get("rope_scaling"):
        raise CheckpointError(
            f"rope_scaling {hf['rope_scaling']} is not supported yet; use a model without it"
        )
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise CheckpointError("attention/MLP biases are not supported: memory3 reads bias-free Llama models")
    n_head = hf["num_attention_heads"]
    rope = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    eos = hf.get("eos_token_id", 2)
    return ModelConfig(
        name=name,
        vocab_size=hf["vocab_size"],
        n_layer=hf["num_hidden_layers"],
        n_head=n_head,
        n_kv_head=hf.get("num_key_value_heads", n_head),
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_head,
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        rope_theta=float(rope),
        rms_eps=hf.get("rms_norm_eps", 1e-5),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id", 1) if hf.get("bos_token_id") is not None else 1,
        eos_token_id=eos[0] if isinstance(eos, list) else (eos if eos is not None else 2),
    )


def model_from_state_dict(config: ModelConfig, state: dict[str, torch.Tensor]) -> Memory3Model:
    model = Memory3Model(config)
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    if config.tie_embeddings:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"weights do not match the config: missing {missing}, unexpected {unexpected}")
    return model.eval()


def to_hf_llama(model: Memory3Model, attn_implementation: str | None = None) -> Any:
    """The same weights as a transformers `LlamaForCausalLM` (no memory): for comparisons, for
    `save_pretrained`, and for tools that take a Hugging Face model. Same device and dtype."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.config
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    hf = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=c.vocab_size,
            hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size,
            num_hidden_layers=c.n_layer,
            num_attention_heads=c.n_head,
            num_key_value_heads=c.n_kv_head,
            head_dim=c.head_dim,
            max_position_embeddings=c.max_seq_len,
            rope_theta=c.rope_theta,
            rms_norm_eps=c.rms_eps,
            tie_word_embeddings=c.tie_embeddings,
            bos_token_id=c.bos_token_id,
            eos_token_id=c.eos_token_id,
            pad_token_id=c.eos_token_id,
            **extra,
        )
    )
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    missing = [m for m in missing if "rotary" not in m and not (c.tie_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise CheckpointError(
            f"weights do not map onto LlamaForCausalLM: missing {missing}, unexpected {unexpected}"
        )
    return hf.to(device=model.device, dtype=model.dtype).eval()


def load_hf_checkpoint(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Loaded:
    """Any Hugging Face Llama-family directory with config.json and *.safetensors."""
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


def convert_gguf(gguf: str | Path, out: str | Path, preset: str | None = None) -> Path:
    """Dequantize a Llama GGUF file through transformers + gguf and save it in our format."""
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
    Llama-family directory."""
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
# An adapter directory holds adapter.safetensors (the LoRA A/B tensors) and adapter.json (base model,
# LoRA config, memory layers and config, and how it was trained: memory3.train.adapters writes it).
ADAPTER_FORMAT = 1
ADAPTER_FILE = "adapter.safetensors"


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
    name: str | Path = TRAINED, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Any:
    """The base model with the adapter merged (a plain Memory3Model) -> checkpoint.Loaded.
    The memory layers are those it was trained with, saved in adapter.json."""
    path = adapter_dir(name)
    meta = json.loads((path / ADAPTER_META).read_text())
    if meta.get("format") != ADAPTER_FORMAT:
        raise CheckpointError(
            f"{path}: adapter format {meta.get('format')}, this memory3 reads {ADAPTER_FORMAT}"
        )
    base = load_pretrained(meta["base"])  # fp32, merged before any cast
    lora = LoRAConfig.from_dict(meta["lora"])
    model = base.model
    apply_lora(model, lora)
    state = {k: v.float() for k, v in load_file(path / ADAPTER_FILE).items()}
    load_lora_state(model, state)
    merge_lora(model)
    for p in model.parameters():
        p.requires_grad_(False)
    model.set_memory_layers(tuple(meta["memory_layers"]))
    model = model.to(device=device, dtype=dtype).eval()
    digest = hashlib.sha256()
    digest.update(str(base.meta.get("weights_sha256", base.path)).encode())
    digest.update((path / ADAPTER_FILE).read_bytes())
    model._memory3_fingerprint = fingerprint(model.config, digest.hexdigest())  # type: ignore[assignment]
    meta["memory_config"] = MemoryConfig.from_dict(meta["memory"]).to_dict()
    return Loaded(model, base.tokenizer, path, meta)
