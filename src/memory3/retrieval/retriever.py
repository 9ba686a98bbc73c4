"""Retrieval from a memory bank on disk (docs/design.md, "Retrieving memories"): query text -> top-k reference ids (FAISS) ->
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

from memory3.config import MemoryConfig, layer_span
from memory3.errors import StoreError
from memory3.faults import crash_point
from memory3.files import recover_dir
from memory3.memory.batch import DocumentBatch as StoreBatch
from memory3.memory.ingest import Document, Reference, chunk_documents
from memory3.memory.manifest import INDEX_DIR, read_memory_layers
from memory3.memory.store import MemoryStore, RefMeta, VerifyReport
from memory3.memory.write import Memories, MemoryWriter, memory_fingerprint
from memory3.model import Memory3Model
from memory3.retrieval.base import Embedder, Hit
from memory3.retrieval.embed import from_spec
from memory3.retrieval.index import VectorIndex
from memory3.retrieval.leak import leak_check

log = logging.getLogger(__name__)


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
        adopt_layers: bool = True,
    ) -> StoreRetriever:
        """Open a bank for `model`: refused (both fingerprints in the message) when another model
        or memory config wrote it. The model is set to read memory in the bank's layers where they
        differ from its own (`adopt_layers`; otherwise the difference is refused with the fix),
        and left as it was if the bank is refused. `writable` enables cold start and document
        changes. `dtype`: what memories are decoded to and cached in (None: the model's dtype);
        give the KV cache's dtype (`Generator.kv_dtype`) so that no retrieval converts them, and a
        bfloat16 cache holds twice the memories a float32 one does in the same RAM."""
        own = tuple(model.memory_layers)
        read_in_bank_layers(model, path, adopt_layers)
        try:
            return cls._open(path, model, tokenizer, writable, cache_size, embedder, dtype)
        except BaseException:
            if tuple(model.memory_layers) != own:
                model.set_memory_layers(own)  # refused: the model reads as it did
            raise

    @classmethod
    def _open(
        cls,
        path: str | Path,
        model: Memory3Model,
        tokenizer: Any,
        writable: bool,
        cache_size: int,
        embedder: Embedder | None,
        dtype: torch.dtype | None,
    ) -> StoreRetriever:
        from memory3.memory.manifest import read_manifest

        path = Path(path)
        manifest = read_manifest(path)
        mem_cfg = MemoryConfig.from_dict(manifest["memory"])
        store = MemoryStore.open(
            path, expect_fingerprint=memory_fingerprint(model, mem_cfg), readonly=not writable
        )
        try:
            store.check_files()
        except BaseException:
            store.close()
            raise
        index_dir = path / INDEX_DIR
        if not (recover_dir(index_dir) / "index.json").exists():
            store.close()
            raise StoreError(
                f"{index_dir}: the bank has no retrieval index; finish the build (run the same "
                f"`memory3 build … --out {path}` again) or index it anew (`memory3 store reindex {path}`)"
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
            writer = MemoryWriter.for_model(model, tokenizer, mem_cfg)
        retriever = cls(store, index, embedder, writer, tokenizer, cache_size, dtype or model.dtype)
        retriever.reconcile_index()
        return retriever

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
        is_leak = leak_check(leak_texts, leak_threshold)
        for qi in range(len(ids)):
            hits: list[Hit] = []
            for s, i in zip(scores[qi], ids[qi], strict=True):
                r = meta.get(int(i))
                if r is None or r.deleted or (not r.built and self.writer is None):
                    continue
                if is_leak(qi, r.text):
                    continue  # the next hit takes the slot
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
            raise ValueError(
                "this memory bank is open read-only: open it for writing to change documents "
                "(StoreRetriever.open(…, writable=True), `memory3 serve --writable`)"
            )
        return self.writer

    def begin_documents(self, replace: bool = True) -> DocumentBatch:
        """Begin a batch of document changes that becomes retrievable as a whole or not at all
        (`DocumentBatch`): add documents in as many steps as you like, then `commit`."""
        self._require_writer()
        return DocumentBatch(self, replace)

    def add_documents(
        self, docs: Sequence[Document | dict[str, Any]], replace: bool = True
    ) -> list[dict[str, Any]]:
        """Chunk, write, store and index documents (`Document`s, or dicts with `text` and
        optionally `id`, `title`, `metadata`), all of them or none: a crash or an error at any
        point leaves the bank as it was. An existing document with the same id is replaced
        as a unit: readers see the old version or the new one, never neither.
        Returns per document {"id", "reference_ids"}."""
        with self._lock, self.begin_documents(replace) as batch:
            batch.add(docs)
        return batch.result

    def delete_documents(self, doc_ids: Sequence[str]) -> int:
        """Delete documents, together: their references are never retrieved again. Returns how
        many of the documents existed."""
        with self._lock, self.begin_documents() as batch:
            batch.delete(doc_ids)
        return len(batch.deleted)

    def _save_index(self) -> None:
        self.index.save(self.store.path / INDEX_DIR)
        crash_point("batch.index_saved")
        self.store.set_index_info({**(self.store.manifest.get("index") or {}), **self.index.describe()})

    def reconcile_index(self, save: bool | None = None) -> dict[str, int]:
        """Make the index hold exactly the references the store can retrieve: index the ones a
        crash left committed but unindexed (their texts are embedded again), and remove entries
        of references the store no longer has. `save` (default: when the bank is open for
        writing) writes the repaired index; a read-only bank is repaired in memory only.
        Returns {"indexed": …, "removed": …}."""
        save = self.writer is not None if save is None else save
        with self._lock:
            missing, extra = index_drift(self.store, self.index)
            if extra.size:
                self.index.remove(extra)
            if missing.size:
                texts = self.store.texts(missing.tolist())
                self.index.add(self.embedder.embed(texts), missing)
            if missing.size or extra.size:
                log.warning(
                    "%s: the index lacked %d references and held %d it should not (an interrupted write); repaired%s",
                    self.store.path,
                    missing.size,
                    extra.size,
                    "" if save else " in memory (open the bank for writing to save it)",
                )
                if save:
                    self._save_index()
            return {"indexed": int(missing.size), "removed": int(extra.size)}

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


class DocumentBatch:
    """Document changes to a bank that become retrievable together, or leave no trace.

    `add` chunks documents, writes their memories and stages their records in the store (on
    disk, invisible to readers) and embeds their references; `delete` notes documents to delete.
    `commit` applies everything in one store transaction, then updates and saves the index. A
    crash before the store's commit leaves the bank as it was; a crash after it leaves
    references the index lacks, which `StoreRetriever.open` indexes (`reconcile_index`). Use it
    as a context manager (commits on success, aborts on an exception) or call `commit` / `abort`.
    After `commit`: `result` (per added document {"id", "reference_ids"}), `deleted` (ids of
    the deleted documents that existed) and `replaced` (added documents that had a version)."""

    def __init__(self, retriever: StoreRetriever, replace: bool = True, write_batch: int = 16) -> None:
        self.retriever = retriever
        self.replace = replace
        self.write_batch = write_batch
        self._store_batch = StoreBatch(retriever.store)
        self._vectors: dict[str, np.ndarray] = {}
        self._added: list[str] = []
        self._deleting: list[str] = []
        self.result: list[dict[str, Any]] = []
        self.deleted: list[str] = []
        self.replaced: list[str] = []

    def add(self, docs: Sequence[Document | dict[str, Any]]) -> None:
        """Write the memories of these documents and stage them."""
        r = self.retriever
        writer = r._require_writer()
        docs = [d if isinstance(d, Document) else _document(d) for d in docs]
        seen: set[str] = set()
        for d in docs:
            if d.doc_id in seen or d.doc_id in self._added:
                raise ValueError(f"document {d.doc_id!r} appears twice in one batch; give each document once")
            seen.add(d.doc_id)
        by_doc: dict[str, list[Reference]] = {}
        for ref in chunk_documents(docs, r.tokenizer, r.memory_config.reference_tokens):
            by_doc.setdefault(ref.doc_id, []).append(ref)
        with r._lock:
            for doc in docs:
                rs = by_doc.get(doc.doc_id, [])
                if not rs:
                    raise ValueError(f"document {doc.doc_id!r} has no text to remember")
                if not self.replace and len(r.store.doc_refs(doc.doc_id)):
                    raise ValueError(f"document {doc.doc_id!r} exists; replace it or delete it first")
            for doc in docs:
                rs = by_doc[doc.doc_id]
                parts = []
                with torch.inference_mode():
                    for i in range(0, len(rs), self.write_batch):
                        parts.append(writer.write([list(x.token_ids) for x in rs[i : i + self.write_batch]]))
                mem = parts[0] if len(parts) == 1 else _cat_memories(parts)
                metas = [RefMeta(x.doc_id, x.index, x.text, x.title, x.token_ids) for x in rs]
                self._store_batch.put(doc.doc_id, metas, mem)
                self._vectors[doc.doc_id] = r.embedder.embed([x.text for x in rs])
                self._added.append(doc.doc_id)

    def delete(self, doc_ids: Sequence[str]) -> None:
        """Note documents to delete (unknown ids are counted out at `commit`)."""
        for d in doc_ids:
            self._store_batch.delete(d)
            self._vectors.pop(d, None)
            if d in self._added:
                self._added.remove(d)
            self._deleting.append(d)

    def commit(self) -> list[dict[str, Any]]:
        r = self.retriever
        with r._lock:
            new, old = self._store_batch.commit()
            crash_point("batch.committed")
            for doc_id, ids in new.items():
                r.index.add(self._vectors[doc_id], np.array(ids, dtype=np.int64))
            gone = [i for ids in old.values() for i in ids]
            if gone:
                r.index.remove(gone)
                r.cache.drop(gone)
            if new or gone:
                r._save_index()
        self.result = [{"id": d, "reference_ids": new[d]} for d in self._added]
        self.deleted = [d for d in dict.fromkeys(self._deleting) if d in old]
        self.replaced = [d for d in self._added if d in old]
        return self.result

    def abort(self) -> None:
        self._store_batch.abort()
        self._vectors.clear()

    def __enter__(self) -> DocumentBatch:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def _cat_memories(parts: list[Memories]) -> Memories:
    return Memories(
        torch.cat([m.k for m in parts]),
        torch.cat([m.v for m in parts]),
        torch.cat([m.positions for m in parts]),
        parts[0].fingerprint,
    )


def index_drift(store: MemoryStore, index: VectorIndex) -> tuple[np.ndarray, np.ndarray]:
    """(references the store can retrieve that the index lacks, index entries of references the
    store cannot retrieve). A bank's index holds its live references and, in a cold-start bank,
    its pending ones."""
    want = np.union1d(store.live_ids(), store.pending_ids())
    have = np.sort(index.ids())
    return np.setdiff1d(want, have, assume_unique=True), np.setdiff1d(have, want, assume_unique=True)


def _document(d: dict[str, Any]) -> Document:
    text = d.get("text")
    if not isinstance(text, str) or not text.strip():
        raise ValueError("a document needs a non-empty 'text'")
    doc_id = d.get("id") or "doc:" + hashlib.sha256(text.encode()).hexdigest()[:16]
    return Document(str(doc_id), text, str(d.get("title") or ""), dict(d.get("metadata") or {}))


def verify_bank(path: str | Path) -> VerifyReport:
    """Check everything a reader of the bank at `path` depends on, reporting every problem:
    the manifest, the metadata, every record's checksum (`MemoryStore.verify`), and the
    retrieval index — present, loadable, naming its embedder, and holding exactly the
    references the store can retrieve."""
    path = Path(path)
    with MemoryStore.open(path) as store:
        report = store.verify()
        index_dir = path / INDEX_DIR
        try:
            index = VectorIndex.load(index_dir)
        except FileNotFoundError:
            report.errors.append(
                f"index: {index_dir} missing; finish the build or run `memory3 store reindex {path}`"
            )
        except StoreError as e:
            report.errors.append(f"index: {e}")
        else:
            missing, extra = index_drift(store, index)
            fix = f"open the bank for writing to repair it (`memory3 store reindex {path}`)"
            if missing.size:
                report.errors.append(
                    f"index: {missing.size} retrievable references are not in the index (ids "
                    f"{missing[:5].tolist()}…); {fix}"
                )
            if extra.size:
                report.errors.append(
                    f"index: {extra.size} entries point to references the store does not have (ids "
                    f"{extra[:5].tolist()}…); {fix}"
                )
            if not (store.manifest.get("index") or {}).get("embedder"):
                report.errors.append(
                    f"manifest: the index section does not name the embedder; run `memory3 store reindex {path}`"
                )
            report.counts["index_entries"] = index.ntotal
    report.ok = not report.errors
    return report


def read_in_bank_layers(model: Any, store: str | Path, adopt: bool = True) -> None:
    """Make `model` read memory in the layers whose memories the bank `store` holds: set them
    where they differ (`adopt`), or say how to (not `adopt`: the caller asked for other layers)."""
    bank = read_memory_layers(store)
    have = tuple(model.memory_layers)
    if bank is None or bank == have or bank[-1] >= model.config.n_layer:
        return  # nothing to change, or another model's bank: its fingerprint check says so
    if not adopt:
        raise ValueError(
            f"memory bank {store} holds memories of layers {layer_span(bank)}, not the "
            f"{layer_span(have)} asked for: its memories were written when it was built. Drop "
            f"--memory-layers to read it in its own layers, or build another bank with `memory3 "
            f"build SOURCE --out DIR --memory-layers {layer_span(have)}`"
        )
    log.info(
        "reading %s in its memory layers %s (the model's own: %s)", store, layer_span(bank), layer_span(have)
    )
    model.set_memory_layers(bank)
