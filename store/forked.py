"""A checkpoint written by a forked child from its copy-on-write image of the index.

A checkpoint needs the index as it is at one log position while commits go on. Copying it in
memory (:meth:`VectorIndex.frozen`) holds commits for as long as the copy takes: 5 s at 10^7
HNSW32 items on a 2-core machine. ``fork()`` gives a child the same image at once (70-90 ms for a
7 GB process there: only page tables are copied; a page is copied later only if the server writes
to it), so commits wait only for the fork. The child writes the index directory with
:meth:`VectorIndex.save` and exits; the parent waits for it outside the pause and takes the
directory. The child touches nothing but the index, its files and the extra files it is asked
for (a checkpoint's log position and API items, merged from the log here rather than on the
server's GIL); no threads, no OpenMP, no logging. A checkpoint's child runs only when a core would
otherwise idle (requests go first: under a load that keeps every core busy the checkpoint waits,
and the log grows meanwhile), and every child dies with the server (``PR_SET_PDEATHSIG``), so a
killed server leaves only an unfinished directory, which :func:`store.persist.recover` deletes.

Linux only (``fork`` of a threaded process is not safe on macOS); elsewhere, or when the fork
fails (no memory for the page tables), the checkpoint copies in memory.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import select
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from avdata.atomic import atomic_write
from index.store import VectorIndex
from store.priority import run_when_idle

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1
CAN_FORK = sys.platform == "linux" and hasattr(os, "fork")


class ForkedCopy:
    """What ``index.save`` writes, written by a child into ``directory``; :meth:`save` waits for it
    and moves the directory where the caller wants it. Make it while the index cannot change.
    ``idle``: the child runs only when a core would otherwise idle (a checkpoint: nobody waits for it).
    ``extra``: files beside the index ({name: bytes}), made by the child from its image too (a
    checkpoint's log position and API items: merging those took 20-270 ms of the server's GIL per fold)."""

    def __init__(self, index: VectorIndex, directory: Path, timeout: float = 3600.0, idle: bool = False, extra: Callable[[], dict[str, bytes]] | None = None):
        self.directory, self.count, self.timeout = Path(directory), len(index), timeout
        shutil.rmtree(self.directory, ignore_errors=True)
        errors_read, errors_write = os.pipe()
        parent = os.getpid()
        try:
            self.pid = os.fork()  # OSError (ENOMEM): the caller copies in memory instead
        except OSError:
            os.close(errors_read)
            os.close(errors_write)
            raise
        if self.pid == 0:
            os.close(errors_read)
            _write_and_exit(index, self.directory, errors_write, parent, idle, extra)
        os.close(errors_write)
        self._errors = errors_read

    def save(self, directory: Path) -> Path:
        """Wait for the child; then its complete directory becomes ``directory`` (which must not exist)."""
        try:
            message = self._read_errors()  # until the child exits (or hangs past the timeout: stopped, OSError)
            pid, self.pid = self.pid, None  # reaped below: the number may belong to another process after
            code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
            if code != 0:
                reason = message or (f"killed by signal {-code}" if code < 0 else f"exit status {code}")
                raise OSError(f"the snapshot writer (process {pid}) failed: {reason}")
            shutil.move(self.directory, directory)  # a rename; a copy when ``directory`` is on another filesystem
            return Path(directory)
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)

    def _read_errors(self) -> str:
        """What the child reported, read until it closes the pipe by exiting."""
        deadline, chunks = time.monotonic() + self.timeout, []
        with os.fdopen(self._errors, "rb", buffering=0) as errors:
            self._errors = None  # closed by this block: never again by discard()
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not select.select([errors], [], [], remaining)[0]:
                    pid = self.pid
                    self.discard()
                    raise OSError(f"the snapshot writer (process {pid}) did not finish within {self.timeout:g} s; it was stopped")
                chunk = errors.read(4096)
                if not chunk:
                    return b"".join(chunks).decode(errors="replace")
                chunks.append(chunk)

    def discard(self) -> None:
        """Stop the child (when :meth:`save` will not be called) and delete what it wrote."""
        if self.pid is not None:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            self.pid = None
        if self._errors is not None:
            os.close(self._errors)
            self._errors = None
        shutil.rmtree(self.directory, ignore_errors=True)

    def __len__(self) -> int:
        return self.count


def _write_and_exit(index: VectorIndex, directory: Path, errors: int, parent: int, idle: bool, extra: Callable[[], dict[str, bytes]] | None) -> None:
    code = 1
    try:
        gc.disable()  # a collection could close an inherited file object whose descriptor number is reused below
        for number in (signal.SIGTERM, signal.SIGINT):  # the server's handlers only set a flag nobody reads here
            signal.signal(number, signal.SIG_DFL)
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the server died before the line above
            os._exit(1)
        # The server's sockets too: a connection it closes must not stay open in here.
        os.closerange(3, errors)
        os.closerange(errors + 1, os.sysconf("SC_OPEN_MAX"))
        if idle:  # requests go first: with folds every 3 s, a writer at their priority set the p99 of single writes
            run_when_idle()
        index.save(directory)  # every file fsynced; the parent syncs the directory
        for name, blob in (extra() if extra else {}).items():
            atomic_write(directory / name, blob)
        code = 0
    except BaseException as err:  # noqa: BLE001 - reported to the parent, which raises it
        os.write(errors, f"{type(err).__name__}: {err}".encode()[:4000])
    finally:
        os._exit(code)  # no atexit handlers, no buffers flushed twice
