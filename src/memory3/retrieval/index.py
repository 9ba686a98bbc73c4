"""A FAISS vector index with int64 ids and cosine similarity (docs/design.md, "Retrieving memories").

Vectors are L2-normalised on the way in (queries too), so inner product is cosine similarity,
whatever the embedder did. Three kinds:

- "flat": exact search, `IndexIDMap2(IndexFlatIP)`. The right choice up to some 10⁵ vectors.
- "hnsw": `IndexIDMap2(IndexHNSWFlat)`, approximate, no training, cheap incremental adds.
  HNSW cannot delete, so `remove` marks ids deleted and every search excludes them with an id
  selector (exact: a removed id is never returned); once `rebuild_deleted_fraction` of the stored
  vectors are deleted, the graph is rebuilt without them.
- "ivf": `IndexIVFFlat` with native ids (IDMap's removal assumes flat storage), trained with
  k-means on the vectors present at the first `add` (or at `rebuild()`): build it in one call with
  all vectors, or `rebuild()` after the collection has grown. Deletion is native.
- "auto" (default): flat below `auto_threshold` vectors, then ivf, retrained whenever the collection
  has grown `auto_retrain_growth` times since the last training (so the cost stays proportional
  to the size, like a growing array). Why ivf and not hnsw: at a million vectors ivf builds an
  order of magnitude faster for the same recall, and deletes natively (BENCHMARKS.md, bank).

An index directory describes itself: `index.faiss` (faiss.write_index), `ids.npy` (live ids),
`deleted.npy` (hnsw ids awaiting the next rebuild) and `index.json` (kind, dimension, config, counts,
FAISS version). No pickle.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np

from memory3.errors import StoreCorruptError
from memory3.files import recover_dir, replace_dir

log = logging.getLogger(__name__)

IndexKind = Literal["auto", "flat", "hnsw", "ivf"]
FORMAT_VERSION = 1
INDEX_FILE = "index.faiss"
META_FILE = "index.json"
IDS_FILE = "ids.npy"
DELETED_FILE = "deleted.npy"
_IVF_TRAIN_PER_LIST = 64  # k-means sample size per ivf list (FAISS needs ≥ 39)


class IndexFormatError(StoreCorruptError, ValueError):
    """An index directory that is incomplete, inconsistent or of another format."""


@dataclass(frozen=True)
class IndexConfig:
    """How the index is built and searched. Search-time fields (`hnsw_ef_search`, `ivf_nprobe`)
    may be changed on a built index: `index.config = dataclasses.replace(index.config, ...)`."""

    kind: IndexKind = "auto"
    auto_threshold: int = 50_000  # "auto": exact search below this many vectors, ivf from here on
    auto_retrain_growth: float = 8.0  # "auto": retrain ivf once the collection grew this many times
    hnsw_m: int = 32  # graph degree
    hnsw_ef_construction: int = 80
    hnsw_ef_search: int = 64  # raised to k when k is larger
    ivf_nlist: int | None = None  # None: about 4·√n lists, with ≥ 39 training vectors per list
    ivf_nprobe: int = 16
    rebuild_deleted_fraction: float = 0.25  # hnsw: rebuild once this share of vectors is deleted

    def __post_init__(self) -> None:
        if self.kind not in ("auto", "flat", "hnsw", "ivf"):
            raise ValueError(f"index kind must be 'auto', 'flat', 'hnsw' or 'ivf', got {self.kind!r}")
        for name in ("auto_threshold", "hnsw_m", "hnsw_ef_construction", "hnsw_ef_search", "ivf_nprobe"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.auto_retrain_growth <= 1:
            raise ValueError(f"auto_retrain_growth must be > 1, got {self.auto_retrain_growth}")
        if self.ivf_nlist is not None and self.ivf_nlist < 1:
            raise ValueError(f"ivf_nlist must be ≥ 1 or None, got {self.ivf_nlist}")
        if not 0 < self.rebuild_deleted_fraction <= 1:
            raise ValueError(
                f"rebuild_deleted_fraction must be in (0, 1], got {self.rebuild_deleted_fraction}"
            )


def _ivf_nlist(n: int, wanted: int | None) -> int:
    """FAISS k-means wants ≥ 39 training points per centroid; fewer lists than that is pointless."""
    nlist = wanted if wanted is not None else int(4 * math.sqrt(n))
    return max(1, min(nlist, n // 39))


class VectorIndex:
    """Cosine-similarity search over int64-keyed vectors; see the module docstring for the kinds."""

    def __init__(self, dim: int, config: IndexConfig | None = None) -> None:
        if dim < 1:
            raise ValueError(f"index dimension must be ≥ 1, got {dim}")
        self.dim = dim
        self.config = config or IndexConfig()
        self._kind: Literal["flat", "hnsw", "ivf"] = (
            "flat" if self.config.kind == "auto" else self.config.kind
        )
        self._index: Any = None  # created on the first add (ivf needs vectors to train)
        self._ids: set[int] = set()  # live ids
        self._deleted: set[int] = set()  # hnsw only: stored but removed
        self._selector: Any = None  # hnsw: excludes _deleted; keeps the selectors it points to alive
        self._trained_on = 0  # ivf: how many vectors were present at the last training

    # ---- building -------------------------------------------------------------------------------

    @classmethod
    def build(cls, vectors: np.ndarray, ids: np.ndarray, config: IndexConfig | None = None) -> VectorIndex:
        """An index over all these vectors at once (how an ivf index should be made)."""
        vectors = np.asarray(vectors)
        if vectors.ndim != 2:
            raise ValueError(f"vectors must be (n, dim), got shape {vectors.shape}")
        index = cls(vectors.shape[1], config)
        if index.config.kind == "auto" and len(vectors) >= index.config.auto_threshold:
            index._kind = "ivf"
        index.add(vectors, ids)
        return index

    @property
    def kind(self) -> Literal["flat", "hnsw", "ivf"]:
        """The kind in use ("auto" resolved)."""
        return self._kind

    @property
    def ntotal(self) -> int:
        """Number of live vectors."""
        return len(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, id_: int) -> bool:
        return int(id_) in self._ids

    def ids(self) -> np.ndarray:
        """Live ids, sorted."""
        return np.sort(np.fromiter(self._ids, dtype=np.int64, count=len(self._ids)))

    def _prepare(self, vectors: np.ndarray, what: str) -> np.ndarray:
        x = np.asarray(vectors, dtype=np.float32)
        if x.ndim == 1:
            x = x[None, :]
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"{what} must be (n, {self.dim}), got shape {np.shape(vectors)}")
        if not np.isfinite(x).all():
            raise ValueError(f"{what} contain NaN or infinite values; check the embedder output")
        x = np.array(x, dtype=np.float32, order="C", copy=True)
        faiss.normalize_L2(x)  # cosine similarity; zero rows stay zero
        return x

    def _new_index(self, train: np.ndarray) -> Any:
        cfg = self.config
        if self._kind == "flat":
            return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        if self._kind == "hnsw":
            hnsw = faiss.IndexHNSWFlat(self.dim, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            hnsw.hnsw.efConstruction = cfg.hnsw_ef_construction
            return faiss.IndexIDMap2(hnsw)
        self._trained_on = len(train)
        nlist = _ivf_nlist(len(train), cfg.ivf_nlist)
        if len(train) < 39 * nlist or len(train) < 1000:
            log.warning(
                "training an ivf index on only %d vectors (%d lists); add the whole collection at "
                "once with VectorIndex.build, or call rebuild() once it has grown",
                len(train),
                nlist,
            )
        if len(train) > _IVF_TRAIN_PER_LIST * nlist:  # k-means cost grows with n·nlist: sample
            pick = np.random.default_rng(0).choice(len(train), _IVF_TRAIN_PER_LIST * nlist, replace=False)
            train = train[np.sort(pick)]
        quantizer = faiss.IndexFlatIP(self.dim)
        ivf = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.train(train)
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # reconstruct by id, for rebuilds
        return ivf

    def add(self, vectors: np.ndarray, ids: np.ndarray | list[int]) -> None:
        """Add vectors under new int64 ids. An id already present raises: remove it first."""
        x = self._prepare(vectors, "vectors")
        id_arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(id_arr) != len(x):
            raise ValueError(f"got {len(x)} vectors but {len(id_arr)} ids")
        if len(x) == 0:
            return
        if len(np.unique(id_arr)) != len(id_arr):
            raise ValueError("ids passed to add() contain duplicates")
        new = id_arr.tolist()
        clash = [i for i in new if i in self._ids]
        if clash:
            raise ValueError(
                f"{len(clash)} id(s) already in the index (first: {clash[0]}); remove() them before "
                "adding new vectors under the same ids"
            )
        if self._deleted and any(i in self._deleted for i in new):
            self.rebuild()  # hnsw: the old vector is still stored under that id; drop it first
        if self.config.kind == "auto":
            total = len(self._ids) + len(x)
            if self._kind == "flat" and total >= self.config.auto_threshold:
                log.info("index reaches %d vectors: switching from flat to ivf", total)
                self._convert("ivf", extra=(x, id_arr))
                return
            if self._kind == "ivf" and total >= self.config.auto_retrain_growth * self._trained_on:
                log.info("index grew from %d to %d vectors: retraining ivf", self._trained_on, total)
                self._convert("ivf", extra=(x, id_arr))
                return
        if self._index is None:
            self._index = self._new_index(x)
        self._index.add_with_ids(x, id_arr)
        self._ids.update(new)

    def remove(self, ids: np.ndarray | list[int]) -> int:
        """Remove these ids (unknown ones are ignored); returns how many were removed."""
        present = [i for i in np.asarray(ids, dtype=np.int64).reshape(-1).tolist() if i in self._ids]
        if not present:
            return 0
        self._ids.difference_update(present)
        if self._kind == "hnsw":
            self._deleted.update(present)
            self._selector = None
            stored = len(self._ids) + len(self._deleted)
            if len(self._deleted) >= self.config.rebuild_deleted_fraction * stored:
                self.rebuild()
        else:
            removed = self._index.remove_ids(faiss.IDSelectorArray(np.asarray(present, dtype=np.int64)))
            assert removed == len(present), (removed, len(present))
        return len(present)

    def _stored_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(vectors, ids) of the live entries, in storage order."""
        if self._index is None or not self._ids:
            return np.zeros((0, self.dim), np.float32), np.zeros(0, np.int64)
        if self._kind == "ivf":
            ids = self.ids()
            return self._index.reconstruct_batch(ids), ids
        ids = faiss.vector_to_array(self._index.id_map).astype(np.int64)
        vectors = self._index.index.reconstruct_n(0, self._index.index.ntotal)
        if self._deleted:
            alive = ~np.isin(ids, np.fromiter(self._deleted, dtype=np.int64))
            ids, vectors = ids[alive], vectors[alive]
        return vectors, ids

    def _convert(
        self, kind: Literal["flat", "hnsw", "ivf"], extra: tuple[np.ndarray, np.ndarray] | None = None
    ) -> None:
        vectors, ids = self._stored_vectors()
        if extra is not None:
            vectors, ids = np.concatenate([vectors, extra[0]]), np.concatenate([ids, extra[1]])
        self._kind = kind
        self._index, self._ids, self._deleted, self._selector = None, set(), set(), None
        if len(ids):
            self._index = self._new_index(vectors)
            self._index.add_with_ids(vectors, ids)
            self._ids = set(ids.tolist())

    def rebuild(self, kind: Literal["flat", "hnsw", "ivf"] | None = None) -> None:
        """Rebuild from the live vectors: drops deleted hnsw entries, retrains ivf on everything
        present, or converts to another kind."""
        self._convert(kind or self._kind)

    # ---- searching ------------------------------------------------------------------------------

    def _search_params(self, k: int) -> Any:
        if self._kind == "hnsw":
            params = faiss.SearchParametersHNSW()
            params.efSearch = max(self.config.hnsw_ef_search, k)
            if self._deleted:
                if self._selector is None:
                    batch = faiss.IDSelectorBatch(np.fromiter(self._deleted, dtype=np.int64))
                    self._selector = (faiss.IDSelectorNot(batch), batch)
                params.sel = self._selector[0]
            return params
        if self._kind == "ivf":
            params = faiss.SearchParametersIVF()
            params.nprobe = min(self.config.ivf_nprobe, self._index.nlist)
            return params
        return None

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by cosine similarity: (scores (n, k) float32, ids (n, k) int64), best first;
        slots without a result (k > ntotal) have id -1 and score -inf."""
        if k < 1:
            raise ValueError(f"k must be ≥ 1, got {k}")
        q = self._prepare(queries, "queries")
        if not self._ids:
            return np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
        params = self._search_params(k)
        scores, ids = self._index.search(q, k, params=params) if params else self._index.search(q, k)
        scores[ids < 0] = -np.inf
        return scores, ids.astype(np.int64, copy=False)

    # ---- files ----------------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "kind": self._kind,
            "dim": self.dim,
            "metric": "cosine (inner product on L2-normalised vectors)",
            "ntotal": len(self._ids),
            "n_deleted": len(self._deleted),
            "nlist": int(self._index.nlist) if self._kind == "ivf" and self._index is not None else None,
            "trained_on": self._trained_on,
            "config": dataclasses.asdict(self.config),
            "faiss_version": faiss.__version__,
        }

    def save(self, path: str | Path) -> Path:
        """Write the index directory; the directory belongs to the index and is replaced, whole
        (`memory3.files.replace_dir`: a crash leaves the old index or the new one)."""
        path = Path(path)
        with replace_dir(path, label="index") as tmp:
            if self._index is not None:
                faiss.write_index(self._index, str(tmp / INDEX_FILE))
            np.save(tmp / IDS_FILE, self.ids(), allow_pickle=False)
            deleted = np.sort(np.fromiter(self._deleted, dtype=np.int64, count=len(self._deleted)))
            np.save(tmp / DELETED_FILE, deleted, allow_pickle=False)
            (tmp / META_FILE).write_text(json.dumps(self.describe(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> VectorIndex:
        path = recover_dir(path)
        meta_path = path / META_FILE
        if not meta_path.exists():
            raise FileNotFoundError(f"{path}: not an index directory ({META_FILE} missing); build one first")
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise IndexFormatError(f"{meta_path}: damaged, not valid JSON ({e}); rebuild the index") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
            raise IndexFormatError(
                f"{path}: index format {meta.get('format')} but this memory3 reads format "
                f"{FORMAT_VERSION}; rebuild the index"
            )
        try:
            index = cls(int(meta["dim"]), IndexConfig(**meta["config"]))
        except (KeyError, TypeError, ValueError) as e:
            raise IndexFormatError(f"{path}: {META_FILE} is damaged ({e}); rebuild the index") from e
        if meta.get("kind") not in ("flat", "hnsw", "ivf"):
            raise IndexFormatError(f"{path}: unknown index kind {meta.get('kind')!r} in {META_FILE}")
        index._kind = meta["kind"]
        index._trained_on = int(meta.get("trained_on", 0))
        try:
            index._ids = set(np.load(path / IDS_FILE, allow_pickle=False).tolist())
            index._deleted = set(np.load(path / DELETED_FILE, allow_pickle=False).tolist())
        except (OSError, ValueError, EOFError) as e:
            raise IndexFormatError(
                f"{path}: {IDS_FILE} or {DELETED_FILE} is damaged ({e}); rebuild the index"
            ) from None
        stored = len(index._ids) + len(index._deleted)
        if (path / INDEX_FILE).exists():
            try:
                index._index = faiss.read_index(str(path / INDEX_FILE))
            except RuntimeError as e:
                first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
                raise IndexFormatError(f"{path / INDEX_FILE}: damaged ({first}); rebuild the index") from None
            if index._index.d != index.dim or index._index.ntotal != stored:
                raise IndexFormatError(
                    f"{path}: {INDEX_FILE} holds {index._index.ntotal} vectors of dimension "
                    f"{index._index.d}, but {META_FILE}/{IDS_FILE} describe {stored} of dimension "
                    f"{index.dim}; the directory is damaged: rebuild the index"
                )
        elif stored:
            raise IndexFormatError(f"{path}: {INDEX_FILE} missing but {stored} ids listed; rebuild the index")
        return index
