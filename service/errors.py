"""The one place where the store's plain errors become HTTP answers (``{"detail": ...}``).

The store raises :mod:`store.errors`; routes let them through, and these handlers choose the
status. A message says what is wrong (the store's words) and what to do (added here, per route
where the advice differs).
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from service.auth import routed_path
from store.errors import ChangeNotDurable, ChangeNotSaved, ChannelClosed, ItemNotFound, NotFollowing, SnapshotError, SnapshotNotFound


class ServerStopping(RuntimeError):
    """SIGTERM/SIGINT reached the server: a version swap or a snapshot that waited for another gives up."""


STATUS: dict[type[Exception], int] = {
    ItemNotFound: 404,  # an unknown id in a get, delete, locate, or search by ids
    SnapshotNotFound: 404,
    SnapshotError: 422,  # a snapshot name the service would not have made
    ChangeNotSaved: 503,  # the log append failed, nothing applied: retry
    ChangeNotDurable: 503,  # in the log and served, its fsync failed: send it again once the disk is fixed
    ChannelClosed: 503,  # a worker process whose primary is gone (it stops too): retry, another answers
    NotFollowing: 503,  # a worker process that cannot apply the log (it stops, a fork replaces it): retry
    ServerStopping: 503,  # a restart follows (compose, systemd): retry then
}


def status_of(err: Exception) -> int:
    return next(status for kind, status in STATUS.items() if isinstance(err, kind))


def _detail(request: Request, err: Exception) -> str:
    if isinstance(err, ItemNotFound):
        if routed_path(request.scope) == "/v1/search":  # a search by stored ids: another way to ask
            return f"{err.message}; query with raw vectors or upsert the item first"
        return f"{err.message}; check the id and the modality"
    if isinstance(err, SnapshotNotFound):
        return f"{err}; GET /v1/admin/snapshots lists them"
    if isinstance(err, (ChangeNotSaved, ChangeNotDurable)):
        return err.message
    if isinstance(err, ChannelClosed):
        return f"this worker lost the process that stores changes ({err}); nothing was applied; retry"
    if isinstance(err, NotFollowing):
        return f"{err}; it stops and a fresh one takes its place; retry"
    if isinstance(err, ServerStopping):
        return f"{err}; retry once the server is back"
    return str(err)


def add_handlers(app: FastAPI) -> None:
    async def handle(request: Request, err: Exception) -> JSONResponse:
        return JSONResponse({"detail": _detail(request, err)}, status_code=status_of(err))

    for kind in STATUS:
        app.add_exception_handler(kind, handle)
