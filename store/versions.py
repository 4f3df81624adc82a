"""Model versions of one collection: building the next one, carrying the items written through the
API into it, catching up what was written between the build and the swap, and collecting old ones.

``prepare`` builds a version ``<index>-<12 hex>`` beside the configured index path ``<index>``,
which becomes a symlink to it (replaced atomically). A running server holds the resolved directory
of its own version, so building the next one never clobbers the live one; a reload then swaps the
server over. The base collection is indexed from the data; then every item written through the API
to the live version is re-embedded by the new model from its raw features (``api_items.npz`` plus
the log after it) and its deletions applied (:func:`carry_over`); ``carried.json`` records the
last change carried per modality. Changes the live version logs after that are caught up when the
new version is loaded (:func:`catch_up`). Old version directories are deleted beyond
``keep_versions``, never the live one, the new one, or one a server still holds (:func:`collect_versions`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from avdata.atomic import atomic_write
from index.build import build_indexes
from index.embedder import MODALITIES, Embedder, load_manifest
from index.store import IndexLoadError, VectorIndex
from store import layout
from store.api_items import ApiItems, api_items_of
from store.changes import Change
from store.dirlock import is_served
from store.layout import API_ITEMS_NAME, CARRIED_NAME, checkpoint_lsn, wal_dir
from store.persist import load_index, swap_into_place
from store.served import check_not_moved, follow, point_link
from store.shard import Shard
from store.wal import read_records

log = logging.getLogger(__name__)
CARRY_BATCH = 4096  # items re-embedded per encoder call


def prepare(model_dir: Path, index_dir: Path, data: str, factory: str = "Flat", device: str = "auto", rebuild: bool = False, keep_versions: int = 3, say: Callable[[str], None] = log.info) -> None:
    """Index ``data`` with the model in ``model_dir`` unless the version at ``index_dir`` was built
    from that model; ``say`` gets one line per step (the command line prints them)."""
    _, manifest_hash = load_manifest(model_dir)
    link = Path(index_dir)
    check_not_moved(link)  # a reload moved the served index elsewhere: building from here would drop its writes
    if not rebuild:
        try:
            # Recover an interrupted save only when the index is gone: a running API may be saving
            # into this very directory, and recovery would delete its staging copy mid-save.
            sizes = {m: len((VectorIndex.load if (link / m).exists() else load_index)(link / m, manifest_hash)) for m in MODALITIES}
            say(f"index in {link} is up to date for model {manifest_hash[:12]} ({sizes}); nothing to do")
            return
        except IndexLoadError as err:
            log.info("building the index: %s", err)
    link.parent.mkdir(parents=True, exist_ok=True)
    version = layout.version_dir(link, manifest_hash)
    staging = layout.building(version)
    shutil.rmtree(staging, ignore_errors=True)
    live = link.resolve() if link.exists() else None  # the version being served: never collected, its API items carried
    indexes = build_indexes(model_dir, data, staging, factory, device, progress=False)
    if live is not None and not rebuild:
        _carry_api_items(indexes, Embedder(model_dir, device=device), live, staging, say)
    swap_into_place(staging, version)  # a kill leaves the old or the new version directory
    if link.exists() and not link.is_symlink():  # an index directory from before versioning: keep it aside
        os.rename(link, link.parent / f"{link.name}-previous-{int(time.time())}")
    point_link(link, version)  # atomic: readers see the old version or the new one
    say(f"built {', '.join(f'{m}: {len(ix)} items' for m, ix in indexes.items())} in {version} ({link} -> {version.name}) for model {manifest_hash[:12]}")
    for gone in collect_versions(link, keep_versions, [version, *([live] if live else [])]):
        say(f"deleted old version {gone.name} (AVSEARCH_KEEP_VERSIONS={keep_versions})")


def _carry_api_items(indexes: dict[str, VectorIndex], embedder: Embedder, live: Path, staging: Path, say: Callable[[str], None]) -> None:
    """The items written through the API to the live version, re-embedded by the new model, with its
    deletions applied; their raw features go along (``api_items.npz``) for the version after."""
    seen = {m: log_end(live, m) for m in indexes}  # before reading: a change logged meanwhile is caught up at the swap
    carried = carry_over(indexes, embedder, live)
    (staging / CARRIED_NAME).write_text(json.dumps({"from": str(live), "lsn": seen}))
    for modality, index in indexes.items():
        index.save(staging / modality)
        (staging / modality / API_ITEMS_NAME).write_bytes(carried[modality].to_bytes())
        say(f"{modality}: {len(carried[modality].features)} items written through the API re-embedded, {len(carried[modality].deleted)} deletions kept")


def log_end(index_dir: Path, modality: str) -> int:
    """The last change of ``modality`` in a version directory: its checkpoint's, or a later logged one."""
    after = checkpoint_lsn(Path(index_dir) / modality)
    return max([after, *(r.lsn for r in read_records(wal_dir(index_dir, modality), after))])


def carry_over(indexes: dict[str, VectorIndex], embedder: Embedder, previous_dir: Path) -> dict[str, ApiItems]:
    """Re-embed the API-written items of ``previous_dir`` (a version directory) with ``embedder``
    into ``indexes`` (the new version, built from the base collection) and apply its deletions."""
    carried = {}
    for modality, index in indexes.items():
        items = api_items_of(previous_dir, modality, checkpoint_lsn(Path(previous_dir) / modality))
        gone = [i for i in items.deleted if i in index]
        if gone:
            index.remove(gone)
        ids = list(items.features)
        for start in range(0, len(ids), CARRY_BATCH):
            batch = ids[start : start + CARRY_BATCH]
            embeddings = embedder.embed(modality, np.stack([items.features[i] for i in batch]))
            index.upsert(embeddings, batch, [items.metadata[i] for i in batch])
        log.info("%s: carried %d API-written items (re-embedded) and %d deletions from %s", modality, len(ids), len(gone), previous_dir)
        carried[modality] = items
    return carried


def changes_since_prepare(index_dir: Path) -> dict[str, tuple[list[Change], ApiItems | None, int]] | None:
    """What the previous version logged after ``prepare`` read it (the writes before the swap), per
    modality: (records after the carried LSN, or None and the whole API state when a checkpoint has
    folded them away, the previous version's last LSN); None when there is nothing to look at."""
    path = Path(index_dir) / CARRIED_NAME
    if not path.is_file():
        return None
    card = json.loads(path.read_text())
    previous = Path(card["from"])
    if not previous.is_dir() or previous.resolve() == Path(index_dir).resolve():
        return None
    out = {}
    for modality, carried in card["lsn"].items():
        folded = checkpoint_lsn(previous / modality)
        end = log_end(previous, modality)
        if end == carried:
            continue
        if folded > carried:  # the records were folded into the previous checkpoint: carry its whole API state again (idempotent)
            out[modality] = ([], api_items_of(previous, modality, folded), end)
        else:
            out[modality] = (read_records(wal_dir(previous, modality), carried), None, end)
    return out


def catch_up(index_dir: Path, embedder: Embedder, shards: dict[str, Shard]) -> None:
    """Changes the previous version logged after ``prepare`` read it (writes before the swap),
    re-embedded and committed to ``shards`` (logged, so durable), then marked as carried."""
    pending = changes_since_prepare(index_dir)
    if not pending:
        return
    card_path = Path(index_dir) / CARRIED_NAME
    card = json.loads(card_path.read_text())
    for modality, (records, whole, end) in pending.items():
        if whole is not None:
            records = [Change("delete", [i]) for i in whole.deleted]
            ids = list(whole.features)
            if ids:
                records.append(Change("upsert", ids, [whole.metadata[i] for i in ids], np.stack([whole.features[i] for i in ids])))
        shard = shards[modality]
        for record in records:
            if record.op == "upsert":
                shard.commit(Change("upsert", record.ids, record.metadata, record.features, embedder.embed(modality, record.features)))
            else:
                for item_id in record.ids:
                    if item_id in shard.index:
                        shard.commit(Change("delete", [item_id]))
        log.info("%s: caught up %d changes logged by the previous version after prepare", modality, len(records))
        card["lsn"][modality] = end
    atomic_write(card_path, json.dumps(card).encode())


def collect_versions(link: Path, keep: int, protect: list[Path]) -> list[Path]:
    """Delete version directories ``<link>-<12 hex>`` beyond the ``keep`` newest; never those in
    ``protect`` (the live one and the one just prepared), nor one a running server holds (an older
    version still served when two prepares ran before a reload). Returns what was deleted."""
    pattern = re.compile(re.escape(link.name) + r"-[0-9a-f]{12}$")
    protected = {p.resolve() for p in protect}
    versions = sorted((p for p in link.parent.iterdir() if p.is_dir() and not p.is_symlink() and pattern.match(p.name)), key=lambda p: p.stat().st_mtime, reverse=True)
    kept = 0
    deleted = []
    for path in versions:
        if path.resolve() in protected or is_served(path):
            continue
        kept += 1
        if kept > max(keep - len(protected), 0):
            shutil.rmtree(path, ignore_errors=True)
            deleted.append(path)
    return deleted


def load_next(current, load: Callable[[], object], configured: Path) -> tuple[object, Path]:
    """The next version to serve, and the path it is served from (the configured index path follows
    it, :func:`store.served.follow`). ``current``'s checkpoints pause first (they may write where the
    next one loads from) and resume if anything fails, so ``current`` keeps serving; on success the
    caller closes ``current`` once nothing uses it."""
    if current is not None:
        current.pause_checkpoints()
    try:
        collection = load()
        try:
            return collection, follow(configured, collection.index_dir)
        except BaseException:
            collection.close()
            raise
    except BaseException:
        if current is not None:
            current.resume_checkpoints()
        raise
