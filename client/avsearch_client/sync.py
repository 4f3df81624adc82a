"""``Client``: the blocking driver of the operations in ``wire`` (one pooled ``httpx.Client``)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import httpx
import numpy as np

from avsearch_client import wire
from avsearch_client.errors import ConnectionFailed, error_from
from avsearch_client.models import Deleted, Info, Item, Reloaded, SearchResults, Snapshot, Upserted
from avsearch_client.wire import Call, Operation, Progress, RetryPolicy, T


class Client:
    """A connection to an avsearch server: ``Client("http://127.0.0.1:8000", api_key=None)``.

    ``api_key`` defaults to ``$AVSEARCH_API_KEY``. ``timeout`` is per request (seconds); ``retries``,
    ``backoff`` and ``max_backoff`` shape the retries (see ``RetryPolicy`` for what is retried).
    Connections are kept alive and reused; use it in a ``with`` block or call ``close()``.
    """

    def __init__(self, url: str = "http://127.0.0.1:8000", api_key: str | None = None, *, timeout: float = 30.0, retries: int = 3, backoff: float = 0.1, max_backoff: float = 2.0):
        self._session = wire.Session(url, api_key, timeout, RetryPolicy(retries, backoff, max_backoff))
        self._http = httpx.Client(**self._session.client_args())

    @property
    def url(self) -> str:
        return self._session.url

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the driver -------------------------------------------------------------------------------
    def _run(self, operation: Operation[T], retry: RetryPolicy | None = None) -> T:
        policy = retry or self._session.retry
        try:
            call = next(operation)
            while True:
                call = operation.send(self._send_all(call, policy) if isinstance(call, list) else self._send(call, policy))
        except StopIteration as done:
            return cast(T, done.value)

    def _send_all(self, calls: list[Call], retry: RetryPolicy) -> list[httpx.Response]:
        """Calls sent concurrently (threads share the pool); an error is raised once all have ended."""
        if len(calls) == 1:
            return [self._send(calls[0], retry)]
        with ThreadPoolExecutor(len(calls)) as pool:
            return list(pool.map(lambda call: self._send(call, retry), calls))

    def _send(self, call: Call, retry: RetryPolicy) -> httpx.Response:
        attempt = 0
        while True:
            try:
                response = self._http.request(call.method, call.path, params=call.params, content=call.content, headers=call.headers)
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
            time.sleep(wait)

    def request(self, method: str, path: str, *, params: dict[str, Any] | None = None, json: Any = None, content: bytes | None = None, headers: dict[str, str] | None = None) -> httpx.Response:
        """Any route (the console's included), with this client's key, retries (GET only) and errors."""
        call = wire.json_call(method, path, json) if json is not None else Call(method, path, content=content)
        call.params, call.headers, call.idempotent = params, {**call.headers, **(headers or {})}, method.upper() == "GET"
        return self._send(call, self._session.retry)

    # --- search ------------------------------------------------------------------------------------
    def search(
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
        """Nearest items of ``target`` (default: the other modality), one ranked list per query.

        ``queries``: raw feature vectors of ``modality``, (n, D) or one (D,) row, sent as ``.npy``
        (``binary=False``: as JSON); or ``ids``: stored items of ``modality`` to query with. More
        queries than the server takes in one request are split over several.
        """
        return self._run(wire.search(self._session, modality, queries, ids, top_k, target, score_threshold, filter, binary))

    def embed(self, modality: str, vectors: Any) -> np.ndarray:
        """(n, E) float32 served embeddings of raw feature vectors (``.npy`` both ways)."""
        return self._run(wire.embed(self._session, modality, vectors))

    # --- items ---------------------------------------------------------------------------------------
    def upsert(
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
        """Add or replace items (raw features, embedded by the server), split into requests under the
        server's limits (``batch_size`` items at most), ``concurrency`` of them in flight at once.
        ``progress``: True prints to stderr, or a callable ``(done, total)``. Each acknowledged request is in the server's log; when one fails
        the exception says nothing of the earlier ones, which stay: upsert again (it is idempotent)."""
        return self._run(wire.upsert(self._session, modality, ids, vectors, metadata, batch_size, progress, concurrency))

    def get(self, modality: str, item_id: str) -> Item:
        return self._run(wire.get(self._session, modality, item_id))

    def delete(self, modality: str, item_id: str) -> Deleted:
        return self._run(wire.delete(self._session, modality, item_id))

    # --- operations ----------------------------------------------------------------------------------
    def info(self) -> Info:
        return self._run(wire.info(self._session))

    def health(self) -> bool:
        return self._run(wire.health(self._session))

    def ready(self) -> str | None:
        """The served model version when ready, None while the server is still loading."""
        return self._run(wire.ready(self._session))

    def wait_until_ready(self, timeout: float = 60.0, interval: float = 0.1) -> str:
        """Poll ``/readyz`` (an unreachable server counts as not ready) until ready; the model version."""
        deadline = time.monotonic() + timeout
        reason = "no answer yet"
        while True:
            try:
                model = self._run(wire.ready(self._session), RetryPolicy(retries=0))
                if model is not None:
                    return model
                reason = "the server answers 503 (loading)"
            except ConnectionFailed as err:
                reason = str(err)
            if time.monotonic() + interval > deadline:
                raise wire.not_ready(self.url, timeout, reason)
            time.sleep(interval)

    def reload(self, model_dir: str | Path | None = None, index_dir: str | Path | None = None) -> Reloaded:
        """Swap in a model + index version (default: the server's configured paths, re-read)."""
        return self._run(wire.reload(self._session, model_dir, index_dir))

    # --- snapshots -----------------------------------------------------------------------------------
    def create_snapshot(self) -> Snapshot:
        return self._run(wire.create_snapshot(self._session))

    def list_snapshots(self) -> list[Snapshot]:
        return self._run(wire.list_snapshots(self._session))

    def download_snapshot(self, name: str, path: str | Path) -> Path:
        """Stream snapshot ``name`` into the file ``path`` (written beside it, then renamed into place)."""
        self._run(wire.server_limits(self._session))  # the version check, before a large transfer
        call = Call("GET", wire.snapshot_path(name))
        attempt = 0
        while True:
            try:
                with self._http.stream("GET", call.path) as response:
                    if response.status_code >= 400:
                        response.read()
                        wait = self._session.retry.delay(attempt, call, response=response)
                        if wait is None:
                            raise error_from(response)
                    else:
                        with wire.AtomicFile(path) as out:
                            for chunk in response.iter_bytes(1 << 20):
                                out.write(chunk)
                        return Path(path)
            except httpx.TransportError as err:
                wait = self._session.retry.delay(attempt, call, error=err)
                if wait is None:
                    raise ConnectionFailed(f"GET {self.url}{call.path}: {type(err).__name__}: {err}") from err
            attempt += 1
            time.sleep(wait)

    def delete_snapshot(self, name: str) -> None:
        self._run(wire.delete_snapshot(self._session, name))
