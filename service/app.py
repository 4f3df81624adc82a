"""The FastAPI application: heavy objects are loaded in ``lifespan`` (or handed in), never at import time."""

from __future__ import annotations

import asyncio
import logging
import signal
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

from index.embedder import InputError
from service.auth import SCHEME, ApiKeyMiddleware, access_needed
from service.bodies import JSON, OPENAPI_MODELS, start_parsers, state_limits, stop_parsers
from service.errors import add_handlers
from service.live_stats import SearchStats
from service.middleware import BodyLimitMiddleware, BodyTooLarge, MetricsMiddleware
from service.origin import OriginMiddleware
from service.routers import console, items, ops, search, snapshots
from service.settings import Settings
from service.state import ServiceState
from service.threads import search_thread_setup
from store.collection import Collection

UI_DIR = Path(__file__).parent / "ui"
log = logging.getLogger(__name__)


def _watch_sighup(state: ServiceState) -> bool:
    """SIGHUP swaps in the version found at the configured paths (only where the loop owns signals)."""

    def on_sighup() -> None:
        async def swap() -> None:
            try:
                await state.swap()
            except Exception as err:  # the current version keeps serving
                log.error("SIGHUP: version not swapped, the current one keeps serving: %s", err)

        asyncio.get_running_loop().create_task(swap())

    try:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, on_sighup)
        return True
    except (ValueError, RuntimeError, NotImplementedError, AttributeError):  # not the main thread, or no SIGHUP
        return False


def create_app(settings: Settings | None = None, collection: Collection | None = None, state: ServiceState | None = None) -> FastAPI:
    """The app; without ``collection`` it loads one in the background (``/readyz`` answers 503 until then).
    ``state``: what a worker process serves (:mod:`service.workers`), instead of ``ServiceState(settings, collection)``."""
    settings = settings or Settings()
    state = state or ServiceState(settings, collection)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(thread_name_prefix="avsearch-io", initializer=search_thread_setup(settings)))
        state.start_batcher()
        start_parsers()
        loader = None if state.collection is not None else asyncio.get_running_loop().create_task(state.load_in_background())
        watching = _watch_sighup(state)
        try:
            yield
        finally:
            if watching:
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            if loader is not None:
                await loader
            await state.batcher.stop()
            await asyncio.to_thread(stop_parsers)
            await state.close_collection()

    app = FastAPI(title="avsearch", version="0.2.0", description="Audio↔visual cross-modal search", lifespan=lifespan)
    app.state.avsearch = state
    app.state.console = console.ConsoleState(SearchStats(state.metrics.reading))
    for router in (search.router, items.router, ops.router, snapshots.router, console.router):  # the busiest routes are matched first
        app.include_router(router)
    # The web console: static files, matched after every API route and behind no middleware of its own.
    app.mount("/ui", StaticFiles(directory=UI_DIR, html=True), name="ui")

    @app.get("/", include_in_schema=False)
    async def to_console() -> RedirectResponse:
        return RedirectResponse("/ui/")

    add_handlers(app)  # the store's errors (unknown id, change not saved, snapshot name)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, err: RequestValidationError) -> JSONResponse:
        """Path and query problems (bodies are checked in service.bodies), as one readable line."""
        errors = err.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return JSONResponse({"detail": "malformed JSON; send a JSON object"}, status_code=400)
        parts = ["{}: {}".format(".".join(str(p) for p in e["loc"]), e["msg"]) for e in errors[:5]]
        return JSONResponse({"detail": "; ".join(parts)}, status_code=422)

    @app.exception_handler(InputError)
    async def bad_input(request: Request, err: InputError) -> JSONResponse:
        """Input that passed the route's checks but not the encoder (finite features that embed to NaN)."""
        return JSONResponse({"detail": str(err)}, status_code=422)

    @app.exception_handler(BodyTooLarge)
    async def too_large(request: Request, err: BodyTooLarge) -> JSONResponse:
        return JSONResponse({"detail": str(err)}, status_code=413)

    def openapi() -> dict:
        """FastAPI's schema plus the bodies that routes read by hand (JSON or .npy), with the loaded
        model's vector widths and the request limits (built again after a version swap)."""
        collection = state.collection
        version = collection.version if collection is not None else None
        if app.openapi_schema is None or app.state.openapi_version != version:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in OPENAPI_MODELS:
                body = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(body.pop("$defs", {}))
                components[model.__name__] = body
            if collection is not None:
                state_limits(components, collection.embedder.input_dims, settings.max_vectors, settings.max_top_k)
            schema["components"]["securitySchemes"] = SCHEME
            for path, operations in schema["paths"].items():
                for method, operation in operations.items():
                    if access_needed(method.upper(), path):
                        operation["security"] = [{"bearer": []}]
                    if method == "post" and path.startswith("/v1/admin/") and "requestBody" not in operation:  # JSON only (service.origin)
                        operation["requestBody"] = {"required": False, "content": {JSON: {"schema": {"type": "object", "maxProperties": 0}}}}
            app.openapi_schema, app.state.openapi_version = schema, version
        return app.openapi_schema

    app.openapi = openapi
    # Added innermost first: metrics see every answer, the 401/403/413/421 of the others included.
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes, drain_bytes=settings.max_drain_bytes)
    app.add_middleware(OriginMiddleware, allowed_hosts=settings.allowed_host_names())  # after the keys: a wrong key hears 401/403 first
    app.add_middleware(
        ApiKeyMiddleware,
        api_key=settings.api_key,
        read_api_key=settings.read_api_key,
        refuse_anonymous_writes=settings.anonymous_writes_refused(),
        allow_anonymous_writes=settings.allow_anonymous_writes,
    )
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    return app
