"""Forking a worker from a process that serves requests itself (the primary, :mod:`service.workers`).

A forked child has one thread: the one that forked. Whatever another thread held at that moment
stays held in the child for good: a lock inside an ONNX Runtime or FAISS call, a metric's lock,
a buffer half-written. So the primary forks only with its own requests held off
(:class:`Quiescence`), and the child closes its copies of the primary's client connections
(:func:`close_client_connections`).
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager

HOLD_POLL_S = 0.001  # how often a hold looks whether the requests under way have finished


class Quiescence:
    """An ASGI app whose requests another thread can hold off (:meth:`held`): while it holds, no
    request of the app is under way (bar those waiting on this process's own work, which may be
    what holds), none starts, and the event loop's thread is parked."""

    def __init__(self, app):
        self.app = app
        self.loop: asyncio.AbstractEventLoop | None = None  # the server's, once it starts
        self._open: asyncio.Event | None = None
        self._in_flight = 0
        self._waiting_on_process = 0  # a swap or a snapshot file through this app: the work it waits for may fork

    def started(self) -> None:
        """In the event loop, before the server takes connections."""
        self._open = asyncio.Event()
        self._open.set()
        self.loop = asyncio.get_running_loop()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or self._open is None:
            await self.app(scope, receive, send)
            return
        while not self._open.is_set():
            await self._open.wait()
        self._in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self._in_flight -= 1

    @contextmanager
    def waiting_on_process(self) -> Iterator[None]:
        """In the event loop: the request is waiting for this process's own work; a hold does not wait for it."""
        self._waiting_on_process += 1
        try:
            yield
        finally:
            self._waiting_on_process -= 1

    @contextmanager
    def held(self) -> Iterator[None]:
        """From a thread other than the event loop's: the block runs with the requests held off.
        A server not started, or stopped, runs nothing in its loop: the block runs at once."""
        loop = self.loop
        if loop is None or not loop.is_running():
            yield
            return
        parked, resume = threading.Event(), threading.Event()

        async def hold() -> None:
            self._open.clear()
            try:
                while self._in_flight > self._waiting_on_process:
                    await asyncio.sleep(HOLD_POLL_S)
                parked.set()
                resume.wait()  # the loop's thread waits here: nothing else of the app runs
            finally:
                self._open.set()

        coroutine = hold()
        try:
            future = asyncio.run_coroutine_threadsafe(coroutine, loop)
        except RuntimeError:  # closed meanwhile
            coroutine.close()
            future = None
        while future is not None and not parked.wait(0.05):
            if future.done() or not loop.is_running():  # stopped meanwhile
                break
        try:
            yield
        finally:
            resume.set()


def close_client_connections(port: int) -> None:
    """In a child forked from a serving process: close its copies of the parent's client
    connections (TCP sockets on the server's ``port`` that do not listen). Held open here, a
    connection the parent closes would stay open, for its client, until this child exits."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            sock = socket.socket(fileno=fd)
        except OSError:  # the listing's own descriptor, closed by now
            continue
        try:
            client = (
                sock.family in (socket.AF_INET, socket.AF_INET6)
                and sock.type == socket.SOCK_STREAM
                and not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                and sock.getsockname()[1] == port
            )
        except OSError:
            client = False
        if client:
            sock.close()
        else:
            sock.detach()
