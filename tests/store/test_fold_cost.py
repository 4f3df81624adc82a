"""What a fold costs the server, and when it comes. A pause (a fold's, a snapshot's) waits for the
group commit under way, and no longer: commits queued behind it wait for the pause. Otherwise, under
writes that never stop, each group's end handed the turn to a queued commit, and the fold waited on
(measured, 10^6 HNSW32, 16 clients deleting: up to 3.8 s, while the log grew past the fold's
schedule). The checkpoint's API items (the last file merged with the changes logged since: 20-270
ms a fold with a few thousand of them) are merged by the forked writer, off the server's GIL; a
snapshot archive's too."""

from __future__ import annotations

import os
import tarfile
import threading
import time

import numpy as np
import pytest

import store.checkpoints
from store.api_items import ApiItems
from store.collection import Collection
from store.config import StoreConfig
from store.layout import API_ITEMS_NAME
from store.wal import WriteAheadLog
from tests.service.conftest import copy_index


def _wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


def test_a_pause_goes_before_commits_queued_behind_it(tiny, tmp_path, features, monkeypatch):
    collection = Collection.load(tiny.model_dir, copy_index(tiny, tmp_path / "index"), device="cpu", config=StoreConfig(fork=False))
    shard = collection.shards["visual"]
    events: list[str] = []
    first_append_may_end = threading.Event()
    real_append = WriteAheadLog.append

    def append(wal, frames):
        if not events:  # the first group: held under way until the pause and two more commits wait
            events.append("append")
            first_append_may_end.wait(10)
        else:
            events.append("append")
        return real_append(wal, frames)

    def paused() -> None:
        with shard.paused():
            events.append("pause")

    monkeypatch.setattr(WriteAheadLog, "append", append)

    def waiting() -> int:
        return len(shard._cond._waiters)  # threads waiting for their turn on the group commit

    try:
        threads = [threading.Thread(target=collection.delete, args=("visual", features.ids[0]))]
        threads[0].start()
        _wait_for(lambda: events == ["append"], "the first commit did not start")
        for item_id in features.ids[1:3]:  # queued behind the commit under way
            threads.append(threading.Thread(target=collection.delete, args=("visual", item_id)))
            threads[-1].start()
            _wait_for(lambda: waiting() == len(threads) - 1, "a commit did not queue")
        threads.append(threading.Thread(target=paused))  # queued last
        threads[-1].start()
        _wait_for(lambda: waiting() == 3, "the pause did not wait")
        first_append_may_end.set()
        for thread in threads:
            thread.join(10)
        assert events == ["append", "pause", "append"], events  # the two queued commits, as one group after the pause
        assert not any(item_id in shard.index for item_id in features.ids[:3])
    finally:
        first_append_may_end.set()
        collection.close()


def _archived_api_items(snapshots, modality: str) -> ApiItems:
    (archive,) = snapshots.glob("*.tar")
    with tarfile.open(archive) as tar:
        tar.extract(f"{modality}/{API_ITEMS_NAME}", snapshots / "unpacked", filter="data")
    return ApiItems.load(snapshots / "unpacked" / modality)


@pytest.mark.parametrize("fork", [True, False], ids=["forked-writer", "copy-in-memory"])
@pytest.mark.parametrize("written_by", ["fold", "snapshot-archive"])
def test_the_forked_writer_merges_the_api_items_not_the_server(tiny, tmp_path, features, monkeypatch, fork, written_by):
    merged_by = tmp_path / "merged-by"
    real_api_items_of = store.checkpoints.api_items_of

    def api_items_of(*args):
        merged_by.write_text(str(os.getpid()))
        return real_api_items_of(*args)

    monkeypatch.setattr(store.checkpoints, "api_items_of", api_items_of)
    index_dir = copy_index(tiny, tmp_path / "index")
    collection = Collection.load(tiny.model_dir, index_dir, device="cpu", config=StoreConfig(fork=fork))
    try:
        collection.upsert("visual", features.visual[:1] + 0.5, ["api-item"], [{"by": "api"}])
        collection.delete("visual", features.ids[2])
        if written_by == "fold":
            collection.checkpointer.checkpoint("visual")
        else:
            collection.snapshot(tmp_path / "snapshots")
    finally:
        collection.close()
    assert (int(merged_by.read_text()) != os.getpid()) == fork  # forked: the child's pid
    folded = ApiItems.load(index_dir / "visual") if written_by == "fold" else _archived_api_items(tmp_path / "snapshots", "visual")
    assert folded.metadata == {"api-item": {"by": "api"}} and folded.deleted == {features.ids[2]}
    np.testing.assert_array_equal(folded.features["api-item"], (features.visual[0] + 0.5).astype(np.float32))
