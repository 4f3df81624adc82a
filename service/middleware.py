"""Plain ASGI middleware (cheaper per request than Starlette's BaseHTTPMiddleware): metrics and body size."""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.encoding import dumps
from service.metrics import Metrics


class BodyTooLarge(Exception):
    def __init__(self, limit: int):
        super().__init__(f"request body over the limit of {limit} bytes (AVSEARCH_MAX_BODY_BYTES); send fewer vectors per request")


class MetricsMiddleware:
    """Counts and times every HTTP request by route template (``/v1/items/{modality}/{item_id}``)."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.observe_request(template, scope["method"], status, time.perf_counter() - start)


class BodyLimitMiddleware:
    """413 for a body over ``limit`` bytes: at once from Content-Length, else while it streams in."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                if not value.isdigit() or int(value) > self.limit:
                    await reject(send, 413 if value.isdigit() else 400, str(BodyTooLarge(self.limit)) if value.isdigit() else "invalid Content-Length header")
                    return
                break
        received = 0

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise BodyTooLarge(self.limit)  # turned into a 413 by the app's exception handler
            return message

        await self.app(scope, counted_receive, send)


async def reject(send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """Answer ``{"detail": ...}`` with ``status`` without calling the app."""
    body = dumps({"detail": detail})
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(headers or [])]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})
