"""Every route through ``Client`` against a real server, each checked against the raw HTTP answer."""

from __future__ import annotations

import tarfile

import httpx
import numpy as np
import pytest

from avsearch_client import Client, Hit, NotFound
from tests.client.conftest import DIMS


@pytest.fixture(scope="module")
def client(server):
    with Client(server.url) as c:
        yield c


@pytest.fixture(scope="module")
def raw(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def rows(n: int, modality: str, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, DIMS[modality])).astype(np.float32)


def reference_search(raw: httpx.Client, body: dict) -> list[list[dict]]:
    answer = raw.post("/v1/search", json=body)
    assert answer.status_code == 200, answer.text
    return answer.json()["results"]


def as_dicts(results) -> list[list[dict]]:
    return [[{"id": h.id, "score": h.score, "metadata": h.metadata} for h in hits] for hits in results]


def same_hits(got, expected) -> None:
    assert [[h["id"] for h in q] for q in as_dicts(got)] == [[h["id"] for h in q] for q in expected]
    for mine, theirs in zip(as_dicts(got), expected):
        np.testing.assert_allclose([h["score"] for h in mine], [h["score"] for h in theirs], rtol=1e-5, atol=1e-6)
        assert [h["metadata"] for h in mine] == [h["metadata"] for h in theirs]


def test_search_by_vectors_matches_a_plain_json_call_npy_and_json_alike(client, raw):
    queries = rows(5, "audio", 0)
    expected = reference_search(raw, {"modality": "audio", "vectors": queries.tolist(), "top_k": 7})
    for binary in (True, False):
        got = client.search("audio", queries, top_k=7, binary=binary)
        assert len(got) == 5 and all(len(h) == 7 for h in got)
        same_hits(got, expected)
        assert isinstance(got[0][0], Hit) and got.model == client.info().model
    assert got.ids.shape == (5, 7) and got.scores.dtype == np.float32
    assert got.ids[2, 3] == got[2][3].id and got.scores[2, 3] == np.float32(got[2][3].score)
    np.testing.assert_array_equal(got[1].ids, got.ids[1])


def test_one_row_gives_one_list(client, raw):
    query = rows(1, "visual", 1)[0]
    got = client.search("visual", query, top_k=3)
    assert len(got) == 1
    same_hits(got, reference_search(raw, {"modality": "visual", "vectors": [query.tolist()], "top_k": 3}))


def test_many_queries_are_split_under_the_server_limit_in_order(client, raw):
    queries = rows(150, "audio", 2)  # the server takes 64 vectors a request
    got = client.search("audio", queries, top_k=4)
    expected = []
    for start in range(0, 150, 64):
        expected += reference_search(raw, {"modality": "audio", "vectors": queries[start : start + 64].tolist(), "top_k": 4})
    assert len(got) == 150
    same_hits(got, expected)


def test_visual_queries_over_the_byte_limit_are_split_too(client, raw):
    queries = rows(120, "visual", 3)  # 120 x 4 KiB > 400 000 bytes: the byte limit splits first
    got = client.search("visual", queries, top_k=2)
    expected = []
    for start in range(0, 120, 10):  # as JSON, 10 rows fit
        expected += reference_search(raw, {"modality": "visual", "vectors": queries[start : start + 10].tolist(), "top_k": 2})
    same_hits(got, expected)
    same_hits(client.search("visual", queries, top_k=2, binary=False), expected)  # JSON: ~20 bytes a value, smaller requests


def test_search_by_ids_target_threshold_and_filter(client, raw):
    ids = ["clip-000001", "clip-000002"]
    for target in (None, "audio"):
        body = {"modality": "audio", "ids": ids, "top_k": 5, **({"target": target} if target else {})}
        same_hits(client.search("audio", ids=ids, top_k=5, target=target), reference_search(raw, body))
    same_modality = client.search("audio", ids=ids, top_k=1, target="audio")
    assert same_modality.ids[:, 0].tolist() == ids  # an item finds itself first
    cut = client.search("audio", ids=ids, top_k=50, score_threshold=0.7)
    same_hits(cut, reference_search(raw, {"modality": "audio", "ids": ids, "top_k": 50, "score_threshold": 0.7}))
    assert all(h.score >= 0.7 for hits in cut for h in hits)
    widths = [len(h) for h in cut]
    if min(widths) < max(widths):  # ragged rows are padded in the batch views
        short = int(np.argmin(widths))
        assert cut.ids[short, -1] is None and np.isnan(cut.scores[short, -1])
    tagged = rows(3, "visual", 4)
    client.upsert("visual", ["tag-a", "tag-b", "tag-c"], tagged, [{"genre": "jazz"}, {"genre": "rock"}, {"genre": "jazz"}])
    query = rows(2, "audio", 5)
    for binary in (True, False):
        got = client.search("audio", query, top_k=10, filter={"genre": "jazz"}, binary=binary)
        assert {h.id for hits in got for h in hits} == {"tag-a", "tag-c"}
        assert all(h.metadata == {"genre": "jazz"} for hits in got for h in hits)
    same_hits(got, reference_search(raw, {"modality": "audio", "vectors": query.tolist(), "top_k": 10, "filter": {"genre": "jazz"}}))


def test_embed_matches_json_and_splits(client, raw):
    vectors = rows(100, "audio", 6)
    got = client.embed("audio", vectors)
    expected = np.array(raw.post("/v1/embed", json={"modality": "audio", "vectors": vectors[:64].tolist()}).json()["embeddings"], dtype=np.float32)
    assert got.shape == (100, 8) and got.dtype == np.float32
    np.testing.assert_allclose(got[:64], expected, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)


def test_upsert_get_delete(client, raw):
    vectors = rows(2, "visual", 7)
    done = client.upsert("visual", ["it-1", "it-2"], vectors, [{"k": 1}, None])
    assert (done.upserted, done.requests) == (2, 1)
    assert done.count == raw.get("/v1/info").json()["index_sizes"]["visual"]
    item = client.get("visual", "it-1")
    assert (item.id, item.modality, item.metadata) == ("it-1", "visual", {"k": 1})
    np.testing.assert_allclose(item.embedding, client.embed("visual", vectors[0])[0], atol=1e-6)
    assert client.get("visual", "it-2").metadata is None
    gone = client.delete("visual", "it-1")
    assert (gone.id, gone.modality, gone.count) == ("it-1", "visual", done.count - 1)
    with pytest.raises(NotFound):
        client.get("visual", "it-1")
    odd = "b?c d#é%"  # quoted into the path (a "/" is not routable by the server: see the client README)
    client.upsert("audio", [odd], rows(1, "audio", 8))
    assert client.get("audio", odd).id == odd
    assert client.delete("audio", odd).id == odd


def test_upsert_packs_by_count_and_by_bytes_and_reports_progress(client):
    seen = []
    audio = client.upsert("audio", [f"pa-{i}" for i in range(150)], rows(150, "audio", 9), progress=lambda done, total: seen.append((done, total)))
    assert audio.requests == 3 and [d for d, _ in seen] == [64, 128, 150] and {t for _, t in seen} == {150}  # 64 a request
    visual = client.upsert("visual", [f"pv-{i}" for i in range(100)], rows(100, "visual", 10))
    assert visual.requests > 2  # ~22 KB of JSON an item: the 400 000-byte limit cuts first
    small = client.upsert("audio", [f"pb-{i}" for i in range(10)], rows(10, "audio", 11), batch_size=4)
    assert small.requests == 3
    seen.clear()
    many = client.upsert("audio", [f"pc-{i}" for i in range(300)], rows(300, "audio", 14), concurrency=3, progress=lambda done, total: seen.append(done))
    assert many.requests == 5 and seen == [192, 300] and many.count == client.info().index_sizes["audio"]  # 64 a request, 3 at once
    assert [client.get("audio", f"pc-{i}").id for i in (0, 63, 64, 191, 192, 299)] == [f"pc-{i}" for i in (0, 63, 64, 191, 192, 299)]


def test_info_health_ready(client, raw):
    info = client.info()
    expected = raw.get("/v1/info").json()
    assert (info.model, info.index_sizes, info.providers) == (expected["model"], expected["index_sizes"], expected["providers"])
    assert (info.limits.max_vectors, info.limits.max_body_bytes, info.limits.max_top_k) == (64, 400000, 200)
    assert info.manifest["input_dims"] == DIMS
    assert client.health() is True
    assert client.ready() == info.model == client.wait_until_ready(5)


def test_reload_swaps_and_keeps_items(client):
    client.upsert("audio", ["before-reload"], rows(1, "audio", 12))
    reloaded = client.reload()
    assert reloaded.model == reloaded.previous_model == client.info().model
    assert client.get("audio", "before-reload").id == "before-reload"
    assert reloaded.index_sizes == client.info().index_sizes


def test_snapshots_create_list_download_delete(client, tmp_path):
    client.upsert("visual", ["snap-item"], rows(1, "visual", 13))
    snap = client.create_snapshot()
    assert snap.items == client.info().index_sizes
    assert snap.name in [s.name for s in client.list_snapshots()]
    path = client.download_snapshot(snap.name, tmp_path / "backup.tar")
    assert path.stat().st_size == snap.bytes
    assert [p.name for p in tmp_path.iterdir()] == ["backup.tar"]  # nothing partial left beside it
    with tarfile.open(path) as tar:
        assert "avsearch-snapshot.json" in tar.getnames()
    with pytest.raises(NotFound):
        client.download_snapshot("20200101T000000-000000-000000000000", tmp_path / "missing.tar")
    assert not (tmp_path / "missing.tar").exists()
    client.delete_snapshot(snap.name)
    assert snap.name not in [s.name for s in client.list_snapshots()]


def test_argument_mistakes_are_caught_before_sending(client):
    with pytest.raises(ValueError, match="exactly one"):
        client.search("audio")
    with pytest.raises(ValueError, match="modality"):
        client.search("video", rows(1, "audio", 0))
    with pytest.raises(ValueError, match="2 ids for 3 vectors"):
        client.upsert("audio", ["a", "b"], rows(3, "audio", 0))
    with pytest.raises(ValueError, match="repeated"):
        client.upsert("audio", ["a", "a"], rows(2, "audio", 0))
    with pytest.raises(ValueError, match="NaN or Inf in 1 rows .*'b'"):
        client.upsert("audio", ["a", "b"], np.array([[0.0] * 128, [np.inf] * 128]))
    with pytest.raises(ValueError, match="numbers"):
        client.embed("audio", [["x"]])
