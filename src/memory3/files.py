"""Writing files and directories so that a crash never leaves a half-written one in place.

A memory bank, its index, a checkpoint and a training run's state are all directories that must
appear whole. `replace_dir` writes one aside and swaps it in; `recover_dir` finishes a swap a
crash interrupted. `write_json_atomic` does the same for one JSON file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from memory3.errors import StoreError, StoreLockedError
from memory3.faults import crash_point

log = logging.getLogger(__name__)

ASIDE_SUFFIX = ".replaced"


def fsync(path: str | Path) -> None:
    """Flush a file's or a directory's entries to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def dir_mode() -> int:
    """The mode `mkdir` gives a new directory under the process umask (`mkdtemp` gives 0700)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o777 & ~mask


def write_json_atomic(path: Path, obj: dict[str, Any]) -> None:
    """Write `obj` as JSON to `path` through a temporary file renamed into place."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync(path.parent)


def _aside(path: Path) -> Path:
    return path.with_name(path.name + ASIDE_SUFFIX)


@contextmanager
def replace_dir(path: str | Path, *, sync: bool = True, label: str = "files") -> Iterator[Path]:
    """Write the directory that replaces `path`, whole.

    Yields a new empty directory beside `path` (mode from the umask) to write into. When the
    block ends without an error, its files are fsynced (`sync`), the old `path` (if any) is
    renamed to `<path>.replaced`, the new directory renamed to `path`, then the old one deleted.
    At any moment of a crash, `path` is the old directory or the new one, or, between the two
    renames, missing with `<path>.replaced` beside it, which `recover_dir` moves back. On an
    error the new directory is removed and `path` is untouched. `label` names its crash points
    (`<label>.written`, `<label>.moved_aside`: memory3.faults)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for old in path.parent.glob(f".{path.name}.writing-*"):  # left by a write a crash cut short
        shutil.rmtree(old, ignore_errors=True)
    recover_dir(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.writing-", dir=path.parent))
    aside = _aside(path)
    try:
        os.chmod(tmp, dir_mode())
        yield tmp
        if sync:
            for f in tmp.rglob("*"):
                if f.is_file():
                    fsync(f)
            fsync(tmp)
        crash_point(f"{label}.written")
        if aside.exists():  # a finished swap's leftover (`path` exists: recover_dir ran)
            shutil.rmtree(aside)
        if path.exists():
            path.rename(aside)
        crash_point(f"{label}.moved_aside")
        tmp.rename(path)
        fsync(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def recover_dir(path: str | Path) -> Path:
    """Where the directory `path` is: after a `replace_dir` that a crash cut between its two
    renames, move the old directory back (or, where this process may not write, read it where it
    lies). Returns the path to read."""
    path = Path(path)
    aside = _aside(path)
    if path.exists() or not aside.is_dir():
        return path
    try:
        aside.rename(path)
    except OSError as e:  # a read-only place: read the old directory aside
        log.warning("cannot move %s back to %s (%s): reading it where it is", aside, path, e)
        return aside
    log.warning("restored %s, left aside by an interrupted write", path)
    return path


class WriterLock:
    """An exclusive lock on `path` (flock) for the one process that may write something, with a
    note in the file saying who holds it: a second writer is refused with that note. The lock
    goes when the process ends, however it ends."""

    def __init__(self, path: Path, what: str) -> None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except PermissionError:
            raise StoreError(
                f"{what}: no permission to write here; open it read-only, or run as its owner"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            finally:
                os.close(fd)
            raise StoreLockedError(
                f"{what} is open for writing by {holder}; one process writes to a bank at a time: "
                "stop that process or wait for it to finish (reading needs no lock)"
            ) from None
        argv = list(getattr(sys, "argv", []) or ["python"])
        argv[0] = os.path.basename(argv[0])
        note = f"pid {os.getpid()} ({' '.join(argv)[:200]}) since {time.strftime('%Y-%m-%d %H:%M:%S')}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, note.encode() + b"\n", 0)
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)  # nobody holds it now
            os.close(self._fd)  # closing releases the flock
            self._fd = None
