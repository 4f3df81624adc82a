"""Clips out of records: which features are the two modalities, pooling, ids, labels, metadata.

:class:`ReadOptions` is shared by every record and table format (TFRecord ``Example`` and
``SequenceExample``, Parquet/Arrow): feature names are options, YouTube-8M's first. A clip's
vector is a float list (``mean_rgb``), one 8-bit byte string (de-quantised), or a per-second
feature list (``rgb``, ``audio``, AudioSet's ``audio_embedding``), each second de-quantised and
pooled over time. Pooling is ``mean`` (how YouTube-8M made its video-level features from its
frames, so pooled frame-level clips equal video-level ones) or ``max`` (keeps a short event, a
bark in a ten-second clip, that a mean dilutes). A shard is read into :class:`ShardClips`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from avdata.paired import YOUTUBE8M, DataError, Quantization
from avdata.tfrecord import Record, parse_record, read_tfrecord

__all__ = ["ReadOptions", "ShardClips", "OPTIONS_FILE", "POOLINGS", "read_tfrecord_shard", "pool_frames", "json_value"]

OPTIONS_FILE = "avdata.json"  # beside the shards: the options of this collection, read by every entry point
POOLINGS = ("mean", "max")
MODALITIES = ("audio", "visual")


@dataclass(frozen=True)
class ReadOptions:
    # Candidate names of each modality's feature, first present wins (YouTube-8M video-level,
    # YouTube-8M frame-level, AudioSet, then plain names used by tables).
    audio: tuple[str, ...] = ("mean_audio", "audio", "audio_embedding", "audio_features")
    visual: tuple[str, ...] = ("mean_rgb", "rgb", "visual", "visual_features", "video_embedding")
    ids: tuple[str, ...] = ("id", "video_id", "ytid", "youtube_id")  # the clip id (+ ":<start>" when a start second is there)
    start: str = "start_time_seconds"  # AudioSet's clip start, part of the id when present
    labels: str = "labels"  # a list of class ids per clip (optional); becomes multi-hot
    pooling: str = "mean"  # how per-second features become one clip vector: mean or max
    quantization: Quantization = YOUTUBE8M  # the range of 8-bit values (YouTube-8M's [-2, 2] by default)
    skip_bad: bool = False  # skip (and count) bad records instead of stopping at the first

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise DataError(f"pooling {self.pooling!r}: expected one of {POOLINGS}")

    def names(self, modality: str) -> tuple[str, ...]:
        return self.audio if modality == "audio" else self.visual

    @classmethod
    def from_file(cls, path: Path, **overrides) -> "ReadOptions":
        """Options from ``avdata.json`` (when present), then ``overrides`` (CLI flags that were given)."""
        settings: dict = {}
        if path.is_file():
            try:
                settings = json.loads(path.read_text())
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: not JSON ({err})") from None
            if not isinstance(settings, dict):
                raise DataError(f"{path}: expected a JSON object of read options")
        settings.update({k: v for k, v in overrides.items() if v is not None})
        known = {"audio", "visual", "ids", "start", "labels", "pooling", "range", "skip_bad"}
        unknown = set(settings) - known
        if unknown:
            raise DataError(f"{path}: unknown read options {sorted(unknown)}; known: {sorted(known)}")
        for key in ("audio", "visual", "ids"):
            if isinstance(settings.get(key), str):
                settings[key] = (settings[key],)
            elif key in settings:
                settings[key] = tuple(settings[key])
        if "range" in settings:
            low, high = settings.pop("range")
            settings["quantization"] = Quantization(float(low), float(high))
        return cls(**settings)


@dataclass
class ShardClips:
    """The clips of one shard: rows of ``audio`` and ``visual`` pair up (a modality not asked for is None)."""

    path: str
    audio: np.ndarray | None  # (n, D_a) float32
    visual: np.ndarray | None  # (n, D_v) float32
    ids: list[str]
    labels: list[list[int]] | None  # class ids per clip, or None when the shard has none
    metadata: list[dict]  # every other field of the clip
    bad: list[str] = field(default_factory=list)  # messages of the records skipped (skip_bad)
    fields: dict[str, str] = field(default_factory=dict)  # modality (and "id") -> where its first record's value came from


def pool_frames(frames: np.ndarray, pooling: str, quantization: Quantization) -> np.ndarray:
    """(T, D) frames (uint8 codes or floats) -> (D,) float32. Pooled on the codes, then
    de-quantised: both poolings commute with the rule's affine map, and it is T times less work."""
    pooled = frames.mean(0, dtype=np.float64) if pooling == "mean" else frames.max(0).astype(np.float64)
    if frames.dtype == np.uint8:
        return quantization.dequantize(pooled).astype(np.float32)
    return pooled.astype(np.float32)


def json_value(value):
    """A feature as JSON: one value unwrapped, bytes as text (hex when they are not UTF-8)."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    items = []
    for v in value:
        if isinstance(v, (bytes, bytearray)):
            try:
                v = v.decode()
            except UnicodeDecodeError:
                v = v.hex()
        items.append(v)
    return items[0] if len(items) == 1 else items


def _frames(values: list, name: str) -> np.ndarray:
    """A feature list (one value per second) as a (T, D) array of uint8 codes or float32."""
    if not values:
        raise ValueError(f"feature list {name!r} has no frames")
    if all(isinstance(v, list) and len(v) == 1 and isinstance(v[0], bytes) for v in values):
        width = len(values[0][0])
        if any(len(v[0]) != width for v in values):
            raise ValueError(f"feature list {name!r}: frames of different lengths")
        return np.frombuffer(b"".join(v[0] for v in values), np.uint8).reshape(len(values), width)
    if all(isinstance(v, np.ndarray) for v in values):
        if len({len(v) for v in values}) != 1:
            raise ValueError(f"feature list {name!r}: frames of different lengths")
        return np.stack(values)
    raise ValueError(f"feature list {name!r}: each frame must be one 8-bit byte string or a float list")


def _vector(record: Record, names: tuple[str, ...], modality: str, options: ReadOptions) -> tuple[str, str, np.ndarray]:
    """(the feature's name, how it was stored, the clip's float32 vector) of one modality."""
    for name in names:
        if name in record.context:
            value = record.context[name]
            if isinstance(value, np.ndarray):
                return name, "float list", value.astype(np.float32)
            if isinstance(value, list) and len(value) == 1 and isinstance(value[0], bytes):  # one 8-bit vector
                return name, "8-bit bytes", options.quantization.dequantize(np.frombuffer(value[0], np.uint8))
            raise ValueError(f"feature {name!r} is {_kind(value)}; expected a float list or one 8-bit byte string")
        if name in record.frames:
            frames = _frames(record.frames[name], name)
            kind = f"{'8-bit' if frames.dtype == np.uint8 else 'float'} frames, {options.pooling}-pooled"
            return name, kind, pool_frames(frames, options.pooling, options.quantization)
    raise ValueError(f"no {modality} feature (looked for {', '.join(names)})")


def _kind(value) -> str:
    if isinstance(value, np.ndarray):
        return "a float list"
    if value and isinstance(value[0], bytes):
        return f"a list of {len(value)} byte strings"
    return "an int64 list" if value else "empty"


def clip_id(fields: dict, options: ReadOptions, fallback: str) -> tuple[str, str | None, str]:
    """(where the id came from, the field it used up or None, the id). The id is ``<id>``, or
    ``<id>:<start second>`` (the id field then stays in the metadata, where the console finds a
    YouTube id), or ``fallback`` (``<file>:<record>``) when no id field is there."""
    for name in options.ids:
        if name in fields:
            value = json_value(fields[name])
            if isinstance(value, list):
                raise ValueError(f"id field {name!r} holds {len(value)} values; expected one")
            start = fields.get(options.start)
            if start is not None:
                start = json_value(start)
                start = int(start) if float(start).is_integer() else start
                return f"{name!r}:{options.start!r}", None, f"{value}:{start}"
            return repr(name), name, str(value)
    return "none: <file>:<record>", None, fallback


def read_tfrecord_shard(path: str | os.PathLike, options: ReadOptions, modalities=MODALITIES) -> ShardClips:
    """Every clip of one TFRecord file (Examples and SequenceExamples alike); the modalities not in
    ``modalities`` are not decoded. Widths must agree within the shard."""
    path = str(path)
    stem = Path(path).name
    vectors: dict[str, list[np.ndarray]] = {m: [] for m in modalities}
    ids, labels, metadata, bad = [], [], [], []
    seen_labels = False
    described: dict[str, str] = {}
    numbers: list[int] = []  # the record number of each row, for messages
    records = read_tfrecord(path, bad if options.skip_bad else None)
    for number, data in records:
        try:
            record = parse_record(data)
            row = {}
            used = set()
            for modality in modalities:
                name, kind, vector = _vector(record, options.names(modality), modality, options)
                want = vectors[modality][0].shape[0] if vectors[modality] else vector.shape[0]
                if vector.shape[0] != want:
                    raise ValueError(f"{modality} feature {name!r} has {vector.shape[0]} values; earlier records of this file have {want}")
                row[modality] = vector
                used.add(name)
                described.setdefault(modality, f"{name!r} ({kind})")
            for modality in set(MODALITIES) - set(modalities):
                used.update(options.names(modality))  # not decoded, and never metadata
            id_source, id_field, item_id = clip_id(record.context, options, f"{stem}:{number}")
            label_list = record.context.get(options.labels)
            if label_list is not None and (isinstance(label_list, np.ndarray) or (label_list and not isinstance(label_list[0], int))):
                raise ValueError(f"labels {options.labels!r} must be an int64 list, got {_kind(label_list)}")
        except ValueError as err:
            message = f"{path}: record {number}: {err}"
            if not options.skip_bad:
                raise DataError(message) from None
            bad.append(message)
            continue
        for modality in modalities:
            vectors[modality].append(row[modality])
        ids.append(item_id)
        numbers.append(number)
        described.setdefault("id", id_source)
        seen_labels = seen_labels or label_list is not None
        labels.append(list(label_list or []))
        metadata.append({k: json_value(v) if k != options.labels else list(v) for k, v in record.context.items() if k not in used and k != id_field})
    arrays = {m: np.stack(vectors[m]) if vectors[m] else None for m in modalities}
    for modality, array in arrays.items():  # one check per shard, not per record
        bad_rows = [] if array is None else np.flatnonzero(~np.isfinite(array).all(axis=1))
        if len(bad_rows):
            messages = [f"{path}: record {numbers[r]}: {modality} feature holds NaN/Inf" for r in bad_rows]
            if not options.skip_bad:
                raise DataError(messages[0])
            bad.extend(messages)
            keep = np.setdiff1d(np.arange(len(ids)), bad_rows)
            arrays = {m: a[keep] for m, a in arrays.items()}
            ids, metadata, numbers = [ids[r] for r in keep], [metadata[r] for r in keep], [numbers[r] for r in keep]
            labels = [labels[r] for r in keep]
    return ShardClips(path, arrays.get("audio"), arrays.get("visual"), ids, labels if seen_labels else None, metadata, bad, described)
