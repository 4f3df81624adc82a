"""A FAISS index with stable string ids and per-item metadata, saved atomically with an info card.

Items are addressed by string id, never by row number: FAISS holds int64 labels (through an
``IDMap2``), and the label → id map lives beside it. An index directory holds
``index.faiss`` (FAISS), ``items.json`` (label → id and metadata) and ``info.json`` (factory
string, metric, count, dimension, and the sha256 of the ``manifest.json`` of the model it was
built from). Each file is written to a temporary name and renamed into place, ``info.json`` last,
and ``info.json`` records the sha256 of the two others, so a torn save is detected on load.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

INFO_NAME, ITEMS_NAME, INDEX_NAME = "info.json", "items.json", "index.faiss"


class IndexLoadError(RuntimeError):
    """An index directory that cannot be used (missing, corrupt, or built from another model)."""


@dataclass
class Item:
    id: str
    vector: np.ndarray  # (E,) the stored embedding
    metadata: dict | None


def atomic_write(path: Path, blob: bytes) -> None:
    """Write ``blob`` to a temporary file beside ``path``, fsync, then rename it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class VectorIndex:
    """Inner-product search over unit-norm embeddings, addressed by string id."""

    def __init__(self, index, labels: dict[str, int], metadata: dict[str, dict], info: dict):
        self.index = index  # faiss IndexIDMap2 over the factory-built index
        self.label_of = labels  # string id -> int64 FAISS label
        self.id_of = {label: item_id for item_id, label in labels.items()}
        self.metadata = metadata  # string id -> JSON object (only items that have one)
        self.info = info
        self.next_label = max(labels.values(), default=-1) + 1

    @classmethod
    def empty(cls, dim: int, factory: str = "Flat", manifest_hash: str | None = None, training_vectors: np.ndarray | None = None) -> "VectorIndex":
        import faiss

        base = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        if not base.is_trained:
            if training_vectors is None:
                raise ValueError(f"factory {factory!r} needs training vectors")
            base.train(np.ascontiguousarray(training_vectors, dtype=np.float32))
        info = {"factory": factory, "metric": "inner_product", "count": 0, "dim": dim, "manifest_sha256": manifest_hash}
        return cls(faiss.IndexIDMap2(base), {}, {}, info)

    @classmethod
    def build(
        cls,
        embeddings: np.ndarray,
        ids: list[str],
        factory: str = "Flat",
        manifest_hash: str | None = None,
        metadata: list[dict | None] | None = None,
    ) -> "VectorIndex":
        x = np.ascontiguousarray(embeddings, dtype=np.float32)
        if x.ndim != 2:
            raise ValueError(f"embeddings must be 2-D (N, E), got shape {x.shape}")
        index = cls.empty(x.shape[1], factory, manifest_hash, training_vectors=x)
        index.upsert(x, ids, metadata)
        return index

    def __len__(self) -> int:
        return len(self.label_of)

    @property
    def dim(self) -> int:
        return int(self.info["dim"])

    def __contains__(self, item_id: str) -> bool:
        return item_id in self.label_of

    def upsert(self, embeddings: np.ndarray, ids: list[str], metadata: list[dict | None] | None = None) -> None:
        """Add items; an id that is already present is replaced (vector and metadata)."""
        x = np.ascontiguousarray(embeddings, dtype=np.float32)
        ids = [str(i) for i in ids]
        if x.ndim != 2 or x.shape[0] != len(ids) or x.shape[1] != self.dim:
            raise ValueError(f"embeddings {x.shape} do not fit {len(ids)} ids of width {self.dim}")
        if len(set(ids)) != len(ids):
            raise ValueError("ids in one upsert must be unique")
        if metadata is not None and len(metadata) != len(ids):
            raise ValueError(f"{len(metadata)} metadata entries for {len(ids)} ids")
        self.remove([i for i in ids if i in self.label_of])
        labels = np.arange(self.next_label, self.next_label + len(ids), dtype=np.int64)
        self.index.add_with_ids(x, labels)
        self.next_label += len(ids)
        for position, (item_id, label) in enumerate(zip(ids, labels.tolist())):
            self.label_of[item_id] = label
            self.id_of[label] = item_id
            if metadata is not None and metadata[position] is not None:
                self.metadata[item_id] = metadata[position]
        self.info["count"] = len(self)

    def remove(self, ids: list[str]) -> list[str]:
        """Remove the given ids; returns those that were present."""
        import faiss

        present = [i for i in ids if i in self.label_of]
        if present:
            labels = np.array([self.label_of[i] for i in present], dtype=np.int64)
            self.index.remove_ids(faiss.IDSelectorBatch(labels))
            for item_id, label in zip(present, labels.tolist()):
                del self.label_of[item_id], self.id_of[label]
                self.metadata.pop(item_id, None)
        self.info["count"] = len(self)
        return present

    def get(self, item_id: str) -> Item:
        """The stored item; KeyError for an unknown id."""
        label = self.label_of[item_id]
        return Item(item_id, self.index.reconstruct(label), self.metadata.get(item_id))

    def search(self, queries: np.ndarray, k: int, allowed_ids: set[str] | None = None) -> tuple[np.ndarray, list[list[str]]]:
        """(Q, E) queries -> scores (Q, k') and ids, best first; k' = min(k, len(self)).

        ``allowed_ids`` restricts the search to those items (FAISS ID selector, exact for Flat).
        """
        import faiss

        q = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(k, len(self) if allowed_ids is None else len(allowed_ids & self.label_of.keys()))
        if k == 0:
            return np.zeros((len(q), 0), dtype=np.float32), [[] for _ in range(len(q))]
        params = None
        if allowed_ids is not None:
            labels = np.array([self.label_of[i] for i in allowed_ids if i in self.label_of], dtype=np.int64)
            params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(labels))
        scores, labels = self.index.search(q, k, params=params)
        ids = [[self.id_of[int(label)] for label in row if label >= 0] for row in labels]
        return scores, ids

    def save(self, directory: str | Path) -> Path:
        import faiss

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        index_blob = faiss.serialize_index(self.index).tobytes()
        items_blob = json.dumps({"labels": self.label_of, "metadata": self.metadata}).encode()
        atomic_write(directory / INDEX_NAME, index_blob)
        atomic_write(directory / ITEMS_NAME, items_blob)
        checksums = {INDEX_NAME: hashlib.sha256(index_blob).hexdigest(), ITEMS_NAME: hashlib.sha256(items_blob).hexdigest()}
        atomic_write(directory / INFO_NAME, json.dumps({**self.info, "sha256": checksums}, indent=2).encode())
        return directory

    @classmethod
    def load(cls, directory: str | Path, expected_manifest_hash: str | None = None) -> "VectorIndex":
        import faiss

        directory = Path(directory)
        try:
            info = json.loads((directory / INFO_NAME).read_text())
            items_blob = (directory / ITEMS_NAME).read_bytes()
            index_blob = (directory / INDEX_NAME).read_bytes()
        except FileNotFoundError as err:
            raise IndexLoadError(f"{directory}: incomplete index ({Path(err.filename).name} missing); build it with python -m index build") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise IndexLoadError(f"{directory}: corrupt {INFO_NAME} ({err})") from None
        checksums = info.pop("sha256", {})
        for name, blob in ((INDEX_NAME, index_blob), (ITEMS_NAME, items_blob)):
            if checksums.get(name) != hashlib.sha256(blob).hexdigest():
                raise IndexLoadError(f"{directory}: corrupt index ({name} does not match the checksum in {INFO_NAME})")
        if expected_manifest_hash is not None and info.get("manifest_sha256") != expected_manifest_hash:
            raise IndexLoadError(
                f"{directory}: built from model {str(info.get('manifest_sha256'))[:12]}, "
                f"not the loaded model {expected_manifest_hash[:12]}; rebuild the index"
            )
        try:
            items = json.loads(items_blob)
            index = faiss.deserialize_index(np.frombuffer(index_blob, dtype=np.uint8))
        except (json.JSONDecodeError, RuntimeError) as err:
            raise IndexLoadError(f"{directory}: corrupt index ({err})") from None
        if index.ntotal != len(items["labels"]):
            raise IndexLoadError(f"{directory}: corrupt index ({index.ntotal} vectors for {len(items['labels'])} ids)")
        return cls(index, {k: int(v) for k, v in items["labels"].items()}, items["metadata"], info)
