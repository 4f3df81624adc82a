"""The wire format, once, for ``Client`` and ``AsyncClient``: every operation is a generator that
yields the ``Call``s it needs and receives their answers, so the two drivers only send and retry.

A driver raises the typed error for an answer of 400 or more (unless the call lists the status in
``passthrough``); operations see successful answers only.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import random
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
import numpy as np

from avsearch_client.errors import IncompatibleServer, Unavailable
from avsearch_client.models import MODALITIES, Deleted, Hits, Info, Item, Limits, Reloaded, SearchResults, Snapshot, Upserted, parse_results

try:  # optional (pip install 'avsearch-client[fast]'): JSON bodies of vectors several times faster than the json module
    import orjson
except ImportError:  # pragma: no cover - the json path is the reference and is tested on its own
    orjson = None

API_VERSION = 1  # the /v1 routes; a server that states another `api_version` in /v1/info is refused
JSON, NPY = "application/json", "application/x-npy"
BODY_MARGIN = 256  # bytes kept under max_body_bytes for the envelope of a packed body
T = TypeVar("T")
# An operation yields one call and receives its answer, or a list of calls sent concurrently and their answers.
Operation = Generator["Call | list[Call]", Any, T]
Progress = Callable[[int, int], None]


@dataclass
class Call:
    method: str
    path: str
    params: dict[str, Any] | None = None
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    # Safe to send twice: a read, or a write whose repeat leaves the same state (upsert by id).
    # Non-idempotent calls are retried only when the request was surely not applied.
    idempotent: bool = True
    passthrough: tuple[int, ...] = ()  # statuses handed to the operation instead of raised


def dumps(body: Any) -> bytes:
    """JSON of ``body``, numpy arrays included: orjson writes float32 in its shortest form, several
    times faster than the json module (the reference), which writes them through float64."""
    if orjson is not None:
        return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
    return json.dumps(body, default=_as_list).encode()


def _as_list(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def json_call(method: str, path: str, body: Any, idempotent: bool = True) -> Call:
    return Call(method, path, content=dumps(body), headers={"Content-Type": JSON}, idempotent=idempotent)


@dataclass(frozen=True)
class RetryPolicy:
    """Retries with exponential backoff (``backoff * 2**attempt``, capped, with jitter).

    Retried: any call when nothing reached the server (connection refused, connect timeout) or when
    it answered 503 (this server's 503 means nothing was applied: not ready, or a change it could not
    log); idempotent calls also after a broken connection, a read timeout, a 502 or a 504.
    """

    retries: int = 3
    backoff: float = 0.1
    max_backoff: float = 2.0

    NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)

    def delay(self, attempt: int, call: Call, error: Exception | None = None, response: httpx.Response | None = None) -> float | None:
        """Seconds to wait before attempt ``attempt + 1``, or None to give up."""
        if attempt >= self.retries:
            return None
        if error is not None:
            retry = isinstance(error, self.NOT_SENT) or (call.idempotent and isinstance(error, httpx.TransportError))
        else:
            assert response is not None
            retry = response.status_code == 503 or (call.idempotent and response.status_code in (502, 504))
        if not retry:
            return None
        wait = min(self.max_backoff, self.backoff * 2**attempt) * random.uniform(0.5, 1.0)
        if response is not None and response.headers.get("retry-after", "").isdigit():
            wait = max(wait, min(float(response.headers["retry-after"]), self.max_backoff))
        return float(wait)


class Session:
    """What both drivers share: base URL, headers, timeout, retry policy, and the server's limits
    (read once from ``/v1/info``, which is also where the API version is checked)."""

    def __init__(self, url: str, api_key: str | None, timeout: float, retry: RetryPolicy):
        self.url = url.rstrip("/")
        key = api_key if api_key is not None else os.environ.get("AVSEARCH_API_KEY") or None
        from avsearch_client import __version__

        # No Origin header, ever: the server refuses writes from a foreign browser origin.
        self.headers = {"User-Agent": f"avsearch-client/{__version__}", **({"Authorization": f"Bearer {key}"} if key else {})}
        self.timeout = httpx.Timeout(timeout, connect=min(timeout, 10.0))
        self.retry = retry
        self.limits: Limits | None = None

    def client_args(self) -> dict[str, Any]:
        return {"base_url": self.url, "headers": self.headers, "timeout": self.timeout}


def server_limits(session: Session) -> Operation[Limits]:
    """The server's limits, checking once that it speaks this client's API."""
    if session.limits is None:
        yield from info(session)
    assert session.limits is not None
    return session.limits


def info(session: Session) -> Operation[Info]:
    """``GET /v1/info``, checked against this client's API version; keeps the limits."""
    response = yield Call("GET", "/v1/info", passthrough=(404,))
    if response.status_code == 404:
        raise IncompatibleServer(f"{session.url} does not serve the avsearch API v{API_VERSION} (GET /v1/info answered 404); is it an avsearch server, and of a version this client knows?")
    try:
        body = response.json()
        described = Info.parse(body)
    except (ValueError, KeyError, TypeError) as err:
        raise IncompatibleServer(f"{session.url}: GET /v1/info is not what avsearch API v{API_VERSION} answers (missing or bad field {err}); upgrade the client or the server") from None
    stated = body.get("api_version", API_VERSION)  # servers up to now state none: their /v1 routes are v1
    if stated != API_VERSION:
        raise IncompatibleServer(f"{session.url} speaks avsearch API v{stated}; this client (avsearch_client) speaks v{API_VERSION}: install the client matching the server")
    session.limits = described.limits
    return described


def _modality(name: str) -> str:
    if name not in MODALITIES:
        raise ValueError(f"modality must be 'audio' or 'visual', not {name!r}")
    return name


def as_rows(vectors: Any, what: str = "vectors") -> np.ndarray:
    """(n, D) or (D,) numbers -> (n, D) C-contiguous float32."""
    array = np.asarray(vectors)
    if array.dtype.kind not in "fiu":
        raise ValueError(f"{what} must be numbers, not {array.dtype}")
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{what} must be a (n, D) array or one (D,) row with n, D > 0; got shape {np.shape(vectors)}")
    return np.ascontiguousarray(array, dtype=np.float32)


def npy_bytes(rows: np.ndarray) -> bytes:
    """``numpy.save`` of (n, D) float32 rows, byte for byte, without its header writer (60-70 µs a call)."""
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (%d, %d), }" % rows.shape
    header += " " * (-(10 + len(header) + 1) % 64) + "\n"  # the whole header a multiple of 64 bytes, as numpy pads it
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode("latin1") + rows.astype("<f4", copy=False).tobytes()


JSON_BYTES_PER_FLOAT = 26  # the longest repr of a float64 (-1.2345678901234567e-308) and ", "


def _rows_per_request(limits: Limits, width: int, binary: bool = True) -> int:
    """Most rows of ``width`` values one request may hold under both limits (.npy: 4 bytes a value)."""
    per_value = 4 if binary else JSON_BYTES_PER_FLOAT
    return max(1, min(limits.max_vectors, (limits.max_body_bytes - BODY_MARGIN) // (per_value * width)))


def search(
    session: Session,
    modality: str,
    queries: Any,
    ids: Sequence[str] | None,
    top_k: int,
    target: str | None,
    score_threshold: float | None,
    filter: dict[str, Any] | None,
    binary: bool,
) -> Operation[SearchResults]:
    limits = yield from server_limits(session)
    if (queries is None) == (ids is None):
        raise ValueError("give exactly one of queries (raw feature vectors) or ids (stored items)")
    options: dict[str, Any] = {"modality": _modality(modality), "top_k": top_k}
    if target is not None:
        options["target"] = _modality(target)
    if score_threshold is not None:
        options["score_threshold"] = score_threshold
    results: list[Hits] = []
    model = ""
    if ids is not None:
        ids = [ids] if isinstance(ids, str) else list(ids)
        for start in range(0, len(ids), limits.max_vectors):
            body = {**options, "ids": ids[start : start + limits.max_vectors], **({"filter": filter} if filter is not None else {})}
            answer = (yield json_call("POST", "/v1/search", body)).json()
            results += parse_results(answer)
            model = answer["model"]
        return SearchResults(results, model)
    rows = as_rows(queries, "queries")
    step = _rows_per_request(limits, rows.shape[1], binary)
    for start in range(0, len(rows), step):
        chunk = rows[start : start + step]
        if binary:  # the options in the query string, the vectors as .npy
            params = {**options, **({"filter": json.dumps(filter)} if filter is not None else {})}
            call = Call("POST", "/v1/search", params=params, content=npy_bytes(chunk), headers={"Content-Type": NPY})
        else:
            call = json_call("POST", "/v1/search", {**options, "vectors": chunk, **({"filter": filter} if filter is not None else {})})
        answer = (yield call).json()
        results += parse_results(answer)
        model = answer["model"]
    return SearchResults(results, model)


def embed(session: Session, modality: str, vectors: Any) -> Operation[np.ndarray]:
    limits = yield from server_limits(session)
    rows = as_rows(vectors)
    step = _rows_per_request(limits, rows.shape[1])
    parts = []
    for start in range(0, len(rows), step):
        call = Call("POST", "/v1/embed", params={"modality": _modality(modality)}, content=npy_bytes(rows[start : start + step]), headers={"Content-Type": NPY, "Accept": NPY})
        response = yield call
        parts.append(np.load(io.BytesIO(response.content), allow_pickle=False))
    return np.concatenate(parts)


def encode_item(item_id: str, row: np.ndarray, metadata: dict[str, Any] | None) -> bytes:
    return dumps({"id": item_id, "vector": row, "metadata": metadata})


def pack_items(ids: Sequence[str], rows: np.ndarray, metadata: Sequence[dict[str, Any] | None] | None, per_request: int, max_bytes: int) -> Iterator[tuple[int, bytes]]:
    """(item count, upsert body) in order, each body of at most ``per_request`` items and
    ``max_bytes`` bytes; an item too large on its own goes alone (the server answers 413)."""
    parts: list[bytes] = []
    size = 0
    for i, item_id in enumerate(ids):
        part = encode_item(item_id, rows[i], None if metadata is None else metadata[i])
        if parts and (len(parts) == per_request or size + len(part) + 1 > max_bytes - BODY_MARGIN):
            yield len(parts), b'{"items":[' + b",".join(parts) + b"]}"
            parts, size = [], 0
        parts.append(part)
        size += len(part) + 1
    if parts:
        yield len(parts), b'{"items":[' + b",".join(parts) + b"]}"


def upsert(
    session: Session,
    modality: str,
    ids: Sequence[str],
    vectors: Any,
    metadata: Sequence[dict[str, Any] | None] | None,
    batch_size: int | None,
    progress: Progress | bool | None,
    concurrency: int = 1,
) -> Operation[Upserted]:
    limits = yield from server_limits(session)
    rows = as_rows(vectors)
    ids = list(ids)
    if len(ids) != len(rows):
        raise ValueError(f"{len(ids)} ids for {len(rows)} vectors; give one id per vector")
    if metadata is not None and len(metadata) != len(ids):
        raise ValueError(f"{len(metadata)} metadata entries for {len(ids)} ids; give one per item (None for none)")
    bad = np.flatnonzero(~np.isfinite(rows).all(axis=1))
    if len(bad):  # JSON has no NaN or Infinity (orjson would write null): say which rows here
        raise ValueError(f"vectors hold NaN or Inf in {len(bad)} rows (first: row {bad[0]}, id {ids[bad[0]]!r})")
    repeated = [i for i, n in Counter(ids).items() if n > 1]
    if repeated:  # across batches the later one would silently replace the earlier
        raise ValueError(f"ids must be unique within one upsert; repeated: {repeated[:5]}")
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, not {concurrency}")
    report = progress_printer(len(ids)) if progress is True else progress or None
    path = f"/v1/items/{_modality(modality)}"
    batches = pack_items(ids, rows, metadata, min(batch_size or limits.max_vectors, limits.max_vectors), limits.max_body_bytes)
    done = requests = count = 0
    while wave := list(itertools.islice(batches, concurrency)):  # up to `concurrency` requests in flight at once
        answers = yield [Call("POST", path, content=body, headers={"Content-Type": JSON}) for _, body in wave]
        count = max(answer.json()["count"] for answer in answers)  # the last one applied saw every earlier one
        done, requests = done + sum(n for n, _ in wave), requests + len(wave)
        if report:
            report(done, len(ids))
    return Upserted(done, count, requests)


def progress_printer(total: int, width: int = 30) -> Progress:
    """A bar on stderr, redrawn in place: ``upsert [#######.......]  25000/100000 items``."""

    def show(done: int, _total: int) -> None:
        filled = width * done // max(total, 1)
        end = "\n" if done == total else ""
        print(f"\rupsert [{'#' * filled}{'.' * (width - filled)}] {done:>{len(str(total))}}/{total} items", end=end, file=sys.stderr, flush=True)

    return show


def _item_path(modality: str, item_id: str) -> str:
    return f"/v1/items/{_modality(modality)}/{quote(item_id, safe='')}"


def get(session: Session, modality: str, item_id: str) -> Operation[Item]:
    yield from server_limits(session)
    return Item.parse((yield Call("GET", _item_path(modality, item_id))).json())


def delete(session: Session, modality: str, item_id: str) -> Operation[Deleted]:
    # Not idempotent: a repeat after a lost answer would be a 404, so only retried when not applied.
    yield from server_limits(session)
    body = (yield Call("DELETE", _item_path(modality, item_id), idempotent=False)).json()
    return Deleted(body["deleted"], body["modality"], body["count"])


def health(session: Session) -> Operation[bool]:
    return bool((yield Call("GET", "/healthz")).json().get("status") == "ok")


def ready(session: Session) -> Operation[str | None]:
    """The served model version once ready; None while the server answers 503."""
    response = yield Call("GET", "/readyz", passthrough=(503,))
    return None if response.status_code == 503 else response.json()["model"]


def not_ready(url: str, timeout: float, reason: str) -> Unavailable:
    return Unavailable(f"{url} not ready after {timeout:g} s: {reason}", 503, "GET /readyz")


def reload(session: Session, model_dir: str | Path | None, index_dir: str | Path | None) -> Operation[Reloaded]:
    yield from server_limits(session)
    body = {k: str(v) for k, v in (("model_dir", model_dir), ("index_dir", index_dir)) if v is not None}
    answer = (yield json_call("POST", "/v1/admin/reload", body, idempotent=False)).json()
    session.limits = None  # a new version may come with other settings read at the next call
    return Reloaded(answer["model"], answer["previous_model"], answer["index_sizes"])


def create_snapshot(session: Session) -> Operation[Snapshot]:
    yield from server_limits(session)
    return Snapshot.parse((yield json_call("POST", "/v1/admin/snapshots", {}, idempotent=False)).json())


def list_snapshots(session: Session) -> Operation[list[Snapshot]]:
    yield from server_limits(session)
    return [Snapshot.parse(s) for s in (yield Call("GET", "/v1/admin/snapshots")).json()["snapshots"]]


def snapshot_path(name: str) -> str:
    return f"/v1/admin/snapshots/{quote(name, safe='')}"


def delete_snapshot(session: Session, name: str) -> Operation[None]:
    yield from server_limits(session)
    yield Call("DELETE", snapshot_path(name), idempotent=False)  # a repeat after a lost answer would be a 404


class AtomicFile:
    """A file written beside ``path`` and renamed onto it when the ``with`` block ends without an
    error (deleted otherwise): a broken download never leaves a half-written file under the name."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __enter__(self) -> io.BufferedWriter:
        fd, self.partial = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".part")
        self.file = os.fdopen(fd, "wb")
        return self.file

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        try:
            if kind is None:
                self.file.flush()
                os.fsync(self.file.fileno())
            self.file.close()
            if kind is None:
                os.replace(self.partial, self.path)
        finally:
            if os.path.exists(self.partial):
                os.unlink(self.partial)
