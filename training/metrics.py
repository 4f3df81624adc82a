"""Cross-modal retrieval metrics (spec §6), in numpy so the index and the service can reuse them.

A→V: every audio embedding queries the gallery of all visual embeddings of the same split (its own
partner included), ranked by cosine similarity; an item is relevant when it shares the query's
class (or, for multi-hot labels, any label). AP is taken over the **full** ranked list:
``AP = (1/R) Σ_{ranks j of relevant items} precision@j``; mAP is the mean over queries that have at
least one relevant item. All figures are fractions in [0, 1].
"""

from __future__ import annotations

import numpy as np


def relevance(query_labels: np.ndarray, gallery_labels: np.ndarray) -> np.ndarray:
    """(Q, G) bool: same class id, or at least one shared label for (N, C) multi-hot labels."""
    if query_labels.ndim == 1:
        return query_labels[:, None] == gallery_labels[None, :]
    return (query_labels.astype(np.float32) @ gallery_labels.T.astype(np.float32)) > 0


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _ranked(queries: np.ndarray, gallery: np.ndarray, relevant: np.ndarray, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(Q, G) relevance reordered per query by descending cosine similarity, and (Q, G) tie ends.

    ``tie_end[q, j]`` is the last ranked position holding the same score as position j: items
    that tie are ranked together, so no order among them (e.g. the gallery's) can favour the
    relevant one.
    """
    q, g = _normalise(queries), _normalise(gallery)
    ranked = np.empty(relevant.shape, dtype=bool)
    tie_end = np.empty(relevant.shape, dtype=np.int64)
    positions = np.arange(relevant.shape[1])
    for start in range(0, len(q), chunk):
        scores = q[start : start + chunk] @ g.T
        order = np.argsort(-scores, axis=1)
        ranked[start : start + chunk] = np.take_along_axis(relevant[start : start + chunk], order, axis=1)
        sorted_scores = np.take_along_axis(scores, order, axis=1)
        ends_group = np.ones(sorted_scores.shape, dtype=bool)
        ends_group[:, :-1] = sorted_scores[:, 1:] != sorted_scores[:, :-1]
        ends = np.where(ends_group, positions, len(positions))  # next group end at or after j
        tie_end[start : start + chunk] = np.minimum.accumulate(ends[:, ::-1], axis=1)[:, ::-1]
    return ranked, tie_end


def average_precision_from_ranking(ranked: np.ndarray, tie_end: np.ndarray | None = None) -> np.ndarray:
    """(Q,) AP per query from ranked relevance; NaN for a query with no relevant item.

    With ``tie_end``, every relevant item of a tie group takes the precision at the group's end,
    which is scikit-learn's ``average_precision_score`` (one threshold per distinct score).
    """
    hits = np.cumsum(ranked, axis=1)
    if tie_end is None:
        tie_end = np.broadcast_to(np.arange(ranked.shape[1]), ranked.shape)
    precision_at_hit = np.where(ranked, np.take_along_axis(hits, tie_end, axis=1) / (tie_end + 1), 0.0)
    n_relevant = ranked.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return precision_at_hit.sum(axis=1) / n_relevant


def mean_average_precision(queries, gallery, query_labels, gallery_labels) -> float:
    ranked, tie_end = _ranked(queries, gallery, relevance(query_labels, gallery_labels))
    return float(np.nanmean(average_precision_from_ranking(ranked, tie_end)))


def direction_metrics(queries, gallery, query_labels, gallery_labels, ks=(1, 5, 10)) -> dict[str, float]:
    """mAP, R@k (a relevant item among the first k) and median rank of the first relevant item.

    A first relevant item that ties with others counts at the end of its tie group (1-based rank).
    """
    ranked, tie_end = _ranked(queries, gallery, relevance(query_labels, gallery_labels))
    ap = average_precision_from_ranking(ranked, tie_end)
    has_relevant = ranked.any(axis=1)
    first = np.argmax(ranked, axis=1)[has_relevant]
    first_hit = tie_end[has_relevant, first] + 1
    out = {"map": float(np.nanmean(ap))}
    for k in ks:
        out[f"r@{k}"] = float(np.mean(first_hit <= k))
    out["median_rank"] = float(np.median(first_hit))
    return out


def cross_modal_metrics(audio_emb, visual_emb, labels, max_queries: int = 0, seed: int = 0) -> dict[str, float]:
    """A→V, V→A and their average mAP (fractions), plus R@k and median rank per direction.

    With ``max_queries`` and more rows than that, a seeded sample of rows queries the **whole**
    gallery: an unbiased estimate of the mean over all queries, at a cost linear in the split.
    """
    labels = np.asarray(labels)
    rows = np.arange(len(labels))
    if 0 < max_queries < len(rows):
        rows = np.sort(np.random.default_rng(seed).choice(len(rows), max_queries, replace=False))
    a2v = direction_metrics(audio_emb[rows], visual_emb, labels[rows], labels)
    v2a = direction_metrics(visual_emb[rows], audio_emb, labels[rows], labels)
    out = {"a2v": a2v["map"], "v2a": v2a["map"], "avg": (a2v["map"] + v2a["map"]) / 2}
    for name, metrics in (("a2v", a2v), ("v2a", v2a)):
        out.update({f"{name}_{k}": v for k, v in metrics.items() if k != "map"})
    return out


SCORE_BLOCK = 2**24  # similarity scores held at once by partner_ranks


def partner_ranks(queries: np.ndarray, gallery: np.ndarray, partners: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """(Q,) 1-based rank of each query's own partner ``gallery[partners[q]]`` by cosine similarity.

    Items that tie with the partner rank ahead of it (the end of its tie group), as in
    :func:`direction_metrics`. Cost O(Q·G), no sort: cheap enough for every validation.
    """
    q, g = _normalise(queries), _normalise(gallery)
    ranks = np.empty(len(q), dtype=np.int64)
    # A block of scores is chunk × G float64: bounded (128 MB), so a 10^6-clip test split does not
    # ask for 8 GB per block (1,024 queries × 10^6); the ranks do not depend on the block size.
    chunk = max(1, min(chunk, SCORE_BLOCK // max(len(g), 1)))
    for start in range(0, len(q), chunk):
        scores = q[start : start + chunk] @ g.T
        own = scores[np.arange(len(scores)), partners[start : start + chunk]]
        ranks[start : start + chunk] = (scores >= own[:, None]).sum(axis=1)
    return ranks


def pair_metrics(audio_emb, visual_emb, max_queries: int = 0, seed: int = 0, ks=(1, 5, 10)) -> dict[str, float]:
    """Instance-level cross-modal retrieval: each clip's one relevant item is its own partner.

    Needs no labels. Per direction (``pair_a2v_*``, ``pair_v2a_*``): R@k, median rank and mean
    reciprocal rank; ``pair_mrr``, ``pair_r@k``, ``pair_median_rank`` average the two directions.
    With ``max_queries``, a seeded sample of rows queries the whole gallery, as in
    :func:`cross_modal_metrics`.
    """
    rows = np.arange(len(audio_emb))
    if 0 < max_queries < len(rows):
        rows = np.sort(np.random.default_rng(seed).choice(len(rows), max_queries, replace=False))
    out: dict[str, float] = {}
    for name, queries, gallery in (("a2v", audio_emb, visual_emb), ("v2a", visual_emb, audio_emb)):
        ranks = partner_ranks(queries[rows], gallery, rows)
        out.update({f"pair_{name}_r@{k}": float(np.mean(ranks <= k)) for k in ks})
        out[f"pair_{name}_median_rank"] = float(np.median(ranks))
        out[f"pair_{name}_mrr"] = float(np.mean(1.0 / ranks))
    for metric in ("mrr", "median_rank", *(f"r@{k}" for k in ks)):
        out[f"pair_{metric}"] = (out[f"pair_a2v_{metric}"] + out[f"pair_v2a_{metric}"]) / 2
    return out


def retrieval_metrics(audio_emb, visual_emb, labels=None, max_queries: int = 0, seed: int = 0) -> dict[str, float]:
    """Instance-level figures always; class-level mAP and R@k too when ``labels`` are given."""
    out = pair_metrics(audio_emb, visual_emb, max_queries, seed)
    if labels is not None:
        out.update(cross_modal_metrics(audio_emb, visual_emb, labels, max_queries, seed))
    return out


# What each selection rule reads from the validation figures (``--select``). For pairs, the MRR of
# the embeddings themselves (cosine), not after the test-time CCA: over the training runs of
# bench/selection_signals.py it tracked class-level mAP far better (training/README.md).
SELECTION_METRICS = {"labels": "avg", "pairs": "pair_mrr_no_cca"}
