"""JSON errors for the REST routes: ``{"error": {"code", "message", ...}}``."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from server.auth import ApiKey, bearer_token


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
    token = bearer_token(request.headers.get("authorization"))
    if token is None:
        raise ApiError(
            401,
            "unauthorized",
            "send your key as 'Authorization: Bearer <key>' (create one with "
            "'tickpipe keys create --name NAME --scopes realtime')",
        )
    key = request.app.state.tp.keys.lookup(token)
    if key is None:
        raise ApiError(401, "unauthorized", "this key is unknown or revoked; ask for a new one")
    if not key.has_scope(scope):
        raise ApiError(
            403,
            "forbidden",
            f"key {key.name!r} lacks the {scope!r} scope; create a key with --scopes {scope}",
        )
    return key
