"""Document changes to a memory bank that become visible together, or not at all."""

from __future__ import annotations

from collections.abc import Sequence

from memory3.errors import StoreError
from memory3.faults import crash_point
from memory3.memory.meta import Place, RefMeta
from memory3.memory.store import MemoryStore
from memory3.memory.write import Memories


class DocumentBatch:
    """Document changes that become visible together, in one SQLite transaction, or not at all.

    `put` writes a document's records to the shards at once (fsynced) but adds no row, so no
    reader sees them; `delete` only notes the document. `commit` then marks the old versions
    deleted and inserts every new row in one transaction. A crash before that commit leaves no
    trace once a writer opens the store again (its records lie past the committed end of their
    shard and are cut off), and `abort` gives their space back at once. Memories are written in
    as many `put`s as the caller likes (a server writes a few documents between two decoding
    batches), while the batch stays all or nothing."""

    def __init__(self, store: MemoryStore) -> None:
        store._begin_batch(self)
        self.store = store
        self._puts: dict[str, list[tuple[RefMeta, Place]]] = {}
        self._deletes: set[str] = set()
        self._open = True

    def _check_open(self) -> None:
        if not self._open:
            raise StoreError("this batch is finished (committed or aborted); begin another")

    def put(self, doc_id: str, refs: Sequence[RefMeta], mem: Memories) -> None:
        """Stage a document's new version (replacing any version already in the store)."""
        with self.store._lock:
            self._check_open()
            refs = list(refs)
            if not refs:
                raise ValueError(f"document {doc_id!r} has no references to store")
            if any(r.doc_id != doc_id for r in refs):
                raise ValueError(f"put({doc_id!r}) got references of other documents")
            if len({r.chunk for r in refs}) != len(refs):
                raise ValueError(f"document {doc_id!r}: two references share a chunk number")
            places = self.store._write_records(mem, len(refs))
            crash_point("store.batch_records_written")
            self._puts[doc_id] = list(zip(refs, places, strict=True))
            self._deletes.discard(doc_id)

    def delete(self, doc_id: str) -> None:
        """Stage a document's deletion (a document put in this batch is dropped from it too)."""
        with self.store._lock:
            self._check_open()
            self._puts.pop(doc_id, None)
            self._deletes.add(doc_id)

    @property
    def doc_ids(self) -> list[str]:
        """Documents this batch puts or deletes."""
        return [*self._puts, *sorted(self._deletes - set(self._puts))]

    def commit(self) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
        """Apply the batch in one transaction. Returns ({doc_id: new ref ids} of every put,
        {doc_id: ref ids now deleted} of every document that had a version in the store)."""
        store = self.store
        with store._lock:
            self._check_open()
            meta = store._meta
            try:
                with meta.transaction():
                    old = {d: ids for d in [*self._puts, *self._deletes] if (ids := meta.mark_deleted(d))}
                    new = {
                        doc_id: [meta.insert(r, built=True, place=place) for r, place in items]
                        for doc_id, items in self._puts.items()
                    }
                    crash_point("store.batch_before_commit")
            except BaseException:
                self.abort()
                raise
            self._open = False
            store._end_batch(self)
            return new, old

    def abort(self) -> None:
        """Drop the batch: nothing of it was ever visible, and its staged records' space is
        written over by the next append."""
        with self.store._lock:
            self._open = False
            self._puts.clear()
            self._deletes.clear()
            self.store._end_batch(self)

    def __enter__(self) -> DocumentBatch:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None and self._open:
            self.commit()
        elif self._open:
            self.abort()
