"""What a server does once, before it serves, so that its worker processes share it rather than
each doing (and holding) it again: ``bench/fork_copies.py`` shows where a forked worker's own
memory comes from, ``bench/worker_memory.py`` measures the total.

A page the fork shared stays shared until some process writes to it; CPython writes to an object
whenever it takes a reference to it, so each worker copies the pages of every object it uses that
the primary did not use in the same way first. Doing the first use here (lazy imports, the
middleware stack Starlette builds at the first request, bytecode that specialises as it runs,
caches that fill) leaves fewer pages for each worker to copy.
"""

from __future__ import annotations

import asyncio
import ctypes
import importlib

import numpy as np
from fastapi import FastAPI

from index.embedder import MODALITIES
from service.batching import OTHER, SearchJob, run_batch
from service.middleware import WARM_UP
from service.settings import Settings
from service.threads import limit_threads
from store.collection import Collection

WARM_UP_PATH = "/readyz"  # answers without side effects, through every middleware and the router


def release_free_heap() -> None:
    """Give the C heap's free pages back to the system (glibc's ``malloc_trim``): a load frees
    buffers inside the heap that the allocator keeps, and after a fork each worker would share, then
    copy, them. Measured at 10^6 Flat: 8 MB less for one process. A no-op without glibc."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):
        pass


def preload(settings: Settings) -> None:
    """The BLAS thread limits (process-wide, inherited; threadpoolctl scans the loaded libraries) and
    uvicorn's lazy imports, once (measured, 10^6 Flat: 3.6 MB a worker)."""
    limit_threads(settings)
    for name in ("uvloop", "uvicorn.loops.auto", "uvicorn.loops.uvloop", "uvicorn.lifespan.on", "uvicorn.protocols.http.httptools_impl"):
        try:
            importlib.import_module(name)
        except ImportError:  # optional: uvicorn falls back to asyncio and h11
            pass


def warm_up(app: FastAPI, collection: Collection, search: bool) -> None:
    """One request through ``app`` (not counted in the metrics: the scope says ``WARM_UP``) and, when
    ``search``, one search a modality through ``collection`` the way a batch runs (measured, 10^6
    Flat after 2,000 searches: 2 workers add 3-4 MB less than without; bench/worker_memory.py). ``search`` only
    where the encoder sessions may run before a fork (service.workers._shares_sessions); a search
    here changes nothing and waits for nothing (a collection not yet joined to the log reads alone)."""
    app.middleware_stack = app.build_middleware_stack()  # what Starlette builds at the first request
    asyncio.run(_get(app, WARM_UP_PATH))
    if search:
        dims = collection.embedder.input_dims
        run_batch(collection, [SearchJob(m, OTHER[m], 10, np.zeros((1, dims[m]), np.float32)) for m in MODALITIES])


async def _get(app: FastAPI, path: str) -> int:
    """GET ``path`` through the ASGI app in this process; returns the status."""
    status = 0

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http", "path": path,
        "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": [], "client": None, "server": None, WARM_UP: True,
    }
    await app(scope, receive, send)
    return status
