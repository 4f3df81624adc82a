"""One modality's log, appended to by every worker process of a collection version.

With ``AVSEARCH_WORKERS`` > 1 each worker logs its own writes: no round trip to another process
stands between a write and its answer. The log itself is how a change reaches the other processes.

Appending. An appender holds the modality's append lock: ``flock`` on ``<wal>/append.lock``,
through a descriptor each process opens for itself (a forked copy of another's would share its
lock), released by the kernel when its holder dies. (Not a POSIX record lock: those belong to a
process, and the kernel's deadlock check then refuses a worker whose other thread holds the
other modality's lock while the primary, pausing both, waits for it.) Under the lock the appender:
1. reads where the log ends, from memory shared by every process of the version (:class:`LogState`:
   the last LSN, the first LSN of the current segment, the byte where its last whole record ends);
2. cuts off anything past that end: the torn tail of an appender killed while writing, which never
   answered;
3. applies what the other processes appended since it last looked (:class:`LogTail` reads it from
   the segment files), so that a delete is checked against the log's state;
4. appends its group and publishes the new end, the LSN last.
It lets go, fsyncs, applies its group, and answers. The fsync comes after the lock so that the
processes' fsyncs overlap (one disk flush can cover several groups) rather than queue behind one
another; a group is answered only after its fsync, but another process may serve it before.

Reading. Before each read a process compares the published LSN with the one it applied and applies
the records in between from the files. So a change acknowledged by any worker is seen by every read
that starts after its answer, on any worker. A background :class:`Follower` keeps each process close
behind, so a read rarely finds much to apply.

The primary appends nothing. It follows the log (its indexes are the image the next worker is forked
from and the checkpoints are written from). Holding the append lock, it rotates segments for
checkpoints, forks workers, and takes snapshots. It also closes the gate for a version swap
(``gate``): ``SEALED``, the version being swapped out refuses changes (503: retry);
``WAITING``, the new version's workers hold their changes until the old workers have left.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import queue
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from time import thread_time

from store.changes import Change
from store.layout import APPEND_LOCK_NAME, segment_name
from store.priority import run_in_background, run_when_idle
from store.wal import FRAME, LogCorrupt, decode

log = logging.getLogger(__name__)
SLOT = struct.Struct("<q")
FIELDS = ("lsn", "segment", "end", "gate")
OPEN, SEALED, WAITING = 0, 1, 2  # the gate's states
FOLLOW_EVERY_S = 0.5
FOLLOW_STEP = 8  # records a modality a step applies when no core idles, and the first step the scout asks for
FOLLOW_STEP_MOST = 64  # records a modality in one step the scout asks for, at most
FOLLOW_STEP_SECONDS = 0.0002  # CPU a step the scout asks for aims at: one longer halves the next, one under half of it doubles it
FOLLOW_BEHIND_MOST = 256  # changes a process may lag behind the log while the machine is too busy to catch up at idle priority
NOT_READING = 2**63 - 1


@dataclass(frozen=True)
class Position:
    """A place in the log: after change ``lsn``, at byte ``end`` of the segment that starts at ``segment``."""

    lsn: int
    segment: int
    end: int


class LogState:
    """Per modality, where the log ends, whether it takes changes, and how far each worker slot has
    read it, in an anonymous shared mapping made before the forks. Aligned 8-byte stores are atomic
    on the platforms this runs on. Only the holder of a modality's append lock writes its end, and
    it writes the LSN last, so a process that reads an LSN without the lock finds every record
    through it whole in the files. A checkpoint deletes only segments every slot has read."""

    def __init__(self, modalities: tuple[str, ...] | list[str], slots: int = 0):
        self.slots = slots
        width = len(FIELDS) + slots
        self._base = {m: i * width * SLOT.size for i, m in enumerate(modalities)}
        self._memory = mmap.mmap(-1, SLOT.size * width * len(self._base))
        for modality in self._base:
            for slot in range(slots):
                self.set_read(modality, slot, NOT_READING)

    def get(self, modality: str, field: str) -> int:
        return SLOT.unpack_from(self._memory, self._base[modality] + FIELDS.index(field) * SLOT.size)[0]

    def set(self, modality: str, field: str, value: int) -> None:
        SLOT.pack_into(self._memory, self._base[modality] + FIELDS.index(field) * SLOT.size, value)

    def end(self, modality: str) -> Position:
        return Position(self.get(modality, "lsn"), self.get(modality, "segment"), self.get(modality, "end"))

    def publish(self, modality: str, position: Position) -> None:
        self.set(modality, "segment", position.segment)
        self.set(modality, "end", position.end)
        self.set(modality, "lsn", position.lsn)

    def set_read(self, modality: str, slot: int, lsn: int) -> None:
        """Worker slot ``slot`` has read the log through ``lsn`` (NOT_READING: no worker in it)."""
        SLOT.pack_into(self._memory, self._base[modality] + (len(FIELDS) + slot) * SLOT.size, lsn)

    def slowest(self, modality: str) -> int:
        """The last LSN every worker slot has read (NOT_READING with none)."""
        base = self._base[modality] + len(FIELDS) * SLOT.size
        return min((SLOT.unpack_from(self._memory, base + i * SLOT.size)[0] for i in range(self.slots)), default=NOT_READING)


class AppendLock:
    """The append lock of one modality's log directory, for this process (see the module's docstring)."""

    def __init__(self, directory: Path):
        self.path = Path(directory) / APPEND_LOCK_NAME
        self._fd: int | None = None
        self._pid = 0

    @contextmanager
    def held(self) -> Iterator[None]:
        if self._pid != os.getpid():  # a forked copy opens its own: an inherited descriptor shares the parent's lock
            self._fd, self._pid = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666), os.getpid()
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd, self._pid = None, 0


class LogTail:
    """Where this process has read a modality's log to, and the records after it."""

    def __init__(self, directory: Path, position: Position):
        self.directory = Path(directory)
        self.position = position
        self._fd: int | None = None
        self._open_segment: int | None = None

    def read_through(self, lsn: int) -> list[Change]:
        """The records after this position through ``lsn`` (all published: whole in the files), in order."""
        records = []
        while self.position.lsn < lsn:
            record, end = self._read_at(self.position)
            if record is None:  # this segment ends here; a checkpoint started the next at the next LSN
                following = self.position.lsn + 1
                if following == self.position.segment or not (self.directory / segment_name(following)).exists():
                    raise LogCorrupt(f"{self.directory}: change {following} is published but no segment holds it (a checkpoint deleted one this process had not read?)")
                self.position = Position(self.position.lsn, following, 0)
                continue
            if record.lsn != self.position.lsn + 1:
                raise LogCorrupt(f"{self.directory / segment_name(self.position.segment)}: record at byte {self.position.end} has LSN {record.lsn}, expected {self.position.lsn + 1}")
            records.append(record)
            self.position = Position(record.lsn, self.position.segment, end)
        return records

    def open(self) -> None:
        """Hold this position's segment open: a checkpoint that deletes it then leaves it readable here."""
        if self._open_segment != self.position.segment:
            self.close()
            try:
                self._fd = os.open(self.directory / segment_name(self.position.segment), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:  # deleted by a checkpoint: fine if it holds nothing after this position (then the next one starts at the next LSN)
                return
            self._open_segment = self.position.segment

    def _read_at(self, position: Position) -> tuple[Change | None, int]:
        self.open()
        if self._fd is None:
            return None, position.end
        head = os.pread(self._fd, FRAME.size, position.end)
        if len(head) < FRAME.size:
            return None, position.end
        length, checksum = FRAME.unpack(head)
        payload = os.pread(self._fd, length, position.end + FRAME.size)
        if len(payload) != length or zlib.crc32(payload) != checksum:
            raise LogCorrupt(f"{self.directory / segment_name(position.segment)}: the published record at byte {position.end} does not read back")
        return decode(payload), position.end + FRAME.size + length

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd, self._open_segment = None, None


class SharedLog:
    """One process's handle on a modality's log that the version's processes share."""

    def __init__(self, state: LogState, modality: str, directory: Path, position: Position, slot: int | None = None):
        self.state, self.modality, self.slot = state, modality, slot  # slot None: the primary
        self.lock = AppendLock(directory)
        self.tail = LogTail(directory, position)
        self.applying = threading.Lock()  # one apply at a time in this process, in log order

    def read_through(self, lsn: int) -> list[Change]:
        """The records after this process's position through ``lsn``; its slot says how far it read."""
        records = self.tail.read_through(lsn)
        self.moved_to(self.tail.position)
        return records

    def moved_to(self, position: Position) -> None:
        self.tail.position = position
        if self.slot is not None:
            self.state.set_read(self.modality, self.slot, position.lsn)

    @property
    def lsn(self) -> int:
        """The last change published by any process."""
        return self.state.get(self.modality, "lsn")

    @property
    def gate(self) -> int:
        return self.state.get(self.modality, "gate")

    def close(self) -> None:
        self.lock.close()
        self.tail.close()


class Follower:
    """Applies, in the background, what the other processes appended, so that a read or the next
    checkpoint finds little left to apply; ``on_failure`` when applying fails.

    Every process applies every change, so on a busy machine the foreground (the answer to a write,
    a search) goes first; yet whoever applies holds this process's apply lock, which a read, a
    commit and a checkpoint's catch-up wait for, so it must never be starved while it holds it
    (measured, 10^6 HNSW32, 2 workers under 16 writing clients: a checkpoint's catch-up waited
    2.4 s for 0.46 s of work while an idle-priority follower sat on the lock). Hence two threads: a
    scout that runs only when a core would otherwise idle (:func:`store.priority.run_when_idle`),
    every ``interval`` seconds and then step after step while there is more, and an applier at nice
    10 (:func:`store.priority.run_in_background`: it yields to a waking request, yet a lock it holds
    is soon released) that applies one step of records when the scout asks.
    A busy machine stops the scout, so the applier stops after its step, never inside one. When
    the scout has not asked for ``interval`` seconds and this process is more than
    ``FOLLOW_BEHIND_MOST`` changes behind (the machine is busy with writes), the applier goes on by
    itself, at nice 10, down to that many. A read never misses a change for either: it applies what
    is still missing itself.

    Measured on 2 cores at 10^6 items (bench/write_workers_ab.py). One client upserting through 2
    workers at HNSW32, p99 between checkpoints: 4.3 ms with the applier at nice 10, 5.7-6.0 ms at
    nice 0, 4.2 ms with a single follower at SCHED_IDLE (one worker: 3.0-3.4 ms); a follower that
    applied everything at nice 10, unasked, raised one client's Flat upsert p99 to 1.81x one
    worker's. Without the bound on the backlog, the other processes ended a burst of 16 writing
    clients 6,000-8,300 changes behind and applied them afterwards: in the next checkpoint's
    catch-up (0.5-0.8 s of CPU at normal priority), on their next read, and during the one-client
    phase after the burst, whose p99 that raised to 1.15-1.34x one worker's.

    A step the scout asks for is bounded by its CPU time, not a count: the scout asks while a core
    idles, so a request's thread that wakes may find the applier on the core it wants and wait for
    up to the rest of the step. So such a step stays near ``FOLLOW_STEP_SECONDS`` (one longer halves
    the next, one under half of it doubles it, from 1 to ``FOLLOW_STEP_MOST`` records a modality).
    At 10^6 items a step costs ~0.04 ms plus ~0.02 ms a record at Flat (~0.1 ms plus ~0.03 ms before
    the item table's scalar paths, 9e37144), ~0.1 ms plus ~0.15 ms an upsert at HNSW32
    (bench/follow_step.py): 8 records made a step of 0.2 ms (0.3 before) at Flat and 1.4 ms at
    HNSW32. Shorter steps cost more CPU a change, yet in a model of a lone client beside two such
    followers (bench/step_length.py) its p99 followed the step's length: 1-4 Flat-like records a
    step level with no followers, 8 1.09x, 16 1.23x; one HNSW32-like record 1.15x, 8 1.81x. When no
    core idles, any step delays requests alike, so the applier then goes on with ``FOLLOW_STEP``
    records a step, the cheaper a change.
    """

    def __init__(self, catch_up: Callable[[int], int], behind: Callable[[], int], on_failure: Callable[[BaseException], None], interval: float = FOLLOW_EVERY_S):
        self._catch_up, self._behind, self._on_failure, self.interval = catch_up, behind, on_failure, interval  # catch_up(most) -> records applied; behind() -> records not applied
        self._stop = threading.Event()
        self._asks: queue.SimpleQueue = queue.SimpleQueue()  # True: apply one step; None: stop
        self._answers: queue.SimpleQueue = queue.SimpleQueue()  # records applied; None: the applier has stopped
        self.step = FOLLOW_STEP  # records a modality the next step applies (only the applier changes it)
        self._scout = threading.Thread(target=self._look, name="avsearch-follow", daemon=True)
        self._applier = threading.Thread(target=self._apply, name="avsearch-apply", daemon=True)

    def start(self) -> "Follower":
        self._applier.start()
        self._scout.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._asks.put(None)
        for thread in (self._scout, self._applier):
            if thread.is_alive() and thread is not threading.current_thread():
                thread.join()

    def _look(self) -> None:
        run_when_idle()
        while not self._stop.wait(self.interval):
            applied = 1
            while applied and not self._stop.is_set():  # steps while there is more and a core to spare (this thread runs only then)
                self._asks.put(True)
                applied = self._answers.get()
                if applied is None:
                    return

    def _apply(self) -> None:
        run_in_background()
        while True:
            try:
                ask = self._asks.get(timeout=self.interval)
            except queue.Empty:  # no step asked for: the machine is busy
                ask = False
            if ask is None:
                break
            try:
                if ask:
                    self._answers.put(self._step())
                    continue
                while not self._stop.is_set() and self._behind() > FOLLOW_BEHIND_MOST and self._catch_up(FOLLOW_STEP):
                    pass
            except BaseException as err:  # this process no longer matches the log
                log.critical("applying what other processes logged failed (%s)", err)
                self._on_failure(err)
                break
        self._answers.put(None)

    def _step(self) -> int:
        """Apply one step; the next one's size follows this one's CPU time (the thread's own: time
        it spent preempted does not count)."""
        started = thread_time()
        applied = self._catch_up(self.step)
        spent = thread_time() - started
        if applied >= self.step and spent < FOLLOW_STEP_SECONDS / 2:  # a full step, and a short one: more next time
            self.step = min(FOLLOW_STEP_MOST, 2 * self.step)
        elif applied and spent > FOLLOW_STEP_SECONDS:
            self.step = max(1, self.step // 2)
        return applied
