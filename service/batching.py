"""Micro-batching: concurrent search and embed requests share one encoder call and one index search.

The jobs (a search or an embedding, checked by the route) and how one batch of them runs against a
collection (:func:`run_batch`: one encoder call per modality, one index search per target, the
answers formatted as JSON here) live here too: the store returns arrays, the service formats them.

Requests queue up on the event loop; one worker takes everything queued (up to ``max_batch``
vectors) and runs it in one thread call. While a batch runs the next one gathers, so batches grow
with load. When the previous batch held several requests (clients are concurrent), the worker
first waits ``window_s`` for more; a lone client never waits.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from index.embedder import InputError
from service.encoding import dumps
from store.collection import Collection
from store.errors import ItemNotFound

log = logging.getLogger(__name__)
OTHER = {"audio": "visual", "visual": "audio"}


@dataclass
class SearchJob:
    """One search request: raw ``vectors`` (B, D_in) or stored ``ids``, already checked by the route."""

    modality: str
    target: str
    top_k: int
    vectors: np.ndarray | None = None
    ids: list[str] | None = None
    score_threshold: float | None = None
    filter: dict | None = None

    @property
    def size(self) -> int:
        return len(self.vectors) if self.vectors is not None else len(self.ids or ())


@dataclass
class EmbedJob:
    modality: str
    vectors: np.ndarray  # (B, D_in)

    @property
    def size(self) -> int:
        return len(self.vectors)


Job = SearchJob | EmbedJob


def as_matrix(rows: list[list[float]], modality: str) -> np.ndarray:
    """JSON lists of floats -> (B, D) float32, refusing ragged rows with a readable message."""
    widths = {len(row) for row in rows}
    if len(widths) > 1:
        raise InputError(f"{modality} vectors must all have the same length; got lengths {sorted(widths)[:5]}")
    with np.errstate(over="ignore"):  # 1e39 becomes inf, which validate() then names
        return np.asarray(rows, dtype=np.float32).reshape(len(rows), -1)


def validate(collection: Collection, modality: str, rows: list[list[float]] | np.ndarray) -> np.ndarray:
    """Raw feature vectors checked against the served model's input (width, finite values); InputError."""
    x = rows if isinstance(rows, np.ndarray) else as_matrix(rows, modality)
    return collection.embedder.validate(modality, x)


def run_batch(collection: Collection, jobs: list[Job]) -> list[object]:
    """Results aligned with ``jobs``: JSON bytes for a search, (B, E) array for an embed, or an exception."""
    results: list[object] = [None] * len(jobs)
    queries: dict[int, np.ndarray] = {}
    by_modality: dict[str, list[int]] = defaultdict(list)
    for i, job in enumerate(jobs):
        if job.vectors is not None:
            by_modality[job.modality].append(i)
    embedder = collection.embedder
    for modality, rows in by_modality.items():  # one encoder call per modality
        try:
            embedded = embedder.embed(modality, np.concatenate([jobs[i].vectors for i in rows]))
        except InputError:  # a job whose features overflow the encoder: embed job by job, so it fails alone
            for i in rows:
                try:
                    queries[i] = embedder.embed(modality, jobs[i].vectors)
                except InputError as err:
                    results[i] = err
            continue
        start = 0
        for i in rows:
            queries[i] = embedded[start : start + jobs[i].size]
            start += jobs[i].size
    version = collection.version
    with collection.reading() as view:  # one state of both indexes for the whole batch
        plain: dict[str, list[int]] = defaultdict(list)  # target -> jobs searched together
        for i, job in enumerate(jobs):
            if results[i] is not None:
                continue
            if isinstance(job, EmbedJob):
                results[i] = queries[i]
                continue
            if job.ids is not None:
                try:
                    queries[i] = view.vectors(job.modality, job.ids)
                except ItemNotFound as err:
                    results[i] = err
                    continue
            if job.filter is None:
                plain[job.target].append(i)
            else:  # metadata filter: JSON types must match too, so true does not match 1
                results[i] = _caught(lambda: _format(job, version, *view.search(job.target, queries[i], job.top_k, where=job.filter)))
        for target, rows in plain.items():
            k = max(jobs[i].top_k for i in rows)
            scores, ids, metadata = view.search(target, np.concatenate([queries[i] for i in rows]), k)
            start = 0
            for i in rows:
                stop = start + jobs[i].size
                results[i] = _caught(_format, jobs[i], version, scores[start:stop], ids[start:stop], metadata[start:stop])
                start = stop
    return results


def _format(job: SearchJob, version: str, scores: np.ndarray, ids: list[list[str]], metadata: list[list[dict | None]]) -> bytes:
    threshold = -np.inf if job.score_threshold is None else job.score_threshold
    results = [
        [{"id": item_id, "score": score, "metadata": meta} for item_id, score, meta in zip(row_ids[: job.top_k], row_scores, row_meta) if score >= threshold]
        for row_ids, row_scores, row_meta in zip(ids, scores.tolist(), metadata)
    ]
    return dumps({"results": results, "model": version})


def _caught(function: Callable[..., object], *args: object) -> object:
    """``function(*args)``, or the exception it raised: one job's failure is that job's answer, not its batch's."""
    try:
        return function(*args)
    except Exception as err:
        log.exception("one job of a batch failed")
        return err


class MicroBatcher:
    def __init__(self, window_s: float, max_batch: int, on_batch: Callable[[int, int], None] | None = None, thread_setup: Callable[[], None] | None = None):
        self.window_s = window_s
        self.max_batch = max_batch
        self.on_batch = on_batch  # (vectors, requests) of each batch, for the metrics
        self._pending: deque[tuple[Collection, Job, asyncio.Future]] = deque()
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="avsearch-batch", initializer=thread_setup)  # the searches' thread
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

    async def submit(self, collection: Collection, job: Job) -> object:
        """The job's result (search: JSON bytes; embed: (B, E) array); its exception is raised here."""
        future = asyncio.get_running_loop().create_future()
        self._pending.append((collection, job, future))
        self._wakeup.set()
        result = await future
        if isinstance(result, Exception):
            raise result
        return result

    def _take(self) -> list[tuple[Collection, Job, asyncio.Future]]:
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
            by_collection: dict[int, list[tuple[Collection, Job, asyncio.Future]]] = {}
            for entry in batch:  # during a version swap both versions may be queued
                by_collection.setdefault(id(entry[0]), []).append(entry)
            for entries in by_collection.values():
                collection, jobs = entries[0][0], [job for _, job, _ in entries]
                if self.on_batch is not None:
                    self.on_batch(sum(job.size for job in jobs), len(jobs))
                results = await self._run_batch(loop, collection, jobs)
                for (_, _, future), result in zip(entries, results):
                    if not future.done():  # the client may have gone
                        future.set_result(result)

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, collection: Collection, jobs: list[Job]) -> list[object]:
        """Results aligned with ``jobs``. When the batch call itself fails (a bug, not bad input: routes
        check input first), each job runs again alone, so only the one that fails gets the error."""
        try:
            return await loop.run_in_executor(self._executor, run_batch, collection, jobs)
        except Exception as err:
            if len(jobs) == 1:
                log.exception("a batch of one request failed")
                return [err]
            log.warning("a batch of %d requests failed (%s: %s); running them one by one", len(jobs), type(err).__name__, err)
        return [(await self._run_batch(loop, collection, [job]))[0] for job in jobs]

