"""Optional API keys: ``Authorization: Bearer <key>``; a read-write key and an optional read-only one.

No key configured: every route is open when the server is bound to loopback and the client is on
this machine (or ``AVSEARCH_ALLOW_ANONYMOUS_WRITES`` is set); bound to any other address, or asked by
another machine (through a same-host proxy: a forwarding header, or the address uvicorn takes from
one), changes answer 403 with a message naming the setting, since anyone who reaches the port could
otherwise rewrite the index. With keys, every ``/v1`` route needs one: changes (any method but
``GET``/``HEAD``, except the read-only ``POST``s of search, embed and locate) and everything under
``/v1/admin`` need the read-write key, everything else either key. Probes, metrics, the docs and
the console's static files stay open to reads; any other path needs a key (fail closed: a route
added later is not open by accident). Missing or malformed
header: 401; a key that is not accepted here (unknown, or the read-only key on a write route): 403.

The decision is on the routed path (``root_path`` stripped, as Starlette's router does), so the
policy holds under ``uvicorn --root-path`` or when the app is mounted inside another one.

This is ASGI middleware with one policy table rather than a FastAPI dependency per route: the
dependency machinery cost about half of a search request's time on the event loop (profiled).
"""

from __future__ import annotations

import hmac
import ipaddress

from pydantic import SecretStr
from starlette.types import ASGIApp, Receive, Scope, Send

from service.middleware import reject
from service.settings import Settings

READ_METHODS = {"GET", "HEAD"}
OPEN_PATHS = {"/", "/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc", "/ui"}
OPEN_PREFIXES = ("/ui/",)
READ_POSTS = {"/v1/search", "/v1/embed", "/v1/map/locate"}  # POST only because a query can be large
SCHEME = {"bearer": {"type": "http", "scheme": "bearer", "description": "AVSEARCH_API_KEY (read-write) or AVSEARCH_READ_API_KEY (read-only)"}}


def routed_path(scope: Scope) -> str:
    """The path the router matches: ``scope["path"]`` without the ``root_path`` it starts with."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("", "/"):
        return path[len(root) :] or "/"
    return path


def access_needed(method: str, path: str) -> str | None:
    """'write', 'read', or None (open) for a request to the routed ``path``; unknown paths need a key."""
    if method in READ_METHODS:
        if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
            return None
        if path.startswith("/v1/admin/"):  # listing and downloading snapshots: the whole index, an admin's business
            return "write"
        return "read"
    return "read" if method == "POST" and path in READ_POSTS else "write"


def _matches(given: bytes, key: SecretStr | None) -> bool:
    return key is not None and hmac.compare_digest(given, key.get_secret_value().encode())


ANONYMOUS_WRITES_REFUSED = (
    "writes, deletes and reloads need an API key on a server reachable from other machines: set AVSEARCH_API_KEY "
    "(and send 'Authorization: Bearer <key>'), or set AVSEARCH_ALLOW_ANONYMOUS_WRITES=true to let anyone change the index"
)


FORWARDING_HEADERS = {b"forwarded", b"x-forwarded-for", b"x-real-ip"}


def local_client(scope: Scope) -> bool:
    """The request comes from this machine and names no other client (a proxy's forwarding header)."""
    if any(name in FORWARDING_HEADERS for name, _ in scope["headers"]):
        return False
    client = scope.get("client")
    if client is None:
        return True  # a Unix socket
    try:
        return ipaddress.ip_address(client[0]).is_loopback
    except ValueError:
        return False


def anonymous_writes_refused(scope: Scope, refused_by_bind: bool, allowed: bool) -> bool:
    """No key configured: may this request change the index?"""
    return not allowed and (refused_by_bind or not local_client(scope))


class ApiKeyMiddleware:
    def __init__(
        self, app: ASGIApp, api_key: SecretStr | None, read_api_key: SecretStr | None, refuse_anonymous_writes: bool = False, allow_anonymous_writes: bool = False
    ):
        self.app, self.api_key, self.read_api_key = app, api_key, read_api_key
        self.refuse_anonymous_writes = refuse_anonymous_writes  # no key, bound off loopback, not explicitly allowed
        self.allow_anonymous_writes = allow_anonymous_writes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.api_key is None and anonymous_writes_refused(scope, self.refuse_anonymous_writes, self.allow_anonymous_writes):
            if access_needed(scope["method"], routed_path(scope)) == "write":
                await reject(send, 403, ANONYMOUS_WRITES_REFUSED)
                return
        if scope["type"] == "http" and self.api_key is not None:
            needed = access_needed(scope["method"], routed_path(scope))
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


def caller_access(scope: Scope, settings: Settings) -> str:
    """'open' (no keys, and this caller may write), 'read-write' or 'read-only', for a request the
    middleware let through (unknown keys were refused there; only which of the two came is left)."""
    if settings.api_key is None:
        return "read-only" if anonymous_writes_refused(scope, settings.anonymous_writes_refused(), settings.allow_anonymous_writes) else "open"
    header = next((value for name, value in scope["headers"] if name == b"authorization"), b"")
    return "read-write" if _matches(header.partition(b" ")[2].strip(), settings.api_key) else "read-only"

