"""Snapshot files (backups): one tar holding both modalities' indexes at one moment, and restoring one.

A snapshot file is ``<name>.tar`` in the snapshot directory: ``audio/`` and ``visual/`` (each an
index directory with its ``snapshot.json``) and ``avsearch-snapshot.json`` (model, time, the log
sequence number and item count of each modality). It is taken with both modalities' commits held
off for the copy only (a forked writer's, which also merges the API items beside the index, as a
checkpoint's does; or a copy in memory), so it is one point in time across both, and every change
acknowledged before the request is in it.

``restore`` checks the file (member names, both indexes load, built from the configured model),
unpacks it beside the target index directory and swaps it into place, dropping the target's
write-ahead log (its changes are not part of the restored state). A serving process holds a lock on
its index directory (:mod:`store.dirlock`), so a restore into a served directory is refused.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tarfile
import tempfile
import time
from contextlib import ExitStack
from functools import partial
from pathlib import Path

from avdata.atomic import current_umask, fsync_dir
from index.embedder import MODALITIES
from index.store import IndexLoadError, VectorIndex
from store import layout
from store.checkpoints import discard
from store.dirlock import ExclusiveLock
from store.errors import SnapshotError, SnapshotNotFound
from store.layout import CARD_NAME
from store.persist import swap_into_place

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
RESTORE_MAX_BYTES = 64 * 2**30  # what restore unpacks at most, unless told otherwise (--max-bytes)


def check_name(name: str) -> str:
    if not NAME.match(name) or name.endswith(".tar"):
        raise SnapshotError(f"snapshot name {name!r}: use letters, digits, '.', '_' and '-' (the name without .tar)")
    return name


def describe(path: Path) -> dict:
    with tarfile.open(path) as tar:
        card = json.load(tar.extractfile(CARD_NAME))
    return {"name": path.name.removesuffix(".tar"), "bytes": path.stat().st_size, **card}


def list_snapshots(directory: Path) -> list[dict]:
    out = []
    for path in sorted(Path(directory).glob("*.tar")):
        try:
            out.append(describe(path))
        except (OSError, KeyError, TypeError, ValueError, tarfile.TarError):  # ValueError: JSON or UTF-8 errors
            continue  # a file that is not one of ours (or a torn copy someone put here)
    return out


def create_snapshot(collection, directory: Path) -> dict:
    """Write ``<directory>/<name>.tar`` holding both modalities of ``collection`` (a
    :class:`store.collection.Collection`) as of now; returns its description."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards, checkpointer = collection.shards, collection.checkpointer
    copies = {}
    staging = tempfile.TemporaryDirectory(dir=directory, prefix=".build-")
    root = Path(staging.name)
    try:
        with ExitStack() as held:
            for modality in MODALITIES:  # a fixed order (checkpoint lock, then commits): two requests cannot hold one each
                held.enter_context(checkpointer.held(modality))
            with ExitStack() as paused:
                for modality in MODALITIES:
                    paused.enter_context(shards[modality].paused())
                    shards[modality].check_applied()  # an index without an answered change must not be saved
                lsns = {m: shards[m].last_lsn for m in MODALITIES}
                beside = {m: partial(checkpointer.files_beside, m, shards[m].checkpoint_lsn, lsns[m]) for m in MODALITIES}
                for modality in MODALITIES:  # forked writers (or copies in memory), as for a checkpoint, at the server's priority: the caller waits
                    copies[modality] = checkpointer.copy(modality, background=False, extra=beside[modality])
            for modality, index in copies.items():  # a forked writer writes beside the live index: keep checkpoints off until it is moved out
                index.save(root / modality)  # with the files beside it (the log position, the API items)
        created = time.time()
        name = time.strftime("%Y%m%dT%H%M%S", time.gmtime(created)) + f"{created % 1:.6f}"[1:].replace(".", "-") + f"-{collection.version}"
        card = {"model": collection.version, "model_sha256": collection.embedder.manifest_hash, "created": round(created, 3), "lsn": lsns, "items": {m: len(c) for m, c in copies.items()}}
        (root / CARD_NAME).write_text(json.dumps(card, indent=2))
        archive = root / "snapshot.tar"
        with tarfile.open(archive, "w") as tar:
            tar.add(root / CARD_NAME, CARD_NAME)
            for modality in MODALITIES:
                tar.add(root / modality, modality)
        with open(archive, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(archive, 0o666 & ~current_umask())
        os.replace(archive, directory / f"{name}.tar")
        fsync_dir(directory)  # answered 201: the new name must survive a power cut too
    finally:
        for copy in copies.values():
            discard(copy)
        staging.cleanup()
    return describe(directory / f"{name}.tar")


def snapshot_path(directory: Path, name: str) -> Path:
    path = Path(directory) / f"{check_name(name)}.tar"
    if not path.is_file():
        raise SnapshotNotFound(f"no snapshot named {name!r} in {directory}")
    return path


def restore(file: Path, index_dir: Path, manifest_hash: str | None, max_bytes: int | None = None) -> dict:
    """Unpack snapshot ``file`` and make it ``index_dir`` (its previous content and log dropped).

    Its members' sizes must add up to at most ``max_bytes``: a tar header can claim any size, and the
    unpacking would fill the disk the served index lives on. A snapshot is still trusted like code:
    its index files go to FAISS's reader, which is not hardened against hostile input.
    """
    file, target = Path(file), Path(index_dir).resolve()
    max_bytes = RESTORE_MAX_BYTES if max_bytes is None else max_bytes
    try:
        tar = tarfile.open(file)
    except (OSError, tarfile.TarError) as err:
        raise SnapshotError(f"{file}: not a snapshot file ({err})") from None
    try:
        with tar:
            members = tar.getmembers()
            allowed = {CARD_NAME, *MODALITIES}
            for member in members:
                parts = Path(member.name).parts
                if not parts or parts[0] not in allowed or ".." in parts or member.name.startswith("/") or not (member.isfile() or member.isdir()):
                    raise SnapshotError(f"{file}: unexpected member {member.name!r}; not a snapshot file made by this service")
            size = sum(m.size for m in members)
            if size > max_bytes:
                raise SnapshotError(f"{file}: its members hold {size} bytes, more than --max-bytes {max_bytes}; raise it if the snapshot is yours")
            if CARD_NAME not in {m.name for m in members}:
                raise SnapshotError(f"{file}: no {CARD_NAME}; not a snapshot file made by this service")
            card = json.load(tar.extractfile(CARD_NAME))
            if manifest_hash is not None and card.get("model_sha256") != manifest_hash:
                raise SnapshotError(f"{file}: taken with model {str(card.get('model_sha256'))[:12]}, not the configured model {manifest_hash[:12]}; restore it with that model")
            with ExclusiveLock(target):
                target.parent.mkdir(parents=True, exist_ok=True)
                staging = layout.restoring(target)
                shutil.rmtree(staging, ignore_errors=True)
                try:
                    tar.extractall(staging, filter="data")
                    for modality in MODALITIES:
                        VectorIndex.load(staging / modality, expected_manifest_hash=manifest_hash)  # checksums: a torn copy is refused here
                    swap_into_place(staging, target)
                except IndexLoadError as err:
                    raise SnapshotError(f"{file}: {err}") from None
                finally:
                    shutil.rmtree(staging, ignore_errors=True)
    except (tarfile.TarError, EOFError) as err:  # a truncated or damaged file
        raise SnapshotError(f"{file}: damaged snapshot file ({err})") from None
    return card
