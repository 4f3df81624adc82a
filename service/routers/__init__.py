"""One router per resource: search (search, embed), items, ops (health, readiness, metrics, info, swap)."""

from __future__ import annotations

from service.schemas import ErrorBody

# Documented on every route that takes a body; the message always says what to fix.
ERRORS: dict = {
    code: {"model": ErrorBody, "description": what}
    for code, what in {
        400: "malformed JSON or .npy body",
        401: "API key missing",
        403: "API key not accepted (or read-only on a write route)",
        413: "too many vectors or body too large",
        415: "unsupported Content-Type",
        422: "invalid request (width, NaN/Inf, top_k, modality...)",
        503: "not ready: model and index still loading",
    }.items()
}
