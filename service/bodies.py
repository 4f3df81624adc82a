"""Request bodies: content types, JSON parsed and checked by pydantic, ``.npy`` parsed without trusting its header.

Routes read their bodies here rather than through FastAPI's body parameters so that one route can
take JSON or ``application/x-npy``, and every failure becomes a 4xx whose message says what to fix.
"""

from __future__ import annotations

import io
import math
import re
from typing import TypeVar

import numpy as np
from fastapi import HTTPException, Request
from numpy.lib import format as npy_format
from pydantic import BaseModel, ValidationError

from avdata.paired import dequantize

JSON, NPY = "application/json", "application/x-npy"
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


async def parse_json(request: Request, model: type[M], body: bytes | None = None) -> M:
    if body is None:
        body = await request.body()
    try:
        return model.model_validate_json(body)
    except ValidationError as err:
        raise validation_error(err) from None


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
