"""One log appended to by several processes (store.sharedlog), as the worker processes use it: a
primary collection that only follows, and forked children that write through their own shards.

Each child is forked from the primary with commits paused (as service.workers forks), joins the log
where its image is, runs one step and reports through a pipe."""

from __future__ import annotations

import dataclasses
import errno
import os
import pickle
import threading
import time
from contextlib import ExitStack

import numpy as np
import pytest

from store.collection import Collection
from store.errors import ChangeNotDurable, ChangeNotSaved, ItemNotFound, NotFollowing
from store.priority import BACKGROUND_NICE
from store import sharedlog
from store.sharedlog import FOLLOW_BEHIND_MOST, FOLLOW_STEP, OPEN, SEALED, Follower, LogState
from store.wal import LogCorrupt
from tests.service.conftest import copy_index


@pytest.fixture
def primary(tiny, tmp_path):
    collection = Collection.load(tiny.model_dir, copy_index(tiny, tmp_path / "index"), device="cpu", intra_op_threads=1)
    collection.checkpointer.stop()  # checkpoints only where a test asks for one
    state = LogState(list(collection.shards), slots=4)
    for shard in collection.shards.values():
        shard.share(state, OPEN)
    yield collection
    collection.close()


class Child:
    """A worker's collection forked from ``primary`` now; ``run(step, *args)`` runs ``step(collection, *args)`` in it."""

    def __init__(self, primary: Collection, slot: int):
        self.slot = slot
        self.replica = Collection.replica(primary, primary.embedder)
        self._orders_r, self._orders_w = os.pipe()
        self._results_r, self._results_w = os.pipe()
        with ExitStack() as paused:
            for shard in primary.shards.values():
                paused.enter_context(shard.paused())
            positions = {m: shard.position() for m, shard in primary.shards.items()}
            for modality, shard in primary.shards.items():
                shard.shared.state.set_read(modality, self.slot, positions[modality].lsn)
            self.pid = os.fork()
        if self.pid == 0:
            self._serve(primary, positions)  # never returns

    def _serve(self, primary: Collection, positions) -> None:
        code = 1
        try:
            for modality, shard in self.replica.shards.items():
                shard.join(primary.shards[modality].shared.state, positions[modality], self.slot)
            with os.fdopen(self._orders_r, "rb") as orders, os.fdopen(self._results_w, "wb") as results:
                while (order := pickle.load(orders)) is not None:
                    step, args = order
                    try:
                        reply = (True, step(self.replica, *args))
                    except Exception as err:
                        reply = (False, err)
                    pickle.dump(reply, results)
                    results.flush()
            code = 0
        finally:
            os._exit(code)

    def run(self, step, *args):
        if not hasattr(self, "_orders"):
            self._orders, self._results = os.fdopen(self._orders_w, "wb"), os.fdopen(self._results_r, "rb")
        pickle.dump((step, args), self._orders)
        self._orders.flush()
        ok, value = pickle.load(self._results)
        if not ok:
            raise value
        return value

    def stop(self) -> None:
        self.run(nothing)  # opens the pipes if no step ran yet
        pickle.dump(None, self._orders)
        self._orders.flush()
        assert os.waitpid(self.pid, 0)[1] == 0


def upsert(collection, item_id):
    vectors = np.full((1, collection.embedder.manifest["input_dims"]["audio"]), 0.5, np.float32)
    return collection.upsert("audio", vectors, [item_id], [{"by": os.getpid()}])


def delete(collection, item_id):
    return collection.delete("audio", item_id)


def has(collection, item_id):
    with collection.reading() as view:
        return view.contains("audio", item_id)


def nothing(collection):
    return None


def test_each_process_appends_and_sees_what_the_others_appended(primary):
    first, second = Child(primary, 0), Child(primary, 1)  # both images lack what the other writes
    try:
        size = len(primary.shards["audio"].index)
        assert first.run(upsert, "from-first") == size + 1
        assert second.run(has, "from-first")  # a read applies what another process published
        assert second.run(delete, "from-first") == size  # checked against the log's state, not its image's
        with pytest.raises(ItemNotFound):  # raised in the child
            first.run(delete, "from-first")
        assert not first.run(has, "from-first")
        with primary.reading() as view:  # the primary follows too
            assert not view.contains("audio", "from-first")
        assert primary.shards["audio"].last_lsn == primary.shards["audio"].shared.lsn == 2
    finally:
        first.stop()
        second.stop()


def test_a_torn_tail_left_by_a_killed_appender_is_cut_by_the_next(primary, tiny):
    child = Child(primary, 0)
    try:
        child.run(upsert, "kept")
        segment = primary.shards["audio"].wal.directory / sorted(p.name for p in primary.shards["audio"].wal.directory.glob("*.wal"))[-1]
        with open(segment, "ab") as f:  # what a kill half-way through an append leaves
            f.write(b"\x40\x00\x00\x00torn")
        child.run(upsert, "after")
    finally:
        child.stop()
    index_dir = primary.index_dir
    primary.close()
    reopened = Collection.load(tiny.model_dir, index_dir, device="cpu")  # replays the log: no damage in the middle
    try:
        assert "kept" in reopened.shards["audio"].index and "after" in reopened.shards["audio"].index
        assert reopened.shards["audio"].last_lsn == 2
    finally:
        reopened.close()


def test_a_process_follows_the_log_across_checkpoints_and_none_deletes_what_it_has_not_read(primary):
    idle, writer = Child(primary, 0), Child(primary, 1)
    segments = lambda: sorted(primary.shards["audio"].wal.directory.glob("*.wal"))  # noqa: E731
    try:
        for item_id in ("first", "second", "third"):
            writer.run(upsert, item_id)
            primary.checkpointer.checkpoint("audio")  # a new segment each time
        assert len(segments()) == 4  # the idle process has read none of the three with a record
        assert all(idle.run(has, item_id) for item_id in ("first", "second", "third"))
        primary.checkpointer.checkpoint("audio")  # nothing new: no checkpoint, no deletion
        writer.run(upsert, "fourth")
        primary.checkpointer.checkpoint("audio")
        assert len(segments()) == 2  # the idle process has not read the fourth
        assert idle.run(has, "fourth")
        writer.run(upsert, "fifth")
        primary.checkpointer.checkpoint("audio")
        assert len(segments()) == 2  # nor the fifth, now; the fourth's segment went
        assert idle.run(has, "fifth")
        late = Child(primary, 2)
        try:
            assert late.run(has, "fourth") and late.run(upsert, "late") > 0
        finally:
            late.stop()
        with primary.reading() as view:
            assert view.contains("audio", "late")
    finally:
        idle.stop()
        writer.stop()


def test_a_checkpoint_falls_due_for_changes_the_primary_has_not_applied_yet(primary, monkeypatch):
    """The primary's follower may lag (or run rarely: AVSEARCH_FOLLOW_SECONDS): what the workers
    published still makes a checkpoint due, and the checkpoint applies it first."""
    checkpointer, shard = primary.checkpointer, primary.shards["audio"]
    monkeypatch.setattr(checkpointer, "config", dataclasses.replace(checkpointer.config, checkpoint_seconds=0.0))
    assert not checkpointer.due("audio")  # nothing logged
    child = Child(primary, 0)
    try:
        child.run(upsert, "unapplied")
    finally:
        child.stop()
    assert shard.last_lsn == 0 and shard.shared.lsn == 1  # the primary has not followed
    assert checkpointer.due("audio")
    assert checkpointer.checkpoint("audio") == 1 == shard.last_lsn
    assert "unapplied" in shard.index and not checkpointer.due("audio")


def test_a_pause_leaves_little_to_apply_under_the_append_lock_while_others_keep_appending(primary, monkeypatch):
    """What a worker appends while the primary catches up before a pause (a checkpoint, a fork) is
    applied by further passes, not under the append lock, where every process's commits wait."""
    shard, child = primary.shards["audio"], Child(primary, 0)
    try:
        for i in range(40):
            child.run(upsert, f"early-{i}")
        appended_during = [10, 2]  # by the child during each catch-up pass: the log grows while the primary closes in
        catch_up, at_log_end = shard.catch_up, shard._at_log_end
        left_under_lock = []

        def catch_up_while_the_child_appends():
            catch_up()
            for i in range(appended_during.pop(0) if appended_during else 0):
                child.run(upsert, f"meanwhile-{len(appended_during)}-{i}")

        def at_log_end_counting():
            left_under_lock.append(shard.shared.lsn - shard.last_lsn)
            at_log_end()

        monkeypatch.setattr(shard, "catch_up", catch_up_while_the_child_appends)
        monkeypatch.setattr(shard, "_at_log_end", at_log_end_counting)
        with shard.paused():
            assert shard.last_lsn == shard.shared.lsn == 52
        assert left_under_lock == [2]  # one pass alone would have left the 10 appended during it
    finally:
        child.stop()


def test_a_sealed_version_refuses_changes_and_takes_them_again_once_open(primary):
    child = Child(primary, 0)
    try:
        primary.shards["audio"].set_gate(SEALED)
        with pytest.raises(ChangeNotSaved, match="swap"):
            child.run(upsert, "refused")
        primary.shards["audio"].set_gate(OPEN)
        assert child.run(upsert, "taken") > 0
        assert not child.run(has, "refused")
    finally:
        child.stop()


def test_a_process_that_cannot_read_what_was_published_says_so_and_takes_no_change(primary):
    child, writer = Child(primary, 0), Child(primary, 1)
    try:
        writer.run(upsert, "first")
        primary.checkpointer.checkpoint("audio")  # a new segment, which the child has not opened
        writer.run(upsert, "unread")
        max(primary.shards["audio"].wal.directory.glob("*.wal")).unlink()  # what no checkpoint may do
        with pytest.raises(NotFollowing, match="audio log"):  # 503: this worker stops, a fork replaces it
            child.run(has, "unread")
        with pytest.raises(ChangeNotSaved, match="restart"):
            child.run(upsert, "refused")
    finally:
        child.stop()
        writer.stop()


def stall_own_follower_then_upsert(collection, item_id, seconds):
    """In a worker: a thread holds this process's apply lock for ``seconds`` (its background follower,
    at idle priority, preempted mid-run on a busy machine), and a commit of this process starts meanwhile."""
    applying, held = collection.shards["audio"].shared.applying, threading.Event()

    def starved_follower():
        with applying:
            held.set()
            time.sleep(seconds)

    threading.Thread(target=starved_follower, daemon=True).start()
    held.wait()
    threading.Thread(target=upsert, args=(collection, item_id), daemon=True).start()
    time.sleep(0.3)  # the commit is under way, waiting for the apply lock


def test_a_process_waiting_on_its_own_follower_holds_no_other_process_up(primary):
    """A commit takes its process's apply lock before the log's append lock, never while holding it:
    the follower runs at idle priority, and every process's writes would wait for it to get a core."""
    stalled, other = Child(primary, 0), Child(primary, 1)
    try:
        stalled.run(stall_own_follower_then_upsert, "behind-the-follower", 4.0)
        started = time.monotonic()
        other.run(upsert, "not-held-up")
        assert time.monotonic() - started < 2.0  # not the 3.7 s left of the stall
        deadline = time.monotonic() + 10
        while not other.run(has, "behind-the-follower"):  # the stalled commit completes once its follower lets go
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert stalled.run(has, "not-held-up")
    finally:
        stalled.stop()
        other.stop()


OUTCOMES: dict[str, object] = {}  # in a child: what its background commits returned


def upsert_in_background(collection, item_id):
    def run():
        try:
            OUTCOMES[item_id] = upsert(collection, item_id)
        except Exception as err:
            OUTCOMES[item_id] = err

    threading.Thread(target=run, daemon=True).start()


def outcome(collection, item_id):
    return OUTCOMES.get(item_id)


def stall_own_fsync_then_upsert(collection, item_id, seconds):
    """In a worker: its next fsync of the audio log takes ``seconds`` (a disk busy writing a
    checkpoint back), and a commit starts."""
    wal, syncing = collection.shards["audio"].wal, threading.Event()
    real_sync = wal.sync

    def slow_sync():
        wal.sync = real_sync
        syncing.set()
        time.sleep(seconds)
        real_sync()

    wal.sync = slow_sync
    upsert_in_background(collection, item_id)
    assert syncing.wait(5)


def test_a_process_waiting_for_its_fsync_holds_no_other_process_up(primary):
    """A commit fsyncs after letting go of the append lock: one worker's group waiting on a slow disk
    does not queue every other worker's group behind it (their fsyncs overlap), and it is answered
    once its own fsync is done."""
    stalled, other = Child(primary, 0), Child(primary, 1)
    try:
        size = len(primary.shards["audio"].index)
        stalled.run(stall_own_fsync_then_upsert, "slow-to-sync", 4.0)
        started = time.monotonic()
        assert other.run(upsert, "not-held-up") == size + 2  # after the stalled one, in log order
        assert time.monotonic() - started < 2.0  # not the 3.7 s left of the stall
        assert stalled.run(outcome, "slow-to-sync") is None  # not answered before its fsync
        deadline = time.monotonic() + 10
        while (answer := stalled.run(outcome, "slow-to-sync")) is None:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert answer == size + 1
        assert stalled.run(has, "not-held-up") and other.run(has, "slow-to-sync")
    finally:
        stalled.stop()
        other.stop()


def fail_next_fsync(collection):
    wal = collection.shards["audio"].wal
    real_sync = wal.sync

    def failing_sync():
        wal.sync = real_sync
        raise OSError(errno.EIO, "Input/output error")

    wal.sync = failing_sync


def test_a_group_whose_fsync_fails_is_reported_unconfirmed_and_every_process_still_agrees(primary):
    """Its records were published before the fsync (other processes may apply them meanwhile), so they
    cannot be cut back as a lone process cuts them: the answer says the change is in the log but
    the disk did not confirm it, and every process, this one too, serves it."""
    failing, other = Child(primary, 0), Child(primary, 1)
    try:
        size = len(primary.shards["audio"].index)
        failing.run(fail_next_fsync)
        with pytest.raises(ChangeNotDurable) as refused:
            failing.run(upsert, "unconfirmed")
        assert "Input/output error" in str(refused.value) and "power cut" in str(refused.value)
        assert failing.run(has, "unconfirmed") and other.run(has, "unconfirmed")
        assert failing.run(upsert, "confirmed") == size + 2  # the disk works again: commits go on
        primary.catch_up()
        assert len(primary.shards["audio"].index) == size + 2
    finally:
        failing.stop()
        other.stop()


def test_the_background_follower_applies_at_nice_10_in_steps_an_idle_priority_scout_asks_for(monkeypatch):
    """Whoever applies holds the apply lock that reads and checkpoints wait for, so it must never be
    starved (store.sharedlog.Follower says why): the applier runs at nice 10 (SCHED_OTHER), a step
    at a time, the first FOLLOW_STEP records, each step asked for by a scout that runs only when a
    core would otherwise idle (SCHED_IDLE, not nice 19), step after step while there is more."""
    monkeypatch.setattr(sharedlog, "thread_time", lambda: 0.0)  # steps that take no CPU: each twice the last
    calls, done, backlog = [], threading.Event(), [3 * FOLLOW_STEP + 2]

    def catch_up(most: int) -> int:
        calls.append((most, os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
        applied = min(most, backlog[0])
        backlog[0] -= applied
        if not backlog[0]:
            done.set()
        return applied

    follower = Follower(catch_up, lambda: backlog[0], lambda err: None, interval=0.01).start()
    try:
        assert done.wait(5)
        scout = os.sched_getscheduler(follower._scout.native_id)
    finally:
        follower.stop()
    assert scout == os.SCHED_IDLE
    nice = max(BACKGROUND_NICE, os.getpriority(os.PRIO_PROCESS, 0))  # nice 10, or the test's own if lower still
    assert calls[:3] == [(FOLLOW_STEP, os.SCHED_OTHER, nice), (2 * FOLLOW_STEP, os.SCHED_OTHER, nice), (4 * FOLLOW_STEP, os.SCHED_OTHER, nice)]  # 26 records, none at idle priority
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the caller's thread is left as it was


def test_a_follower_step_keeps_near_its_cpu_budget_halving_after_a_long_step_and_doubling_after_a_short_one(monkeypatch):
    """A nice-10 step holds a core that a waking request waits for, so its length, not its count of
    records, is what is bounded: a step that took more than FOLLOW_STEP_SECONDS of CPU halves the
    next, one that took under half of it (and applied all it was asked for) doubles it, within 1 and
    FOLLOW_STEP_MOST records. Here each step's CPU is what ``catch_up`` says it costs."""
    clock = [0.0]
    monkeypatch.setattr(sharedlog, "thread_time", lambda: clock[0])
    budget = sharedlog.FOLLOW_STEP_SECONDS

    def sizes_for(fixed: float, per_record: float, records: int) -> list[int]:
        calls, done, backlog = [], threading.Event(), [records]

        def catch_up(most: int) -> int:
            calls.append(most)
            applied = min(most, backlog[0])
            backlog[0] -= applied
            clock[0] += fixed + per_record * applied
            if not backlog[0]:
                done.set()
            return applied

        follower = Follower(catch_up, lambda: backlog[0], lambda err: None, interval=0.01).start()
        try:
            assert done.wait(5)
        finally:
            follower.stop()
        return calls

    # dear records (0.45 + 0.3 x records of the budget): 8 -> 2.85x, 4 -> 1.65x, 2 -> 1.05x, 1 -> 0.75x: down to 1 and kept
    assert sizes_for(0.45 * budget, 0.3 * budget, 20)[:9] == [FOLLOW_STEP, 4, 2] + [1] * (20 - 14)  # (then maybe one that finds nothing)
    # cheap ones (0.05 + 0.005 x records): 8 -> 0.09x ... 64 -> 0.37x: doubled up to FOLLOW_STEP_MOST and kept there
    most = sharedlog.FOLLOW_STEP_MOST
    assert sizes_for(0.05 * budget, 0.005 * budget, 8 + 16 + 32 + 3 * most)[:6] == [FOLLOW_STEP, 16, 32, most, most, most]


def test_on_a_machine_too_busy_for_the_scout_the_applier_keeps_the_backlog_bounded_by_itself(monkeypatch):
    """Under a burst of writes no core idles, so the idle-priority scout never asks; the applier then
    applies by itself, at nice 10 and FOLLOW_STEP records a step, until the process is FOLLOW_BEHIND_MOST changes behind, and no
    further (store.sharedlog.Follower: a backlog left for later slowed the phase after a burst)."""
    busy = threading.Event()
    monkeypatch.setattr(sharedlog, "run_when_idle", busy.wait)  # the scout never gets a core
    monkeypatch.setattr(sharedlog, "thread_time", lambda: 0.0)  # steps that take no CPU, which would double an asked-for step
    calls, backlog = [], [FOLLOW_BEHIND_MOST + 3 * FOLLOW_STEP + 2]

    def catch_up(most: int) -> int:
        calls.append((most, os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
        applied = min(most, backlog[0])
        backlog[0] -= applied
        return applied

    follower = Follower(catch_up, lambda: backlog[0], lambda err: None, interval=0.01).start()
    try:
        deadline = time.monotonic() + 5
        while backlog[0] > FOLLOW_BEHIND_MOST and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)  # ten more intervals: it stays there
        left, steps = backlog[0], list(calls)
    finally:
        busy.set()
        follower.stop()
    nice = max(BACKGROUND_NICE, os.getpriority(os.PRIO_PROCESS, 0))
    assert steps == [(FOLLOW_STEP, os.SCHED_OTHER, nice)] * 4  # FOLLOW_STEP each: a busy machine's requests wait for any step alike
    assert left == FOLLOW_BEHIND_MOST - FOLLOW_STEP + 2  # four steps took it to the bound, then nothing more


def test_a_follower_that_fails_to_apply_says_so_once_and_both_its_threads_end():
    failures = []

    def catch_up(most: int) -> int:
        raise LogCorrupt("change 7 does not read back")

    follower = Follower(catch_up, lambda: 1, failures.append, interval=0.01).start()
    deadline = time.monotonic() + 5
    while not failures and time.monotonic() < deadline:
        time.sleep(0.01)
    follower.stop()
    assert [type(f) for f in failures] == [LogCorrupt]
    assert not follower._scout.is_alive() and not follower._applier.is_alive()
