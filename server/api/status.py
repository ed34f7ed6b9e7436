"""``GET /status`` (service status) and ``GET /metrics`` (Prometheus)."""

from __future__ import annotations

from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import Response

from server.api.errors import ApiError, require_key
from server.ops.judges import DEGRADED, UP


def _json(body: dict[str, Any], status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


async def status(request: Request) -> Response:
    """Without a key: the overall state only (a liveness check). With an admin key: every part,
    its state, reason and figures, every symbol's staleness, recent errors. 503 when down."""
    board = request.app.state.tp.status
    if request.headers.get("authorization") is None:
        summary = board.summary()
        return _json(summary, 200 if summary["status"] in (UP, DEGRADED) else 503)
    require_key(request, "admin")
    report = board.report
    if report is None:
        raise ApiError(503, "unavailable", "status is being gathered; retry in a second")
    return _json(report, 200 if report["status"] in (UP, DEGRADED) else 503)


async def metrics(request: Request) -> Response:
    require_key(request, "admin")
    st = request.app.state.tp
    return Response(generate_latest(st.metrics), media_type=CONTENT_TYPE_LATEST)


async def sources(request: Request) -> Response:
    """Every live venue source (``tickpipe feed --source``) with its state, rates, latency,
    reconnects, upstream gaps and last error, as of the last status round."""
    require_key(request, "admin")
    board = request.app.state.tp.status
    if board.report is None:
        raise ApiError(503, "unavailable", "status is being gathered; retry in a second")
    return _json({"server_time": board.report["server_time"], "sources": board.sources})
