"""One modality's shard: its index, its write-ahead log, and the group commit between them.

Group commit: writers queue their change and wait. The first writer to find no commit under way becomes the
leader: it takes every queued change, checks each in order (a delete of an id that an earlier
change in the same group added is fine), appends them to the log in one write, fsyncs once, then
applies them in memory in log order under the index's write lock, and wakes the group. Changes
that arrive meanwhile queue for the next leader, so one fsync serves many changes under load.

A change is answered only after it is in the log (and, with the default fsync policy, on disk) and
applied, so every acknowledged change survives a kill. An append or fsync that fails is cut back
out of the log and nothing of the group is applied: each writer gets :class:`ChangeNotSaved` (the
service answers 503), and what is served stays what the log holds.

With worker processes (:meth:`Shard.share`, :meth:`Shard.join`) every process of the version
appends to the one log, under its append lock, and applies what the others appended before it
checks a group and before each read (:mod:`store.sharedlog`).

Opening a shard (:meth:`Shard.open`) = its checkpoint (already loaded) + the log after it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from index.embedder import Embedder
from index.store import IndexLoadError, VectorIndex
from store.changes import Change, apply, merge_run, mergeable_runs
from store.config import StoreConfig
from store.errors import ChangeNotDurable, ChangeNotSaved, ItemNotFound, NotFollowing
from store.events import StoreEvents
from store.layout import checkpoint_lsn, wal_dir
from store.locks import ReadWriteLock
from store.sharedlog import OPEN, SEALED, WAITING, LogState, Position, SharedLog
from store.wal import LogCorrupt, WriteAheadLog, encode

log = logging.getLogger(__name__)
GATE_POLL_S = 0.01  # a new version's worker polls its gate while the old workers leave
FOLLOW_RUN = 32  # records applied per hold of the index's write lock when catching up
CLOSE_ENOUGH = 8  # records a pause may leave to apply under the append lock, where every process's commits wait


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
    index holds exactly the changes through it; with worker processes, the others may have logged
    more since, which :meth:`catch_up` applies); ``checkpoint_lsn`` <= ``last_lsn`` is the last one
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
        self._turns_waiting = 0  # _take_turn callers waiting: no new group starts before them
        self._on_commit: Callable[[], None] = lambda: None  # the checkpointer's nudge
        self.events = StoreEvents()
        self.shared: SharedLog | None = None  # the log other processes append to too (store.sharedlog)
        self.failed: BaseException | None = None  # applying a change other processes logged failed: this index no longer matches the log

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
        if self.shared is not None:
            self.shared.state.publish(self.modality, Position(self.last_lsn, self.last_lsn + 1, 0))
        since, self.pending_since = self.pending_since, None
        return since

    def oldest_unfolded(self) -> float | None:
        """When the first change not in a checkpoint came (monotonic), or None. With worker
        processes, changes the others published count from when this process first saw them, so a
        checkpoint falls due whether or not this process has applied them yet (the checkpoint does)."""
        if self.pending_since is None and self.shared is not None and self.shared.lsn > self.last_lsn:
            self.pending_since = time.monotonic()
        return self.pending_since

    def checkpoint_failed(self, since: float | None) -> None:
        self.pending_since = since

    def checkpointed(self, lsn: int) -> None:
        """The checkpoint holding the changes through ``lsn`` is on disk: the older segments go
        (with worker processes, those that every worker has read; the rest at a later checkpoint)."""
        self.checkpoint_lsn = lsn
        read = self.shared.state.slowest(self.modality) if self.shared is not None else lsn
        self.wal.drop_through(min(lsn, read))

    def check_applied(self) -> None:
        """Raise ChangeNotSaved when the index lacks a logged change (what is saved must hold them all)."""
        if self.failed is not None:
            raise ChangeNotSaved(self.modality, f"applying a logged change failed ({self.failed}); restart the server to replay the log")

    # --- one log, several processes (store.sharedlog) --------------------------------------------
    def share(self, state: LogState, gate: int = OPEN) -> None:
        """The primary: publish this log's end in ``state`` for the workers forked from now on,
        which append to it themselves; from now on this process only follows it."""
        end = Position(self.last_lsn, self.wal.first_lsn, self.wal.end())
        state.publish(self.modality, end)
        state.set(self.modality, "gate", gate)
        self.shared = SharedLog(state, self.modality, self.wal.directory, end)

    def join(self, state: LogState, position: Position, slot: int) -> None:
        """A forked worker in ``slot``: append to the log whose end ``state`` holds; this index is at
        ``position`` (the primary set the slot there before the fork)."""
        self.wal.open_segment(position.segment)
        self.last_lsn = position.lsn
        self.shared = SharedLog(state, self.modality, self.wal.directory, position, slot)
        self.shared.tail.open()

    def position(self) -> Position:
        """Where this index is in the shared log (with commits paused: its end)."""
        return self.shared.tail.position

    def set_gate(self, gate: int) -> None:
        """OPEN, SEALED (changes refused: a swap) or WAITING (changes held), once no append is under way."""
        with self.shared.lock.held():
            self.shared.state.set(self.modality, "gate", gate)

    def behind(self) -> int:
        """How many changes other processes published that this index lacks (0 alone)."""
        return 0 if self.shared is None else self.shared.lsn - self.last_lsn

    def catch_up(self, most: int | None = None) -> int:
        """Apply what other processes logged and published before this call (a no-op alone), or
        its first ``most`` records, a few at a time: a read or a commit of this process waits for
        one run at most. Returns how many this call applied."""
        shared = self.shared
        if shared is None:
            return 0
        target, applied = shared.lsn, 0
        if most is not None:
            target = min(target, self.last_lsn + most)
        while self.last_lsn < target:
            with shared.applying:
                if self.last_lsn >= target:  # another thread of this process applied it meanwhile (a commit, a read)
                    break
                try:
                    run = self._follow(min(target, self.last_lsn + FOLLOW_RUN))
                    if not run:  # never spin: this process's place in the log and its index disagree
                        raise LogCorrupt(f"change {self.last_lsn + 1} is published but was not read (read through {self.shared.tail.position.lsn})")
                    applied += run
                except Exception as err:  # a record that does not read back, or does not apply
                    self.failed = err
                    raise NotFollowing(self.modality, f"{type(err).__name__}: {err}") from err
        if applied:
            self._on_commit()
        return applied

    def _close_in(self) -> None:
        """Catch up before a pause takes the append lock, pass after pass while each more than halves
        what is left: what the workers append during one pass is applied under the lock by the
        pass after, where it would hold every process's commits (measured, 10^6 HNSW32 with 2
        workers: a 1,286-change catch-up left 357 to apply under the lock, 69 ms)."""
        behind = None
        while True:
            self.catch_up()
            left = self.shared.lsn - self.last_lsn
            if left <= CLOSE_ENOUGH or (behind is not None and 2 * left > behind):  # close, or no longer closing in
                return
            behind = left

    def _follow(self, through: int) -> int:
        """Apply the published records this index lacks, through LSN ``through`` (the caller holds
        ``shared.applying``)."""
        records = self.shared.read_through(through)
        if not records:
            return 0
        try:
            with self.lock.write():
                for run in mergeable_runs(records):
                    apply(self.index, merge_run(run))
        except BaseException as err:  # a part may be applied: this index must be neither saved nor served
            self.failed = err
            raise
        self.last_lsn = records[-1].lsn
        if self.pending_since is None:
            self.pending_since = time.monotonic()
        return len(records)

    def _at_log_end(self) -> None:
        """Holding the append lock and ``shared.applying``: cut a dead appender's torn tail, append to
        the current segment, and apply every published record."""
        end = self.shared.state.end(self.modality)
        if self.wal.first_lsn != end.segment:
            self.wal.open_segment(end.segment)
        if self.wal.end() > end.end:
            log.warning("%s: %d bytes after the last published record cut (a process killed while appending; never acknowledged)", self.wal.segment, self.wal.end() - end.end)
            self.wal.cut(end.end)
        self._follow(end.lsn)

    @contextmanager
    def _appending(self, group: list[_Pending]) -> Iterator[bool]:
        """Shared: hold ``shared.applying`` and then the append lock (never the other way round)
        with this process at the log's end, and publish the new end after the block; yields False
        with each change refused when the version is sealed for a swap. Once it yielded True, the caller holds
        ``shared.applying`` and releases it when the group is applied. Alone: yields True."""
        shared = self.shared
        if shared is None:
            yield True
            return
        self.catch_up()  # most of what the others logged, applied before the lock: they wait for less
        while True:
            shared.applying.acquire()  # before the append lock, never under it: this process's follower may hold it, preempted at idle priority, and every process's writes would wait with us
            handed_over = False
            try:
                with shared.lock.held():
                    if shared.gate == SEALED:
                        for change in group:
                            change.error = ChangeNotSaved(self.modality, "a version swap is under way; retry")
                        yield False
                        return
                    if shared.gate != WAITING:
                        self._at_log_end()
                        handed_over = True  # the caller releases it once the group is applied
                        yield True
                        shared.state.publish(self.modality, Position(self.last_lsn, self.wal.first_lsn, self.wal.end()))
                        shared.moved_to(shared.state.end(self.modality))
                        return
            finally:
                if not handed_over:
                    shared.applying.release()
            time.sleep(GATE_POLL_S)

    # --- group commit ----------------------------------------------------------------------------
    def commit(self, change: Change) -> int:
        """Returns the index size once the change is logged and applied; ItemNotFound or ChangeNotSaved."""
        self.check_applied()
        pending = _Pending(change)
        with self._cond:
            self._queue.append(pending)
            while not pending.done and (self._leading or self._turns_waiting):
                self._cond.wait()
            if not pending.done:  # no commit under way: lead one with everything queued (ours included)
                self._leading = True
                group, self._queue = self._queue, []
        if not pending.done:
            try:
                self._commit_group(group)
            finally:
                with self._cond:
                    self._leading = False
                    self._cond.notify_all()
                self._on_commit()
        if pending.error is not None:
            raise pending.error
        return pending.count

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Hold off commits (none is half-done inside), in every process: the log's end is then ``last_lsn``, and the index is at it."""
        self._take_turn()
        try:
            if self.shared is None:
                yield
            else:  # no process appends meanwhile
                self._close_in()  # most of it before the lock: the workers wait for less
                with self.shared.applying, self.shared.lock.held():  # in this order, as a commit takes them
                    self._at_log_end()
                    yield
        finally:
            with self._cond:
                self._leading = False
                self._cond.notify_all()

    def _take_turn(self) -> None:
        """Wait for the group commit under way, not for those queued behind it (they wait for the
        caller, who ends the turn as a leader does): under writes that never stopped, each group's end
        handed the turn to a queued commit, and a fold waited seconds for one."""
        with self._cond:
            self._turns_waiting += 1
            try:
                while self._leading:
                    self._cond.wait()
            finally:
                self._turns_waiting -= 1
                self._cond.notify_all()  # interrupted, it took no turn: the commits queued behind it go on
            self._leading = True

    def _commit_group(self, group: list[_Pending]) -> None:
        holding = False  # shared.applying, from the catch-up before the check to the apply
        try:
            try:
                with self._appending(group) as open_:
                    holding = self.shared is not None and open_
                    accepted = self._check(group) if open_ else []
                    if accepted:
                        self._log(accepted, sync=not holding)  # a failed append empties it (each change then holds ChangeNotSaved)
            except Exception as err:  # nothing logged (the append lock, a catch-up that failed): each writer is told
                for change in group:
                    if change.error is None:
                        change.error = err if isinstance(err, ChangeNotSaved) else ChangeNotSaved(self.modality, f"{type(err).__name__}: {err}")
                return
            if holding and accepted:
                self._sync_published(accepted)
            self._apply(group, accepted)
        finally:
            if holding:
                self.shared.applying.release()
            with self._cond:
                for change in group:
                    change.done = True
                self._cond.notify_all()

    def _apply(self, group: list[_Pending], accepted: list[_Pending]) -> None:
        """Apply the logged changes in log order, each told the index size after it."""
        applied: set[int] = set()
        try:
            with self.lock.write():
                for run in mergeable_runs(accepted):
                    apply(self.index, merge_run([p.change for p in run]))
                    for change in run:
                        change.count = len(self.index)
                        applied.add(id(change))
        except BaseException as err:  # applying failed (out of memory): never answer 200 for a change not served
            log.critical("applying %s changes failed (%s); they are in the log and a restart applies them", self.modality, err)
            if self.shared is not None:  # the other processes apply them: this one no longer matches the log
                self.failed = err
            for change in group:
                if change.error is None and id(change) not in applied:
                    change.error = err
            raise

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

    def _log(self, accepted: list[_Pending], sync: bool = True) -> None:
        """Append the group (and fsync it, unless ``sync`` is False: :meth:`_sync_published` does)."""
        frames = []
        for lsn, change in enumerate(accepted, start=self.last_lsn + 1):
            change.change.lsn, change.change.model = lsn, self.model
            frames.append(encode(change.change))
        start = None
        try:
            start = self.wal.end()  # before the append: a write that fails half-way is cut back to here
            self.wal.append(b"".join(frames))
            if self.fsync and sync:
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

    def _sync_published(self, accepted: list[_Pending]) -> None:
        """Shared: fsync a group appended and published, after letting go of the append lock. Other
        processes append meanwhile and their fsyncs overlap this one: one disk flush can cover
        several processes' groups, where fsyncs under the lock would queue one behind another
        (behind a checkpoint's writeback, seconds each). The group is answered only after this
        fsync, as alone; another process may serve it a little before (only a power cut loses it).
        A failed fsync cannot be cut back (others may have applied or appended after it): the
        group is applied here too, so every process agrees, and its writers are told (ChangeNotDurable)."""
        if not self.fsync:
            return
        try:
            self.wal.sync()
        except OSError as err:
            reason = f"{type(err).__name__}: {err}"
            log.critical("fsync of the %s write-ahead log failed (%s); %d changes already in the log are not confirmed on disk", self.modality, reason, len(accepted))
            for change in accepted:
                change.error = ChangeNotDurable(self.modality, reason)

    def log_bytes(self) -> int:
        """The log written since the last checkpoint started a segment (by every process)."""
        if self.shared is not None:
            return self.shared.state.get(self.modality, "end")
        return self.wal.bytes_since_rotation

    def close(self) -> None:
        self._take_turn()  # no commit half-done (not paused(): that would apply what others logged)
        self.wal.close()
        if self.shared is not None:
            self.shared.close()

