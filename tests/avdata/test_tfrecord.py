"""TFRecord readers against files written by the independent writers in tests/avdata/writers.py."""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np
import pytest

from avdata.clips import ReadOptions
from avdata.collection import detect, open_collection
from avdata.features import DataError, load_features
from avdata.tfrecord import masked_crc, parse_record, read_tfrecord
from tests.avdata.writers import (
    audioset_record,
    bytes_feature,
    crc32c_bitwise,
    crc32c_table,
    example,
    float_feature,
    int64_feature,
    make_yt8m_clips,
    sequence_example,
    tf_masked_crc,
    write_tfrecord,
    write_yt8m,
)

SHARDS = {"train": 12, "validate": 4, "test": 4}


def test_crc32c_wheel_matches_bitwise_reference():
    import crc32c

    assert crc32c_bitwise(b"123456789") == 0xE3069283  # the CRC-32C check value (RFC 3720)
    rng = np.random.default_rng(0)
    for n in (0, 1, 7, 8, 9, 63, 64, 65, 1000, 4099):
        blob = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert crc32c.crc32c(blob) == crc32c_bitwise(blob) == crc32c_table(blob)
        assert masked_crc(blob) == tf_masked_crc(blob)


@pytest.fixture(scope="module")
def clips():
    return make_yt8m_clips(66, seed=1)


@pytest.fixture(scope="module")
def yt8m(tmp_path_factory, clips):
    """The four YouTube-8M layouts of the same clips: video/frame level, plain/gzip, 20 shards each."""
    root = tmp_path_factory.mktemp("yt8m")
    for level in ("video", "frame"):
        for compress in (False, True):
            write_yt8m(root / f"{level}-{'gz' if compress else 'plain'}", clips, level, SHARDS, compress)
    return root


def test_video_level_reads_the_written_floats(yt8m, clips):
    data = load_features(yt8m / "video-plain", processes=1)
    row = {item_id: r for r, item_id in enumerate(data.ids)}
    assert sorted(data.ids) == sorted(clips.ids)
    for i in (0, 17, 65):
        np.testing.assert_array_equal(data.visual[row[clips.ids[i]]], clips.mean_rgb(i))
        np.testing.assert_array_equal(data.audio[row[clips.ids[i]]], clips.mean_audio(i))
        assert np.flatnonzero(data.labels[row[clips.ids[i]]]).tolist() == clips.labels[i]
        assert data.metadata[row[clips.ids[i]]] == {"labels": clips.labels[i]}
    assert data.labels.dtype == np.uint8 and data.labels.shape == (66, 7)


def test_frame_level_pooled_equals_video_level_within_the_8bit_step(yt8m):
    """YouTube-8M's video-level vectors are the mean of the de-quantised frames: pooling here must agree."""
    video = load_features(yt8m / "video-plain", processes=1)
    for folder in ("frame-plain", "frame-gz"):
        frame = load_features(yt8m / folder, processes=2)
        assert frame.ids == video.ids and list(frame.split) == list(video.split)
        for modality in ("audio", "visual"):
            diff = np.abs(getattr(frame, modality) - getattr(video, modality)).max()
            assert diff < (4 / 255) / 2  # within the 8-bit step (in fact float rounding only)
            assert diff < 1e-5


def test_gzip_and_plain_and_serial_and_parallel_agree(yt8m):
    plain = load_features(yt8m / "video-plain", processes=1)
    gz = load_features(yt8m / "video-gz", processes=2)
    np.testing.assert_array_equal(plain.visual, gz.visual)
    assert plain.ids == gz.ids


def test_split_comes_from_shard_names(yt8m, clips):
    data = load_features(yt8m / "video-plain", processes=1)
    collection = open_collection(yt8m / "video-plain")
    assert [s.name[:5] for s in collection.shards[:1]] == ["test0"]
    per_shard = np.array_split(np.arange(66), 20)  # the writer deals clips in order: 12 train, 4 validate, 4 test shards
    want = {clips.ids[i]: split for split, shards in (("train", per_shard[:12]), ("val", per_shard[12:16]), ("test", per_shard[16:])) for rows in shards for i in rows}
    assert {i: s for i, s in zip(data.ids, data.split)} == want


def test_train_shards_only_get_carved_val_and_test(yt8m):
    data = load_features(str(yt8m / "video-plain" / "train*"), processes=1)
    counts = {s: int((data.split == s).sum()) for s in ("train", "val", "test")}
    assert sum(counts.values()) == len(data) and counts["val"] > 0 and counts["test"] > 0


def _flip(path, at):
    blob = bytearray(path.read_bytes())
    blob[at] ^= 0x01
    path.write_bytes(bytes(blob))


def _record_offsets(path):
    blob, pos, out = path.read_bytes(), 0, []
    while pos < len(blob):
        (length,) = struct.unpack_from("<Q", blob, pos)
        out.append((pos, length))
        pos += 12 + length + 4
    return out


def test_one_flipped_byte_is_a_crc_error_naming_file_and_record(tmp_path, clips):
    shard = write_yt8m(tmp_path / "yt", clips, "video", {"train": 2})[1]
    start, length = _record_offsets(shard)[2]
    _flip(shard, start + 12 + length // 2)  # inside record 2's float bytes
    with pytest.raises(DataError, match=rf"{shard}: record 2: data CRC mismatch"):
        load_features(tmp_path / "yt", processes=1)
    _flip(shard, start + 12 + length // 2)
    _flip(shard, start + 3)  # record 2's length field
    with pytest.raises(DataError, match=rf"{shard}: record 2: length CRC mismatch"):
        load_features(tmp_path / "yt", processes=1)


def test_truncated_shards_name_the_record(tmp_path, clips):
    shard = write_yt8m(tmp_path / "yt", clips, "frame", {"train": 1})[0]
    start, length = _record_offsets(shard)[5]
    shard.write_bytes(shard.read_bytes()[: start + 40])
    with pytest.raises(DataError, match=rf"{shard}: record 5: truncated"):
        list(read_tfrecord(shard))
    gz = tmp_path / "cut.tfrecord.gz"
    gz.write_bytes(gzip.compress(shard.read_bytes())[:-30])
    with pytest.raises(DataError, match=rf"{gz}: a gzip TFRecord that does not decompress"):
        list(read_tfrecord(gz))


def test_skip_bad_counts_what_it_skipped(tmp_path, clips):
    shards = write_yt8m(tmp_path / "yt", clips, "video", {"train": 4})
    start, length = _record_offsets(shards[0])[1]
    _flip(shards[0], start + 12 + 10)  # one corrupt record: skipped, the rest of the shard read
    shards[3].write_bytes(shards[3].read_bytes()[:-7])  # the last record of the last shard cut short
    collection = open_collection(tmp_path / "yt", skip_bad=True)
    parts = collection.read_all(1)
    bad = [m for p in parts for m in p.bad]
    assert len(bad) == 2 and "record 1: data CRC mismatch" in bad[0] and "truncated" in bad[1]
    assert sum(len(p.ids) for p in parts) == 66 - 2


def _bad_records(tmp_path, records):
    path = write_tfrecord(tmp_path / "train0000.tfrecord", records)
    return path


@pytest.mark.parametrize(
    "record, message",
    [
        (example({"id": bytes_feature([b"a"]), "mean_rgb": float_feature(np.zeros(1024))}), "no audio feature"),
        (example({"id": bytes_feature([b"a"]), "mean_rgb": float_feature(np.zeros(1000)), "mean_audio": float_feature(np.zeros(128))}), "1000 values; earlier records of this file have 1024"),
        (example({"id": bytes_feature([b"a"]), "mean_rgb": int64_feature(range(1024)), "mean_audio": float_feature(np.zeros(128))}), "'mean_rgb' is an int64 list"),
        (example({"id": bytes_feature([b"a"]), "mean_rgb": float_feature([np.nan] * 1024), "mean_audio": float_feature(np.zeros(128))}), "NaN"),
        (b"\x0a\x05\x0a\x03", "not a tf.train.Example"),
    ],
)
def test_bad_records_name_file_and_record(tmp_path, record, message):
    good = example({"id": bytes_feature([b"ok"]), "mean_rgb": float_feature(np.ones(1024)), "mean_audio": float_feature(np.ones(128))})
    path = _bad_records(tmp_path, [good, record])
    with pytest.raises(DataError, match=rf"{path}: record 1: .*{message}"):
        open_collection(tmp_path).read(path)
    clips = open_collection(tmp_path, skip_bad=True).read(path)
    assert clips.ids == ["ok"] and len(clips.bad) == 1


def test_unpacked_floats_and_negative_int64_decode(tmp_path):
    record = example({"x": float_feature([1.5, -2.25], packed=False), "n": int64_feature([-3, 7, 2**40])})
    parsed = parse_record(write_and_read(tmp_path, record))
    np.testing.assert_array_equal(parsed.context["x"], [1.5, -2.25])
    assert parsed.context["n"] == [-3, 7, 2**40]


def write_and_read(tmp_path, record):
    path = write_tfrecord(tmp_path / "one.tfrecord", [record])
    return next(iter(read_tfrecord(path)))[1]


def test_audioset_layout_ids_metadata_and_max_pooling(tmp_path):
    rng = np.random.default_rng(0)
    audio = [rng.integers(0, 256, (10, 128), dtype=np.uint8) for _ in range(3)]
    rgb = [rng.integers(0, 256, (10, 64), dtype=np.uint8) for _ in range(3)]
    records = [audioset_record(f"vid{i}", 30.0 * i, [i, 5], audio[i], rgb[i]) for i in range(3)]
    write_tfrecord(tmp_path / "bal_train.tfrecord", records)
    collection = open_collection(tmp_path)
    clips = collection.read(collection.shards[0])
    assert clips.ids == ["vid0:0", "vid1:30", "vid2:60"]
    assert clips.metadata[1] == {"video_id": "vid1", "start_time_seconds": 30.0, "end_time_seconds": 40.0, "labels": [1, 5]}
    want = (audio[1].astype(np.float64) * 4 / 255 + 4 / 512 - 2).mean(0)
    np.testing.assert_allclose(clips.audio[1], want, atol=1e-5)
    (tmp_path / "avdata.json").write_text('{"pooling": "max", "range": [-1, 1]}')
    maxed = open_collection(tmp_path).read(collection.shards[0])
    np.testing.assert_allclose(maxed.visual[2], rgb[2].max(0).astype(np.float64) * 2 / 255 + 2 / 512 - 1, atol=1e-6)


def test_feature_names_are_options(tmp_path):
    record = sequence_example({"clip": bytes_feature([b"c1"])}, {"snd": [bytes_feature([bytes(range(8))])], "img": [float_feature(np.arange(4.0))]})
    write_tfrecord(tmp_path / "s.tfrecord", [record])
    with pytest.raises(DataError, match="no audio feature"):
        open_collection(tmp_path).read(tmp_path / "s.tfrecord")
    clips = open_collection(tmp_path, audio="snd", visual="img", ids=["clip"]).read(tmp_path / "s.tfrecord")
    assert clips.ids == ["c1"] and clips.visual.tolist() == [[0.0, 1.0, 2.0, 3.0]]


def test_detection_rule(tmp_path, yt8m):
    assert detect(yt8m / "video-gz")[0] == "tfrecord" and len(detect(yt8m / "video-gz")[1]) == 20
    assert detect(str(yt8m / "video-plain" / "validate*"))[0] == "tfrecord"
    assert detect("synthetic")[0] == "synthetic"
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="not a feature collection"):
        detect(tmp_path)
    (tmp_path / "junk.bin").write_bytes(os.urandom(100))
    with pytest.raises(DataError, match="not a feature collection"):
        detect(tmp_path)
    with pytest.raises(DataError, match="not an HDF5 file"):
        detect(tmp_path / "junk.bin")
    assert ReadOptions().pooling == "mean"
