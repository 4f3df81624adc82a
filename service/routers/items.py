"""Items: upsert raw feature vectors (embedded here), get and delete by id. Changes are on disk when acknowledged."""

from __future__ import annotations

import asyncio
from collections import Counter

from fastapi import APIRouter, HTTPException, Request

from index.embedder import InputError
from service.bodies import ID_BYTES, JSON, NUMBER_BYTES, body_spec, content_type, parse_json, rows_limit, unsupported
from service.encoding import dumps
from service.batching import validate
from service.routers import ERRORS
from service.schemas import DeleteResponse, ItemOut, Modality, UpsertRequest, UpsertResponse
from service.state import ServiceState

router = APIRouter(prefix="/v1/items", tags=["items"], responses=ERRORS)
NOT_FOUND = {404: {"description": "no item with that id"}}


@router.post(
    "/{modality}",
    response_model=UpsertResponse,
    summary="Add or replace items: raw feature vectors of this modality, embedded by the service",
    openapi_extra=body_spec(UpsertRequest),
)
async def upsert(modality: Modality, request: Request) -> UpsertResponse:
    state: ServiceState = request.app.state.avsearch
    state.ready_collection()
    if content_type(request) != JSON:
        raise unsupported(request, (JSON,))
    settings, width = state.settings, max(state.ready_collection().embedder.input_dims.values())
    row_bytes = width * NUMBER_BYTES + ID_BYTES + 3 * settings.max_metadata_bytes  # metadata sent with \u escapes is up to 3x its compact size
    why = f"{settings.max_vectors} items (AVSEARCH_MAX_VECTORS) of {width} values and metadata can need"
    body = await parse_json(request, UpsertRequest, limit=rows_limit(settings.max_vectors, row_bytes), why=why)
    if len(body.items) > settings.max_vectors:
        raise HTTPException(413, f"{len(body.items)} items in one request; the limit is {settings.max_vectors} (AVSEARCH_MAX_VECTORS): split it")
    for i, item in enumerate(body.items):
        size = 0 if item.metadata is None else len(dumps(item.metadata))
        if size > settings.max_metadata_bytes:
            raise HTTPException(422, f"body.items.{i}.metadata: {size} bytes of JSON; the limit is {settings.max_metadata_bytes} (AVSEARCH_MAX_METADATA_BYTES)")
    ids = [item.id for item in body.items]
    repeated = [item_id for item_id, n in Counter(ids).items() if n > 1]
    if repeated:
        raise HTTPException(422, f"ids must be unique within one request; repeated: {repeated[:5]}")
    async with state.gate.mutation():  # a version swap waits for this change, and this change for a swap
        collection = state.ready_collection()
        try:
            vectors = validate(collection, modality, [item.vector for item in body.items])
        except InputError as err:
            raise HTTPException(422, f"items: {err}") from None
        count = await asyncio.to_thread(collection.upsert, modality, vectors, ids, [item.metadata for item in body.items])
    return UpsertResponse(upserted=len(ids), modality=modality, count=count)


# {item_id:path}: an id holding '/' (accepted by upsert) can be read and deleted too.
@router.get("/{modality}/{item_id:path}", response_model=ItemOut, responses=NOT_FOUND)
async def get_item(modality: Modality, item_id: str, request: Request) -> ItemOut:
    collection = request.app.state.avsearch.ready_collection()
    item = await asyncio.to_thread(collection.get, modality, item_id)  # ItemNotFound: 404 (service.errors)
    return ItemOut(id=item.id, modality=modality, metadata=item.metadata, embedding=item.vector.tolist())


@router.delete("/{modality}/{item_id:path}", response_model=DeleteResponse, responses=NOT_FOUND)
async def delete_item(modality: Modality, item_id: str, request: Request) -> DeleteResponse:
    state: ServiceState = request.app.state.avsearch
    state.ready_collection()
    async with state.gate.mutation():
        collection = state.ready_collection()
        count = await asyncio.to_thread(collection.delete, modality, item_id)  # ItemNotFound: 404, ChangeNotSaved: 503
    return DeleteResponse(deleted=item_id, modality=modality, count=count)
