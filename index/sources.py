"""Readers of a feature collection, cut into partitions: the unit a batch job embeds, writes and skips.

* a **shard folder** (many ``.npy`` shards, see :mod:`avdata.features`): one shard = one partition,
  read memory-mapped, so a worker only ever holds one shard;
* **TFRecord or table shards** (:mod:`avdata.collection`): one file = one partition, streamed;
* every other data-layer format (feature directory, HDF5 file, ``synthetic``): loaded once, cut
  into row ranges of ``partition_rows`` rows named ``rows-<first row>``.

Both are picklable, so Ray workers read their partitions themselves.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from avdata.clips import ShardClips
from avdata.collection import RECORD_KINDS, Collection, detect, open_collection
from avdata.features import DataError, PairedFeatures, load_features, load_shard, shard_ids, shard_names

MODALITIES = ("audio", "visual")


@dataclass
class Partition:
    name: str  # unique and sortable: the order of items in the index
    rows: int | None  # None: known once read (record shards)


@dataclass
class Chunk:
    features: np.ndarray  # (n, D) float32
    ids: list[str]  # n string ids
    metadata: list[dict | None] | None  # n JSON objects, or None when the source has none
    skipped: int = 0  # bad records left out of this partition (skip_bad)


class ShardFolder:
    """A folder of ``<modality>_features-<name>.npy`` shards; a modality may be missing entirely."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.names = shard_names(self.path)
        if not self.names:
            raise DataError(f"{self.path}: no .npy shards found")
        self.description = f"shard folder {self.path} ({len(self.names)} shards)"

    def fingerprint(self) -> str:
        """Names, sizes and modification times of every file: cheap, and changes when a shard does."""
        digest = hashlib.sha256()
        for file in sorted(p for p in self.path.iterdir() if p.is_file()):
            stat = file.stat()
            digest.update(f"{file.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()

    def modalities(self) -> list[str]:
        return [m for m in MODALITIES if any((self.path / f"{m}_features-{n}.npy").is_file() for n in self.names)]

    def partitions(self, modality: str) -> list[Partition]:
        out = []
        for name in self.names:
            file = self.path / f"{modality}_features-{name}.npy"
            if file.is_file():
                out.append(Partition(name, int(np.load(file, mmap_mode="r", allow_pickle=False).shape[0])))
        return out

    def read(self, partition: str, modality: str) -> Chunk:
        features, ids = load_shard(self.path, partition, modality)
        if features is None:
            raise DataError(f"{self.path}: shard {partition!r} has no {modality} features")
        meta_file = self.path / f"metadata-{partition}.jsonl"
        metadata = None
        if meta_file.is_file():
            try:
                metadata = [json.loads(line) if line.strip() else None for line in meta_file.read_text().splitlines()]
            except json.JSONDecodeError as err:
                raise DataError(f"{meta_file}: not JSON lines ({err})") from None
            if len(metadata) != len(features) or any(m is not None and not isinstance(m, dict) for m in metadata):
                raise DataError(f"{meta_file}: needs one JSON object per row ({len(features)} rows)")
        return Chunk(np.ascontiguousarray(features), ids or shard_ids(partition, len(features)), metadata)


class InMemory:
    """A collection the data layer loads whole, cut into row ranges."""

    def __init__(self, data: PairedFeatures | str | Path, partition_rows: int):
        self.data = data if isinstance(data, PairedFeatures) else load_features(data)
        self.partition_rows = partition_rows
        self.description = f"{self.data.source} ({len(self.data)} clips)"

    def fingerprint(self) -> str:
        """A hash of the ids and every feature byte (seconds even at 10^6 clips, far below embedding)."""
        digest = hashlib.sha256("\n".join(self.data.ids).encode())
        for modality in MODALITIES:
            digest.update(np.ascontiguousarray(getattr(self.data, modality)).data)
        return digest.hexdigest()

    def modalities(self) -> list[str]:
        return list(MODALITIES)

    def partitions(self, modality: str) -> list[Partition]:
        n, step = len(self.data), self.partition_rows
        return [Partition(f"rows-{start:010d}", min(step, n - start)) for start in range(0, n, step)]

    def read(self, partition: str, modality: str) -> Chunk:
        start = int(partition.removeprefix("rows-"))
        stop = start + self.partition_rows
        return Chunk(getattr(self.data, modality)[start:stop], self.data.ids[start:stop], self.data.item_metadata(start, stop))


class RecordShards:
    """TFRecord or table shards (:mod:`avdata.collection`), one shard = one partition, streamed: a
    worker holds one shard's bytes and its decoded clips, never the collection. Row counts are
    known only once a shard is read (``rows`` None); bad records are counted in ``Chunk.skipped``
    (on the audio partition only, so that each bad record counts once)."""

    def __init__(self, collection: Collection):
        self.collection = collection
        self._last: tuple[str, ShardClips] | None = None  # the shard read last (one shard: the memory bound)
        self.description = f"{collection.kind} shards {collection.path} ({len(collection.shards)} shards)"
        names = [s.name for s in collection.shards]
        if len(set(names)) != len(names):
            raise DataError(f"{collection.path}: two shards share a file name; partitions are named by it")

    @property
    def skip_bad(self) -> bool:
        return self.collection.options.skip_bad

    def fingerprint(self) -> str:
        return self.collection.fingerprint()

    def modalities(self) -> list[str]:
        return list(MODALITIES)

    def partitions(self, modality: str) -> list[Partition]:
        return [Partition(shard.name, None) for shard in self.collection.shards]

    def read(self, partition: str, modality: str) -> Chunk:
        if self._last is None or self._last[0] != partition:  # the job asks for both modalities of a shard in a row
            shard = next(s for s in self.collection.shards if s.name == partition)
            self._last = (partition, self.collection.read(shard))
        clips = self._last[1]
        skipped = len(clips.bad) if modality == "audio" else 0
        if not clips.ids:  # every record bad (skipped): an empty partition
            return Chunk(np.zeros((0, 0), np.float32), [], [], skipped)
        return Chunk(getattr(clips, modality), clips.ids, [dict(m) for m in clips.metadata], skipped)


Source = ShardFolder | InMemory | RecordShards


def open_source(data: PairedFeatures | str | Path, partition_rows: int, **options) -> Source:
    """The reader for ``data`` by the data layer's detection rule: a shard folder, record or table
    shards (streamed), or any other format loaded whole. ``options`` override ``avdata.json``."""
    if not isinstance(data, PairedFeatures):
        kind, _ = detect(data)
        if kind == "npy-shards":
            return ShardFolder(Path(data))
        if kind in RECORD_KINDS:
            return RecordShards(open_collection(data, **options))
    return InMemory(data, partition_rows)
