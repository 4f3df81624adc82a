"""The raw features of items written through the API, kept so that a new model version can re-embed them.

Each change's record in the write-ahead log holds the raw features. A checkpoint folds the records
into ``api_items.npz`` beside the index (the previous file plus the records since): the ids, raw
features and metadata of every live API-written item, and the ids deleted through the API (a
deleted item of the base collection must stay deleted in the next version, :mod:`store.versions`).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from store.changes import Change
from store.layout import API_ITEMS_NAME, wal_dir
from store.wal import read_records


@dataclass
class ApiItems:
    """Live API-written items (id -> raw features, metadata) and ids deleted through the API."""

    features: dict[str, np.ndarray] = field(default_factory=dict)
    metadata: dict[str, dict | None] = field(default_factory=dict)
    deleted: set[str] = field(default_factory=set)

    def apply(self, record: Change) -> None:
        if record.op == "upsert":
            for row, (item_id, meta) in enumerate(zip(record.ids, record.metadata)):
                self.features[item_id] = np.asarray(record.features[row], np.float32)
                self.metadata[item_id] = meta
                self.deleted.discard(item_id)
        else:
            for item_id in record.ids:
                self.features.pop(item_id, None)
                self.metadata.pop(item_id, None)
                self.deleted.add(item_id)

    def to_bytes(self) -> bytes:
        ids = list(self.features)
        width = next(iter(self.features.values())).shape[0] if ids else 0
        buffer = io.BytesIO()
        np.savez(
            buffer,
            ids=np.array(json.dumps(ids).encode()),
            features=np.stack([self.features[i] for i in ids]) if ids else np.zeros((0, width), np.float32),
            metadata=np.array(json.dumps([self.metadata[i] for i in ids]).encode()),
            deleted=np.array(json.dumps(sorted(self.deleted)).encode()),
        )
        return buffer.getvalue()

    @classmethod
    def load(cls, directory: Path) -> "ApiItems":
        """The file beside a checkpoint (empty when there is none: an index built by a job)."""
        path = Path(directory) / API_ITEMS_NAME
        if not path.is_file():
            return cls()
        with np.load(path, allow_pickle=False) as z:
            ids = json.loads(z["ids"].tobytes())
            metadata = json.loads(z["metadata"].tobytes())
            features = z["features"]
            return cls({i: features[row] for row, i in enumerate(ids)}, dict(zip(ids, metadata)), set(json.loads(z["deleted"].tobytes())))


def api_items_of(index_dir: Path, modality: str, after: int, through: int | None = None) -> ApiItems:
    """The checkpoint's file plus the logged changes after it (``after`` is the checkpoint's LSN)."""
    items = ApiItems.load(Path(index_dir) / modality)
    for record in read_records(wal_dir(index_dir, modality), after, through):
        items.apply(record)
    return items
