"""JSON errors for the REST routes: ``{"error": {"code", "message", ...}}``."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from server.auth import ApiKey, KeyStore, bearer_token


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra


async def api_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse(
        {"error": {"code": exc.code, "message": exc.message, **exc.extra}},
        status_code=exc.status,
        headers=headers,
    )


def require_key(request: Request, scope: str) -> ApiKey:
    """The caller's API key, if it is valid and has ``scope``; else a 401 or 403."""
    key = key_from_header(request.app.state.tp.keys, request.headers.get("authorization"))
    return require_scope(key, scope)


def key_from_header(keys: KeyStore, header: str | None) -> ApiKey:
    """The active key an ``Authorization: Bearer <key>`` header names; else a 401 saying what to
    do (REST and the MCP endpoint)."""
    token = bearer_token(header)
    if token is None:
        raise ApiError(
            401,
            "unauthorized",
            "send your key as 'Authorization: Bearer <key>' (create one with "
            "'tickpipe keys create --name NAME --scopes realtime')",
        )
    key = keys.lookup(token)
    if key is None:
        raise ApiError(401, "unauthorized", "this key is unknown or revoked; ask for a new one")
    return key


def require_scope(key: ApiKey, scope: str) -> ApiKey:
    """``key`` if it has ``scope``; else a 403 naming the scope to ask for."""
    if not key.has_scope(scope):
        raise ApiError(
            403,
            "forbidden",
            f"key {key.name!r} lacks the {scope!r} scope; create a key with --scopes {scope}",
        )
    return key
