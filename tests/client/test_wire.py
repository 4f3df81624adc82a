"""The client's fast encoders against their slow, obvious references (no server needed)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from avsearch_client import wire


@pytest.mark.parametrize("shape", [(1, 1), (1, 128), (3, 1024), (1000, 7), (12345, 16)])
def test_npy_bytes_are_what_numpy_save_writes(shape):
    rows = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    reference = io.BytesIO()
    np.save(reference, rows)
    assert wire.npy_bytes(rows) == reference.getvalue()
    np.testing.assert_array_equal(np.load(io.BytesIO(wire.npy_bytes(rows))), rows)


def test_orjson_and_json_items_decode_to_the_same_values():
    pytest.importorskip("orjson")
    rows = np.random.default_rng(1).normal(size=(50, 16)).astype(np.float32) * np.float32(1e-3)
    fast = [json.loads(wire.encode_item(f"id-{i}", row, {"i": i, "s": "é"})) for i, row in enumerate(rows)]
    saved, wire.orjson = wire.orjson, None
    try:
        slow = [json.loads(wire.encode_item(f"id-{i}", row, {"i": i, "s": "é"})) for i, row in enumerate(rows)]
    finally:
        wire.orjson = saved
    assert [{k: v for k, v in f.items() if k != "vector"} for f in fast] == [{k: v for k, v in s.items() if k != "vector"} for s in slow]
    # Both read back as the same float32 values (orjson writes the shortest float32 text, json the float64 one).
    np.testing.assert_array_equal(np.array([f["vector"] for f in fast], np.float32), np.array([s["vector"] for s in slow], np.float32))
    np.testing.assert_array_equal(np.array([f["vector"] for f in fast], np.float32), rows)


def test_json_bodies_with_arrays_read_back_alike_with_and_without_orjson():
    rows = np.random.default_rng(3).normal(size=(4, 32)).astype(np.float32)
    body = {"modality": "audio", "vectors": rows, "top_k": 3}
    fast = json.loads(wire.dumps(body))
    saved, wire.orjson = wire.orjson, None
    try:
        slow = json.loads(wire.dumps(body))
        with pytest.raises(TypeError, match="set is not JSON serializable"):
            wire.dumps({"x": {1}})
    finally:
        wire.orjson = saved
    assert fast.keys() == slow.keys() and fast["top_k"] == slow["top_k"] == 3
    np.testing.assert_array_equal(np.array(fast["vectors"], np.float32), rows)
    np.testing.assert_array_equal(np.array(slow["vectors"], np.float32), rows)


def test_packing_keeps_order_and_both_limits():
    rows = np.random.default_rng(2).normal(size=(100, 8)).astype(np.float32)
    ids = [f"id-{i}" for i in range(100)]
    for per_request, max_bytes in [(7, 1 << 20), (1000, 2000), (1, 1 << 20)]:
        bodies = list(wire.pack_items(ids, rows, None, per_request, max_bytes))
        sent = [item["id"] for _, body in bodies for item in json.loads(body)["items"]]
        assert sent == ids  # each once, in order
        assert all(n <= per_request and len(body) <= max_bytes for n, body in bodies)
        assert sum(n for n, _ in bodies) == 100
