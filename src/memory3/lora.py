"""Low-rank adapters for parameter-efficient training, and choosing which tensors train.

A LoRA layer computes W x + (alpha / r) · B A x with W frozen, A (r, in) small random and B
(out, r) zero, so training starts from the base model exactly. `merge_lora` folds B A into W and
puts plain `nn.Linear` modules back: the merged model is an ordinary `Memory3Model` that writes
and reads memories like any other. An adapter file holds only A and B (a few MB for SmolLM2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from memory3.model import Memory3Model


@dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters (Hu et al. 2021) on the named linear layers of every block.

    rank 0 means no adapters: then `trainable` (parameter-name substrings) chooses which tensors
    are trained in full, and an empty `trainable` trains every parameter.
    """

    rank: int = 0
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    layers: tuple[int, ...] | None = None  # None = every block
    trainable: tuple[str, ...] = ()  # full training of a subset when rank == 0

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise ValueError(f"lora rank must be ≥ 0 (0 = no adapters), got {self.rank}")
        if self.rank and not self.targets:
            raise ValueError(
                "lora targets is empty: name the linear layers to adapt, e.g. ['q_proj', 'v_proj']"
            )

    @classmethod
    def from_dict(cls, d: dict) -> LoRAConfig:
        """From `to_dict`/JSON form (lists become tuples)."""
        layers = d.get("layers")
        return cls(
            rank=int(d.get("rank", 0)),
            alpha=float(d.get("alpha", 16.0)),
            targets=tuple(d.get("targets", cls.targets)),
            layers=None if layers is None else tuple(int(i) for i in layers),
            trainable=tuple(d.get("trainable", ())),
        )

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.rank else 0.0


class LoRALinear(nn.Module):
    """nn.Linear plus a trainable low-rank update. `base` keeps its name so state dicts of the
    merged model match the plain one."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator) -> None:
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        a = torch.empty(rank, base.in_features)
        bound = 1 / math.sqrt(base.in_features)  # kaiming-uniform(a=√5) as nn.Linear and peft
        a.uniform_(-bound, bound, generator=generator)
        self.lora_A = nn.Parameter(a.to(base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + (x @ self.lora_A.t().to(x.dtype)) @ self.lora_B.t().to(x.dtype) * self.scale

    def delta(self) -> Tensor:
        """The update B A · scale, shaped like the base weight."""
        return (self.lora_B @ self.lora_A) * self.scale


def _blocks(model: Memory3Model, layers: tuple[int, ...] | None) -> list[tuple[int, nn.Module]]:
    n = len(model.model.layers)
    idx = range(n) if layers is None else layers
    for i in idx:
        if not 0 <= i < n:
            raise ValueError(f"lora layer {i} out of range: the model has layers 0..{n - 1}")
    return [(i, model.model.layers[i]) for i in idx]


def apply_lora(model: Memory3Model, config: LoRAConfig, seed: int = 0) -> list[str]:
    """Replace the target linears of the chosen blocks by LoRA layers, freeze everything else;
    returns the names of the adapted modules."""
    if config.rank <= 0:
        raise ValueError("apply_lora needs rank ≥ 1")
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    names = []
    for i, block in _blocks(model, config.layers):
        for parent_name, parent in (("self_attn", block.self_attn), ("mlp", block.mlp)):
            for target in config.targets:
                mod = getattr(parent, target, None)
                if isinstance(mod, nn.Linear):
                    setattr(parent, target, LoRALinear(mod, config.rank, config.alpha, g))
                    names.append(f"model.layers.{i}.{parent_name}.{target}")
    if not names:
        raise ValueError(
            f"no linear layer matched lora targets {config.targets}; choose among q_proj, k_proj, "
            "v_proj, o_proj, gate_proj, up_proj, down_proj"
        )
    return names


def select_trainable(model: Memory3Model, patterns: tuple[str, ...]) -> list[str]:
    """Full training of the parameters whose name contains one of `patterns` (all when empty)."""
    names = []
    for name, p in model.named_parameters():
        on = not patterns or any(s in name for s in patterns)
        p.requires_grad_(on)
        if on:
            names.append(name)
    if not names:
        raise ValueError(f"no parameter name contains any of {patterns}; see model.named_parameters()")
    return names


def lora_state(model: nn.Module) -> dict[str, Tensor]:
    """Only the adapter tensors (names end in lora_A / lora_B)."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if ".lora_" in k}


def merge_lora(model: Memory3Model) -> Memory3Model:
    """Fold every adapter into its base weight and put the plain nn.Linear back (in place)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                with torch.no_grad():
                    child.base.weight += child.delta().to(child.base.weight.dtype)
                setattr(module, name, child.base)
    return model


def load_lora_state(model: Memory3Model, state: dict[str, Tensor]) -> None:
    """Copy adapter tensors into a model that `apply_lora` prepared with the same config."""
    own = {k for k in model.state_dict() if ".lora_" in k}
    missing, unexpected = own - set(state), set(state) - own
    if missing or unexpected:
        raise ValueError(
            f"adapter does not match the model's LoRA layers: missing {sorted(missing)[:4]}, "
            f"unexpected {sorted(unexpected)[:4]}; use the LoRA config saved with the adapter"
        )
    model.load_state_dict(state, strict=False)


# --- PEFT's adapter format ------------------------------------------------------------------------
# A PEFT LoRA adapter is adapter_config.json plus adapter_model.safetensors, whose tensors are named
# `base_model.model.<module>.lora_A.weight` (r, in) and `….lora_B.weight` (out, r). memory3's
# module names are transformers' names, so the mapping is the prefix and the suffix.
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
ALL_TARGETS = LoRAConfig.targets
# PEFT fields that change what an adapter computes; anything but these values is refused by name.
_PEFT_NEUTRAL: dict[str, tuple] = {
    "peft_type": ("LORA",),
    "bias": ("none",),
    "use_rslora": (False, None),
    "use_dora": (False, None),
    "fan_in_fan_out": (False, None),
    "modules_to_save": (None, []),
    "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None),
    "layer_replication": (None,),
    "lora_bias": (False, None),
    "target_parameters": (None, []),
    "trainable_token_indices": (None,),
    "use_qalora": (False, None),
    "layers_pattern": (None, "layers", ["layers"]),
    "exclude_modules": (None, [], ""),
}


def to_peft_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """`lora_state` names -> PEFT's."""
    return {f"{_PEFT_PREFIX}{k}.weight": v for k, v in state.items()}


def from_peft_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """PEFT's tensor names (with or without the adapter name `default`) -> `lora_state` names."""
    out = {}
    for k, v in state.items():
        name = k.removeprefix(_PEFT_PREFIX).removesuffix(".weight").replace(".default", "")
        if not name.endswith((".lora_A", ".lora_B")):
            raise ValueError(f"adapter tensor {k!r} is not a LoRA A/B matrix; memory3 loads LoRA adapters")
        out[name] = v
    return out


def peft_config(config: LoRAConfig, base_model: str) -> dict:
    """adapter_config.json for `config` (what PEFT's `LoraConfig` writes, its defaults elsewhere)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "target_modules": list(config.targets),
        "layers_to_transform": None if config.layers is None else list(config.layers),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def lora_config_from_peft(d: dict) -> LoRAConfig:
    """The LoRAConfig of a PEFT adapter_config.json; what memory3 does not run is refused by name."""
    for name, neutral in _PEFT_NEUTRAL.items():
        if name in d and d[name] not in neutral:
            raise ValueError(f"adapter_config.json: {name}={d[name]!r} is not supported by memory3")
    targets = d.get("target_modules") or ()
    if targets == "all-linear":
        targets = ALL_TARGETS
    elif isinstance(targets, str):
        raise ValueError(
            f"adapter_config.json: target_modules {targets!r} is a regular expression; memory3 "
            "loads adapters whose target_modules list module names"
        )
    targets = tuple(sorted({t.rsplit(".", 1)[-1] for t in targets}, key=_target_order))
    unknown = set(targets) - set(ALL_TARGETS)
    if unknown:
        raise ValueError(
            f"adapter_config.json: target_modules {sorted(unknown)} are not linear layers of a block"
        )
    layers = d.get("layers_to_transform")
    if isinstance(layers, int):
        layers = [layers]
    return LoRAConfig(
        rank=int(d["r"]),
        alpha=float(d.get("lora_alpha", 8)),
        targets=targets,
        layers=None if layers is None else tuple(int(i) for i in layers),
    )


def _target_order(name: str) -> int:
    return ALL_TARGETS.index(name) if name in ALL_TARGETS else len(ALL_TARGETS)
