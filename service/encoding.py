"""JSON encoding: orjson when installed (several times faster on float lists), else the standard library."""

from __future__ import annotations

import json
from typing import Any


def _default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _stdlib_dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), default=_default, allow_nan=False).encode()


try:
    import orjson

    def dumps(value: Any) -> bytes:
        try:
            return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY)
        except orjson.JSONEncodeError:  # an integer past 64 bits, stored before the API refused them: slower, but an answer
            return _stdlib_dumps(value)

except ImportError:  # pragma: no cover - exercised where orjson is absent

    def dumps(value: Any) -> bytes:
        return _stdlib_dumps(value)
