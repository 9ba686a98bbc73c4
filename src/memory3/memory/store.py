"""A memory bank on disk (SPEC §2, §4): compressed memories plus the metadata of their references,
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
Document changes go through `DocumentBatch`: all of a batch becomes visible in one transaction,
or none of it.

One process writes (an exclusive flock on writer.lock); any number of processes read, also while
the writer appends. `compact()` deletes the old shard files and never reuses their numbers; a
reader that still holds one open keeps its disk space in use until it closes the store.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import logging
import os
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memory3.config import MemoryConfig, ModelConfig
from memory3.errors import (
    FingerprintMismatchError,
    StoreCorruptError,
    StoreError,
    StoreLockedError,
)
from memory3.faults import crash_point
from memory3.memory.codec import MemoryCodec
from memory3.memory.write import Memories, MemoryFormatError

log = logging.getLogger(__name__)

FORMAT = "memory3-store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
META_DB = "meta.sqlite"
CODEC_DIR = "codec"
SHARD_DIR = "shards"
INDEX_DIR = "index"
LOCK_FILE = "writer.lock"
HEADER_BYTES = 4  # crc32 of the codec record
SHARD_TARGET_BYTES = 256 << 20
_SQL_BATCH = 900  # ids per "IN (...)" query, under SQLite's variable limit

_SCHEMA = """
CREATE TABLE refs (
    ref_id   INTEGER PRIMARY KEY AUTOINCREMENT,
    doc_id   TEXT    NOT NULL,
    chunk    INTEGER NOT NULL,        -- index of the reference within its document
    title    TEXT    NOT NULL DEFAULT '',
    text     TEXT    NOT NULL,
    n_tokens INTEGER NOT NULL,
    tokens   BLOB,                    -- int32 little-endian token ids (no prefix), or NULL
    built    INTEGER NOT NULL DEFAULT 0,
    deleted  INTEGER NOT NULL DEFAULT 0,
    shard    INTEGER,                 -- NULL until built, and after compaction of a deleted ref
    slot     INTEGER
);
CREATE UNIQUE INDEX refs_live_chunk ON refs (doc_id, chunk) WHERE deleted = 0;
CREATE INDEX refs_doc ON refs (doc_id);
CREATE UNIQUE INDEX refs_place ON refs (shard, slot) WHERE shard IS NOT NULL;
CREATE TABLE info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True)
class RefMeta:
    """What a store keeps about one reference besides its memory."""

    doc_id: str
    chunk: int
    text: str
    title: str = ""
    tokens: tuple[int, ...] | None = None  # token ids of the reference, without the prefix
    n_tokens: int = 0  # len(tokens) when tokens are given

    def __post_init__(self) -> None:
        if not isinstance(self.doc_id, str) or not self.doc_id:
            raise ValueError(f"doc_id must be a non-empty string, got {self.doc_id!r}")
        if not isinstance(self.chunk, int) or self.chunk < 0:
            raise ValueError(f"chunk must be an int ≥ 0, got {self.chunk!r} (doc {self.doc_id!r})")
        if self.tokens is not None:
            object.__setattr__(self, "tokens", tuple(int(t) for t in self.tokens))
            if self.n_tokens not in (0, len(self.tokens)):
                raise ValueError(
                    f"n_tokens {self.n_tokens} != len(tokens) {len(self.tokens)} (doc {self.doc_id!r})"
                )
            object.__setattr__(self, "n_tokens", len(self.tokens))


@dataclass(frozen=True)
class StoredRef(RefMeta):
    """A reference as stored: its metadata plus its id and state."""

    ref_id: int = -1
    built: bool = False
    deleted: bool = False


@dataclass
class VerifyReport:
    ok: bool
    checked: int  # records whose checksum was checked
    errors: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)


@dataclass
class MergeResult:
    path: Path
    id_offsets: list[int]  # ref_id in the merged store = ref_id in part i + id_offsets[i]
    records: int


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _argv() -> list[str]:
    """The command line of this process, for the writer lock's note (the script's name only)."""
    argv = list(getattr(sys, "argv", []) or ["python"])
    argv[0] = os.path.basename(argv[0])
    return argv


def _shard_name(shard: int) -> str:
    return f"{shard:05d}.bin"


def _chunks(seq: Sequence[int], n: int = _SQL_BATCH) -> Iterator[Sequence[int]]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


def _connect(path: Path, readonly: bool) -> sqlite3.Connection:
    if readonly:
        # A URI needs an absolute path; `mode=ro` never creates the file nor writes to it.
        conn = sqlite3.connect(
            f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
        )
    else:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")  # a commit survives power loss
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


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


def _dir_mode() -> int:
    """The mode a new directory gets under the process umask (mkdtemp makes 0700 ones)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o777 & ~mask


def make_dir_like_mkdir(path: Path) -> None:
    """Give a directory made by `tempfile.mkdtemp` the mode `mkdir` would have given it, so that a
    bank is readable by whoever the umask allows (a service account, a group)."""
    os.chmod(path, _dir_mode())


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


class _Shards:
    """Shard files: reads with positioned reads (pread) after asking the kernel for every record
    of the batch at once; writes with pwrite + fsync. Read descriptors stay open per shard, the
    `max_open` most recently used ones; one whose file was deleted or replaced (compaction,
    a restore) is reopened by path."""

    def __init__(self, root: Path, record_size: int, max_open: int = 128) -> None:
        self.root = root
        self.rs = record_size
        self.max_open = max_open
        self._fds: OrderedDict[int, int] = OrderedDict()

    def path(self, shard: int) -> Path:
        return self.root / _shard_name(shard)

    def _fd(self, shard: int) -> int:
        """An open descriptor of `shard`'s file (see `read` for how many stay open)."""
        fd = self._fds.get(shard)
        if fd is not None and os.fstat(fd).st_nlink == 0:  # the file we hold is gone from the directory
            os.close(self._fds.pop(shard))
            fd = None
        if fd is not None:
            self._fds.move_to_end(shard)
            return fd
        try:
            fd = os.open(self.path(shard), os.O_RDONLY)
        except FileNotFoundError:
            raise StoreCorruptError(
                f"{self.path(shard)}: shard file missing; if the bank was just compacted, open it again, "
                f"else run `memory3 store verify {self.root.parent}` and rebuild the bank"
            ) from None
        except OSError as e:
            if e.errno == errno.EMFILE:
                raise StoreError(
                    f"{self.path(shard)}: too many open files ({len(self._fds)} shard files are open in "
                    "this store): raise the limit (`ulimit -n`) or open fewer stores at once"
                ) from e
            raise
        self._fds[shard] = fd
        return fd

    def read(self, places: Sequence[tuple[int, int]]) -> np.ndarray:
        """(n, record_size) copies of the records at `places` ((shard, slot) pairs, any shards).

        Every record is requested from the kernel first (POSIX_FADV_WILLNEED), so that records
        not in the page cache come from disk in parallel, across shards, rather than one shard
        after another (5 cold 248 kB records, mostly in different shards: read and checksummed in
        1.2-1.4 ms here, against 2.1-2.5 ms when each shard's records were asked for in turn).
        Reading with pread rather than through a memory map also means a shard truncated under a
        reader gives an error here, not a SIGBUS, and pages read are not left mapped."""
        out = np.empty((len(places), self.rs), dtype=np.uint8)
        fds = [self._fd(shard) for shard, _ in places]
        if hasattr(os, "posix_fadvise"):
            for fd, (_, slot) in zip(fds, places, strict=True):
                os.posix_fadvise(fd, slot * self.rs, self.rs, os.POSIX_FADV_WILLNEED)
        for j, (fd, (shard, slot)) in enumerate(zip(fds, places, strict=True)):
            got = 0
            while got < self.rs:  # a read may return less than asked (network file systems)
                if hasattr(os, "preadv"):
                    n = os.preadv(fd, [out[j, got:]], slot * self.rs + got)
                else:  # platforms without preadv: one more copy
                    data = os.pread(fd, self.rs - got, slot * self.rs + got)
                    out[j, got : got + len(data)] = np.frombuffer(data, dtype=np.uint8)
                    n = len(data)
                if n == 0:
                    raise StoreCorruptError(
                        f"{self.path(shard)}: {os.fstat(fd).st_size} bytes, but committed record {slot} "
                        f"reaches byte {(slot + 1) * self.rs}: the shard was truncated; run `memory3 store "
                        f"verify {self.root.parent}` and rebuild the bank"
                    )
                got += n
        while len(self._fds) > self.max_open:  # keep the most recently used open
            os.close(self._fds.popitem(last=False)[1])
        return out

    def write(self, shard: int, slot: int, records: np.ndarray) -> None:
        p = self.path(shard)
        new = not p.exists()
        fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o666)  # the umask decides who may read
        try:
            data = np.ascontiguousarray(records).tobytes()
            off, view = slot * self.rs, memoryview(data)
            while view:
                n = os.pwrite(fd, view, off)
                view, off = view[n:], off + n
            os.fsync(fd)
        finally:
            os.close(fd)
        if new:
            _fsync_dir(self.root)

    def forget(self) -> None:
        """Close every read descriptor (after compaction, before verify, and on close)."""
        fds, self._fds = self._fds, OrderedDict()
        for fd in fds.values():
            os.close(fd)

    def __del__(self) -> None:
        self.forget()


def _with_crc(payload: np.ndarray) -> np.ndarray:
    out = np.empty((payload.shape[0], HEADER_BYTES + payload.shape[1]), dtype=np.uint8)
    out[:, HEADER_BYTES:] = payload
    crcs = np.array([zlib.crc32(row) for row in payload], dtype="<u4")
    out[:, :HEADER_BYTES] = crcs.view(np.uint8).reshape(-1, HEADER_BYTES)
    return out


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
        self._lock_fd: int | None = None
        self._batch: DocumentBatch | None = None  # the open batch, if any (one at a time)
        self._append_at: tuple[int, int] | None = None  # next place while a batch holds staged records
        self._db: sqlite3.Connection | None = None
        if not readonly:
            self._lock_fd = self._take_writer_lock()
        try:
            if not (path / META_DB).is_file():
                raise StoreCorruptError(
                    f"{path / META_DB}: missing; the bank's metadata is gone: restore it from a backup "
                    "or rebuild the bank"
                )
            self._db = _connect(path / META_DB, readonly)
            self._db.execute("SELECT value FROM info WHERE key = 'append_shard_min'").fetchone()
            self._db.execute("SELECT ref_id FROM refs LIMIT 1").fetchone()
        except sqlite3.DatabaseError as e:
            self._close_db()
            self._release_writer_lock()
            raise StoreCorruptError(
                f"{path / META_DB}: cannot be read ({e}); restore it from a backup or rebuild the bank"
            ) from None
        except BaseException:
            self._close_db()
            self._release_writer_lock()
            raise
        self._shards = _Shards(path / SHARD_DIR, self.record_size)
        if not readonly:
            self._recover()

    # --- opening ----------------------------------------------------------------------------
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
        directory appears complete or not at all (built aside, then renamed)."""
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
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.creating-", dir=path.parent))
        try:
            make_dir_like_mkdir(tmp)
            codec.save(tmp / CODEC_DIR)
            (tmp / SHARD_DIR).mkdir()
            conn = _connect(tmp / META_DB, readonly=False)
            conn.executescript(_SCHEMA)
            conn.execute("INSERT INTO info VALUES ('append_shard_min', '0')")
            conn.close()
            _write_json_atomic(tmp / MANIFEST, manifest)
            if path.exists():
                path.rmdir()  # empty, checked above
            os.rename(tmp, path)
            _fsync_dir(path.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
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
                f"config, or load the model that built it ({(manifest.get('model') or {}).get('name', '?')})"
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

    def _take_writer_lock(self) -> int:
        """Take the one writer's lock (flock on writer.lock) and write who holds it into the file;
        refuse, naming the holder, when another process has it."""
        try:
            fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
        except PermissionError:
            raise StoreError(
                f"{self.path}: no permission to write here; open the bank read-only, or run as its owner"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            finally:
                os.close(fd)
            raise StoreLockedError(
                f"{self.path} is open for writing by {holder}; one process writes to a bank at a time: "
                "stop that process or wait for it to finish (reading needs no lock)"
            ) from None
        holder = f"pid {os.getpid()} ({' '.join(_argv())[:200]}) since {time.strftime('%Y-%m-%d %H:%M:%S')}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode() + b"\n", 0)
        return fd

    def _release_writer_lock(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._lock_fd, 0)  # nobody holds it now
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    def _close_db(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def close(self) -> None:
        """Close the store. A writer refreshes the counts in the manifest, aborts a batch still
        open, and leaves the metadata in one file (no -wal/-shm beside it), so that readers that
        come later write nothing into the bank."""
        with self._lock:
            if getattr(self, "_db", None) is None:
                return
            if not self.readonly:
                if self._batch is not None:
                    self._batch.abort()
                self._write_manifest()
                try:  # fails (busy) while a reader has the database open: it stays in WAL mode then
                    self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                    self._db.execute("PRAGMA journal_mode=DELETE")
                except sqlite3.OperationalError as e:
                    log.debug("%s stays in WAL mode: %s", self.path / META_DB, e)
            self._close_db()
            self._shards.forget()
            self._release_writer_lock()

    def __enter__(self) -> MemoryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_lock_fd", None) is not None:
            self._release_writer_lock()

    # --- small helpers ----------------------------------------------------------------------
    @property
    def memory_fingerprint(self) -> str:
        return self.manifest["memory_fingerprint"]

    @property
    def index_dir(self) -> Path:
        """Where the retrieval index lives (written by memory3.retrieval; see `set_index_info`)."""
        return self.path / INDEX_DIR

    def _conn(self) -> sqlite3.Connection:
        if getattr(self, "_db", None) is None:
            raise StoreError(f"{self.path}: the store is closed")
        return self._db

    def _require_writer(self, what: str) -> None:
        if self.readonly:
            raise StoreError(
                f"{what}: {self.path} is open read-only; open it for writing "
                "(MemoryStore.open(path, readonly=False), `memory3 serve --writable`)"
            )
        self._conn()

    def _info(self, key: str) -> str:
        return self._conn().execute("SELECT value FROM info WHERE key = ?", (key,)).fetchone()[0]

    def _write_manifest(self) -> None:
        self.manifest["counts"] = self.counts()
        _write_json_atomic(self.path / MANIFEST, self.manifest)

    def set_index_info(self, info: dict[str, Any] | None) -> None:
        """Record (or clear) the retrieval index section of the manifest (files under `index/`)."""
        with self._lock:
            self._require_writer("set_index_info")
            self.manifest["index"] = info
            self._write_manifest()

    # --- recovery ---------------------------------------------------------------------------
    def _tails(self) -> dict[int, int]:
        """Committed record count (max slot + 1) of every shard a row points to."""
        rows = (
            self._conn()
            .execute("SELECT shard, MAX(slot) + 1 FROM refs WHERE shard IS NOT NULL GROUP BY shard")
            .fetchall()
        )
        return {int(s): int(n) for s, n in rows}

    def _recover(self) -> None:
        """Drop shard bytes no committed row points to (a killed append or compaction)."""
        tails = self._tails()
        floor = int(self._info("append_shard_min"))
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
        _fsync_dir(self.path / SHARD_DIR)

    def _next_place(self) -> tuple[int, int]:
        """Where the next record goes: after the last committed record of the last shard this
        store may append to, or a new shard; while a batch holds staged (uncommitted) records,
        after those."""
        if self._append_at is not None:
            return self._append_at
        floor = int(self._info("append_shard_min"))
        tails = self._tails()
        mine = [s for s in tails if s >= floor]
        if not mine:
            return floor, 0
        last = max(mine)
        if tails[last] >= self.records_per_shard:
            return last + 1, 0
        return last, tails[last]

    def _write_records(self, payload: np.ndarray) -> list[tuple[int, int]]:
        """Write records at the append position (fsynced); return their (shard, slot)."""
        records = _with_crc(payload)
        shard, slot = self._next_place()
        places, i = [], 0
        while i < len(records):
            n = min(len(records) - i, self.records_per_shard - slot)
            self._shards.write(shard, slot, records[i : i + n])
            places += [(shard, slot + j) for j in range(n)]
            i += n
            shard, slot = (shard + 1, 0) if slot + n >= self.records_per_shard else (shard, slot + n)
        if self._batch is not None:  # keep staged records from being overwritten
            self._append_at = (shard, slot)
        return places

    def _encode(self, mem: Memories, n: int) -> np.ndarray:
        if not isinstance(mem, Memories):
            raise TypeError(f"expected Memories, got {type(mem).__name__}")
        if mem.fingerprint != self.memory_fingerprint:
            raise FingerprintMismatchError(
                f"memories with fingerprint {mem.fingerprint} cannot go into {self.path}, which holds "
                f"fingerprint {self.memory_fingerprint}: write them with the model that built the store"
            )
        if len(mem) != n:
            raise MemoryFormatError(f"{len(mem)} memories given for {n} references")
        return self.codec.encode(mem)

    # --- writing ----------------------------------------------------------------------------
    def add(self, refs: Sequence[RefMeta], mem: Memories) -> list[int]:
        """Store built references with their memories; returns their new ref ids, in order."""
        with self._lock:
            self._require_writer("add")
            refs = list(refs)
            payload = self._encode(mem, len(refs))
            places = self._write_records(payload)  # bytes first: rows make them visible
            conn = self._conn()
            conn.execute("BEGIN IMMEDIATE")
            try:
                ids = [self._insert(r, built=True, place=p) for r, p in zip(refs, places, strict=True)]
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return ids

    def replace_doc(self, doc_id: str, refs: Sequence[RefMeta], mem: Memories) -> list[int]:
        """Delete a document's references and add new ones in one transaction: readers see the
        old version or the new one, never neither."""
        with self._lock:
            self._require_writer("replace_doc")
            refs = list(refs)
            if any(r.doc_id != doc_id for r in refs):
                raise ValueError(f"replace_doc({doc_id!r}) got references of other documents")
            payload = self._encode(mem, len(refs))
            places = self._write_records(payload)
            conn = self._conn()
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute("UPDATE refs SET deleted = 1 WHERE doc_id = ? AND deleted = 0", (doc_id,))
                ids = [self._insert(r, built=True, place=p) for r, p in zip(refs, places, strict=True)]
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return ids

    def add_pending(self, refs: Sequence[RefMeta]) -> list[int]:
        """Register references whose memories are not written yet (built = 0), in one
        transaction; ids are given in order. A build registers its work, then `fill`s it."""
        with self._lock:
            self._require_writer("add_pending")
            conn = self._conn()
            conn.execute("BEGIN IMMEDIATE")
            try:
                ids = [self._insert(r, built=False, place=None) for r in refs]
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return ids

    def fill(self, ref_ids: Sequence[int], mem: Memories) -> None:
        """Write the memories of pending references (in the order of `ref_ids`)."""
        with self._lock:
            self._require_writer("fill")
            ref_ids = [int(i) for i in ref_ids]
            if len(set(ref_ids)) != len(ref_ids):
                raise ValueError("fill got the same ref id twice")
            rows = self._rows(ref_ids, "built, deleted")
            bad = [i for i in ref_ids if i not in rows or rows[i][0] or rows[i][1]]
            if bad:
                raise StoreError(
                    f"fill: ref ids {bad[:10]} are not pending (unknown, already built or deleted); "
                    "fill only ids from pending_ids()"
                )
            payload = self._encode(mem, len(ref_ids))
            places = self._write_records(payload)
            crash_point("store.fill_records_written")
            conn = self._conn()
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(
                    "UPDATE refs SET built = 1, shard = ?, slot = ? WHERE ref_id = ?",
                    [(s, sl, i) for i, (s, sl) in zip(ref_ids, places, strict=True)],
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def _insert(self, r: RefMeta, built: bool, place: tuple[int, int] | None) -> int:
        if not isinstance(r, RefMeta):
            raise TypeError(f"expected RefMeta, got {type(r).__name__}")
        tokens = None if r.tokens is None else np.asarray(r.tokens, dtype="<i4").tobytes()
        shard, slot = place if place is not None else (None, None)
        try:
            cur = self._conn().execute(
                "INSERT INTO refs (doc_id, chunk, title, text, n_tokens, tokens, built, shard, slot) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (r.doc_id, r.chunk, r.title, r.text, r.n_tokens, tokens, int(built), shard, slot),
            )
        except sqlite3.IntegrityError:
            raise StoreError(
                f"document {r.doc_id!r} chunk {r.chunk} is already in {self.path}: delete the document "
                "first, or replace it (`memory3 store add` replaces documents with the same id)"
            ) from None
        return int(cur.lastrowid)  # type: ignore[arg-type]

    def delete_doc(self, doc_id: str) -> list[int]:
        """Mark a document's references deleted (their bytes go at the next `compact`)."""
        with self._lock:
            self._require_writer("delete_doc")
            conn = self._conn()
            conn.execute("BEGIN IMMEDIATE")
            try:
                ids = [
                    int(r[0])
                    for r in conn.execute(
                        "SELECT ref_id FROM refs WHERE doc_id = ? AND deleted = 0", (doc_id,)
                    )
                ]
                conn.execute("UPDATE refs SET deleted = 1 WHERE doc_id = ? AND deleted = 0", (doc_id,))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return ids

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
            conn = self._conn()
            before = sum(p.stat().st_size for p in (self.path / SHARD_DIR).glob("*.bin"))
            n_dead = conn.execute("SELECT COUNT(*) FROM refs WHERE deleted = 1").fetchone()[0]
            if not n_dead:
                n = self.counts()["records"]
                return {"records": n, "bytes_before": before, "bytes_after": before}
            live = conn.execute(
                "SELECT ref_id, shard, slot FROM refs WHERE built = 1 AND deleted = 0 ORDER BY ref_id"
            ).fetchall()
            old = set(self._tails())
            # never a shard number used before (even when no record is left): a reader may still
            # hold the old file of that number open
            start = max(max(old, default=-1) + 1, int(self._info("append_shard_min")))
            moves: list[tuple[int, int, int]] = []
            per = self.records_per_shard
            for b in range(0, len(live), per):
                batch = live[b : b + per]
                ids = [r[0] for r in batch]
                records = self._read(ids, {r[0]: (r[1], r[2]) for r in batch})  # checked copies
                shard = start + b // per
                self._shards.write(shard, 0, records)
                moves += [(shard, j, i) for j, i in enumerate(ids)]
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute("DELETE FROM refs WHERE deleted = 1")
                conn.execute("UPDATE refs SET shard = NULL, slot = NULL WHERE built = 1")
                conn.executemany("UPDATE refs SET shard = ?, slot = ? WHERE ref_id = ?", moves)
                next_shard = start + (len(live) + per - 1) // per
                conn.execute("UPDATE info SET value = ? WHERE key = 'append_shard_min'", (str(next_shard),))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            self._shards.forget()
            for s in old:
                self._shards.path(s).unlink(missing_ok=True)
            _fsync_dir(self.path / SHARD_DIR)
            self._write_manifest()
            after = sum(p.stat().st_size for p in (self.path / SHARD_DIR).glob("*.bin"))
            log.info("compacted %s: %d -> %d bytes", self.path, before, after)
            return {"records": len(live), "bytes_before": before, "bytes_after": after}

    def batch(self) -> DocumentBatch:
        """Begin a batch of document changes that become visible together or not at all (see
        `DocumentBatch`). One batch at a time per store; use it as a context manager, or call
        `commit` / `abort`."""
        with self._lock:
            self._require_writer("batch")
            if self._batch is not None:
                raise StoreError(f"{self.path} already has a batch of changes open; commit or abort it first")
            self._batch = DocumentBatch(self)
            return self._batch

    def _end_batch(self, batch: DocumentBatch) -> None:
        if self._batch is batch:
            self._batch, self._append_at = None, None

    # --- reading ----------------------------------------------------------------------------
    def _rows(self, ref_ids: Sequence[int], cols: str) -> dict[int, tuple[Any, ...]]:
        out: dict[int, tuple[Any, ...]] = {}
        uniq = sorted(set(ref_ids))
        conn = self._conn()
        # One read transaction, so a batch sees one state of the store (one SELECT is one already).
        several = len(uniq) > _SQL_BATCH
        if several:
            conn.execute("BEGIN")
        try:
            for part in _chunks(uniq):
                q = f"SELECT ref_id, {cols} FROM refs WHERE ref_id IN ({','.join('?' * len(part))})"
                for row in conn.execute(q, list(part)):
                    out[int(row[0])] = tuple(row[1:])
        finally:
            if several:
                conn.execute("COMMIT")
        return out

    def _read(self, ref_ids: Sequence[int], places: dict[int, tuple[int, int]]) -> np.ndarray:
        """Records (with header) of built refs, checksums checked."""
        out = self._shards.read([places[i] for i in ref_ids])
        crc = out[:, :HEADER_BYTES].copy().view("<u4")[:, 0]
        for j in range(len(out)):
            if zlib.crc32(out[j, HEADER_BYTES:]) != crc[j]:
                shard, slot = places[ref_ids[j]]
                raise StoreCorruptError(
                    f"{self.path}: record of ref {ref_ids[j]} (shard {_shard_name(shard)}, record {slot}) "
                    f"fails its checksum: the shard file is damaged; run `memory3 store verify {self.path}` "
                    "and rebuild the bank"
                )
        return out

    def get_records(self, ref_ids: Sequence[int]) -> np.ndarray:
        """(n, codec.record_bytes) uint8 codec records of built, live references, in order."""
        with self._lock:
            ref_ids = [int(i) for i in ref_ids]
            rows = self._rows(ref_ids, "built, deleted, shard, slot")
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
        """Decoded memories (CPU) of `ref_ids`, in order (§3.3: decompressed on the CPU)."""
        return self.codec.decode(self.get_records(ref_ids), self.memory_fingerprint, dtype)

    def unbuilt(self, ref_ids: Sequence[int]) -> list[int]:
        """The ids among `ref_ids` registered without a memory (pending, or deleted before one was
        written), sorted. Cheaper than `refs` when only that is wanted: a retriever asks it before
        every read from disk."""
        with self._lock:
            rows = self._rows([int(i) for i in ref_ids], "built")
        return sorted(i for i, (built,) in rows.items() if not built)

    def refs(self, ref_ids: Sequence[int]) -> list[StoredRef]:
        """Metadata of references (deleted and pending ones too), in order."""
        ref_ids = [int(i) for i in ref_ids]
        with self._lock:
            rows = self._rows(ref_ids, "doc_id, chunk, text, title, tokens, n_tokens, built, deleted")
        missing = [i for i in ref_ids if i not in rows]
        if missing:
            raise KeyError(f"{self.path}: unknown ref ids {missing[:10]}")
        out = []
        for i in ref_ids:
            doc, chunk, text, title, tokens, n, built, deleted = rows[i]
            toks = None if tokens is None else tuple(np.frombuffer(tokens, dtype="<i4").tolist())
            out.append(
                StoredRef(
                    doc, chunk, text, title, toks, n, ref_id=i, built=bool(built), deleted=bool(deleted)
                )
            )
        return out

    def texts(self, ref_ids: Sequence[int]) -> list[str]:
        ref_ids = [int(i) for i in ref_ids]
        with self._lock:
            rows = self._rows(ref_ids, "text")
        missing = [i for i in ref_ids if i not in rows]
        if missing:
            raise KeyError(f"{self.path}: unknown ref ids {missing[:10]}")
        return [rows[i][0] for i in ref_ids]

    def _ids(self, where: str, args: tuple[Any, ...] = (), order: str = "ref_id") -> np.ndarray:
        with self._lock:
            rows = self._conn().execute(f"SELECT ref_id FROM refs WHERE {where} ORDER BY {order}", args)
            return np.array([r[0] for r in rows], dtype=np.int64)

    def live_ids(self) -> np.ndarray:
        """Ids of built, not deleted references: what retrieval may return."""
        return self._ids("built = 1 AND deleted = 0")

    def pending_ids(self, by_length: bool = False) -> np.ndarray:
        """Ids registered by `add_pending` and not filled yet (nor deleted); `by_length`: shortest
        first (ties by id), so that batches of neighbours pad little."""
        return self._ids("built = 0 AND deleted = 0", order="n_tokens, ref_id" if by_length else "ref_id")

    def doc_ids(self) -> list[str]:
        """Distinct documents with live or pending references."""
        with self._lock:
            rows = self._conn().execute("SELECT DISTINCT doc_id FROM refs WHERE deleted = 0 ORDER BY doc_id")
            return [r[0] for r in rows]

    def doc_refs(self, doc_id: str) -> np.ndarray:
        """Live and pending ref ids of one document, in chunk order."""
        with self._lock:
            rows = self._conn().execute(
                "SELECT ref_id FROM refs WHERE doc_id = ? AND deleted = 0 ORDER BY chunk", (doc_id,)
            )
            return np.array([r[0] for r in rows], dtype=np.int64)

    def is_live(self, ref_ids: Sequence[int]) -> np.ndarray:
        """(n,) bool: which ids may be read (built and not deleted)."""
        ref_ids = [int(i) for i in ref_ids]
        with self._lock:
            rows = self._rows(ref_ids, "built, deleted")
        return np.array([i in rows and bool(rows[i][0]) and not rows[i][1] for i in ref_ids], dtype=bool)

    def counts(self) -> dict[str, int]:
        with self._lock:
            live, pending, deleted, held = (
                self._conn()
                .execute(
                    "SELECT COALESCE(SUM(built = 1 AND deleted = 0), 0), COALESCE(SUM(built = 0 AND deleted = 0), 0), "
                    "COALESCE(SUM(deleted = 1), 0), COALESCE(SUM(shard IS NOT NULL), 0) FROM refs"
                )
                .fetchone()
            )
        return {"live": int(live), "pending": int(pending), "deleted": int(deleted), "records": int(held)}

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
            "record_bytes": self.record_size,
            "records_per_shard": self.records_per_shard,
            "shards": len(shards),
            "shard_bytes": sum(p.stat().st_size for p in shards),
            "index": self.manifest.get("index"),
            **self.counts(),
        }

    def check_files(self) -> None:
        """Cheap check that every shard file a committed record lies in exists and is long enough
        (no checksums: `verify` reads every record). Raises StoreCorruptError naming the file."""
        with self._lock:
            for shard, n in sorted(self._tails().items()):
                p = self._shards.path(shard)
                if not p.is_file():
                    raise StoreCorruptError(
                        f"{p}: shard file missing ({n} records); run `memory3 store verify {self.path}` "
                        "and rebuild the bank"
                    )
                if p.stat().st_size < n * self.record_size:
                    raise StoreCorruptError(
                        f"{p}: {p.stat().st_size} bytes, but its committed records reach byte "
                        f"{n * self.record_size}: the shard was truncated; run `memory3 store verify "
                        f"{self.path}` and rebuild the bank"
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
            rows = (
                self._conn()
                .execute("SELECT ref_id, shard, slot FROM refs WHERE shard IS NOT NULL ORDER BY shard, slot")
                .fetchall()
            )
            bad_state = (
                self._conn()
                .execute("SELECT COUNT(*) FROM refs WHERE built = 1 AND shard IS NULL")
                .fetchone()[0]
            )
            if bad_state:
                errors.append(f"{bad_state} built references point to no record")
            by_shard: dict[int, list[tuple[int, int]]] = {}
            for i, s, sl in rows:
                by_shard.setdefault(s, []).append((i, sl))
            for s, items in by_shard.items():
                p = self._shards.path(s)
                if not p.exists():
                    errors.append(f"shard {p.name} missing ({len(items)} records)")
                    continue
                size = p.stat().st_size
                inside = [(i, sl) for i, sl in items if (sl + 1) * self.record_size <= size]
                past = [i for i, sl in items if (sl + 1) * self.record_size > size]
                if past:
                    errors.append(
                        f"shard {p.name} is truncated ({size} bytes): {len(past)} records lie past its end "
                        f"(refs {past[:5]}{'…' if len(past) > 5 else ''})"
                    )
                for b in range(0, len(inside), 4096):
                    batch = inside[b : b + 4096]
                    recs = self._shards.read([(s, sl) for _, sl in batch])
                    crcs = recs[:, :HEADER_BYTES].copy().view("<u4")[:, 0]
                    for (i, sl), rec, crc in zip(batch, recs, crcs, strict=True):
                        checked += 1
                        if zlib.crc32(rec[HEADER_BYTES:]) != crc:
                            errors.append(f"shard {p.name} record {sl} (ref {i}): checksum mismatch")
            # Files no row points to: a writer's append in progress, or leftovers of a killed one
            # (removed when a writer opens the store); not an error.
            orphans = [p for p in (self.path / SHARD_DIR).glob("*.bin") if int(p.stem) not in by_shard]
            counts = {**self.counts(), "orphan_files": len(orphans)}
        return VerifyReport(ok=not errors, checked=checked, errors=errors, counts=counts)


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
        self.store = store
        self._puts: dict[str, list[tuple[RefMeta, tuple[int, int]]]] = {}
        self._deletes: set[str] = set()
        self._open = True

    def _check_open(self) -> None:
        if not self._open:
            raise StoreError(
                "this batch is finished (committed or aborted); begin another with store.batch()"
            )

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
            places = self.store._write_records(self.store._encode(mem, len(refs)))
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
            conn = store._conn()
            conn.execute("BEGIN IMMEDIATE")
            try:
                old: dict[str, list[int]] = {}
                for doc_id in [*self._puts, *self._deletes]:
                    ids = [
                        int(r[0])
                        for r in conn.execute(
                            "SELECT ref_id FROM refs WHERE doc_id = ? AND deleted = 0", (doc_id,)
                        )
                    ]
                    if ids:
                        old[doc_id] = ids
                        conn.execute(
                            "UPDATE refs SET deleted = 1 WHERE doc_id = ? AND deleted = 0", (doc_id,)
                        )
                new = {
                    doc_id: [store._insert(r, built=True, place=place) for r, place in items]
                    for doc_id, items in self._puts.items()
                }
                crash_point("store.batch_before_commit")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
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


def merge_stores(parts: Sequence[str | Path], out: str | Path, keep_parts: bool = False) -> MergeResult:
    """Merge stores built separately (e.g. one per rank) into `out` without copying record bytes:
    shard files are hard-linked into the new store (parts removed afterwards unless
    `keep_parts`), metadata is concatenated with an id offset per part. All parts must share the
    memory fingerprint and the codec (train the codec once, give it to every rank). The merged
    store appears complete or not at all; its retrieval index section is cleared (rebuild it or
    merge indexes with `id_offsets`). The merged store never appends to the linked shards."""
    parts = [Path(p) for p in parts]
    out = Path(out)
    if not parts:
        raise ValueError("merge_stores needs at least one part")
    if len(set(map(os.path.realpath, parts))) != len(parts):
        raise ValueError(f"merge_stores got the same part twice: {parts}")
    if out.exists():
        raise FileExistsError(f"{out} exists: merge into a new path")
    stores = [MemoryStore.open(p, readonly=False) for p in parts]  # lock + crash recovery
    try:
        first = stores[0].manifest
        for s in stores[1:]:
            for key in ("memory_fingerprint", "codec_fingerprint", "record_bytes"):
                if s.manifest[key] != first[key]:
                    raise StoreError(
                        f"cannot merge {s.path} into {parts[0]}: {key} {s.manifest[key]} != {first[key]}; "
                        "every part must be built with the same model, memory config and codec files"
                    )
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.merging-", dir=out.parent))
        try:
            result = _merge_into(tmp, stores)
            os.rename(tmp, out)
            _fsync_dir(out.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        for s in stores:
            s.close()
    if not keep_parts:
        for p in parts:
            shutil.rmtree(p)
    result.path = out
    return result


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError as e:  # another filesystem: no way around copying
        log.warning("cannot hard-link %s into %s (%s): copying it", src, dst, e)
        shutil.copyfile(src, dst)


def _merge_into(tmp: Path, stores: list[MemoryStore]) -> MergeResult:
    manifest = dict(stores[0].manifest)
    shutil.copytree(stores[0].path / CODEC_DIR, tmp / CODEC_DIR)
    (tmp / SHARD_DIR).mkdir()
    conn = _connect(tmp / META_DB, readonly=False)
    conn.executescript(_SCHEMA)
    cols = "ref_id, doc_id, chunk, title, text, n_tokens, tokens, built, deleted, shard, slot"
    offsets, offset, next_shard, records = [], 0, 0, 0
    conn.execute("BEGIN IMMEDIATE")
    try:
        for s in stores:
            shard_map = {}
            for shard in sorted(s._tails()):
                shard_map[shard] = next_shard
                _link(s._shards.path(shard), tmp / SHARD_DIR / _shard_name(next_shard))
                next_shard += 1
            rows = s._conn().execute(f"SELECT {cols} FROM refs ORDER BY ref_id").fetchall()
            new_rows = [
                (r[0] + offset, *r[1:9], None if r[9] is None else shard_map[r[9]], r[10]) for r in rows
            ]
            try:
                conn.executemany(f"INSERT INTO refs ({cols}) VALUES ({','.join('?' * 11)})", new_rows)
            except sqlite3.IntegrityError:
                raise StoreError(
                    f"cannot merge {s.path}: one of its documents is also in an earlier part; each "
                    "document must be built by one rank"
                ) from None
            records += sum(r[9] is not None for r in rows)
            offsets.append(offset)
            seq = s._conn().execute("SELECT seq FROM sqlite_sequence WHERE name = 'refs'").fetchone()
            offset += int(seq[0]) if seq else 0
        conn.execute("DELETE FROM sqlite_sequence WHERE name = 'refs'")
        conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('refs', ?)", (offset,))
        conn.execute("INSERT INTO info VALUES ('append_shard_min', ?)", (str(next_shard),))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    live, pending, deleted = conn.execute(
        "SELECT COALESCE(SUM(built = 1 AND deleted = 0), 0), COALESCE(SUM(built = 0 AND deleted = 0), 0), "
        "COALESCE(SUM(deleted = 1), 0) FROM refs"
    ).fetchone()
    conn.close()
    manifest.update(
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        index=None,
        counts={"live": live, "pending": pending, "deleted": deleted, "records": records},
        merged_from=[str(s.path) for s in stores],
    )
    _fsync_dir(tmp / SHARD_DIR)
    _write_json_atomic(tmp / MANIFEST, manifest)
    return MergeResult(path=tmp, id_offsets=offsets, records=records)
