"""Every route, checked against slow obvious references (the ONNX embedder and numpy exact search)."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest

from index.embedder import Embedder
from tests.service.conftest import copy_index, make_client, npy_bytes, wait_ready


@pytest.fixture(scope="module")
def reference(tiny, features):
    """Exact cosine search in numpy over embeddings from the ONNX embedder (the slow, obvious path)."""
    embedder = Embedder(tiny.model_dir, device="cpu")
    gallery = {m: embedder.embed(m, getattr(features, m)) for m in ("audio", "visual")}
    return embedder, gallery


def exact_top_k(query_embeddings: np.ndarray, gallery: np.ndarray, ids: list[str], k: int):
    scores = query_embeddings.astype(np.float64) @ gallery.astype(np.float64).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [[ids[j] for j in row] for row in order], np.take_along_axis(scores, order, axis=1)


def test_healthz_and_readyz(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready" and len(ready.json()["model"]) == 12


def test_readyz_is_503_with_the_reason_when_the_model_cannot_load(tiny, tmp_path):
    with make_client(tiny, tmp_path / "no-index") as c:
        for _ in range(200):
            r = c.get("/readyz")
            if "loading failed" in r.text:
                break
        assert r.status_code == 503 and "incomplete index" in r.json()["detail"]
        r = c.post("/v1/search", json={"modality": "audio", "vectors": [[0.0] * 128]})
        assert r.status_code == 503 and "not ready" in r.json()["detail"]


def test_search_matches_exact_numpy_search(client, features, reference):
    embedder, gallery = reference
    queries = features.audio[[0, 7, 42]]
    r = client.post("/v1/search", json={"modality": "audio", "vectors": queries.tolist(), "top_k": 10})
    assert r.status_code == 200, r.text
    body = r.json()
    query_embeddings = embedder.embed("audio", queries)
    want_ids, want_scores = exact_top_k(query_embeddings, gallery["visual"], features.ids, 10)
    row_of = {item_id: i for i, item_id in enumerate(features.ids)}
    assert body["model"] == embedder.manifest_hash[:12]
    for q, (hits, ids, scores) in enumerate(zip(body["results"], want_ids, want_scores)):
        got = [h["score"] for h in hits]
        np.testing.assert_allclose(got, scores, atol=1e-5)  # the exact top-10 scores, best first
        # each returned id really has the score it was given (so ids differ from numpy's only among ties)
        np.testing.assert_allclose([query_embeddings[q] @ gallery["visual"][row_of[h["id"]]] for h in hits], got, atol=1e-5)
        assert len({h["id"] for h in hits}) == 10 and hits[0]["id"] == ids[0]


def test_search_target_threshold_and_top_k(client, features, reference):
    embedder, gallery = reference
    r = client.post("/v1/search", json={"modality": "visual", "vectors": [features.visual[3].tolist()], "target": "visual", "top_k": 4})
    hits = r.json()["results"][0]
    assert len(hits) == 4 and hits[0]["id"] == features.ids[3] and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
    threshold = hits[1]["score"]
    r = client.post("/v1/search", json={"modality": "visual", "vectors": [features.visual[3].tolist()], "target": "visual", "top_k": 4, "score_threshold": threshold})
    assert [h["score"] >= threshold for h in r.json()["results"][0]] == [True, True]


def test_binary_search_gives_the_json_results(client, features):
    queries = features.audio[:5].astype(np.float32)
    as_json = client.post("/v1/search", json={"modality": "audio", "vectors": queries.tolist(), "top_k": 7}).json()
    r = client.post("/v1/search?modality=audio&top_k=7", content=npy_bytes(queries), headers={"content-type": "application/x-npy"})
    assert r.status_code == 200, r.text
    assert [[h["id"] for h in hits] for hits in r.json()["results"]] == [[h["id"] for h in hits] for hits in as_json["results"]]
    one = client.post("/v1/search?modality=audio&top_k=3", content=npy_bytes(queries[0]), headers={"content-type": "application/x-npy"})
    assert len(one.json()["results"]) == 1  # a (D,) array is one query


def test_search_by_stored_id_equals_search_by_its_features(client, features):
    by_vector = client.post("/v1/search", json={"modality": "audio", "vectors": [features.audio[11].tolist()], "top_k": 5}).json()
    by_id = client.post("/v1/search", json={"modality": "audio", "ids": [features.ids[11]], "top_k": 5}).json()
    assert [h["id"] for h in by_id["results"][0]] == [h["id"] for h in by_vector["results"][0]]
    r = client.post("/v1/search", json={"modality": "audio", "ids": ["no-such-clip"], "top_k": 5})
    assert r.status_code == 404 and "no-such-clip" in r.json()["detail"]


def test_embed_json_and_binary_equal_the_onnx_embedder(client, features, reference):
    embedder, _ = reference
    x = features.visual[:3].astype(np.float32)
    r = client.post("/v1/embed", json={"modality": "visual", "vectors": x.tolist()})
    assert r.status_code == 200
    np.testing.assert_allclose(r.json()["embeddings"], embedder.embed("visual", x), atol=1e-5)
    assert r.json()["dim"] == embedder.embedding_dim
    r = client.post("/v1/embed?modality=visual", content=npy_bytes(x), headers={"content-type": "application/x-npy", "accept": "application/x-npy"})
    assert r.headers["content-type"] == "application/x-npy"
    np.testing.assert_allclose(np.load(io.BytesIO(r.content)), embedder.embed("visual", x), atol=1e-6)


def test_items_upsert_get_replace_filter_delete(client, features, reference):
    embedder, _ = reference
    items = [{"id": f"new-{i}", "vector": features.visual[i].tolist(), "metadata": {"genre": "jazz" if i % 2 else "rock", "n": i}} for i in range(4)]
    r = client.post("/v1/items/visual", json={"items": items})
    assert r.status_code == 200 and r.json() == {"upserted": 4, "modality": "visual", "count": len(features) + 4}
    got = client.get("/v1/items/visual/new-1").json()
    assert got["metadata"] == {"genre": "jazz", "n": 1}
    np.testing.assert_allclose(got["embedding"], embedder.embed("visual", features.visual[1:2])[0], atol=1e-6)

    query = {"modality": "audio", "vectors": [features.audio[1].tolist()], "top_k": 10, "filter": {"genre": "jazz"}}
    hits = client.post("/v1/search", json=query).json()["results"][0]
    assert sorted(h["id"] for h in hits) == ["new-1", "new-3"] and all(h["metadata"]["genre"] == "jazz" for h in hits)
    npy = client.post('/v1/search?modality=audio&top_k=10&filter={"genre":"jazz"}', content=npy_bytes(features.audio[1]), headers={"content-type": "application/x-npy"})
    assert sorted(h["id"] for h in npy.json()["results"][0]) == ["new-1", "new-3"]

    r = client.post("/v1/items/visual", json={"items": [{"id": "new-1", "vector": features.visual[9].tolist(), "metadata": {"genre": "pop"}}]})
    assert r.json()["count"] == len(features) + 4  # replaced, not added
    assert client.get("/v1/items/visual/new-1").json()["metadata"] == {"genre": "pop"}
    assert client.post("/v1/search", json=query).json()["results"][0][0]["id"] == "new-3"

    for i in range(4):
        assert client.delete(f"/v1/items/visual/new-{i}").json() == {"deleted": f"new-{i}", "modality": "visual", "count": len(features) + 3 - i}
    r = client.get("/v1/items/visual/new-0")
    assert r.status_code == 404 and "new-0" in r.json()["detail"]
    assert client.delete("/v1/items/visual/new-0").status_code == 404


def test_info_reports_model_sizes_and_providers(client, features, reference):
    embedder, _ = reference
    info = client.get("/v1/info").json()
    assert info["model_sha256"] == embedder.manifest_hash and info["manifest"]["embedding_dim"] == embedder.embedding_dim
    assert info["index_sizes"] == {"audio": len(features), "visual": len(features)}
    sessions = client.app.state.avsearch.collection.embedder.sessions  # what really runs (CUDA on a [gpu] install with a GPU)
    assert info["providers"] == {m: s.get_providers()[0] for m, s in sessions.items()} and set(info["providers"]) == {"audio", "visual"}
    assert info["limits"]["max_top_k"] == 50


def test_metrics_count_routes_statuses_batches_and_index_size(client, features):
    client.post("/v1/search", json={"modality": "audio", "vectors": [features.audio[0].tolist()]})
    client.post("/v1/search", json={"modality": "audio", "vectors": [[0.0] * 3]})
    text = client.get("/metrics").text
    assert 'avsearch_requests_total{method="POST",route="/v1/search",status="200"}' in text
    assert 'avsearch_requests_total{method="POST",route="/v1/search",status="422"}' in text
    assert 'avsearch_request_duration_seconds_bucket{le="0.005",method="POST",route="/v1/search"}' in text
    assert "avsearch_batch_vectors_count" in text
    assert f'avsearch_index_items{{modality="visual"}} {float(len(features))}' in text


def test_concurrent_requests_are_batched_and_answered_alike(tiny, tmp_path, features):
    index_dir = copy_index(tiny, tmp_path / "index")
    with make_client(tiny, index_dir, batch_window_ms=100) as c:  # the widest allowed: on a loaded machine 12 threads' requests spread over tens of ms
        wait_ready(c)
        bodies = [{"modality": "audio", "vectors": [features.audio[i].tolist()], "top_k": 3 + i % 3} for i in range(12)]
        alone = [c.post("/v1/search", json=b).json() for b in bodies]
        together: list = [None] * len(bodies)
        start = threading.Barrier(len(bodies))

        def send(i: int) -> None:
            start.wait()  # all at once, not as each thread happens to start
            together[i] = c.post("/v1/search", json=bodies[i]).json()

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for got, want in zip(together, alone):  # each request gets its own top_k back from the shared batch
            assert [h["id"] for h in got["results"][0]] == [h["id"] for h in want["results"][0]]
            np.testing.assert_allclose([h["score"] for h in got["results"][0]], [h["score"] for h in want["results"][0]], atol=1e-5)
        metrics = c.get("/metrics").text
        count = float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith("avsearch_batch_requests_count")))
        total = float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith("avsearch_batch_requests_sum")))
        assert total == 2 * len(bodies) and count < total  # some batch held more than one request


def test_openapi_and_docs(client):
    spec = client.get("/openapi.json").json()
    assert {"/v1/search", "/v1/embed", "/v1/items/{modality}", "/v1/items/{modality}/{item_id}", "/v1/info", "/v1/admin/reload", "/readyz", "/metrics"} <= set(spec["paths"])
    assert set(spec["paths"]["/v1/search"]["post"]["requestBody"]["content"]) == {"application/json", "application/x-npy"}
    assert "SearchRequest" in spec["components"]["schemas"]
    assert spec["paths"]["/v1/search"]["post"]["security"] == [{"bearer": []}] and "security" not in spec["paths"]["/healthz"]["get"]
    assert client.get("/docs").status_code == 200


@pytest.mark.parametrize(
    "array",
    [np.ones((1, 128), np.float32), np.arange(128, dtype=np.float64), np.ones((3, 5), np.float16).T, np.zeros((0, 128), np.float32), np.arange(6, dtype=">f4").reshape(2, 3)],
    ids=["f32 2-D", "f64 1-D", "f16 Fortran order", "empty", "big-endian"],
)
def test_npy_parsing_matches_numpy_load(array):
    from service.bodies import parse_npy

    got = parse_npy(npy_bytes(array))
    want = np.load(io.BytesIO(npy_bytes(array))).astype(np.float32)
    assert got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_array_equal(got, want.reshape(got.shape))


def test_the_threads_that_search_and_insert_use_search_threads(tiny, tmp_path):
    """OpenMP's thread count is a per-thread setting: set only in the main thread (as it was), it never
    reached the batcher's thread, where FAISS searches, nor asyncio.to_thread's, where inserts run,
    which kept OMP_NUM_THREADS or one thread per core."""
    import asyncio

    import faiss

    with make_client(tiny, copy_index(tiny, tmp_path / "index"), search_threads=5) as client:
        state = client.app.state.avsearch
        assert state.batcher._executor.submit(faiss.omp_get_max_threads).result() == 5
        assert client.portal.call(asyncio.to_thread, faiss.omp_get_max_threads) == 5
    assert faiss.omp_get_max_threads() != 5  # the test's own thread is left as it was
