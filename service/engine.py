"""One model version: the embedder and one index per modality, with the locking and logging they need.

Searches and embeddings arrive here in micro-batches (:mod:`service.batching`) and run in one
worker thread; item changes run in other threads. ``VectorIndex`` is not thread-safe, so the
indexes sit behind a readers-writer lock: searches read, applying a change writes. A change is
appended to its modality's write-ahead log and fsynced (group commit, :mod:`service.commit`)
before it is applied and acknowledged; the log is folded into a snapshot in the background
(:mod:`service.snapshots`). Loading = the last snapshot + the log after it.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from avdata.atomic import atomic_write
from index.embedder import MODALITIES, Embedder, InputError
from index.store import IndexLoadError, Item, VectorIndex
from service.backup import hold_index_dir, release_index_dir
from service.carry import CARRIED_NAME, changes_since_prepare
from service.commit import Change, ChangeLog, ChangeNotSaved, ItemNotFound, StoreEvents, apply_record, merge_run, mergeable_runs
from service.encoding import dumps
from service.locks import ReadWriteLock
from service.persist import load_index
from service.snapshots import Durability, Snapshotter, snapshot_lsn
from service.wal import LogCorrupt, Record, WriteAheadLog

log = logging.getLogger(__name__)
OTHER = {"audio": "visual", "visual": "audio"}


__all__ = ["ChangeNotSaved", "Engine", "EmbedJob", "ItemNotFound", "SearchJob"]
WAL_DIR = "wal"  # <index>/wal/<modality>/: the log segments after each modality's snapshot
MIN_HEADROOM = 4096  # items of room made at load (with Durability.write_headroom > 0) however small the index


@dataclass
class SearchJob:
    """One search request: raw ``vectors`` (B, D_in) or stored ``ids``, already checked by the route."""

    modality: str
    target: str
    top_k: int
    vectors: np.ndarray | None = None
    ids: list[str] | None = None
    score_threshold: float | None = None
    filter: dict | None = None

    @property
    def size(self) -> int:
        return len(self.vectors) if self.vectors is not None else len(self.ids or ())


@dataclass
class EmbedJob:
    modality: str
    vectors: np.ndarray  # (B, D_in)

    @property
    def size(self) -> int:
        return len(self.vectors)


def as_matrix(rows: list[list[float]], modality: str) -> np.ndarray:
    """JSON lists of floats -> (B, D) float32, refusing ragged rows with a readable message."""
    widths = {len(row) for row in rows}
    if len(widths) > 1:
        raise InputError(f"{modality} vectors must all have the same length; got lengths {sorted(widths)[:5]}")
    with np.errstate(over="ignore"):  # 1e39 becomes inf, which validate() then names
        return np.asarray(rows, dtype=np.float32).reshape(len(rows), -1)


class Engine:
    def __init__(self, embedder: Embedder, indexes: dict[str, VectorIndex], model_dir: Path, index_dir: Path, logs: dict, durability: Durability | None):
        """``durability`` None: a worker process's replica, whose ``logs`` send changes to the primary
        (:mod:`store.replication`), which alone folds the log and holds the index directory."""
        self.embedder = embedder
        self.indexes = indexes
        self.model_dir, self.index_dir = Path(model_dir), Path(index_dir)
        self.version = embedder.manifest_hash[:12]
        self.lock = ReadWriteLock()
        self.logs = logs
        for changelog in logs.values():
            changelog.lock = self.lock  # one lock over both indexes: a search may read either
        self.snapshots = Snapshotter(logs, self.index_dir, durability) if durability is not None else None
        if self.snapshots is not None:
            self.snapshots.start()
        self.sync: Callable[[], None] = lambda: None  # a replica: wait for the changes acknowledged anywhere (Replica.catch_up)
        self._closed = False

    @classmethod
    def replica(cls, primary: "Engine", embedder: Embedder, logs: dict) -> "Engine":
        """A worker's view of ``primary`` after a fork: the same index objects (shared copy-on-write),
        its own encoder sessions and lock, and ``logs`` that commit through the primary."""
        return cls(embedder, primary.indexes, primary.model_dir, primary.index_dir, logs, None)

    @classmethod
    def load(cls, model_dir: Path, index_dir: Path, device: str = "auto", intra_op_threads: int = 0, durability: Durability | None = None) -> "Engine":
        """The snapshot of each modality plus its log; raises ModelError / IndexLoadError (an index built from another model included)."""
        durability = durability or Durability()
        embedder = Embedder(model_dir, device=device, intra_op_threads=intra_op_threads)
        # Resolved: when the configured path is a symlink that moves to a new version, this one keeps logging here.
        index_dir = Path(index_dir).resolve()
        indexes, logs = {}, {}
        if index_dir.is_dir():
            hold_index_dir(index_dir)  # a restore into this directory is refused while it is served
        try:
            for modality in MODALITIES:
                index = load_index(index_dir / modality, expected_manifest_hash=embedder.manifest_hash)
                if index.dim != embedder.embedding_dim:
                    raise IndexLoadError(f"{index_dir}/{modality}: width {index.dim} differs from the model's {embedder.embedding_dim}")
                indexes[modality] = index
                logs[modality] = _replay(modality, index, index_dir, embedder, durability)
                if durability.write_headroom > 0:  # FAISS's arrays grow by doubling: without room, the first write copies them all
                    index.reserve(max(MIN_HEADROOM, int(durability.write_headroom * index.items.rows)))
                index.warm_up()
        except BaseException:
            for changelog in logs.values():
                changelog.wal.close()
            release_index_dir(index_dir)
            raise
        engine = cls(embedder, indexes, Path(model_dir), index_dir, logs, durability)
        try:
            engine._catch_up()
        except BaseException:
            engine.close()
            raise
        return engine

    def _catch_up(self) -> None:
        """Changes the previous version logged after ``prepare`` read it (writes before the swap),
        re-embedded and committed here (logged, so durable), then marked as carried."""
        pending = changes_since_prepare(self.index_dir)
        if not pending:
            return
        card_path = self.index_dir / CARRIED_NAME
        card = json.loads(card_path.read_text())
        for modality, (records, whole, end) in pending.items():
            if whole is not None:
                records = [Record(0, "delete", [i], "") for i in whole.deleted]
                ids = list(whole.features)
                if ids:
                    records.append(Record(0, "upsert", ids, "", [whole.metadata[i] for i in ids], np.stack([whole.features[i] for i in ids])))
            for record in records:
                if record.op == "upsert":
                    change = Change("upsert", record.ids, record.metadata, record.features, self.embedder.embed(modality, record.features))
                    self.logs[modality].commit(change)
                else:
                    for item_id in record.ids:
                        if item_id in self.indexes[modality]:
                            self.logs[modality].commit(Change("delete", [item_id], []))
            log.info("%s: caught up %d changes logged by the previous version after prepare", modality, len(records))
            card["lsn"][modality] = end
        atomic_write(card_path, json.dumps(card).encode())

    def close(self) -> None:
        """Stop the background snapshots and close the logs (a swapped-out version; searches in flight still finish)."""
        if self._closed:
            return
        self._closed = True
        if self.snapshots is None:  # a replica: the primary owns the logs and the directory
            return
        self.snapshots.stop()
        for changelog in self.logs.values():
            changelog.close()
        release_index_dir(self.index_dir)

    def report_to(self, events: StoreEvents) -> None:
        """Send the group commits and folds of this version to ``events`` (the app's metrics)."""
        if self.snapshots is not None:
            self.snapshots.events = events
        for changelog in self.logs.values():
            changelog.events = events

    def validate(self, modality: str, rows: list[list[float]] | np.ndarray) -> np.ndarray:
        x = rows if isinstance(rows, np.ndarray) else as_matrix(rows, modality)
        return self.embedder.validate(modality, x)

    # --- batched reads (one worker thread) ------------------------------------------------------
    def run_batch(self, jobs: list[SearchJob | EmbedJob]) -> list[object]:
        """Results aligned with ``jobs``: JSON bytes for a search, (B, E) array for an embed, or an exception."""
        self.sync()
        results: list[object] = [None] * len(jobs)
        queries: dict[int, np.ndarray] = {}
        by_modality: dict[str, list[int]] = defaultdict(list)
        for i, job in enumerate(jobs):
            if job.vectors is not None:
                by_modality[job.modality].append(i)
        for modality, rows in by_modality.items():  # one encoder call per modality
            try:
                embedded = self.embedder.embed(modality, np.concatenate([jobs[i].vectors for i in rows]))
            except InputError:  # a job whose features overflow the encoder: embed job by job, so it fails alone
                for i in rows:
                    try:
                        queries[i] = self.embedder.embed(modality, jobs[i].vectors)
                    except InputError as err:
                        results[i] = err
                continue
            start = 0
            for i in rows:
                queries[i] = embedded[start : start + jobs[i].size]
                start += jobs[i].size
        with self.lock.read():
            plain: dict[str, list[int]] = defaultdict(list)  # target -> jobs searched together
            for i, job in enumerate(jobs):
                if results[i] is not None:
                    continue
                if isinstance(job, EmbedJob):
                    results[i] = queries[i]
                    continue
                if job.ids is not None:
                    try:
                        queries[i] = self._stored(job.modality, job.ids)
                    except ItemNotFound as err:
                        results[i] = err
                        continue
                if job.filter is None:
                    plain[job.target].append(i)
                else:  # metadata filter: JSON types must match too, so true does not match 1
                    results[i] = _caught(lambda: self._format(job, *self.indexes[job.target].search_with_metadata(queries[i], job.top_k, where=job.filter)))
            for target, rows in plain.items():
                k = max(jobs[i].top_k for i in rows)
                scores, ids, metadata = self.indexes[target].search_with_metadata(np.concatenate([queries[i] for i in rows]), k)
                start = 0
                for i in rows:
                    stop = start + jobs[i].size
                    results[i] = _caught(self._format, jobs[i], scores[start:stop], ids[start:stop], metadata[start:stop])
                    start = stop
        return results

    def _stored(self, modality: str, ids: list[str]) -> np.ndarray:
        index = self.indexes[modality]
        try:
            return np.stack([index.get(item_id).vector for item_id in ids])
        except KeyError as err:
            raise ItemNotFound(modality, err.args[0]) from None

    def _format(self, job: SearchJob, scores: np.ndarray, ids: list[list[str]], metadata: list[list[dict | None]]) -> bytes:
        threshold = -np.inf if job.score_threshold is None else job.score_threshold
        results = [
            [{"id": item_id, "score": score, "metadata": meta} for item_id, score, meta in zip(row_ids[: job.top_k], row_scores, row_meta) if score >= threshold]
            for row_ids, row_scores, row_meta in zip(ids, scores.tolist(), metadata)
        ]
        return dumps({"results": results, "model": self.version})

    # --- item changes (any thread) -------------------------------------------------------------
    def upsert(self, modality: str, vectors: np.ndarray, ids: list[str], metadata: list[dict | None]) -> int:
        """Log (fsynced), apply, return the item count; ChangeNotSaved (nothing applied) when the log append fails."""
        embeddings = self.embedder.embed(modality, vectors)
        change = Change("upsert", list(ids), list(metadata), np.ascontiguousarray(vectors, np.float32), embeddings)
        return self.logs[modality].commit(change)

    def delete(self, modality: str, item_id: str) -> int:
        """Log, remove, return the item count; ItemNotFound, or ChangeNotSaved (nothing applied)."""
        return self.logs[modality].commit(Change("delete", [item_id], []))

    def get(self, modality: str, item_id: str) -> Item:
        self.sync()
        with self.lock.read():
            try:
                return self.indexes[modality].get(item_id)
            except KeyError:
                raise ItemNotFound(modality, item_id) from None

    # --- description ---------------------------------------------------------------------------
    def sizes(self) -> dict[str, int]:
        return {m: len(ix) for m, ix in self.indexes.items()}

    def log_bytes(self) -> dict[str, int]:
        """Per modality, the log written since its last snapshot."""
        return {m: changelog.log_bytes() for m, changelog in self.logs.items()}

    def describe(self) -> dict:
        return {
            "model": self.version,
            "model_sha256": self.embedder.manifest_hash,
            "model_dir": str(self.model_dir),
            "index_dir": str(self.index_dir),
            "manifest": self.embedder.manifest,
            "index_sizes": self.sizes(),
            "index_factories": {m: str(ix.info.get("factory")) for m, ix in self.indexes.items()},
            "providers": dict(self.embedder.providers),
        }


def _caught(function: Callable[..., object], *args: object) -> object:
    """``function(*args)``, or the exception it raised: one job's failure is that job's answer, not its batch's."""
    try:
        return function(*args)
    except Exception as err:
        log.exception("one job of a batch failed")
        return err


def _replay(modality: str, index: VectorIndex, index_dir: Path, embedder: Embedder, durability: Durability) -> ChangeLog:
    """Apply the changes logged after the snapshot; a record of another model is re-embedded from its raw features."""
    after = snapshot_lsn(index_dir / modality)
    wal = WriteAheadLog(index_dir / WAL_DIR / modality)
    try:
        records = wal.recover(after)
    except LogCorrupt as err:
        raise IndexLoadError(str(err)) from None  # it names the file, the offset and what each way out costs
    for record in records:
        if record.op == "upsert" and record.model != embedder.manifest_hash:
            record.embeddings = embedder.embed(modality, record.features)
    for run in mergeable_runs(records):  # consecutive records in one index call each, as the commit did
        apply_record(index, merge_run(run))
    if records:
        log.info("%s: replayed %d logged changes after snapshot change %d", modality, len(records), after)
    changelog = ChangeLog(modality, index, wal, ReadWriteLock(), embedder.manifest_hash, max([after, *(r.lsn for r in records)]) + 1, durability.fsync)
    changelog.snapshot_lsn = after
    changelog.oldest_unsnapshotted = time.monotonic() if records else None
    return changelog
