"""Id suggestions for the console: stored ids that start with a prefix, from a sorted copy of the ids.

The item table finds ids by hash, not in order, so a prefix lookup needs a sorted list: built once
per index generation (O(n log n), in a worker thread, never on the search path) and bisected per
keystroke. Above ``SUGGEST_MAX_ITEMS`` items the copy would cost too much memory for a typing aid,
so only the exact id is offered there.
"""

from __future__ import annotations

import bisect
import threading
import weakref
from dataclasses import dataclass

from service.engine import Engine

SUGGEST_MAX_ITEMS = 1_000_000
SUGGEST_MAX_LIMIT = 100


@dataclass(frozen=True)
class Suggestions:
    ids: list[str]
    complete: bool  # False: the index is over SUGGEST_MAX_ITEMS and only an exact match was looked up


class IdSuggester:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sorted: dict[str, tuple[weakref.ref, tuple[int, int], list[str]]] = {}

    def _sorted_ids(self, engine: Engine, modality: str) -> list[str]:
        with engine.lock.read():
            index = engine.indexes[modality]
            key = (index.items.rows, len(index))
            cached = self._sorted.get(modality)
            if cached is not None and cached[0]() is engine and cached[1] == key:
                return cached[2]
            ids = sorted(index.ids())
        self._sorted[modality] = (weakref.ref(engine), key, ids)
        return ids

    def suggest(self, engine: Engine, modality: str, prefix: str, limit: int) -> Suggestions:
        """Up to ``limit`` stored ids of ``modality`` starting with ``prefix``, in sorted order."""
        index = engine.indexes[modality]
        if len(index) > SUGGEST_MAX_ITEMS:
            with engine.lock.read():
                found = bool(prefix) and prefix in index
            return Suggestions([prefix] if found else [], complete=False)
        with self._lock:
            ids = self._sorted_ids(engine, modality)
        start = bisect.bisect_left(ids, prefix)
        out = []
        for item_id in ids[start : start + limit]:
            if not item_id.startswith(prefix):
                break
            out.append(item_id)
        return Suggestions(out, complete=True)
