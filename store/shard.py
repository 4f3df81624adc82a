"""One modality's shard: its index, its write-ahead log, and the group commit between them.

Group commit: writers queue their change and wait. The first writer to find no commit under way becomes the
leader: it takes every queued change, checks each in order (a delete of an id that an earlier
change in the same group added is fine), appends them to the log in one write, fsyncs once, then
applies them in memory in log order under the index's write lock, and wakes the group. Changes
that arrive meanwhile queue for the next leader, so one fsync serves many changes under load.

A change is answered only after it is in the log (and, with the default fsync policy, on disk) and
applied, so every acknowledged change survives a kill. Where the shard's readers are other
processes (the worker processes' primary, :mod:`store.replication`: they apply each change
themselves, and a read waits for that), ``answers_before_applying`` answers once the change is
logged and sent; the index sizes are counted ahead, and the next group, a checkpoint or a pause
waits for the apply, which runs in a thread of its own. An append or fsync that fails is cut back
out of the log and nothing of the group is applied: each writer gets :class:`ChangeNotSaved` (the
service answers 503), and what is served stays what the log holds.

Opening a shard (:meth:`Shard.open`) = its checkpoint (already loaded) + the log after it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from index.embedder import Embedder
from index.store import IndexLoadError, VectorIndex
from store.changes import Change, apply, merge_run, mergeable_runs
from store.config import StoreConfig
from store.errors import ChangeNotSaved, ItemNotFound
from store.events import StoreEvents
from store.layout import checkpoint_lsn, wal_dir
from store.locks import ReadWriteLock
from store.wal import LogCorrupt, WriteAheadLog, encode

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    """A queued change and what its writer is told: done, and the index size or the error."""

    change: Change
    done: bool = False
    error: Exception | None = None
    count: int = 0  # the index size once applied

    @property
    def op(self) -> str:
        return self.change.op

    @property
    def ids(self) -> list[str]:
        return self.change.ids


class Shard:
    """One modality: its index, its log, and the group commit between them.

    Invariants: ``last_lsn`` is the last change logged and applied (outside :meth:`paused`, the
    index holds exactly the changes through it); ``checkpoint_lsn`` <= ``last_lsn`` is the last one
    inside the checkpoint on disk; the log holds every change after ``checkpoint_lsn``.
    """

    def __init__(self, modality: str, index: VectorIndex, wal: WriteAheadLog, lock: ReadWriteLock, model: str, next_lsn: int, fsync: bool = True):
        self.modality, self.index, self.wal, self.lock, self.model = modality, index, wal, lock, model
        self.fsync = fsync  # False: acknowledged once written (survives a kill of the process, not a power cut)
        self.last_lsn = next_lsn - 1  # the last change applied (and logged)
        self.checkpoint_lsn = 0  # the last change inside the checkpoint on disk
        self.pending_since: float | None = None  # monotonic time of the first change since the checkpoint
        self._cond = threading.Condition()
        self._queue: list[_Pending] = []
        self._leading = False
        self._on_commit: Callable[[], None] = lambda: None  # the checkpointer's nudge
        self._on_logged: Callable[[list[Change]], None] = lambda changes: None  # the worker processes' feed (store.replication)
        self.events = StoreEvents()
        self.answers_before_applying = False  # the readers apply changes themselves (see the module's docstring)
        self.failed: BaseException | None = None  # applying a logged change failed: no commit or checkpoint until a restart replays the log
        self._applier: ThreadPoolExecutor | None = None

    @classmethod
    def open(cls, modality: str, index: VectorIndex, index_dir: Path, embedder: Embedder, config: StoreConfig, lock: ReadWriteLock) -> "Shard":
        """Apply the changes logged after the checkpoint to ``index``; a record of another model is
        re-embedded from its raw features. Raises IndexLoadError for a damaged log."""
        after = checkpoint_lsn(index_dir / modality)
        wal = WriteAheadLog(wal_dir(index_dir, modality))
        try:
            records = wal.recover(after)
        except LogCorrupt as err:
            raise IndexLoadError(str(err)) from None  # it names the file, the offset and what each way out costs
        for record in records:
            if record.op == "upsert" and record.model != embedder.manifest_hash:
                record.embeddings = embedder.embed(modality, record.features)
        for run in mergeable_runs(records):  # consecutive records in one index call each, as the commit did
            apply(index, merge_run(run))
        if records:
            log.info("%s: replayed %d logged changes after checkpoint change %d", modality, len(records), after)
        shard = cls(modality, index, wal, lock, embedder.manifest_hash, max([after, *(r.lsn for r in records)]) + 1, config.fsync)
        shard.checkpoint_lsn = after
        shard.pending_since = time.monotonic() if records else None
        return shard

    def on_commit(self, nudge: Callable[[], None]) -> None:
        """Call ``nudge`` after each group commit (the checkpointer checks whether one is due)."""
        self._on_commit = nudge

    def on_logged(self, feed: Callable[[list[Change]], None]) -> None:
        """Call ``feed`` with each group's changes once they are logged, before they are applied here
        and before any writer is answered (the primary publishes them to its worker processes)."""
        self._on_logged = feed

    def report_to(self, events: StoreEvents) -> None:
        self.events = events

    @property
    def queued(self) -> int:
        """Changes waiting for the next group commit."""
        with self._cond:
            return len(self._queue)

    # --- checkpoints (called by store.checkpoints with commits paused where it says) ----------
    def start_segment(self) -> float | None:
        """With commits paused: start a new log segment after ``last_lsn``; returns when the first
        change not in a checkpoint came (give it back to :meth:`checkpoint_failed`)."""
        self.check_applied()
        self.wal.rotate(self.last_lsn + 1)
        since, self.pending_since = self.pending_since, None
        return since

    def checkpoint_failed(self, since: float | None) -> None:
        self.pending_since = since

    def checkpointed(self, lsn: int) -> None:
        """The checkpoint holding the changes through ``lsn`` is on disk: the older segments go."""
        self.checkpoint_lsn = lsn
        self.wal.drop_before_current()

    def check_applied(self) -> None:
        """Raise ChangeNotSaved when the index lacks a logged change (what is saved must hold them all)."""
        if self.failed is not None:
            raise ChangeNotSaved(self.modality, f"applying a logged change failed ({self.failed}); restart the server to replay the log")

    # --- group commit ----------------------------------------------------------------------------
    def begin_commit(self, change: Change) -> Future:
        """:meth:`commit` as a future (done when this returns: the commit runs in the calling thread)."""
        return finished(self.commit, change)

    def commit(self, change: Change) -> int:
        """Returns the index size once the change is logged and applied; ItemNotFound or ChangeNotSaved."""
        self.check_applied()
        pending = _Pending(change)
        with self._cond:
            self._queue.append(pending)
            while not pending.done and self._leading:
                self._cond.wait()
            if not pending.done:  # no commit under way: lead one with everything queued (ours included)
                self._leading = True
                group, self._queue = self._queue, []
        if not pending.done:
            applying = False
            try:
                applying = self._commit_group(group)
            finally:
                if not applying:
                    self._stop_leading()
        if pending.error is not None:
            raise pending.error
        return pending.count

    def _stop_leading(self) -> None:
        with self._cond:
            self._leading = False
            self._cond.notify_all()
        self._on_commit()

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

    def _commit_group(self, group: list[_Pending]) -> bool:
        """Whether the group's apply was handed to the applier thread (which stops leading after it)."""
        applied: set[int] = set()
        logged = False
        try:
            accepted = self._check(group)
            if accepted:
                self._log(accepted)  # a failed append empties it (each change then holds ChangeNotSaved)
            logged = bool(accepted)
            if accepted:  # logged: published to the worker processes before any writer is answered
                self._on_logged([p.change for p in accepted])
                if self.answers_before_applying:
                    self._count_ahead(accepted)
                    if self._applier is None:
                        self._applier = ThreadPoolExecutor(1, thread_name_prefix=f"avsearch-apply-{self.modality}")
                    self._applier.submit(self._apply_then_stop_leading, accepted)
                    return True
                with self.lock.write():
                    for run in mergeable_runs(accepted):
                        apply(self.index, merge_run([p.change for p in run]))
                        for change in run:
                            change.count = len(self.index)
                            applied.add(id(change))
        except BaseException as err:  # applying failed (out of memory): never answer 200 for a change not served
            log.critical("applying %s changes failed (%s); they are in the log and a restart applies them", self.modality, err)
            if logged and self.answers_before_applying:  # the readers may have applied them: this index must not be saved
                self.failed = err
            for change in group:
                if change.error is None and id(change) not in applied:
                    change.error = err
            raise
        finally:
            with self._cond:
                for change in group:
                    change.done = True
                self._cond.notify_all()
        return False

    def _count_ahead(self, accepted: list[_Pending]) -> None:
        """Each change's index size once applied, before it is (ids within one upsert are distinct)."""
        size, added, removed = len(self.index), set(), set()
        for change in accepted:
            for item_id in change.ids:
                present = item_id in added or (item_id not in removed and item_id in self.index)
                if change.op == "delete":
                    size -= present
                    added.discard(item_id)
                    removed.add(item_id)
                else:
                    size += not present
                    added.add(item_id)
                    removed.discard(item_id)
            change.count = size

    def _apply_then_stop_leading(self, accepted: list[_Pending]) -> None:
        try:
            with self.lock.write():
                for run in mergeable_runs(accepted):
                    apply(self.index, merge_run([p.change for p in run]))
        except BaseException as err:  # the writers were answered: nothing may be saved without these changes
            log.critical("applying %s changes failed (%s); they are in the log; restart the server to replay it", self.modality, err)
            self.failed = err
        finally:
            self._stop_leading()

    def _check(self, group: list[_Pending]) -> list[_Pending]:
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

    def _log(self, accepted: list[_Pending]) -> None:
        frames = []
        for lsn, change in enumerate(accepted, start=self.last_lsn + 1):
            change.change.lsn, change.change.model = lsn, self.model
            frames.append(encode(change.change))
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
        if self.pending_since is None:
            self.pending_since = time.monotonic()

    def log_bytes(self) -> int:
        return self.wal.bytes_since_rotation

    def close(self) -> None:
        with self.paused():
            self.wal.close()
        if self._applier is not None:
            self._applier.shutdown()


def finished(function: Callable, *args) -> Future:
    """A future already done with what ``function(*args)`` returned or raised."""
    future: Future = Future()
    try:
        future.set_result(function(*args))
    except BaseException as err:
        future.set_exception(err)
    return future

