"""What the running app holds: settings, the served version (engine) and its paths, the batcher, metrics; and the swap."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from fastapi import HTTPException, Request

from service.backup import create_snapshot
from service.batching import MicroBatcher
from service.engine import Engine
from service.locks import SwapGate
from service.metrics import Metrics
from service.served import check_not_moved, follow
from service.settings import Settings

log = logging.getLogger(__name__)


class ServiceState:
    def __init__(self, settings: Settings, engine: Engine | None = None):
        self.settings = settings
        self.engine = engine
        # What a reload without paths (SIGHUP, the console) loads: the configured paths until a
        # reload names others (service.served makes the configured index path follow, or notes it).
        self.model_dir, self.index_dir = Path(settings.model_dir), Path(settings.index_dir)
        self.load_error: str | None = None
        self.gate = SwapGate()
        self.metrics = Metrics(lambda: self.engine.sizes() if self.engine is not None else {}, lambda: self.engine.log_bytes() if self.engine is not None else {})
        if engine is not None:
            engine.report_to(self.metrics)
        self.batcher: MicroBatcher | None = None

    def start_batcher(self) -> None:
        self.batcher = MicroBatcher(self.settings.batch_window_ms / 1000, self.settings.max_batch, self.metrics.observe_batch)
        self.batcher.start()

    def load_engine(self, model_dir: Path | None = None, index_dir: Path | None = None) -> Engine:
        """The named version, or (no paths) the served one: refused when a reload moved it elsewhere."""
        s = self.settings
        if index_dir is None:
            check_not_moved(self.index_dir)
        engine = Engine.load(model_dir or self.model_dir, index_dir or self.index_dir, device=s.device, intra_op_threads=s.intra_op_threads, durability=s.durability())
        engine.report_to(self.metrics)
        return engine

    def ready_engine(self) -> Engine:
        if self.engine is None:
            reason = f"loading failed: {self.load_error}" if self.load_error else "the model and index are still loading"
            raise HTTPException(503, f"not ready: {reason}; retry later (GET /readyz says when)")
        return self.engine

    async def load_in_background(self) -> None:
        # Exclusive, as a swap: a reload meanwhile waits and then replaces (and closes) this engine;
        # without it both would be kept, and the one dropped would go on folding into the same directory.
        async with self.gate.exclusive():
            if self.engine is not None:
                return
            try:
                self.engine = await asyncio.to_thread(self.load_engine)
                log.info("ready: model %s, index sizes %s", self.engine.version, self.engine.sizes())
            except Exception as err:  # ModelError, IndexLoadError, OSError: reported by /readyz
                self.load_error = str(err)
                log.error("cannot load the model or index: %s", err)

    async def take_snapshot(self, directory: Path) -> dict:
        """An archive of both modalities holding every change acknowledged before (its card)."""
        async with self.gate.mutation():  # not across a version swap
            return await asyncio.to_thread(create_snapshot, self.ready_engine(), directory)

    async def swap(self, model_dir: Path | None = None, index_dir: Path | None = None) -> tuple[str, str, dict[str, int]]:
        """Load a version and swap it in: (previous version, new version, its index sizes); raises
        ModelError / IndexLoadError and keeps the current one.

        Searches keep running on the version they started with; item changes wait (SwapGate), so
        none lands in the old version after the new one was read from disk.
        """
        async with self.gate.exclusive():
            current = self.engine
            if current is not None:  # no change is under way (the gate); stop its snapshots, which may write where the new one loads from
                await asyncio.to_thread(current.snapshots.stop)
            try:
                engine = await asyncio.to_thread(self.load_engine, model_dir, index_dir)
                try:
                    served = await asyncio.to_thread(follow, self.index_dir if index_dir is None else self.settings.index_dir, engine.index_dir)
                except BaseException:
                    await asyncio.to_thread(engine.close)
                    raise
            except BaseException:
                if current is not None:
                    current.snapshots.start()
                raise
            self.model_dir, self.index_dir = Path(model_dir or self.model_dir), served
            if current is not None:
                await asyncio.to_thread(current.close)  # its logs: the new version reads and appends them now when it is the same directory
            previous = current.version if current is not None else ""
            self.engine, self.load_error = engine, None
        self.metrics.swaps.inc()
        log.info("swapped in model %s (was %s), index sizes %s", engine.version, previous or "none", engine.sizes())
        return previous, engine.version, engine.sizes()


def get_state(request: Request) -> ServiceState:
    return request.app.state.avsearch
