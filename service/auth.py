"""Optional API keys: ``Authorization: Bearer <key>``; a read-write key and an optional read-only one.

No key configured: every route is open. Missing or malformed header: 401. A key that is not
accepted here (unknown, or the read-only key on a write route): 403.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

bearer = HTTPBearer(auto_error=False, description="AVSEARCH_API_KEY (read-write) or AVSEARCH_READ_API_KEY (read-only)")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def _matches(given: str, key) -> bool:
    return key is not None and hmac.compare_digest(given.encode(), key.get_secret_value().encode())


def _check(request: Request, credentials: HTTPAuthorizationCredentials | None, write: bool) -> None:
    settings = request.app.state.avsearch.settings
    if settings.api_key is None:
        return
    if credentials is None:
        raise HTTPException(401, "missing API key: send the header 'Authorization: Bearer <key>'", headers={"WWW-Authenticate": "Bearer"})
    if _matches(credentials.credentials, settings.api_key):
        return
    if _matches(credentials.credentials, settings.read_api_key):
        if not write:
            return
        raise HTTPException(403, "this key is read-only; changes need the read-write key (AVSEARCH_API_KEY)")
    raise HTTPException(403, "API key not accepted; check the key you send")


async def require_read(request: Request, credentials: Credentials) -> None:
    _check(request, credentials, write=False)


async def require_write(request: Request, credentials: Credentials) -> None:
    _check(request, credentials, write=True)
