"""The Hugging Face model families memory3 runs, and the mapping between their config.json and
`ModelConfig`, both ways.

    llama    LlamaForCausalLM    Llama 2/3.x, SmolLM2; RoPE scaling (llama3, linear, dynamic,
                                 yarn); optional attention/MLP biases
    mistral  MistralForCausalLM  Mistral; a sliding window runs up to its length
    qwen2    Qwen2ForCausalLM    Qwen2, Qwen2.5; biases on q/k/v
    qwen3    Qwen3ForCausalLM    Qwen3 (dense); RMSNorm of q and k per head

A config field that changes the computation and that memory3 does not implement is refused by
name (`UNSUPPORTED`), never ignored: a model that converts runs as transformers runs it, which
the parity tests check on random models of every family.
"""

from __future__ import annotations

from typing import Any

import torch

from memory3.config import FAMILIES, ModelConfig
from memory3.errors import CheckpointError, ConfigError
from memory3.rope import standard_scaling

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

# Fields of other architectures' configs (or of these ones, at values memory3 does not run):
# each is refused by name when set to anything but its neutral value.
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "hidden_act": ("silu", "swish"),
    "partial_rotary_factor": (None, 1, 1.0),
    "attn_logit_softcapping": (None,),
    "final_logit_softcapping": (None,),
    "logits_scaling": (None, 1, 1.0),
    "embedding_multiplier": (None, 1, 1.0),
    "residual_multiplier": (None, 1, 1.0),
    "attention_multiplier": (None,),
    "num_experts": (None, 0),
    "num_local_experts": (None, 0),
    "use_qk_norm": (None, False),
    "no_rope_layers": (None,),
}


def family_of(hf: dict[str, Any]) -> str:
    """The family of a config.json by its model_type (or, without one, its architecture)."""
    kind = hf.get("model_type")
    if kind is None:
        arch = (hf.get("architectures") or ["LlamaForCausalLM"])[0]
        kind = next((f for f, a in ARCHITECTURES.items() if a == arch), arch)
    if kind not in FAMILIES:
        raise CheckpointError(
            f"model type {kind!r} is not supported; memory3 converts {', '.join(FAMILIES)} checkpoints"
        )
    return kind


def _refuse_unsupported(hf: dict[str, Any], family: str) -> None:
    for name, neutral in UNSUPPORTED.items():
        value = hf.get(name)
        if name in hf and value not in neutral:
            raise CheckpointError(f"config field {name}={value!r} is not supported by memory3 ({family})")
    if family in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
        raise CheckpointError(
            f"config field use_sliding_window=True is not supported ({family} slides per layer); "
            "set it to false, as released Qwen checkpoints do"
        )
    if family != "llama" and hf.get("mlp_bias"):
        raise CheckpointError(f"config field mlp_bias=True is not supported for {family}")
    if family in ("mistral", "qwen2") and hf.get("attention_bias"):
        raise CheckpointError(f"config field attention_bias=True is not supported for {family}")


def config_from_hf(hf: dict[str, Any], name: str = "hf") -> ModelConfig:
    """Map a Hugging Face config.json of a supported family to our ModelConfig."""
    family = family_of(hf)
    _refuse_unsupported(hf, family)
    try:
        scaling = standard_scaling(hf)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    n_head = hf["num_attention_heads"]
    theta = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    eos = hf.get("eos_token_id", 2)
    bos = hf.get("bos_token_id")
    attention_bias = bool(hf.get("attention_bias", False))
    window = hf.get("sliding_window") if family == "mistral" else None
    return ModelConfig(
        name=name,
        vocab_size=hf["vocab_size"],
        n_layer=hf["num_hidden_layers"],
        n_head=n_head,
        n_kv_head=hf.get("num_key_value_heads") or n_head,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_head,
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        rope_theta=float(theta),
        rms_eps=hf.get("rms_norm_eps", 1e-5),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=bos if bos is not None else 1,
        eos_token_id=eos[0] if isinstance(eos, list) else (eos if eos is not None else 2),
        family=family,
        qkv_bias=family == "qwen2" or attention_bias,
        o_bias=attention_bias and family in ("llama", "qwen3"),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        qk_norm=family == "qwen3",
        rope_scaling=scaling,
        sliding_window=int(window) if window else None,
    )


def hf_config_from(c: ModelConfig, attn_implementation: str | None = None) -> Any:
    """The transformers config of the same model (its family's class)."""
    import transformers

    cls = getattr(transformers, ARCHITECTURES[c.family].replace("ForCausalLM", "Config"))
    expected = {
        "llama": (c.qkv_bias, c.qkv_bias, False),
        "mistral": (False, False, False),
        "qwen2": (True, False, False),
        "qwen3": (c.qkv_bias, c.qkv_bias, True),
    }[c.family]
    if (c.qkv_bias, c.o_bias, c.qk_norm) != expected or (c.mlp_bias and c.family != "llama"):
        raise CheckpointError(
            f"this model (q/k/v bias {c.qkv_bias}, output bias {c.o_bias}, q/k norm {c.qk_norm}, "
            f"MLP bias {c.mlp_bias}) is not a {c.family} model that transformers can build"
        )
    kwargs: dict[str, Any] = dict(
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
    )
    if c.rope_scaling:
        kwargs["rope_scaling"] = dict(c.rope_scaling)
    if c.family in ("llama", "qwen3"):
        kwargs["attention_bias"] = c.qkv_bias
    if c.family == "llama":
        kwargs["mlp_bias"] = c.mlp_bias
    if c.family == "mistral":
        kwargs["sliding_window"] = c.sliding_window
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    return cls(**kwargs)


def to_hf(model: Any, attn_implementation: str | None = None) -> Any:
    """The same weights as its family's transformers model (no memory): for comparisons, for
    `save_pretrained` (`memory3 export`), and for tools that take a Hugging Face model. Same
    device and dtype."""
    import transformers

    c = model.config
    cls = getattr(transformers, ARCHITECTURES[c.family])
    hf = cls(hf_config_from(c, attn_implementation))
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    missing = [m for m in missing if "rotary" not in m and not (c.tie_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise CheckpointError(
            f"weights do not map onto {cls.__name__}: missing {missing}, unexpected {unexpected}"
        )
    if c.tie_embeddings:
        hf.tie_weights()
    return hf.to(device=model.device, dtype=model.dtype).eval()


def state_from_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers state dict with what memory3 does not keep (RoPE buffers) left out."""
    return {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
