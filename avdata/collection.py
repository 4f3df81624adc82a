"""Collections of record and table shards (TFRecord, Parquet/Arrow): found, read in parallel, joined.

**The detection rule** (every entry point goes through :func:`detect`; README "Data formats"):

1. ``synthetic``: the embedded generator;
2. a pattern with ``*``, ``?`` or ``[``: the files it matches, all TFRecord or all tables;
3. a directory: ``audio_features.npy`` in it: a feature directory; ``audio_features-*.npy`` /
   ``visual_features-*.npy``: a folder of ``.npy`` shards; a ``metadata/`` folder of
   ``metadata_<k>.parquet`` beside ``audio_emb/`` and ``visual_emb/`` (or ``img_emb/``):
   clip-retrieval's layout; files ending ``.parquet``, ``.arrow``,
   ``.feather`` or ``.ipc``: a table collection; otherwise, when a file's first record header
   passes its CRC-32C, a TFRecord collection, every file in it a shard (hidden files and
   ``*.json``, ``*.txt``, ``*.md``, ``*.csv`` aside, so a corrupt shard is reported, not skipped);
4. a file: ``.h5``/``.hdf5``/``.hdf``: HDF5; a table suffix: a table; a file whose first record
   header passes its CRC: one TFRecord shard (plain or gzip).

A collection's read options come from ``avdata.json`` beside its shards (see
:class:`~avdata.clips.ReadOptions`), so ``train``, ``index build``, ``make run`` and the compose
indexer all read it the same way. The split comes from YouTube-8M's shard names (``train*``,
``validate*``, ``test*``) when every shard has one (a split with no shard is carved, seeded, from
the train rows); otherwise the seeded default split.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from avdata.clips import MODALITIES, OPTIONS_FILE, ReadOptions, ShardClips, read_tfrecord_shard
from avdata.paired import AUDIO_FILE, HDF5_SUFFIXES, DataError, PairedFeatures, make_paired
from avdata.tables import TABLE_SUFFIXES, embedding_folders, embedding_shards, read_embedding_shard, read_table_shard
from avdata.tfrecord import looks_like_tfrecord

__all__ = ["detect", "Collection", "open_collection", "join_clips", "shard_split", "default_processes"]

log = logging.getLogger(__name__)
NOT_SHARDS = (".json", ".txt", ".md", ".csv")
RECORD_KINDS = ("tfrecord", "table", "embeddings")  # the formats read shard by shard through a Collection
SHARD_SPLITS = (("train", "train"), ("validate", "val"), ("valid", "val"), ("val", "val"), ("test", "test"))


def _is_pattern(text: str) -> bool:
    return any(c in text for c in "*?[")


def _shard_files(files: list[Path], where: str) -> tuple[str, list[Path]] | None:
    """("table" | "tfrecord", shards) of candidate files, or None when they are neither."""
    files = sorted(f for f in files if f.is_file() and not f.name.startswith(".") and f.suffix.lower() not in NOT_SHARDS)
    tables = [f for f in files if f.suffix.lower() in TABLE_SUFFIXES]
    if tables:
        if len(tables) != len(files):
            others = [f.name for f in files if f not in tables][:3]
            raise DataError(f"{where}: holds tables and other files ({', '.join(others)}); one collection is one format")
        return "table", tables
    if any(looks_like_tfrecord(f) for f in files):
        return "tfrecord", files
    return None


def detect(data: str | os.PathLike) -> tuple[str, list[Path]]:
    """(format, shard files) by the rule above; format is one of ``synthetic``, ``directory``,
    ``npy-shards``, ``hdf5``, ``embeddings`` (clip-retrieval's), ``table``, ``tfrecord``."""
    text = str(data)
    if text == "synthetic":
        return "synthetic", []
    if _is_pattern(text):
        found = _shard_files([Path(p) for p in glob.glob(text)], text)
        if found is None:
            raise DataError(f"{text}: matches no TFRecord or table files")
        return found
    path = Path(text)
    if path.is_dir():
        if (path / AUDIO_FILE).exists():
            return "directory", [path]
        if any(path.glob("audio_features-*.npy")) or any(path.glob("visual_features-*.npy")):
            return "npy-shards", [path]
        if embedding_folders(path, ReadOptions()) is not None:
            shards = embedding_shards(path)
            if not shards:
                raise DataError(f"{path}/metadata: no metadata_<k>.parquet shards beside the _emb folders")
            return "embeddings", shards
        found = _shard_files(list(path.iterdir()), text)
        if found is None:
            raise DataError(
                f"{path}: not a feature collection: no {AUDIO_FILE}, no .npy shards, no Parquet/Arrow tables and no TFRecord files"
            )
        return found
    if path.is_file():
        if path.suffix.lower() in HDF5_SUFFIXES:
            return "hdf5", [path]
        if path.suffix.lower() in TABLE_SUFFIXES:
            return "table", [path]
        if looks_like_tfrecord(path):
            return "tfrecord", [path]
        raise DataError(f"{path}: not an HDF5 file ({', '.join(HDF5_SUFFIXES)}), a table ({', '.join(TABLE_SUFFIXES)}) or a TFRecord file")
    raise DataError(f"{path}: does not exist (expected a feature directory, shards, an HDF5 file, TFRecords, tables or 'synthetic')")


def shard_split(path: Path) -> str | None:
    """YouTube-8M's shard naming: ``train0093.tfrecord`` -> train, ``validate*`` -> val, ``test*`` -> test."""
    name = path.name.lower()
    return next((split for prefix, split in SHARD_SPLITS if name.startswith(prefix)), None)


def default_processes(shards: int) -> int:
    """Reader processes: one per core this process may use, at most one per shard."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, shards))


def _read(job: tuple[str, str, ReadOptions, tuple[str, ...]]) -> ShardClips:
    kind, path, options, modalities = job
    reader = {"table": read_table_shard, "embeddings": read_embedding_shard}.get(kind, read_tfrecord_shard)
    try:
        return reader(path, options, modalities)
    except DataError as err:
        if not options.skip_bad:
            raise
        return ShardClips(path, None, None, [], None, [], [str(err)])  # a whole shard unreadable: skipped, counted


@dataclass
class Collection:
    """TFRecord or table shards read with one set of options; one shard is one unit of work."""

    path: str
    kind: str  # "tfrecord", "table" or "embeddings"
    shards: list[Path]
    options: ReadOptions
    options_file: Path | None = None  # the avdata.json that was (or would have been) read

    def read(self, shard: Path | str, modalities: tuple[str, ...] = MODALITIES) -> ShardClips:
        return _read((self.kind, str(shard), self.options, tuple(modalities)))

    def read_all(self, processes: int | None = None, modalities: tuple[str, ...] = MODALITIES) -> list[ShardClips]:
        """Every shard, in shard order; in ``processes`` worker processes (default: one per core)."""
        processes = processes or default_processes(len(self.shards))
        jobs = [(self.kind, str(s), self.options, tuple(modalities)) for s in self.shards]
        if processes <= 1 or len(jobs) <= 1:
            return [_read(job) for job in jobs]
        # fork on Linux (spawn elsewhere): workers start at once and need no importable __main__.
        # They run only the parser, numpy copies, gzip and crc32c, never a BLAS or OpenMP pool a
        # parent's threads (torch's) could hold locked at the fork.
        with ProcessPoolExecutor(processes, mp_context=get_context("fork" if sys.platform == "linux" else "spawn")) as pool:
            return list(pool.map(_read, jobs))

    def fingerprint(self) -> str:
        """Names, sizes and modification times of the shards and the options: changes when a shard does."""
        digest = hashlib.sha256(repr(self.options).encode())
        for shard in self.shards:
            stat = shard.stat()
            digest.update(f"{shard}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()

    def splits(self) -> list[str | None]:
        """Each shard's split by its name, or all None unless every shard is named."""
        named = [shard_split(s) for s in self.shards]
        return named if all(named) else [None] * len(named)


def open_collection(data: str | os.PathLike, **overrides) -> Collection | None:
    """The record/table collection at ``data``, or None when ``data`` is another format."""
    kind, shards = detect(data)
    if kind not in RECORD_KINDS:
        return None
    text = str(data)
    folder = Path(text) if Path(text).is_dir() else (Path(os.path.dirname(text) or ".") if _is_pattern(text) else Path(text).parent)
    options = ReadOptions.from_file(folder / OPTIONS_FILE, **overrides)
    return Collection(text, kind, shards, options, folder / OPTIONS_FILE)


def _multi_hot(labels: list[list[int]], where: str) -> np.ndarray:
    """(N, C) uint8 multi-hot, C = the largest class id + 1 (uint8: N·C bytes, an eighth of int64's)."""
    flat = [c for row in labels for c in row]
    if flat and min(flat) < 0:
        raise DataError(f"{where}: negative class id {min(flat)} in labels")
    out = np.zeros((len(labels), (max(flat) + 1) if flat else 1), np.uint8)
    rows = np.repeat(np.arange(len(labels)), [len(r) for r in labels])
    out[rows, np.asarray(flat, np.int64)] = 1
    return out


def _carve(split: np.ndarray, seed: int = 0) -> np.ndarray:
    """Fill splits that no shard was named for from the train rows (seeded): val 10 %, test 20 % of them."""
    train = np.flatnonzero(split == "train")
    order = np.random.default_rng(seed).permutation(train)
    at = 0
    for name, fraction in (("val", 0.1), ("test", 0.2)):
        if not (split == name).any():
            take = max(1, int(round(fraction * len(train))))
            split[order[at : at + take]] = name
            at += take
    return split


def join_clips(collection: Collection, parts: list[ShardClips]) -> tuple[PairedFeatures, list[str]]:
    """One :class:`PairedFeatures` of every shard's clips, and the messages of the records skipped."""
    bad = [m for p in parts for m in p.bad]
    parts_with_rows = [(shard, split, p) for shard, split, p in zip(collection.shards, collection.splits(), parts) if p.ids]
    if not parts_with_rows:
        raise DataError(f"{collection.path}: no readable clips" + (f" ({len(bad)} bad records/shards skipped; first: {bad[0]})" if bad else ""))
    first = parts_with_rows[0][2]
    for modality in MODALITIES:
        for _, _, p in parts_with_rows:
            if getattr(p, modality).shape[1] != getattr(first, modality).shape[1]:
                raise DataError(
                    f"{p.path}: {modality} vectors have {getattr(p, modality).shape[1]} values; {first.path} has {getattr(first, modality).shape[1]}"
                )
    has_labels = any(p.labels is not None for _, _, p in parts_with_rows)
    labels = _multi_hot([row for _, _, p in parts_with_rows for row in (p.labels or [[]] * len(p.ids))], collection.path) if has_labels else None
    split = None
    if all(s is not None for _, s, _ in parts_with_rows):
        split = _carve(np.concatenate([np.full(len(p.ids), s, dtype="<U5") for _, s, p in parts_with_rows]))
    data = make_paired(
        np.concatenate([p.audio for _, _, p in parts_with_rows]),
        np.concatenate([p.visual for _, _, p in parts_with_rows]),
        labels,
        [i for _, _, p in parts_with_rows for i in p.ids],
        split,
        source=collection.path,
    )
    data.metadata = [m for _, _, p in parts_with_rows for m in p.metadata]
    if bad:
        log.warning("%s: skipped %d bad records/shards (first: %s)", collection.path, len(bad), bad[0])
    return data.with_default_split(), bad

