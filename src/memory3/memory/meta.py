"""The metadata of a memory bank: one SQLite database (`meta.sqlite`, WAL mode while a writer has
it open) with a row per reference — ids, document, text, tokens, whether its memory is written
(built), deleted, and which shard and slot hold its record — and a small key/value table.

Ids. A reference's `ref_id` is assigned once (AUTOINCREMENT) and never reused. A row points to a
record only once the record's bytes are on disk (the store writes them first), so a reader that
follows committed rows never sees a half-written record.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from memory3.errors import StoreCorruptError, StoreError

SCHEMA = """
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
SQL_BATCH = 900  # ids per "IN (...)" query, under SQLite's variable limit
Place = tuple[int, int]  # (shard, slot)


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


def connect(path: Path, readonly: bool) -> sqlite3.Connection:
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


def create(path: Path) -> None:
    """A new, empty metadata database at `path`."""
    conn = connect(path, readonly=False)
    conn.executescript(SCHEMA)
    conn.execute("INSERT INTO info VALUES ('append_shard_min', '0')")
    conn.close()


def _chunks(seq: Sequence[int], n: int = SQL_BATCH) -> Iterator[Sequence[int]]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


class Metadata:
    """The metadata database of one bank, opened read-only or for its one writer. Not
    thread-safe: the store serialises calls with its lock."""

    def __init__(self, path: Path, readonly: bool) -> None:
        self.path = path
        if not path.is_file():
            raise StoreCorruptError(
                f"{path}: missing; the bank's metadata is gone: restore it from a backup or rebuild the bank"
            )
        conn = None
        try:
            conn = connect(path, readonly)
            conn.execute("SELECT value FROM info WHERE key = 'append_shard_min'").fetchone()
            conn.execute("SELECT ref_id FROM refs LIMIT 1").fetchone()
        except sqlite3.DatabaseError as e:
            if conn is not None:
                conn.close()
            raise StoreCorruptError(
                f"{path}: cannot be read ({e}); restore it from a backup or rebuild the bank"
            ) from None
        self._db: sqlite3.Connection | None = conn

    @property
    def conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError(f"{self.path.parent}: the store is closed")
        return self._db

    def close(self, single_file: bool = False) -> None:
        """Close; `single_file` (a writer) first folds the WAL into the database and leaves WAL
        mode, so that readers that come later create no -wal/-shm beside it. That fails while a
        reader has it open: it stays in WAL mode then."""
        if self._db is None:
            return
        if single_file:
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                self._db.execute("PRAGMA journal_mode=DELETE")
            except sqlite3.OperationalError:
                pass
        self._db.close()
        self._db = None

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: committed when the block ends, rolled back on an error."""
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    # --- writing (inside `transaction`) ---------------------------------------------------------
    def insert(self, r: RefMeta, built: bool, place: Place | None) -> int:
        if not isinstance(r, RefMeta):
            raise TypeError(f"expected RefMeta, got {type(r).__name__}")
        tokens = None if r.tokens is None else np.asarray(r.tokens, dtype="<i4").tobytes()
        shard, slot = place if place is not None else (None, None)
        try:
            cur = self.conn.execute(
                "INSERT INTO refs (doc_id, chunk, title, text, n_tokens, tokens, built, shard, slot) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (r.doc_id, r.chunk, r.title, r.text, r.n_tokens, tokens, int(built), shard, slot),
            )
        except sqlite3.IntegrityError:
            raise StoreError(
                f"document {r.doc_id!r} chunk {r.chunk} is already in {self.path.parent}: delete the "
                "document first, or replace it (`memory3 store add` replaces documents with the same id)"
            ) from None
        return int(cur.lastrowid)  # type: ignore[arg-type]

    def mark_deleted(self, doc_id: str) -> list[int]:
        """Mark a document's live references deleted; returns their ids."""
        ids = self.doc_refs(doc_id).tolist()
        self.conn.execute("UPDATE refs SET deleted = 1 WHERE doc_id = ? AND deleted = 0", (doc_id,))
        return ids

    def set_places(self, moves: Sequence[tuple[int, int, int]]) -> None:
        """Mark references built at new places: (shard, slot, ref_id) triples."""
        self.conn.executemany("UPDATE refs SET built = 1, shard = ?, slot = ? WHERE ref_id = ?", moves)

    def info(self, key: str) -> str:
        return self.conn.execute("SELECT value FROM info WHERE key = ?", (key,)).fetchone()[0]

    def set_info(self, key: str, value: str) -> None:
        self.conn.execute("UPDATE info SET value = ? WHERE key = ?", (value, key))

    # --- reading --------------------------------------------------------------------------------
    def tails(self) -> dict[int, int]:
        """Committed record count (max slot + 1) of every shard a row points to."""
        rows = self.conn.execute(
            "SELECT shard, MAX(slot) + 1 FROM refs WHERE shard IS NOT NULL GROUP BY shard"
        ).fetchall()
        return {int(s): int(n) for s, n in rows}

    def places(self) -> list[tuple[int, int, int]]:
        """(ref_id, shard, slot) of every row that points to a record, in shard order."""
        return self.conn.execute(
            "SELECT ref_id, shard, slot FROM refs WHERE shard IS NOT NULL ORDER BY shard, slot"
        ).fetchall()

    def rows(self, ref_ids: Sequence[int], cols: str) -> dict[int, tuple[Any, ...]]:
        """{ref_id: (cols…)} of the known ids among `ref_ids`, read in one transaction."""
        out: dict[int, tuple[Any, ...]] = {}
        uniq = sorted(set(ref_ids))
        conn = self.conn
        several = len(uniq) > SQL_BATCH  # one SELECT is one read transaction already
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

    def refs(self, ref_ids: Sequence[int]) -> list[StoredRef]:
        """Metadata of references (deleted and pending ones too), in order."""
        rows = self.rows(ref_ids, "doc_id, chunk, text, title, tokens, n_tokens, built, deleted")
        missing = [i for i in ref_ids if i not in rows]
        if missing:
            raise KeyError(f"{self.path.parent}: unknown ref ids {missing[:10]}")
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

    def ids(self, where: str, args: tuple[Any, ...] = (), order: str = "ref_id") -> np.ndarray:
        rows = self.conn.execute(f"SELECT ref_id FROM refs WHERE {where} ORDER BY {order}", args)
        return np.array([r[0] for r in rows], dtype=np.int64)

    def doc_refs(self, doc_id: str) -> np.ndarray:
        """Live and pending ref ids of one document, in chunk order."""
        return self.ids("doc_id = ? AND deleted = 0", (doc_id,), order="chunk")

    def doc_ids(self) -> list[str]:
        rows = self.conn.execute("SELECT DISTINCT doc_id FROM refs WHERE deleted = 0 ORDER BY doc_id")
        return [r[0] for r in rows]

    def counts(self) -> dict[str, int]:
        live, pending, deleted, held = self.conn.execute(
            "SELECT COALESCE(SUM(built = 1 AND deleted = 0), 0), COALESCE(SUM(built = 0 AND deleted = 0), 0), "
            "COALESCE(SUM(deleted = 1), 0), COALESCE(SUM(shard IS NOT NULL), 0) FROM refs"
        ).fetchone()
        return {"live": int(live), "pending": int(pending), "deleted": int(deleted), "records": int(held)}
