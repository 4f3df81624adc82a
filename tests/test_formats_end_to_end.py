"""The formats people hold, end to end with the README's commands: YouTube-8M TFRecord folders
(video and frame level, plain and gzip, 24 shards) and a Parquet table go through
``training train`` → ``training export`` → ``index build`` → a search that returns their ids with
their metadata; one of them through ``make run DATA=...``. Files come from the independent writers."""

from __future__ import annotations

from pathlib import Path

import pytest

from avdata.features import load_features
from tests.avdata.writers import make_yt8m_clips, write_parquet_table, write_yt8m

SHARDS = {"train": 16, "validate": 4, "test": 4}
COLLECTIONS = ("video-plain", "video-gz", "frame-plain", "frame-gz", "table")


@pytest.fixture(scope="module")
def clips():
    return make_yt8m_clips(240, n_classes=4, seed=3)


@pytest.fixture(scope="module")
def collections(tmp_path_factory, clips) -> dict[str, str]:
    root = tmp_path_factory.mktemp("held")
    out = {}
    for level in ("video", "frame"):
        for compress in (False, True):
            name = f"{level}-{'gz' if compress else 'plain'}"
            write_yt8m(root / name, clips, level, SHARDS, compress)
            out[name] = str(root / name)
    out["table"] = str(write_parquet_table(root / "clips.parquet", clips))
    return out


def _run(module: str, *args: str) -> None:
    from importlib import import_module

    code = import_module(f"{module}.__main__").main(list(args))
    assert code == 0, f"python -m {module} {' '.join(args)} exited {code}"


@pytest.mark.slow
@pytest.mark.parametrize("name", COLLECTIONS)
def test_train_export_index_search(tmp_path, collections, clips, name):
    from service.settings import Settings
    from tests.service.conftest import make_served_client, wait_ready

    data = collections[name]
    _run("training", "train", "--config", "tiny", "--data", data, "--out", str(tmp_path / "run"), "--quiet")
    _run("training", "export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "model"))
    _run("index", "build", "--model", str(tmp_path / "model"), "--data", data, "--out", str(tmp_path / "index"), "--no-progress")
    by_id = {item_id: i for i, item_id in enumerate(clips.ids)}
    test = load_features(data).subset("test")
    with make_served_client(Settings(model_dir=tmp_path / "model", index_dir=tmp_path / "index")) as client:
        wait_ready(client)
        response = client.post("/v1/search", json={"modality": "audio", "vectors": [test.audio[0].tolist()], "top_k": 5})
        assert response.status_code == 200, response.text
        hits = response.json()["results"][0]
        assert len(hits) == 5
        for hit in hits:
            assert hit["id"] in by_id  # the collection's own ids
            assert hit["metadata"]["labels"] == clips.labels[by_id[hit["id"]]]
            if name == "table":
                assert hit["metadata"]["title"] == f"clip number {by_id[hit['id']]}"
        stored = client.get(f"/v1/items/visual/{clips.ids[5]}")
        assert stored.status_code == 200 and stored.json()["metadata"]["labels"] == clips.labels[5]


@pytest.mark.slow
def test_index_build_with_ray_engine_streams_record_shards(tmp_path, collections, tiny):
    _run("index", "build", "--model", str(tiny.model_dir), "--data", collections["frame-gz"], "--out", str(tmp_path / "index"), "--no-progress", "--engine", "ray", "--workers", "2")
    from index.store import VectorIndex

    audio = VectorIndex.load(tmp_path / "index" / "audio")
    assert len(audio) == 240 and len(list((tmp_path / "index" / "embeddings" / "audio").glob("*.npz"))) == 24


@pytest.mark.slow
@pytest.mark.parametrize("name", ["frame-gz", "table"])
def test_make_run_serves_the_collection(tmp_path, collections, clips, name):
    from tests.test_make_run import make_run_and_search

    data = collections[name]
    response = make_run_and_search(tmp_path, data)
    assert not Path(data, "audio_features.npy").exists()  # make used the collection, wrote no synthetic data into it
    hits = response["results"][0]
    assert hits and all(h["id"] in clips.ids and h["metadata"]["labels"] == clips.labels[clips.ids.index(h["id"])] for h in hits)


def test_index_build_names_a_corrupt_record_or_skips_it(tmp_path, tiny, clips, capsys):
    from index.__main__ import main as index_main

    shards = write_yt8m(tmp_path / "yt", clips, "video", {"train": 3})
    blob = bytearray(shards[1].read_bytes())
    blob[200] ^= 0x40  # inside record 0's bytes
    shards[1].write_bytes(bytes(blob))
    args = ["build", "--model", str(tiny.model_dir), "--data", str(tmp_path / "yt"), "--no-progress"]
    assert index_main([*args, "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {shards[1]}: record 0: data CRC mismatch (bytes 12..{12 + _first_length(shards[1])}); the record is corrupt"]
    assert not (tmp_path / "a" / "audio" / "info.json").exists()  # no index from part of the collection
    assert index_main([*args, "--out", str(tmp_path / "b"), "--skip-bad"]) == 0
    out = capsys.readouterr().out
    assert "audio 239 items" in out and "visual 239 items" in out and "skipped:    1 bad records/shards" in out


def _first_length(path) -> int:
    import struct

    return struct.unpack_from("<Q", path.read_bytes(), 0)[0]
