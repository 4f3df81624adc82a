"""Typed results. Lists of hits also offer numpy views (``.ids``, ``.scores``) for batch use."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, overload

import numpy as np

Modality = Literal["audio", "visual"]
MODALITIES: tuple[str, ...] = ("audio", "visual")


@dataclass(frozen=True)
class Hit:
    id: str
    score: float  # cosine similarity of the served embeddings
    metadata: dict[str, Any] | None = None


class Hits(Sequence[Hit]):
    """One query's hits, best first."""

    def __init__(self, hits: list[Hit]):
        self._hits = hits

    @overload
    def __getitem__(self, i: int) -> Hit: ...
    @overload
    def __getitem__(self, i: slice) -> list[Hit]: ...
    def __getitem__(self, i: int | slice) -> Any:
        return self._hits[i]

    def __len__(self) -> int:
        return len(self._hits)

    def __repr__(self) -> str:
        return f"Hits({self._hits!r})"

    @property
    def ids(self) -> np.ndarray:
        """(k,) object array of ids."""
        return np.array([h.id for h in self._hits], dtype=object)

    @property
    def scores(self) -> np.ndarray:
        """(k,) float32 scores."""
        return np.array([h.score for h in self._hits], dtype=np.float32)


class SearchResults(Sequence[Hits]):
    """One ``Hits`` per query, in query order; ``model`` is the version that answered (the last one
    when a large search was split into several requests)."""

    def __init__(self, results: list[Hits], model: str):
        self._results, self.model = results, model

    @overload
    def __getitem__(self, i: int) -> Hits: ...
    @overload
    def __getitem__(self, i: slice) -> list[Hits]: ...
    def __getitem__(self, i: int | slice) -> Any:
        return self._results[i]

    def __len__(self) -> int:
        return len(self._results)

    def __iter__(self) -> Iterator[Hits]:
        return iter(self._results)

    def __repr__(self) -> str:
        return f"SearchResults(model={self.model!r}, {self._results!r})"

    def _width(self) -> int:
        return max((len(h) for h in self._results), default=0)

    @property
    def ids(self) -> np.ndarray:
        """(n, k) object array; rows shorter than k (a threshold or a filter cut them) padded with None."""
        out = np.full((len(self), self._width()), None, dtype=object)
        for row, hits in zip(out, self._results):
            row[: len(hits)] = [h.id for h in hits]
        return out

    @property
    def scores(self) -> np.ndarray:
        """(n, k) float32; padded with NaN where ``ids`` holds None."""
        out = np.full((len(self), self._width()), np.nan, dtype=np.float32)
        for row, hits in zip(out, self._results):
            row[: len(hits)] = [h.score for h in hits]
        return out


def parse_results(body: dict[str, Any]) -> list[Hits]:
    return [Hits([Hit(h["id"], float(h["score"]), h.get("metadata")) for h in hits]) for hits in body["results"]]


@dataclass(frozen=True)
class Item:
    id: str
    modality: Modality
    metadata: dict[str, Any] | None
    embedding: np.ndarray  # (E,) float32, the stored embedding (raw features are not returned)

    @classmethod
    def parse(cls, body: dict[str, Any]) -> Item:
        return cls(body["id"], body["modality"], body.get("metadata"), np.asarray(body["embedding"], dtype=np.float32))


@dataclass(frozen=True)
class Upserted:
    upserted: int  # items sent and acknowledged (each one in the server's write-ahead log)
    count: int  # items in that modality's index after the last request
    requests: int  # how many requests the upload was split into


@dataclass(frozen=True)
class Deleted:
    id: str
    modality: Modality
    count: int  # items left in that modality's index


@dataclass(frozen=True)
class Limits:
    max_vectors: int  # most vectors, ids or items in one request
    max_top_k: int
    max_body_bytes: int


@dataclass(frozen=True)
class Info:
    model: str  # model version: the first 12 hex digits of the sha256 of its manifest.json
    model_sha256: str
    model_dir: str
    index_dir: str
    manifest: dict[str, Any] = field(repr=False)
    index_sizes: dict[str, int]
    index_factories: dict[str, str]
    providers: dict[str, str]  # ONNX Runtime provider per modality
    limits: Limits
    raw: dict[str, Any] = field(repr=False)  # the whole answer, fields this client does not know included

    @classmethod
    def parse(cls, body: dict[str, Any]) -> Info:
        """Needs ``model`` and the limits (what the client relies on); the rest is taken as given."""
        limits = body["limits"]
        return cls(
            model=body["model"],
            model_sha256=body.get("model_sha256", ""),
            model_dir=body.get("model_dir", ""),  # a read-only caller may be told the directory names only
            index_dir=body.get("index_dir", ""),
            manifest=body.get("manifest", {}),
            index_sizes=body.get("index_sizes", {}),
            index_factories=body.get("index_factories", {}),
            providers=body.get("providers", {}),
            limits=Limits(int(limits["max_vectors"]), int(limits["max_top_k"]), int(limits["max_body_bytes"])),
            raw=body,
        )


@dataclass(frozen=True)
class Reloaded:
    model: str
    previous_model: str
    index_sizes: dict[str, int]


@dataclass(frozen=True)
class Snapshot:
    name: str
    bytes: int
    model: str
    model_sha256: str
    created: float  # Unix time
    lsn: dict[str, int]  # per modality, the last logged change it holds
    items: dict[str, int]

    @classmethod
    def parse(cls, body: dict[str, Any]) -> Snapshot:
        return cls(**{k: body[k] for k in ("name", "bytes", "model", "model_sha256", "created", "lsn", "items")})
