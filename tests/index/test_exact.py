"""The numpy exact search against a full argsort and against faiss's flat index."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

import index.exact as exact_module
from index.exact import top_k_inner_product


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("n_queries", [1, 3, 9, 200])  # the matvec path (≤ 8) and the blocked GEMM path
@pytest.mark.parametrize("block_rows", [None, 1000])
@pytest.mark.parametrize("transposed", [False, True])  # the column-major matvec for narrow embeddings
def test_equals_full_argsort_and_faiss(n_queries, block_rows, transposed):
    rng = np.random.default_rng(n_queries)
    database, queries = _unit(rng, 20011, 16), _unit(rng, n_queries, 16)
    columns = np.ascontiguousarray(database.T) if transposed else None
    scores, rows = top_k_inner_product(database, queries, 10, block_rows=block_rows, transposed=columns)
    exact = queries.astype(np.float64) @ database.T.astype(np.float64)
    want_rows = np.argsort(-exact, axis=1)[:, :10]
    np.testing.assert_array_equal(rows, want_rows)  # continuous random data: no ties
    np.testing.assert_allclose(scores, np.take_along_axis(exact, want_rows, 1), atol=1e-5)
    flat = faiss.IndexFlatIP(16)
    flat.add(database)
    faiss_scores, faiss_rows = flat.search(queries, 10)
    np.testing.assert_array_equal(rows, faiss_rows)
    np.testing.assert_allclose(scores, faiss_scores, atol=1e-5)


@pytest.mark.parametrize("n_queries", [1, 9])
@pytest.mark.parametrize("skipped", ["few", "most", "the first block"])
def test_skipped_rows_are_never_returned_and_the_rest_is_exact(n_queries, skipped, monkeypatch):
    rng = np.random.default_rng(7)
    database, queries = _unit(rng, 20011, 8), _unit(rng, n_queries, 8)
    best = np.argsort(-(queries @ database.T), axis=1)[:, :10].ravel()
    skip = {
        "few": np.unique(np.concatenate([best, rng.choice(20011, 50, replace=False)])),  # the true best rows among them
        "most": np.setdiff1d(np.arange(20011), rng.choice(20011, 30, replace=False)),
        "the first block": np.arange(6000),  # more than the sample that seeds the selection bound
    }[skipped]
    kept = np.setdiff1d(np.arange(20011), skip)
    exact = queries.astype(np.float64) @ database[kept].T.astype(np.float64)
    want_rows = kept[np.argsort(-exact, axis=1)[:, :10]]
    candidates = []
    real_sorted_top = exact_module._sorted_top
    monkeypatch.setattr(exact_module, "_sorted_top", lambda s, r, k: candidates.append(len(s)) or real_sorted_top(s, r, k))
    for columns in (None, np.ascontiguousarray(database.T)):
        for block_rows in (None, 1000):
            scores, rows = top_k_inner_product(database, queries, 10, block_rows=block_rows, transposed=columns, skip_rows=skip)
            np.testing.assert_array_equal(rows, want_rows)
            np.testing.assert_allclose(scores, np.sort(exact, axis=1)[:, ::-1][:, :10], atol=1e-5)
    assert max(candidates, default=0) < 2000  # the selection bound is seeded from rows that are not skipped


def test_small_database_duplicates_and_k_larger_than_n():
    rng = np.random.default_rng(0)
    database = np.repeat(_unit(rng, 3, 4), 2, axis=0)  # every vector twice: ties
    for queries in (database[:1], np.repeat(database, 3, axis=0)):
        scores, rows = top_k_inner_product(database, queries, 50)
        assert scores.shape == (len(queries), 6) and rows.shape == (len(queries), 6)
        assert all(sorted(r) == list(range(6)) for r in rows.tolist())
        assert np.all(np.diff(scores, axis=1) <= 1e-7)  # best first
        np.testing.assert_allclose(scores, np.sort(queries @ database.T, axis=1)[:, ::-1], atol=1e-6)


def test_rejects_mismatched_widths():
    with pytest.raises(ValueError, match="same width"):
        top_k_inner_product(np.zeros((4, 3), np.float32), np.zeros((1, 2), np.float32), 1)
    with pytest.raises(ValueError, match="not the transpose"):
        top_k_inner_product(np.zeros((4, 3), np.float32), np.zeros((1, 3), np.float32), 1, transposed=np.zeros((3, 5), np.float32))


@pytest.mark.parametrize("n_queries", [1, 9])  # the matvec path and the blocked GEMM path
@pytest.mark.parametrize("k", [3, 40])  # fewer than the finite rows, and every row
def test_nan_rows_and_queries_rank_last_and_fail_nothing(n_queries, k):
    """A stored NaN row (or a NaN query) scores NaN, which no comparison passes: it ranks as -inf,
    after every finite score, and the other queries of the batch are answered exactly."""
    rng = np.random.default_rng(3)
    database, queries = _unit(rng, 40, 8), _unit(rng, n_queries, 8)
    database[[0, 5, 17]] = np.nan
    queries[-1] = np.nan
    reference = queries.astype(np.float64) @ database.T.astype(np.float64)
    reference[np.isnan(reference)] = -np.inf
    for columns in (None, np.ascontiguousarray(database.T)):
        scores, rows = top_k_inner_product(database, queries, k, transposed=columns if n_queries == 1 else None)
        assert scores.shape == rows.shape == (n_queries, k)
        want = np.sort(reference, axis=1)[:, ::-1][:, :k]
        np.testing.assert_allclose(scores, want, atol=1e-5)  # -inf where only NaN rows are left
        np.testing.assert_allclose(np.take_along_axis(reference, rows, 1), want, atol=1e-5)  # the rows carry those scores
