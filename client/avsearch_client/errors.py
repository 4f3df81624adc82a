"""The client's exceptions: one class per answer the server gives, each carrying its status and message."""

from __future__ import annotations

import httpx


class AvsearchError(Exception):
    """Base class. ``status`` is the HTTP status (None when no answer came); ``message`` the server's words."""

    status: int | None = None

    def __init__(self, message: str, status: int | None = None, request: str = ""):
        super().__init__(f"{request}: HTTP {status}: {message}" if status is not None else message)
        self.message = message
        self.request = request  # "POST /v1/search"
        if status is not None:
            self.status = status


class ConnectionFailed(AvsearchError):
    """No answer: the server could not be reached, or the connection broke (after the retries allowed)."""


class IncompatibleServer(AvsearchError):
    """The server does not speak the API this client was written for."""


class BadRequest(AvsearchError):
    """400: a body the server could not read (malformed JSON or ``.npy``)."""

    status = 400


class Unauthorized(AvsearchError):
    """401: keys are configured and none was sent (``api_key=`` or ``AVSEARCH_API_KEY``)."""

    status = 401


class Forbidden(AvsearchError):
    """403: the key is not accepted, is read-only on a write, or the server refuses anonymous writes."""

    status = 403


class NotFound(AvsearchError):
    """404: no item (or snapshot) with that id."""

    status = 404


class Conflict(AvsearchError):
    """409: a reload whose version cannot be loaded; the current version keeps serving."""

    status = 409


class PayloadTooLarge(AvsearchError):
    """413: more vectors than ``AVSEARCH_MAX_VECTORS`` or a body over ``AVSEARCH_MAX_BODY_BYTES``."""

    status = 413


class UnsupportedMediaType(AvsearchError):
    """415: a Content-Type the route does not take."""

    status = 415


class InvalidRequest(BadRequest):
    """422: the request is readable but wrong (vector width, NaN, top_k, unknown field ...)."""

    status = 422


class Unavailable(AvsearchError):
    """503: not ready, or a change the server could not log (nothing applied); safe to retry later."""

    status = 503


class UnexpectedStatus(AvsearchError):
    """A status of 400 or more this client has no class for (a 500 is a server bug: report it)."""


BY_STATUS: dict[int, type[AvsearchError]] = {
    cls.status: cls for cls in (BadRequest, Unauthorized, Forbidden, NotFound, Conflict, PayloadTooLarge, UnsupportedMediaType, InvalidRequest, Unavailable)
}


def error_from(response: httpx.Response) -> AvsearchError:
    """The typed exception for an answer of status >= 400, with the server's ``detail`` as message."""
    try:
        body = response.json()
        message = body["detail"] if isinstance(body, dict) and isinstance(body.get("detail"), str) else response.text
    except ValueError:  # not JSON (a proxy's page, a truncated body)
        message = response.text
    message = message.strip()[:2000] or response.reason_phrase
    request = f"{response.request.method} {response.request.url.path}"
    return BY_STATUS.get(response.status_code, UnexpectedStatus)(message, response.status_code, request)
