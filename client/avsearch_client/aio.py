"""``AsyncClient``: the asyncio driver of the same operations as ``Client`` (one pooled ``httpx.AsyncClient``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import httpx
import numpy as np

from avsearch_client import wire
from avsearch_client.errors import ConnectionFailed, error_from
from avsearch_client.models import Deleted, Info, Item, Reloaded, SearchResults, Snapshot, Upserted
from avsearch_client.wire import Call, Operation, Progress, RetryPolicy, T


class AsyncClient:
    """``Client`` for asyncio: the same arguments and methods, each a coroutine. One instance may be
    shared by many tasks (its connection pool serves them concurrently)."""

    def __init__(self, url: str = "http://127.0.0.1:8000", api_key: str | None = None, *, timeout: float = 30.0, retries: int = 3, backoff: float = 0.1, max_backoff: float = 2.0, max_connections: int = 100):
        self._session = wire.Session(url, api_key, timeout, RetryPolicy(retries, backoff, max_backoff))
        self._http = httpx.AsyncClient(**self._session.client_args(), limits=httpx.Limits(max_connections=max_connections))

    @property
    def url(self) -> str:
        return self._session.url

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- the driver -------------------------------------------------------------------------------
    async def _run(self, operation: Operation[T], retry: RetryPolicy | None = None) -> T:
        policy = retry or self._session.retry
        try:
            call = next(operation)
            while True:
                if isinstance(call, list):  # sent concurrently
                    call = operation.send(await asyncio.gather(*(self._send(c, policy) for c in call)))
                else:
                    call = operation.send(await self._send(call, policy))
        except StopIteration as done:
            return cast(T, done.value)

    async def _send(self, call: Call, retry: RetryPolicy) -> httpx.Response:
        attempt = 0
        while True:
            try:
                response = await self._http.request(call.method, call.path, params=call.params, content=call.content, headers=call.headers)
            except httpx.TransportError as err:
                wait = retry.delay(attempt, call, error=err)
                if wait is None:
                    raise ConnectionFailed(f"{call.method} {self.url}{call.path}: {type(err).__name__}: {err}") from err
            else:
                if response.status_code < 400 or response.status_code in call.passthrough:
                    return response
                wait = retry.delay(attempt, call, response=response)
                if wait is None:
                    raise error_from(response)
            attempt += 1
            await asyncio.sleep(wait)

    async def request(self, method: str, path: str, *, params: dict[str, Any] | None = None, json: Any = None, content: bytes | None = None, headers: dict[str, str] | None = None) -> httpx.Response:
        """As ``Client.request``."""
        call = wire.json_call(method, path, json) if json is not None else Call(method, path, content=content)
        call.params, call.headers, call.idempotent = params, {**call.headers, **(headers or {})}, method.upper() == "GET"
        return await self._send(call, self._session.retry)

    # --- the calls: see Client for what each does ---------------------------------------------------
    async def search(
        self,
        modality: str,
        queries: Any = None,
        *,
        ids: Sequence[str] | None = None,
        top_k: int = 10,
        target: str | None = None,
        score_threshold: float | None = None,
        filter: dict[str, Any] | None = None,
        binary: bool = True,
    ) -> SearchResults:
        return await self._run(wire.search(self._session, modality, queries, ids, top_k, target, score_threshold, filter, binary))

    async def embed(self, modality: str, vectors: Any) -> np.ndarray:
        return await self._run(wire.embed(self._session, modality, vectors))

    async def upsert(
        self,
        modality: str,
        ids: Sequence[str],
        vectors: Any,
        metadata: Sequence[dict[str, Any] | None] | None = None,
        *,
        batch_size: int | None = None,
        progress: Progress | bool | None = None,
        concurrency: int = 1,
    ) -> Upserted:
        return await self._run(wire.upsert(self._session, modality, ids, vectors, metadata, batch_size, progress, concurrency))

    async def get(self, modality: str, item_id: str) -> Item:
        return await self._run(wire.get(self._session, modality, item_id))

    async def delete(self, modality: str, item_id: str) -> Deleted:
        return await self._run(wire.delete(self._session, modality, item_id))

    async def info(self) -> Info:
        return await self._run(wire.info(self._session))

    async def health(self) -> bool:
        return await self._run(wire.health(self._session))

    async def ready(self) -> str | None:
        return await self._run(wire.ready(self._session))

    async def wait_until_ready(self, timeout: float = 60.0, interval: float = 0.1) -> str:
        deadline = time.monotonic() + timeout
        reason = "no answer yet"
        while True:
            try:
                model = await self._run(wire.ready(self._session), RetryPolicy(retries=0))
                if model is not None:
                    return model
                reason = "the server answers 503 (loading)"
            except ConnectionFailed as err:
                reason = str(err)
            if time.monotonic() + interval > deadline:
                raise wire.not_ready(self.url, timeout, reason)
            await asyncio.sleep(interval)

    async def reload(self, model_dir: str | Path | None = None, index_dir: str | Path | None = None) -> Reloaded:
        return await self._run(wire.reload(self._session, model_dir, index_dir))

    async def create_snapshot(self) -> Snapshot:
        return await self._run(wire.create_snapshot(self._session))

    async def list_snapshots(self) -> list[Snapshot]:
        return await self._run(wire.list_snapshots(self._session))

    async def download_snapshot(self, name: str, path: str | Path) -> Path:
        await self._run(wire.server_limits(self._session))
        call = Call("GET", wire.snapshot_path(name))
        attempt = 0
        while True:
            try:
                async with self._http.stream("GET", call.path) as response:
                    if response.status_code >= 400:
                        await response.aread()
                        wait = self._session.retry.delay(attempt, call, response=response)
                        if wait is None:
                            raise error_from(response)
                    else:
                        with wire.AtomicFile(path) as out:  # local disk writes: short, not worth a thread
                            async for chunk in response.aiter_bytes(1 << 20):
                                out.write(chunk)
                        return Path(path)
            except httpx.TransportError as err:
                wait = self._session.retry.delay(attempt, call, error=err)
                if wait is None:
                    raise ConnectionFailed(f"GET {self.url}{call.path}: {type(err).__name__}: {err}") from err
            attempt += 1
            await asyncio.sleep(wait)

    async def delete_snapshot(self, name: str) -> None:
        await self._run(wire.delete_snapshot(self._session, name))
