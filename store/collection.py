"""One collection as served: a model version (the embedder) and one shard per modality.

Searches read the indexes from the service's batch thread; item changes run in other threads.
``VectorIndex`` is not thread-safe, so both indexes sit behind one readers-writer lock (a search
may read either): readers take it through :meth:`Collection.reading`, and only a shard's group
commit writes under it. A change is appended to its modality's write-ahead log and fsynced before it
is applied and acknowledged (:mod:`store.shard`); the log is checkpointed in the background
(:mod:`store.checkpoints`). Loading = each modality's checkpoint + the log after it, then the
changes the previous version logged after ``prepare`` (:func:`store.versions.catch_up`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from index.embedder import MODALITIES, Embedder
from index.store import IndexLoadError, Item, VectorIndex
from store.changes import Change
from store.checkpoints import Checkpointer
from store.config import StoreConfig
from store.dirlock import hold_index_dir, release_index_dir
from store.errors import ItemNotFound
from store.events import StoreEvents
from store.locks import ReadWriteLock
from store.persist import load_index
from store.shard import Shard
from store.snapshots import create_snapshot
from store.versions import catch_up
from store.wal import WriteAheadLog

log = logging.getLogger(__name__)
MIN_HEADROOM = 4096  # items of room made at load (with StoreConfig.write_headroom > 0) however small the index


class View:
    """What a reader may do while it holds the collection's read lock (from :meth:`Collection.reading`)."""

    def __init__(self, indexes: dict[str, VectorIndex]):
        self._indexes = indexes

    def search(self, target: str, queries: np.ndarray, k: int, where: dict | None = None) -> tuple[np.ndarray, list[list[str]], list[list[dict | None]]]:
        """(scores (B, k), ids, metadata) of the ``k`` nearest ``target`` items of each embedded query."""
        return self._indexes[target].search_with_metadata(queries, k, where=where)

    def vectors(self, modality: str, ids: list[str]) -> np.ndarray:
        """(B, E) stored embeddings; ItemNotFound names the first unknown id."""
        index = self._indexes[modality]
        try:
            return np.stack([index.get(item_id).vector for item_id in ids])
        except KeyError as err:
            raise ItemNotFound(modality, err.args[0]) from None

    def get(self, modality: str, item_id: str) -> Item:
        try:
            return self._indexes[modality].get(item_id)
        except KeyError:
            raise ItemNotFound(modality, item_id) from None

    def contains(self, modality: str, item_id: str) -> bool:
        return item_id in self._indexes[modality]

    def size(self, modality: str) -> int:
        return len(self._indexes[modality])

    def generation(self, modality: str) -> tuple[int, int]:
        """Changes with every item change: upserts append rows, deletes lower the live count."""
        index = self._indexes[modality]
        return index.items.rows, len(index)

    def ids(self, modality: str) -> list[str]:
        return self._indexes[modality].ids()

    def sample(self, modality: str, size: int, seed: int) -> tuple[list[str], np.ndarray, list[dict | None]]:
        """(ids, (n, E) stored embeddings, metadata) of up to ``size`` live items drawn without replacement."""
        index = self._indexes[modality]
        labels = index.items.live_labels()
        if len(labels) > size:
            labels = np.sort(np.random.default_rng(seed).choice(labels, size=size, replace=False))
        if not len(labels):
            return [], np.zeros((0, index.dim), np.float32), []
        vectors = index.index.reconstruct_batch(labels.astype(np.int64))
        return index.items.ids_of(labels), vectors, index.items.metadata_of(labels)

    def card(self, modality: str) -> dict:
        """The index's factory, metric, width, size, search and build parameters."""
        index = self._indexes[modality]
        info = index.info
        return {
            "factory": str(info.get("factory")),
            "metric": info.get("metric"),
            "dim": index.dim,
            "count": len(index),
            "search_params": dict(info.get("search_params") or {}),
            "build_params": dict(info.get("build_params") or {}),
            "tombstones": index.tombstones,
            "search_device": str(info.get("search_device", "cpu")),
        }


class Collection:
    def __init__(self, embedder: Embedder, shards: dict[str, Shard], model_dir: Path, index_dir: Path, config: StoreConfig | None, lock: ReadWriteLock):
        """``config`` None: a worker process's replica (:meth:`replica`), which checkpoints nothing."""
        self.embedder = embedder
        self.shards = shards
        self.model_dir, self.index_dir = Path(model_dir), Path(index_dir)
        self.version = embedder.manifest_hash[:12]
        self._lock = lock  # the shards' lock too: one over both indexes
        self._view = View({m: shard.index for m, shard in shards.items()})
        self.checkpointer = Checkpointer(shards, self.index_dir, config) if config is not None else None
        if self.checkpointer is not None:
            self.checkpointer.start()
        self._closed = False

    @classmethod
    def replica(cls, primary: "Collection", embedder: Embedder) -> "Collection":
        """A worker process's collection, made before the fork: the primary's indexes (shared
        copy-on-write), its own lock, and shards that append to the same logs once the worker has
        joined them (:meth:`Shard.join`, :mod:`store.sharedlog`). It checkpoints nothing."""
        lock = ReadWriteLock()
        shards = {m: Shard(m, s.index, WriteAheadLog(s.wal.directory), lock, s.model, s.last_lsn + 1, s.fsync) for m, s in primary.shards.items()}
        return cls(embedder, shards, primary.model_dir, primary.index_dir, None, lock)

    @classmethod
    def load(cls, model_dir: Path, index_dir: Path, device: str = "auto", intra_op_threads: int = 0, config: StoreConfig | None = None) -> "Collection":
        """The checkpoint of each modality plus its log; raises ModelError / IndexLoadError (an index built from another model included)."""
        config = config or StoreConfig()
        embedder = Embedder(model_dir, device=device, intra_op_threads=intra_op_threads)
        # Resolved: when the configured path is a symlink that moves to a new version, this one keeps logging here.
        index_dir = Path(index_dir).resolve()
        lock = ReadWriteLock()
        shards: dict[str, Shard] = {}
        if index_dir.is_dir():
            hold_index_dir(index_dir)  # a restore into this directory is refused while it is served
        try:
            for modality in MODALITIES:
                index = load_index(index_dir / modality, expected_manifest_hash=embedder.manifest_hash)
                if index.dim != embedder.embedding_dim:
                    raise IndexLoadError(f"{index_dir}/{modality}: width {index.dim} differs from the model's {embedder.embedding_dim}")
                shards[modality] = Shard.open(modality, index, index_dir, embedder, config, lock)
                if config.write_headroom > 0:  # FAISS's arrays grow by doubling: without room, the first write copies them all
                    index.reserve(max(MIN_HEADROOM, int(config.write_headroom * index.items.rows)))
                index.warm_up()
        except BaseException:
            for shard in shards.values():
                shard.wal.close()
            release_index_dir(index_dir)
            raise
        collection = cls(embedder, shards, Path(model_dir), index_dir, config, lock)
        try:
            catch_up(index_dir, embedder, shards)
        except BaseException:
            collection.close()
            raise
        return collection

    def close(self) -> None:
        """Stop the background checkpoints and close the logs (a swapped-out version; searches in flight still finish)."""
        if self._closed:
            return
        self._closed = True
        if self.checkpointer is None:  # a replica: the primary holds the directory
            for shard in self.shards.values():
                shard.close()
            return
        self.checkpointer.stop()
        for shard in self.shards.values():
            shard.close()
        release_index_dir(self.index_dir)

    def pause_checkpoints(self) -> None:
        """Stop checkpointing (waits for one under way): the directory changes no more but for commits."""
        self.checkpointer.stop()

    def resume_checkpoints(self) -> None:
        self.checkpointer.start()

    def report_to(self, events: StoreEvents) -> None:
        """Send the group commits and checkpoints of this version to ``events`` (the app's metrics)."""
        if self.checkpointer is not None:
            self.checkpointer.events = events
        for shard in self.shards.values():
            shard.report_to(events)

    # --- reads (any thread) ----------------------------------------------------------------------
    @contextmanager
    def reading(self) -> Iterator[View]:
        """Both indexes as one consistent state while the block runs (item changes wait for it); in a
        replica, one that holds every change acknowledged before the call, by any process."""
        self.catch_up()
        with self._lock.read():
            yield self._view

    def catch_up(self, most: int | None = None) -> int:
        """With worker processes: apply what any of them logged and published, or its first ``most``
        records a modality (a no-op alone). Returns how many were applied."""
        return sum(shard.catch_up(most) for shard in self.shards.values())

    def behind(self) -> int:
        """With worker processes: the most changes a modality's index lacks (0 alone)."""
        return max((shard.behind() for shard in self.shards.values()), default=0)

    def failure(self) -> str | None:
        """With worker processes: why a modality's index no longer matches its log (a change another
        process logged did not read back or apply), or None. Such an index is neither saved nor served."""
        for modality, shard in self.shards.items():
            if shard.failed is not None:
                return f"{modality}: {type(shard.failed).__name__}: {shard.failed}"
        return None

    def get(self, modality: str, item_id: str) -> Item:
        with self.reading() as view:
            return view.get(modality, item_id)

    # --- item changes (any thread) -------------------------------------------------------------
    def upsert(self, modality: str, vectors: np.ndarray, ids: list[str], metadata: list[dict | None]) -> int:
        """Embed, log (fsynced), apply, return the item count; ChangeNotSaved (nothing applied) when the log append fails."""
        embeddings = self.embedder.embed(modality, vectors)
        change = Change("upsert", list(ids), list(metadata), np.ascontiguousarray(vectors, np.float32), embeddings)
        return self.shards[modality].commit(change)

    def delete(self, modality: str, item_id: str) -> int:
        """Log, remove, return the item count; ItemNotFound, or ChangeNotSaved (nothing applied)."""
        return self.shards[modality].commit(Change("delete", [item_id]))

    def snapshot(self, directory: Path) -> dict:
        """A snapshot file of both modalities in ``directory`` holding every change committed so far (store.snapshots)."""
        return create_snapshot(self, directory)

    # --- description ---------------------------------------------------------------------------
    def size(self, modality: str) -> int:
        return len(self.shards[modality].index)

    def sizes(self) -> dict[str, int]:
        return {m: len(shard.index) for m, shard in self.shards.items()}

    def log_bytes(self) -> dict[str, int]:
        """Per modality, the log written since its last checkpoint."""
        return {m: shard.log_bytes() for m, shard in self.shards.items()}

    def describe(self) -> dict:
        return {
            "model": self.version,
            "model_sha256": self.embedder.manifest_hash,
            "model_dir": str(self.model_dir),
            "index_dir": str(self.index_dir),
            "manifest": self.embedder.manifest,
            "index_sizes": self.sizes(),
            "index_factories": {m: str(shard.index.info.get("factory")) for m, shard in self.shards.items()},
            "providers": dict(self.embedder.providers),
        }
