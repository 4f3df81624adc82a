from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from training.cca import fit_linear_cca
from training.metrics import cross_modal_metrics, direction_metrics, mean_average_precision, pair_metrics, retrieval_metrics


def _sklearn_map(queries, gallery, q_labels, g_labels):
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    aps = []
    for i in range(len(q)):
        relevant = (q_labels[i] == g_labels) if q_labels.ndim == 1 else (q_labels[i] @ g_labels.T > 0)
        if relevant.any():
            aps.append(average_precision_score(relevant, q[i] @ g.T))
    return float(np.mean(aps))


@pytest.mark.parametrize("n_queries, n_gallery, n_classes", [(37, 53, 4), (1, 10, 2), (64, 64, 7)])
def test_map_matches_sklearn(n_queries, n_gallery, n_classes):
    rng = np.random.default_rng(n_queries)
    q, g = rng.standard_normal((n_queries, 6)), rng.standard_normal((n_gallery, 6))
    ql, gl = rng.integers(0, n_classes, n_queries), rng.integers(0, n_classes, n_gallery)
    assert mean_average_precision(q, g, ql, gl) == pytest.approx(_sklearn_map(q, g, ql, gl), abs=1e-9)


def test_multi_hot_map_matches_sklearn():
    rng = np.random.default_rng(1)
    q, g = rng.standard_normal((20, 5)), rng.standard_normal((30, 5))
    ql, gl = (rng.random((20, 4)) < 0.3).astype(int), (rng.random((30, 4)) < 0.3).astype(int)
    ql[:, 0] = 1  # every query has at least one label
    assert mean_average_precision(q, g, ql, gl) == pytest.approx(_sklearn_map(q, g, ql, gl), abs=1e-9)


def test_perfect_and_recall():
    labels = np.array([0, 0, 1, 1])
    emb = np.eye(2)[labels] + 0.01 * np.arange(4)[:, None]
    m = cross_modal_metrics(emb, emb, labels)
    assert m["a2v"] == pytest.approx(1.0) and m["v2a"] == pytest.approx(1.0)
    assert m["a2v_r@1"] == 1.0 and m["a2v_median_rank"] == 1.0


def test_linear_cca_recovers_shared_signal_and_whitens():
    rng = np.random.default_rng(0)
    shared = rng.standard_normal((2000, 3))
    a = shared @ rng.standard_normal((3, 8)) + 0.1 * rng.standard_normal((2000, 8))
    b = shared @ rng.standard_normal((3, 10)) + 0.1 * rng.standard_normal((2000, 10))
    cca = fit_linear_cca(a, b, n_components=5, ridge=1e-6)
    assert (cca.correlations[:3] > 0.95).all() and (cca.correlations[3:] < 0.2).all()
    za = (a - cca.mean_a) @ cca.proj_a
    np.testing.assert_allclose(np.cov(za.T)[:3, :3], np.eye(3), atol=0.05)


def test_ties_follow_sklearn_and_not_the_gallery_order():
    # Duplicate gallery rows tie exactly; a stable sort let the first-listed copy win the tie.
    rng = np.random.default_rng(3)
    base = rng.standard_normal((5, 4))
    gallery = base[[0, 0, 1, 1, 2, 3, 3, 4]]
    g_labels = np.array([1, 0, 0, 1, 1, 0, 1, 0])
    queries, q_labels = rng.standard_normal((6, 4)), rng.integers(0, 2, 6)
    expected = _sklearn_map(queries, gallery, q_labels, g_labels)
    for order in (np.arange(8), np.arange(8)[::-1], rng.permutation(8)):
        assert mean_average_precision(queries, gallery[order], q_labels, g_labels[order]) == pytest.approx(expected, abs=1e-12)


def _slow_rank_metrics(queries, gallery, q_labels, g_labels, k):
    """Rank of the first relevant item by counting, per query, the items that score at least as high."""
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    first = []
    for i in range(len(q)):
        scores = g @ q[i]
        relevant = np.flatnonzero(g_labels == q_labels[i])
        if len(relevant):
            best = scores[relevant].max()
            first.append(int(np.sum(scores >= best)))  # ties with the best relevant item rank ahead of it
    first = np.array(first)
    return float(np.mean(first <= k)), float(np.median(first))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recall_at_k_and_median_rank_match_a_slow_reference(seed):
    rng = np.random.default_rng(seed)
    q, g = rng.standard_normal((40, 3)), rng.standard_normal((120, 3))
    ql, gl = rng.integers(0, 12, 40), rng.integers(0, 12, 120)  # ~10 relevant items each: first hits spread over ranks
    got = direction_metrics(q, g, ql, gl)
    for k in (1, 5, 10):
        recall, median = _slow_rank_metrics(q, g, ql, gl, k)
        assert got[f"r@{k}"] == pytest.approx(recall)
    assert got["median_rank"] == pytest.approx(median)
    assert 0 < got["r@1"] < got["r@5"] < got["r@10"] < 1  # the data spreads the ranks, so a mutant that counts rank 1 fails
    assert got["median_rank"] > 1


def test_a_query_sample_scores_against_the_whole_gallery():
    rng = np.random.default_rng(4)
    a, v, labels = rng.standard_normal((300, 5)), rng.standard_normal((300, 5)), rng.integers(0, 4, 300)
    whole = cross_modal_metrics(a, v, labels)
    assert cross_modal_metrics(a, v, labels, max_queries=300) == whole  # no sampling at the split's size
    sampled = cross_modal_metrics(a, v, labels, max_queries=50, seed=1)
    rows = np.sort(np.random.default_rng(1).choice(300, 50, replace=False))
    assert sampled["a2v"] == pytest.approx(mean_average_precision(a[rows], v, labels[rows], labels))
    assert sampled["v2a"] == pytest.approx(mean_average_precision(v[rows], a, labels[rows], labels))


def _partner_ranks_by_loops(queries, gallery, rows):
    """The obvious reference: for each sampled query, count gallery items scoring at least its partner."""
    ranks = []
    for q in rows:
        x = queries[q] / np.linalg.norm(queries[q])
        scores = [float(np.dot(x, g / np.linalg.norm(g))) for g in gallery]
        ranks.append(sum(s >= scores[q] for s in scores))
    return np.array(ranks)


@pytest.mark.parametrize("max_queries", [0, 17])
def test_pair_metrics_match_float64_loops(max_queries):
    rng = np.random.default_rng(3)
    audio = rng.standard_normal((60, 5))
    visual = audio @ rng.standard_normal((5, 5)) + 0.8 * rng.standard_normal((60, 5))
    visual[7] = visual[8]  # a tie: the partner of 7 and of 8 rank at the end of their group
    got = pair_metrics(audio, visual, max_queries=max_queries, seed=5)
    rows = np.arange(60) if not max_queries else np.sort(np.random.default_rng(5).choice(60, max_queries, replace=False))
    for name, q, g in (("a2v", audio, visual), ("v2a", visual, audio)):
        ranks = _partner_ranks_by_loops(q, g, rows)
        for k in (1, 5, 10):
            assert got[f"pair_{name}_r@{k}"] == pytest.approx(np.mean(ranks <= k))
        assert got[f"pair_{name}_mrr"] == pytest.approx(np.mean(1 / ranks))
        assert got[f"pair_{name}_median_rank"] == pytest.approx(np.median(ranks))
    assert got["pair_mrr"] == pytest.approx((got["pair_a2v_mrr"] + got["pair_v2a_mrr"]) / 2)
    assert 0 < got["pair_mrr"] <= 1


def test_retrieval_metrics_add_class_figures_only_with_labels():
    rng = np.random.default_rng(0)
    a, v = rng.standard_normal((30, 4)), rng.standard_normal((30, 4))
    unlabelled = retrieval_metrics(a, v)
    assert "avg" not in unlabelled and "pair_mrr" in unlabelled
    labelled = retrieval_metrics(a, v, rng.integers(0, 3, 30))
    assert labelled["pair_mrr"] == unlabelled["pair_mrr"] and 0 < labelled["avg"] <= 1


def test_partner_ranks_in_small_score_blocks_match_loops():
    """The score block shrinks with the gallery (bounded memory at 10^6 clips); ranks must not change."""
    import training.metrics as metrics

    rng = np.random.default_rng(4)
    audio, visual = rng.standard_normal((40, 6)), rng.standard_normal((40, 6))
    rows = np.arange(40)
    want = _partner_ranks_by_loops(audio, visual, rows)
    for chunk in (1, 3, 7, 1024):
        np.testing.assert_array_equal(metrics.partner_ranks(audio, visual, rows, chunk=chunk), want)
