"""Request and response bodies, split by role."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Json, field_validator, model_validator

Modality = Literal["audio", "visual"]
MetadataValue = str | int | float | bool | None
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    modality: Modality = Field(description="modality of the queries")
    vectors: list[list[float]] | None = Field(None, min_length=1, description="raw feature vectors of that modality, one per query")
    ids: list[str] | None = Field(None, min_length=1, description="instead of vectors: ids of stored items of that modality to query with")
    top_k: int = Field(10, ge=1, description="neighbours per query (at most the AVSEARCH_MAX_TOP_K setting)")
    target: Modality | None = Field(None, description="modality to search; defaults to the other one")
    score_threshold: float | None = Field(None, description="drop hits scoring below this cosine similarity")
    filter: dict[str, MetadataValue] | None = Field(None, description="only items whose metadata has all these key: value pairs")

    @model_validator(mode="after")
    def _vectors_or_ids(self) -> "SearchRequest":
        if (self.vectors is None) == (self.ids is None):
            raise ValueError("give exactly one of 'vectors' (raw features) or 'ids' (stored items)")
        return self


class SearchParams(BaseModel):
    """The search options as query parameters, for a ``.npy`` body (the body holds the vectors)."""

    modality: Modality = Field(description="modality of the query vectors")
    top_k: int = Field(10, ge=1, description="neighbours per query")
    target: Modality | None = Field(None, description="modality to search; defaults to the other one")
    score_threshold: float | None = Field(None, description="drop hits scoring below this")
    filter: Json[dict[str, MetadataValue]] | None = Field(None, description='metadata filter as JSON text, e.g. {"genre":"jazz"}')


class EmbedParams(BaseModel):
    modality: Modality = Field(description="modality of the vectors")


class SearchHit(BaseModel):
    id: str
    score: float = Field(description="cosine similarity of the served embeddings")
    metadata: dict[str, Any] | None = None


class SearchResponse(BaseModel):
    results: list[list[SearchHit]] = Field(description="one list per query, best first")
    model: str = Field(description="model version: sha256 of its manifest.json, first 12 hex digits")


class EmbedRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    modality: Modality
    vectors: list[list[float]] = Field(min_length=1, description="raw feature vectors of that modality")


class EmbedResponse(BaseModel):
    embeddings: list[list[float]] = Field(description="(B, E) unit-norm embeddings, one per input vector")
    dim: int = Field(description="embedding width E")
    model: str


class ItemIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=256, description="your stable id; an existing id is replaced")
    vector: list[float] = Field(description="raw feature vector of the modality in the path")
    metadata: dict[str, Any] | None = Field(None, description="any JSON object, returned with hits and usable in search filters")

    @field_validator("metadata")
    @classmethod
    def _finite(cls, value: dict | None) -> dict | None:
        def walk(v: Any) -> None:
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError("metadata numbers must be finite (no NaN or Infinity): they are stored and returned as JSON")
            if isinstance(v, int) and not INT64_MIN <= v <= INT64_MAX:  # the JSON encoder refuses them when a search returns the item
                raise ValueError(f"metadata integers must fit in 64 bits ({INT64_MIN}..{INT64_MAX}); send larger numbers as strings")
            for child in v.values() if isinstance(v, dict) else v if isinstance(v, list) else ():
                walk(child)

        walk(value)
        return value


class UpsertRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[ItemIn] = Field(min_length=1)


class UpsertResponse(BaseModel):
    upserted: int
    modality: Modality
    count: int = Field(description="items in that modality's index after the upsert")


class ItemOut(BaseModel):
    id: str
    modality: Modality
    metadata: dict[str, Any] | None
    embedding: list[float] = Field(description="the stored embedding (raw features are not kept)")


class DeleteResponse(BaseModel):
    deleted: str
    modality: Modality
    count: int


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_dir: str | None = Field(None, description="new exported model directory; default AVSEARCH_MODEL_DIR (re-read)")
    index_dir: str | None = Field(None, description="new index directory built from that model; default AVSEARCH_INDEX_DIR")

    @field_validator("model_dir", "index_dir")
    @classmethod
    def _a_path(cls, value: str | None) -> str | None:
        if value is not None and ("\x00" in value or not value.strip()):
            raise ValueError("must be a directory path (non-empty, no NUL character)")
        return value


class ReloadResponse(BaseModel):
    model: str
    previous_model: str
    index_sizes: dict[str, int]


class Info(BaseModel):
    model: str = Field(description="model version (sha256 of manifest.json, 12 hex digits)")
    model_sha256: str
    model_dir: str
    index_dir: str
    manifest: dict[str, Any]
    index_sizes: dict[str, int]
    index_factories: dict[str, str]
    providers: dict[str, str] = Field(description="ONNX Runtime provider per modality: CUDAExecutionProvider or CPUExecutionProvider")
    limits: dict[str, float]


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Ready(BaseModel):
    status: Literal["ready"] = "ready"
    model: str


class ErrorBody(BaseModel):
    detail: str = Field(description="what went wrong and what to fix")
