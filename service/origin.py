"""Defences for a server that browsers can reach: a Host allow-list, no cross-site writes, JSON-only admin posts.

A web page the operator visits can send requests to ``localhost:8000``. Without CORS it cannot read
the answers, but "simple" requests (a form post, ``fetch`` with ``no-cors``) still reach the server,
and a DNS-rebinding page (its own name, re-resolved to 127.0.0.1) reads everything as same-origin.
So, once the keys (if any) let a request through:

* the ``Host`` header must be one the server answers to (``Settings.allowed_host_names``): 421
  (the liveness and readiness probes excepted);
* a request that is not ``GET``/``HEAD`` and carries an ``Origin`` other than the server's own: 403
  (the console, served from the same origin, sends its own; curl and scripts send none);
* ``POST /v1/admin/...`` needs ``Content-Type: application/json``, which a page cannot send across
  sites without a CORS preflight this server never grants: 415.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from service.auth import routed_path
from service.middleware import reject

SAFE_METHODS = {"GET", "HEAD"}
PROBES = {"/healthz", "/readyz"}  # an orchestrator's probe names the address it dials; these tell nothing worth rebinding for
DEFAULT_PORTS = {"http": "80", "https": "443"}


def host_name(host: str) -> str:
    """'Example.org:8000' -> 'example.org'; '[::1]:8000' -> '::1'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _authority(netloc: str, scheme: str) -> str:
    """'localhost:80' and 'localhost' alike for http: the port said or implied."""
    netloc = netloc.strip().lower()
    default = DEFAULT_PORTS.get(scheme, "")
    return netloc[: -len(default) - 1] if default and netloc.endswith(":" + default) else netloc


def same_origin(origin: str, host: str) -> bool:
    try:
        parts = urlsplit(origin)
    except ValueError:
        return False
    if parts.scheme not in DEFAULT_PORTS or not parts.netloc:  # "null" (sandboxed frames, file:) included
        return False
    # The page's scheme, not this hop's: behind a TLS proxy the page is https and this hop http.
    return _authority(parts.netloc, parts.scheme) == _authority(host, parts.scheme)


class OriginMiddleware:
    def __init__(self, app: ASGIApp, allowed_hosts: set[str] | None):
        self.app, self.allowed_hosts = app, allowed_hosts  # None: any Host

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        host = origin = kind = None
        for name, value in scope["headers"]:
            if name == b"host":
                host = value.decode("latin-1")
            elif name == b"origin":
                origin = value.decode("latin-1")
            elif name == b"content-type":
                kind = value.decode("latin-1").split(";")[0].strip().lower()
        problem = self._problem(scope, host, origin, kind)
        if problem is not None:
            await reject(send, *problem)
            return
        await self.app(scope, receive, send)

    def _problem(self, scope: Scope, host: str | None, origin: str | None, kind: str | None) -> tuple[int, str] | None:
        if self.allowed_hosts is not None and host is not None and host_name(host) not in self.allowed_hosts and routed_path(scope) not in PROBES:
            allowed = ", ".join(sorted(self.allowed_hosts))
            return 421, f"this server does not answer to Host {host!r} (it answers to {allowed}); add the name you use to AVSEARCH_ALLOWED_HOSTS"
        if scope["method"] in SAFE_METHODS:
            return None
        if origin is not None and not same_origin(origin, host or ""):
            return 403, f"cross-site request refused: Origin {origin!r} is not this server ({host!r}); send it from the console's page or without an Origin header (curl, scripts)"
        if scope["method"] == "POST" and routed_path(scope).startswith("/v1/admin/") and kind != "application/json":
            return 415, "admin requests need 'Content-Type: application/json' (an empty body or {} will do), which a web page on another site cannot send"
        return None
