"""Shard files of a memory bank: fixed-size records `[crc32 (4 B, little endian) | codec record]`,
record i of shard n at byte `i * record_size` of `shards/{n:05d}.bin`. Reads are positioned
(pread) after asking the kernel for every record of a batch at once; writes are pwrite + fsync.
Which records are committed, and what they mean, is the store's business (store.py)."""

from __future__ import annotations

import errno
import os
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from memory3.errors import StoreCorruptError, StoreError
from memory3.files import fsync

HEADER_BYTES = 4  # crc32 of the codec record


def shard_name(shard: int) -> str:
    return f"{shard:05d}.bin"


def with_crc(payload: np.ndarray) -> np.ndarray:
    """(n, record_bytes) codec records -> (n, HEADER_BYTES + record_bytes) headed by their crc32."""
    out = np.empty((payload.shape[0], HEADER_BYTES + payload.shape[1]), dtype=np.uint8)
    out[:, HEADER_BYTES:] = payload
    crcs = np.array([zlib.crc32(row) for row in payload], dtype="<u4")
    out[:, :HEADER_BYTES] = crcs.view(np.uint8).reshape(-1, HEADER_BYTES)
    return out


class Shards:
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
        return self.root / shard_name(shard)

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
        after another (BENCHMARKS.md, retrieval latency).
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
            fsync(self.root)

    def forget(self) -> None:
        """Close every read descriptor (after compaction, before verify, and on close)."""
        fds, self._fds = self._fds, OrderedDict()
        for fd in fds.values():
            os.close(fd)

    def __del__(self) -> None:
        self.forget()

    def verify(self, shard: int, items: list[tuple[int, int]]) -> tuple[int, list[str]]:
        """(records checked, problems) of one shard's committed records, given as (ref_id, slot)."""
        p = self.path(shard)
        if not p.exists():
            return 0, [f"shard {p.name} missing ({len(items)} records)"]
        size = p.stat().st_size
        inside = [(i, sl) for i, sl in items if (sl + 1) * self.rs <= size]
        past = [i for i, sl in items if (sl + 1) * self.rs > size]
        errors = []
        if past:
            errors.append(
                f"shard {p.name} is truncated ({size} bytes): {len(past)} records lie past its end "
                f"(refs {past[:5]}{'…' if len(past) > 5 else ''})"
            )
        for b in range(0, len(inside), 4096):
            part = inside[b : b + 4096]
            for j in bad_checksums(self.read([(shard, sl) for _, sl in part])):
                errors.append(f"shard {p.name} record {part[j][1]} (ref {part[j][0]}): checksum mismatch")
        return len(inside), errors


def bad_checksums(records: np.ndarray) -> list[int]:
    """Rows of (n, HEADER_BYTES + record_bytes) records whose checksum does not match."""
    crcs = records[:, :HEADER_BYTES].copy().view("<u4")[:, 0]
    return [j for j in range(len(records)) if zlib.crc32(records[j, HEADER_BYTES:]) != crcs[j]]
