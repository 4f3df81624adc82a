"""How durable the store is and when it checkpoints (the service fills it from its AVSEARCH_WAL_* settings)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StoreConfig:
    fsync: bool = True  # fsync the log before each answer (group commit); False: after writing it (a kill loses nothing, a power cut may)
    checkpoint_bytes: int = 64 * 1024 * 1024  # checkpoint a modality once its log passes this size...
    checkpoint_seconds: float = 300.0  # ...or when its oldest change not in a checkpoint is this old
    checkpoint_growth: float = 1.0  # ...and only once the log holds this fraction of the last checkpoint's bytes (a checkpoint rewrites it all: amortised O(1) a change)
    checkpoint_timeout: float = 3600.0  # a forked writer still writing after this many seconds is stopped (the checkpoint fails; the log keeps every change)
    fork: bool = True  # a checkpoint's copy of the index is a forked child's (commits wait ~0.1 s), not one in memory (5 s at 10^7 HNSW32); Linux only
    write_headroom: float = 0.25  # room made at load for this fraction more items, so the first writes after a start copy no index (VectorIndex.reserve)
