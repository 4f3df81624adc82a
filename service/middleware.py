"""Plain ASGI middleware (cheaper per request than Starlette's BaseHTTPMiddleware): metrics and body size."""

from __future__ import annotations

import asyncio
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.encoding import dumps
from service.metrics import Metrics

WARM_UP = "avsearch.warm_up"  # scope key of a request a server makes to itself before it serves (service.prefork): not counted


class BodyTooLarge(Exception):
    def __init__(self, limit: int):
        super().__init__(f"request body over the limit of {limit} bytes (AVSEARCH_MAX_BODY_BYTES); send fewer vectors per request")


class MetricsMiddleware:
    """Counts and times every HTTP request by route template (``/v1/items/{modality}/{item_id}``)."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or WARM_UP in scope:
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
    """413 for a body over ``limit`` bytes: at once from Content-Length, else while it streams in.

    A client that sends its whole body before reading (Python's urllib, most simple clients) would
    get a connection reset instead of the 413: closing a socket with unread bytes in its receive
    buffer makes the kernel send RST, which destroys the answer in flight. So the rest of an
    over-limit body is read and dropped first, up to ``drain_bytes`` and ``DRAIN_SECONDS`` (bounded:
    a client cannot hold the server with an endless body). A client that asked ``Expect:
    100-continue`` has sent nothing yet and is answered at once.
    """

    DRAIN_SECONDS = 30.0

    def __init__(self, app: ASGIApp, limit: int, drain_bytes: int = 256 * 1024 * 1024):
        self.app, self.limit, self.drain_bytes = app, limit, drain_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        expects_continue = False
        for name, value in scope["headers"]:
            if name == b"expect":
                expects_continue = value.lower() == b"100-continue"
        for name, value in scope["headers"]:
            if name == b"content-length":
                if not value.isdigit():
                    await reject(send, 400, "invalid Content-Length header")
                    return
                if int(value) > self.limit:
                    if not expects_continue:
                        await self._drain(receive, 0)
                    await reject(send, 413, str(BodyTooLarge(self.limit)), [(b"connection", b"close")])
                    return
                break
        received = 0

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                if message.get("more_body", False):
                    await self._drain(receive, received)
                raise BodyTooLarge(self.limit)  # turned into a 413 by the app's exception handler
            return message

        await self.app(scope, counted_receive, send)

    async def _drain(self, receive: Receive, already: int) -> None:
        """Read and drop the rest of the body, within the byte and time bounds."""
        deadline = time.monotonic() + self.DRAIN_SECONDS
        drained = already
        while drained <= self.drain_bytes and time.monotonic() < deadline:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.001))
            except asyncio.TimeoutError:
                return
            if message["type"] != "http.request":
                return  # the client went away
            drained += len(message.get("body", b""))
            if not message.get("more_body", False):
                return


async def reject(send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """Answer ``{"detail": ...}`` with ``status`` without calling the app."""
    body = dumps({"detail": detail})
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(headers or [])]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})
