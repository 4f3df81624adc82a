"""service.prefork: the primary's warm-up before it forks workers changes nothing a client can see."""

from __future__ import annotations

import asyncio

import numpy as np

from service.app import create_app
from service.prefork import WARM_UP_PATH, _get, release_free_heap, warm_up
from service.settings import Settings
from store.collection import Collection
from tests.service.conftest import copy_index


def _requests_counted(app) -> float:
    return sum(s.value for metric in app.state.avsearch.metrics.registry.collect() if metric.name == "avsearch_requests" for s in metric.samples if s.name.endswith("_total"))


def test_the_warm_up_answers_counts_no_request_and_changes_no_item(tiny, tmp_path):
    collection = Collection.load(tiny.model_dir, copy_index(tiny, tmp_path / "index"), device="cpu")
    try:
        app = create_app(Settings(model_dir=tiny.model_dir, index_dir=tmp_path / "index"), collection)
        sizes, versions = collection.sizes(), {m: s.last_lsn for m, s in collection.shards.items()}
        assert asyncio.run(_get(app, WARM_UP_PATH)) == 200  # the path is served, so the warm-up runs the whole stack
        warm_up(app, collection, search=True)
        assert app.middleware_stack is not None
        assert _requests_counted(app) == 0
        assert collection.sizes() == sizes and {m: s.last_lsn for m, s in collection.shards.items()} == versions
        release_free_heap()  # glibc's malloc_trim here; elsewhere a no-op, never an error
        with collection.reading() as view:
            _, ids, _ = view.search("visual", np.ones((1, collection.embedder.embedding_dim), np.float32), 3)
        assert len(ids[0]) == 3  # the heap's free pages given back: what is in use is untouched
    finally:
        collection.close()
