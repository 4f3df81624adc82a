"""A FAISS index with stable string ids and per-item metadata, saved atomically with an info card.

Items are addressed by string id, never by row number: FAISS holds int64 labels and the
label → id map lives beside it. IVF indexes take labels natively (with a hash-table direct map, so
``remove`` and ``get`` work); every other factory is wrapped in an ``IDMap2``. HNSW graphs cannot
delete in FAISS, so a removed HNSW item becomes a *tombstone*: its label is excluded at search time
by an ID selector (exact, no over-fetch needed), and the graph is rebuilt from the live vectors once
tombstones pass ``COMPACT_FRACTION`` of the items. Exact ``Flat`` search without a filter runs the
numpy path of :mod:`index.exact` on FAISS's own storage (no copy); FAISS is used everywhere else.
When faiss has GPUs (faiss-gpu), searches run on a GPU copy; otherwise on the CPU, as
``info["search_device"]`` says.

An index directory holds ``index.faiss`` (FAISS), ``items.json`` (label → id, metadata,
tombstones) and ``info.json`` (factory string, metric, count, dimension, search parameters and the
sha256 of the ``manifest.json`` of the model it was built from). Each file is written to a
temporary name and renamed into place, ``info.json`` last, and ``info.json`` records the sha256 of
the two others, so a torn save is detected on load.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from index.exact import top_k_inner_product
from training.data import atomic_write  # the one temp-file + fsync + rename helper (numpy-only module)

log = logging.getLogger(__name__)
SMALL_FILTER = 4096  # an approximate index searches a filter this small exactly over the allowed vectors
COMPACT_FRACTION = 0.25  # rebuild an HNSW graph once tombstones exceed this share of live items
TRANSPOSED_MAX_DIM = 12  # a flat index this narrow keeps an (E, N) copy for one-query search (index/exact.py)
BUILD_PARAMS = {"efConstruction"}  # build-time knobs a factory string cannot say (HNSW graph quality)
_said = {"no_gpu": False}  # log the CPU fallback once per process, not once per search
INFO_NAME, ITEMS_NAME, INDEX_NAME = "info.json", "items.json", "index.faiss"


def apply_build_params(index, factory: str, build_params: dict | None) -> None:
    """Set build-time knobs on a fresh factory-built index; ValueError for one that does not apply."""
    import faiss

    for name, value in (build_params or {}).items():
        hnsw = faiss.downcast_index(index)
        if name not in BUILD_PARAMS or not isinstance(hnsw, faiss.IndexHNSW):
            raise ValueError(f"build parameter {name}={value} does not apply to a {factory!r} index (known: efConstruction, for HNSW)")
        hnsw.hnsw.efConstruction = int(value)


class IndexLoadError(RuntimeError):
    """An index directory that cannot be used (missing, corrupt, or built from another model)."""


@dataclass
class Item:
    id: str
    vector: np.ndarray  # (E,) the stored embedding
    metadata: dict | None


class VectorIndex:
    """Inner-product search over unit-norm embeddings, addressed by string id."""

    def __init__(self, index, labels: dict[str, int], metadata: dict[str, dict], info: dict, tombstones: set[int] | None = None):
        self.index = index  # IndexIVF with native labels, or IndexIDMap2 over the factory-built index
        self.label_of = labels  # string id -> int64 FAISS label
        self.id_of = {label: item_id for item_id, label in labels.items()}
        self.metadata = metadata  # string id -> JSON object (only items that have one)
        self.info = info
        self.tombstones: set[int] = tombstones or set()  # labels removed from an HNSW graph, still inside it
        self.next_label = max([*labels.values(), *self.tombstones], default=-1) + 1
        self.info.setdefault("search_params", {})
        self._apply_search_params(self.info["search_params"])
        self._cache: dict = {}  # derived views (numpy storage view, GPU copy); cleared on every change
        self.info["search_device"] = "cpu"

    @staticmethod
    def _base(index):
        """The factory-built index (under the IDMap2 wrapper, if any), downcast to its class."""
        import faiss

        return faiss.downcast_index(index.index if isinstance(index, faiss.IndexIDMap2) else index)

    @property
    def can_remove(self) -> bool:
        import faiss

        return not isinstance(self._base(self.index), (faiss.IndexHNSW, faiss.IndexNSG))

    @classmethod
    def _new_faiss_index(cls, dim: int, factory: str, training_vectors: np.ndarray | None, build_params: dict | None = None):
        import faiss

        base = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        apply_build_params(base, factory, build_params)
        if not base.is_trained:
            if training_vectors is None:
                raise ValueError(f"factory {factory!r} needs training vectors")
            base.train(np.ascontiguousarray(training_vectors, dtype=np.float32))
        ivf = faiss.try_extract_index_ivf(base)
        if ivf is not None:
            # IVF stores labels itself; an IDMap over it would mislabel rows after a removal.
            ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
            return base
        return faiss.IndexIDMap2(base)

    @classmethod
    def empty(
        cls, dim: int, factory: str = "Flat", manifest_hash: str | None = None, training_vectors: np.ndarray | None = None, build_params: dict | None = None
    ) -> "VectorIndex":
        """An index with no items; ``build_params`` e.g. ``{"efConstruction": 200}`` (HNSW graph quality)."""
        index = cls._new_faiss_index(dim, factory, training_vectors, build_params)
        info = {"factory": factory, "metric": "inner_product", "count": 0, "dim": dim, "manifest_sha256": manifest_hash, "build_params": dict(build_params or {})}
        return cls(index, {}, {}, info)

    @classmethod
    def build(
        cls,
        embeddings: np.ndarray,
        ids: list[str],
        factory: str = "Flat",
        manifest_hash: str | None = None,
        metadata: list[dict | None] | None = None,
        build_params: dict | None = None,
    ) -> "VectorIndex":
        x = np.ascontiguousarray(embeddings, dtype=np.float32)
        if x.ndim != 2:
            raise ValueError(f"embeddings must be 2-D (N, E), got shape {x.shape}")
        index = cls.empty(x.shape[1], factory, manifest_hash, training_vectors=x, build_params=build_params)
        index.upsert(x, ids, metadata)
        return index

    def __len__(self) -> int:
        return len(self.label_of)

    @property
    def dim(self) -> int:
        return int(self.info["dim"])

    def __contains__(self, item_id: str) -> bool:
        return item_id in self.label_of

    def _changed(self) -> None:
        self._cache.clear()
        self.info["count"] = len(self)
        self.info["tombstones"] = len(self.tombstones)

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
        self._changed()

    def remove(self, ids: list[str]) -> list[str]:
        """Remove the given ids; returns those that were present."""
        import faiss

        present = [i for i in dict.fromkeys(ids) if i in self.label_of]
        if present:
            labels = np.array([self.label_of[i] for i in present], dtype=np.int64)
            if isinstance(self.index, faiss.IndexIDMap2) and self.can_remove:
                self.index.remove_ids(faiss.IDSelectorBatch(labels))
            elif self.can_remove:  # IVF with a hash-table direct map accepts only an ID array
                self.index.remove_ids(faiss.IDSelectorArray(len(labels), faiss.swig_ptr(labels)))
            else:
                self.tombstones.update(labels.tolist())
            for item_id, label in zip(present, labels.tolist()):
                del self.label_of[item_id], self.id_of[label]
                self.metadata.pop(item_id, None)
            if len(self.tombstones) > COMPACT_FRACTION * max(len(self), 1):
                self.compact()
        self._changed()
        return present

    def compact(self) -> None:
        """Rebuild the FAISS index from the live items only, dropping tombstones (same labels)."""
        if not self.tombstones:
            return
        labels = np.array(sorted(self.id_of), dtype=np.int64)
        vectors = np.vstack([self.index.reconstruct(int(label)) for label in labels]) if len(labels) else np.zeros((0, self.dim), np.float32)
        index = self._new_faiss_index(self.dim, self.info["factory"], vectors if len(vectors) else None, self.info.get("build_params"))
        index.add_with_ids(vectors, labels)
        log.info("compacted %s index: %d tombstones dropped, %d items", self.info["factory"], len(self.tombstones), len(labels))
        self.index, self.tombstones = index, set()
        self._apply_search_params(self.info["search_params"])
        self._changed()

    def get(self, item_id: str) -> Item:
        """The stored item; KeyError for an unknown id."""
        label = self.label_of[item_id]
        return Item(item_id, self.index.reconstruct(label), self.metadata.get(item_id))

    def set_search_params(self, **params: float) -> None:
        """Search-time parameters kept with the index, e.g. ``nprobe=32`` (IVF) or ``efSearch=128`` (HNSW)."""
        self._apply_search_params(params)
        self.info["search_params"] = {**self.info["search_params"], **params}
        self._cache.clear()

    def _apply_search_params(self, params: dict) -> None:
        import faiss

        space = faiss.ParameterSpace()
        for name, value in params.items():
            try:
                space.set_index_parameter(self.index, name, value)
            except RuntimeError as err:
                raise ValueError(f"search parameter {name}={value} does not apply to a {self.info['factory']!r} index ({err})") from None

    def _search_parameters(self, selector, overrides: dict | None):
        """A SearchParameters object of the right class, carrying the current (or overridden) values."""
        import faiss

        values = {**self.info["search_params"], **(overrides or {})}
        base = self._base(self.index)
        ivf = faiss.try_extract_index_ivf(base)
        if ivf is not None:
            params = faiss.SearchParametersIVF(nprobe=int(values.get("nprobe", ivf.nprobe)))
        elif isinstance(base, faiss.IndexHNSW):
            params = faiss.SearchParametersHNSW(efSearch=int(values.get("efSearch", base.hnsw.efSearch)))
        else:
            params = faiss.SearchParameters()
        if selector is not None:
            params.sel = selector
        return params

    def _search_index(self):
        """The FAISS index searches run on: a GPU copy when faiss has GPUs, else the CPU index."""
        import faiss

        if "search" not in self._cache:
            self._cache["search"] = self.index
            if getattr(faiss, "get_num_gpus", lambda: 0)() == 0 and not _said["no_gpu"]:
                log.info("faiss sees no GPU (faiss-cpu, or no CUDA device): indexes search on the CPU")
                _said["no_gpu"] = True
            if getattr(faiss, "get_num_gpus", lambda: 0)() > 0:
                try:
                    resources = faiss.StandardGpuResources()
                    copy = faiss.index_cpu_to_gpu(resources, 0, self.index)
                    on_gpu = "Gpu" in type(faiss.downcast_index(self._base(copy))).__name__  # HNSW stays a CPU copy
                    self._cache["search"] = copy if on_gpu else self.index
                    self._cache["gpu_resources"] = resources
                    self.info["search_device"] = "cuda:0" if on_gpu else "cpu"
                    if not on_gpu:
                        log.warning("faiss has no GPU version of %s: searching on the CPU", self.info["factory"])
                except RuntimeError as err:  # e.g. HNSW has no GPU version
                    log.warning("faiss GPU copy of %s failed (%s): searching on the CPU", self.info["factory"], err)
                    self.info["search_device"] = "cpu"
        return self._cache["search"]

    def _flat_storage(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
        """(N, E) view of an exact flat index's vectors, (N,) their labels and, for narrow embeddings,
        an (E, N) copy (rebuilt lazily after a change); None for other indexes."""
        import faiss

        base = self._base(self.index)
        if not isinstance(base, faiss.IndexFlat) or base.metric_type != faiss.METRIC_INNER_PRODUCT:
            return None
        if "flat" not in self._cache:
            n, d = base.ntotal, base.d
            vectors = faiss.rev_swig_ptr(base.get_xb(), n * d).reshape(n, d) if n else np.zeros((0, d), np.float32)
            transposed = np.ascontiguousarray(vectors.T) if d <= TRANSPOSED_MAX_DIM else None
            self._cache["flat"] = (vectors, faiss.vector_to_array(self.index.id_map), transposed)
        return self._cache["flat"]

    def search(
        self, queries: np.ndarray, k: int, allowed_ids: set[str] | None = None, params: dict | None = None
    ) -> tuple[np.ndarray, list[list[str]]]:
        """(Q, E) queries -> scores (Q, k') and ids, best first; k' = min(k, len(self)).

        ``allowed_ids`` restricts the search to those items (FAISS ID selector, exact for Flat);
        ``params`` overrides search parameters for this call only, e.g. ``{"nprobe": 64}``.
        A graph or IVF search under a narrow filter can miss the few allowed items, so a filter of
        at most ``SMALL_FILTER`` items on an approximate index is searched exactly instead.
        """
        import faiss

        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be (Q, {self.dim}), got shape {q.shape}")
        k = min(k, len(self) if allowed_ids is None else len(allowed_ids & self.label_of.keys()))
        if k == 0:
            return np.zeros((len(q), 0), dtype=np.float32), [[] for _ in range(len(q))]
        search_index = self._search_index()
        flat = self._flat_storage() if search_index is self.index else None
        wanted = None if allowed_ids is None else np.array([self.label_of[i] for i in allowed_ids if i in self.label_of], dtype=np.int64)
        if flat is not None and wanted is None:
            scores, rows = top_k_inner_product(flat[0], q, k, transposed=flat[2])
            labels = flat[1][rows]
        elif flat is None and wanted is not None and len(wanted) <= SMALL_FILTER:
            vectors = np.vstack([self.index.reconstruct(int(label)) for label in wanted])
            scores, rows = top_k_inner_product(vectors, q, k)
            labels = wanted[rows]
        else:
            selector = None
            if wanted is not None:
                selector = faiss.IDSelectorBatch(wanted)
            elif self.tombstones:
                dead = faiss.IDSelectorBatch(np.fromiter(self.tombstones, dtype=np.int64))
                selector = faiss.IDSelectorNot(dead)
            scores, labels = search_index.search(q, k, params=self._search_parameters(selector, params))
        ids = [[self.id_of[int(label)] for label in row if label >= 0] for row in labels]
        return scores, ids

    def save(self, directory: str | Path) -> Path:
        import faiss

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        index_blob = faiss.serialize_index(self.index).tobytes()  # always the CPU index
        items_blob = json.dumps({"labels": self.label_of, "metadata": self.metadata, "tombstones": sorted(self.tombstones)}).encode()
        atomic_write(directory / INDEX_NAME, index_blob)
        atomic_write(directory / ITEMS_NAME, items_blob)
        checksums = {INDEX_NAME: hashlib.sha256(index_blob).hexdigest(), ITEMS_NAME: hashlib.sha256(items_blob).hexdigest()}
        atomic_write(directory / INFO_NAME, json.dumps({**self.info, "search_device": "cpu", "sha256": checksums}, indent=2).encode())
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
        tombstones = set(items.get("tombstones", []))
        if index.ntotal != len(items["labels"]) + len(tombstones):
            raise IndexLoadError(f"{directory}: corrupt index ({index.ntotal} vectors for {len(items['labels'])} ids and {len(tombstones)} tombstones)")
        return cls(index, {k: int(v) for k, v in items["labels"].items()}, items["metadata"], info, tombstones)
