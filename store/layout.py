"""Every name the store gives a file or directory, in one place.

The names are what earlier versions wrote, kept so that an index directory written before the store
was its own package loads unchanged: a checkpoint's log position is still ``snapshot.json``, though
the store now calls that a checkpoint and keeps "snapshot" for the backup tar file.

An index directory (one model version's collection)::

    <index>/audio/, <index>/visual/    one checkpoint each: the index files, CHECKPOINT_NAME, API_ITEMS_NAME
    <index>/wal/<modality>/            the log segments after each modality's checkpoint (*.wal), APPEND_LOCK_NAME
    <index>/CARRIED_NAME               in a prepared version: what it carried from the previous one
    <index>/MOVED_NAME                 in a directory a reload left: where the served index went
    <index>/LOCK_NAME                  held (shared) by each process serving the directory
"""

from __future__ import annotations

import json
from pathlib import Path

WAL_DIR = "wal"
SEGMENT_SUFFIX = ".wal"  # segments are named by the first LSN they may hold: 00000000000000000042.wal
APPEND_LOCK_NAME = "append.lock"  # in <index>/wal/<modality>/: held by the worker process appending (store.sharedlog)
CHECKPOINT_NAME = "snapshot.json"  # in <index>/<modality>/: {"lsn": the last change the checkpoint holds}
API_ITEMS_NAME = "api_items.npz"  # in <index>/<modality>/: raw features of API-written items (store.api_items)
CARRIED_NAME = "carried.json"  # {"from": the previous version's directory, "lsn": {modality: last change carried}}
MOVED_NAME = "moved.json"  # {"index_dir": where the served index went, "at": Unix time}
LOCK_NAME = "serving.lock"  # a served directory holds a shared POSIX lock on it; a restore an exclusive one
CARD_NAME = "avsearch-snapshot.json"  # in a snapshot file: model, time, LSN and item count per modality
SNAPSHOT_SUFFIX = ".tar"


def wal_dir(index_dir: Path, modality: str) -> Path:
    return Path(index_dir) / WAL_DIR / modality


def segment_name(first_lsn: int) -> str:
    return f"{first_lsn:020d}{SEGMENT_SUFFIX}"


def staging(directory: Path) -> Path:
    """Where a whole-directory save writes before the swap (store.persist)."""
    return directory.parent / f".{directory.name}.new"


def previous(directory: Path) -> Path:
    """Where the replaced directory waits between the swap's two renames."""
    return directory.parent / f".{directory.name}.old"


def forked(directory: Path) -> Path:
    """Where a forked checkpoint writer (store.forked) writes before the swap."""
    return directory.parent / f".{directory.name}.forked"


def restoring(directory: Path) -> Path:
    """Where a snapshot file is unpacked before it becomes ``directory``."""
    return directory.parent / f".{directory.name}.restore"


def version_dir(link: Path, manifest_hash: str) -> Path:
    """The directory of one model version beside the configured index path: ``<index>-<12 hex>``."""
    return link.parent / f"{link.name}-{manifest_hash[:12]}"


def building(version: Path) -> Path:
    return version.parent / f".{version.name}.build"


def pointer(link: Path) -> Path:
    """The symlink made beside ``link`` and renamed over it (an atomic re-point)."""
    return link.parent / f".{link.name}.link"


def checkpoint_lsn(directory: Path) -> int:
    """The last log sequence number inside the checkpoint in ``directory`` (0: an index built by a job)."""
    try:
        return int(json.loads((Path(directory) / CHECKPOINT_NAME).read_text())["lsn"])
    except FileNotFoundError:
        return 0


def checkpoint_card(lsn: int) -> bytes:
    return json.dumps({"lsn": lsn}).encode()
