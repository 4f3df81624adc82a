"""Every bad input is a 4xx whose message says what to fix; never a 500."""

from __future__ import annotations

import numpy as np
import pytest

from service.settings import Settings
from tests.service.conftest import copy_index, make_client, npy_bytes, wait_ready

A = [0.1] * 128  # a well-formed audio vector
NPY = {"content-type": "application/x-npy"}


def search(vectors=None, **extra):
    return {"modality": "audio", "vectors": [A] if vectors is None else vectors, **extra}


JSON_SEARCH_CASES = [
    ("wrong width", search([[0.0] * 5]), 422, "128 values"),
    ("ragged rows", search([A, [0.0] * 5]), 422, "same length"),
    ("NaN", None, 422, "NaN or Inf"),
    ("Inf after float32", search([[1e39] * 128]), 422, "NaN or Inf"),
    ("empty list", search([]), 422, "at least 1"),
    ("empty vector", search([[]]), 422, "128 values"),
    ("too many vectors", search([A] * 9), 413, "limit is 8"),
    ("too many ids", {"modality": "audio", "ids": ["x"] * 9}, 413, "limit is 8"),
    ("top_k zero", search(top_k=0), 422, "top_k"),
    ("top_k negative", search(top_k=-3), 422, "top_k"),
    ("top_k above cap", search(top_k=51), 422, "limit 50"),
    ("top_k not a number", search(top_k="ten"), 422, "top_k"),
    ("unknown modality", {"modality": "smell", "vectors": [A]}, 422, "'audio' or 'visual'"),
    ("unknown target", search(target="smell"), 422, "target"),
    ("vectors and ids", search(ids=["clip-000001"]), 422, "exactly one"),
    ("neither vectors nor ids", {"modality": "audio"}, 422, "exactly one"),
    ("unknown field", search(topk=5), 422, "topk"),
    ("vector of strings", search([["a"] * 128]), 422, "vectors"),
    ("filter not an object", search(filter=[1]), 422, "filter"),
    ("unknown id", {"modality": "audio", "ids": ["nope"]}, 404, "no audio item with id 'nope'"),
]


@pytest.mark.parametrize("name, body, status, message", JSON_SEARCH_CASES, ids=[c[0] for c in JSON_SEARCH_CASES])
def test_search_json(client, name, body, status, message):
    if name == "NaN":
        r = client.post("/v1/search", content=b'{"modality": "audio", "vectors": [[NaN' + b", 0" * 127 + b"]]}", headers={"content-type": "application/json"})
    else:
        r = client.post("/v1/search", json=body)
    assert r.status_code == status, r.text
    assert message in r.json()["detail"]


RAW_CASES = [
    ("malformed JSON", b'{"modality": "audio", "vectors": [[0.1,', "application/json", 400, "malformed JSON"),
    ("empty body", b"", "application/json", 400, "malformed JSON"),
    ("JSON array, not object", b"[1, 2]", "application/json", 422, "object"),
    ("not UTF-8", b'{"modality": "\xff"}', "application/json", 400, "malformed JSON"),
    ("text/plain", b'{"modality": "audio"}', "text/plain", 415, "send application/json or application/x-npy"),
    ("form", b"modality=audio", "application/x-www-form-urlencoded", 415, "Content-Type"),
    ("no content type", b'{"modality": "audio"}', None, 415, "Content-Type none"),
]


@pytest.mark.parametrize("route", ["/v1/search", "/v1/embed"])
@pytest.mark.parametrize("name, body, ctype, status, message", RAW_CASES, ids=[c[0] for c in RAW_CASES])
def test_raw_bodies(client, route, name, body, ctype, status, message):
    headers = {} if ctype is None else {"content-type": ctype}
    r = client.post(route, content=body, headers=headers)
    assert r.status_code == status, r.text
    assert message in r.json()["detail"]


def test_body_over_the_size_limit(client):
    r = client.post("/v1/search", json=search([A] * 400))  # about 240 kB > 200 kB
    assert r.status_code == 413 and "AVSEARCH_MAX_BODY_BYTES" in r.json()["detail"]

    def chunks():  # no Content-Length: counted while it streams in
        yield b'{"modality": "audio", "vectors": ['
        for _ in range(400):
            yield (str(A) + ",").encode()

    r = client.post("/v1/search", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "AVSEARCH_MAX_BODY_BYTES" in r.json()["detail"]


def _npy_header_only(shape: tuple) -> bytes:
    return npy_bytes(np.zeros((1, 128), np.float32)).replace(b"(1, 128)", str(shape).encode(), 1)


NPY_CASES = [
    ("garbage", "modality=audio", b"not an npy file", 400, "not a .npy file"),
    ("truncated data", "modality=audio", npy_bytes(np.zeros((2, 128), np.float32))[:-10], 400, "data bytes follow"),
    ("header claims a huge shape", "modality=audio", _npy_header_only((10**9, 128)), 400, "data bytes follow"),
    ("3-D array", "modality=audio", npy_bytes(np.zeros((1, 2, 64), np.float32)), 422, "shape"),
    ("strings", "modality=audio", npy_bytes(np.array(["a", "b"])), 422, "not numeric"),
    ("unknown dtype", "modality=audio", npy_bytes(np.zeros((1, 128), np.float32)).replace(b"<f4", b"<f3", 1), 400, "unknown dtype"),
    ("wrong width", "modality=audio", npy_bytes(np.zeros((2, 64), np.float32)), 422, "128 values"),
    ("NaN", "modality=audio", npy_bytes(np.full((1, 128), np.nan, np.float32)), 422, "NaN or Inf"),
    ("empty", "modality=audio", npy_bytes(np.zeros((0, 128), np.float32)), 422, "non-empty"),
    ("too many", "modality=audio", npy_bytes(np.zeros((9, 128), np.float32)), 413, "limit is 8"),
    ("missing modality", "top_k=3", npy_bytes(np.zeros((1, 128), np.float32)), 422, "query.modality"),
    ("top_k zero", "modality=audio&top_k=0", npy_bytes(np.zeros((1, 128), np.float32)), 422, "query.top_k"),
    ("top_k above cap", "modality=audio&top_k=51", npy_bytes(np.zeros((1, 128), np.float32)), 422, "limit 50"),
    ("filter not JSON", "modality=audio&filter={oops", npy_bytes(np.zeros((1, 128), np.float32)), 422, "query.filter"),
]


@pytest.mark.parametrize("name, query, body, status, message", NPY_CASES, ids=[c[0] for c in NPY_CASES])
def test_search_npy(client, name, query, body, status, message):
    r = client.post(f"/v1/search?{query}", content=body, headers=NPY)
    assert r.status_code == status, r.text
    assert message in r.json()["detail"]


EMBED_CASES = [
    ("wrong width", {"modality": "visual", "vectors": [A]}, 422, "1024 values"),
    ("empty", {"modality": "visual", "vectors": []}, 422, "at least 1"),
    ("unknown modality", {"modality": "smell", "vectors": [A]}, 422, "'audio' or 'visual'"),
    ("too many", {"modality": "audio", "vectors": [A] * 9}, 413, "limit is 8"),
    ("Inf", {"modality": "audio", "vectors": [[1e39] * 128]}, 422, "NaN or Inf"),
]


@pytest.mark.parametrize("name, body, status, message", EMBED_CASES, ids=[c[0] for c in EMBED_CASES])
def test_embed(client, name, body, status, message):
    r = client.post("/v1/embed", json=body)
    assert r.status_code == status, r.text
    assert message in r.json()["detail"]


def item(i="x", vector=None, **extra):
    return {"id": i, "vector": A if vector is None else vector, **extra}


ITEM_CASES = [
    ("unknown modality", "/v1/items/smell", {"items": [item()]}, 422, "path.modality"),
    ("no items", "/v1/items/audio", {"items": []}, 422, "at least 1"),
    ("repeated ids", "/v1/items/audio", {"items": [item("a"), item("a")]}, 422, "repeated: ['a']"),
    ("wrong width", "/v1/items/audio", {"items": [item(vector=[0.0] * 3)]}, 422, "128 values"),
    ("NaN via Inf", "/v1/items/audio", {"items": [item(vector=[1e39] * 128)]}, 422, "NaN or Inf"),
    ("empty id", "/v1/items/audio", {"items": [item("")]}, 422, "items.0.id"),
    ("id too long", "/v1/items/audio", {"items": [item("x" * 300)]}, 422, "items.0.id"),
    ("metadata not an object", "/v1/items/audio", {"items": [item(metadata=[1])]}, 422, "metadata"),
    ("too many", "/v1/items/audio", {"items": [item(str(i)) for i in range(9)]}, 413, "limit is 8"),
    ("NaN in metadata", "/v1/items/audio", None, 422, "metadata numbers must be finite"),
]


@pytest.mark.parametrize("name, route, body, status, message", ITEM_CASES, ids=[c[0] for c in ITEM_CASES])
def test_items(client, name, route, body, status, message):
    if body is None:
        raw = b'{"items": [{"id": "x", "vector": [' + b"0.1," * 127 + b'0.1], "metadata": {"a": [1, {"b": NaN}]}}]}'
        r = client.post(route, content=raw, headers={"content-type": "application/json"})
    else:
        r = client.post(route, json=body)
    assert r.status_code == status, r.text
    assert message in r.json()["detail"]


def test_items_raw_bodies_and_unknown_ids(client):
    r = client.post("/v1/items/audio", content=b'{"items": [', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "malformed JSON" in r.json()["detail"]
    r = client.post("/v1/items/audio", content=npy_bytes(np.zeros((1, 128), np.float32)), headers=NPY)
    assert r.status_code == 415 and "send application/json" in r.json()["detail"]
    for method in (client.get, client.delete):
        r = method("/v1/items/audio/never-stored")
        assert r.status_code == 404 and "never-stored" in r.json()["detail"]
    r = client.get("/v1/items/smell/x")
    assert r.status_code == 422 and "path.modality" in r.json()["detail"]


def test_reload_bad_bodies(client):
    r = client.post("/v1/admin/reload", json={"model_path": "/x"})
    assert r.status_code == 422 and "model_path" in r.json()["detail"]
    r = client.post("/v1/admin/reload", content=b"model_dir=/x", headers={"content-type": "text/plain"})
    assert r.status_code == 415
    r = client.post("/v1/admin/reload", json={"index_dir": "\u0000"})  # found by schemathesis: was a 500
    assert r.status_code == 422 and "no NUL character" in r.json()["detail"]
    r = client.post("/v1/admin/reload", json={"model_dir": "/does/not/exist"})
    assert r.status_code == 403 and "AVSEARCH_RELOAD_ROOTS" in r.json()["detail"]  # outside the reload roots
    missing = client.app.state.avsearch.settings.model_dir.parent / "does-not-exist"
    r = client.post("/v1/admin/reload", json={"model_dir": str(missing)})
    assert r.status_code == 409 and "manifest.json: missing" in r.json()["detail"]
    assert client.get("/readyz").status_code == 200  # the current version keeps serving


@pytest.fixture(scope="module")
def keyed(tiny, tmp_path_factory):
    index_dir = copy_index(tiny, tmp_path_factory.mktemp("keyed") / "index")
    with make_client(tiny, index_dir, api_key="rw-secret", read_api_key="ro-secret") as c:
        wait_ready(c)
        yield c


READ = ("post", "/v1/search", {"json": search()})
WRITE = ("post", "/v1/items/audio", {"json": {"items": [item("k1")]}})
AUTH_CASES = [
    ("read, no key", READ, None, 401, "missing API key"),
    ("read, malformed header", READ, "Basic abc", 401, "missing API key"),
    ("read, wrong key", READ, "Bearer nope", 403, "not accepted"),
    ("read, read-only key", READ, "Bearer ro-secret", 200, ""),
    ("read, read-write key", READ, "Bearer rw-secret", 200, ""),
    ("write, no key", WRITE, None, 401, "missing API key"),
    ("write, wrong key", WRITE, "Bearer nope", 403, "not accepted"),
    ("write, read-only key", WRITE, "Bearer ro-secret", 403, "read-only"),
    ("write, read-write key", WRITE, "Bearer rw-secret", 200, ""),
    ("delete, read-only key", ("delete", "/v1/items/audio/k1", {}), "Bearer ro-secret", 403, "read-only"),
    ("reload, read-only key", ("post", "/v1/admin/reload", {}), "Bearer ro-secret", 403, "read-only"),
    ("info, no key", ("get", "/v1/info", {}), None, 401, "missing API key"),
    ("get item, read-only key", ("get", "/v1/items/audio/k1", {}), "Bearer ro-secret", 200, ""),
]


@pytest.mark.parametrize("name, call, header, status, message", AUTH_CASES, ids=[c[0] for c in AUTH_CASES])
def test_api_keys(keyed, name, call, header, status, message):
    method, route, kwargs = call
    headers = {} if header is None else {"authorization": header}
    r = getattr(keyed, method)(route, headers=headers, **kwargs)
    assert r.status_code == status, r.text
    if status == 401:
        assert r.headers["www-authenticate"] == "Bearer"
    if message:
        assert message in r.json()["detail"]


def test_probes_stay_open_with_keys(keyed):
    assert keyed.get("/healthz").status_code == 200
    assert keyed.get("/readyz").status_code == 200
    assert keyed.get("/metrics").status_code == 200


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"read_api_key": "ro"}, "AVSEARCH_API_KEY is not"),
        ({"api_key": "same", "read_api_key": "same"}, "must differ"),
        ({"api_key": " "}, "blank"),
        ({"max_top_k": 0}, "greater than 0"),
        ({"device": "tpu"}, "device"),
    ],
)
def test_incoherent_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        Settings(**settings)


def test_uint8_npy_is_dequantised_like_the_data_layer(client):
    """8-bit features embed as the loader de-quantises them (YouTube-8M's rule), not as raw 0..255."""
    from avdata.features import dequantize

    q = np.random.default_rng(0).integers(0, 256, size=(2, 128), dtype=np.uint8)
    accept = {**NPY, "accept": "application/x-npy"}
    got = client.post("/v1/embed?modality=audio", content=npy_bytes(q), headers=accept)
    want = client.post("/v1/embed?modality=audio", content=npy_bytes(dequantize(q)), headers=accept)
    assert got.status_code == want.status_code == 200
    assert got.content == want.content
