"""A memory bank on disk (docs/bank-format.md): compressed memories plus the metadata of their references,
in a directory that describes itself and survives a crash at any moment.

    bank/
      manifest.json     format, fingerprints, model and memory configs, counts (atomic writes)
      codec/            the trained MemoryCodec (codec.json + FAISS quantizer files)
      shards/00000.bin  fixed-size records: [crc32 (4 B, little endian) | codec record]
      meta.sqlite       references (WAL mode): ids, documents, texts, tokens, where each record is
      writer.lock       held (flock) by the one process that may write
      index/            the retrieval index, written by memory3.retrieval (optional)

Ids. A reference's `ref_id` is assigned once (SQLite AUTOINCREMENT) and never reused; its row
says which shard and slot hold its record, so record i lives at byte `slot * record_size` of
`shards/{shard:05d}.bin`. `compact()` moves records but keeps ids, so a retrieval index built
over the ids stays valid (minus deleted references, which `live_ids`/`is_live` filter out).

Crash safety. Record bytes are written and fsynced before the SQLite transaction that points a
row at them commits, so a reader (which only follows committed rows) never sees a half-written
record. When a writer opens the store, it truncates shard files to their last committed record
and deletes shard files no committed row points to: bytes of a killed append disappear, and the
build resumes by writing the same references to the same places. Pending references
(`add_pending`, built = 0) let a build register its work first and `fill` it in batches; a build
killed with SIGKILL and restarted ends with the same references, ids and places as one that never
stopped, as long as it fills the pending ids in the same order. Their memories are the same up to
the rounding of the model's kernels: on some CPUs (AMX, bfloat16) a batch written by a new process
can differ in the last bits, so the promise is the same retrieval and answers, not the same bytes.
Document changes go through `memory3.memory.batch.DocumentBatch`: all of a batch becomes visible
in one transaction, or none of it.

One process writes (an exclusive flock on writer.lock); any number of processes read, also while
the writer appends. `compact()` deletes the old shard files and never reuses their numbers; a
reader that still holds one open keeps its disk space in use until it closes the store.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memory3.config import MemoryConfig, ModelConfig, layer_span
from memory3.errors import FingerprintMismatchError, StoreCorruptError, StoreError
from memory3.faults import crash_point
from memory3.files import WriterLock, fsync, replace_dir, write_json_atomic
from memory3.memory import meta as metadata
from memory3.memory.codec import MemoryCodec
from memory3.memory.manifest import (
    CODEC_DIR,
    FORMAT,
    FORMAT_VERSION,
    LOCK_FILE,
    MANIFEST,
    META_DB,
    SHARD_DIR,
    read_manifest,
)
from memory3.memory.meta import Metadata, Place, RefMeta, StoredRef
from memory3.memory.shards import HEADER_BYTES, Shards, bad_checksums, with_crc
from memory3.memory.write import Memories, MemoryFormatError

__all__ = ["MemoryStore", "RefMeta", "StoredRef", "VerifyReport"]

log = logging.getLogger(__name__)

SHARD_TARGET_BYTES = 256 << 20


@dataclass
class VerifyReport:
    ok: bool
    checked: int  # records whose checksum was checked
    errors: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)


def built_with(manifest: dict[str, Any]) -> str:
    """The model that built a bank, as its build named it (a shipped name or a directory); the
    architecture's name for a bank built before the name was recorded."""
    named = ((manifest.get("extra") or {}).get("build") or {}).get("model")
    return named or (manifest.get("model") or {}).get("name") or "?"


class MemoryStore:
    """A memory bank directory (see the module docstring). Open with `create` or `open`."""

    def __init__(self, path: Path, manifest: dict[str, Any], codec: MemoryCodec, readonly: bool) -> None:
        self.path = path
        self.manifest = manifest
        self.codec = codec
        self.readonly = readonly
        self.record_size = HEADER_BYTES + codec.record_bytes
        self.records_per_shard = int(manifest["records_per_shard"])
        self._lock = threading.RLock()
        self._writer_lock: WriterLock | None = None
        self._batch: Any = None  # the open DocumentBatch, if any (memory3.memory.batch)
        self._append_at: Place | None = None  # the next place while a batch holds staged records
        self.meta: Metadata | None = None
        if not readonly:
            self._writer_lock = WriterLock(path / LOCK_FILE, what=str(path))
        try:
            self.meta = Metadata(path / META_DB, readonly)
        except BaseException:
            self._release_writer_lock()
            raise
        self._shards = Shards(path / SHARD_DIR, self.record_size)
        if not readonly:
            self._recover()

    # --- opening and closing ----------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | Path,
        codec: MemoryCodec,
        memory_fingerprint: str,
        model_config: ModelConfig | dict[str, Any] | None = None,
        memory_config: MemoryConfig | dict[str, Any] | None = None,
        records_per_shard: int | None = None,
        extra: dict[str, Any] | None = None,
    ) -> MemoryStore:
        """Make an empty store for memories with `memory_fingerprint`, opened for writing. The
        directory appears complete or not at all (written aside, then renamed)."""
        path = Path(path)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise FileExistsError(
                f"{path} exists and is not an empty directory: choose a new path for the bank"
            )
        if not codec.trained:
            raise ValueError("the codec is not trained: train it (memory3.memory.codec.train_codec) first")
        if not memory_fingerprint:
            raise ValueError("memory_fingerprint is empty: pass MemoryWriter.fingerprint")
        model_d = model_config.to_dict() if isinstance(model_config, ModelConfig) else model_config
        memory_d = memory_config.to_dict() if isinstance(memory_config, MemoryConfig) else memory_config
        _check_shape(codec, model_d, memory_d)
        record_size = HEADER_BYTES + codec.record_bytes
        rps = records_per_shard or max(1, SHARD_TARGET_BYTES // record_size)
        if rps < 1:
            raise ValueError(f"records_per_shard must be ≥ 1, got {rps}")
        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "memory_fingerprint": memory_fingerprint,
            "codec_fingerprint": codec.fingerprint,
            "codec": {"config": codec.config.to_dict(), "shape": dataclasses.asdict(codec.shape)},
            "model": model_d,
            "memory": memory_d,
            "record_bytes": record_size,
            "records_per_shard": rps,
            "counts": {"live": 0, "pending": 0, "deleted": 0, "records": 0},
            "index": None,
            "extra": extra or {},
        }
        if path.exists():
            path.rmdir()  # empty, checked above
        with replace_dir(path, label="store") as tmp:
            codec.save(tmp / CODEC_DIR)
            (tmp / SHARD_DIR).mkdir()
            metadata.create(tmp / META_DB)
            write_json_atomic(tmp / MANIFEST, manifest)
        log.info("created memory store %s (%d-byte records)", path, record_size)
        return cls(path, manifest, codec, readonly=False)

    @classmethod
    def open(
        cls, path: str | Path, expect_fingerprint: str | None = None, readonly: bool = True
    ) -> MemoryStore:
        """Open a store. With `expect_fingerprint` (the reading model's memory fingerprint,
        `MemoryWriter.fingerprint`), refuse a store written by another model or memory config.
        `readonly=False` takes the writer lock and recovers from an interrupted write."""
        path = Path(path)
        manifest = read_manifest(path)
        stored = manifest["memory_fingerprint"]
        if expect_fingerprint is not None and expect_fingerprint != stored:
            raise FingerprintMismatchError(
                f"{path} holds memories with fingerprint {stored}, but the model reading them has "
                f"fingerprint {expect_fingerprint}: rebuild the store with this model and memory "
                f"config, or load the model that built it (--model {built_with(manifest)})"
            )
        codec = MemoryCodec.load(path / CODEC_DIR)
        if codec.fingerprint != manifest["codec_fingerprint"]:
            raise StoreCorruptError(
                f"{path / CODEC_DIR}: codec fingerprint {codec.fingerprint}, the manifest says "
                f"{manifest['codec_fingerprint']}: the codec files were replaced; restore them"
            )
        if HEADER_BYTES + codec.record_bytes != manifest["record_bytes"]:
            raise StoreCorruptError(
                f"{path}: codec records are {codec.record_bytes} + {HEADER_BYTES} bytes, the "
                f"manifest says {manifest['record_bytes']}"
            )
        return cls(path, manifest, codec, readonly)

    def close(self) -> None:
        """Close the store. A writer refreshes the counts in the manifest, aborts a batch still
        open, and leaves the metadata in one file (no -wal/-shm beside it), so that readers that
        come later write nothing into the bank."""
        with self._lock:
            if self.meta is None:
                return
            if not self.readonly:
                if self._batch is not None:
                    self._batch.abort()
                self._write_manifest()
            self.meta.close(single_file=not self.readonly)
            self.meta = None
            self._shards.forget()
            self._release_writer_lock()

    def __enter__(self) -> MemoryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _release_writer_lock(self) -> None:
        if self._writer_lock is not None:
            self._writer_lock.release()
            self._writer_lock = None

    def __del__(self) -> None:
        if getattr(self, "_writer_lock", None) is not None:
            self._release_writer_lock()

    # --- small helpers ----------------------------------------------------------------------
    @property
    def memory_fingerprint(self) -> str:
        return self.manifest["memory_fingerprint"]

    @property
    def _meta(self) -> Metadata:
        if self.meta is None:
            raise StoreError(f"{self.path}: the store is closed")
        return self.meta

    def _require_writer(self, what: str) -> None:
        if self.readonly:
            raise StoreError(
                f"{what}: {self.path} is open read-only; open it for writing "
                "(MemoryStore.open(path, readonly=False), `memory3 serve --writable`)"
            )
        self._meta  # noqa: B018  (closed stores refuse too)

    def _write_manifest(self) -> None:
        self.manifest["counts"] = self.counts()
        write_json_atomic(self.path / MANIFEST, self.manifest)

    def set_index_info(self, info: dict[str, Any] | None) -> None:
        """Record (or clear) the retrieval index section of the manifest (files under `index/`)."""
        with self._lock:
            self._require_writer("set_index_info")
            self.manifest["index"] = info
            self._write_manifest()

    # --- records ----------------------------------------------------------------------------
    def _recover(self) -> None:
        """Drop shard bytes no committed row points to (a killed append or compaction)."""
        tails = self._meta.tails()
        floor = int(self._meta.info("append_shard_min"))
        for p in sorted((self.path / SHARD_DIR).glob("*.bin")):
            shard = int(p.stem)
            if shard not in tails:
                log.warning("removing shard %s: no committed record in it (interrupted write)", p)
                p.unlink()
                continue
            size, want = p.stat().st_size, tails[shard] * self.record_size
            if size > want and shard >= floor:
                log.warning("truncating %s from %d to %d bytes (interrupted append)", p, size, want)
                with open(p, "r+b") as f:
                    f.truncate(want)
                    os.fsync(f.fileno())
        fsync(self.path / SHARD_DIR)

    def _next_place(self) -> Place:
        """Where the next record goes: after the last committed record of the last shard this
        store may append to, or a new shard; while a batch holds staged (uncommitted) records,
        after those."""
        if self._append_at is not None:
            return self._append_at
        floor = int(self._meta.info("append_shard_min"))
        tails = self._meta.tails()
        mine = [s for s in tails if s >= floor]
        if not mine:
            return floor, 0
        last = max(mine)
        if tails[last] >= self.records_per_shard:
            return last + 1, 0
        return last, tails[last]

    def _write_records(self, mem: Memories, n: int) -> list[Place]:
        """Encode `mem` (n memories) and write the records at the append position, fsynced;
        return their places. No row points to them yet: committing one makes a record visible."""
        if not isinstance(mem, Memories):
            raise TypeError(f"expected Memories, got {type(mem).__name__}")
        if mem.fingerprint != self.memory_fingerprint:
            raise FingerprintMismatchError(
                f"memories with fingerprint {mem.fingerprint} cannot go into {self.path}, which holds "
                f"fingerprint {self.memory_fingerprint}: write them with the model that built the store"
            )
        if len(mem) != n:
            raise MemoryFormatError(f"{len(mem)} memories given for {n} references")
        records = with_crc(self.codec.encode(mem))
        shard, slot = self._next_place()
        places, i = [], 0
        while i < len(records):
            k = min(len(records) - i, self.records_per_shard - slot)
            self._shards.write(shard, slot, records[i : i + k])
            places += [(shard, slot + j) for j in range(k)]
            i += k
            shard, slot = (shard + 1, 0) if slot + k >= self.records_per_shard else (shard, slot + k)
        if self._batch is not None:  # keep staged records from being overwritten
            self._append_at = (shard, slot)
        return places

    def _read(self, ref_ids: Sequence[int], places: dict[int, Place]) -> np.ndarray:
        """Records (with header) of built refs, checksums checked."""
        out = self._shards.read([places[i] for i in ref_ids])
        bad = bad_checksums(out)
        if bad:
            shard, slot = places[ref_ids[bad[0]]]
            raise StoreCorruptError(
                f"{self.path}: record of ref {ref_ids[bad[0]]} (shard {shard:05d}.bin, record {slot}) "
                f"fails its checksum: the shard file is damaged; run `memory3 store verify {self.path}` "
                "and rebuild the bank"
            )
        return out

    # --- writing ----------------------------------------------------------------------------
    def add(self, refs: Sequence[RefMeta], mem: Memories) -> list[int]:
        """Store built references with their memories; returns their new ref ids, in order."""
        with self._lock:
            self._require_writer("add")
            refs = list(refs)
            places = self._write_records(mem, len(refs))  # bytes first: rows make them visible
            with self._meta.transaction():
                return [self._meta.insert(r, built=True, place=p) for r, p in zip(refs, places, strict=True)]

    def replace_doc(self, doc_id: str, refs: Sequence[RefMeta], mem: Memories) -> list[int]:
        """Delete a document's references and add new ones in one transaction: readers see the
        old version or the new one, never neither."""
        with self._lock:
            self._require_writer("replace_doc")
            refs = list(refs)
            if any(r.doc_id != doc_id for r in refs):
                raise ValueError(f"replace_doc({doc_id!r}) got references of other documents")
            places = self._write_records(mem, len(refs))
            with self._meta.transaction():
                self._meta.mark_deleted(doc_id)
                return [self._meta.insert(r, built=True, place=p) for r, p in zip(refs, places, strict=True)]

    def add_pending(self, refs: Sequence[RefMeta]) -> list[int]:
        """Register references whose memories are not written yet (built = 0), in one
        transaction; ids are given in order. A build registers its work, then `fill`s it."""
        with self._lock:
            self._require_writer("add_pending")
            with self._meta.transaction():
                return [self._meta.insert(r, built=False, place=None) for r in refs]

    def fill(self, ref_ids: Sequence[int], mem: Memories) -> None:
        """Write the memories of pending references (in the order of `ref_ids`)."""
        with self._lock:
            self._require_writer("fill")
            ref_ids = [int(i) for i in ref_ids]
            if len(set(ref_ids)) != len(ref_ids):
                raise ValueError("fill got the same ref id twice")
            rows = self._meta.rows(ref_ids, "built, deleted")
            bad = [i for i in ref_ids if i not in rows or rows[i][0] or rows[i][1]]
            if bad:
                raise StoreError(
                    f"fill: ref ids {bad[:10]} are not pending (unknown, already built or deleted); "
                    "fill only ids from pending_ids()"
                )
            places = self._write_records(mem, len(ref_ids))
            crash_point("store.fill_records_written")
            with self._meta.transaction():
                self._meta.set_places([(s, sl, i) for i, (s, sl) in zip(ref_ids, places, strict=True)])

    def delete_doc(self, doc_id: str) -> list[int]:
        """Mark a document's references deleted (their bytes go at the next `compact`)."""
        with self._lock:
            self._require_writer("delete_doc")
            with self._meta.transaction():
                return self._meta.mark_deleted(doc_id)

    def _begin_batch(self, batch: Any) -> None:
        """A `memory3.memory.batch.DocumentBatch` opens (one at a time per store)."""
        with self._lock:
            self._require_writer("batch")
            if self._batch is not None:
                raise StoreError(f"{self.path} already has a batch of changes open; commit or abort it first")
            self._batch = batch

    def _end_batch(self, batch: Any) -> None:
        if self._batch is batch:
            self._batch, self._append_at = None, None

    def compact(self) -> dict[str, int]:
        """Reclaim the space of deleted references: copy live records to new shard files, point
        their rows there (ids unchanged), drop deleted rows, remove the old files. Crash-safe at
        any point (recovery removes whichever set of shards no row points to)."""
        with self._lock:
            self._require_writer("compact")
            if self._batch is not None:
                raise StoreError(
                    f"compact: {self.path} has a batch of changes open; commit or abort it first"
                )
            conn = self._meta.conn
            before = sum(p.stat().st_size for p in (self.path / SHARD_DIR).glob("*.bin"))
            if not conn.execute("SELECT COUNT(*) FROM refs WHERE deleted = 1").fetchone()[0]:
                return {"records": self.counts()["records"], "bytes_before": before, "bytes_after": before}
            live = conn.execute(
                "SELECT ref_id, shard, slot FROM refs WHERE built = 1 AND deleted = 0 ORDER BY ref_id"
            ).fetchall()
            old = set(self._meta.tails())
            # never a shard number used before (even when no record is left): a reader may still
            # hold the old file of that number open
            start = max(max(old, default=-1) + 1, int(self._meta.info("append_shard_min")))
            moves: list[tuple[int, int, int]] = []
            per = self.records_per_shard
            for b in range(0, len(live), per):
                part = live[b : b + per]
                ids = [r[0] for r in part]
                records = self._read(ids, {r[0]: (r[1], r[2]) for r in part})  # checked copies
                shard = start + b // per
                self._shards.write(shard, 0, records)
                moves += [(shard, j, i) for j, i in enumerate(ids)]
            with self._meta.transaction():
                conn.execute("DELETE FROM refs WHERE deleted = 1")
                conn.execute("UPDATE refs SET shard = NULL, slot = NULL WHERE built = 1")
                self._meta.set_places(moves)
                self._meta.set_info("append_shard_min", str(start + (len(live) + per - 1) // per))
            self._shards.forget()
            for s in old:
                self._shards.path(s).unlink(missing_ok=True)
            fsync(self.path / SHARD_DIR)
            self._write_manifest()
            after = sum(p.stat().st_size for p in (self.path / SHARD_DIR).glob("*.bin"))
            log.info("compacted %s: %d -> %d bytes", self.path, before, after)
            return {"records": len(live), "bytes_before": before, "bytes_after": after}

    # --- reading ----------------------------------------------------------------------------
    def get_records(self, ref_ids: Sequence[int]) -> np.ndarray:
        """(n, codec.record_bytes) uint8 codec records of built, live references, in order."""
        with self._lock:
            ref_ids = [int(i) for i in ref_ids]
            rows = self._meta.rows(ref_ids, "built, deleted, shard, slot")
            missing = [i for i in ref_ids if i not in rows]
            pending = [i for i in ref_ids if i in rows and not rows[i][0]]
            deleted = [i for i in ref_ids if i in rows and rows[i][1]]
            if missing or pending or deleted:
                raise KeyError(
                    f"{self.path}: ref ids not readable — unknown {missing[:10]}, not built yet "
                    f"{pending[:10]}, deleted {deleted[:10]}; filter ids with is_live()"
                )
            places = {i: (int(r[2]), int(r[3])) for i, r in rows.items()}
            return self._read(ref_ids, places)[:, HEADER_BYTES:]

    def get(self, ref_ids: Sequence[int], dtype: torch.dtype = torch.float32) -> Memories:
        """Decoded memories (CPU) of `ref_ids`, in order (decompressed on the CPU, as in the paper, §3.3)."""
        return self.codec.decode(self.get_records(ref_ids), self.memory_fingerprint, dtype)

    def unbuilt(self, ref_ids: Sequence[int]) -> list[int]:
        """The ids among `ref_ids` registered without a memory (pending, or deleted before one was
        written), sorted. Cheaper than `refs` when only that is wanted: a retriever asks it before
        every read from disk."""
        with self._lock:
            rows = self._meta.rows([int(i) for i in ref_ids], "built")
        return sorted(i for i, (built,) in rows.items() if not built)

    def refs(self, ref_ids: Sequence[int]) -> list[StoredRef]:
        """Metadata of references (deleted and pending ones too), in order."""
        with self._lock:
            return self._meta.refs([int(i) for i in ref_ids])

    def texts(self, ref_ids: Sequence[int]) -> list[str]:
        ref_ids = [int(i) for i in ref_ids]
        with self._lock:
            rows = self._meta.rows(ref_ids, "text")
        missing = [i for i in ref_ids if i not in rows]
        if missing:
            raise KeyError(f"{self.path}: unknown ref ids {missing[:10]}")
        return [rows[i][0] for i in ref_ids]

    def live_ids(self) -> np.ndarray:
        """Ids of built, not deleted references: what retrieval may return."""
        with self._lock:
            return self._meta.ids("built = 1 AND deleted = 0")

    def pending_ids(self, by_length: bool = False) -> np.ndarray:
        """Ids registered by `add_pending` and not filled yet (nor deleted); `by_length`: shortest
        first (ties by id), so that batches of neighbours pad little."""
        with self._lock:
            return self._meta.ids(
                "built = 0 AND deleted = 0", order="n_tokens, ref_id" if by_length else "ref_id"
            )

    def doc_ids(self) -> list[str]:
        """Distinct documents with live or pending references."""
        with self._lock:
            return self._meta.doc_ids()

    def doc_refs(self, doc_id: str) -> np.ndarray:
        """Live and pending ref ids of one document, in chunk order."""
        with self._lock:
            return self._meta.doc_refs(doc_id)

    def is_live(self, ref_ids: Sequence[int]) -> np.ndarray:
        """(n,) bool: which ids may be read (built and not deleted)."""
        ref_ids = [int(i) for i in ref_ids]
        with self._lock:
            rows = self._meta.rows(ref_ids, "built, deleted")
        return np.array([i in rows and bool(rows[i][0]) and not rows[i][1] for i in ref_ids], dtype=bool)

    def counts(self) -> dict[str, int]:
        with self._lock:
            return self._meta.counts()

    def __len__(self) -> int:
        return self.counts()["live"]

    def info(self) -> dict[str, Any]:
        shards = sorted((self.path / SHARD_DIR).glob("*.bin"))
        return {
            "path": str(self.path),
            "version": self.manifest["version"],
            "memory_fingerprint": self.memory_fingerprint,
            "codec_fingerprint": self.manifest["codec_fingerprint"],
            "codec": repr(self.codec),
            "model": (self.manifest.get("model") or {}).get("name"),
            "built_with": built_with(self.manifest),
            "memory_layers": layer_span(tuple((self.manifest.get("model") or {}).get("memory_layers") or ())),
            "kept_tokens": (self.manifest.get("memory") or {}).get("kept_tokens"),
            "record_bytes": self.record_size,
            "records_per_shard": self.records_per_shard,
            "shards": len(shards),
            "shard_bytes": sum(p.stat().st_size for p in shards),
            "index": self.manifest.get("index"),
            **self.counts(),
        }

    # --- checking ---------------------------------------------------------------------------
    def check_files(self) -> None:
        """Cheap check that every shard file a committed record lies in exists and is long enough
        (no checksums: `verify` reads every record). Raises StoreCorruptError naming the file."""
        with self._lock:
            for shard, n in sorted(self._meta.tails().items()):
                p = self._shards.path(shard)
                fix = f"run `memory3 store verify {self.path}` and rebuild the bank"
                if not p.is_file():
                    raise StoreCorruptError(f"{p}: shard file missing ({n} records); {fix}")
                if p.stat().st_size < n * self.record_size:
                    raise StoreCorruptError(
                        f"{p}: {p.stat().st_size} bytes, but its committed records reach byte "
                        f"{n * self.record_size}: the shard was truncated; {fix}"
                    )

    def verify(self) -> VerifyReport:
        """Check every committed record's checksum and the files against the metadata; report
        all problems instead of stopping at the first."""
        errors: list[str] = []
        checked = 0
        with self._lock:
            self._shards.forget()  # check the files now in the directory, not ones held open
            try:
                read_manifest(self.path)
            except StoreError as e:
                errors.append(str(e))
            conn = self._meta.conn
            bad_state = conn.execute(
                "SELECT COUNT(*) FROM refs WHERE built = 1 AND shard IS NULL"
            ).fetchone()[0]
            if bad_state:
                errors.append(f"{bad_state} built references point to no record")
            by_shard: dict[int, list[tuple[int, int]]] = {}
            for i, s, sl in self._meta.places():
                by_shard.setdefault(s, []).append((i, sl))
            for s, items in by_shard.items():
                n, problems = self._shards.verify(s, items)
                checked += n
                errors += problems
            # Files no row points to: a writer's append in progress, or leftovers of a killed one
            # (removed when a writer opens the store); not an error.
            orphans = [p for p in (self.path / SHARD_DIR).glob("*.bin") if int(p.stem) not in by_shard]
            counts = {**self.counts(), "orphan_files": len(orphans)}
        return VerifyReport(ok=not errors, checked=checked, errors=errors, counts=counts)


def _check_shape(codec: MemoryCodec, model: dict[str, Any] | None, memory: dict[str, Any] | None) -> None:
    """The codec's memory shape must be what this model and memory config write."""
    Lm, K, S, D = codec.shape.dims
    if model is not None:
        cfg = ModelConfig.from_dict(model)
        want = (cfg.n_memory_layers, cfg.n_kv_head, cfg.head_dim)
        if want != (Lm, K, D):
            raise ValueError(
                f"codec shape (Lm, K, D) = {(Lm, K, D)} does not fit model {cfg.name} {want}: "
                "train the codec on this model's memories"
            )
    if memory is not None and MemoryConfig.from_dict(memory).kept_tokens != S:
        raise ValueError(f"codec has {S} slots per head, the memory config keeps {memory['kept_tokens']}")
