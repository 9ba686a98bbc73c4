"""Merging memory banks built separately (one per process of a torchrun build) into one, without
copying record bytes."""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from memory3.errors import StoreError
from memory3.files import fsync, replace_dir, write_json_atomic
from memory3.memory.manifest import CODEC_DIR, MANIFEST, META_DB, SHARD_DIR
from memory3.memory.meta import SCHEMA, connect
from memory3.memory.shards import shard_name
from memory3.memory.store import MemoryStore

log = logging.getLogger(__name__)


@dataclass
class MergeResult:
    path: Path
    id_offsets: list[int]  # ref_id in the merged store = ref_id in part i + id_offsets[i]
    records: int


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
        with replace_dir(out, label="merge") as tmp:
            result = _merge_into(tmp, stores)
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
    conn = connect(tmp / META_DB, readonly=False)
    conn.executescript(SCHEMA)
    cols = "ref_id, doc_id, chunk, title, text, n_tokens, tokens, built, deleted, shard, slot"
    offsets, offset, next_shard, records = [], 0, 0, 0
    conn.execute("BEGIN IMMEDIATE")
    try:
        for s in stores:
            shard_map = {}
            for shard in sorted(s._meta.tails()):
                shard_map[shard] = next_shard
                _link(s._shards.path(shard), tmp / SHARD_DIR / shard_name(next_shard))
                next_shard += 1
            rows = s._meta.conn.execute(f"SELECT {cols} FROM refs ORDER BY ref_id").fetchall()
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
            seq = s._meta.conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'refs'").fetchone()
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
    fsync(tmp / SHARD_DIR)
    write_json_atomic(tmp / MANIFEST, manifest)
    return MergeResult(path=tmp, id_offsets=offsets, records=records)
