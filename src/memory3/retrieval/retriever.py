"""Retrieval from a memory bank on disk (SPEC §4): query text -> top-k reference ids (FAISS) ->
leak filter -> decoded memories through an LRU cache -> what generation reads.

Cold start (§3.1): references registered but not yet written are written the first time they are
retrieved, stored, and kept. The same object manages knowledge (add, replace, delete documents),
so a server can change the bank while it runs.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memory3.config import MemoryConfig
from memory3.memory.ingest import Document, Reference, chunk_documents
from memory3.memory.store import MemoryStore, RefMeta
from memory3.memory.write import Memories, MemoryWriter, memory_fingerprint, reference_prefix_ids
from memory3.model import Memory3Model
from memory3.retrieval.base import Embedder, Hit
from memory3.retrieval.embed import from_spec
from memory3.retrieval.index import VectorIndex
from memory3.retrieval.leak import leaks

log = logging.getLogger(__name__)

INDEX_SUBDIR = "index"


class MemoryCache:
    """LRU cache of decoded memories, keyed by ref id (neighbouring chunks often retrieve the
    same references, §4). capacity 0 disables it: every memory is read from disk."""

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"cache size must be ≥ 0, got {capacity}")
        self.capacity = capacity
        self._items: OrderedDict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, ref_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        item = self._items.get(ref_id)
        if item is None:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end(ref_id)
        return item

    def put(self, ref_id: int, item: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        if self.capacity == 0:
            return
        self._items[ref_id] = item
        self._items.move_to_end(ref_id)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def drop(self, ref_ids: Sequence[int]) -> None:
        for i in ref_ids:
            self._items.pop(int(i), None)

    def __len__(self) -> int:
        return len(self._items)


class StoreRetriever:
    """A `Retriever` over a `MemoryStore` and its FAISS index.

    store: the bank (opened for writing when documents may be added or cold start is on).
    writer: needed for cold start and for adding documents; None for a read-only retriever.
    """

    def __init__(
        self,
        store: MemoryStore,
        index: VectorIndex,
        embedder: Embedder,
        writer: MemoryWriter | None = None,
        tokenizer: Any = None,
        cache_size: int = 4096,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.store = store
        self.index = index
        self.embedder = embedder
        self.writer = writer
        self.tokenizer = tokenizer
        self.cache = MemoryCache(cache_size)
        self.dtype = dtype
        self.memory_config = MemoryConfig.from_dict(store.manifest["memory"])
        self._lock = threading.RLock()

    # -- opening -----------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        path: str | Path,
        model: Memory3Model,
        tokenizer: Any = None,
        writable: bool = False,
        cache_size: int = 4096,
        embedder: Embedder | None = None,
        dtype: torch.dtype | None = None,
    ) -> StoreRetriever:
        """Open a bank for `model`: refused (both fingerprints in the message) when another model
        or memory config wrote it. `writable` enables cold start and document changes. `dtype`:
        what memories are decoded to and cached in (None: the model's dtype); give the KV cache's
        dtype (`Generator.kv_dtype`) so that no retrieval converts them, and a bfloat16 cache
        holds twice the memories a float32 one does in the same RAM."""
        from memory3.memory.store import read_manifest

        path = Path(path)
        manifest = read_manifest(path)
        mem_cfg = MemoryConfig.from_dict(manifest["memory"])
        store = MemoryStore.open(
            path, expect_fingerprint=memory_fingerprint(model, mem_cfg), readonly=not writable
        )
        index_dir = path / INDEX_SUBDIR
        if not (index_dir / "index.json").exists():
            raise FileNotFoundError(
                f"{index_dir}: the bank has no retrieval index; finish the build (`memory3 build`)"
            )
        index = VectorIndex.load(index_dir)
        spec = (manifest.get("index") or {}).get("embedder")
        if embedder is None:
            if spec is None:
                raise ValueError(f"{path}: the manifest does not name its embedder; pass one")
            embedder = from_spec(spec)
        writer = None
        if writable:
            if tokenizer is None:
                raise ValueError("a writable memory bank needs the tokenizer of its model")
            writer = MemoryWriter(
                model, reference_prefix_ids(tokenizer, model.config.bos_token_id, mem_cfg), mem_cfg
            )
        return cls(store, index, embedder, writer, tokenizer, cache_size, dtype or model.dtype)

    @property
    def memory_fingerprint(self) -> str:
        return self.store.memory_fingerprint

    # -- search --------------------------------------------------------------------------------
    def search(
        self,
        queries: Sequence[str],
        k: int,
        leak_texts: Sequence[str] | None = None,
        leak_threshold: float | None = None,
    ) -> list[list[Hit]]:
        if k < 1:
            raise ValueError(f"k must be ≥ 1, got {k}")
        q = self.embedder.embed(list(queries))
        fetch = k
        with self._lock:
            while True:
                # Over-fetch: deleted references and leaking ones give their slot to the next hit.
                scores, ids = self.index.search(q, min(fetch, max(1, self.index.ntotal)))
                out, short = self._filter(scores, ids, k, leak_texts, leak_threshold)
                if not short or fetch >= self.index.ntotal:
                    return out
                fetch *= 4

    def _filter(
        self,
        scores: np.ndarray,
        ids: np.ndarray,
        k: int,
        leak_texts: Sequence[str] | None,
        leak_threshold: float | None,
    ) -> tuple[list[list[Hit]], bool]:
        flat = sorted({int(i) for i in ids.ravel() if i >= 0})
        meta = {r.ref_id: r for r in self.store.refs(flat)} if flat else {}
        out, short = [], False
        for qi in range(len(ids)):
            hits: list[Hit] = []
            for s, i in zip(scores[qi], ids[qi], strict=True):
                r = meta.get(int(i))
                if r is None or r.deleted or (not r.built and self.writer is None):
                    continue
                if (
                    leak_texts is not None
                    and leak_threshold is not None
                    and leaks(leak_texts[qi], r.text, leak_threshold)
                ):
                    continue  # §4.4 leak filter: the next hit takes the slot
                hits.append(Hit(int(i), float(s), r.text, r.title, r.doc_id))
                if len(hits) == k:
                    break
            short |= len(hits) < k and int((ids[qi] >= 0).sum()) == ids.shape[1]
            out.append(hits)
        return out, short

    # -- memories --------------------------------------------------------------------------------
    def memories(self, ref_ids: Sequence[int]) -> Memories:
        ref_ids = [int(i) for i in ref_ids]
        with self._lock:
            found = {i: self.cache.get(i) for i in ref_ids}
            missing = sorted({i for i, v in found.items() if v is None})
            if missing:
                self._cold_start(missing)
                loaded = self.store.get(missing, dtype=self.dtype)
                for j, i in enumerate(missing):
                    item = (loaded.k[j], loaded.v[j], loaded.positions[j])
                    found[i] = item
                    self.cache.put(i, item)
                if missing == ref_ids:  # all read just now, in this order: no second copy
                    return Memories(loaded.k, loaded.v, loaded.positions, self.memory_fingerprint)
        items = [found[i] for i in ref_ids]
        return Memories(
            torch.stack([it[0] for it in items]),
            torch.stack([it[1] for it in items]),
            torch.stack([it[2] for it in items]),
            self.memory_fingerprint,
        )

    def _cold_start(self, ref_ids: list[int]) -> None:
        """§3.1 cold start: write the memories of references retrieved before they were built."""
        unbuilt = self.store.unbuilt(ref_ids)
        if not unbuilt:
            return
        pending = self.store.refs(unbuilt)
        if self.writer is None:
            raise ValueError(
                "references without memories were retrieved; open the bank writable for cold start"
            )
        with torch.inference_mode():
            mem = self.writer.write([list(r.tokens or ()) for r in pending])
        self.store.fill([r.ref_id for r in pending], mem)
        log.debug("cold start: wrote %d memories", len(pending))

    # -- knowledge management --------------------------------------------------------------------
    def _require_writer(self) -> MemoryWriter:
        if self.writer is None or self.tokenizer is None:
            raise ValueError("this memory bank is open read-only: open it writable to change documents")
        return self.writer

    def add_documents(
        self, docs: Sequence[Document | dict[str, Any]], replace: bool = True
    ) -> list[dict[str, Any]]:
        """Chunk, write, store and index documents (`Document`s, or dicts with `text` and
        optionally `id`, `title`, `metadata`). An existing document with the same id is replaced
        as a unit: readers see the old version or the new one, never neither.
        Returns per document {"id", "reference_ids"}."""
        writer = self._require_writer()
        docs = [d if isinstance(d, Document) else _document(d) for d in docs]
        out: list[dict[str, Any]] = []
        refs = list(chunk_documents(docs, self.tokenizer, self.memory_config.reference_tokens))
        by_doc: dict[str, list[Reference]] = {}
        for r in refs:
            by_doc.setdefault(r.doc_id, []).append(r)
        with self._lock:
            for doc in docs:
                rs = by_doc.get(doc.doc_id, [])
                if not rs:
                    raise ValueError(f"document {doc.doc_id!r} has no text to remember")
                with torch.inference_mode():
                    mem = writer.write([list(r.token_ids) for r in rs])
                metas = [RefMeta(r.doc_id, r.index, r.text, r.title, r.token_ids) for r in rs]
                old = self.store.doc_refs(doc.doc_id).tolist()
                if old and not replace:
                    raise ValueError(f"document {doc.doc_id!r} exists; replace it or delete it first")
                ids = self.store.replace_doc(doc.doc_id, metas, mem) if old else self.store.add(metas, mem)
                self.index.add(self.embedder.embed([r.text for r in rs]), np.array(ids, dtype=np.int64))
                if old:
                    self.index.remove(old)
                    self.cache.drop(old)
                out.append({"id": doc.doc_id, "reference_ids": ids})
            self._save_index()
        return out

    def delete_documents(self, doc_ids: Sequence[str]) -> int:
        """Delete documents; their references are never retrieved again. Returns how many of
        the documents existed."""
        self._require_writer()
        n = 0
        with self._lock:
            for d in doc_ids:
                ids = self.store.delete_doc(d)
                if ids:
                    self.index.remove(ids)
                    self.cache.drop(ids)
                    n += 1
            self._save_index()
        return n

    def _save_index(self) -> None:
        self.index.save(self.store.path / INDEX_SUBDIR)
        self.store.set_index_info({**(self.store.manifest.get("index") or {}), **self.index.describe()})

    def list_documents(self, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        docs = self.store.doc_ids()[offset : offset + limit]
        return [self.get_document(d) or {"id": d} for d in docs]

    def get_document(self, doc_id: str) -> dict[str, Any] | None:
        ids = self.store.doc_refs(doc_id).tolist()
        if not ids:
            return None
        refs = self.store.refs(ids)
        return {
            "id": doc_id,
            "title": refs[0].title,
            "references": [
                {"id": r.ref_id, "chunk": r.chunk, "tokens": r.n_tokens, "built": r.built} for r in refs
            ],
            "text": "".join(r.text for r in refs),
        }

    def info(self) -> dict[str, Any]:
        """Counts, sizes, fingerprints and cache figures (no file-system paths: servers show it)."""
        info = {k: v for k, v in self.store.info().items() if k != "path"}
        return {
            **info,
            "cache": {
                "size": len(self.cache),
                "capacity": self.cache.capacity,
                "hits": self.cache.hits,
                "misses": self.cache.misses,
            },
        }


def _document(d: dict[str, Any]) -> Document:
    text = d.get("text")
    if not isinstance(text, str) or not text.strip():
        raise ValueError("a document needs a non-empty 'text'")
    doc_id = d.get("id") or "doc:" + hashlib.sha256(text.encode()).hexdigest()[:16]
    return Document(str(doc_id), text, str(d.get("title") or ""), dict(d.get("metadata") or {}))
