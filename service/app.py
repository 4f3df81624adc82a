"""The FastAPI application: heavy objects are loaded in ``lifespan``, not at import time."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool

from index.embedder import MODALITIES, Embedder, InputError
from index.store import VectorIndex
from service.schemas import Health, SearchHit, SearchRequest, SearchResponse
from service.settings import Settings

log = logging.getLogger(__name__)
OTHER = {"audio": "visual", "visual": "audio"}


@dataclass
class Engine:
    """What a request needs: the embedder and one index per modality, from the same model."""

    embedder: Embedder
    indexes: dict[str, VectorIndex]

    @classmethod
    def load(cls, settings: Settings) -> "Engine":
        embedder = Embedder(settings.model_dir, device=settings.device)
        indexes = {m: VectorIndex.load(settings.index_dir / m, expected_manifest_hash=embedder.manifest_hash) for m in MODALITIES}
        return cls(embedder, indexes)

    def search(self, request: SearchRequest) -> SearchResponse:
        queries = self.embedder.embed(request.modality, request.vectors)
        scores, ids = self.indexes[request.target or OTHER[request.modality]].search(queries, request.top_k)
        results = [[SearchHit(id=i, score=float(s)) for i, s in zip(row_ids, row_scores)] for row_ids, row_scores in zip(ids, scores)]
        return SearchResponse(results=results, model=self.embedder.manifest_hash[:12])


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.engine = engine or Engine.load(settings)
        yield

    app = FastAPI(title="avsearch", version="0.1.0", description="Audio↔visual cross-modal search", lifespan=lifespan)

    @app.get("/healthz", response_model=Health)
    def healthz() -> Health:
        return Health()

    @app.post("/v1/search", response_model=SearchResponse)
    async def search(body: SearchRequest, request: Request) -> SearchResponse:
        if len(body.vectors) > settings.max_vectors:
            raise HTTPException(413, f"{len(body.vectors)} vectors in one request; the limit is {settings.max_vectors}")
        if body.top_k > settings.max_top_k:
            raise HTTPException(422, f"top_k {body.top_k} is above the limit {settings.max_top_k}")
        try:
            return await run_in_threadpool(request.app.state.engine.search, body)
        except InputError as err:
            raise HTTPException(422, str(err)) from None

    return app
