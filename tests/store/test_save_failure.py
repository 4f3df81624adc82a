"""A change whose log append fails is refused with a 503 and nothing of it is applied: the client's
answer, the served state and what a restart serves agree.

With the write-ahead log the acknowledgement path is the append (and its fsync); the snapshot is
written later in the background, and a snapshot that fails loses nothing (the log keeps it all).
"""

from __future__ import annotations

import errno
import os
import threading
import time

import numpy as np
import pytest

from index.store import FrozenIndex, VectorIndex
from service.errors import status_of
from store.collection import Collection
from store.errors import ChangeNotSaved
from store.config import StoreConfig
from store.wal import WriteAheadLog
from tests.service.conftest import copy_index, make_client, persisted, wait_ready

DISK_FULL = "No space left on device"


@pytest.fixture
def failing_log(monkeypatch):
    """``fail["append"] = n``: the next n appends write half their bytes, then fail as on a full disk;
    ``fail["sync"] = n``: the next n fsyncs fail with an I/O error (the bytes were written)."""
    fail = {"append": 0, "sync": 0}
    real_append, real_sync = WriteAheadLog.append, WriteAheadLog.sync

    def append(wal, frames):
        if fail["append"] <= 0:
            return real_append(wal, frames)
        fail["append"] -= 1
        start = real_append(wal, frames[: len(frames) // 2])  # a torn write: part of the record reached the file
        raise OSError(errno.ENOSPC, f"{DISK_FULL} (after byte {start})")

    def sync(wal):
        if fail["sync"] <= 0:
            return real_sync(wal)
        fail["sync"] -= 1
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(WriteAheadLog, "append", append)
    monkeypatch.setattr(WriteAheadLog, "sync", sync)
    return fail


def _served(c, features, ids: list[str]) -> dict:
    """What a client sees: the items (or 404), the size, and the ranking of a search for clip 50's picture."""
    search = c.post("/v1/search", json={"modality": "visual", "target": "visual", "vectors": [features.visual[50].tolist()], "top_k": 10}).json()
    items = {}
    for item_id in ids:
        r = c.get(f"/v1/items/visual/{item_id}")
        items[item_id] = (r.json()["metadata"], r.json()["embedding"]) if r.status_code == 200 else r.status_code
    return {"items": items, "size": c.get("/v1/info").json()["index_sizes"]["visual"], "ranking": [h["id"] for h in search["results"][0]]}


def _log_bytes(index_dir) -> int:
    return sum(p.stat().st_size for p in (index_dir / "wal" / "visual").glob("*.wal"))


def _assert_refused(r, reason: str) -> None:
    assert r.status_code == 503, r.text
    detail = r.json()["detail"]
    assert "not saved" in detail and reason in detail and "nothing was applied" in detail and "Traceback" not in detail


@pytest.mark.parametrize("failure, reason", [("append", DISK_FULL), ("sync", "Input/output error")])
def test_a_failed_log_append_applies_nothing_and_answers_503(tiny, tmp_path, features, failing_log, failure, reason):
    index_dir = copy_index(tiny, tmp_path / "index")
    existing, other = features.ids[3], features.ids[4]
    watched = [existing, other, "new-item"]
    replace = [  # replaces one item (vector and metadata) and adds one
        {"id": existing, "vector": features.visual[50].tolist(), "metadata": {"v": 2}},
        {"id": "new-item", "vector": features.visual[3].tolist(), "metadata": {"v": 3}},
    ]
    with make_client(tiny, index_dir) as c:
        wait_ready(c)
        assert c.post("/v1/items/visual", json={"items": [{"id": existing, "vector": features.visual[3].tolist(), "metadata": {"v": 1}}]}).status_code == 200
        before, logged = _served(c, features, watched), _log_bytes(index_dir)
        assert before["items"]["new-item"] == 404 and before["ranking"][0] == features.ids[50] and logged > 0

        failing_log[failure] = 2
        _assert_refused(c.post("/v1/items/visual", json={"items": replace}), reason)
        assert _served(c, features, watched) == before
        _assert_refused(c.delete(f"/v1/items/visual/{other}"), reason)
        assert _served(c, features, watched) == before
        assert _log_bytes(index_dir) == logged  # the torn or unsynced bytes were cut back out: nothing replays

        assert failing_log[failure] == 0  # the disk works again: the same requests now succeed and are kept
        assert c.post("/v1/items/visual", json={"items": replace}).status_code == 200
        assert c.delete(f"/v1/items/visual/{other}").status_code == 200
        after = _served(c, features, watched)
        assert after["items"][existing][0] == {"v": 2} and after["items"]["new-item"][0] == {"v": 3} and after["items"][other] == 404
    restarted = persisted(tiny, index_dir, "visual")
    assert len(restarted) == after["size"] == before["size"] and restarted.get(existing).metadata == {"v": 2} and other not in restarted


def test_changes_grouped_into_one_failed_append_are_all_refused(tiny, tmp_path, features, failing_log):
    """Two changes queued behind a commit under way are logged together (group commit): a failure
    of that append refuses both, and neither is applied."""
    index_dir = copy_index(tiny, tmp_path / "index")
    collection = Collection.load(tiny.model_dir, index_dir, device="cpu")
    index = collection.shards["visual"].index
    before = {i: (index.get(i).vector.copy(), index.get(i).metadata) for i in features.ids[:3]}
    size = len(index)
    outcomes: dict[str, object] = {}

    def change(name: str, call) -> None:
        try:
            outcomes[name] = call()
        except ChangeNotSaved as err:
            outcomes[name] = err

    shard = collection.shards["visual"]
    with shard.paused():  # as if a commit were under way: both changes queue
        threads = [
            threading.Thread(target=change, args=("upsert", lambda: collection.upsert("visual", features.visual[10:12], [features.ids[0], "fresh"], [{"n": 1}, None]))),
            threading.Thread(target=change, args=("delete", lambda: collection.delete("visual", features.ids[1]))),
        ]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while shard.queued < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert shard.queued == 2
        failing_log["append"] = 1  # one append for both: the second writer must not log its change alone
    for t in threads:
        t.join()
    assert all(isinstance(outcomes[n], ChangeNotSaved) and status_of(outcomes[n]) == 503 for n in ("upsert", "delete")), outcomes
    assert len(index) == size and "fresh" not in index
    for item_id, (vector, metadata) in before.items():
        np.testing.assert_array_equal(index.get(item_id).vector, vector)
        assert index.get(item_id).metadata == metadata
    assert failing_log["append"] == 0
    assert collection.upsert("visual", features.visual[10:11], ["fresh"], [None]) == size + 1  # later changes commit normally
    collection.close()
    assert "fresh" in persisted(tiny, index_dir, "visual") and features.ids[1] in persisted(tiny, index_dir, "visual")


@pytest.mark.parametrize("fork", [True, False], ids=["forked-writer", "copy-in-memory"])
def test_a_failed_snapshot_loses_nothing(tiny, tmp_path, features, monkeypatch, fork):
    index_dir = copy_index(tiny, tmp_path / "index")
    collection = Collection.load(tiny.model_dir, index_dir, device="cpu", config=StoreConfig(fork=fork))
    collection.checkpointer.stop()  # folds by hand here
    collection.upsert("visual", features.visual[:2], ["a", "b"], [{"k": 1}, {"k": 2}])
    saver = VectorIndex if fork else FrozenIndex  # the forked child saves the index itself
    real_save = saver.save

    def full_disk(index, directory):
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "index.faiss").write_bytes(b"the first bytes")
        raise OSError(errno.ENOSPC, DISK_FULL)

    monkeypatch.setattr(saver, "save", full_disk)
    with pytest.raises(OSError, match=DISK_FULL):
        collection.checkpointer.checkpoint("visual")
    assert not [p.name for p in index_dir.iterdir() if p.name.startswith(".")]  # the partial copy was removed
    collection.delete("visual", "a")  # the log goes on in its new segment
    monkeypatch.setattr(saver, "save", real_save)
    collection.close()
    restarted = persisted(tiny, index_dir, "visual")
    assert "a" not in restarted and restarted.get("b").metadata == {"k": 2}
    assert len(os.listdir(index_dir / "wal" / "visual")) == 2  # both segments kept: the snapshot never landed