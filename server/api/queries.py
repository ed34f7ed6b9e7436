"""Query history over HTTP: the middleware that records every ``/ticks/*`` request in the
process's ``QueryLog`` (``server.ops.queries``) and ``GET /queries``, which reads it back."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import require_key
from server.api.params import parse_int
from server.auth import bearer_token
from server.ops.queries import QueryLog

MAX_LIMIT = 10_000
LINE_MEDIA = (b"application/x-ndjson", b"text/csv")
# Scope key where an endpoint that knows how many rows it sends keeps a ``RowCount``, so the
# recorder need not count the lines of the body.
ROWS = "tickpipe.rows"


@dataclass
class RowCount:
    n: int = 0


class QueryRecorder:
    """ASGI middleware: records every ``/ticks/*`` request's status, body bytes and duration."""

    def __init__(self, app: ASGIApp, prefix: str = "/ticks/") -> None:
        self.app = app
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        ts = time.time_ns()
        t0 = time.perf_counter()
        status = 500
        nbytes = 0
        lines: int | None = None  # counted for line-per-row formats only

        async def counting_send(message: Message) -> None:
            nonlocal status, nbytes, lines
            if message["type"] == "http.response.start":
                status = message["status"]
                media = dict(message.get("headers", ())).get(b"content-type", b"")
                counted = ROWS in scope
                if status == 200 and media.split(b";")[0] in LINE_MEDIA and not counted:
                    lines = -1 if media.startswith(b"text/csv") else 0  # CSV: minus the header
            elif message["type"] == "http.response.body":
                body = message.get("body", b"")
                nbytes += len(body)
                if lines is not None:
                    lines += body.count(b"\n")
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            with contextlib.suppress(Exception):  # recording must never fail a request
                ms = (time.perf_counter() - t0) * 1000
                if ROWS in scope and status == 200:
                    lines = scope[ROWS].n
                self._record(
                    scope, ts, status, nbytes, None if lines is None else max(0, lines), ms
                )

    def _record(
        self, scope: Scope, ts: int, status: int, nbytes: int, rows: int | None, ms: float
    ) -> None:
        st = scope["app"].state.tp
        token = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                token = bearer_token(value.decode("latin-1"))
                break
        key = st.keys.lookup(token) if token else None
        st.queries.record(
            key.name if key is not None else None,
            scope["path"],
            scope.get("query_string", b"").decode("latin-1"),
            rows,
            nbytes,
            ms,
            str(status),
            ts,
        )


async def queries_endpoint(request: Request) -> Response:
    """``GET /queries?key=&limit=100``: the query history, newest first (admin scope)."""
    require_key(request, "admin")
    limit = parse_int("limit", request.query_params.get("limit"), 100, 1, MAX_LIMIT)
    key = request.query_params.get("key") or None
    log_: QueryLog = request.app.state.tp.queries
    return JSONResponse({"queries": await log_.recent(key, limit)})
