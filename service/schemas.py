"""Request and response bodies, split by role."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

Modality = Literal["audio", "visual"]


class SearchRequest(BaseModel):
    modality: Modality = Field(description="modality of the query vectors")
    vectors: list[list[float]] = Field(description="raw feature vectors of that modality, one per query", min_length=1)
    top_k: int = Field(10, ge=1, description="neighbours per query")
    target: Modality | None = Field(None, description="modality to search; defaults to the other one")


class SearchHit(BaseModel):
    id: str
    score: float = Field(description="cosine similarity of the served embeddings")


class SearchResponse(BaseModel):
    results: list[list[SearchHit]] = Field(description="one list per query vector, best first")
    model: str = Field(description="model version: sha256 of its manifest.json, first 12 hex digits")


class Health(BaseModel):
    status: Literal["ok"] = "ok"
