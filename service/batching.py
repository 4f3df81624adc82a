"""Micro-batching: concurrent search and embed requests share one encoder call and one index search.

Requests queue up on the event loop; one worker takes everything queued (up to ``max_batch``
vectors) and runs it in one thread call. While a batch runs the next one gathers, so batches grow
with load. When the previous batch held several requests (clients are concurrent), the worker
first waits ``window_s`` for more; a lone client never waits.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from store.collection import EmbedJob, Engine, SearchJob

log = logging.getLogger(__name__)
Job = SearchJob | EmbedJob


class MicroBatcher:
    def __init__(self, window_s: float, max_batch: int, on_batch: Callable[[int, int], None] | None = None):
        self.window_s = window_s
        self.max_batch = max_batch
        self.on_batch = on_batch  # (vectors, requests) of each batch, for the metrics
        self._pending: deque[tuple[Engine, Job, asyncio.Future]] = deque()
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="avsearch-batch")
        self._task: asyncio.Task | None = None
        self._last_requests = 0  # requests in the previous batch

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="avsearch-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        while self._pending:
            _, _, future = self._pending.popleft()
            if not future.done():
                future.set_exception(RuntimeError("the service is shutting down"))
        self._executor.shutdown(wait=True)

    async def submit(self, engine: Engine, job: Job) -> object:
        """The job's result (search: JSON bytes; embed: (B, E) array); its exception is raised here."""
        future = asyncio.get_running_loop().create_future()
        self._pending.append((engine, job, future))
        self._wakeup.set()
        result = await future
        if isinstance(result, Exception):
            raise result
        return result

    def _take(self) -> list[tuple[Engine, Job, asyncio.Future]]:
        batch, vectors = [], 0
        while self._pending and (not batch or vectors + self._pending[0][1].size <= self.max_batch):
            entry = self._pending.popleft()
            batch.append(entry)
            vectors += entry[1].size
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            # Wait for company only while requests arrive concurrently: a lone client pays no window.
            if self.window_s > 0 and self._last_requests > 1 and sum(job.size for _, job, _ in self._pending) < self.max_batch:
                await asyncio.sleep(self.window_s)
            batch = self._take()
            self._last_requests = len(batch)
            by_engine: dict[int, list[tuple[Engine, Job, asyncio.Future]]] = {}
            for entry in batch:  # during a version swap both versions may be queued
                by_engine.setdefault(id(entry[0]), []).append(entry)
            for entries in by_engine.values():
                engine, jobs = entries[0][0], [job for _, job, _ in entries]
                if self.on_batch is not None:
                    self.on_batch(sum(job.size for job in jobs), len(jobs))
                results = await self._run_batch(loop, engine, jobs)
                for (_, _, future), result in zip(entries, results):
                    if not future.done():  # the client may have gone
                        future.set_result(result)

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, engine: Engine, jobs: list[Job]) -> list[object]:
        """Results aligned with ``jobs``. When the batch call itself fails (a bug, not bad input: routes
        check input first), each job runs again alone, so only the one that fails gets the error."""
        try:
            return await loop.run_in_executor(self._executor, engine.run_batch, jobs)
        except Exception as err:
            if len(jobs) == 1:
                log.exception("a batch of one request failed")
                return [err]
            log.warning("a batch of %d requests failed (%s: %s); running them one by one", len(jobs), type(err).__name__, err)
        return [(await self._run_batch(loop, engine, [job]))[0] for job in jobs]

