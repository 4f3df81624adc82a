"""The write-ahead log: records read back, a torn tail is dropped, start-up = snapshot + replay,
the background fold truncates the log, and searches and writes go on during a snapshot."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

from index.store import FrozenIndex, VectorIndex
from store.collection import Collection
from store.config import StoreConfig
from store.layout import checkpoint_lsn
from store.changes import Change
from store.wal import LogCorrupt, WriteAheadLog, encode, read_segment
from tests.index.test_store import array_addresses, moved_arrays
from tests.service.conftest import copy_index, make_client, persisted, wait_ready
from tests.store.conftest import queued_as_one_group


def _records(n: int) -> list[Change]:
    rng = np.random.default_rng(0)
    return [
        Change("upsert", [f"id-{i}", f"id-{i}b"], [{"i": i, "ü": "ñ"}, None], rng.random((2, 5), np.float32), rng.random((2, 3), np.float32), i + 1, "m" * 64)
        if i % 3
        else Change("delete", [f"id-{i}"], lsn=i + 1, model="m" * 64)
        for i in range(n)
    ]


def _same(a: Change, b: Change) -> bool:
    arrays = all((x is None and y is None) or np.array_equal(x, y) for x, y in ((a.features, b.features), (a.embeddings, b.embeddings)))
    return (a.lsn, a.op, a.ids, a.model, a.metadata) == (b.lsn, b.op, b.ids, b.model, b.metadata) and arrays


def test_records_read_back_exactly(tmp_path):
    wal = WriteAheadLog(tmp_path)
    assert wal.recover(0) == []
    written = _records(7)
    wal.append(b"".join(encode(r) for r in written[:4]))
    wal.append(b"".join(encode(r) for r in written[4:]))
    wal.close()
    read = WriteAheadLog(tmp_path).recover(0)
    assert len(read) == 7 and all(_same(a, b) for a, b in zip(read, written))
    assert [r.lsn for r in WriteAheadLog(tmp_path).recover(5)] == [6, 7]  # the snapshot holds the rest


@pytest.mark.parametrize("tear", ["half a frame header", "half a payload", "a flipped byte", "a length past the end"])
def test_a_torn_last_record_is_dropped_and_cut_off(tmp_path, tear):
    wal = WriteAheadLog(tmp_path)
    wal.recover(0)
    written = _records(3)
    wal.append(b"".join(encode(r) for r in written[:2]))
    whole = wal.end()
    last = bytearray(encode(written[2]))
    torn = {
        "half a frame header": bytes(last[:5]),
        "half a payload": bytes(last[: len(last) // 2]),
        "a flipped byte": bytes(last[:-3] + bytes([last[-3] ^ 1]) + last[-2:]),
        "a length past the end": bytes(last[:8]) + b"\0" * 4,
    }[tear]
    wal.append(torn)
    wal.close()
    segment = wal.segments()[-1]
    assert read_segment(segment).torn
    again = WriteAheadLog(tmp_path)
    read = again.recover(0)
    assert [r.lsn for r in read] == [1, 2] and segment.stat().st_size == whole  # cut back to the last whole record
    again.append(encode(written[2]))  # appends follow the whole records, not the garbage
    again.close()
    assert [r.lsn for r in WriteAheadLog(tmp_path).recover(0)] == [1, 2, 3]


def test_a_bad_record_inside_the_log_is_refused_not_guessed(tmp_path):
    wal = WriteAheadLog(tmp_path)
    wal.recover(0)
    wal.append(encode(_records(1)[0]) + encode(_records(1)[0]))  # the same LSN twice
    wal.close()
    with pytest.raises(LogCorrupt, match="out of order"):
        WriteAheadLog(tmp_path).recover(0)


def test_start_up_is_the_snapshot_plus_the_log_and_a_fold_truncates_it(tiny, tmp_path, features):
    index_dir = copy_index(tiny, tmp_path / "index")
    collection = Collection.load(tiny.model_dir, index_dir, device="cpu")
    collection.checkpointer.stop()
    collection.upsert("visual", features.visual[:3], ["a", "b", "c"], [{"n": 1}, {"n": 2}, None])
    collection.delete("visual", "b")
    assert checkpoint_lsn(index_dir / "visual") == 0 and "a" in persisted(tiny, index_dir, "visual")
    assert collection.checkpointer.checkpoint("visual") == 2
    assert checkpoint_lsn(index_dir / "visual") == 2 and len(list((index_dir / "wal" / "visual").glob("*.wal"))) == 1
    collection.upsert("visual", features.visual[3:4], ["d"], [{"n": 4}])  # after the snapshot: in the new segment only
    collection.close()
    restarted = persisted(tiny, index_dir, "visual")
    assert restarted.get("a").metadata == {"n": 1} and "b" not in restarted and restarted.get("d").metadata == {"n": 4}
    np.testing.assert_allclose(restarted.get("a").vector, collection.shards["visual"].index.get("a").vector)
    assert len(restarted) == len(collection.shards["visual"].index) == len(features) + 3


def test_the_log_is_folded_in_the_background_past_its_size_threshold(tiny, tmp_path, features):
    index_dir = copy_index(tiny, tmp_path / "index")
    collection = Collection.load(tiny.model_dir, index_dir, device="cpu", config=StoreConfig(checkpoint_bytes=20_000, checkpoint_growth=0))
    for i in range(8):  # ~4.3 kB a visual record
        collection.upsert("visual", features.visual[i : i + 1], [f"x{i}"], [None])
    deadline = time.monotonic() + 20
    while checkpoint_lsn(index_dir / "visual") == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert checkpoint_lsn(index_dir / "visual") >= 5
    collection.close()
    assert all(f"x{i}" in persisted(tiny, index_dir, "visual") for i in range(8))


@pytest.mark.parametrize("fork", [True, False], ids=["forked-writer", "copy-in-memory"])
def test_searches_and_writes_go_on_while_a_snapshot_is_written(tiny, tmp_path, features, monkeypatch, fork):
    marker = tmp_path / "writing"  # a file: a forked writer cannot set the test's events

    def slowly(save):
        def slow_save(index, directory):
            marker.touch()
            time.sleep(2.0)  # a large index on a slow disk
            return save(index, directory)

        return slow_save

    saver = VectorIndex if fork else FrozenIndex  # the forked child saves the index itself
    monkeypatch.setattr(saver, "save", slowly(saver.save))
    index_dir = copy_index(tiny, tmp_path / "index")
    with make_client(tiny, index_dir, wal_fold_fork=fork) as c:
        wait_ready(c)
        collection = c.app.state.avsearch.collection
        assert c.post("/v1/items/visual", json={"items": [{"id": "before", "vector": features.visual[0].tolist()}]}).status_code == 200
        folding = threading.Thread(target=collection.checkpointer.checkpoint, args=("visual",))
        folding.start()
        deadline = time.monotonic() + 10
        while not marker.exists():
            assert time.monotonic() < deadline, "the snapshot was not written"
            time.sleep(0.01)
        times = []
        for i in range(5):
            start = time.perf_counter()
            assert c.post("/v1/search", json={"modality": "audio", "vectors": [features.audio[i].tolist()], "top_k": 3}).status_code == 200
            assert c.post("/v1/items/visual", json={"items": [{"id": f"during-{i}", "vector": features.visual[i].tolist()}]}).status_code == 200
            times.append(time.perf_counter() - start)
        assert folding.is_alive() and max(times) < 1.0, times  # all answered while the 2 s save runs
        folding.join()
    restarted = persisted(tiny, index_dir, "visual")
    assert checkpoint_lsn(index_dir / "visual") == 1 and all(f"during-{i}" in restarted for i in range(5)) and "before" in restarted
    assert "during-0" not in VectorIndex.load(index_dir / "visual")  # the snapshot is the index as it was at the fold


def test_a_group_applies_in_log_order_whatever_it_merges(tiny, tmp_path, features):
    """One group holding an upsert, a delete and an upsert of the same id and two deletes: merged
    into as few index calls as order allows, with the result of one-by-one application."""
    index_dir = copy_index(tiny, tmp_path / "index")
    collection = Collection.load(tiny.model_dir, index_dir, device="cpu")
    calls = [
        lambda: collection.upsert("visual", features.visual[0:1], ["x"], [{"v": 1}]),
        lambda: collection.delete("visual", "x"),
        lambda: collection.upsert("visual", features.visual[1:2], ["x"], [{"v": 2}]),
        lambda: collection.delete("visual", features.ids[1]),
        lambda: collection.delete("visual", features.ids[2]),
        lambda: collection.upsert("visual", features.visual[3:5], ["y", "z"], [None, {"v": 3}]),
    ]
    queued_as_one_group(collection.shards["visual"], calls)
    collection.close()
    for index in (collection.shards["visual"].index, persisted(tiny, index_dir, "visual")):
        assert index.get("x").metadata == {"v": 2} and index.get("z").metadata == {"v": 3} and "y" in index
        assert features.ids[1] not in index and features.ids[2] not in index and len(index) == len(features) + 1
        np.testing.assert_allclose(index.get("x").vector, collection.embedder.embed("visual", features.visual[1:2])[0], atol=1e-6)


def test_a_fold_waits_for_the_log_to_grow_in_proportion_to_the_snapshot(tiny, tmp_path, features):
    """A fold rewrites the whole index: folding only once the log holds ``snapshot_growth`` times the
    snapshot's bytes keeps the cost per change constant (a bulk load stays linear in N)."""
    index_dir = copy_index(tiny, tmp_path / "index")
    collection = Collection.load(tiny.model_dir, index_dir, device="cpu", config=StoreConfig(checkpoint_bytes=1, checkpoint_growth=0.5))
    collection.checkpointer.stop()
    size = collection.checkpointer.checkpoint_size["visual"]
    assert size == sum(p.stat().st_size for p in (index_dir / "visual").iterdir() if p.is_file()) > 0
    n = 0
    while collection.shards["visual"].wal.bytes_since_rotation < 0.5 * size:
        assert not collection.checkpointer.due("visual")
        collection.upsert("visual", features.visual[n % 50 : n % 50 + 1], [f"g{n}"], [None])
        n += 1
    assert collection.checkpointer.due("visual") and n > 1
    collection.checkpointer.checkpoint("visual")
    assert not collection.checkpointer.due("visual") and collection.checkpointer.checkpoint_size["visual"] > size
    collection.close()


@pytest.mark.parametrize("headroom", [0.25, 0.0])
def test_a_loaded_engine_has_room_for_writes_so_they_copy_no_index(tiny, tmp_path, features, headroom):
    """An index just read has no spare capacity; without the room made at load (AVSEARCH_WRITE_HEADROOM=0),
    the first write after a start copies every array (seconds at 10^7 items, holding the write lock)."""
    index_dir = copy_index(tiny, tmp_path / "index")
    collection = Collection.load(tiny.model_dir, index_dir, device="cpu", config=StoreConfig(write_headroom=headroom))
    try:
        collection.checkpointer.stop()
        before = {m: array_addresses(collection.shards[m].index) for m in ("audio", "visual")}
        for i in range(20):
            for modality in before:  # no metadata: the built index has none (items with metadata: tests/index/test_store.py)
                collection.upsert(modality, getattr(features, modality)[i : i + 1], [f"new-{i}"], [None])
        moved = {m: moved_arrays(before[m], collection.shards[m].index) for m in before}
        assert all(moved.values()) if headroom == 0 else moved == {"audio": [], "visual": []}
        views = collection.shards["audio"].index._flat  # built at load (index.warm_up): no first search waits for it
        assert views is not None and views._filled == len(collection.shards["audio"].index) - 20
    finally:
        collection.close()


def test_a_fork_that_fails_falls_back_to_a_copy_in_memory_and_says_so(tiny, tmp_path, features, monkeypatch, caplog):
    import store.forked

    def no_memory():
        raise OSError(12, "Cannot allocate memory")

    index_dir = copy_index(tiny, tmp_path / "index")
    collection = Collection.load(tiny.model_dir, index_dir, device="cpu")
    try:
        collection.checkpointer.stop()
        collection.upsert("visual", features.visual[:1], ["a"], [{"n": 1}])
        monkeypatch.setattr(store.forked.os, "fork", no_memory)
        open_fds = len(os.listdir("/proc/self/fd"))
        assert collection.checkpointer.checkpoint("visual") == 1
        assert len(os.listdir("/proc/self/fd")) == open_fds  # the writer's pipe closed again
    finally:
        collection.close()
    assert "could not fork a snapshot writer for visual" in caplog.text and "copying the index in memory" in caplog.text
    assert VectorIndex.load(index_dir / "visual").get("a").metadata == {"n": 1}


def test_a_checkpoint_writer_runs_only_when_a_core_would_idle_and_a_snapshot_writer_does_not(tiny, tmp_path, features, monkeypatch):
    """A checkpoint is background work: its writer must not take a core from requests (with folds
    every 3 s it set the p99 of single writes: bench/results/write_workers_ab.md). A snapshot file's
    caller waits for it: its writers run at the server's priority."""
    seen, save = tmp_path / "writer", VectorIndex.save

    def recording(index, directory):  # runs in the forked child
        seen.write_text(f"{os.getpid()} {os.sched_getscheduler(0)}")
        return save(index, directory)

    index_dir = copy_index(tiny, tmp_path / "index")
    collection = Collection.load(tiny.model_dir, index_dir, device="cpu", config=StoreConfig(fork=True))
    try:
        collection.checkpointer.stop()
        collection.upsert("visual", features.visual[:1], ["a"], [{"n": 1}])
        monkeypatch.setattr(VectorIndex, "save", recording)
        assert collection.checkpointer.checkpoint("visual") == 1
        writer, policy = map(int, seen.read_text().split())
        assert writer != os.getpid() and policy == os.SCHED_IDLE
        assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the server itself is left as it was
        collection.snapshot(tmp_path / "snapshots")
        writer, policy = map(int, seen.read_text().split())
        assert writer != os.getpid() and policy == os.SCHED_OTHER
    finally:
        collection.close()
    assert persisted(tiny, index_dir, "visual").get("a").metadata == {"n": 1}


def test_a_forked_writer_past_its_timeout_is_stopped_and_the_log_keeps_every_change(tiny, tmp_path, features, monkeypatch):
    def hung(index, directory):
        time.sleep(60)  # a writer stuck on a dead disk

    index_dir = copy_index(tiny, tmp_path / "index")
    collection = Collection.load(tiny.model_dir, index_dir, device="cpu", config=StoreConfig(fork=True, checkpoint_timeout=1.0))
    try:
        collection.checkpointer.stop()
        collection.upsert("visual", features.visual[:1], ["a"], [{"n": 1}])
        monkeypatch.setattr(VectorIndex, "save", hung)  # runs in the forked child
        started = time.monotonic()
        with pytest.raises(OSError, match=r"did not finish within 1 s; it was stopped"):
            collection.checkpointer.checkpoint("visual")
        assert time.monotonic() - started < 10
        monkeypatch.undo()
        assert not [p.name for p in index_dir.iterdir() if p.name.startswith(".")]
        collection.upsert("visual", features.visual[1:2], ["b"], [{"n": 2}])
        assert collection.checkpointer.checkpoint("visual") == 2  # the next fold works
    finally:
        collection.close()
    restarted = persisted(tiny, index_dir, "visual")
    assert restarted.get("a").metadata == {"n": 1} and restarted.get("b").metadata == {"n": 2}
