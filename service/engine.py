"""One model version: the embedder and one index per modality, with the locking and saving they need.

Searches and embeddings arrive here in micro-batches (:mod:`service.batching`) and run in one
worker thread; item changes run in other threads. ``VectorIndex`` is not thread-safe, so each
index sits behind a readers-writer lock: searches read, upserts and deletes write. A change is
saved (whole-directory swap, :mod:`service.persist`) before it is acknowledged; changes that pile
up behind one save are written by the next single save (group commit).

A save that fails (disk full, I/O error) undoes in memory every change not yet on disk, newest
first, and each of those changes is answered 503 (:class:`ChangeNotSaved`): what is served is then
what is on disk, and no client is told a change failed that is still served, or the reverse.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fastapi import HTTPException

from index.embedder import MODALITIES, Embedder, InputError
from index.store import IndexLoadError, Item, VectorIndex
from service.encoding import dumps
from service.locks import ReadWriteLock
from service.persist import load_index, save_atomically

log = logging.getLogger(__name__)
OTHER = {"audio": "visual", "visual": "audio"}


class ItemNotFound(KeyError):
    def __init__(self, modality: str, item_id: str):
        super().__init__(item_id)
        self.message = f"no {modality} item with id {item_id!r}"


class ChangeNotSaved(HTTPException):
    """A change whose save failed; it has been undone, so the client may simply retry. An
    HTTPException so that every route answers it as a 503 with this message, never a bare 500."""

    def __init__(self, modality: str, reason: str):
        super().__init__(503, f"the {modality} change was not saved ({reason}) and has been undone, so nothing changed; retry later")


@dataclass
class Undo:
    """How to take back one applied change: remove ``ids``, then put ``previous`` items back."""

    generation: int
    ids: list[str]
    previous: list[Item]


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
    def __init__(self, embedder: Embedder, indexes: dict[str, VectorIndex], model_dir: Path, index_dir: Path):
        self.embedder = embedder
        self.indexes = indexes
        self.model_dir, self.index_dir = Path(model_dir), Path(index_dir)
        self.version = embedder.manifest_hash[:12]
        self.lock = ReadWriteLock()
        self._generation = {m: 0 for m in MODALITIES}  # changes applied
        self._saved = {m: 0 for m in MODALITIES}  # changes on disk
        self._save_locks = {m: threading.Lock() for m in MODALITIES}
        self._unsaved: dict[str, list[Undo]] = {m: [] for m in MODALITIES}  # applied, not yet on disk, oldest first
        self._undone: dict[str, list[tuple[int, int, str]]] = {m: [] for m in MODALITIES}  # (after, through, reason) generations taken back

    @classmethod
    def load(cls, model_dir: Path, index_dir: Path, device: str = "auto", intra_op_threads: int = 0) -> "Engine":
        """Raises ModelError / IndexLoadError (an index built from another model included)."""
        embedder = Embedder(model_dir, device=device, intra_op_threads=intra_op_threads)
        indexes = {m: load_index(Path(index_dir) / m, expected_manifest_hash=embedder.manifest_hash) for m in MODALITIES}
        for modality, index in indexes.items():
            if index.dim != embedder.embedding_dim:
                raise IndexLoadError(f"{index_dir}/{modality}: width {index.dim} differs from the model's {embedder.embedding_dim}")
        # Resolved: when the configured path is a symlink that moves to a new version, this one keeps saving here.
        return cls(embedder, indexes, Path(model_dir), Path(index_dir).resolve())

    def validate(self, modality: str, rows: list[list[float]] | np.ndarray) -> np.ndarray:
        x = rows if isinstance(rows, np.ndarray) else as_matrix(rows, modality)
        return self.embedder.validate(modality, x)

    # --- batched reads (one worker thread) ------------------------------------------------------
    def run_batch(self, jobs: list[SearchJob | EmbedJob]) -> list[object]:
        """Results aligned with ``jobs``: JSON bytes for a search, (B, E) array for an embed, or an exception."""
        results: list[object] = [None] * len(jobs)
        queries: dict[int, np.ndarray] = {}
        by_modality: dict[str, list[int]] = defaultdict(list)
        for i, job in enumerate(jobs):
            if job.vectors is not None:
                by_modality[job.modality].append(i)
        for modality, rows in by_modality.items():  # one encoder call per modality
            embedded = self.embedder.embed(modality, np.concatenate([jobs[i].vectors for i in rows]))
            start = 0
            for i in rows:
                queries[i] = embedded[start : start + jobs[i].size]
                start += jobs[i].size
        with self.lock.read():
            plain: dict[str, list[int]] = defaultdict(list)  # target -> jobs searched together
            for i, job in enumerate(jobs):
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
                    hits = self.indexes[job.target].search_with_metadata(queries[i], job.top_k, where=job.filter)
                    results[i] = self._format(job, *hits)
            for target, rows in plain.items():
                k = max(jobs[i].top_k for i in rows)
                scores, ids, metadata = self.indexes[target].search_with_metadata(np.concatenate([queries[i] for i in rows]), k)
                start = 0
                for i in rows:
                    stop = start + jobs[i].size
                    results[i] = self._format(jobs[i], scores[start:stop], ids[start:stop], metadata[start:stop])
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
        """Apply, save, return the item count; ChangeNotSaved (undone) when the save fails."""
        embeddings = self.embedder.embed(modality, vectors)
        with self.lock.write():
            index = self.indexes[modality]
            previous = [index.get(item_id) for item_id in ids if item_id in index]
            index.upsert(embeddings, ids, metadata)
            generation, count = self._changed(modality, ids, previous)
        self._persist(modality, generation)
        return count

    def delete(self, modality: str, item_id: str) -> int:
        """Remove, save, return the item count; ItemNotFound, or ChangeNotSaved (undone) when the save fails."""
        with self.lock.write():
            index = self.indexes[modality]
            if item_id not in index:
                raise ItemNotFound(modality, item_id)
            previous = [index.get(item_id)]
            index.remove([item_id])
            generation, count = self._changed(modality, [], previous)
        self._persist(modality, generation)
        return count

    def _changed(self, modality: str, ids: list[str], previous: list[Item]) -> tuple[int, int]:
        """Under the write lock: a new generation of ``modality`` to persist (and how to undo it), and its item count."""
        self._generation[modality] += 1
        self._unsaved[modality].append(Undo(self._generation[modality], ids, previous))
        return self._generation[modality], len(self.indexes[modality])

    def get(self, modality: str, item_id: str) -> Item:
        with self.lock.read():
            try:
                return self.indexes[modality].get(item_id)
            except KeyError:
                raise ItemNotFound(modality, item_id) from None

    def _persist(self, modality: str, generation: int) -> None:
        """Return once change ``generation`` is on disk, saving it (and any later ones) if no one has;
        ChangeNotSaved if a failed save took it back."""
        with self._save_locks[modality]:
            for after, through, reason in self._undone[modality]:
                if after < generation <= through:
                    raise ChangeNotSaved(modality, reason)
            if self._saved[modality] >= generation:
                return
            try:
                with self.lock.read():  # readers go on; writers wait for the snapshot
                    current = self._generation[modality]
                    save_atomically(self.indexes[modality], self.index_dir / modality)
                    self._unsaved[modality] = [u for u in self._unsaved[modality] if u.generation > current]  # no writer runs here
            except Exception as err:  # OSError mostly; whatever it is, the disk holds the previous index
                reason = f"{type(err).__name__}: {err}"
                log.error("saving the %s index failed (%s); undoing the changes not on disk", modality, reason)
                self._undo_unsaved(modality, reason)
                raise ChangeNotSaved(modality, reason) from err
            self._saved[modality] = current

    def _undo_unsaved(self, modality: str, reason: str) -> None:
        """Take back every change not on disk, newest first, so that memory equals the disk again."""
        with self.lock.write():
            index = self.indexes[modality]
            try:
                for undo in reversed(self._unsaved[modality]):
                    if undo.ids:
                        index.remove(undo.ids)
                    if undo.previous:
                        index.upsert(np.stack([i.vector for i in undo.previous]), [i.id for i in undo.previous], [i.metadata for i in undo.previous])
            except Exception:  # should not happen (re-adding what was there); the disk is the truth then
                log.exception("undoing the unsaved %s changes failed; reloading the index from disk", modality)
                self.indexes[modality] = load_index(self.index_dir / modality, expected_manifest_hash=self.embedder.manifest_hash)
            self._undone[modality].append((self._saved[modality], self._generation[modality], reason))
            self._unsaved[modality] = []

    # --- description ---------------------------------------------------------------------------
    def sizes(self) -> dict[str, int]:
        return {m: len(ix) for m, ix in self.indexes.items()}

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
