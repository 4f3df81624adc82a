"""Saving an index so that a kill at any moment leaves a loadable one (the previous or the new).

``VectorIndex.save`` renames each of its three files into place, so a kill between two renames
leaves a directory whose checksums disagree (detected, but not usable). Here the whole directory
is swapped instead: the new index is written complete into ``.<name>.new``, then
``<name>`` → ``.<name>.old`` and ``.<name>.new`` → ``<name>`` (two renames on one filesystem),
then the old copy is removed. :func:`recover` undoes a kill between the two renames.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from index.store import VectorIndex

log = logging.getLogger(__name__)


def _staging(directory: Path) -> Path:
    return directory.parent / f".{directory.name}.new"


def _previous(directory: Path) -> Path:
    return directory.parent / f".{directory.name}.old"


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def swap_into_place(staged: Path, directory: Path) -> None:
    """Replace ``directory`` by the complete directory ``staged`` (same filesystem)."""
    previous = _previous(directory)
    shutil.rmtree(previous, ignore_errors=True)
    if directory.exists():
        os.rename(directory, previous)
    os.rename(staged, directory)  # a kill before this line is undone by recover()
    _fsync_dir(directory.parent)
    shutil.rmtree(previous, ignore_errors=True)


def save_atomically(index: VectorIndex, directory: Path) -> None:
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = _staging(directory)
    shutil.rmtree(staging, ignore_errors=True)
    index.save(staging)  # every file fsynced
    _fsync_dir(staging)
    swap_into_place(staging, directory)


def recover(directory: Path) -> None:
    """Finish or undo a save that was killed: afterwards ``directory`` is the last complete index."""
    directory = Path(directory)
    previous, staging = _previous(directory), _staging(directory)
    if not directory.exists() and previous.exists():
        log.warning("%s: a save was interrupted between its renames; restoring the previous index", directory)
        os.rename(previous, directory)
    shutil.rmtree(previous, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)  # an unfinished or orphaned new copy


def load_index(directory: Path, expected_manifest_hash: str | None = None) -> VectorIndex:
    recover(directory)
    return VectorIndex.load(directory, expected_manifest_hash=expected_manifest_hash)
