"""Connection deadlines uvicorn lacks: a request's head and its body must arrive in bounded time.

Uvicorn closes a connection idle between requests (``timeout_keep_alive``), but not one that
connected and sent nothing, nor one that sends its head or body a byte at a time: a few hundred
such clients (slowloris) would hold every socket. This protocol (uvicorn's httptools one, with
deadlines) closes a connection whose request head is not complete ``header_timeout`` seconds after
it connected or began that request, or whose body is not complete ``body_timeout`` seconds after
its head. The time the app takes to answer is not bounded here.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class DeadlineProtocol(HttpToolsProtocol):
    header_timeout = 10.0
    body_timeout = 60.0
    _deadline: asyncio.TimerHandle | None = None

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()  # the app, if it is reading the body, sees the client go

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.header_timeout)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._deadline is None:  # a later request on a kept-alive connection; the first one's clock runs since connect
            self._arm(self.header_timeout)

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._arm(self.body_timeout)

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def deadline_protocol(header_timeout: float, body_timeout: float) -> type[DeadlineProtocol]:
    """The protocol class to hand to uvicorn (``http=``), with these deadlines in seconds."""
    return type("DeadlineProtocol", (DeadlineProtocol,), {"header_timeout": header_timeout, "body_timeout": body_timeout})
