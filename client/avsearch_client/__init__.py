"""Python client of the avsearch service: numpy in, typed results out, sync (``Client``) and async (``AsyncClient``)."""

__version__ = "0.1.0"

from avsearch_client.aio import AsyncClient  # noqa: E402
from avsearch_client.errors import (  # noqa: E402
    AvsearchError,
    BadRequest,
    Conflict,
    ConnectionFailed,
    Forbidden,
    IncompatibleServer,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    UnexpectedStatus,
    Unauthorized,
    Unavailable,
    UnsupportedMediaType,
)
from avsearch_client.models import Deleted, Hit, Hits, Info, Item, Limits, Reloaded, SearchResults, Snapshot, Upserted  # noqa: E402
from avsearch_client.sync import Client  # noqa: E402
from avsearch_client.wire import API_VERSION, RetryPolicy  # noqa: E402

__all__ = [
    "API_VERSION", "AsyncClient", "AvsearchError", "BadRequest", "Client", "Conflict", "ConnectionFailed", "Deleted", "Forbidden",
    "Hit", "Hits", "IncompatibleServer", "Info", "InvalidRequest", "Item", "Limits", "NotFound", "PayloadTooLarge", "Reloaded",
    "RetryPolicy", "SearchResults", "UnexpectedStatus", "Snapshot", "Unauthorized", "Unavailable", "UnsupportedMediaType", "Upserted",
]
