"""The files of a memory bank directory, and its manifest: format, fingerprints, the model and
memory configs it was written with, counts, and the retrieval index's section."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from memory3.config import MemoryConfig
from memory3.errors import StoreCorruptError, StoreError

FORMAT = "memory3-store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
META_DB = "meta.sqlite"
CODEC_DIR = "codec"
SHARD_DIR = "shards"
INDEX_DIR = "index"
LOCK_FILE = "writer.lock"


def _check_dir(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no memory bank here; check the path, or build one with `memory3 build SOURCE --out {path}`"
        )
    if not path.is_dir():
        raise StoreError(
            f"{path} is a file, not a memory bank directory; give the directory `memory3 build` made"
        )
    if not (path / MANIFEST).is_file():
        raise StoreError(
            f"{path}: not a memory bank ({MANIFEST} missing); give the directory `memory3 build` made "
            "(a build that never finished creating it left nothing to keep: delete the directory)"
        )


_MANIFEST_KEYS = ("memory_fingerprint", "codec_fingerprint", "memory", "record_bytes", "records_per_shard")


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a store, checked for format and version."""
    path = Path(path)
    _check_dir(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreCorruptError(
            f"{path / MANIFEST}: damaged, not valid JSON ({e}); restore it from a backup or rebuild the bank"
        ) from None
    if not isinstance(manifest, dict):
        raise StoreCorruptError(
            f"{path / MANIFEST}: damaged (not a JSON object); restore it or rebuild the bank"
        )
    if manifest.get("format") != FORMAT:
        raise StoreError(f"{path / MANIFEST}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("version") != FORMAT_VERSION:
        raise StoreError(
            f"{path}: store format version {manifest.get('version')!r}; this memory3 reads version "
            f"{FORMAT_VERSION}: rebuild the store or use a matching memory3"
        )
    missing = [k for k in _MANIFEST_KEYS if k not in manifest]
    if missing:
        raise StoreCorruptError(
            f"{path / MANIFEST}: damaged, fields {missing} missing; restore it from a backup or rebuild the bank"
        )
    return manifest


def read_memory_config(path: str | Path) -> MemoryConfig:
    """How a store's memories were written (kept tokens, selection, …): a bank is read with these."""
    return MemoryConfig.from_dict(read_manifest(path)["memory"])


def read_memory_layers(path: str | Path) -> tuple[int, ...] | None:
    """The layers whose memories a store holds (those its model read memory in when it was
    built), or None where its manifest does not say."""
    layers = (read_manifest(path).get("model") or {}).get("memory_layers")
    return tuple(layers) if layers else None
