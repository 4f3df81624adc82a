"""The data layer: paired audio/visual clip features, loaded and validated.

Formats (see README "Data formats"):

* a **feature directory** holding ``audio_features.npy`` (N×D_a), ``visual_features.npy`` (N×D_v)
  and optionally ``labels.npy`` (N class ids, or N×C multi-hot), ``ids.txt`` (one id per line) and
  ``split.npy`` (N entries, ``train``/``val``/``test`` or 0/1/2) and ``metadata.jsonl`` (one JSON
  object per clip, kept with each item in the index);
* the authors' **HDF5 layout**: ``audio_train``, ``visual_train``, ``lab_train`` and the same three
  ``_test`` keys; a validation split is carved from the training rows (seeded), never the test rows;
* a **shard folder** of many ``.npy`` shards, one shard = ``audio_features-<name>.npy`` and/or
  ``visual_features-<name>.npy`` (same rows) with optional ``ids-<name>.txt``,
  ``labels-<name>.npy``, ``split-<name>.npy`` and ``metadata-<name>.jsonl`` (one JSON object per
  row, for the index); default ids are ``<name>:<row>``, so adding a shard renames nothing;
* **TFRecord** ``Example``/``SequenceExample`` shards (YouTube-8M, AudioSet) and **Parquet/Arrow**
  tables (:mod:`avdata.collection`, which also writes down the detection rule);
* ``synthetic``: the embedded default generator (:mod:`avdata.synthetic`).

uint8 features are 8-bit codes, de-quantised by YouTube-8M's rule ``q·4/255 + 4/512 − 2`` (:class:`Quantization`).
Every problem raises :class:`DataError` with one message naming the file and what is wrong.
This package imports no torch: training, the batch indexing jobs and the service all read data
through it, and the service image carries it without ``training/``.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np

from avdata.atomic import atomic_file, atomic_write
from avdata.collection import detect, join_clips, open_collection
from avdata.paired import (
    AUDIO_FILE,
    METADATA_FILE,
    HDF5_SUFFIXES,
    IDS_FILE,
    LABELS_FILE,
    SPLIT_FILE,
    SPLIT_NAMES,
    VISUAL_FILE,
    YOUTUBE8M,
    Quantization,
    DataError,
    PairedFeatures,
    as_features,
    dequantize,
    dequantized,
    feature_stats,
    make_paired,
)
from avdata.paired import check_split
from avdata.synthetic import generate

__all__ = [
    "SPLIT_NAMES", "AUDIO_FILE", "VISUAL_FILE", "LABELS_FILE", "IDS_FILE", "SPLIT_FILE", "HDF5_SUFFIXES", "SHARD_PREFIXES",
    "DataError", "PairedFeatures", "Quantization", "YOUTUBE8M", "dequantize", "dequantized", "feature_stats", "as_features", "make_paired",
    "load_directory", "load_hdf5", "shard_names", "load_shard", "shard_ids", "load_shard_folder", "load_features",
    "atomic_file", "atomic_write", "save_directory", "read_jsonl", "METADATA_FILE",
]


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise DataError(f"{path}: not a readable .npy file ({err})") from None


def load_directory(path: Path, keep_8bit: bool = False) -> PairedFeatures:
    for required in (AUDIO_FILE, VISUAL_FILE):
        if not (path / required).is_file():
            raise DataError(f"{path / required}: missing; a feature directory needs {AUDIO_FILE} and {VISUAL_FILE}")
    audio = as_features(_load_npy(path / AUDIO_FILE), str(path / AUDIO_FILE), keep_8bit)
    visual = as_features(_load_npy(path / VISUAL_FILE), str(path / VISUAL_FILE), keep_8bit)
    if audio.shape[0] != visual.shape[0]:
        raise DataError(
            f"{path / VISUAL_FILE}: has {visual.shape[0]} rows but {AUDIO_FILE} has {audio.shape[0]}; rows must pair up"
        )
    labels = _load_npy(path / LABELS_FILE) if (path / LABELS_FILE).is_file() else None
    ids = (path / IDS_FILE).read_text().splitlines() if (path / IDS_FILE).is_file() else None
    split = _load_npy(path / SPLIT_FILE) if (path / SPLIT_FILE).is_file() else None
    data = make_paired(audio, visual, labels, ids, split, source=str(path), keep_8bit=keep_8bit)
    if (path / METADATA_FILE).is_file():
        data.metadata = read_jsonl(path / METADATA_FILE, len(data))
    return data


def read_jsonl(path: Path, rows: int) -> list[dict | None]:
    """One JSON object (or an empty line) per row."""
    try:
        metadata = [json.loads(line) if line.strip() else None for line in path.read_text().splitlines()]
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not JSON lines ({err})") from None
    if len(metadata) != rows or any(m is not None and not isinstance(m, dict) for m in metadata):
        raise DataError(f"{path}: needs one JSON object per row ({rows} rows)")
    return metadata


def load_hdf5(path: Path, val_fraction: float = 0.1, seed: int = 0) -> PairedFeatures:
    """The authors' layout; validation rows are carved (seeded) from the training rows."""
    import h5py

    keys = [f"{kind}_{part}" for part in ("train", "test") for kind in ("audio", "visual", "lab")]
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in keys if k not in f]
            if missing:
                raise DataError(f"{path}: missing HDF5 datasets {missing}; expected {keys}")
            arrays = {k: np.asarray(f[k]) for k in keys}
    except OSError as err:
        raise DataError(f"{path}: not a readable HDF5 file ({err})") from None
    parts = []
    for part in ("train", "test"):
        parts.append(
            make_paired(
                arrays[f"audio_{part}"],
                arrays[f"visual_{part}"],
                np.asarray(arrays[f"lab_{part}"]).squeeze(),
                [f"{part}-{i:07d}" for i in range(len(arrays[f"audio_{part}"]))],
                source=f"{path}[{part}]",
            )
        )
    train, test = parts
    if train.audio_dim != test.audio_dim or train.visual_dim != test.visual_dim:
        raise DataError(f"{path}: train and test feature widths differ")
    split = np.array(["train"] * len(train) + ["test"] * len(test), dtype=object)
    val_rows = np.random.default_rng(seed).permutation(len(train))[: int(round(val_fraction * len(train)))]
    split[val_rows] = "val"
    labels = None
    if train.labels is not None and test.labels is not None and train.labels.ndim == test.labels.ndim:
        labels = np.concatenate([train.labels, test.labels])
    return make_paired(
        np.vstack([train.audio, test.audio]),
        np.vstack([train.visual, test.visual]),
        labels,
        train.ids + test.ids,
        split.astype(str),
        source=str(path),
    )


SHARD_PREFIXES = {"audio": "audio_features-", "visual": "visual_features-"}


def shard_names(path: str | os.PathLike) -> list[str]:
    """Sorted shard names of a shard folder (empty when ``path`` holds no shards)."""
    names = set()
    for prefix in SHARD_PREFIXES.values():
        names.update(p.name[len(prefix) : -len(".npy")] for p in Path(path).glob(f"{prefix}*.npy"))
    return sorted(names)


def load_shard(
    path: str | os.PathLike, name: str, modality: str, mmap: bool = True, keep_8bit: bool = False
) -> tuple[np.ndarray | None, list[str] | None]:
    """(features (N, D) float32, or uint8 codes with ``keep_8bit``, or None when the shard lacks ``modality``; ids or None for the default)."""
    path = Path(path)
    file = path / f"{SHARD_PREFIXES[modality]}{name}.npy"
    if not file.is_file():
        return None, None
    try:
        raw = np.load(file, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise DataError(f"{file}: not a readable .npy file ({err})") from None
    features = as_features(np.asarray(raw), str(file), keep_8bit)
    ids_file = path / f"ids-{name}.txt"
    ids = ids_file.read_text().splitlines() if ids_file.is_file() else None
    if ids is not None and len(ids) != len(features):
        raise DataError(f"{ids_file}: {len(ids)} ids for {len(features)} rows of {file.name}")
    return features, ids


def shard_ids(name: str, n: int) -> list[str]:
    """Default ids of a shard's rows: ``<name>:<row>``."""
    return [f"{name}:{row}" for row in range(n)]


def load_shard_folder(path: str | os.PathLike, keep_8bit: bool = False) -> PairedFeatures:
    """Every shard of a shard folder as one :class:`PairedFeatures` (each shard needs both modalities)."""
    path = Path(path)
    names = shard_names(path)
    if not names:
        raise DataError(f"{path}: no shards ({SHARD_PREFIXES['audio']}<name>.npy / {SHARD_PREFIXES['visual']}<name>.npy)")
    audio, visual, ids, labels, splits = [], [], [], [], []
    for name in names:
        a, a_ids = load_shard(path, name, "audio", mmap=False, keep_8bit=keep_8bit)
        v, _ = load_shard(path, name, "visual", mmap=False, keep_8bit=keep_8bit)
        if a is None or v is None:
            raise DataError(f"{path}: shard {name!r} lacks {'audio' if a is None else 'visual'} features; training needs both")
        if len(a) != len(v):
            raise DataError(f"{path}: shard {name!r} has {len(a)} audio rows but {len(v)} visual rows; rows must pair up")
        audio.append(a), visual.append(v), ids.extend(a_ids or shard_ids(name, len(a)))
        labels.append(_load_npy(path / f"labels-{name}.npy") if (path / f"labels-{name}.npy").is_file() else None)
        split_file = path / f"split-{name}.npy"
        splits.append(check_split(_load_npy(split_file), len(a), str(split_file)) if split_file.is_file() else None)
    all_labels = np.concatenate(labels) if all(x is not None for x in labels) else None
    all_split = np.concatenate(splits) if all(x is not None for x in splits) else None
    if keep_8bit and len({a.dtype for a in audio} | {v.dtype for v in visual}) > 1:  # mixed: all as floats
        audio, visual = [dequantized(a) for a in audio], [dequantized(v) for v in visual]
    return make_paired(np.vstack(audio), np.vstack(visual), all_labels, ids, all_split, source=str(path), keep_8bit=keep_8bit)


def load_features(data: str | os.PathLike, processes: int | None = None, keep_8bit: bool = False, **options) -> PairedFeatures:
    """Load any collection of the detection rule (:func:`avdata.collection.detect`): ``synthetic``,
    a feature directory, a shard folder, an HDF5 file, TFRecords or tables; always returns a
    train/val/test split. ``options`` override the collection's read options (``avdata.json``);
    record and table shards are read in ``processes`` processes (default: one per core).
    ``keep_8bit``: uint8 feature files stay uint8 codes in memory (training de-quantises per batch,
    see :func:`dequantized`); records and tables are always float32 (pooling leaves the 8-bit grid)."""
    kind, _ = detect(data)
    if kind == "synthetic":
        return generate()
    path = Path(data)
    if kind == "npy-shards":
        return load_shard_folder(path, keep_8bit).with_default_split()
    if kind == "directory":
        return load_directory(path, keep_8bit).with_default_split()
    if kind == "hdf5":
        return load_hdf5(path)
    collection = open_collection(data, **options)
    return join_clips(collection, collection.read_all(processes))[0]


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    atomic_write(path, buffer.getvalue())


def save_directory(data: PairedFeatures, path: str | os.PathLike) -> Path:
    """Write ``data`` in the feature-directory format; each file is written then renamed into place."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _atomic_save_npy(path / AUDIO_FILE, data.audio)
    _atomic_save_npy(path / VISUAL_FILE, data.visual)
    if data.labels is not None:
        _atomic_save_npy(path / LABELS_FILE, data.labels)
    if data.split is not None:
        _atomic_save_npy(path / SPLIT_FILE, data.split.astype("U5"))
    atomic_write(path / IDS_FILE, "\n".join(data.ids) + "\n")
    if data.metadata is not None:
        atomic_write(path / METADATA_FILE, "".join(json.dumps(m, ensure_ascii=False) + "\n" for m in data.metadata))
    return path
