"""Optional API keys: ``Authorization: Bearer <key>``; a read-write key and an optional read-only one.

No key configured: every route is open when the server is bound to loopback (or
``AVSEARCH_ALLOW_ANONYMOUS_WRITES`` is set); bound to any other address, changes answer 403 with a
message naming the setting, since anyone who reaches the port could otherwise rewrite the index. With keys, every ``/v1`` route needs one: changes
(``POST``/``DELETE`` under ``/v1/items`` and ``/v1/admin``) need the read-write key, everything else
either key. Probes, metrics and the docs stay open. Missing or malformed header: 401; a key that is
not accepted here (unknown, or the read-only key on a write route): 403.

This is ASGI middleware with one policy table rather than a FastAPI dependency per route: the
dependency machinery cost about half of a search request's time on the event loop (profiled).
"""

from __future__ import annotations

import hmac

from pydantic import SecretStr
from starlette.types import ASGIApp, Receive, Scope, Send

from service.middleware import reject

WRITE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
WRITE_PREFIXES = ("/v1/items/", "/v1/admin/")
SCHEME = {"bearer": {"type": "http", "scheme": "bearer", "description": "AVSEARCH_API_KEY (read-write) or AVSEARCH_READ_API_KEY (read-only)"}}


def access_needed(method: str, path: str) -> str | None:
    """'write', 'read', or None (open) for a request."""
    if not path.startswith("/v1/"):
        return None
    if method in WRITE_METHODS and path.startswith(WRITE_PREFIXES):
        return "write"
    if path.startswith("/v1/admin/"):  # listing and downloading snapshots: the whole index, an admin's business
        return "write"
    return "read"


def _matches(given: bytes, key: SecretStr | None) -> bool:
    return key is not None and hmac.compare_digest(given, key.get_secret_value().encode())


ANONYMOUS_WRITES_REFUSED = (
    "writes, deletes and reloads need an API key on a server reachable from other machines: set AVSEARCH_API_KEY "
    "(and send 'Authorization: Bearer <key>'), or set AVSEARCH_ALLOW_ANONYMOUS_WRITES=true to let anyone change the index"
)


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: SecretStr | None, read_api_key: SecretStr | None, refuse_anonymous_writes: bool = False):
        self.app, self.api_key, self.read_api_key = app, api_key, read_api_key
        self.refuse_anonymous_writes = refuse_anonymous_writes  # no key, bound off loopback, not explicitly allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.api_key is None and self.refuse_anonymous_writes:
            if access_needed(scope["method"], scope["path"]) == "write":
                await reject(send, 403, ANONYMOUS_WRITES_REFUSED)
                return
        if scope["type"] == "http" and self.api_key is not None:
            needed = access_needed(scope["method"], scope["path"])
            problem = self._problem(scope, needed) if needed else None
            if problem is not None:
                status, detail = problem
                await reject(send, status, detail, [(b"www-authenticate", b"Bearer")] if status == 401 else [])
                return
        await self.app(scope, receive, send)

    def _problem(self, scope: Scope, needed: str) -> tuple[int, str] | None:
        header = next((value for name, value in scope["headers"] if name == b"authorization"), b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            return 401, "missing API key: send the header 'Authorization: Bearer <key>'"
        token = token.strip()
        if _matches(token, self.api_key):
            return None
        if _matches(token, self.read_api_key):
            return None if needed == "read" else (403, "this key is read-only; changes need the read-write key (AVSEARCH_API_KEY)")
        return 403, "API key not accepted; check the key you send"
