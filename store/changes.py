"""One item change, as the group commit queues it, the log stores it and a restart replays it.

A change upserts items (ids, metadata, raw features, embeddings) or deletes ids. Once logged it has
a log sequence number (LSN, counted per modality from 1) and names the model that embedded it (the
sha256 of its manifest), so that a restart with another model re-embeds it from the raw features.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from index.store import VectorIndex


@dataclass
class Change:
    op: str  # "upsert" or "delete"
    ids: list[str]
    metadata: list[dict | None] = field(default_factory=list)  # one per id (upsert only)
    features: np.ndarray | None = None  # (B, D_in) raw features, float32 (upsert only)
    embeddings: np.ndarray | None = None  # (B, E) float32 (upsert only)
    lsn: int = 0  # set when logged
    model: str = ""  # sha256 of the manifest of the model that embedded it; set when logged


def apply(index: VectorIndex, change: Change) -> None:
    if change.op == "upsert":
        index.upsert(change.embeddings, change.ids, change.metadata)
    else:
        index.remove(change.ids)  # one lookup for the whole run (not one per id: half the cost of a follower's delete); ids not there are skipped


def mergeable_runs(changes: list[Change]) -> Iterator[list[Change]]:
    """Consecutive changes of one kind that one index call can apply: a Flat or IVF removal moves
    the whole array once per call, so 16 deletes in one call cost what one costs. Upserts merge
    while their ids stay distinct (an id written twice keeps its order by starting a new run)."""
    run: list[Change] = []
    seen: set[str] = set()
    for change in changes:
        if run and (change.op != run[0].op or seen.intersection(change.ids)):
            yield run
            run, seen = [], set()
        run.append(change)
        seen.update(change.ids)
    if run:
        yield run


def merge_run(run: list[Change]) -> Change:
    if len(run) == 1:
        return run[0]
    ids = [i for c in run for i in c.ids]
    if run[0].op == "delete":
        return Change("delete", ids)
    return Change("upsert", ids, [m for c in run for m in c.metadata], None, np.concatenate([c.embeddings for c in run]))
