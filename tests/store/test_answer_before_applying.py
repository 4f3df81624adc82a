"""``Shard.answers_before_applying`` (the worker processes' primary): writers are answered once a
group is logged and sent, with index sizes counted ahead; the apply follows in its own thread, and
whatever needs the index at the log's end (the next group, a checkpoint, a pause) waits for it."""

from __future__ import annotations

import pytest

from index.store import VectorIndex
from store.changes import Change, apply
from store.collection import Collection
from store.errors import ChangeNotSaved, ItemNotFound
from tests.service.conftest import copy_index
from tests.store.conftest import queued_as_one_group


def test_sizes_counted_ahead_are_those_of_applying_in_log_order(tiny, tmp_path, features):
    index_dir = copy_index(tiny, tmp_path / "index")
    collection = Collection.load(tiny.model_dir, index_dir, device="cpu")
    shard = collection.shards["visual"]
    shard.answers_before_applying = True
    embed = lambda rows: collection.embedder.embed("visual", features.visual[rows])  # noqa: E731
    changes = [
        Change("upsert", ["x"], [None], features.visual[0:1], embed(slice(0, 1))),
        Change("delete", ["x"]),
        Change("upsert", ["x", features.ids[3]], [None, None], features.visual[1:3], embed(slice(1, 3))),  # one new, one replaced
        Change("delete", [features.ids[4]]),
        Change("delete", ["never-there"]),  # refused alone: ItemNotFound
        Change("upsert", ["y", "z"], [None, None], features.visual[5:7], embed(slice(5, 7))),
        Change("delete", ["y"]),
    ]
    answers: dict[int, object] = {}

    def commit(i: int) -> None:
        try:
            answers[i] = shard.commit(changes[i])
        except ItemNotFound as err:
            answers[i] = err

    queued_as_one_group(shard, [lambda i=i: commit(i) for i in range(len(changes))])
    changes.append(Change("upsert", ["w"], [None], features.visual[7:8], embed(slice(7, 8))))
    queued_as_one_group(shard, [lambda: commit(len(changes) - 1)])  # the next group: counted once the first is applied
    with shard.paused():  # the apply has finished
        live = len(shard.index)

    replay = VectorIndex.load(tiny.index_dir / "visual")
    expected = {}
    for i, change in sorted(((i, c) for i, c in enumerate(changes) if not isinstance(answers[i], ItemNotFound)), key=lambda ic: ic[1].lsn):
        apply(replay, change)
        expected[change.lsn] = len(replay)
    assert isinstance(answers[4], ItemNotFound)
    assert [answers[i] for i in (0, 1, 2, 3, 5, 6)] == [expected[changes[i].lsn] for i in (0, 1, 2, 3, 5, 6)]
    assert answers[len(changes) - 1] == expected[max(expected)] == live == len(replay)
    assert sorted(shard.index.ids()) == sorted(replay.ids())
    collection.close()


def test_a_failed_apply_after_the_answer_refuses_commits_checkpoints_and_snapshots_until_a_restart_replays_the_log(tiny, tmp_path, features, monkeypatch):
    index_dir = copy_index(tiny, tmp_path / "index")
    collection = Collection.load(tiny.model_dir, index_dir, device="cpu")
    collection.checkpointer.stop()
    shard = collection.shards["visual"]
    shard.answers_before_applying = True
    before = len(shard.index)

    def out_of_memory(*args, **kwargs):
        raise MemoryError("planted")

    monkeypatch.setattr(shard.index, "upsert", out_of_memory)
    assert collection.upsert("visual", features.visual[0:1], ["answered"], [None]) == before + 1  # logged and answered
    with shard.paused():
        assert isinstance(shard.failed, MemoryError) and "answered" not in shard.index
    with pytest.raises(ChangeNotSaved, match="restart"):
        collection.upsert("visual", features.visual[1:2], ["refused"], [None])
    with pytest.raises(ChangeNotSaved, match="restart"):  # a checkpoint would save an index without the answered change and drop it from the log
        collection.checkpointer.checkpoint("visual")
    with pytest.raises(ChangeNotSaved, match="restart"):  # so would a snapshot file
        collection.snapshot(tmp_path / "snapshots")
    monkeypatch.undo()
    collection.close()
    restarted = Collection.load(tiny.model_dir, index_dir, device="cpu")
    assert "answered" in restarted.shards["visual"].index and "refused" not in restarted.shards["visual"].index
    restarted.close()
