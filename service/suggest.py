"""Id suggestions for the console: stored ids that start with a prefix, from a sorted copy of the ids.

The item table finds ids by hash, not in order, so a prefix lookup needs a sorted list, bisected per
keystroke. It is built in the suggester's own thread (not the default executor, where item changes
run), the ids copied under the read lock and sorted outside it, so writers never wait for a sort.
On a small index it is rebuilt after every change; on a larger one at most every
``REBUILD_SECONDS`` (sorting 10^6 ids takes about a second), so a burst of writes does not sort
once per write: until then new ids are missing from suggestions and deleted ones are filtered out.
Above ``SUGGEST_MAX_ITEMS`` items the copy would cost too much memory for a typing aid, so only the
exact id is offered there.
"""

from __future__ import annotations

import bisect
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from store.collection import Collection

SUGGEST_MAX_ITEMS = 1_000_000
SUGGEST_MAX_LIMIT = 100
REBUILD_ALWAYS_BELOW = 10_000  # items: a sort of fewer takes under ~10 ms
REBUILD_SECONDS = 5.0


@dataclass(frozen=True)
class Suggestions:
    ids: list[str]
    complete: bool  # False: the index is over SUGGEST_MAX_ITEMS and only an exact match was looked up


class IdSuggester:
    def __init__(self, rebuild_always_below: int = REBUILD_ALWAYS_BELOW, rebuild_seconds: float = REBUILD_SECONDS) -> None:
        self.rebuild_always_below, self.rebuild_seconds = rebuild_always_below, rebuild_seconds
        self._lock = threading.Lock()
        self._sorted: dict[str, tuple[weakref.ref, tuple[int, int], float, list[str]]] = {}  # collection, index state, built at, ids
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="avsearch-suggest")

    def _sorted_ids(self, collection: Collection, modality: str) -> tuple[list[str], bool]:
        """(sorted ids, whether the index changed since they were listed)."""
        with collection.reading() as view:
            key = view.generation(modality)
            cached = self._sorted.get(modality)
            same_collection = cached is not None and cached[0]() is collection
            if same_collection and cached[1] == key:
                return cached[3], False
            if same_collection and view.size(modality) >= self.rebuild_always_below and time.monotonic() - cached[2] < self.rebuild_seconds:
                return cached[3], True
            ids = view.ids(modality)
        ids.sort()
        self._sorted[modality] = (weakref.ref(collection), key, time.monotonic(), ids)
        return ids, False

    def suggest(self, collection: Collection, modality: str, prefix: str, limit: int) -> Suggestions:
        """Up to ``limit`` stored ids of ``modality`` starting with ``prefix``, in sorted order."""
        if collection.size(modality) > SUGGEST_MAX_ITEMS:
            with collection.reading() as view:
                found = bool(prefix) and view.contains(modality, prefix)
            return Suggestions([prefix] if found else [], complete=False)
        with self._lock:
            ids, stale = self._sorted_ids(collection, modality)
        start = bisect.bisect_left(ids, prefix)
        out: list[str] = []
        while len(out) < limit and start < len(ids) and ids[start].startswith(prefix):
            stop = start
            while stop < len(ids) and stop - start < limit - len(out) and ids[stop].startswith(prefix):
                stop += 1
            found = ids[start:stop]
            if stale:  # some may have been deleted since the list was built
                with collection.reading() as view:
                    found = [item_id for item_id in found if view.contains(modality, item_id)]
            out += found
            start = stop
        return Suggestions(out, complete=True)
