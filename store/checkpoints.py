"""Checkpoints: writing the index and the log position it holds to disk, in the background, without
stopping searches, so that the log can be truncated (what the public metrics and logs call a fold).

A modality is checkpointed when its log passes ``checkpoint_bytes`` and ``checkpoint_growth`` times
the last checkpoint's size (a checkpoint rewrites the whole index, so waiting until the log has grown
in proportion keeps the cost per change constant: a bulk load stays linear in N), or when its
oldest change not in a checkpoint is ``checkpoint_seconds`` old. A checkpoint holds off that
modality's commits only while it takes a copy of the index and starts a new log segment; searches
never wait for it (the copy reads the index, and only commits write it). The copy is a forked
child's image of the process (:mod:`store.forked`: ~0.1 s), or, where that is off or fails, a copy
in memory (:meth:`VectorIndex.frozen`: 0.13-0.25 s at 10^6 HNSW32 items, 5 s at 10^7). It is then
saved with the whole-directory swap of :mod:`store.persist`, beside ``snapshot.json`` holding the
last log sequence number it contains and ``api_items.npz`` (the raw features of API-written items,
:mod:`store.api_items`; a forked child merges them from the log too, away from the requests), and
the older segments are deleted. A kill anywhere leaves the previous
checkpoint and every segment after it, or the new one.

A checkpoint that fails (disk full) loses nothing (the log keeps every change) and is retried after
a wait that doubles with each failure in a row.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from avdata.atomic import atomic_write
from index.store import FrozenIndex
from store import layout
from store.api_items import api_items_of
from store.config import StoreConfig
from store.events import StoreEvents
from store.forked import CAN_FORK, ForkedCopy
from store.persist import save_atomically
from store.shard import Shard

log = logging.getLogger(__name__)
RETRY_FIRST_SECONDS = 1.0  # after a failed checkpoint, the next try waits this long, doubling with each failure...
RETRY_MAX_SECONDS = 300.0  # ...up to this (each try forks and writes the whole index: on a full disk, it refills it)


class Checkpointer:
    def __init__(self, shards: dict[str, Shard], index_dir: Path, config: StoreConfig):
        self.shards, self.index_dir, self.config = shards, Path(index_dir), config
        self._locks = {m: threading.Lock() for m in shards}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        for shard in shards.values():
            shard.on_commit(self._nudge)
        self.checkpoint_size = {m: _directory_bytes(self.index_dir / m) for m in shards}
        self.failures = {m: 0 for m in shards}  # failed checkpoints in a row
        self._retry_at = {m: 0.0 for m in shards}  # monotonic time before which a failed checkpoint is not retried
        self.events = StoreEvents()

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="avsearch-checkpoints", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop checkpointing (waits for one under way); the log keeps every change until a later start."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def held(self, modality: str) -> threading.Lock:
        """Held while ``modality``'s checkpoint directory and log segments may change."""
        return self._locks[modality]

    def _nudge(self) -> None:
        if any(self.due(m) for m in self.shards):
            self._wake.set()

    def due(self, modality: str) -> bool:
        shard, config = self.shards[modality], self.config
        oldest = shard.oldest_unfolded()
        if time.monotonic() < self._retry_at[modality]:
            return False
        if shard.log_bytes() >= max(config.checkpoint_bytes, config.checkpoint_growth * self.checkpoint_size[modality]):
            return True
        return oldest is not None and time.monotonic() - oldest >= config.checkpoint_seconds

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            for modality in self.shards:
                if self._stop.is_set():
                    return
                if self.due(modality):
                    try:
                        self.checkpoint(modality)
                    except Exception as err:  # OSError mostly: the log still holds every change; retried after a wait
                        delay = min(RETRY_MAX_SECONDS, RETRY_FIRST_SECONDS * 2 ** (self.failures[modality] - 1))
                        self._retry_at[modality] = time.monotonic() + delay
                        log.error("folding the %s log into a snapshot failed (%s, %d in a row); the log keeps the changes; next try in %.0f s", modality, err, self.failures[modality], delay)

    def checkpoint(self, modality: str) -> int:
        """Write a checkpoint of ``modality`` holding every change committed so far; returns its log sequence number."""
        shard = self.shards[modality]
        with self._locks[modality]:
            started, log_bytes = time.perf_counter(), shard.log_bytes()
            try:
                written = self._write(modality, shard)
            except BaseException:
                self.failures[modality] += 1
                self.events.checkpointed(modality, time.perf_counter() - started, log_bytes, failed=True)
                raise
            if written:
                self.failures[modality], self._retry_at[modality] = 0, 0.0
                self.events.checkpointed(modality, time.perf_counter() - started, log_bytes, failed=False)
            return shard.checkpoint_lsn

    def _write(self, modality: str, shard: Shard) -> bool:
        """Whether a checkpoint was written (not when the last one holds every change already)."""
        asked = time.perf_counter()
        with shard.paused():  # no commit half-done: the index is exactly at last_lsn
            paused = time.perf_counter()
            lsn = shard.last_lsn
            if lsn == shard.checkpoint_lsn:
                return False
            frozen = self.copy(modality, extra=partial(self.files_beside, modality, shard.checkpoint_lsn, lsn))
            try:
                pending_since = shard.start_segment()
            except BaseException:
                discard(frozen)
                raise
        started = time.perf_counter()
        try:
            save_atomically(frozen, self.index_dir / modality)
        except BaseException:
            discard(frozen)
            shard.checkpoint_failed(pending_since)
            raise
        shard.checkpointed(lsn)
        self.checkpoint_size[modality] = _directory_bytes(self.index_dir / modality)
        log.info(
            "%s: snapshot at change %d (%d items) in %.2f s; log truncated (commits held %.0f ms, after %.0f ms to pause them)",
            modality, lsn, len(frozen), time.perf_counter() - started, 1000 * (started - paused), 1000 * (paused - asked),
        )
        return True

    def files_beside(self, modality: str, previous: int, lsn: int) -> dict[str, bytes]:
        """The files beside a checkpoint through ``lsn`` (the last one's was ``previous``): its log
        position, and the raw features of API-written items, which follow the checkpoint (a new model
        re-embeds them): the last checkpoint's merged with the changes logged since."""
        carried = api_items_of(self.index_dir, modality, previous, lsn)
        return {layout.CHECKPOINT_NAME: layout.checkpoint_card(lsn), layout.API_ITEMS_NAME: carried.to_bytes()}

    def copy(self, modality: str, background: bool = True, extra: Callable[[], dict[str, bytes]] | None = None) -> CopyInMemory | ForkedCopy:
        """The index as it is now, to be saved while commits go on (call it with the modality's
        commits paused and its checkpoint lock held; :func:`discard` it if it will not be saved).
        ``background``: written at idle priority (a checkpoint; not a snapshot, whose caller waits).
        ``extra``: files its save writes beside the index (a forked writer makes them in its child)."""
        index = self.shards[modality].index
        if self.config.fork and CAN_FORK:
            try:
                return ForkedCopy(index, layout.forked(self.index_dir / modality), self.config.checkpoint_timeout, idle=background, extra=extra)
            except OSError as err:  # ENOMEM, EAGAIN: the copy in memory still works
                log.warning("could not fork a snapshot writer for %s (%s); copying the index in memory (commits wait meanwhile)", modality, err)
        return CopyInMemory(index.frozen(), extra)


class CopyInMemory:
    """A copy of the index in memory (:meth:`VectorIndex.frozen`) that writes the ``extra`` files
    beside it when saved, as a forked writer does: made then, in this process."""

    def __init__(self, frozen: FrozenIndex, extra: Callable[[], dict[str, bytes]] | None):
        self.frozen, self.extra = frozen, extra

    def save(self, directory: Path) -> Path:
        self.frozen.save(directory)
        for name, blob in (self.extra() if self.extra else {}).items():
            atomic_write(Path(directory) / name, blob)
        return Path(directory)

    def __len__(self) -> int:
        return len(self.frozen)


def discard(copy: CopyInMemory | ForkedCopy) -> None:
    """Stop a forked writer whose copy will not be saved (a no-op after its save, or for a copy in memory)."""
    if isinstance(copy, ForkedCopy):
        copy.discard()


def _directory_bytes(directory: Path) -> int:
    try:
        return sum(p.stat().st_size for p in Path(directory).iterdir() if p.is_file())
    except OSError:
        return 0
