"""Folding the write-ahead log into a snapshot, in the background, without stopping searches.

A modality's log is folded when it passes ``wal_snapshot_bytes`` and ``wal_snapshot_growth`` times
the last snapshot's size (a fold rewrites the whole index, so folding only once the log has grown
in proportion keeps the cost per change constant: a bulk load stays linear in N), or when its
oldest change not in a snapshot is ``wal_snapshot_seconds`` old. The fold holds off that modality's
commits only while it takes a copy of the index and starts a new log segment; searches never wait
for it (the copy reads the index, and only commits write it). The copy is a forked child's image
of the process (:mod:`store.forked`: ~0.1 s), or, where that is off or fails, a copy in memory
(:meth:`VectorIndex.frozen`: 0.13-0.25 s at 10^6 HNSW32 items, 5 s at 10^7). It is then saved with the whole-directory swap of :mod:`store.persist`, beside
``snapshot.json`` holding the last log sequence number it contains and ``api_items.npz`` (the raw
features of API-written items, :mod:`store.versions`), and the older segments are deleted. A kill anywhere leaves the previous snapshot and every segment after it, or the new one.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from store.versions import API_ITEMS_NAME, api_items_of
from index.store import FrozenIndex
from store.shard import ChangeLog, StoreEvents
from store.forked import CAN_FORK, ForkedCopy
from store.persist import forked_directory, save_atomically

log = logging.getLogger(__name__)
SNAPSHOT_NAME = "snapshot.json"  # inside <index>/<modality>/: {"lsn": the last change it holds}
RETRY_FIRST_SECONDS = 1.0  # after a failed fold, the next try waits this long, doubling with each failure...
RETRY_MAX_SECONDS = 300.0  # ...up to this (each try forks and writes the whole index: on a full disk, it refills it)


@dataclass(frozen=True)
class Durability:
    fsync: bool = True  # fsync the log before each answer (group commit); False: after writing it (a kill loses nothing, a power cut may)
    snapshot_bytes: int = 64 * 1024 * 1024  # fold the log into a snapshot past this size...
    snapshot_seconds: float = 300.0  # ...or when its oldest change not in a snapshot is this old
    snapshot_growth: float = 1.0  # ...and only once the log holds this fraction of the last snapshot's bytes (a fold rewrites it all: amortised O(1) a change)
    fold_timeout: float = 3600.0  # a forked writer still writing after this many seconds is stopped (the fold fails; the log keeps every change)
    fork: bool = True  # a fold's copy of the index is a forked child's (commits wait ~0.1 s), not one in memory (5 s at 10^7 HNSW32); Linux only
    write_headroom: float = 0.25  # room made at load for this fraction more items, so the first writes after a start copy no index (VectorIndex.reserve)


def snapshot_lsn(directory: Path) -> int:
    """The last log sequence number inside the snapshot in ``directory`` (0: an index built by a job)."""
    try:
        return int(json.loads((Path(directory) / SNAPSHOT_NAME).read_text())["lsn"])
    except FileNotFoundError:
        return 0


class Snapshotter:
    def __init__(self, logs: dict[str, ChangeLog], index_dir: Path, durability: Durability):
        self.logs, self.index_dir, self.durability = logs, Path(index_dir), durability
        self._fold_locks = {m: threading.Lock() for m in logs}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        for changelog in logs.values():
            changelog.on_commit = self._nudge
        self.snapshot_size = {m: _directory_bytes(self.index_dir / m) for m in logs}
        self.failures = {m: 0 for m in logs}  # failed folds in a row
        self._retry_at = {m: 0.0 for m in logs}  # monotonic time before which a failed fold is not retried
        self.events = StoreEvents()

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="avsearch-snapshots", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop folding (waits for a fold under way); the log keeps every change until a later start."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def folding(self, modality: str) -> threading.Lock:
        """Held while ``modality``'s snapshot directory and log segments may change."""
        return self._fold_locks[modality]

    def _nudge(self) -> None:
        changelog_due = any(self._due(m) for m in self.logs)
        if changelog_due:
            self._wake.set()

    def _due(self, modality: str) -> bool:
        changelog = self.logs[modality]
        oldest = changelog.oldest_unsnapshotted
        if time.monotonic() < self._retry_at[modality]:
            return False
        if changelog.wal.bytes_since_rotation >= max(self.durability.snapshot_bytes, self.durability.snapshot_growth * self.snapshot_size[modality]):
            return True
        return oldest is not None and time.monotonic() - oldest >= self.durability.snapshot_seconds

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            for modality in self.logs:
                if self._stop.is_set():
                    return
                if self._due(modality):
                    try:
                        self.fold(modality)
                    except Exception as err:  # OSError mostly: the log still holds every change; retried after a wait
                        delay = min(RETRY_MAX_SECONDS, RETRY_FIRST_SECONDS * 2 ** (self.failures[modality] - 1))
                        self._retry_at[modality] = time.monotonic() + delay
                        log.error("folding the %s log into a snapshot failed (%s, %d in a row); the log keeps the changes; next try in %.0f s", modality, err, self.failures[modality], delay)

    def fold(self, modality: str) -> int:
        """Write a snapshot of ``modality`` holding every change committed so far; returns its log sequence number."""
        changelog = self.logs[modality]
        with self._fold_locks[modality]:
            started, log_bytes = time.perf_counter(), changelog.wal.bytes_since_rotation
            try:
                written = self._fold(modality, changelog)
            except BaseException:
                self.failures[modality] += 1
                self.events.folded(modality, time.perf_counter() - started, log_bytes, failed=True)
                raise
            if written:
                self.failures[modality], self._retry_at[modality] = 0, 0.0
                self.events.folded(modality, time.perf_counter() - started, log_bytes, failed=False)
            return changelog.snapshot_lsn

    def _fold(self, modality: str, changelog: ChangeLog) -> bool:
        """Whether a snapshot was written (not when the last one holds every change already)."""
        with changelog.paused():  # no commit half-done: the index is exactly at last_lsn
            lsn, pending_since = changelog.last_lsn, changelog.oldest_unsnapshotted
            if lsn == changelog.snapshot_lsn:
                return False
            frozen = self.copy(modality)
            try:
                changelog.wal.rotate(lsn + 1)
            except BaseException:
                discard(frozen)
                raise
            changelog.oldest_unsnapshotted = None
        try:
            started = time.perf_counter()
            # The raw features of API-written items follow the snapshot (a new model re-embeds them).
            carried = api_items_of(self.index_dir, modality, changelog.snapshot_lsn, lsn)
            extra = {SNAPSHOT_NAME: json.dumps({"lsn": lsn}).encode(), API_ITEMS_NAME: carried.to_bytes()}
            save_atomically(frozen, self.index_dir / modality, extra=extra)
        except BaseException:
            discard(frozen)
            changelog.oldest_unsnapshotted = pending_since
            raise
        changelog.snapshot_lsn = lsn
        self.snapshot_size[modality] = _directory_bytes(self.index_dir / modality)
        changelog.wal.drop_before_current()
        log.info("%s: snapshot at change %d (%d items) in %.2f s; log truncated", modality, lsn, len(frozen), time.perf_counter() - started)
        return True

    def copy(self, modality: str) -> FrozenIndex | ForkedCopy:
        """The index as it is now, to be saved while commits go on (call it with the modality's
        commits paused and its fold lock held; :func:`discard` it if it will not be saved)."""
        index = self.logs[modality].index
        if self.durability.fork and CAN_FORK:
            try:
                return ForkedCopy(index, forked_directory(self.index_dir / modality), self.durability.fold_timeout)
            except OSError as err:  # ENOMEM, EAGAIN: the copy in memory still works
                log.warning("could not fork a snapshot writer for %s (%s); copying the index in memory (commits wait meanwhile)", modality, err)
        return index.frozen()


def discard(copy: FrozenIndex | ForkedCopy) -> None:
    """Stop a forked writer whose copy will not be saved (a no-op after its save, or for a copy in memory)."""
    if isinstance(copy, ForkedCopy):
        copy.discard()


def _directory_bytes(directory: Path) -> int:
    try:
        return sum(p.stat().st_size for p in Path(directory).iterdir() if p.is_file())
    except OSError:
        return 0
