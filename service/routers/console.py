"""What the web console (``/ui/``) reads beyond the API: id suggestions, the map, index cards, live figures,
the caller's access level and the training report. Read routes only; none touches the search path.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field

from index.embedder import MODALITIES
from service.auth import caller_access
from service.bodies import ID_BYTES, JSON, body_spec, content_type, parse_json, rows_limit, unsupported
from service.live_stats import SearchStats
from service.projection import MAP_SAMPLE_MAX, MapCache
from service.routers import ERRORS
from service.schemas import Modality
from service.state import ServiceState
from service.suggest import SUGGEST_MAX_LIMIT, IdSuggester
from store.collection import Collection

router = APIRouter(prefix="/v1", tags=["console"], responses=ERRORS)
PLOT_NAME = re.compile(r"^[A-Za-z0-9_.-]+\.png$")


@dataclass
class ConsoleState:
    """Caches of the console routes, one per app."""

    stats: SearchStats
    maps: MapCache = field(default_factory=MapCache)
    suggester: IdSuggester = field(default_factory=IdSuggester)


class ItemIds(BaseModel):
    modality: Modality
    prefix: str
    ids: list[str] = Field(description="stored ids starting with the prefix, sorted")
    complete: bool = Field(description="false on an index too large for prefix lookups: only the exact id is matched")


class MapPoints(BaseModel):
    ids: list[str]
    xy: list[list[float]]
    metadata: list[dict[str, Any]] = Field(description="each item's top-level scalar metadata fields")


class EmbeddingMapOut(BaseModel):
    mean: list[float] = Field(description="the sample's mean embedding; project x as (x - mean) @ components.T")
    components: list[list[float]] = Field(description="(2, E) principal axes of the joint sample")
    explained_variance: list[float]
    totals: dict[str, int] = Field(description="items per modality (the sample holds at most per_modality of each)")
    points: dict[str, MapPoints]


class LocateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    modality: Modality
    ids: list[str] = Field(min_length=1, description="stored ids of that modality")


class LocatedPoint(BaseModel):
    id: str
    x: float
    y: float


class LocateResponse(BaseModel):
    points: list[LocatedPoint]


class IndexCard(BaseModel):
    factory: str
    metric: str | None
    dim: int
    count: int
    search_params: dict[str, Any]
    build_params: dict[str, Any]
    tombstones: int
    search_device: str


class Access(BaseModel):
    access: Literal["open", "read-write", "read-only"] = Field(description="open: no API keys configured")


class Report(BaseModel):
    configured: bool = Field(description="AVSEARCH_REPORT_DIR is set")
    plots: list[str] = Field(description="PNG files of the report folder, served by GET /v1/report/{name}")
    results_md: str | None = Field(None, description="results.md of the report, when present")


def _state(request: Request) -> ServiceState:
    return request.app.state.avsearch


def _console(request: Request) -> ConsoleState:
    return request.app.state.console


@router.get("/items/{modality}", response_model=ItemIds, summary="Stored ids of a modality starting with a prefix (suggestions)")
async def item_ids(
    modality: Modality,
    request: Request,
    prefix: str = Query("", max_length=256, description="the start of the id"),
    limit: int = Query(20, ge=1, le=SUGGEST_MAX_LIMIT, description="most ids returned"),
) -> ItemIds:
    collection = _state(request).ready_collection()
    suggester = _console(request).suggester
    found = await asyncio.get_running_loop().run_in_executor(suggester.executor, suggester.suggest, collection, modality, prefix, limit)
    return ItemIds(modality=modality, prefix=prefix, ids=found.ids, complete=found.complete)


@router.get("/map", response_model=EmbeddingMapOut, summary="2-D PCA of a random sample of both modalities' embeddings (cached per index change)")
async def embedding_map(
    request: Request, per_modality: int = Query(MAP_SAMPLE_MAX, ge=1, le=MAP_SAMPLE_MAX, description="most sampled items per modality")
) -> EmbeddingMapOut:
    collection = _state(request).ready_collection()
    built = await asyncio.to_thread(_console(request).maps.get, collection, per_modality)
    return EmbeddingMapOut(**built.as_json())


def _locate(console: ConsoleState, collection: Collection, modality: str, ids: list[str]) -> list[LocatedPoint]:
    pca = console.maps.get(collection, MAP_SAMPLE_MAX).pca
    vectors = [collection.get(modality, item_id).vector for item_id in ids]
    xy = pca.project(vectors)
    return [LocatedPoint(id=i, x=float(x), y=float(y)) for i, (x, y) in zip(ids, xy.tolist())]


@router.post(
    "/map/locate",
    response_model=LocateResponse,
    summary="Map coordinates of stored items (the hits of a search)",
    responses={404: {"description": "unknown id"}},
    openapi_extra=body_spec(LocateRequest),
)
async def locate(request: Request) -> LocateResponse:
    state = _state(request)
    collection = state.ready_collection()
    if content_type(request) != JSON:
        raise unsupported(request, (JSON,))
    max_ids = state.settings.max_vectors
    body = await parse_json(request, LocateRequest, limit=rows_limit(max_ids, ID_BYTES), why=f"{max_ids} ids (AVSEARCH_MAX_VECTORS) can need")
    if len(body.ids) > state.settings.max_vectors:
        raise HTTPException(413, f"{len(body.ids)} ids in one request; the limit is {state.settings.max_vectors} (AVSEARCH_MAX_VECTORS)")
    points = await asyncio.to_thread(_locate, _console(request), collection, body.modality, body.ids)  # ItemNotFound: 404 (service.errors)
    return LocateResponse(points=points)


@router.get("/indexes", response_model=dict[str, IndexCard], summary="Each modality's index: factory, size, width, search parameters")
async def indexes(request: Request) -> dict[str, IndexCard]:
    return await asyncio.to_thread(_index_cards, _state(request).ready_collection())


def _index_cards(collection: Collection) -> dict[str, IndexCard]:
    with collection.reading() as view:  # in a worker thread: an item change holding the lock must not stall the event loop
        return {modality: IndexCard(**view.card(modality)) for modality in MODALITIES}


@router.get("/stats", summary="Live search figures: searches/s, p50 and p99 latency over the last 30 s, and since start")
async def stats(request: Request) -> dict:
    return _console(request).stats.read()


@router.get("/access", response_model=Access, summary="What the key sent may do: read-write, read-only, or open (no keys configured)")
async def access(request: Request) -> Access:
    # Read-only also without keys when anonymous writes are refused (off loopback, or another machine's): the page hides its write controls.
    return Access(access=caller_access(request.scope, _state(request).settings))


@router.get("/report", response_model=Report, summary="The training report's plots (AVSEARCH_REPORT_DIR), if one is configured")
async def report(request: Request) -> Report:
    folder = _state(request).settings.report_dir
    if folder is None or not folder.is_dir():
        return Report(configured=folder is not None, plots=[])
    results = folder / "results.md"
    return Report(
        configured=True,
        plots=sorted(p.name for p in folder.glob("*.png") if PLOT_NAME.match(p.name)),
        results_md=results.read_text(errors="replace") if results.is_file() else None,
    )


@router.get(
    "/report/{name}",
    summary="One plot of the training report (PNG)",
    response_class=FileResponse,
    responses={200: {"content": {"image/png": {}}}, 404: {"description": "no such plot"}},
)
async def report_plot(name: str, request: Request) -> FileResponse:
    folder = _state(request).settings.report_dir
    if folder is None:
        raise HTTPException(404, "no training report configured; set AVSEARCH_REPORT_DIR to a report folder (python -m training compare --out)")
    if not PLOT_NAME.match(name):  # a bare file name: no path can leave the report folder
        raise HTTPException(404, f"{name!r} is not a plot name; plots are <name>.png as listed by GET /v1/report")
    path = folder / name
    if not path.is_file():
        raise HTTPException(404, f"no plot {name!r} in the report folder; GET /v1/report lists them")
    return FileResponse(path, media_type="image/png")
