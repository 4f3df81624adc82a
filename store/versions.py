"""Items that follow the model: the raw features of items written through the API, kept so that a
new model version can re-embed them.

Each change's record in the write-ahead log holds the raw features. When the log is folded into a
snapshot, the records are folded into ``api_items.npz`` beside the index (the previous file plus
the folded records): the ids, raw features and metadata of every live API-written item, and the
ids deleted through the API (a deleted item of the base collection must stay deleted in the next
version). ``python -m service prepare`` for a new model builds the base collection, then re-embeds
these items with the new model and applies the deletions (:func:`carry_over`), and old version
directories are garbage-collected (:func:`collect_versions`).
"""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from store.wal import Record, read_segment

log = logging.getLogger(__name__)
API_ITEMS_NAME = "api_items.npz"
WAL_DIR = "wal"


@dataclass
class ApiItems:
    """Live API-written items (id -> raw features, metadata) and ids deleted through the API."""

    features: dict[str, np.ndarray] = field(default_factory=dict)
    metadata: dict[str, dict | None] = field(default_factory=dict)
    deleted: set[str] = field(default_factory=set)

    def apply(self, record: Record) -> None:
        if record.op == "upsert":
            for row, (item_id, meta) in enumerate(zip(record.ids, record.metadata)):
                self.features[item_id] = np.asarray(record.features[row], np.float32)
                self.metadata[item_id] = meta
                self.deleted.discard(item_id)
        else:
            for item_id in record.ids:
                self.features.pop(item_id, None)
                self.metadata.pop(item_id, None)
                self.deleted.add(item_id)

    def to_bytes(self) -> bytes:
        ids = list(self.features)
        width = next(iter(self.features.values())).shape[0] if ids else 0
        buffer = io.BytesIO()
        np.savez(
            buffer,
            ids=np.array(json.dumps(ids).encode()),
            features=np.stack([self.features[i] for i in ids]) if ids else np.zeros((0, width), np.float32),
            metadata=np.array(json.dumps([self.metadata[i] for i in ids]).encode()),
            deleted=np.array(json.dumps(sorted(self.deleted)).encode()),
        )
        return buffer.getvalue()

    @classmethod
    def load(cls, directory: Path) -> "ApiItems":
        """The file beside a snapshot (empty when there is none: an index built by a job)."""
        path = Path(directory) / API_ITEMS_NAME
        if not path.is_file():
            return cls()
        with np.load(path, allow_pickle=False) as z:
            ids = json.loads(z["ids"].tobytes())
            metadata = json.loads(z["metadata"].tobytes())
            features = z["features"]
            return cls({i: features[row] for row, i in enumerate(ids)}, dict(zip(ids, metadata)), set(json.loads(z["deleted"].tobytes())))


def logged_records(wal_dir: Path, after: int, through: int | None = None) -> list[Record]:
    """The whole records of every segment with ``after < lsn <= through`` (a torn tail ends a segment)."""
    records = []
    paths = sorted(Path(wal_dir).glob("*.wal"))
    for i, path in enumerate(paths):
        found = read_segment(path, last=i == len(paths) - 1).records
        records.extend(r for r in found if r.lsn > after and (through is None or r.lsn <= through))
    return sorted(records, key=lambda r: r.lsn)


def api_items_of(index_dir: Path, modality: str, after: int, through: int | None = None) -> ApiItems:
    """The snapshot's file plus the logged changes after it (``after`` is the snapshot's LSN)."""
    items = ApiItems.load(Path(index_dir) / modality)
    for record in logged_records(Path(index_dir) / WAL_DIR / modality, after, through):
        items.apply(record)
    return items


def log_end(index_dir: Path, modality: str) -> int:
    """The last change of ``modality`` in a version directory: its snapshot's, or a later logged one."""
    from store.checkpoints import snapshot_lsn

    after = snapshot_lsn(Path(index_dir) / modality)
    return max([after, *(r.lsn for r in logged_records(Path(index_dir) / WAL_DIR / modality, after))])


def carry_over(indexes: dict, embedder, previous_dir: Path) -> dict[str, ApiItems]:
    """Re-embed the API-written items of ``previous_dir`` (a version directory) with ``embedder``
    into ``indexes`` (the new version, built from the base collection) and apply its deletions."""
    from store.checkpoints import snapshot_lsn

    carried = {}
    for modality, index in indexes.items():
        items = api_items_of(previous_dir, modality, snapshot_lsn(Path(previous_dir) / modality))
        gone = [i for i in items.deleted if i in index]
        if gone:
            index.remove(gone)
        ids = list(items.features)
        for start in range(0, len(ids), 4096):
            batch = ids[start : start + 4096]
            embeddings = embedder.embed(modality, np.stack([items.features[i] for i in batch]))
            index.upsert(embeddings, batch, [items.metadata[i] for i in batch])
        log.info("%s: carried %d API-written items (re-embedded) and %d deletions from %s", modality, len(ids), len(gone), previous_dir)
        carried[modality] = items
    return carried


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
        if path.resolve() in protected or _served(path):
            continue
        kept += 1
        if kept > max(keep - len(protected), 0):
            shutil.rmtree(path, ignore_errors=True)
            deleted.append(path)
    return deleted


CARRIED_NAME = "carried.json"  # in a prepared version: {"from": the live version's directory, "lsn": {modality: last change carried}}


def changes_since_prepare(index_dir: Path) -> dict[str, tuple[list[Record], ApiItems | None, int]] | None:
    """What the previous version logged after ``prepare`` read it (the writes before the swap), per
    modality: (records after the carried LSN, or None and the whole API state when a snapshot has
    folded them away, the previous version's last LSN); None when there is nothing to look at."""
    from store.checkpoints import snapshot_lsn

    path = Path(index_dir) / CARRIED_NAME
    if not path.is_file():
        return None
    card = json.loads(path.read_text())
    previous = Path(card["from"])
    if not previous.is_dir() or previous.resolve() == Path(index_dir).resolve():
        return None
    out = {}
    for modality, carried in card["lsn"].items():
        folded = snapshot_lsn(previous / modality)
        end = log_end(previous, modality)
        if end == carried:
            continue
        if folded > carried:  # the records were folded into the previous snapshot: carry its whole API state again (idempotent)
            out[modality] = ([], api_items_of(previous, modality, folded), end)
        else:
            out[modality] = (logged_records(previous / WAL_DIR / modality, carried), None, end)
    return out


def _served(directory: Path) -> bool:
    """Whether a server process holds ``directory`` (its shared lock on the serving lock file)."""
    from store.snapshots import LOCK_NAME, RestoreLock, SnapshotError, held_here

    if held_here(directory):  # POSIX locks never conflict within a process (and closing one would drop ours)
        return True
    if not (directory / LOCK_NAME).exists():
        return False
    try:
        with RestoreLock(directory):
            return False
    except SnapshotError:
        return True
