"""Atomic file writes whose result is readable as the umask says.

``tempfile.mkstemp`` creates its file with mode 0600 whatever the umask, and renaming it into
place keeps that mode: an index built by root on a host volume was unreadable to the containers'
user. Here the temporary file gets ``0666 & ~umask`` (what ``open()`` would give) before it is
renamed. (``training.data.atomic_file`` has the same flaw; it belongs to the data layer.)
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (no window where it is 0)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_lock:  # elsewhere: set and restore (another thread creating a file meanwhile gets a wider mode)
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    return 0o666 & ~current_umask()


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """An open binary file that replaces ``path`` only when the block ends without an error: a
    temporary file beside it, given the umask's mode, fsynced, then renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write(path: str | os.PathLike, blob: bytes | str) -> None:
    with atomic_file(path) as f:
        f.write(blob.encode() if isinstance(blob, str) else blob)
