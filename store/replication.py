"""The worker processes' link to their primary: calls over a socketpair, and a retirement notice.

The primary loads the collection, then forks the workers (and serves requests itself): each starts
from the primary's image of the indexes, shared copy-on-write (a page is copied only when one side
writes it). Writes never go
through here: every process appends to the one log itself (:mod:`store.sharedlog`). A worker calls
the primary for what only it does (a version swap, a snapshot file, parsing a large body in its
parser processes, saying it has retired), and the primary tells a worker to retire.

Fork pitfalls, each tested (tests/service/test_workers.py):
- GNU OpenMP is not fork-safe: a child hangs in its first parallel region when the parent ran one
  with more than one thread in the forking thread. The primary therefore keeps that thread at one
  OpenMP thread (it only loads and applies changes); in a worker, the threads that search set
  theirs (service.threads).
- ONNX Runtime's thread pools do not survive a fork: sessions with one intra-op thread (no pool)
  are shared; others are opened by each worker after the fork (service.workers).
- Locks held by the primary's other threads stay held in the child: a worker builds its own locks
  and never touches the primary's log handles, checkpointer or threads, and the primary forks with
  its own requests held off (service.forking). Forks happen with every shard's commits paused in
  every process, so the image is exactly at the log's end.

Messages are pickled: both ends are this program, never a client.
"""

from __future__ import annotations

import itertools
import logging
import pickle
import socket
import struct
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from store.errors import ChannelClosed

log = logging.getLogger(__name__)
HEADER = struct.Struct("<Q")


class Channel:
    """Length-prefixed pickled messages over one end of a socketpair; sends from any thread."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._send_lock = threading.Lock()

    def send(self, message: object) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        with self._send_lock:
            try:
                self.sock.sendall(HEADER.pack(len(data)) + data)
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
    """The primary's end of every worker's channel: answers calls, sends a worker a message."""

    def __init__(self, handlers: dict[str, Callable[..., object]]):
        self.handlers = handlers
        self.channels: dict[int, Channel] = {}  # worker pid -> its channel
        self._lock = threading.Lock()
        self._calls = ThreadPoolExecutor(64, thread_name_prefix="avsearch-primary")  # a swap waits for the old workers' "retired" calls: never all threads busy

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

    def close(self) -> None:
        for pid in list(self.channels):
            self.detach(pid)
        self._calls.shutdown(wait=False, cancel_futures=True)


# --- a worker's side -------------------------------------------------------------------------
class Replica:
    """A worker's end: calls the primary, and hears when to retire."""

    def __init__(self, channel: Channel):
        self.channel = channel
        self._cond = threading.Condition()
        self._calls: dict[int, Future] = {}
        self._ids = itertools.count()
        self.closed: str | None = None
        self.on_close: Callable[[], None] = lambda: None
        self.on_retire: Callable[[], None] = lambda: None  # the primary swapped versions: take no more requests

    def start(self) -> None:
        threading.Thread(target=self._read, name="avsearch-replica", daemon=True).start()

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

    def _read(self) -> None:
        try:
            while True:
                message = self.channel.receive()
                if message[0] == "retire":
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

    def _close(self, reason: str) -> None:
        with self._cond:
            self.closed = reason
            pending, self._calls = self._calls, {}
            self._cond.notify_all()
        for future in pending.values():
            future.set_exception(ChannelClosed(reason))
        self.on_close()
