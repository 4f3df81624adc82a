"""Saving an index so that a kill at any moment leaves a loadable one (the previous or the new).

``VectorIndex.save`` renames each of its three files into place, so a kill between two renames
leaves a directory whose checksums disagree (detected, but not usable). Here the whole directory
is swapped instead: the new index is written complete into ``.<name>.new``, then
``<name>`` → ``.<name>.old`` and ``.<name>.new`` → ``<name>`` (names: :mod:`store.layout`) (two renames on one filesystem),
then the old copy is removed. :func:`recover` undoes a kill between the two renames.

A save that fails (disk full, I/O error) raises only after putting the previous index back in
place and deleting its partial copy (freeing the space), so the caller can rely on the disk holding
the previous index. The second rename is the commit point: a failure after it (the directory
fsync) is logged and the save counts as done, since the new index is already the one in place.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Protocol

from avdata.atomic import fsync_dir
from index.store import VectorIndex
from store import layout

log = logging.getLogger(__name__)


class Saveable(Protocol):
    """An index, or a checkpoint's copy of one (which writes the files beside it too)."""

    def save(self, directory: Path) -> Path: ...


def swap_into_place(staged: Path, directory: Path) -> None:
    """Replace ``directory`` by the complete directory ``staged`` (same filesystem)."""
    previous = layout.previous(directory)
    shutil.rmtree(previous, ignore_errors=True)
    try:
        if directory.exists():
            os.rename(directory, previous)
        os.rename(staged, directory)  # the commit point; a kill before this line is undone by recover()
    except OSError:
        recover(directory)  # now, not at the next load: the next save would delete .old as debris
        raise
    try:
        fsync_dir(directory.parent)
    except OSError as err:  # the new index is in place (and served): only its durability is in doubt
        log.error("%s: saved, but the directory could not be synced (%s); a power cut may lose the last change", directory, err)
    shutil.rmtree(previous, ignore_errors=True)


def save_atomically(index: Saveable, directory: Path) -> None:
    """Save ``index`` as one swap."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = layout.staging(directory)
    shutil.rmtree(staging, ignore_errors=True)
    try:
        index.save(staging)  # every file fsynced
        fsync_dir(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # a partial copy on a full disk keeps it full
        raise
    swap_into_place(staging, directory)


def recover(directory: Path) -> None:
    """Finish or undo a save that was killed: afterwards ``directory`` is the last complete index."""
    directory = Path(directory)
    previous, staging = layout.previous(directory), layout.staging(directory)
    if not directory.exists() and previous.exists():
        log.warning("%s: a save was interrupted between its renames; restoring the previous index", directory)
        os.rename(previous, directory)
    shutil.rmtree(previous, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)  # an unfinished or orphaned new copy
    shutil.rmtree(layout.forked(directory), ignore_errors=True)  # a checkpoint writer killed with its server


def load_index(directory: Path, expected_manifest_hash: str | None = None) -> VectorIndex:
    recover(directory)
    return VectorIndex.load(directory, expected_manifest_hash=expected_manifest_hash)
