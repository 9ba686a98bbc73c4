"""Training configuration: one dataclass per concern, read from and saved as JSON next to every
checkpoint, so that a run can be resumed and a shipped adapter says exactly how it was made.

`OptimConfig` and `LoopConfig` are shared by the three recipes (warmup, continual, sft); each
recipe adds its own data fields in its own config class.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from memory3.lora import LoRAConfig

T = TypeVar("T")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with a warmup-stable-decay schedule (linear warmup, constant, linear decay to min_lr)."""

    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    decay_fraction: float = 0.2  # the last 20% of the steps decay
    weight_decay: float = 0.1  # docs/design.md, "Training a model to read memory"
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    grad_accum: int = 1

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.decay_fraction <= 1:
            raise ValueError(f"decay_fraction must be in [0, 1], got {self.decay_fraction}")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be ≥ 1, got {self.grad_accum}")


@dataclass(frozen=True)
class LoopConfig:
    """How long to train and how often to log, evaluate and checkpoint."""

    steps: int = 100
    seed: int = 0
    bf16: bool = True  # autocast to bfloat16 (CPU too)
    log_every: int = 10
    checkpoint_every: int = 50  # steps; the last step always checkpoints
    checkpoint_minutes: float = 0.0  # also checkpoint when this many minutes passed (0 = off)
    eval_every: int = 0  # 0 = only at the end
    threads: int = 0  # torch threads; 0 = leave as is

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be ≥ 1, got {self.steps}")


# --- JSON round trip for nested frozen dataclasses ---------------------------------------------


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return from_dict(tp, value, where)  # type: ignore[arg-type]
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, where) if len(args) == 1 else value
    if origin is tuple and isinstance(value, list):
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        if (len(args) == 2 and args[1] is Ellipsis) or len(args) <= 1:
            return tuple(_convert(inner, v, where) for v in value)
        return tuple(_convert(a, v, where) for a, v in zip(args, value, strict=True))
    return value


def from_dict(cls: type[T], d: dict[str, Any], where: str = "") -> T:
    """Build a (nested) config dataclass from a dict; unknown keys are an error that names them."""
    names = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(d) - set(names)
    if unknown:
        raise ValueError(
            f"{where or cls.__name__}: unknown field(s) {sorted(unknown)}; known fields are {sorted(names)}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {k: _convert(hints[k], v, f"{where or cls.__name__}.{k}") for k, v in d.items()}
    return cls(**kwargs)


def save_config(obj: Any, path: str | Path) -> None:
    Path(path).write_text(json.dumps(to_dict(obj), indent=2, sort_keys=True) + "\n")


def load_config(cls: type[T], path: str | Path) -> T:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: training config not found")
    return from_dict(cls, json.loads(path.read_text()), where=str(path))


Precision = Literal["bf16", "fp32"]

__all__ = [
    "LoRAConfig",
    "LoopConfig",
    "OptimConfig",
    "field",
    "from_dict",
    "load_config",
    "save_config",
    "to_dict",
]
