"""One collection served by several processes: the primary owns the store, workers hold forked replicas.

The primary loads the collection, then forks the workers: each starts from the primary's image of
the indexes, shared copy-on-write (a page is copied only when one side writes it). Only the primary
writes the log. A worker sends each change to the primary (:meth:`Replica.submit`); the primary
commits it (group commit, fsync), publishes the group's last LSN in shared memory, answers, and
then sends the logged changes down every worker's channel (:meth:`Hub.flush`) and applies them to
its own indexes: the answer waits for neither, so on a small machine the workers' applies do not
hold it up. A worker applies changes in the order they arrive; before each read it compares the LSN
it applied with the published one and waits for the changes still in flight (:meth:`Replica.catch_up`).
So a change acknowledged to any client is seen by every read that starts afterwards, on any worker.
Checkpoints, snapshot files and version swaps run in the primary only.

Fork pitfalls, each tested (tests/service/test_workers.py):
- GNU OpenMP is not fork-safe: a child hangs in its first parallel region when the parent ran one
  with more than one thread in the forking thread. The primary therefore keeps that thread at one
  OpenMP thread (it only loads and applies changes); in a worker, the threads that search set
  theirs (service.threads).
- ONNX Runtime's thread pools do not survive a fork: sessions with one intra-op thread (no pool)
  are shared; others are opened by each worker after the fork (service.workers).
- Locks held by the primary's other threads stay held in the child: a worker builds its own locks
  and never touches the primary's log, checkpointer or threads. Forks happen with every shard's
  commits paused, so the image is exactly at the published LSN.

Messages are pickled: both ends are this program, never a client.
"""

from __future__ import annotations

import itertools
import logging
import mmap
import pickle
import queue
import socket
import struct
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace

from store.changes import Change
from store.errors import ChannelClosed

log = logging.getLogger(__name__)
HEADER = struct.Struct("<Q")
SLOT = struct.Struct("<q")
CATCH_UP_TIMEOUT_S = 30.0  # a worker whose records stop arriving has lost its primary


def encode_message(message: object) -> bytes:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(data)) + data


class Channel:
    """Length-prefixed pickled messages over one end of a socketpair; sends from any thread."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._send_lock = threading.Lock()

    def send(self, message: object) -> None:
        self.send_encoded(encode_message(message))

    def send_encoded(self, frame: bytes) -> None:
        """A message already framed by :func:`encode_message` (one encoding for many channels)."""
        with self._send_lock:
            try:
                self.sock.sendall(frame)
            except OSError as err:
                raise ChannelClosed(str(err)) from None

    def receive(self) -> object:
        (size,) = HEADER.unpack(self._read(HEADER.size))
        return pickle.loads(self._read(size))

    def _read(self, size: int) -> bytes:
        buffer = bytearray(size)
        view, got = memoryview(buffer), 0
        while got < size:
            try:
                n = self.sock.recv_into(view[got:])
            except OSError as err:
                raise ChannelClosed(str(err)) from None
            if n == 0:
                raise ChannelClosed("the other end closed the channel")
            got += n
        return bytes(buffer)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class PublishedLSN:
    """The last LSN the primary sent to the workers, per modality, in memory shared with every forked worker
    (an anonymous shared mapping made before the forks; aligned 8-byte stores are atomic on the
    platforms this runs on, and only the primary writes)."""

    def __init__(self, modalities: tuple[str, ...]):
        self.slots = {m: i * SLOT.size for i, m in enumerate(modalities)}
        self._memory = mmap.mmap(-1, SLOT.size * len(modalities))

    def __getitem__(self, modality: str) -> int:
        return SLOT.unpack_from(self._memory, self.slots[modality])[0]

    def __setitem__(self, modality: str, lsn: int) -> None:
        SLOT.pack_into(self._memory, self.slots[modality], lsn)


class RemoteError(RuntimeError):
    """An error the primary raised that does not pickle: its type and message."""


def _sendable(err: Exception) -> Exception:
    """``err`` itself when it survives pickling (the store's errors do), else its description."""
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:
        return RemoteError(f"{type(err).__name__}: {err}")


# --- the primary's side ----------------------------------------------------------------------
class Hub:
    """The primary's end of every worker's channel: answers calls, sends logged changes to all."""

    def __init__(self, published: PublishedLSN, handlers: dict[str, Callable[..., object]]):
        self.published = published
        self.handlers = handlers
        self.channels: dict[int, Channel] = {}  # worker pid -> its channel
        self._lock = threading.Lock()
        self._outbox: list[tuple] = []  # logged changes not yet sent to the workers (Hub.logged)
        self._sending = threading.Lock()
        self._calls = ThreadPoolExecutor(64, thread_name_prefix="avsearch-primary")  # concurrent commits group into one fsync

    def attach(self, pid: int, channel: Channel) -> None:
        with self._lock:
            self.channels[pid] = channel
        threading.Thread(target=self._serve, args=(pid, channel), name=f"avsearch-channel-{pid}", daemon=True).start()

    def detach(self, pid: int) -> None:
        with self._lock:
            channel = self.channels.pop(pid, None)
        if channel is not None:
            channel.close()

    def send(self, pid: int, message: tuple) -> None:
        """One worker's message (a gone worker's is dropped: the supervisor sees it exit)."""
        with self._lock:
            channel = self.channels.get(pid)
        if channel is not None:
            try:
                channel.send(message)
            except ChannelClosed:
                self.detach(pid)

    def logged(self, modality: str, changes: list[Change]) -> None:
        """Changes just logged, before any writer is answered: publish their LSN now and queue them
        for every worker, to be sent by :meth:`flush` once the writers are answered. A read that
        starts after an answer sees the new LSN and waits for the changes to arrive
        (:meth:`Replica.catch_up`). Raw features stay here."""
        message = ("apply", modality, [replace(c, features=None) for c in changes], changes[-1].lsn)
        with self._lock:
            self._outbox.append(message)
        self.published[modality] = changes[-1].lsn

    def flush(self) -> None:
        """Send the queued changes to every worker, in log order (one sender at a time)."""
        with self._sending:
            with self._lock:
                messages, self._outbox = self._outbox, []
                channels = list(self.channels.items())
            for frame in map(encode_message, messages):
                for pid, channel in list(channels):
                    try:
                        channel.send_encoded(frame)
                    except ChannelClosed:  # a dead worker: the supervisor replaces it from this image
                        log.warning("worker %d is gone; it no longer receives changes", pid)
                        self.detach(pid)
                        channels.remove((pid, channel))

    def _serve(self, pid: int, channel: Channel) -> None:
        while True:
            try:
                message = channel.receive()
            except ChannelClosed:
                self.detach(pid)
                return
            self._calls.submit(self._answer, channel, *message)

    def _answer(self, channel: Channel, call_id: int, name: str, args: tuple) -> None:
        try:
            reply = ("reply", call_id, True, self.handlers[name](*args))
        except Exception as err:  # the worker raises it again for its caller
            reply = ("reply", call_id, False, _sendable(err))
        try:
            channel.send(reply)
        except ChannelClosed:
            pass
        finally:
            self.flush()  # the changes a commit logged reach the workers after its answer, which waits for none of them

    def close(self) -> None:
        for pid in list(self.channels):
            self.detach(pid)
        self._calls.shutdown(wait=False, cancel_futures=True)


# --- a worker's side -------------------------------------------------------------------------
class Replica:
    """A worker's end: calls the primary, and applies the records it sends to the forked indexes."""

    def __init__(self, channel: Channel, published: PublishedLSN, applied: dict[str, int], apply: Callable[[str, list[Change]], None]):
        self.channel, self.published = channel, published
        self.applied = dict(applied)  # the LSN of the image at the fork, then of each change applied
        self._apply = apply
        self._cond = threading.Condition()
        self._calls: dict[int, Future] = {}
        self._to_apply: queue.SimpleQueue = queue.SimpleQueue()  # changes read, in log order (replies do not wait behind them)
        self._ids = itertools.count()
        self.closed: str | None = None
        self.on_close: Callable[[], None] = lambda: None
        self.on_retire: Callable[[], None] = lambda: None  # the primary swapped versions: take no more requests

    def start(self) -> None:
        """Start applying what the primary sends (records wait in the channel until then)."""
        threading.Thread(target=self._read, name="avsearch-replica", daemon=True).start()
        threading.Thread(target=self._apply_sent, name="avsearch-replica-apply", daemon=True).start()

    def call(self, name: str, *args: object) -> object:
        """Run ``name`` in the primary and return its result, or raise its error."""
        return self.submit(name, *args).result()

    def submit(self, name: str, *args: object) -> Future:
        """``call`` without waiting: the future of its result."""
        future: Future = Future()
        call_id = next(self._ids)
        with self._cond:
            if self.closed:
                raise ChannelClosed(self.closed)
            self._calls[call_id] = future
        self.channel.send((call_id, name, args))
        return future

    def catch_up(self) -> None:
        """Wait until every change the primary had applied when this was called is applied here."""
        for modality, applied in self.applied.items():
            target = self.published[modality]
            if applied >= target:
                continue
            with self._cond:
                if not self._cond.wait_for(lambda: self.applied[modality] >= target or self.closed, CATCH_UP_TIMEOUT_S) or self.closed:
                    raise ChannelClosed(f"the primary process did not send {modality} change {target} ({self.closed or 'timed out'})")

    def _read(self) -> None:
        try:
            while True:
                message = self.channel.receive()
                if message[0] == "apply":
                    self._to_apply.put(message[1:])
                elif message[0] == "retire":
                    self.on_retire()
                else:
                    _, call_id, ok, payload = message
                    with self._cond:
                        future = self._calls.pop(call_id)
                    if ok:
                        future.set_result(payload)
                    else:
                        future.set_exception(payload)
        except ChannelClosed as err:
            self._close(f"the primary process is gone ({err})")
        except BaseException as err:  # a message this worker cannot take: it no longer follows the log
            log.critical("a worker could not read a message from the primary (%s); it stops", err)
            self._close(f"this worker could not read a message ({err})")
        finally:
            self._to_apply.put(None)

    def _apply_sent(self) -> None:
        """Apply the changes the primary sent, in order; a read waits for them in :meth:`catch_up`."""
        while (sent := self._to_apply.get()) is not None:
            modality, changes, last_lsn = sent
            try:
                self._apply(modality, changes)
            except BaseException as err:  # this worker no longer matches the log
                log.critical("a worker could not apply a change from the primary (%s); it stops", err)
                self._close(f"this worker could not apply a change ({err})")
                return
            with self._cond:
                self.applied[modality] = last_lsn
                self._cond.notify_all()

    def _close(self, reason: str) -> None:
        with self._cond:
            self.closed = reason
            pending, self._calls = self._calls, {}
            self._cond.notify_all()
        for future in pending.values():
            future.set_exception(ChannelClosed(reason))
        self.on_close()


class RemoteShard:
    """A worker's stand-in for one modality's :class:`~store.shard.Shard`: the same index (forked),
    commits made by the primary."""

    def __init__(self, modality: str, index, replica: Replica | None, model: str):
        self.modality, self.index, self.replica, self.model = modality, index, replica, model

    def begin_commit(self, change: Change) -> Future:
        """The future of :meth:`commit`: sent to the primary, not waited for."""
        return self.replica.submit("commit", self.modality, self.model, change)

    def commit(self, change: Change) -> int:
        """The index size once the primary logged and applied it (this worker applies it meanwhile: a
        read here waits for that in :meth:`Replica.catch_up`)."""
        return self.begin_commit(change).result()

    def log_bytes(self) -> int:
        return self.replica.call("log_bytes")[self.modality]

    def report_to(self, events) -> None:
        """The primary reports the commits."""

    def close(self) -> None:
        """The primary owns the log."""
