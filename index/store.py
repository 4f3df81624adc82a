"""A FAISS index with stable string ids, saved atomically with an info card.

Layout of an index directory: ``index.faiss`` (FAISS), ``ids.json`` (row → string id) and
``info.json`` (factory string, metric, count, dimension, the manifest hash of the model it was
built from). Each file is written to a temporary name and renamed into place; ``info.json`` last.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

INFO_NAME, IDS_NAME, INDEX_NAME = "info.json", "ids.json", "index.faiss"


class IndexLoadError(RuntimeError):
    """An index directory that cannot be used (missing, corrupt, or built from another model)."""


def _atomic_write(path: Path, blob: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(blob)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class VectorIndex:
    """Inner-product search over unit-norm embeddings, returning string ids."""

    def __init__(self, index, ids: list[str], info: dict):
        self.index = index
        self.ids = ids
        self.info = info

    @classmethod
    def build(cls, embeddings: np.ndarray, ids: list[str], factory: str = "Flat", manifest_hash: str | None = None) -> "VectorIndex":
        import faiss

        x = np.ascontiguousarray(embeddings, dtype=np.float32)
        if x.ndim != 2 or len(x) != len(ids):
            raise ValueError(f"embeddings {x.shape} and {len(ids)} ids do not pair up")
        if len(set(ids)) != len(ids):
            raise ValueError("ids are not unique")
        index = faiss.index_factory(x.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            index.train(x)
        index.add(x)
        info = {"factory": factory, "metric": "inner_product", "count": len(ids), "dim": int(x.shape[1]), "manifest_sha256": manifest_hash}
        return cls(index, list(ids), info)

    def __len__(self) -> int:
        return len(self.ids)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, list[list[str]]]:
        """(Q, E) queries -> scores (Q, k') and ids, best first; k' = min(k, len(self))."""
        k = min(k, len(self.ids))
        scores, rows = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return scores, [[self.ids[r] for r in row if r >= 0] for row in rows]

    def save(self, directory: str | Path) -> Path:
        import faiss

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        _atomic_write(directory / INDEX_NAME, faiss.serialize_index(self.index).tobytes())
        _atomic_write(directory / IDS_NAME, json.dumps(self.ids).encode())
        _atomic_write(directory / INFO_NAME, json.dumps(self.info, indent=2).encode())
        return directory

    @classmethod
    def load(cls, directory: str | Path, expected_manifest_hash: str | None = None) -> "VectorIndex":
        import faiss

        directory = Path(directory)
        try:
            info = json.loads((directory / INFO_NAME).read_text())
            ids = json.loads((directory / IDS_NAME).read_text())
            index = faiss.deserialize_index(np.frombuffer((directory / INDEX_NAME).read_bytes(), dtype=np.uint8))
        except FileNotFoundError as err:
            raise IndexLoadError(f"{directory}: incomplete index ({Path(err.filename).name} missing); build it with python -m index build") from None
        except (json.JSONDecodeError, RuntimeError, UnicodeDecodeError) as err:
            raise IndexLoadError(f"{directory}: corrupt index ({err})") from None
        if index.ntotal != len(ids) or info.get("count") != len(ids):
            raise IndexLoadError(f"{directory}: corrupt index ({index.ntotal} vectors, {len(ids)} ids, info says {info.get('count')})")
        if expected_manifest_hash is not None and info.get("manifest_sha256") != expected_manifest_hash:
            raise IndexLoadError(
                f"{directory}: built from model {str(info.get('manifest_sha256'))[:12]}, not the loaded model {expected_manifest_hash[:12]}; rebuild the index"
            )
        return cls(index, ids, info)
