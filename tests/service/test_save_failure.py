"""A change whose save fails is undone and answered 503: the client's answer and the served state agree.

Before: the change stayed live in memory (served, and written by the next save) while the client
got a 500.
"""

from __future__ import annotations

import errno
import threading
import time

import numpy as np
import pytest

from index.store import VectorIndex
from service.engine import ChangeNotSaved
from tests.service.conftest import copy_index, make_client, wait_ready

DISK_FULL = "No space left on device"


@pytest.fixture
def failing_saves(monkeypatch):
    """``fail[0] = n``: the next n index saves write part of their files, then fail as on a full disk."""
    fail = [0]
    real_save = VectorIndex.save

    def save(index, directory):
        if fail[0] <= 0:
            return real_save(index, directory)
        fail[0] -= 1
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "index.faiss").write_bytes(b"the first bytes of an index")
        raise OSError(errno.ENOSPC, DISK_FULL)

    monkeypatch.setattr(VectorIndex, "save", save)
    return fail


def _served(c, features, ids: list[str]) -> dict:
    """What a client sees: the items (or 404), the size, and the ranking of a search for clip 50's picture."""
    search = c.post("/v1/search", json={"modality": "visual", "target": "visual", "vectors": [features.visual[50].tolist()], "top_k": 10}).json()
    items = {}
    for item_id in ids:
        r = c.get(f"/v1/items/visual/{item_id}")
        items[item_id] = (r.json()["metadata"], r.json()["embedding"]) if r.status_code == 200 else r.status_code
    return {"items": items, "size": c.get("/v1/info").json()["index_sizes"]["visual"], "ranking": [h["id"] for h in search["results"][0]]}


def _on_disk(index_dir) -> dict:
    index = VectorIndex.load(index_dir / "visual")
    return {"size": len(index), "ids": sorted(index.ids())}


def _assert_refused_as_undone(r) -> None:
    assert r.status_code == 503, r.text
    detail = r.json()["detail"]
    assert "not saved" in detail and DISK_FULL in detail and "undone" in detail and "Traceback" not in detail


def test_a_failed_save_undoes_the_upsert_or_delete_and_answers_503(tiny, tmp_path, features, failing_saves):
    index_dir = copy_index(tiny, tmp_path / "index")
    existing, other = features.ids[3], features.ids[4]
    watched = [existing, other, "new-item"]
    with make_client(tiny, index_dir) as c:
        wait_ready(c)
        assert c.post("/v1/items/visual", json={"items": [{"id": existing, "vector": features.visual[3].tolist(), "metadata": {"v": 1}}]}).status_code == 200
        before, disk_before = _served(c, features, watched), _on_disk(index_dir)
        assert before["items"]["new-item"] == 404 and before["ranking"][0] == features.ids[50]

        failing_saves[0] = 2
        replace = [  # replaces one item (vector and metadata) and adds one
            {"id": existing, "vector": features.visual[50].tolist(), "metadata": {"v": 2}},
            {"id": "new-item", "vector": features.visual[3].tolist(), "metadata": {"v": 3}},
        ]
        _assert_refused_as_undone(c.post("/v1/items/visual", json={"items": replace}))
        assert _served(c, features, watched) == before
        _assert_refused_as_undone(c.delete(f"/v1/items/visual/{other}"))
        assert _served(c, features, watched) == before
        assert _on_disk(index_dir) == disk_before
        assert not [p.name for p in index_dir.iterdir() if p.name.startswith(".")]  # the partial copy (.visual.new) was removed

        assert failing_saves[0] == 0  # the disk has room again: the same requests now succeed and are kept
        assert c.post("/v1/items/visual", json={"items": replace}).status_code == 200
        assert c.delete(f"/v1/items/visual/{other}").status_code == 200
        after = _served(c, features, watched)
        assert after["items"][existing][0] == {"v": 2} and after["items"]["new-item"][0] == {"v": 3} and after["items"][other] == 404
        assert after["ranking"][:2] in ([existing, features.ids[50]], [features.ids[50], existing])  # the same picture now
    disk = _on_disk(index_dir)
    assert disk["size"] == after["size"] == before["size"] and "new-item" in disk["ids"] and other not in disk["ids"]


def test_a_save_that_fails_at_its_commit_rename_leaves_the_previous_index_in_place(tiny, tmp_path, features, monkeypatch):
    """The live directory was already moved aside when the rename of the new one failed: it must be put back now."""
    import service.persist

    index_dir = copy_index(tiny, tmp_path / "index")
    real_rename = service.persist.os.rename

    def rename(src, dst):
        if str(src).endswith(".visual.new"):
            raise OSError(errno.EIO, "Input/output error")
        return real_rename(src, dst)

    with make_client(tiny, index_dir) as c:
        wait_ready(c)
        disk_before = _on_disk(index_dir)
        monkeypatch.setattr(service.persist.os, "rename", rename)
        r = c.post("/v1/items/visual", json={"items": [{"id": "late", "vector": features.visual[0].tolist()}]})
        assert r.status_code == 503 and "Input/output error" in r.json()["detail"]
        assert c.get("/v1/items/visual/late").status_code == 404
        assert _on_disk(index_dir) == disk_before and not [p.name for p in index_dir.iterdir() if p.name.startswith(".")]


def test_changes_grouped_into_one_failed_save_are_all_undone_and_all_refused(tiny, tmp_path, features, failing_saves):
    """Two changes applied while an earlier save runs are saved together (group commit): a failure of
    that save must undo both, newest first, and answer both 503 (also the one whose thread did not save)."""
    from service.engine import Engine

    index_dir = copy_index(tiny, tmp_path / "index")
    engine = Engine.load(tiny.model_dir, index_dir, device="cpu")
    index = engine.indexes["visual"]
    before = {i: (index.get(i).vector.copy(), index.get(i).metadata) for i in features.ids[:3]}
    size = len(index)
    outcomes: dict[str, object] = {}

    def change(name: str, call) -> None:
        try:
            outcomes[name] = call()
        except ChangeNotSaved as err:
            outcomes[name] = err

    busy = engine._save_locks["visual"]  # as if a save were under way: both changes apply, then wait
    busy.acquire()
    threads = [
        threading.Thread(target=change, args=("upsert", lambda: engine.upsert("visual", features.visual[10:12], [features.ids[0], "fresh"], [{"n": 1}, None]))),
        threading.Thread(target=change, args=("delete", lambda: engine.delete("visual", features.ids[1]))),
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while engine._generation["visual"] < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(index) == size  # both applied in memory: +1 fresh, -1 deleted
    failing_saves[0] = 1  # only the first save fails: the second thread must not save (and acknowledge) its undone change
    busy.release()
    for t in threads:
        t.join()
    assert all(isinstance(outcomes[n], ChangeNotSaved) and outcomes[n].status_code == 503 for n in ("upsert", "delete")), outcomes
    assert len(index) == size and "fresh" not in index
    for item_id, (vector, metadata) in before.items():
        np.testing.assert_array_equal(index.get(item_id).vector, vector)
        assert index.get(item_id).metadata == metadata
    assert failing_saves[0] == 0
    assert engine.upsert("visual", features.visual[10:11], ["fresh"], [None]) == size + 1  # later changes save normally
    assert "fresh" in VectorIndex.load(index_dir / "visual")


def test_an_undo_that_fails_falls_back_to_the_index_on_disk(tiny, tmp_path, features, failing_saves, monkeypatch):
    from service.engine import Engine

    index_dir = copy_index(tiny, tmp_path / "index")
    engine = Engine.load(tiny.model_dir, index_dir, device="cpu")
    first = engine.indexes["visual"]
    old = first.get(features.ids[0])
    real_upsert, calls = VectorIndex.upsert, []

    def upsert_once(index, *args, **kwargs):  # the change applies; putting the old item back fails
        calls.append(1)
        if len(calls) > 1:
            raise MemoryError("no room to re-add")
        return real_upsert(index, *args, **kwargs)

    monkeypatch.setattr(VectorIndex, "upsert", upsert_once)
    failing_saves[0] = 1
    with pytest.raises(ChangeNotSaved, match="not saved"):
        engine.upsert("visual", features.visual[10:11], [features.ids[0]], [{"n": 1}])
    reloaded = engine.indexes["visual"]
    assert reloaded is not first and len(calls) == 2  # the undo was tried, then the disk's copy taken
    assert reloaded.get(features.ids[0]).metadata == old.metadata and sorted(reloaded.ids()) == sorted(VectorIndex.load(index_dir / "visual").ids())
    np.testing.assert_array_equal(reloaded.get(features.ids[0]).vector, old.vector)
