"""Concurrent changes and searches, persistence across restarts, kills during a save, and version swaps."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from index.build import build_indexes
from index.store import VectorIndex
from store.persist import load_index, save_atomically
from tests.service.conftest import copy_index, make_client, persisted, wait_ready

REPO = Path(__file__).resolve().parents[2]


def test_concurrent_upserts_deletes_and_searches_stay_consistent(tiny, tmp_path, features):
    index_dir = copy_index(tiny, tmp_path / "index")
    original = set(features.ids)
    writers, rounds = 3, 6
    failures: list[str] = []
    stop = threading.Event()
    with make_client(tiny, index_dir) as c:
        wait_ready(c)

        def writer(w: int) -> None:  # each writer owns its ids: upsert 3, delete the oldest of them
            for r in range(rounds):
                items = [{"id": f"w{w}-{r}-{j}", "vector": features.visual[(w * 31 + r * 3 + j) % len(features)].tolist(), "metadata": {"w": w}} for j in range(3)]
                resp = c.post("/v1/items/visual", json={"items": items})
                if resp.status_code != 200:
                    failures.append(f"upsert {resp.status_code} {resp.text}")
                resp = c.delete(f"/v1/items/visual/w{w}-{r}-0")
                if resp.status_code != 200:
                    failures.append(f"delete {resp.status_code} {resp.text}")

        def searcher(s: int) -> None:
            while not stop.is_set():
                resp = c.post("/v1/search", json={"modality": "audio", "vectors": [features.audio[s].tolist()], "top_k": 20})
                hits = resp.json()["results"][0] if resp.status_code == 200 else []
                ids = [h["id"] for h in hits]
                scores = [h["score"] for h in hits]
                if resp.status_code != 200 or len(hits) != 20 or len(set(ids)) != 20 or scores != sorted(scores, reverse=True):
                    failures.append(f"search {resp.status_code} {resp.text[:200]}")
                if any(i not in original and not i.startswith("w") for i in ids):
                    failures.append(f"unknown id in {ids}")

        threads = [threading.Thread(target=writer, args=(w,)) for w in range(writers)]
        searchers = [threading.Thread(target=searcher, args=(s,)) for s in range(3)]
        for t in threads + searchers:
            t.start()
        for t in threads:
            t.join()
        stop.set()
        for t in searchers:
            t.join()
        assert not failures, failures[:5]
        expected = {f"w{w}-{r}-{j}" for w in range(writers) for r in range(rounds) for j in (1, 2)}
        assert c.get("/v1/info").json()["index_sizes"]["visual"] == len(original) + len(expected)
        for item_id in sorted(expected)[:6]:
            assert c.get(f"/v1/items/visual/{item_id}").json()["metadata"] == {"w": int(item_id[1])}
        assert c.get("/v1/items/visual/w0-0-0").status_code == 404
    # what was acknowledged is on disk (snapshot + log)
    on_disk = persisted(tiny, index_dir, "visual")
    assert {i for i in on_disk.ids() if i.startswith("w")} == expected


def test_changes_survive_a_restart(tiny, tmp_path, features):
    index_dir = copy_index(tiny, tmp_path / "index")
    with make_client(tiny, index_dir) as c:
        wait_ready(c)
        assert c.post("/v1/items/audio", json={"items": [{"id": "kept", "vector": features.audio[5].tolist(), "metadata": {"tag": "x"}}]}).status_code == 200
        assert c.delete(f"/v1/items/audio/{features.ids[0]}").status_code == 200
        before = c.post("/v1/search", json={"modality": "visual", "vectors": [features.visual[5].tolist()], "target": "audio", "top_k": 5}).json()
    with make_client(tiny, index_dir) as c:  # a new process would see the same files
        wait_ready(c)
        assert c.get("/v1/items/audio/kept").json()["metadata"] == {"tag": "x"}
        assert c.get(f"/v1/items/audio/{features.ids[0]}").status_code == 404
        assert c.get("/v1/info").json()["index_sizes"]["audio"] == len(features)
        after = c.post("/v1/search", json={"modality": "visual", "vectors": [features.visual[5].tolist()], "target": "audio", "top_k": 5}).json()
        assert [h["id"] for h in after["results"][0]] == [h["id"] for h in before["results"][0]]


SAVER = """
import sys, numpy as np
from store.persist import load_index, save_atomically
directory = sys.argv[1]
index = load_index(__import__("pathlib").Path(directory))
rng = np.random.default_rng(0)
for n in range(10**6):
    vectors = rng.standard_normal((2000, index.dim)).astype("float32")
    index.upsert(vectors / np.linalg.norm(vectors, axis=1, keepdims=True), [f"s{n}-{j}" for j in range(2000)])
    save_atomically(index, __import__("pathlib").Path(directory))
    print(len(index), flush=True)
"""


def test_a_kill_during_saves_leaves_a_loadable_index(tiny, tmp_path):
    directory = copy_index(tiny, tmp_path / "index") / "visual"
    start = len(VectorIndex.load(directory))
    rng = np.random.default_rng(1)
    for attempt in range(4):
        proc = subprocess.Popen([sys.executable, "-c", SAVER, str(directory)], cwd=REPO, stdout=subprocess.PIPE, text=True)
        acknowledged = [start]
        acknowledged.append(int(proc.stdout.readline()))  # at least one save done, the next one under way
        time.sleep(float(rng.uniform(0.0, 0.05)))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        acknowledged += [int(line) for line in out.split()]
        index = load_index(directory)  # recovers an interrupted swap, then checks the checksums
        assert len(index) in (acknowledged[-1], acknowledged[-1] + 2000), (len(index), acknowledged)
        start = len(index)
        assert not any(p.name.startswith(".visual.") for p in directory.parent.iterdir())


def test_an_interrupted_swap_or_temp_file_is_recovered(tiny, tmp_path):
    directory = copy_index(tiny, tmp_path / "index") / "audio"
    index = VectorIndex.load(directory)
    size = len(index)
    (directory / "index.faiss12345.tmp").write_bytes(b"half a file")  # killed while writing one file
    assert len(load_index(directory)) == size
    # killed between the two renames: the old copy moved aside, the new one complete but not in place
    index.upsert(np.eye(1, index.dim, dtype=np.float32), ["extra"])
    index.save(directory.parent / ".audio.new")
    os.rename(directory, directory.parent / ".audio.old")
    assert len(load_index(directory)) == size
    # killed while writing the new copy: a partial .new is dropped
    (directory.parent / ".audio.new").mkdir()
    (directory.parent / ".audio.new" / "index.faiss").write_bytes(b"partial")
    assert len(load_index(directory)) == size and not (directory.parent / ".audio.new").exists()
    save_atomically(index, directory)
    assert len(load_index(directory)) == size + 1


@pytest.fixture(scope="module")
def second_version(tiny, tmp_path_factory):
    """Another model version (same weights, another manifest, so another hash) and its own index."""
    root = tmp_path_factory.mktemp("v2")
    shutil.copytree(tiny.model_dir, root / "model")
    manifest = json.loads((root / "model" / "manifest.json").read_text())
    manifest["created"] = "2099-01-01T00:00:00+00:00"
    (root / "model" / "manifest.json").write_text(json.dumps(manifest))
    build_indexes(root / "model", tiny.data_dir, root / "index", progress=False)
    return root / "model", root / "index"


def test_swap_under_load_fails_no_request_and_refuses_another_models_index(tiny, tmp_path, features, second_version):
    model_v2, index_v2 = second_version
    index_dir = copy_index(tiny, tmp_path / "index")
    statuses: list[int] = []
    versions: list[str] = []
    stop = threading.Event()
    roots = ":".join(str(p.parent) for p in (model_v2, index_v2, tiny.model_dir, index_dir))
    with make_client(tiny, index_dir, reload_roots=roots) as c:
        wait_ready(c)
        v1 = c.get("/readyz").json()["model"]

        def load(i: int) -> None:
            while not stop.is_set():
                if i % 3 == 2:  # item changes keep going during swaps too
                    r = c.post("/v1/items/audio", json={"items": [{"id": f"during-{i}", "vector": features.audio[i].tolist()}]})
                else:
                    r = c.post("/v1/search", json={"modality": "audio", "vectors": [features.audio[i].tolist()], "top_k": 5})
                    if r.status_code == 200:
                        versions.append(r.json()["model"])
                statuses.append(r.status_code)

        threads = [threading.Thread(target=load, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        time.sleep(0.2)
        refused = c.post("/v1/admin/reload", json={"model_dir": str(model_v2)})  # v2 model, v1 index
        assert refused.status_code == 409 and "rebuild the index" in refused.json()["detail"]
        swapped = c.post("/v1/admin/reload", json={"model_dir": str(model_v2), "index_dir": str(index_v2)})
        assert swapped.status_code == 200, swapped.text
        v2 = swapped.json()["model"]
        assert swapped.json()["previous_model"] == v1 and v2 != v1
        time.sleep(0.2)
        back = c.post("/v1/admin/reload", json={"model_dir": str(tiny.model_dir), "index_dir": str(index_dir)})
        assert back.status_code == 200 and back.json()["model"] == v1
        time.sleep(0.2)
        stop.set()
        for t in threads:
            t.join()
        assert statuses and set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
        assert set(versions) == {v1, v2} and versions[-1] == v1
        assert "avsearch_version_swaps_total 2.0" in c.get("/metrics").text


def test_changes_go_to_the_loaded_version_after_its_symlink_moves(tiny, tmp_path, features):
    live = copy_index(tiny, tmp_path / "index-v1")
    nxt = copy_index(tiny, tmp_path / "index-v2")
    link = tmp_path / "current"
    link.symlink_to(live.name)
    with make_client(tiny, link) as c:
        wait_ready(c)
        link.unlink()
        link.symlink_to(nxt.name)  # the next version is being prepared and linked
        assert c.post("/v1/items/audio", json={"items": [{"id": "late", "vector": features.audio[0].tolist()}]}).status_code == 200
    assert "late" in persisted(tiny, live, "audio") and "late" not in persisted(tiny, nxt, "audio")
