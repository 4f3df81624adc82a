"""Finite features that the encoder turns into NaN or Inf are refused with 422 at upsert, search and
embed, and one such query in a micro-batch fails that query alone (issue 21, item 8)."""

from __future__ import annotations

import json

import numpy as np

from index.embedder import InputError
from service.batching import SearchJob, run_batch
from tests.service.conftest import copy_index, make_client, wait_ready

HUGE = 3e38  # finite in float32; the encoder's sums overflow


def _huge(width: int) -> list[float]:
    return [HUGE] * width


def test_the_precondition_huge_features_embed_to_nan(client):
    embedder = client.app.state.avsearch.collection.embedder
    raw = embedder.sessions["audio"].run(None, {"features": np.full((1, embedder.input_dims["audio"]), HUGE, np.float32)})[0]
    assert not np.isfinite(raw).all()


def test_non_finite_embeddings_are_refused_at_every_door(client, features):
    width = len(features.audio[0])
    for route, body, first_bad in (
        ("/v1/items/audio", {"items": [{"id": "ok", "vector": features.audio[0].tolist()}, {"id": "huge", "vector": _huge(width)}]}, 1),
        ("/v1/search", {"modality": "audio", "vectors": [features.audio[0].tolist(), _huge(width)], "top_k": 3}, 1),
        ("/v1/embed", {"modality": "audio", "vectors": [_huge(width)]}, 0),
    ):
        r = client.post(route, json=body)
        assert r.status_code == 422 and "embeds to NaN or Inf" in r.json()["detail"] and f"vector {first_bad}" in r.json()["detail"], (route, r.status_code, r.text)
    assert client.get("/v1/items/audio/ok").status_code == 404  # nothing of the refused upsert was logged or applied


def test_one_bad_query_fails_alone_in_its_batch(client, features):
    collection = client.app.state.avsearch.collection
    good = SearchJob("audio", "visual", 3, features.audio[:2])
    bad = SearchJob("audio", "visual", 3, np.full((1, features.audio.shape[1]), HUGE, np.float32))
    results = run_batch(collection, [good, bad, good])
    assert isinstance(results[1], InputError) and "NaN or Inf" in str(results[1])
    for result in (results[0], results[2]):
        hits = json.loads(result)["results"]
        assert len(hits) == 2 and all(len(row) == 3 for row in hits)


def test_a_stored_nan_row_ranks_last_and_breaks_no_search(tiny, tmp_path, features):
    """An index written before this check (or by a batch job) may hold a NaN embedding: a search that
    reaches it still answers, every finite score first."""
    with make_client(tiny, copy_index(tiny, tmp_path / "index")) as c:
        wait_ready(c)
        index = c.app.state.avsearch.collection.shards["visual"].index
        index.upsert(np.full((1, index.dim), np.nan, np.float32), ["nan-row"], [None])
        r = c.post("/v1/search", json={"modality": "audio", "vectors": [features.audio[0].tolist()] * 2, "top_k": len(index)})
        assert r.status_code == 200, r.text
        for row in r.json()["results"]:
            assert len(row) == len(index) and row[-1]["id"] == "nan-row"
            finite = [hit["score"] for hit in row[:-1]]
            assert finite == sorted(finite, reverse=True) and all(isinstance(s, float) for s in finite)
