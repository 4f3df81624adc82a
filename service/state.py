"""What the running app holds: settings, the served version (a store Collection) and its paths, the batcher, metrics; and the swap."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import HTTPException, Request

from service.batching import MicroBatcher
from service.metrics import Metrics
from service.settings import Settings
from service.threads import search_thread_setup
from store.collection import Collection
from store.served import check_not_moved
from store.versions import load_next

log = logging.getLogger(__name__)


class SwapGate:
    """Mutations pass side by side; a version swap waits for them to finish and holds new ones back.

    Without it an upsert applied to the old version after the new one was read from disk would be
    acknowledged and then lost.
    """

    def __init__(self) -> None:
        self._cond = asyncio.Condition()
        self._active = 0
        self._closed = False

    @asynccontextmanager
    async def mutation(self) -> AsyncIterator[None]:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._closed)
            self._active += 1
        try:
            yield
        finally:
            async with self._cond:
                self._active -= 1
                self._cond.notify_all()

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._closed)
            self._closed = True
            await self._cond.wait_for(lambda: self._active == 0)
        try:
            yield
        finally:
            async with self._cond:
                self._closed = False
                self._cond.notify_all()


class ServiceState:
    def __init__(self, settings: Settings, collection: Collection | None = None):
        self.settings = settings
        self.collection = collection
        # What a reload without paths (SIGHUP, the console) loads: the configured paths until a
        # reload names others (store.served makes the configured index path follow, or notes it).
        self.model_dir, self.index_dir = Path(settings.model_dir), Path(settings.index_dir)
        self.load_error: str | None = None
        self.gate = SwapGate()
        self.metrics = Metrics(lambda: self.collection.sizes() if self.collection is not None else {}, lambda: self.collection.log_bytes() if self.collection is not None else {})
        if collection is not None:
            collection.report_to(self.metrics)
        self.batcher: MicroBatcher | None = None

    async def close_collection(self) -> None:
        """At shutdown: the log holds every acknowledged change, and the next start replays it.
        Forgotten, so a lifespan started again loads afresh rather than serving a closed version."""
        if self.collection is not None:
            collection, self.collection = self.collection, None
            await asyncio.to_thread(collection.close)

    def start_batcher(self) -> None:
        self.batcher = MicroBatcher(self.settings.batch_window_ms / 1000, self.settings.max_batch, self.metrics.observe_batch, search_thread_setup(self.settings))
        self.batcher.start()

    def load_collection(self, model_dir: Path | None = None, index_dir: Path | None = None) -> Collection:
        """The named version, or (no paths) the served one: refused when a reload moved it elsewhere."""
        s = self.settings
        if index_dir is None:
            check_not_moved(self.index_dir)
        collection = Collection.load(model_dir or self.model_dir, index_dir or self.index_dir, device=s.device, intra_op_threads=s.intra_op_threads, config=s.store_config())
        collection.report_to(self.metrics)
        return collection

    def ready_collection(self) -> Collection:
        if self.collection is None:
            reason = f"loading failed: {self.load_error}" if self.load_error else "the model and index are still loading"
            raise HTTPException(503, f"not ready: {reason}; retry later (GET /readyz says when)")
        return self.collection

    async def load_in_background(self) -> None:
        # Exclusive, as a swap: a reload meanwhile waits and then replaces (and closes) this collection;
        # without it both would be kept, and the one dropped would go on checkpointing into the same directory.
        async with self.gate.exclusive():
            if self.collection is not None:
                return
            try:
                self.collection = await asyncio.to_thread(self.load_collection)
                log.info("ready: model %s, index sizes %s", self.collection.version, self.collection.sizes())
            except Exception as err:  # ModelError, IndexLoadError, OSError: reported by /readyz
                self.load_error = str(err)
                log.error("cannot load the model or index: %s", err)

    async def take_snapshot(self, directory: Path) -> dict:
        """A snapshot file of both modalities holding every change acknowledged before (its card)."""
        async with self.gate.mutation():  # not across a version swap
            return await asyncio.to_thread(self.ready_collection().snapshot, directory)

    async def swap(self, model_dir: Path | None = None, index_dir: Path | None = None) -> tuple[str, str, dict[str, int]]:
        """Load a version and swap it in: (previous version, new version, its index sizes); raises
        ModelError / IndexLoadError and keeps the current one.

        Searches keep running on the version they started with; item changes wait (SwapGate), so
        none lands in the old version after the new one was read from disk.
        """
        async with self.gate.exclusive():
            current = self.collection  # no change is under way (the gate)
            configured = self.index_dir if index_dir is None else self.settings.index_dir
            collection, served = await asyncio.to_thread(load_next, current, lambda: self.load_collection(model_dir, index_dir), configured)
            self.model_dir, self.index_dir = Path(model_dir or self.model_dir), served
            if current is not None:
                await asyncio.to_thread(current.close)  # its logs: the new version reads and appends them now when it is the same directory
            previous = current.version if current is not None else ""
            self.collection, self.load_error = collection, None
        self.metrics.swaps.inc()
        log.info("swapped in model %s (was %s), index sizes %s", collection.version, previous or "none", collection.sizes())
        return previous, collection.version, collection.sizes()


def get_state(request: Request) -> ServiceState:
    return request.app.state.avsearch
