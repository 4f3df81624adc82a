"""Items follow the model: items written through the API (and deletions) survive a new model
version, re-embedded from their kept raw features; old version directories are collected."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient

from index.embedder import Embedder
from service.app import create_app
from service.settings import Settings
from store.api_items import ApiItems
from store.collection import Collection
from store.layout import API_ITEMS_NAME
from store.versions import collect_versions
from tests.service.conftest import BASE_URL, LOCAL_CLIENT, copy_index, make_client, wait_ready

REPO = Path(__file__).resolve().parents[2]


def cli(*args: str) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_api_items_are_re_embedded_into_the_next_model_version(tiny, tmp_path, features):
    link = tmp_path / "indexes" / "current"
    cli("-m", "service", "prepare", "--model", str(tiny.model_dir), "--index", str(link), "--data", str(tiny.data_dir))
    v1_dir = link.resolve()
    raw_audio, raw_visual = features.audio[7] + 0.5, features.visual[9] * 1.5  # not clips of the collection
    deleted, replaced = features.ids[3], features.ids[4]
    roots = f"{tmp_path}"
    with make_client(tiny, link, reload_roots=roots) as c:
        wait_ready(c)
        assert c.post("/v1/items/audio", json={"items": [{"id": "api-a", "vector": raw_audio.tolist(), "metadata": {"by": "api"}}]}).status_code == 200
        assert c.post("/v1/items/visual", json={"items": [{"id": "api-v", "vector": raw_visual.tolist(), "metadata": {"n": 2}}]}).status_code == 200
        assert c.post("/v1/items/visual", json={"items": [{"id": replaced, "vector": features.visual[4].tolist(), "metadata": {"replaced": True}}]}).status_code == 200
        assert c.delete(f"/v1/items/visual/{deleted}").status_code == 200
        c.app.state.avsearch.collection.checkpointer.checkpoint("visual")  # some of it folded into the snapshot's feature file, some still in the log
        assert c.post("/v1/items/visual", json={"items": [{"id": "api-late", "vector": (features.visual[11] + 0.3).tolist()}]}).status_code == 200
        assert "api-v" in ApiItems.load(v1_dir / "visual").features and (v1_dir / "visual" / API_ITEMS_NAME).is_file()

        # a second model: the tiny preset trained again with another seed, exported
        cli("-m", "training", "train", "--config", "tiny", "--data", str(tiny.data_dir), "--out", str(tmp_path / "run2"), "--seed", "7", "--quiet")
        cli("-m", "training", "export", "--run", str(tmp_path / "run2"), "--out", str(tmp_path / "model2"))
        model2 = tmp_path / "model2"
        out = cli("-m", "service", "prepare", "--model", str(model2), "--index", str(link), "--data", str(tiny.data_dir))
        assert "re-embedded" in out.stdout and link.resolve() != v1_dir and v1_dir.is_dir()  # the live one is kept
        # written to the live version after prepare read it, before the swap: caught up at the swap
        assert c.post("/v1/items/audio", json={"items": [{"id": "api-between", "vector": (features.audio[12] + 0.3).tolist(), "metadata": {"late": 1}}]}).status_code == 200
        assert c.delete(f"/v1/items/visual/{features.ids[5]}").status_code == 200

        swapped = c.post("/v1/admin/reload", json={"model_dir": str(model2), "index_dir": str(link)})
        assert swapped.status_code == 200, swapped.text
        v2 = swapped.json()["model"]
        embedder2 = Embedder(model2, device="cpu")
        cases = [("audio", "api-a", raw_audio, {"by": "api"}), ("visual", "api-v", raw_visual, {"n": 2}), ("visual", "api-late", features.visual[11] + 0.3, None), ("audio", "api-between", features.audio[12] + 0.3, {"late": 1})]  # none a clip of the collection: no tie
        for modality, item_id, raw, metadata in cases:
            item = c.get(f"/v1/items/{modality}/{item_id}").json()
            assert item["metadata"] == metadata
            np.testing.assert_allclose(item["embedding"], embedder2.embed(modality, raw[None].astype(np.float32))[0], atol=1e-5)  # the new model's embedding
            hits = c.post("/v1/search", json={"modality": modality, "target": modality, "vectors": [raw.tolist()], "top_k": 1}).json()
            assert hits["model"] == v2 and hits["results"][0][0]["id"] == item_id  # found by the new model
        assert c.get(f"/v1/items/visual/{deleted}").status_code == 404 and c.get(f"/v1/items/visual/{features.ids[5]}").status_code == 404  # deletions follow too
        assert c.get(f"/v1/items/visual/{replaced}").json()["metadata"] == {"replaced": True}
        sizes = {"audio": len(features) + 2, "visual": len(features) + 2 - 2}
        assert c.get("/v1/info").json()["index_sizes"] == sizes
    with TestClient(create_app(Settings(model_dir=tmp_path / "model2", index_dir=link)), base_url=BASE_URL, client=LOCAL_CLIENT) as c:  # a restart of the new version: nothing caught up twice, nothing lost
        wait_ready(c)
        assert c.get("/v1/info").json()["index_sizes"] == sizes and c.get("/v1/items/audio/api-between").json()["metadata"] == {"late": 1}


def test_old_versions_are_collected_never_the_live_or_new_one(tmp_path):
    link = tmp_path / "current"
    versions = []
    for i in range(5):
        path = tmp_path / f"current-{i:012x}"
        path.mkdir()
        os.utime(path, (time.time() - 100 + i, time.time() - 100 + i))
        versions.append(path)
    (tmp_path / "current-previous-123").mkdir()  # not a version directory: left alone
    link.symlink_to(versions[0].name)  # the live one is the oldest
    deleted = collect_versions(link, keep=2, protect=[versions[0], versions[4]])
    assert sorted(p.name for p in deleted) == [v.name for v in versions[1:4]]
    assert versions[0].is_dir() and versions[4].is_dir() and (tmp_path / "current-previous-123").is_dir()
    assert collect_versions(link, keep=3, protect=[versions[4]]) == [] and versions[0].is_dir()


def test_a_version_a_server_still_holds_is_never_collected(tiny, tmp_path):
    link = tmp_path / "current"
    old = copy_index(tiny, tmp_path / "current-00000000000a")
    os.utime(old, (time.time() - 100, time.time() - 100))
    new = copy_index(tiny, tmp_path / "current-00000000000b")
    link.symlink_to(new.name)
    collection = Collection.load(tiny.model_dir, old, device="cpu")  # an older version, still served
    collect = f"from pathlib import Path; from store.versions import collect_versions; print(collect_versions(Path({str(link)!r}), 1, [Path({str(new)!r})]))"
    try:
        assert collect_versions(link, keep=1, protect=[new]) == [] and old.is_dir()  # from the serving process
        assert cli("-c", collect).stdout.strip() == "[]" and old.is_dir()  # from another one (prepare's case)
    finally:
        collection.close()
    assert collect_versions(link, keep=1, protect=[new]) == [old] and not old.exists()
