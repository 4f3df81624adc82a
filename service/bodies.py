"""Request bodies: content types, JSON parsed and checked by pydantic, ``.npy`` parsed without trusting its header.

Routes read their bodies here rather than through FastAPI's body parameters so that one route can
take JSON or ``application/x-npy``, and every failure becomes a 4xx whose message says what to fix.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import io
import math
import multiprocessing
import os
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

import numpy as np
from fastapi import HTTPException, Request
from numpy.lib import format as npy_format
from pydantic import BaseModel, ValidationError

from avdata.paired import dequantize

JSON, NPY = "application/json", "application/x-npy"
PARSE_ON_LOOP_BYTES = 256 * 1024  # smaller bodies validate (in under ~5 ms) faster than a trip to a parser process
PARSE_PROCESSES = 2  # at most this many large bodies are validated at once (each holds ~16x its size while it is)
# Bounds of a JSON body, from what its rows can need (the body-size limit alone allows 32 MB of anything).
NUMBER_BYTES = 32  # the longest JSON number of a float ('-1.2345678901234567e-308') with a separator and a space
ID_BYTES = 256 * 6 + 4  # an id of the longest kind, every character escaped (\uXXXX), quoted, with a separator
FIXED_BYTES = 64 * 1024  # the other fields (options, a filter) and whitespace
M = TypeVar("M", bound=BaseModel)
OPENAPI_MODELS: list[type[BaseModel]] = []
# What numpy.save writes for a 1-D or 2-D array, read without numpy's literal_eval (5x faster).
NPY_HEADER = re.compile(rb"\x93NUMPY\x01\x00(..)\{'descr': '([<>|=]?[a-z]\d{1,2})', 'fortran_order': (False|True), 'shape': \((\d+),(?: (\d+))?\), \} *\n", re.S)  # bodies declared by hand; added to the OpenAPI components


def content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def unsupported(request: Request, accepted: tuple[str, ...]) -> HTTPException:
    got = content_type(request) or "none"
    return HTTPException(415, f"Content-Type {got} is not accepted here; send {' or '.join(accepted)}")


def readable(err: ValidationError, prefix: str = "body") -> str:
    """'body.top_k: Input should be greater than or equal to 1; ...' (at most five problems)."""
    parts = []
    for e in err.errors()[:5]:
        where = ".".join(str(p) for p in (prefix, *e["loc"]))
        parts.append(f"{where}: {e['msg']}")
    more = len(err.errors()) - 5
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def validation_error(err: ValidationError, prefix: str = "body") -> HTTPException:
    if any(e["type"] == "json_invalid" and not e["loc"] for e in err.errors()):  # the body itself, not a JSON-text field
        return HTTPException(400, f"malformed JSON ({err.errors()[0]['msg']}); send a JSON object")
    return HTTPException(422, readable(err, prefix))


def rows_limit(rows: int, row_bytes: int) -> int:
    """The most bytes a body of ``rows`` rows of ``row_bytes`` each can need, with room for the other fields."""
    return rows * row_bytes + FIXED_BYTES


async def read_body(request: Request, limit: int, why: str) -> bytes:
    """The body, or 413 when it is longer than ``limit`` (said by Content-Length, or found while it
    streams in): then the rest is read and dropped, not kept, so the client gets the answer (the
    body-size middleware bounds how much)."""
    declared = request.headers.get("content-length", "")
    over = declared.isdigit() and int(declared) > limit
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        over = over or size > limit
        if not over:
            chunks.append(chunk)
    if over:
        raise HTTPException(413, f"request body over {limit} bytes, more than {why}; send fewer vectors per request")
    return b"".join(chunks)


async def parse_json(request: Request, model: type[M], body: bytes | None = None, limit: int | None = None, why: str = "") -> M:
    """``body`` (default: the request's, up to ``limit`` bytes) checked by ``model``.

    A large body is validated in a parser process, so the event loop (every other request,
    /healthz included) never waits for it: pydantic holds the GIL for the whole call (0.4 s for
    20 MB of floats), so a thread would not free the loop. The process sends back feature vectors
    as float32 arrays (:func:`_as_arrays`), a fraction of the pickled floats' size.
    """
    if body is None:
        body = await request.body() if limit is None else await read_body(request, limit, why)
    if len(body) <= PARSE_ON_LOOP_BYTES:
        try:
            return model.model_validate_json(body)
        except ValidationError as err:
            raise validation_error(err) from None
    try:
        parsed, problem = await asyncio.get_running_loop().run_in_executor(_shared or _parser(), _validate, model, body)
    except BrokenProcessPool:  # a parser process died (killed, out of memory): start new ones next time
        _parser.cache_clear()
        raise HTTPException(503, "the request parser was restarted; retry the request") from None
    if problem is not None:
        raise HTTPException(*problem)
    return parsed


def _validate(model: type[M], body: bytes) -> tuple[M | None, tuple[int, str] | None]:
    """In a parser process: (the model with its vectors as arrays, None) or (None, (status, detail))."""
    try:
        return _as_arrays(model.model_validate_json(body)), None
    except ValidationError as err:  # not sent back as such: pydantic's errors do not pickle
        problem = validation_error(err)
        return None, (problem.status_code, problem.detail)


def _as_arrays(parsed: M) -> M:
    """Feature vectors (``vectors`` rows, or each item's ``vector``) as float32 arrays; ragged rows
    stay lists, for the route to refuse with its message."""
    with np.errstate(over="ignore"):  # 1e39 becomes inf, which the route's check names
        rows = getattr(parsed, "vectors", None)
        if isinstance(rows, list) and len({len(row) for row in rows}) == 1:
            parsed.vectors = np.asarray(rows, dtype=np.float32)
        for item in getattr(parsed, "items", None) or ():
            if isinstance(getattr(item, "vector", None), list):
                item.vector = np.asarray(item.vector, dtype=np.float32)
    return parsed


_parser_users = 0  # apps (lifespans) running in this process: the last one to stop stops the processes
_shared: Executor | None = None  # a worker process's way to the primary's parsers (share_parsers)


def share_parsers(executor: Executor) -> None:
    """Validate large bodies with ``executor`` rather than this process's own parser processes: the
    worker processes of one server share the primary's (:mod:`service.workers`), which spares each
    worker two interpreters (~70 MB) and bounds the parsing of the whole server, not each worker."""
    global _shared
    _shared = executor


def start_parsers() -> None:
    """Start the parser processes now (at app start-up), not in the first large request (~1 s)."""
    global _parser_users
    if _shared is not None:
        return
    _parser_users += 1
    for _ in range(PARSE_PROCESSES):
        _parser().submit(math.sqrt, 1.0)


def stop_parsers() -> None:
    """At app shutdown: the last app running stops the parser processes (they hold the server's
    stdout and stderr; left running, whoever waits for those to close waits forever)."""
    global _parser_users
    if _shared is not None:
        return
    _parser_users -= 1
    if _parser_users <= 0 and _parser.cache_info().currsize:
        _parser().shutdown(wait=True, cancel_futures=True)
        _parser.cache_clear()


def _exit_with(parent: int) -> None:
    """In a parser process: exit once the server is gone (a kill tells the pool nothing; the
    queue's other ends, held by the sibling processes, never close)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="avsearch-parser-watch").start()


def validate_in_parser(function: Callable, *args: object) -> object:
    """``function(*args)`` in this process's parser processes (the primary's, for its workers)."""
    try:
        return _parser().submit(function, *args).result()
    except BrokenProcessPool:
        _parser.cache_clear()
        raise


@functools.cache
def _parser() -> ProcessPoolExecutor:
    """Spawned, not forked: a fork would copy the page tables of a large index, and the locks other
    threads hold. As with any spawned process, a script that creates the app must guard its entry
    point (``if __name__ == "__main__":``); ``python -m service serve`` and uvicorn's CLI do."""
    return ProcessPoolExecutor(PARSE_PROCESSES, mp_context=multiprocessing.get_context("spawn"), initializer=_exit_with, initargs=(os.getpid(),))


def parse_query(request: Request, model: type[M]) -> M:
    params = dict(request.query_params)
    try:
        return model.model_validate(params)
    except ValidationError as err:
        raise validation_error(err, prefix="query") from None


def parse_npy(body: bytes) -> np.ndarray:
    """A float (B, D) or (D,) ``.npy`` body -> (B, D) float32; the header's shape must match the bytes sent."""
    fast = NPY_HEADER.match(body)
    if fast is not None and int.from_bytes(fast.group(1), "little") + 10 == fast.end():
        shape = tuple(int(n) for n in fast.group(4, 5) if n is not None)
        try:
            dtype = np.dtype(fast.group(2).decode())
        except TypeError:
            raise HTTPException(400, f".npy header names an unknown dtype {fast.group(2).decode()!r}; send float32") from None
        fortran, start = fast.group(3) == b"True", fast.end()
    else:
        shape, fortran, dtype, start = _npy_header(body)
    if dtype.kind not in "fiu" or dtype.hasobject:
        raise HTTPException(422, f".npy dtype {dtype} is not numeric; send float32")
    if len(shape) not in (1, 2):
        raise HTTPException(422, f".npy array has shape {shape}; send (B, D) or (D,)")
    data = memoryview(body)[start:]
    expected = math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise HTTPException(400, f".npy header says shape {shape} of {dtype} ({expected} bytes) but {len(data)} data bytes follow")
    array = np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")
    if dtype == np.uint8:  # 8-bit codes: de-quantised by the data layer's rule (YouTube-8M's, q·4/255 + 4/512 − 2)
        array = dequantize(array)
    with np.errstate(over="ignore"):  # float64 1e39 -> inf, reported by validate()
        array = np.ascontiguousarray(array, dtype=np.float32)
    return array.reshape(1, -1) if array.ndim == 1 else array


def _npy_header(body: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    stream = io.BytesIO(body)
    try:
        version = npy_format.read_magic(stream)
        read_header = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
        shape, fortran, dtype = read_header(stream)
    except Exception as err:  # numpy raises ValueError, SyntaxError, EOFError... on a bad header
        raise HTTPException(400, f"body is not a .npy file ({err}); write it with numpy.save(f, array.astype('float32'))") from None
    return shape, fortran, dtype, stream.tell()


def body_spec(model: type[BaseModel], binary: bool = False) -> dict:
    """``openapi_extra`` declaring a request body read by hand (JSON, and optionally .npy)."""
    OPENAPI_MODELS.append(model)
    content: dict = {JSON: {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}
    if binary:
        content[NPY] = {"schema": {"type": "string", "format": "binary", "description": "numpy.save of a float32 (B, D) array"}}
    return {"requestBody": {"required": True, "content": content}}


def query_spec(model: type[BaseModel]) -> list[dict]:
    """OpenAPI query parameters for the options of a .npy request."""
    schema = model.model_json_schema()
    required = set(schema.get("required", ()))
    return [
        {"name": name, "in": "query", "required": name in required, "schema": prop, "description": prop.get("description", "") + " (with a .npy body)"}
        for name, prop in schema["properties"].items()
    ]


FLOAT32_MAX = float(np.finfo(np.float32).max)  # larger values overflow to inf and are refused


def _vector(width: int) -> dict:
    return {"type": "array", "items": {"type": "number", "minimum": -FLOAT32_MAX, "maximum": FLOAT32_MAX}, "minItems": width, "maxItems": width}


def state_limits(components: dict, widths: dict[str, int], max_vectors: int, max_top_k: int) -> None:
    """Say in the OpenAPI components what the loaded model and the settings accept, so that clients,
    and a fuzzer generating bodies from the schema, can send valid ones: each modality's vector
    width, ``max_vectors`` rows, ``top_k`` up to ``max_top_k``. A body naming its modality becomes
    one variant per modality (and per query kind, vectors or ids: exactly one is given); an item,
    whose modality is in the path, takes a vector of any of the widths."""
    for name in ("SearchRequest", "EmbedRequest"):
        body = components.get(name)
        if body is None:
            continue
        variants = []
        for modality, width in widths.items():
            for source in ("vectors", "ids"):
                if source not in body["properties"]:
                    continue
                variant = copy.deepcopy(body)
                properties = variant["properties"]
                properties["modality"] = {"type": "string", "enum": [modality], "title": "Modality"}
                if "top_k" in properties:
                    properties["top_k"]["maximum"] = max_top_k
                properties.pop("ids" if source == "vectors" else "vectors", None)
                row = _vector(width) if source == "vectors" else {"type": "string", "minLength": 1, "maxLength": 256}
                described = {key: value for key, value in properties[source].items() if key in ("title", "description")}
                properties[source] = {**described, "type": "array", "items": row, "minItems": 1, "maxItems": max_vectors}
                variant["required"] = sorted({*variant.get("required", ()), source})
                variant["title"] = f"{body.get('title', name)} ({modality}, {source})"
                variants.append(variant)
        components[name] = {"title": body.get("title", name), "description": body.get("description", ""), "anyOf": variants}
    if "UpsertRequest" in components:
        components["UpsertRequest"]["properties"]["items"]["maxItems"] = max_vectors
    item = components.get("ItemIn", {}).get("properties", {})
    if "vector" in item:
        described = {key: value for key, value in item["vector"].items() if key in ("title", "description")}
        item["vector"] = {**described, "anyOf": [_vector(width) for width in sorted(set(widths.values()))]}
