"""Atomic file writes: a temporary file beside the target, fsynced, then renamed into place.

The one temp-file + fsync + rename helper of the data layer (feature files, exported models and
the index files written through it). A reader never sees a torn file, and the file gets the mode a
plain ``open(path, "w")`` would give it (0666 less the umask): ``mkstemp`` creates 0600, which left
artifacts that a container running as another user could not read.
"""

from __future__ import annotations

import ctypes
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

__all__ = ["FlushBehind", "atomic_file", "atomic_write", "current_umask", "fsync_dir"]

FLUSH_BEHIND_BYTES = 1 << 20  # a streamed file's writeback starts every this many bytes (bench/flush_behind.py: 1 MiB beat 8 and 0.25)
_WAIT_BEFORE, _WRITE, _WAIT_AFTER = 1, 2, 4  # sync_file_range(2) flags


def current_umask() -> int:
    """The process umask, read without changing it (``os.umask`` can only be read by setting it,
    which races with other threads creating files); falls back to set-and-restore off Linux."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """An open binary file that replaces ``path`` only when the block ends without an error: a
    temporary file beside it, fsynced, then renamed into place (never a torn file). For writers
    that stream (a multi-GB index), so nothing is assembled in memory first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp's 0600 -> what open() would have made
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename or a new file in ``directory`` survive a power cut (the entry lives in the directory)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, blob: bytes | str) -> None:
    """Write ``blob`` to ``path`` through :func:`atomic_file`."""
    with atomic_file(path) as f:
        f.write(blob.encode() if isinstance(blob, str) else blob)


class FlushBehind:
    """A write-only stream over ``file`` that starts each ``chunk`` bytes' writeback as soon as they
    are written and waits for the chunk before (Linux ``sync_file_range``), so a multi-GB file never
    holds more than two chunks of dirty pages: its own fsync has little left to do, and another file's
    fsync (the write-ahead log's, one per acknowledged change) does not queue behind gigabytes of
    writeback (``python bench/flush_behind.py``: a 512-byte fsync's p99 while 700 MB are written,
    20-41 ms plainly, 4-6 ms in 1 MiB chunks, for 10 % longer writing). PostgreSQL's
    checkpoint_flush_after, RocksDB's bytes_per_sync. Durability is still the caller's fsync;
    elsewhere than Linux, a plain stream."""

    def __init__(self, file: BinaryIO, chunk: int = FLUSH_BEHIND_BYTES):
        self.file, self.chunk = file, chunk
        self.written = self.started = self.previous = 0  # bytes written; writeback started up to; the chunk before began at

    def write(self, blob) -> int:
        n = self.file.write(blob)
        self.written += n
        if self.written - self.started >= self.chunk:
            self.file.flush()
            fd = self.file.fileno()
            _sync_range(fd, self.started, self.written - self.started, _WRITE)
            if self.started > self.previous:  # the chunk before this one: on disk before more is written
                _sync_range(fd, self.previous, self.started - self.previous, _WAIT_BEFORE | _WRITE | _WAIT_AFTER)
            self.previous, self.started = self.started, self.written
        return n


def _sync_range(fd: int, offset: int, length: int, flags: int) -> None:
    if _libc_sync_file_range is not None:
        _libc_sync_file_range(fd, offset, length, flags)  # an error only makes the final fsync do more


def _find_sync_file_range():
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    function.restype = ctypes.c_int
    return function


_libc_sync_file_range = _find_sync_file_range()
