"""Snapshots: take one (consistent across both modalities under concurrent writes), list, download, delete."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field, ValidationError

from service.routers import ERRORS
from service.state import ServiceState
from store.snapshots import list_snapshots, snapshot_path

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/admin/snapshots", tags=["admin"], responses=ERRORS)
NOT_FOUND = {404: {"description": "no snapshot with that name"}}


class Snapshot(BaseModel):
    name: str = Field(description="download with GET /v1/admin/snapshots/{name}; restore with python -m service restore FILE")
    bytes: int
    model: str
    model_sha256: str
    created: float = Field(description="Unix time")
    lsn: dict[str, int] = Field(description="per modality, the last logged change it holds")
    items: dict[str, int]


class SnapshotList(BaseModel):
    snapshots: list[Snapshot]


def _path(state: ServiceState, name: str):
    """The file of snapshot ``name``; SnapshotError (422) or SnapshotNotFound (404): service.errors."""
    return snapshot_path(state.settings.snapshot_directory(), name)


@router.post("", response_model=Snapshot, status_code=201, summary="Take a snapshot of both modalities (every change acknowledged before it is in it)")
async def take(request: Request) -> Snapshot:
    state: ServiceState = request.app.state.avsearch
    state.ready_collection()
    try:
        card = await state.take_snapshot(state.settings.snapshot_directory())
    except OSError as err:
        raise HTTPException(503, f"the snapshot could not be written ({type(err).__name__}: {err}); nothing was kept; retry later") from None
    return Snapshot(**card)


@router.get("", response_model=SnapshotList, summary="The snapshot files in the snapshot directory, oldest first")
async def listing(request: Request) -> SnapshotList:
    state: ServiceState = request.app.state.avsearch
    snapshots = []
    for card in await asyncio.to_thread(list_snapshots, state.settings.snapshot_directory()):
        try:
            snapshots.append(Snapshot(**card))
        except ValidationError:  # a tar with a card of ours in name only: not a snapshot this service can restore
            log.warning("%s.tar in the snapshot directory is not a snapshot of this service; not listed", card.get("name"))
    return SnapshotList(snapshots=snapshots)


@router.get("/{name}", response_class=FileResponse, responses={**NOT_FOUND, 200: {"content": {"application/x-tar": {}}}}, summary="Download one snapshot as a tar file")
async def download(name: str, request: Request) -> FileResponse:
    path = _path(request.app.state.avsearch, name)
    return FileResponse(path, media_type="application/x-tar", filename=path.name)


@router.delete("/{name}", responses=NOT_FOUND, summary="Delete one snapshot file")
async def delete(name: str, request: Request) -> dict:
    path = _path(request.app.state.avsearch, name)
    path.unlink(missing_ok=True)
    return {"deleted": name}
