"""Operations: liveness, readiness, Prometheus metrics, what is loaded, and the version swap."""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request, Response

from index.embedder import ModelError
from index.store import IndexLoadError
from service.auth import caller_access
from service.bodies import JSON, body_spec, content_type, parse_json, unsupported
from service.routers import ERRORS
from service.schemas import Health, Info, Ready, ReloadRequest, ReloadResponse
from service.state import ServiceState

router = APIRouter(tags=["ops"])
OPTIONAL_BODY = body_spec(ReloadRequest)
OPTIONAL_BODY["requestBody"]["required"] = False  # no body: reload from the configured paths


@router.get("/healthz", response_model=Health, summary="Alive (the process answers; X-Avsearch-Worker names which, with AVSEARCH_WORKERS > 1)")
async def healthz(response: Response) -> Health:
    response.headers["X-Avsearch-Worker"] = str(os.getpid())
    return Health()


@router.get("/readyz", response_model=Ready, summary="Model and index loaded; 503 until then", responses={503: ERRORS[503]})
async def readyz(request: Request) -> Ready:
    state: ServiceState = request.app.state.avsearch
    try:
        collection = state.ready_collection()
    except HTTPException:
        if state.load_error is not None and caller_access(request.scope, state.settings) == "read-only":  # the error names server paths
            raise HTTPException(503, "not ready: loading failed (the server log, or /readyz with the read-write key, says why); retry later") from None
        raise
    return Ready(model=collection.version)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def metrics(request: Request) -> Response:
    state: ServiceState = request.app.state.avsearch
    return Response(state.metrics.render(), media_type=state.metrics.content_type)


@router.get("/v1/info", response_model=Info, responses=ERRORS, summary="Model manifest, index sizes, providers, limits")
async def info(request: Request) -> Info:
    state: ServiceState = request.app.state.avsearch
    s = state.settings
    limits = {"max_vectors": s.max_vectors, "max_top_k": s.max_top_k, "max_body_bytes": s.max_body_bytes, "batch_window_ms": s.batch_window_ms, "max_batch": s.max_batch}
    described = state.ready_collection().describe()
    if caller_access(request.scope, s) == "read-only":  # server paths are for those who may change what is served
        described["model_dir"], described["index_dir"] = Path(described["model_dir"]).name, Path(described["index_dir"]).name
    return Info(**described, limits=limits)


@router.post(
    "/v1/admin/reload",
    response_model=ReloadResponse,
    summary="Swap in a model + index version atomically (same as SIGHUP with no body)",
    responses={**ERRORS, 403: {"description": "a path outside AVSEARCH_RELOAD_ROOTS (or the key is not accepted)"}, 409: {"description": "the new version cannot be loaded (missing, corrupt, index from another model); the current one stays"}},
    openapi_extra=OPTIONAL_BODY,
)
async def reload(request: Request) -> ReloadResponse:
    state: ServiceState = request.app.state.avsearch
    body = await request.body()
    if body.strip():
        if content_type(request) != JSON:
            raise unsupported(request, (JSON,))
        options = await parse_json(request, ReloadRequest, body)
    else:
        options = ReloadRequest()
    model_dir, index_dir = (_check_under_roots(state, name, getattr(options, name)) for name in ("model_dir", "index_dir"))
    try:
        previous, version, sizes = await state.swap(model_dir, index_dir)  # the paths checked, not the names again: a link moved meanwhile cannot lead elsewhere
    except (ModelError, IndexLoadError, OSError, ValueError) as err:  # ValueError: paths the OS refuses
        raise HTTPException(409, f"version not swapped, the current one keeps serving: {err}") from None
    return ReloadResponse(model=version, previous_model=previous, index_sizes=sizes)


def _check_under_roots(state: ServiceState, name: str, requested: str | None) -> Path | None:
    """``requested`` with its symlinks resolved; 403 unless that lies under a reload root: a client must
    not make the server open arbitrary paths (``/etc``, another tenant's data) as a model or an index."""
    if requested is None:
        return None  # the served paths, re-read
    roots = state.settings.reload_root_paths()
    try:
        resolved = Path(requested).resolve()
    except (OSError, RuntimeError, ValueError) as err:  # a symlink loop, a path the OS refuses
        raise HTTPException(409, f"version not swapped, the current one keeps serving: {name} {requested!r}: {err}") from None
    if not any(resolved == root or resolved.is_relative_to(root) for root in roots):
        allowed = ", ".join(str(root) for root in roots)
        raise HTTPException(403, f"{name} {requested!r} is outside the directories a reload may load from ({allowed}); set AVSEARCH_RELOAD_ROOTS to allow others")
    return resolved
