"""Group commit of one modality's item changes: validate, append to the write-ahead log, fsync, apply.

Writers queue their change and wait. The first writer to find no commit under way becomes the
leader: it takes every queued change, checks each in order (a delete of an id that an earlier
change in the same group added is fine), appends them to the log in one write, fsyncs once, then
applies them in memory in log order under the index's write lock, and wakes the group. Changes
that arrive meanwhile queue for the next leader, so one fsync serves many changes under load.

A change is answered only after it is in the log (and, with the default fsync policy, on disk) and
applied, so every acknowledged change survives a kill. An append or fsync that fails is cut back
out of the log and nothing of the group is applied: each writer gets :class:`ChangeNotSaved` (503),
and what is served stays what the log holds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from fastapi import HTTPException

from index.store import VectorIndex
from service.locks import ReadWriteLock
from service.wal import Record, WriteAheadLog

log = logging.getLogger(__name__)


class ItemNotFound(KeyError):
    def __init__(self, modality: str, item_id: str):
        super().__init__(item_id)
        self.message = f"no {modality} item with id {item_id!r}"
        self.remote_args = (modality, item_id)  # raised again in a worker process (store.replication)


class ChangeNotSaved(HTTPException):
    """A change whose log append failed; nothing of it was applied, so the client may simply retry.
    An HTTPException so that every route answers it as a 503 with this message, never a bare 500."""

    def __init__(self, modality: str, reason: str):
        super().__init__(503, f"the {modality} change was not saved ({reason}); nothing was applied, so nothing changed; retry later")
        self.remote_args = (modality, reason)


class StoreEvents:
    """What the store reports as it works; this default ignores it (the service's ``Metrics`` records it)."""

    def committed(self, modality: str, changes: int) -> None:
        """One group commit: ``changes`` appended with one write (and one fsync)."""

    def folded(self, modality: str, seconds: float, log_bytes: int, failed: bool) -> None:
        """One fold of ``log_bytes`` of log into a snapshot, done or failed."""


@dataclass
class Change:
    op: str  # "upsert" or "delete"
    ids: list[str]
    metadata: list[dict | None]
    features: np.ndarray | None = None
    embeddings: np.ndarray | None = None
    done: bool = False
    error: Exception | None = None
    count: int = 0  # the index size once applied


def apply_record(index: VectorIndex, record: Record | Change) -> None:
    if record.op == "upsert":
        index.upsert(record.embeddings, record.ids, record.metadata)
    else:
        index.remove([i for i in record.ids if i in index])


def mergeable_runs(changes: list) -> Iterator[list]:
    """Consecutive changes of one kind that one index call can apply: a Flat or IVF removal moves
    the whole array once per call, so 16 deletes in one call cost what one costs. Upserts merge
    while their ids stay distinct (an id written twice keeps its order by starting a new run)."""
    run: list[Change] = []
    seen: set[str] = set()
    for change in changes:
        if run and (change.op != run[0].op or seen.intersection(change.ids)):
            yield run
            run, seen = [], set()
        run.append(change)
        seen.update(change.ids)
    if run:
        yield run


def merge_run(run: list) -> Change:
    if len(run) == 1:
        return run[0]
    ids = [i for c in run for i in c.ids]
    if run[0].op == "delete":
        return Change("delete", ids, [])
    return Change("upsert", ids, [m for c in run for m in c.metadata], None, np.concatenate([c.embeddings for c in run]))


class ChangeLog:
    """One modality: its index, its log, and the group commit between them."""

    def __init__(self, modality: str, index: VectorIndex, wal: WriteAheadLog, lock: ReadWriteLock, model: str, next_lsn: int, fsync: bool = True):
        self.modality, self.index, self.wal, self.lock, self.model = modality, index, wal, lock, model
        self.fsync = fsync  # False: acknowledged once written (survives a kill of the process, not a power cut)
        self.last_lsn = next_lsn - 1  # the last change applied (and logged)
        self.snapshot_lsn = 0  # the last change inside the snapshot on disk
        self.oldest_unsnapshotted: float | None = None  # monotonic time of the first change since the snapshot
        self._cond = threading.Condition()
        self._queue: list[Change] = []
        self._leading = False
        self.on_commit: Callable[[], None] = lambda: None  # the snapshotter's nudge
        self.on_logged: Callable[[list[Change], int], None] = lambda changes, first_lsn: None  # worker processes' feed (store.replication)
        self.events = StoreEvents()

    def commit(self, change: Change) -> int:
        """Returns the index size once the change is logged and applied; ItemNotFound or ChangeNotSaved."""
        with self._cond:
            self._queue.append(change)
            while not change.done and self._leading:
                self._cond.wait()
            if not change.done:  # no commit under way: lead one with everything queued (ours included)
                self._leading = True
                group, self._queue = self._queue, []
        if not change.done:
            try:
                self._commit_group(group)
            finally:
                with self._cond:
                    self._leading = False
                    self._cond.notify_all()
            self.on_commit()
        if change.error is not None:
            raise change.error
        return change.count

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Hold off commits (none is half-done inside): the log's end is then ``last_lsn``, and the index is at it."""
        with self._cond:
            while self._leading:
                self._cond.wait()
            self._leading = True
        try:
            yield
        finally:
            with self._cond:
                self._leading = False
                self._cond.notify_all()

    def _commit_group(self, group: list[Change]) -> None:
        applied: set[int] = set()
        try:
            accepted = self._check(group)
            if accepted:
                self._log(accepted)  # a failed append empties it (each change then holds ChangeNotSaved)
            if accepted:  # logged: worker processes apply it while this one does, and before any writer is answered
                self.on_logged(accepted, self.last_lsn - len(accepted) + 1)
                with self.lock.write():
                    for run in mergeable_runs(accepted):
                        apply_record(self.index, merge_run(run))
                        for change in run:
                            change.count = len(self.index)
                            applied.add(id(change))
        except BaseException as err:  # applying failed (out of memory): never answer 200 for a change not served
            log.critical("applying %s changes failed (%s); they are in the log and a restart applies them", self.modality, err)
            for change in group:
                if change.error is None and id(change) not in applied:
                    change.error = err
            raise
        finally:
            for change in group:
                change.done = True

    def _check(self, group: list[Change]) -> list[Change]:
        """Deletes of ids that are not there (counting earlier changes of the group) fail alone."""
        added: set[str] = set()
        removed: set[str] = set()
        accepted = []
        for change in group:
            if change.op == "delete":
                item_id = change.ids[0]
                present = item_id in added or (item_id not in removed and item_id in self.index)
                if not present:
                    change.error = ItemNotFound(self.modality, item_id)
                    continue
                added.discard(item_id)
                removed.add(item_id)
            else:
                added.update(change.ids)
                removed.difference_update(change.ids)
            accepted.append(change)
        return accepted

    def _log(self, accepted: list[Change]) -> None:
        frames = []
        for lsn, change in enumerate(accepted, start=self.last_lsn + 1):
            frames.append(Record(lsn, change.op, change.ids, self.model, change.metadata, change.features, change.embeddings).encode())
        start = None
        try:
            start = self.wal.end()  # before the append: a write that fails half-way is cut back to here
            self.wal.append(b"".join(frames))
            if self.fsync:
                self.wal.sync()
        except Exception as err:  # OSError mostly (disk full, I/O error)
            reason = f"{type(err).__name__}: {err}"
            log.error("appending to the %s write-ahead log failed (%s); the group of %d changes is refused", self.modality, reason, len(accepted))
            if start is not None:
                try:
                    self.wal.cut(start)
                except OSError as cut_err:  # the refused records may replay after a restart: say so loudly
                    log.critical("could not cut the refused changes out of %s (%s)", self.wal.segment, cut_err)
            for change in accepted:
                change.error = ChangeNotSaved(self.modality, reason)
            accepted.clear()
            return
        self.last_lsn += len(accepted)
        self.events.committed(self.modality, len(accepted))
        if self.oldest_unsnapshotted is None:
            self.oldest_unsnapshotted = time.monotonic()

    def log_bytes(self) -> int:
        return self.wal.bytes_since_rotation

    def close(self) -> None:
        with self.paused():
            self.wal.close()
