"""The console's map: a 2-D PCA of a bounded random sample of both modalities' served embeddings.

Both encoders end in the same (CCA-aligned, unit-norm) space, so one PCA is fitted on the joint
sample and an audio and a visual clip of the same event land near each other on the map. The
sample is drawn per modality (at most ``MAP_SAMPLE_MAX`` points each, seeded) and the projection
is cached until an index of the collection changes, so the map costs one SVD per index generation,
never a search-path call.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import numpy as np

from index.embedder import MODALITIES
from store.collection import Collection

MAP_SAMPLE_MAX = 2000
SAMPLE_SEED = 0


@dataclass(frozen=True)
class Pca2:
    mean: np.ndarray  # (E,)
    components: np.ndarray  # (2, E), rows orthonormal (zero rows when the data has fewer directions)
    explained: np.ndarray  # (2,) fraction of the sample's variance along each component

    def project(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, dtype=np.float64) - self.mean) @ self.components.T


def fit_pca2(x: np.ndarray) -> Pca2:
    """PCA to 2 dimensions by SVD of the centred data; each component's sign makes its largest loading positive (deterministic)."""
    x = np.asarray(x, dtype=np.float64)
    width = x.shape[1]
    mean = x.mean(axis=0) if len(x) else np.zeros(width)
    components, explained = np.zeros((2, width)), np.zeros(2)
    if len(x) >= 2:
        _, singular, vt = np.linalg.svd(x - mean, full_matrices=False)
        n = min(2, len(singular))
        signs = np.sign(vt[:n][np.arange(n), np.abs(vt[:n]).argmax(axis=1)])
        components[:n] = vt[:n] * signs[:, None]
        total = float((singular**2).sum())
        if total > 0:
            explained[:n] = singular[:n] ** 2 / total
    return Pca2(mean, components, explained)


@dataclass(frozen=True)
class Sample:
    ids: list[str]
    vectors: np.ndarray  # (n, E) stored embeddings
    metadata: list[dict | None]


def generation(collection: Collection) -> tuple:
    """Changes with every item change: upserts append rows, deletes lower the live count."""
    with collection.reading() as view:
        return tuple((m, *view.generation(m)) for m in sorted(MODALITIES))


@dataclass(frozen=True)
class EmbeddingMap:
    pca: Pca2
    samples: dict[str, Sample]
    coordinates: dict[str, np.ndarray]  # modality -> (n, 2)
    totals: dict[str, int]

    def as_json(self) -> dict:
        return {
            "mean": self.pca.mean.tolist(),
            "components": self.pca.components.tolist(),
            "explained_variance": self.pca.explained.tolist(),
            "totals": self.totals,
            "points": {
                m: {"ids": s.ids, "xy": np.round(self.coordinates[m], 5).tolist(), "metadata": [_scalars(d) for d in s.metadata]}
                for m, s in self.samples.items()
            },
        }


def _scalars(metadata: dict | None) -> dict:
    """The top-level string, number, boolean fields (what a colour can be picked by); long strings cut."""
    out: dict = {}
    for key, value in (metadata or {}).items():
        if isinstance(value, str):
            out[key] = value[:80]
        elif isinstance(value, (int, float, bool)) or value is None:
            out[key] = value
    return out


def build_map(collection: Collection, per_modality: int) -> EmbeddingMap:
    with collection.reading() as view:  # VectorIndex is not thread-safe: item changes wait for the sample
        samples = {m: Sample(*view.sample(m, per_modality, SAMPLE_SEED)) for m in MODALITIES}
        totals = {m: view.size(m) for m in MODALITIES}
    pca = fit_pca2(np.concatenate([samples[m].vectors for m in MODALITIES]))
    return EmbeddingMap(pca, samples, {m: pca.project(samples[m].vectors).reshape(-1, 2) for m in MODALITIES}, totals)


class MapCache:
    """One map per (collection, index generation, sample size); rebuilt lazily after a change or a swap."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._collection: weakref.ref | None = None  # weak: a swapped-out version is freed, not kept for the map
        self._key: tuple | None = None
        self._map: EmbeddingMap | None = None

    def get(self, collection: Collection, per_modality: int) -> EmbeddingMap:
        with self._lock:  # one build at a time; concurrent callers then share it
            key = (generation(collection), per_modality)
            if self._map is None or self._collection is None or self._collection() is not collection or self._key != key:
                self._map = build_map(collection, per_modality)
                self._collection, self._key = weakref.ref(collection), key
            return self._map
