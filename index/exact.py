"""Exact top-k inner-product search in numpy, faster than faiss-cpu's flat index on this hardware.

Exact search is a scan: every query reads all N×E stored floats. Two shapes, two paths:

* **few queries** (Q ≤ ``MATVEC_MAX_QUERIES``): BLAS matrix-vector products over blocks of rows,
  which stream the database at close to memory bandwidth, and a cheap selection: the k-th best
  score of the first rows is a lower bound of the global k-th best, so one comparison per block
  (on scores still in cache) keeps only a few candidates for the final ``argpartition``. BLAS's
  row-major matrix-vector kernel is slow for narrow rows (E = 10, the served width: 45 % of the
  read bandwidth, measured in bench/index_bench.py), so a caller may pass the database transposed,
  (E, N): the column-major kernel streams it at the bandwidth bound;
* **many queries**: the database is cut into blocks; each block is one float32 GEMM (Q, E)×(E, b),
  and only scores above each query's running k-th best leave the block (a comparison and a sparse
  ``nonzero``), merged into the running top-k.

Both return exactly the top k (ties broken arbitrarily), sorted best first. Rows to leave out
(an index's removed rows, kept until it is compacted) are given as sorted row numbers: their scores
are set to -inf in each block before anything is selected, so the result is exact whatever their
number. A NaN score (a stored NaN row, or a NaN query) ranks as -inf, after every finite one, and
fails nothing. Checked against a full ``argsort`` and against faiss in ``tests/index/test_exact.py``.
"""

from __future__ import annotations

import numpy as np

MATVEC_MAX_QUERIES = 8  # above this, one GEMM per block beats Q matrix-vector products
MATVEC_BLOCK_ROWS = 1 << 16  # rows per matrix-vector block: 256 KB of scores stay in L2
SAMPLE_ROWS = 4096  # rows whose k-th best score seeds the selection threshold
BLOCK_SCORES = 2**26  # scores per GEMM block (256 MB float32): big blocks keep BLAS efficient


def _skip(scores: np.ndarray, skip_rows: np.ndarray | None, start: int, stop: int) -> np.ndarray:
    """Scores of rows start..stop (last axis) with the skipped ones among them set to -inf."""
    if skip_rows is not None:
        lo, hi = np.searchsorted(skip_rows, (start, stop))
        scores[..., skip_rows[lo:hi] - start] = -np.inf
    return scores


def _nan_last(scores: np.ndarray) -> np.ndarray:
    """NaN scores set to -inf in place (ranked after every finite score, ties with skipped rows)."""
    scores[np.isnan(scores)] = -np.inf
    return scores


def _head_rows(n: int, k: int, skip_rows: np.ndarray | None) -> int:
    """How many leading rows hold max(SAMPLE_ROWS, k) rows that are not skipped (or all n): the
    sample that seeds the selection bound must not be all tombstones, or every row would pass it."""
    want = min(n, max(SAMPLE_ROWS, k))
    rows = want
    while skip_rows is not None and rows < n and rows - np.searchsorted(skip_rows, rows) < want:
        rows = min(n, want + int(np.searchsorted(skip_rows, rows)))
    return rows


def _sorted_top(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best-first (k,) of one query's candidate (scores, rows)."""
    if len(scores) > k:
        keep = np.argpartition(scores, len(scores) - k)[len(scores) - k :]
        scores, rows = scores[keep], rows[keep]
    order = np.argsort(-scores, kind="stable")
    return scores[order], rows[order]


def _one_query(
    database: np.ndarray, query: np.ndarray, k: int, block_rows: int = MATVEC_BLOCK_ROWS, transposed: np.ndarray | None = None, skip_rows: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    n = len(database)

    def block_scores(start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        if transposed is not None:  # (E, N): a strided column block is still one BLAS call, no copy
            return _skip(np.matmul(query, transposed[:, start:stop], out=out), skip_rows, start, stop)
        return _skip(np.matmul(database[start:stop], query, out=out), skip_rows, start, stop)

    head = block_scores(0, _head_rows(n, k, skip_rows))
    # k-th best of a subset ≤ k-th best of all, so every true top-k row passes this bound.
    bound = np.partition(head, len(head) - k)[len(head) - k]
    buffer = np.empty(min(block_rows, n), dtype=np.float32)
    hit_scores, hit_rows = [], []
    for start in range(0, n, block_rows):  # the block's scores are compared while in cache
        scores = buffer[: min(block_rows, n - start)]
        block_scores(start, start + len(scores), out=scores)
        hits = np.flatnonzero(scores >= bound)
        if hits.size:
            hit_scores.append(scores[hits])
            hit_rows.append(hits + start)
    if sum(len(rows) for rows in hit_rows) < k:  # NaN scores (a NaN row or query) pass no comparison: rank them as -inf
        return _sorted_top(_nan_last(block_scores(0, n)), np.arange(n), k)
    return _sorted_top(np.concatenate(hit_scores), np.concatenate(hit_rows), k)


def _merge_block(top_s: np.ndarray, top_i: np.ndarray, block: np.ndarray, mask: np.ndarray, offset: int, k: int) -> None:
    """Merge the (Q, b) scores ``block`` (rows offset..offset+b) into the running (Q, k) top-k."""
    np.greater(block, top_s[:, -1:], out=mask)  # top_s[:, -1] is each query's current k-th best
    hits = np.flatnonzero(mask)  # 1-D: far faster than a 2-D nonzero on a sparse mask
    if hits.size == 0:
        return
    r, c = np.divmod(hits, block.shape[1])
    counts = np.bincount(r, minlength=len(block))
    touched = np.flatnonzero(counts)
    slot = np.arange(r.size) - (np.cumsum(counts) - counts)[r]  # position of each hit in its row
    width = int(counts.max())
    where = np.searchsorted(touched, r)
    cand_s = np.full((len(touched), k + width), -np.inf, dtype=np.float32)
    cand_i = np.full((len(touched), k + width), -1, dtype=np.int64)
    cand_s[:, :k], cand_i[:, :k] = top_s[touched], top_i[touched]
    cand_s[where, k + slot] = block[r, c]
    cand_i[where, k + slot] = c + offset
    keep = np.argpartition(-cand_s, k - 1, axis=1)[:, :k]
    s, i = np.take_along_axis(cand_s, keep, 1), np.take_along_axis(cand_i, keep, 1)
    order = np.argsort(-s, axis=1, kind="stable")
    top_s[touched], top_i[touched] = np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)


def _many_queries(database: np.ndarray, queries: np.ndarray, k: int, block_rows: int | None, skip_rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    n = len(database)
    block_rows = block_rows or int(np.clip(BLOCK_SCORES // len(queries), 4096, 1 << 20))
    first = _head_rows(n, k, skip_rows)  # a small first block: a full argpartition is the costly step
    scores = _skip(queries @ database[:first].T, skip_rows, 0, first)  # (Q, first)
    _nan_last(scores)  # a NaN k-th best would let no later row in; later NaN scores pass no comparison
    keep = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    top_s = np.take_along_axis(scores, keep, 1)
    order = np.argsort(-top_s, axis=1, kind="stable")
    top_s, top_i = np.take_along_axis(top_s, order, 1), np.take_along_axis(keep, order, 1).astype(np.int64)
    width = min(block_rows, max(n - first, 0))
    scores_buf = np.empty((len(queries), width), dtype=np.float32)  # reused: no page faults per block
    mask_buf = np.empty((len(queries), width), dtype=bool)
    for start in range(first, n, block_rows):
        rows = database[start : start + block_rows]
        block, mask = scores_buf[:, : len(rows)], mask_buf[:, : len(rows)]
        _skip(np.matmul(queries, rows.T, out=block), skip_rows, start, start + len(rows))
        _merge_block(top_s, top_i, block, mask, start, k)
    return top_s, top_i


def top_k_inner_product(
    database: np.ndarray,
    queries: np.ndarray,
    k: int,
    block_rows: int | None = None,
    transposed: np.ndarray | None = None,
    skip_rows: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(N, E) database, (Q, E) queries -> scores (Q, k') and row numbers (Q, k'), best first; k' = min(k, N).

    ``transposed``: the same database as a C-contiguous (E, N) array, used by the few-queries path.
    ``skip_rows``: sorted, unique row numbers never returned; the caller keeps k at most the rows
    left (past them, -inf scores fill the rows).
    """
    database = np.ascontiguousarray(database, dtype=np.float32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if database.ndim != 2 or queries.ndim != 2 or queries.shape[1] != database.shape[1]:
        raise ValueError(f"queries {queries.shape} and database {database.shape} must be 2-D of the same width")
    k = min(k, len(database))
    if k <= 0:
        return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
    if len(queries) <= MATVEC_MAX_QUERIES:
        if transposed is not None and transposed.shape != database.shape[::-1]:
            raise ValueError(f"transposed database {transposed.shape} is not the transpose of {database.shape}")
        pairs = [_one_query(database, q, k, block_rows or MATVEC_BLOCK_ROWS, transposed, skip_rows) for q in queries]
        return np.stack([s for s, _ in pairs]).astype(np.float32), np.stack([r for _, r in pairs]).astype(np.int64)
    return _many_queries(database, queries, k, block_rows, skip_rows)
