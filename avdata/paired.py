"""Paired audio/visual clip features: the type every format loads into, and its validation.

Numpy only (no torch, no HDF5): :mod:`avdata.features` (the formats) and :mod:`avdata.synthetic`
(the embedded default generator) both build on it, so neither imports the other's module at load.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

__all__ = ["SPLIT_NAMES", "AUDIO_FILE", "VISUAL_FILE", "LABELS_FILE", "IDS_FILE", "SPLIT_FILE", "METADATA_FILE", "HDF5_SUFFIXES",
           "DataError", "PairedFeatures", "Quantization", "YOUTUBE8M", "dequantize", "dequantized", "feature_stats", "as_features", "make_paired"]

SPLIT_NAMES = ("train", "val", "test")
AUDIO_FILE, VISUAL_FILE = "audio_features.npy", "visual_features.npy"
LABELS_FILE, IDS_FILE, SPLIT_FILE, METADATA_FILE = "labels.npy", "ids.txt", "split.npy", "metadata.jsonl"
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")


class DataError(ValueError):
    """Input features that cannot be used, with a message that names the file and the problem."""


@dataclass
class PairedFeatures:
    """N paired clips. Row i of ``audio`` and of ``visual`` belong to the same clip."""

    audio: np.ndarray  # (N, D_a) float32, or uint8 codes when loaded with keep_8bit (see dequantized)
    visual: np.ndarray  # (N, D_v) float32, or uint8 codes likewise
    labels: np.ndarray | None  # (N,) int class ids or (N, C) multi-hot; evaluation only
    ids: list[str]  # N stable string ids
    split: np.ndarray | None  # (N,) str in SPLIT_NAMES, or None when the source has none
    source: str = ""  # where the data came from, for logs and cards
    metadata: list[dict] | None = None  # N JSON objects kept with each item in the index (title, URL, labels ...)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def audio_dim(self) -> int:
        return int(self.audio.shape[1])

    @property
    def visual_dim(self) -> int:
        return int(self.visual.shape[1])

    def subset(self, split_name: str) -> "PairedFeatures":
        """The rows of one split (``train``, ``val`` or ``test``)."""
        if split_name not in SPLIT_NAMES:
            raise DataError(f"{self.source}: unknown split {split_name!r}; expected one of {SPLIT_NAMES}")
        if self.split is None:
            raise DataError(f"{self.source}: has no split; call with_default_split() first")
        rows = np.flatnonzero(self.split == split_name)
        if len(rows) == 0:
            raise DataError(f"{self.source}: the {split_name!r} split has no rows; give split.npy rows of train, val and test")
        return self.take(rows)

    def labelled(self) -> "PairedFeatures":
        """Self, or a DataError when there are no labels (validation and evaluation need them)."""
        if self.labels is None:
            raise DataError(f"{self.source}: has no labels ({LABELS_FILE}); they are needed for validation-based selection and evaluation")
        return self

    def take(self, rows: np.ndarray) -> "PairedFeatures":
        return replace(
            self,
            audio=self.audio[rows],
            visual=self.visual[rows],
            labels=None if self.labels is None else self.labels[rows],
            ids=[self.ids[i] for i in rows],
            split=None if self.split is None else self.split[rows],
            metadata=None if self.metadata is None else [self.metadata[i] for i in rows],
        )

    def item_metadata(self, start: int, stop: int) -> list[dict] | None:
        """The index's metadata of rows ``start:stop``: the source's own, plus ``label`` (the class
        id, or the list of class ids of a multi-hot row) when there are labels; None without either."""
        if self.metadata is None and self.labels is None:
            return None
        out = [dict(m) for m in self.metadata[start:stop]] if self.metadata is not None else [{} for _ in range(start, min(stop, len(self)))]
        if self.labels is not None:
            labels = self.labels[start:stop]
            for item, label in zip(out, labels):
                item.setdefault("label", int(label) if labels.ndim == 1 else np.flatnonzero(label).tolist())
        return out

    def with_default_split(self, fractions=(0.7, 0.1, 0.2), seed: int = 0) -> "PairedFeatures":
        """Keep an existing split; otherwise assign a seeded train/val/test split."""
        if self.split is not None:
            return self
        order = np.random.default_rng(seed).permutation(len(self))
        n_train = int(round(fractions[0] * len(self)))
        n_val = int(round(fractions[1] * len(self)))
        split = np.empty(len(self), dtype=object)
        split[order[:n_train]], split[order[n_train : n_train + n_val]] = "train", "val"
        split[order[n_train + n_val :]] = "test"
        return replace(self, split=split.astype(str))


@dataclass(frozen=True)
class Quantization:
    """The 8-bit code of a feature range: YouTube-8M's ``Dequantize`` (its starter code, range
    [−2, 2]): ``x = q·(high − low)/255 + (high − low)/512 + low``. The same rule made YouTube-8M's
    float ``mean_rgb``/``mean_audio`` from its 8-bit frames, and AudioSet's embeddings use the same
    range, so a model trained on float features and queried with 8-bit ones sees the same numbers."""

    low: float = -2.0
    high: float = 2.0

    def __post_init__(self) -> None:
        if not self.high > self.low:
            raise DataError(f"8-bit range [{self.low}, {self.high}]: high must be above low")

    @property
    def step(self) -> float:
        return (self.high - self.low) / 255.0

    @property
    def bias(self) -> float:
        return (self.high - self.low) / 512.0 + self.low

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        """(…) uint8 -> float32 by the rule above: one float32 multiply and one add (torch batches do the same)."""
        return (q.astype(np.float32) * np.float32(self.step) + np.float32(self.bias)).astype(np.float32, copy=False)

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """Float -> the nearest uint8 code (clipped to the range); ``dequantize`` inverts it within half a step."""
        return np.clip(np.round((np.asarray(x, np.float32) - np.float32(self.bias)) / np.float32(self.step)), 0, 255).astype(np.uint8)


YOUTUBE8M = Quantization()  # the default everywhere: readers, feature directories and the service


def dequantize(q: np.ndarray, quantization: Quantization = YOUTUBE8M) -> np.ndarray:
    """8-bit features back to floats by YouTube-8M's rule (see :class:`Quantization`)."""
    return quantization.dequantize(q)


def dequantized(x: np.ndarray) -> np.ndarray:
    """Features as float32: uint8 codes de-quantised by YouTube-8M's rule, floats as they are.
    Consumers of :class:`PairedFeatures` that may hold 8-bit codes (``keep_8bit``) call it per batch."""
    return dequantize(x) if x.dtype == np.uint8 else x


def feature_stats(x: np.ndarray, rows: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and (unbiased) std of de-quantised features, ``rows`` at a time in float64:
    no float copy of an 8-bit matrix is ever made whole."""
    total, squares = np.zeros(x.shape[1]), np.zeros(x.shape[1])
    for start in range(0, len(x), rows):
        block = dequantized(x[start : start + rows]).astype(np.float64)
        total += block.sum(0)
        squares += np.square(block).sum(0)
    mean = total / len(x)
    var = np.maximum(squares - len(x) * np.square(mean), 0.0) / max(len(x) - 1, 1)
    return mean.astype(np.float32), np.sqrt(var).astype(np.float32)


def as_features(array: np.ndarray, name: str, keep_8bit: bool = False) -> np.ndarray:
    """Validate one N×D feature matrix and return it as float32 (uint8 is de-quantised, or kept as
    uint8 codes with ``keep_8bit``: a quarter of the memory, de-quantised per batch by the user)."""
    if not isinstance(array, np.ndarray) or array.dtype == object:
        raise DataError(f"{name}: expected a numeric array, got {type(array).__name__}")
    if array.ndim != 2:
        raise DataError(f"{name}: expected a 2-D array (clips × features), got shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise DataError(f"{name}: is empty (shape {array.shape})")
    if array.dtype == np.uint8:
        return array if keep_8bit else dequantize(array)
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise DataError(f"{name}: unsupported dtype {array.dtype}; expected float or uint8 (8-bit quantised)")
    out = array.astype(np.float32, copy=False)
    bad = ~np.isfinite(out)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise DataError(f"{name}: holds {int(bad.sum())} NaN/Inf values (first in row {row})")
    return out


def _check_labels(labels: np.ndarray, n: int, name: str) -> np.ndarray:
    if labels.ndim not in (1, 2) or labels.shape[0] != n:
        raise DataError(f"{name}: expected {n} class ids or an {n}×C multi-hot matrix, got shape {labels.shape}")
    if labels.ndim == 2 and labels.dtype == np.uint8:
        return labels  # a multi-hot matrix kept compact (N·C bytes: YouTube-8M has 3,862 classes)
    if not np.issubdtype(labels.dtype, np.integer) and not np.issubdtype(labels.dtype, np.bool_):
        if np.issubdtype(labels.dtype, np.floating) and np.all(np.isfinite(labels)) and np.all(labels == np.round(labels)):
            return labels.astype(np.int64)
        raise DataError(f"{name}: labels must be integers (class ids or 0/1 multi-hot), got dtype {labels.dtype}")
    return labels.astype(np.int64)


def check_split(split: np.ndarray, n: int, name: str) -> np.ndarray:
    if split.ndim != 1 or split.shape[0] != n:
        raise DataError(f"{name}: expected {n} split entries, got shape {split.shape}")
    if np.issubdtype(split.dtype, np.integer):
        if split.min() < 0 or split.max() > 2:
            raise DataError(f"{name}: integer splits must be 0 (train), 1 (val) or 2 (test)")
        return np.asarray(SPLIT_NAMES)[split]
    split = split.astype(str)
    unknown = set(np.unique(split)) - set(SPLIT_NAMES)
    if unknown:
        raise DataError(f"{name}: unknown split names {sorted(unknown)}; expected {SPLIT_NAMES}")
    return split


def make_paired(audio, visual, labels=None, ids=None, split=None, source: str = "arrays", keep_8bit: bool = False) -> PairedFeatures:
    """Validate arrays into :class:`PairedFeatures`; every message names ``source``."""
    audio = as_features(audio, f"{source}: audio features", keep_8bit)
    visual = as_features(visual, f"{source}: visual features", keep_8bit)
    n = audio.shape[0]
    if visual.shape[0] != n:
        raise DataError(f"{source}: audio has {n} rows but visual has {visual.shape[0]}; rows must pair up")
    if labels is not None:
        labels = _check_labels(np.asarray(labels), n, f"{source}: labels")
    if ids is None:
        ids = [str(i) for i in range(n)]
    ids = [str(i) for i in ids]
    if len(ids) != n:
        raise DataError(f"{source}: {len(ids)} ids for {n} clips")
    if len(set(ids)) != n:
        raise DataError(f"{source}: ids are not unique")
    if split is not None:
        split = check_split(np.asarray(split), n, f"{source}: split")
    return PairedFeatures(audio, visual, labels, ids, split, source)
