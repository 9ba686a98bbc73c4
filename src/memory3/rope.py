"""Rotary position embeddings: the frequencies of every RoPE variant memory3 runs.

A checkpoint's `rope_scaling` (Hugging Face writes it as `rope_scaling` or, since transformers 5,
inside `rope_parameters`) selects how the inverse frequencies are derived from `rope_theta`:

  default   θ^(-2i/D)
  linear    default / factor (position interpolation)
  llama3    Llama 3.1+: low frequencies divided by factor, high ones kept, a smooth ramp between
  yarn      YaRN (Qwen2.5/Qwen3 long context): a per-frequency ramp between interpolation and
            extrapolation, and cos/sin scaled by an attention factor
  dynamic   dynamic NTK: the default frequencies up to the model's `max_position_embeddings`,
            after which transformers recomputes them from the length of each call. memory3 runs
            such models up to that length (`RoPE.context_limit`), where both are the default
            (transformers ignores an `original_max_position_embeddings` given with this type).

The formulas follow the papers and transformers' `modeling_rope_utils`; the parity tests check
them against transformers' own models. Any other type is refused by name.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from memory3.errors import ConfigError

ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic")
# Every key a supported type may carry; an unknown key changes the computation in ways we do not
# know, so it is refused by name.
_KEYS = {
    "default": set(),
    "linear": {"factor"},
    "dynamic": {"factor", "original_max_position_embeddings"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
    "yarn": {
        "factor",
        "original_max_position_embeddings",
        "attention_factor",
        "beta_fast",
        "beta_slow",
        "mscale",
        "mscale_all_dim",
        "truncate",
    },
}
_REQUIRED = {
    "linear": {"factor"},
    "dynamic": {"factor"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
    "yarn": {"original_max_position_embeddings"},
}


def standard_scaling(hf: dict[str, Any]) -> dict[str, Any] | None:
    """The RoPE scaling of a Hugging Face config.json (either spelling), as a plain dict without
    `rope_theta`, or None for plain RoPE. Unsupported types and keys raise ConfigError by name."""
    raw = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"rope_scaling {raw!r} is not a mapping; expected a dict with 'rope_type'")
    if set(raw) and all(isinstance(v, dict) for v in raw.values()):
        raise ConfigError(
            f"rope_parameters per layer type {sorted(raw)} are not supported: memory3 runs one RoPE "
            "for every layer"
        )
    d = {k: v for k, v in raw.items() if k not in ("rope_theta", "partial_rotary_factor")}
    if raw.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) not in (1, 1.0, None):
        raise ConfigError(
            f"partial_rotary_factor {raw.get('partial_rotary_factor', hf.get('partial_rotary_factor'))} "
            "is not supported: memory3 rotates the whole head dimension"
        )
    kind = d.pop("rope_type", None) or d.pop("type", None) or "default"
    d.pop("type", None)
    if kind not in ROPE_TYPES:
        raise ConfigError(
            f"RoPE scaling type {kind!r} is not supported; memory3 runs {', '.join(ROPE_TYPES)}"
        )
    unknown = set(d) - _KEYS[kind]
    if unknown:
        raise ConfigError(f"RoPE scaling {kind!r}: field(s) {sorted(unknown)} are not supported")
    missing = _REQUIRED.get(kind, set()) - set(d)
    if missing:
        raise ConfigError(f"RoPE scaling {kind!r} needs {sorted(missing)}")
    if kind == "default":
        return None
    return {"rope_type": kind, **{k: d[k] for k in sorted(d)}}


@dataclass(frozen=True)
class RoPE:
    """The rotary embedding of one model: base θ, optional scaling, and the model's maximum
    position (YaRN derives its factor from it when none is given)."""

    theta: float
    scaling: dict[str, Any] | None = None
    max_position: int = 2048

    @classmethod
    def of(cls, rope: RoPE | float) -> RoPE:
        """A RoPE from itself or a bare θ (plain RoPE)."""
        return rope if isinstance(rope, RoPE) else cls(float(rope))

    def __hash__(self) -> int:
        return hash((self.theta, repr(sorted((self.scaling or {}).items())), self.max_position))

    @property
    def kind(self) -> str:
        return (self.scaling or {}).get("rope_type", "default")

    @property
    def context_limit(self) -> int | None:
        """The longest context this RoPE runs exactly as transformers does (dynamic NTK: up to
        the model's maximum position), or None for no limit beyond the model's own."""
        return self.max_position if self.kind == "dynamic" else None

    def to_dict(self) -> dict[str, Any]:
        return {"rope_theta": self.theta, "rope_scaling": self.scaling, "max_position": self.max_position}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RoPE:
        return cls(float(d["rope_theta"]), d.get("rope_scaling"), int(d.get("max_position", 2048)))

    def frequencies(self, head_dim: int, device: torch.device | str | None = None) -> tuple[Tensor, float]:
        """(D/2,) float32 inverse frequencies and the factor cos/sin are scaled by; computed once
        per RoPE, head size and device (every forward pass asks), so not to be changed in place."""
        return _frequencies(self, head_dim, str(torch.device(device or "cpu")))

    def _compute(self, dim: int, device: str) -> tuple[Tensor, float]:
        inv = 1.0 / (self.theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
        s = self.scaling or {}
        kind = self.kind
        if kind in ("default", "dynamic"):
            return inv, 1.0
        if kind == "linear":
            return inv / s["factor"], 1.0
        if kind == "llama3":
            return _llama3(inv, s), 1.0
        return _yarn(self.theta, dim, s, self.max_position, device)


@functools.lru_cache(maxsize=64)
def _frequencies(rope: RoPE, head_dim: int, device: str) -> tuple[Tensor, float]:
    with torch.inference_mode(False):  # a plain tensor, usable by training after inference
        return rope._compute(head_dim, device)


def _llama3(inv: Tensor, s: dict[str, Any]) -> Tensor:
    factor, old = s["factor"], s["original_max_position_embeddings"]
    low, high = s["low_freq_factor"], s["high_freq_factor"]
    wavelen = 2 * math.pi / inv
    out = torch.where(wavelen > old / low, inv / factor, inv)  # long wavelengths: interpolated
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * out / factor + smooth * out
    medium = ~(wavelen < old / high) * ~(wavelen > old / low)
    return torch.where(medium, smoothed, out)


def _yarn(theta: float, dim: int, s: dict[str, Any], max_position: int, device: str) -> tuple[Tensor, float]:
    original = s["original_max_position_embeddings"]
    factor = s.get("factor") or max_position / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = s.get("attention_factor")
    if attention is None:
        if s.get("mscale") and s.get("mscale_all_dim"):
            attention = mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"])
        else:
            attention = mscale(factor)
    fast, slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:  # the dimension turning `rotations` times
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    lo, hi = correction_dim(fast), correction_dim(slow)
    if s.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    if lo == hi:
        hi += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1).to(device)
    pos = theta ** (torch.arange(0, dim, 2).to(device=device, dtype=torch.float) / dim)
    extrapolate = 1 - ramp
    inv = (1.0 / (factor * pos)) * (1 - extrapolate) + (1.0 / pos) * extrapolate
    return inv, float(attention)
