"""``POST /v1/search`` and ``POST /v1/embed``: JSON, or a float32 ``.npy`` body with options in the query string."""

from __future__ import annotations

import io

import numpy as np
from fastapi import APIRouter, HTTPException, Request, Response

from index.embedder import InputError
from service.batching import OTHER, EmbedJob, SearchJob, validate
from service.bodies import ID_BYTES, JSON, NPY, NUMBER_BYTES, body_spec, content_type, parse_json, parse_npy, parse_query, query_spec, read_body, rows_limit, unsupported
from service.encoding import dumps
from service.routers import ERRORS
from service.schemas import EmbedParams, EmbedRequest, EmbedResponse, SearchParams, SearchRequest, SearchResponse
from service.state import ServiceState
from store.collection import Collection

router = APIRouter(prefix="/v1", tags=["search"], responses=ERRORS)


def _check_count(state: ServiceState, n: int) -> None:
    if n > state.settings.max_vectors:
        raise HTTPException(413, f"{n} vectors in one request; the limit is {state.settings.max_vectors} (AVSEARCH_MAX_VECTORS): split the request")


def _check_hits(state: ServiceState, queries: int, top_k: int) -> None:
    if queries * top_k > state.settings.max_hits:
        raise HTTPException(413, f"{queries} queries x top_k {top_k} = {queries * top_k} hits; the limit is {state.settings.max_hits} (AVSEARCH_MAX_HITS): ask for fewer")


async def _read_options(request: Request, json_model, params_model, collection: Collection, max_vectors: int):
    """(options, raw vectors or None): a JSON body, or a .npy body with options in the query string;
    either bounded by what ``max_vectors`` rows of the model's widest input can need."""
    kind = content_type(request)
    width = max(collection.embedder.input_dims.values())
    why = f"{max_vectors} vectors (AVSEARCH_MAX_VECTORS) of {width} values can need"
    if kind == JSON:
        options = await parse_json(request, json_model, limit=rows_limit(max_vectors, max(width * NUMBER_BYTES, ID_BYTES)), why=why)
        return options, options.vectors
    if kind == NPY:
        return parse_query(request, params_model), parse_npy(await read_body(request, rows_limit(max_vectors, width * 8), why))  # float64 at most
    raise unsupported(request, (JSON, NPY))


@router.post(
    "/search",
    response_model=SearchResponse,
    summary="Nearest items of the other modality (or `target`) for raw feature vectors or stored ids",
    openapi_extra={**body_spec(SearchRequest, binary=True), "parameters": query_spec(SearchParams)},
    responses={404: {"description": "an id in `ids` is unknown"}},
)
async def search(request: Request) -> Response:
    state: ServiceState = request.app.state.avsearch
    collection = state.ready_collection()
    options, vectors = await _read_options(request, SearchRequest, SearchParams, collection, state.settings.max_vectors)
    ids = getattr(options, "ids", None)  # only JSON bodies can query by stored ids
    queries = len(vectors) if vectors is not None else len(ids)
    _check_count(state, queries)
    if options.top_k > state.settings.max_top_k:
        raise HTTPException(422, f"top_k {options.top_k} is above the limit {state.settings.max_top_k} (AVSEARCH_MAX_TOP_K)")
    _check_hits(state, queries, options.top_k)
    try:
        checked = None if vectors is None else validate(collection, options.modality, vectors)
    except InputError as err:
        raise HTTPException(422, str(err)) from None
    job = SearchJob(
        options.modality, options.target or OTHER[options.modality], options.top_k, checked, ids, options.score_threshold, options.filter
    )
    body = await state.batcher.submit(collection, job)  # ItemNotFound: 404 (service.errors)
    return Response(body, media_type=JSON)


@router.post(
    "/embed",
    response_model=EmbedResponse,
    summary="Served embeddings of raw feature vectors (JSON, or .npy back with `Accept: application/x-npy`)",
    openapi_extra={**body_spec(EmbedRequest, binary=True), "parameters": query_spec(EmbedParams)},
)
async def embed(request: Request) -> Response:
    state: ServiceState = request.app.state.avsearch
    collection = state.ready_collection()
    options, vectors = await _read_options(request, EmbedRequest, EmbedParams, collection, state.settings.max_vectors)
    _check_count(state, len(vectors))
    try:
        checked = validate(collection, options.modality, vectors)
    except InputError as err:
        raise HTTPException(422, str(err)) from None
    embeddings: np.ndarray = await state.batcher.submit(collection, EmbedJob(options.modality, checked))
    if NPY in request.headers.get("accept", ""):
        buffer = io.BytesIO()
        np.save(buffer, embeddings)
        return Response(buffer.getvalue(), media_type=NPY, headers={"X-Avsearch-Model": collection.version})
    return Response(dumps({"embeddings": embeddings, "dim": int(embeddings.shape[1]), "model": collection.version}), media_type=JSON)
