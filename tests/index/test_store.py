from __future__ import annotations

import json

import numpy as np
import pytest

from index.embedder import Embedder, InputError
from index.store import IndexLoadError, VectorIndex
from training.data import load_features
from training.metrics import cross_modal_metrics


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_flat_search_equals_exact_numpy(tmp_path):
    rng = np.random.default_rng(0)
    gallery, queries = _unit(rng, 500, 16), _unit(rng, 20, 16)
    ids = [f"item-{i}" for i in range(500)]
    index = VectorIndex.build(gallery, ids)
    scores, got = index.search(queries, 10)
    exact = queries @ gallery.T
    want_rows = np.argsort(-exact, axis=1)[:, :10]
    assert got == [[ids[r] for r in row] for row in want_rows]
    np.testing.assert_allclose(scores, np.take_along_axis(exact, want_rows, axis=1), atol=1e-5)

    loaded = VectorIndex.load(index.save(tmp_path / "ix"))
    assert loaded.search(queries, 10)[1] == got
    assert loaded.info["count"] == 500 and loaded.info["factory"] == "Flat"


def test_load_refuses_other_model_and_corrupt_files(tmp_path):
    rng = np.random.default_rng(0)
    VectorIndex.build(_unit(rng, 10, 4), [str(i) for i in range(10)], manifest_hash="a" * 64).save(tmp_path)
    with pytest.raises(IndexLoadError, match="rebuild the index"):
        VectorIndex.load(tmp_path, expected_manifest_hash="b" * 64)
    (tmp_path / "items.json").write_text(json.dumps({"labels": {"x": 0}, "metadata": {}}))
    with pytest.raises(IndexLoadError, match="corrupt"):
        VectorIndex.load(tmp_path)
    (tmp_path / "index.faiss").unlink()
    with pytest.raises(IndexLoadError, match="missing"):
        VectorIndex.load(tmp_path)


def test_upsert_remove_get_and_filter(tmp_path):
    rng = np.random.default_rng(1)
    vectors = _unit(rng, 6, 4)
    index = VectorIndex.build(vectors[:4], ["a", "b", "c", "d"], metadata=[{"t": 1}, None, {"t": 2}, None])
    index.upsert(vectors[4:], ["b", "e"], metadata=[{"t": 3}, None])  # b replaced, e added
    assert len(index) == 5 and index.info["count"] == 5
    np.testing.assert_allclose(index.get("b").vector, vectors[4], atol=1e-6)
    assert index.get("b").metadata == {"t": 3} and index.get("d").metadata is None
    assert index.remove(["c", "zz"]) == ["c"]
    with pytest.raises(KeyError):
        index.get("c")
    _, ids = index.search(vectors[4:5], 10)
    assert ids[0][0] == "b" and set(ids[0]) == {"a", "b", "d", "e"}
    _, ids = index.search(vectors[4:5], 10, allowed_ids={"a", "d", "gone"})
    assert sorted(ids[0]) == ["a", "d"]
    loaded = VectorIndex.load(index.save(tmp_path / "ix"))
    assert loaded.search(vectors, 3)[1] == index.search(vectors, 3)[1]
    assert loaded.get("a").metadata == {"t": 1}
    loaded.upsert(vectors[:1], ["f"])  # labels keep growing after a reload, no clash
    assert loaded.get("a").id == "a" and loaded.get("f").id == "f"


def test_retrieval_through_the_index_equals_evaluation(tiny):
    """A→V mAP computed from the index's full ranking equals the evaluation code's mAP."""
    embedder = Embedder(tiny.model_dir, device="cpu")
    test = load_features(tiny.data_dir).subset("test")
    z_a, z_v = embedder.embed("audio", test.audio), embedder.embed("visual", test.visual)
    index = VectorIndex.build(z_v, test.ids)
    _, ranked_ids = index.search(z_a, len(test))
    label_of = dict(zip(test.ids, test.labels))
    aps = []
    for query_label, row in zip(test.labels, ranked_ids):
        relevant = np.array([label_of[i] == query_label for i in row])
        precision = np.cumsum(relevant) / np.arange(1, len(row) + 1)
        aps.append(precision[relevant].mean())
    assert np.mean(aps) == pytest.approx(cross_modal_metrics(z_a, z_v, test.labels)["a2v"], abs=1e-6)


def test_embedder_rejects_bad_input(tiny):
    embedder = Embedder(tiny.model_dir, device="cpu")
    with pytest.raises(InputError, match="128 values"):
        embedder.embed("audio", np.zeros((2, 127)))
    with pytest.raises(InputError, match="NaN"):
        embedder.embed("audio", np.full((1, 128), np.nan))
    with pytest.raises(InputError, match="non-empty"):
        embedder.embed("visual", np.zeros((0, 1024)))
    with pytest.raises(InputError, match="unknown modality"):
        embedder.embed("text", np.zeros((1, 128)))
    assert embedder.providers == {"audio": "CPUExecutionProvider", "visual": "CPUExecutionProvider"}
