from __future__ import annotations

import json

import numpy as np
import pytest

from index.embedder import Embedder, InputError
from index.store import IndexLoadError, VectorIndex
from avdata.features import load_features
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
    (tmp_path / "items.bin").write_bytes(b"not the table that was saved")
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
    # device="cpu" was asked for, so the CPU on any install ([gpu] included); and what is reported is what runs
    assert embedder.providers == {m: s.get_providers()[0] for m, s in embedder.sessions.items()} == {m: "CPUExecutionProvider" for m in ("audio", "visual")}


def test_an_embedder_asked_for_a_gpu_uses_it_or_says_it_cannot(tiny, caplog):
    """device="auto" runs on CUDA when ONNX Runtime can, else on the CPU with a warning; device="cuda"
    without a CUDA provider is an error. Checked against the provider the sessions really use."""
    import logging

    import onnxruntime as ort

    from index.embedder import ModelError

    with caplog.at_level(logging.INFO, logger="index.embedder"):
        auto = Embedder(tiny.model_dir, device="auto")
    in_use = {m: s.get_providers()[0] for m, s in auto.sessions.items()}
    assert auto.providers == in_use
    fallback = [r for r in caplog.records if "CPU fallback" in r.getMessage()]
    if set(in_use.values()) == {"CUDAExecutionProvider"}:
        assert not fallback
    else:  # no GPU here (or onnxruntime without CUDA): the fallback is said, as a warning, with the providers
        assert set(in_use.values()) == {"CPUExecutionProvider"}
        assert [r.levelno for r in fallback] == [logging.WARNING] and "CPUExecutionProvider" in fallback[0].getMessage()
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(ModelError, match=r"device 'cuda' requested but onnxruntime offers only .*install the gpu extra"):
            Embedder(tiny.model_dir, device="cuda")
    else:
        assert Embedder(tiny.model_dir, device="cuda").providers == in_use


def _clustered(rng, n, d, n_clusters=50):
    centres = _unit(rng, n_clusters, d)
    x = centres[rng.integers(0, n_clusters, n)] + 0.3 * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _recall_at_10(got: list[list[str]], want: list[list[str]]) -> float:
    return float(np.mean([len(set(g[:10]) & set(w[:10])) / 10 for g, w in zip(got, want)]))


# Recall@10 of this test's setup measured over data seeds 0-19 (faiss 1.15.1, 1 and 2 threads alike),
# before / after the removals: IVF32,Flat nprobe 8: min 0.860 / 0.862, mean 0.90, seed 3 0.902 / 0.904;
# IVF32,PQ8x8 nprobe 8: min 0.776 / 0.788, mean 0.80, seed 3 0.808 / 0.800; HNSW16 efSearch 64: min
# 0.990 / 0.988, seed 3 1.000 / 0.996. Each threshold sits a few points under the minimum over seeds,
# so the fixed seed 3 passes with a margin (IVF 7, PQ 5, HNSW 3.6 points) while a lost search
# parameter still fails (seed 3: nprobe 2 gives 0.50 / 0.49, HNSW's default efSearch 16 0.89).
SEED = 3


@pytest.mark.parametrize(
    ("factory", "params", "min_recall"),
    [("IVF32,Flat", {"nprobe": 8}, 0.83), ("IVF32,PQ8x8", {"nprobe": 8}, 0.75), ("HNSW16", {"efSearch": 64}, 0.96)],
)
def test_approximate_indexes_recall_remove_and_reload(tmp_path, factory, params, min_recall):
    """Each approximate index against exact search, before and after removals, and across a save."""
    rng = np.random.default_rng(SEED)
    gallery, queries = _clustered(rng, 4000, 16), _clustered(rng, 50, 16)
    ids = [f"c{i}" for i in range(len(gallery))]
    exact = VectorIndex.build(gallery, ids)
    index = VectorIndex.build(gallery, ids, factory, metadata=[{"n": i} for i in range(len(ids))])
    index.set_search_params(**params)
    assert _recall_at_10(index.search(queries, 10)[1], exact.search(queries, 10)[1]) >= min_recall

    gone = [ids[i] for i in range(0, 4000, 7)]  # 1/7 of the items: below the compaction threshold
    assert index.remove(gone) == gone and exact.remove(gone) == gone
    assert len(index) == 4000 - len(gone) and index.info["count"] == len(index)
    _, got = index.search(queries, 10)
    assert not set(gone) & {i for row in got for i in row}  # removed items never come back
    assert _recall_at_10(got, exact.search(queries, 10)[1]) >= min_recall
    with pytest.raises(KeyError):
        index.get(gone[0])
    assert index.get("c1").metadata == {"n": 1}
    if factory != "IVF32,PQ8x8":  # PQ codes reconstruct only approximately
        np.testing.assert_allclose(index.get("c1").vector, gallery[1], atol=1e-6)

    loaded = VectorIndex.load(index.save(tmp_path / "ix"))
    assert loaded.info["search_params"] == params and loaded.search(queries, 10)[1] == got
    loaded.upsert(gallery[:1], [gone[0]])  # a removed id can come back, under a new label
    assert loaded.search(gallery[:1], 1)[1][0][0] in {gone[0], "c0"}


def test_hnsw_tombstones_compact_and_filter():
    rng = np.random.default_rng(4)
    gallery = _clustered(rng, 1000, 8)
    ids = [str(i) for i in range(1000)]
    index = VectorIndex.build(gallery, ids, "HNSW16")
    assert not index.can_remove
    index.remove(ids[:100])
    assert index.info["tombstones"] == 100 and index.index.ntotal == 1000  # still in the graph
    _, got = index.search(gallery[:100], 5)
    assert not set(ids[:100]) & {i for row in got for i in row}
    _, got = index.search(gallery[:5], 3, allowed_ids={"0", "500", "501"})  # "0" is removed
    assert all(set(row) == {"500", "501"} for row in got)
    index.remove(ids[100:400])  # 400 tombstones > 25 % of 600 live items: the graph is rebuilt
    assert index.info["tombstones"] == 0 and index.index.ntotal == 600 == len(index)
    _, got = index.search(gallery[400:410], 1)
    assert [row[0] for row in got] == ids[400:410]  # each item finds itself


def test_hnsw_build_params_reach_the_graph_and_survive_save_and_compact(tmp_path):
    import faiss

    gallery = _clustered(np.random.default_rng(6), 600, 8)
    ids = [str(i) for i in range(600)]
    graph = lambda index: faiss.downcast_index(index.index.index).hnsw  # noqa: E731  (under the IDMap2)
    index = VectorIndex.build(gallery, ids, "HNSW16", build_params={"efConstruction": 80})
    assert graph(index).efConstruction == 80
    loaded = VectorIndex.load(index.save(tmp_path / "i"))
    assert loaded.info["build_params"] == {"efConstruction": 80}
    loaded.remove(ids[:200])  # > 25 % tombstones: rebuilt with the same build parameters
    assert loaded.info["tombstones"] == 0 and graph(loaded).efConstruction == 80
    with pytest.raises(ValueError, match="does not apply"):
        VectorIndex.build(gallery, ids, "Flat", build_params={"efConstruction": 80})
    with pytest.raises(ValueError, match="does not apply"):
        VectorIndex.build(gallery, ids, "HNSW16", build_params={"efSearch": 80})


def test_search_params_validated_and_per_call():
    rng = np.random.default_rng(5)
    gallery = _clustered(rng, 2000, 8)
    index = VectorIndex.build(gallery, [str(i) for i in range(2000)], "IVF64,Flat")
    with pytest.raises(ValueError, match="does not apply"):
        index.set_search_params(efSearch=10)
    _, narrow = index.search(gallery[:20], 10, params={"nprobe": 1})
    _, wide = index.search(gallery[:20], 10, params={"nprobe": 64})  # all lists: exact
    exact = VectorIndex.build(gallery, [str(i) for i in range(2000)]).search(gallery[:20], 10)[1]
    assert wide == exact and _recall_at_10(narrow, exact) < 1.0
    assert index.info["search_params"] == {}  # per-call parameters are not kept


def _fallback_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "index.store" and "on the CPU" in r.getMessage()]


def test_search_device_is_the_gpu_when_faiss_has_one_else_the_cpu_fallback_is_logged(monkeypatch, caplog):
    import logging

    import faiss

    from index import store

    monkeypatch.setitem(store._said, "no_gpu", False)  # said once per process: make this the first search
    gallery, queries = _unit(np.random.default_rng(6), 50, 4), _unit(np.random.default_rng(7), 3, 4)
    index = VectorIndex.build(gallery, [str(i) for i in range(50)])
    with caplog.at_level(logging.INFO, logger="index.store"):
        _, got = index.search(queries, 3)
    assert got == [[str(j) for j in row] for row in np.argsort(-(queries @ gallery.T), axis=1)[:, :3]]
    if faiss.get_num_gpus() > 0:
        assert index.info["search_device"] == "cuda:0" and _fallback_lines(caplog) == []
    else:
        assert index.info["search_device"] == "cpu"
        assert _fallback_lines(caplog) == ["faiss sees no GPU (faiss-cpu, or no CUDA device): indexes search on the CPU"]


@pytest.mark.parametrize(("factory", "copy_fails", "line"), [
    ("Flat", True, "faiss GPU copy of Flat failed (no CUDA device found): searching on the CPU"),
    ("HNSW8", False, "faiss has no GPU version of HNSW8: searching on the CPU"),
], ids=["copy-fails", "hnsw-stays-on-cpu"])
def test_a_gpu_copy_that_fails_or_stays_on_the_cpu_falls_back_and_says_so(monkeypatch, caplog, factory, copy_fails, line):
    """faiss reports a GPU but the copy fails (no device, out of memory) or yields a CPU index (HNSW):
    the search still runs, on the CPU, with a warning. Runs on any machine: faiss's GPU calls are stubbed."""
    import logging

    import faiss

    def to_gpu(resources, device, index):
        if copy_fails:
            raise RuntimeError("no CUDA device found")
        return index  # what faiss-gpu does for an index type it cannot move

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1, raising=False)
    monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", to_gpu, raising=False)
    gallery = _unit(np.random.default_rng(8), 50, 4)
    index = VectorIndex.build(gallery, [str(i) for i in range(50)], factory)
    with caplog.at_level(logging.WARNING, logger="index.store"):
        _, got = index.search(gallery[:3], 1)
    assert [row[0] for row in got] == ["0", "1", "2"]
    assert index.info["search_device"] == "cpu" and _fallback_lines(caplog) == [line]


def test_embedder_refuses_a_manifest_that_does_not_match_the_graph(tiny, tmp_path):
    import shutil

    from index.embedder import ModelError

    model = shutil.copytree(tiny.model_dir, tmp_path / "model")
    manifest = json.loads((model / "manifest.json").read_text())
    manifest["input_dims"]["audio"] = 127
    (model / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="re-export"):
        Embedder(model, device="cpu")


@pytest.mark.parametrize("factory", ["Flat", "HNSW16", "IVF16,Flat"])
def test_metadata_filter_equals_exact_search_over_the_matching_items(factory):
    rng = np.random.default_rng(8)
    gallery, queries = _clustered(rng, 3000, 8), _clustered(rng, 10, 8)
    ids = [f"m{i}" for i in range(3000)]
    metadata = [{"g": i % 5, "odd": bool(i % 2)} if i % 3 else None for i in range(3000)]
    index = VectorIndex.build(gallery, ids, factory, metadata=metadata)
    index.remove(ids[:30])
    for where in ({"g": 2}, {"g": 1, "odd": True}, {"odd": 1}):
        keep = [i for i in range(30, 3000) if metadata[i] and all(type(metadata[i][k]) is type(v) and metadata[i][k] == v for k, v in where.items())]
        scores, got, meta = index.search_with_metadata(queries, 10, where=where)
        if not keep:
            assert got == [[] for _ in queries]
            continue
        exact = queries @ gallery[keep].T
        want = np.argsort(-exact, axis=1)[:, :10]
        assert got == [[ids[keep[r]] for r in row] for row in want]
        assert meta == [[metadata[keep[r]] for r in row] for row in want]


def test_an_index_saved_before_the_item_table_still_loads(tmp_path):
    """The old layout: index.faiss + items.json (id -> label, metadata, HNSW tombstones)."""
    import hashlib

    import faiss

    vectors = _unit(np.random.default_rng(9), 5, 4)
    graph = faiss.IndexIDMap2(faiss.index_factory(4, "HNSW8", faiss.METRIC_INNER_PRODUCT))
    graph.add_with_ids(vectors, np.arange(5, dtype=np.int64))
    blobs = {
        "index.faiss": faiss.serialize_index(graph).tobytes(),
        "items.json": json.dumps({"labels": {"a": 0, "c": 2, "d": 3, "e": 4}, "metadata": {"c": {"t": 1}}, "tombstones": [1]}).encode(),
    }
    for name, blob in blobs.items():
        (tmp_path / name).write_bytes(blob)
    info = {"factory": "HNSW8", "metric": "inner_product", "count": 4, "dim": 4, "manifest_sha256": "m" * 64, "build_params": {}, "search_params": {},
            "sha256": {name: hashlib.sha256(blob).hexdigest() for name, blob in blobs.items()}}
    (tmp_path / "info.json").write_text(json.dumps(info))
    old = VectorIndex.load(tmp_path, expected_manifest_hash="m" * 64)
    assert old.ids() == ["a", "c", "d", "e"] and old.tombstones == 1 and old.get("c").metadata == {"t": 1}
    _, got = old.search(vectors, 5)
    assert all("b" not in row and len(row) == 4 for row in got) and [row[0] for row in got[2:]] == ["c", "d", "e"]
    old.upsert(vectors[1:2], ["b"])  # a new label past the tombstone
    assert old.save(tmp_path) and not (tmp_path / "items.json").exists()
    again = VectorIndex.load(tmp_path)
    assert again.ids() == ["a", "c", "d", "e", "b"] and again.search(vectors[1:2], 1)[1] == [["b"]]


def test_a_failed_upsert_leaves_the_index_as_it_was():
    rng = np.random.default_rng(10)
    vectors = _unit(rng, 20, 4)
    index = VectorIndex.build(vectors[:10], [str(i) for i in range(10)], metadata=[{"i": i} for i in range(10)])
    before = index.search(vectors, 3)
    with pytest.raises(ValueError, match="not a JSON object"):
        index.upsert(vectors[10:12], ["3", "new"], metadata=[{"bad": {1, 2}}, None])  # a set is not JSON
    assert len(index) == 10 and index.get("3").metadata == {"i": 3}
    assert index.search(vectors, 3)[1] == before[1] and index.search(vectors, 3, where={})[1] == before[1]


def test_flat_removals_are_tombstones_skipped_exactly_then_compacted(tmp_path, monkeypatch):
    """A flat removal leaves the row (removing it moves the whole array: O(N) a call); searches skip
    it exactly, and past COMPACT_FRACTION of the items the index is rebuilt once."""
    import index.store as store

    monkeypatch.setattr(store, "COMPACT_FRACTION", 50 / 345)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((400, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = [f"i{j}" for j in range(400)]
    index = VectorIndex.build(x, ids, "Flat")
    queries = x[:5] + 0.01  # each query's own item is its best hit
    index.remove(ids[:5] + ids[10:40])
    assert index.tombstones == 35 and index.index.ntotal == 400 and len(index) == 365
    live = np.array([j for j in range(400) if not (j < 5 or 10 <= j < 40)])
    for batch in (queries[:1], queries, np.repeat(queries, 4, axis=0)):  # one-query and GEMM paths
        scores, found = index.search(batch, 10)
        expected = live[np.argsort(-(batch @ x[live].T), axis=1, kind="stable")[:, :10]]
        assert [[int(i[1:]) for i in row] for row in found] == expected.tolist()
        np.testing.assert_allclose(scores, np.take_along_axis(batch @ x.T, expected, 1), atol=1e-5)
    index.save(tmp_path / "f")
    loaded = VectorIndex.load(tmp_path / "f")
    assert loaded.tombstones == 35 and loaded.search(queries[:1], 3)[1] == index.search(queries[:1], 3)[1]
    index.remove(ids[40:60])  # 55 > 50 / 345 of the 345 left: rebuilt without them
    assert index.tombstones == 0 and index.index.ntotal == len(index) == 345 and "i5" in index and "i45" not in index


def array_addresses(index: VectorIndex) -> dict[str, int]:
    """Where FAISS's growing arrays and the item table's columns live now."""
    import faiss

    base = index._base(index.index)
    arrays = {"id_map": index.index.id_map}
    if isinstance(base, faiss.IndexHNSW):
        arrays.update(neighbors=base.hnsw.neighbors, levels=base.hnsw.levels, offsets=base.hnsw.offsets)
        base = faiss.downcast_index(base.storage)
    arrays["codes"] = base.codes
    columns = {name: getattr(index.items, name) for name in ("_id_bytes", "_id_offsets", "_alive", "_meta_bytes", "_meta_offsets")}
    return {name: int(a.data()) for name, a in arrays.items()} | {name: c._data.ctypes.data for name, c in columns.items() if c is not None}


def moved_arrays(before: dict[str, int], index: VectorIndex) -> list[str]:
    after = array_addresses(index)
    return [name for name, address in before.items() if after[name] != address]


@pytest.mark.parametrize("factory", ["Flat", "HNSW16"])
def test_reserve_makes_writes_after_a_load_copy_nothing_and_changes_no_result(tmp_path, factory):
    rng = np.random.default_rng(0)
    gallery, added, queries = _unit(rng, 3000, 8), _unit(rng, 50, 8), _unit(rng, 20, 8)
    built = VectorIndex.build(gallery, [f"item-{i}" for i in range(3000)], factory=factory, metadata=[{"n": i} for i in range(3000)])
    built.save(tmp_path / "built")
    plain, reserved = VectorIndex.load(tmp_path / "built"), VectorIndex.load(tmp_path / "built")
    reserved.reserve(100)

    moved = {}
    for name, index in (("plain", plain), ("reserved", reserved)):
        before = array_addresses(index)
        for i, vector in enumerate(added):  # one at a time, as the API writes
            index.upsert(vector[None], [f"new-{i}"], [{"new": i}])
        moved[name] = moved_arrays(before, index)
    assert len(moved["plain"]) >= 5  # without room, the first write reallocates (what reserve avoids)
    assert moved["reserved"] == []

    (plain_scores, plain_ids), (reserved_scores, reserved_ids) = plain.search(queries, 10), reserved.search(queries, 10)
    assert reserved_ids == plain_ids and np.array_equal(reserved_scores, plain_scores)
    assert reserved.get("new-7").metadata == {"new": 7} and len(reserved) == 3050
    plain.save(tmp_path / "plain"), reserved.save(tmp_path / "reserved")  # spare room is not saved
    for name in ("index.faiss", "items.bin"):
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "reserved" / name).read_bytes()


def test_a_frozen_copy_saves_the_same_bytes_and_later_changes_do_not_reach_it(tmp_path):
    rng = np.random.default_rng(0)
    index = VectorIndex.build(_unit(rng, 2000, 8), [f"item-{i}" for i in range(2000)], factory="HNSW16", metadata=[{"n": i} for i in range(2000)])
    frozen = index.frozen()
    index.save(tmp_path / "direct")
    index.upsert(_unit(rng, 5, 8), [f"later-{i}" for i in range(5)])
    frozen.save(tmp_path / "frozen")
    for name in ("index.faiss", "items.bin", "info.json"):
        assert (tmp_path / "frozen" / name).read_bytes() == (tmp_path / "direct" / name).read_bytes()
    assert len(VectorIndex.load(tmp_path / "frozen")) == 2000


def test_flat_searches_between_writes_equal_exact_numpy_and_extend_the_views(monkeypatch):
    """The numpy path's transposed copy and tombstone rows follow each write (not rebuilt: O(N) a
    search after a write); every search still equals exact numpy over the live items."""
    import index.store as store

    rng = np.random.default_rng(5)
    vectors = {f"item-{i}": v for i, v in enumerate(_unit(rng, 3000, 8))}
    index = VectorIndex.build(np.stack(list(vectors.values())), list(vectors))
    queries = _unit(rng, 9, 8)

    def check() -> None:
        ids = list(vectors)
        exact = queries @ np.stack([vectors[i] for i in ids]).T
        for batch in (slice(0, 1), slice(0, 9)):  # one-query (transposed) and GEMM paths
            scores, found = index.search(queries[batch], 10)
            want = np.argsort(-exact[batch], axis=1, kind="stable")[:, :10]
            assert found == [[ids[j] for j in row] for row in want]
            np.testing.assert_allclose(scores, np.take_along_axis(exact[batch], want, 1), atol=1e-5)

    check()
    views, columns = index._flat, index._flat._transposed
    for step in range(40):
        if step % 3 == 0:
            new = {f"new-{step}-{j}": v for j, v in enumerate(_unit(rng, 2, 8))}
            index.upsert(np.stack(list(new.values())), list(new))
            vectors.update(new)
        elif step % 3 == 1:  # replace a best hit: its old row becomes a tombstone the search must skip
            item = index.search(queries[step % 9 : step % 9 + 1], 1)[1][0][0]
            vectors[item] = _unit(rng, 1, 8)[0]
            index.upsert(vectors[item][None], [item])
        else:  # remove best hits
            gone = list(dict.fromkeys(row[0] for row in index.search(queries[[0, step % 9]], 1)[1]))
            index.remove(gone)
            for item in gone:
                vectors.pop(item)
        check()
    assert index.tombstones > 20 and index._flat is views and index._flat._transposed is columns
    monkeypatch.setattr(store, "COMPACT_FRACTION", 0.001)
    index.remove(["item-0"])
    vectors.pop("item-0")
    assert index.tombstones == 0 and index._flat is views  # rebuilt: the next search makes new views
    check()
    assert index._flat is not views
