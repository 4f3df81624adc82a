"""Parquet/Arrow tables, ``python -m avdata inspect/convert``, and labels.npy as item metadata."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.feather
import pyarrow.parquet as pq
import pytest

from avdata.__main__ import main as avdata_main
from avdata.features import DataError, load_directory, load_features, make_paired, save_directory
from tests.avdata.writers import make_yt8m_clips, write_parquet_table, write_yt8m


@pytest.fixture(scope="module")
def clips():
    return make_yt8m_clips(40, seed=2)


@pytest.mark.parametrize("fixed_size", [True, False])
def test_parquet_table_reads_vectors_ids_and_metadata(tmp_path, clips, fixed_size):
    data = load_features(write_parquet_table(tmp_path / "clips.parquet", clips, fixed_size))
    assert data.ids == clips.ids
    np.testing.assert_array_equal(data.visual[7], clips.mean_rgb(7))
    np.testing.assert_array_equal(data.audio[39], clips.mean_audio(39))
    assert data.metadata[3] == {"title": "clip number 3", "url": "https://www.youtube.com/watch?v=yt0003", "labels": clips.labels[3]}
    assert np.flatnonzero(data.labels[3]).tolist() == clips.labels[3]


def test_arrow_file_with_uint8_codes_and_start_second(tmp_path):
    q = np.arange(12, dtype=np.uint8).reshape(3, 4)
    table = pa.table(
        {
            "video_id": ["a", "b", "c"],
            "start_time_seconds": [0.0, 10.0, 2.5],
            "audio": pa.FixedSizeListArray.from_arrays(pa.array(q.reshape(-1)), 4),
            "visual": [bytes(r) for r in q],  # 8-bit codes as binary
        }
    )
    pyarrow.feather.write_feather(table, tmp_path / "t.arrow")
    data = load_features(tmp_path / "t.arrow")
    assert data.ids == ["a:0", "b:10", "c:2.5"] and data.metadata[2] == {"video_id": "c", "start_time_seconds": 2.5}
    want = q.astype(np.float64) * 4 / 255 + 4 / 512 - 2
    np.testing.assert_allclose(data.audio, want, atol=1e-6)
    np.testing.assert_allclose(data.visual, want, atol=1e-6)


def test_table_row_of_the_wrong_length_is_named(tmp_path):
    table = pa.table({"id": ["a", "b", "c"], "audio": [[1.0, 2.0], [1.0, 2.0], [1.0]], "visual": [[0.5], [0.5], [0.5]]})
    pq.write_table(table, tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad.parquet: column 'audio' row 2: 1 values; row 0 has 2"):
        load_features(tmp_path / "bad.parquet")
    pq.write_table(pa.table({"id": ["a"], "audio": ["text"], "visual": [[0.5]]}), tmp_path / "str.parquet")
    with pytest.raises(DataError, match=r"str.parquet: column 'audio' is string"):
        load_features(tmp_path / "str.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="junk.parquet: not a readable Parquet file"):
        load_features(tmp_path / "junk.parquet")


def test_labels_npy_becomes_label_metadata(tmp_path):
    rng = np.random.default_rng(0)
    data = make_paired(rng.standard_normal((5, 3)), rng.standard_normal((5, 2)), labels=np.array([0, 2, 1, 2, 0]))
    loaded = load_directory(save_directory(data, tmp_path))
    assert loaded.item_metadata(1, 3) == [{"label": 2}, {"label": 1}]
    multi = make_paired(rng.standard_normal((2, 3)), rng.standard_normal((2, 2)), labels=np.array([[1, 0, 1], [0, 0, 0]], np.uint8))
    assert multi.item_metadata(0, 2) == [{"label": [0, 2]}, {"label": []}]


def test_inspect_says_what_it_found(tmp_path, clips, capsys):
    write_yt8m(tmp_path / "yt", clips, "frame", {"train": 3, "validate": 1}, compress=True)
    assert avdata_main(["inspect", str(tmp_path / "yt")]) == 0
    out = capsys.readouterr().out
    assert "tfrecord, 4 shards (4 gzip)" in out
    assert "clips:      40" in out
    assert "1024-d float32 from 'rgb' (8-bit frames, mean-pooled)" in out
    assert "multi-hot, 7 classes" in out and "from 'id'" in out
    assert "bad:        0" in out
    assert len(out.splitlines()) <= 24  # one screen


def test_convert_writes_a_feature_directory_atomically(tmp_path, clips, capsys):
    write_parquet_table(tmp_path / "t.parquet", clips)
    assert avdata_main(["convert", str(tmp_path / "t.parquet"), "--out", str(tmp_path / "dir")]) == 0
    converted = load_features(tmp_path / "dir")
    original = load_features(tmp_path / "t.parquet")
    np.testing.assert_array_equal(converted.visual, original.visual)
    assert converted.ids == original.ids and converted.metadata == original.metadata
    assert list(converted.split) == list(original.split)
    assert avdata_main(["convert", str(tmp_path / "t.parquet"), "--out", str(tmp_path / "q"), "--8bit"]) == 0
    assert np.load(tmp_path / "q" / "visual_features.npy").dtype == np.uint8
    eight = load_features(tmp_path / "q")
    assert np.abs(eight.visual - original.visual).max() <= (4 / 255) / 2 + 1e-6  # within half the 8-bit step
    # An existing directory, a bad path: exit 2 and one line; nothing is left half-written.
    assert avdata_main(["convert", str(tmp_path / "t.parquet"), "--out", str(tmp_path / "dir")]) == 2
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 broken")
    assert avdata_main(["convert", str(tmp_path / "broken.parquet"), "--out", str(tmp_path / "new")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err)
    assert not (tmp_path / "new").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".new")]


def test_clip_retrieval_layout(tmp_path, clips):
    """``audio_emb/audio_emb_<k>.npy`` and ``img_emb/img_emb_<k>.npy`` (float16, as clip-retrieval writes) beside ``metadata/metadata_<k>.parquet``."""
    for folder in ("audio_emb", "img_emb", "metadata"):
        (tmp_path / folder).mkdir()
    rows = [range(0, 25), range(25, 40)]
    for k, part in enumerate(rows):
        np.save(tmp_path / "audio_emb" / f"audio_emb_{k}.npy", np.stack([clips.mean_audio(i) for i in part]).astype(np.float16))
        np.save(tmp_path / "img_emb" / f"img_emb_{k}.npy", np.stack([clips.mean_rgb(i) for i in part]).astype(np.float16))
        pq.write_table(pa.table({"id": [clips.ids[i] for i in part], "caption": [f"clip {i}" for i in part]}), tmp_path / "metadata" / f"metadata_{k}.parquet")
    data = load_features(tmp_path)
    assert data.ids == clips.ids and data.metadata[30] == {"caption": "clip 30"}
    np.testing.assert_array_equal(data.visual[30], clips.mean_rgb(30).astype(np.float16).astype(np.float32))
    np.save(tmp_path / "img_emb" / "img_emb_1.npy", np.zeros((14, 1024), np.float16))  # a row short of its metadata
    with pytest.raises(DataError, match=r"img_emb_1.npy: shape \(14, 1024\); .*metadata_1.parquet has 15 rows"):
        load_features(tmp_path)
