from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from training.cca import fit_linear_cca
from training.metrics import cross_modal_metrics, mean_average_precision


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
