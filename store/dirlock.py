"""The serving lock: a process serving an index directory holds a shared POSIX lock on its
``serving.lock``; a restore takes it exclusively, so a restore into a served directory is refused,
and a version directory a server still holds is never garbage-collected.
"""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

from index.store import IndexLoadError
from store.errors import SnapshotError
from store.layout import LOCK_NAME

_held: dict[Path, list[int]] = {}  # directory -> [fd, holders in this process]
_held_lock = threading.Lock()


def hold_index_dir(directory: Path) -> None:
    """Mark ``directory`` as served by this process (a POSIX lock, so this process may load it twice
    during a reload of the same directory; another process's restore is refused)."""
    directory = Path(directory).resolve()
    with _held_lock:
        if directory in _held:
            _held[directory][1] += 1
            return
        fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise IndexLoadError(f"{directory}: a restore is under way; start again once it has finished") from None
        _held[directory] = [fd, 1]


def held_here(directory: Path) -> bool:
    with _held_lock:
        return Path(directory).resolve() in _held


def release_index_dir(directory: Path) -> None:
    directory = Path(directory).resolve()
    with _held_lock:
        entry = _held.get(directory)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            os.close(entry[0])  # closing releases the lock
            del _held[directory]


class ExclusiveLock:
    """An exclusive lock on ``directory`` (a restore takes it): SnapshotError while a server holds it."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.fd: int | None = None

    def __enter__(self) -> None:
        if not self.directory.exists():
            return
        self.fd = os.open(self.directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            self.fd = None
            raise SnapshotError(
                f"{self.directory} is being served: stop the server first, or restore into another directory "
                "(--index) and swap to it with POST /v1/admin/reload"
            ) from None

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)


def is_served(directory: Path) -> bool:
    """Whether a server process holds ``directory`` (its shared lock on the serving lock file)."""
    if held_here(directory):  # POSIX locks never conflict within a process (and closing one would drop ours)
        return True
    if not (directory / LOCK_NAME).exists():
        return False
    try:
        with ExclusiveLock(directory):
            return False
    except SnapshotError:
        return True
