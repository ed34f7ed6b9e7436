"""The bare Starlette app ``bench/overhead.py`` measures tickpipe's web process against.

One route that answers what ``GET /ticks/realtime`` answers (the same JSON body, read from the
file ``BARE_BODY`` names, re-encoded with orjson on each request) and one WebSocket endpoint
that accepts and then only waits: what any Starlette app pays per request and per idle socket,
with nothing of tickpipe (no keys, no Redis, no middleware).

Run: ``uvicorn --factory bench.bare_app:create_app`` with ``BARE_BODY`` set.
"""

from __future__ import annotations

import os

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect


def create_app() -> Starlette:
    with open(os.environ["BARE_BODY"], "rb") as fh:
        body = orjson.loads(fh.read())

    async def realtime(request: Request) -> Response:
        request.query_params.get("symbols")
        return Response(orjson.dumps(body), media_type="application/json")

    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        try:
            while True:
                await websocket.receive_text()
        except WebSocketDisconnect:
            pass

    return Starlette(routes=[Route("/ticks/realtime", realtime), WebSocketRoute("/ws", ws)])
