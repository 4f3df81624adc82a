"""Atomic file writes: a temporary file beside the target, fsynced, then renamed into place.

The one temp-file + fsync + rename helper of the data layer (feature files, exported models and
the index files written through it). A reader never sees a torn file, and the file gets the mode a
plain ``open(path, "w")`` would give it (0666 less the umask): ``mkstemp`` creates 0600, which left
artifacts that a container running as another user could not read.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_file", "atomic_write", "current_umask", "fsync_dir"]


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
