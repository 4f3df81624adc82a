"""Independent writers of the formats people hold, for the tests: nothing here imports avdata.

* a bitwise CRC-32C (the slow, obvious reference of the ``crc32c`` wheel);
* TFRecord framing (plain or gzip) around hand-encoded protobuf bytes of ``tf.train.Example`` and
  ``SequenceExample`` (tensorflow/core/example/{example,feature}.proto: field numbers below);
* YouTube-8M's layout: video-level ``id``/``labels``/``mean_rgb``/``mean_audio`` Examples and
  frame-level SequenceExamples (context ``id``/``labels``, feature lists ``rgb``/``audio`` of one
  8-bit byte string per second), shards named ``train*``/``validate*``/``test*``;
* AudioSet's layout (``video_id``, ``start_time_seconds``, ``end_time_seconds``, ``labels``,
  feature list ``audio_embedding``) and a Parquet table written with pyarrow.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def crc32c_bitwise(data: bytes) -> int:
    """CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), one bit at a time."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


_TABLE = []
for _n in range(256):
    _c = _n
    for _ in range(8):
        _c = (_c >> 1) ^ (0x82F63B78 if _c & 1 else 0)
    _TABLE.append(_c)


def crc32c_table(data: bytes) -> int:
    """The same CRC a byte at a time (the bitwise one, tabulated): fast enough for test shards."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def tf_masked_crc(data: bytes) -> int:
    crc = crc32c_table(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame_record(data: bytes, crc=tf_masked_crc) -> bytes:
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", crc(length)) + data + struct.pack("<I", crc(data))


def write_tfrecord(path: Path, records: list[bytes], compress: bool = False, crc=tf_masked_crc) -> Path:
    """``crc``: the masked CRC-32C function (the benchmark passes the wheel's, checked against this one in the tests)."""
    blob = b"".join(frame_record(r, crc) for r in records)
    path.write_bytes(gzip.compress(blob) if compress else blob)
    return path


# --- protobuf, by hand -------------------------------------------------------------------------


def varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64: two's complement, ten bytes
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def field_bytes(number: int, payload: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def bytes_feature(values: list[bytes]) -> bytes:
    return field_bytes(1, b"".join(field_bytes(1, v) for v in values))  # Feature.bytes_list = 1 { value = 1 }


def float_feature(values, packed: bool = True) -> bytes:
    values = [float(v) for v in values]
    if packed:
        body = field_bytes(1, struct.pack(f"<{len(values)}f", *values))
    else:  # one fixed32 per value: legal protobuf, which a reader must accept too
        body = b"".join(varint(1 << 3 | 5) + struct.pack("<f", v) for v in values)
    return field_bytes(2, body)  # Feature.float_list = 2


def int64_feature(values) -> bytes:
    return field_bytes(3, field_bytes(1, b"".join(varint(int(v)) for v in values)))  # Feature.int64_list = 3, packed


def features_message(features: dict[str, bytes]) -> bytes:
    """Features { map<string, Feature> feature = 1 }: one entry (key = 1, value = 2) per feature."""
    return b"".join(field_bytes(1, field_bytes(1, k.encode()) + field_bytes(2, v)) for k, v in features.items())


def example(features: dict[str, bytes]) -> bytes:
    return field_bytes(1, features_message(features))  # Example.features = 1


def sequence_example(context: dict[str, bytes], feature_lists: dict[str, list[bytes]]) -> bytes:
    """SequenceExample { Features context = 1; FeatureLists feature_lists = 2 }."""
    lists = b"".join(
        field_bytes(1, field_bytes(1, name.encode()) + field_bytes(2, b"".join(field_bytes(1, f) for f in frames)))
        for name, frames in feature_lists.items()
    )
    return field_bytes(1, features_message(context)) + field_bytes(2, lists)


# --- the datasets' layouts -----------------------------------------------------------------------


def dequantize_yt8m(q: np.ndarray) -> np.ndarray:
    """YouTube-8M starter code: feat * (max - min) / 255 + (max - min) / 512 + min, range [-2, 2]."""
    return q.astype(np.float64) * 4.0 / 255.0 + 4.0 / 512.0 - 2.0


@dataclass
class YT8MClips:
    """Clips made from 8-bit frames: frame-level truth, and the video-level means YouTube-8M's rule gives."""

    ids: list[str]
    labels: list[list[int]]
    rgb_frames: list[np.ndarray]  # (T_i, D_v) uint8
    audio_frames: list[np.ndarray]  # (T_i, D_a) uint8
    classes: np.ndarray  # (N,) the class that shaped the clip

    def mean_rgb(self, i: int) -> np.ndarray:
        return dequantize_yt8m(self.rgb_frames[i]).mean(0).astype(np.float32)

    def mean_audio(self, i: int) -> np.ndarray:
        return dequantize_yt8m(self.audio_frames[i]).mean(0).astype(np.float32)


def make_yt8m_clips(n: int, n_classes: int = 4, visual_dim: int = 1024, audio_dim: int = 128, seed: int = 0) -> YT8MClips:
    """Clips whose frames of both modalities follow one class prototype, so a model can learn to pair them."""
    rng = np.random.default_rng(seed)
    proto_v = rng.uniform(60, 196, (n_classes, visual_dim))
    proto_a = rng.uniform(60, 196, (n_classes, audio_dim))
    classes = rng.integers(0, n_classes, n)
    rgb, audio, labels = [], [], []
    for c in classes:
        t = int(rng.integers(3, 9))
        rgb.append(np.clip(proto_v[c] + rng.normal(0, 25, (t, visual_dim)), 0, 255).round().astype(np.uint8))
        audio.append(np.clip(proto_a[c] + rng.normal(0, 25, (t, audio_dim)), 0, 255).round().astype(np.uint8))
        labels.append(sorted({int(c), int(rng.integers(n_classes, n_classes + 3))}))  # the class, and a noise tag
    return YT8MClips([f"yt{i:04d}" for i in range(n)], labels, rgb, audio, classes)


def video_level_record(clips: YT8MClips, i: int) -> bytes:
    return example(
        {
            "id": bytes_feature([clips.ids[i].encode()]),
            "labels": int64_feature(clips.labels[i]),
            "mean_rgb": float_feature(clips.mean_rgb(i)),
            "mean_audio": float_feature(clips.mean_audio(i)),
        }
    )


def frame_level_record(clips: YT8MClips, i: int) -> bytes:
    return sequence_example(
        {"id": bytes_feature([clips.ids[i].encode()]), "labels": int64_feature(clips.labels[i])},
        {
            "rgb": [bytes_feature([row.tobytes()]) for row in clips.rgb_frames[i]],
            "audio": [bytes_feature([row.tobytes()]) for row in clips.audio_frames[i]],
        },
    )


def write_yt8m(folder: Path, clips: YT8MClips, level: str, shards: dict[str, int], compress: bool = False) -> list[Path]:
    """YouTube-8M shards: ``shards`` maps a split prefix (train, validate, test) to its shard count;
    clips are dealt to the shards in order."""
    folder.mkdir(parents=True, exist_ok=True)
    make = video_level_record if level == "video" else frame_level_record
    names = [f"{prefix}{k:04d}.tfrecord" + (".gz" if compress else "") for prefix, count in shards.items() for k in range(count)]
    per_shard = np.array_split(np.arange(len(clips.ids)), len(names))
    return [write_tfrecord(folder / name, [make(clips, int(i)) for i in rows], compress) for name, rows in zip(names, per_shard)]


def audioset_record(video_id: str, start: float, labels: list[int], audio: np.ndarray, rgb: np.ndarray) -> bytes:
    return sequence_example(
        {
            "video_id": bytes_feature([video_id.encode()]),
            "start_time_seconds": float_feature([start]),
            "end_time_seconds": float_feature([start + 10.0]),
            "labels": int64_feature(labels),
        },
        {"audio_embedding": [bytes_feature([r.tobytes()]) for r in audio], "rgb": [bytes_feature([r.tobytes()]) for r in rgb]},
    )


def write_parquet_table(path: Path, clips: YT8MClips, fixed_size: bool = True) -> Path:
    """One row a clip: id, title, url, start second, labels and the two vectors (fixed-size-list or list of float32)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = len(clips.ids)
    visual = np.stack([clips.mean_rgb(i) for i in range(n)])
    audio = np.stack([clips.mean_audio(i) for i in range(n)])

    def vectors(matrix):
        flat = pa.array(matrix.reshape(-1), pa.float32())
        if fixed_size:
            return pa.FixedSizeListArray.from_arrays(flat, matrix.shape[1])
        return pa.ListArray.from_arrays(pa.array(np.arange(0, matrix.size + 1, matrix.shape[1]), pa.int32()), flat)

    table = pa.table(
        {
            "id": clips.ids,
            "title": [f"clip number {i}" for i in range(n)],
            "url": [f"https://www.youtube.com/watch?v={cid}" for cid in clips.ids],
            "labels": pa.array(clips.labels, pa.list_(pa.int64())),
            "audio": vectors(audio),
            "visual": vectors(visual),
        }
    )
    pq.write_table(table, path)
    return path
