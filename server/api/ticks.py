"""REST routes for ticks: ``GET /ticks/realtime`` (the latest trade and quote per symbol)."""

from __future__ import annotations

import time

import orjson
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response

from server.api.errors import ApiError, require_key
from server.ticks import is_valid_symbol

MAX_REALTIME_SYMBOLS = 200


def parse_symbols(raw: str | None, limit: int) -> list[str]:
    """``AAPL,msft`` -> ``["AAPL", "MSFT"]`` (deduplicated, in order), or a 422 saying why not."""
    if raw is None or not raw.strip():
        raise ApiError(422, "bad_parameter", "symbols is required, e.g. ?symbols=AAPL,MSFT")
    syms = list(dict.fromkeys(s.strip().upper() for s in raw.split(",") if s.strip()))
    if not syms:
        raise ApiError(422, "bad_parameter", "symbols is empty, e.g. ?symbols=AAPL,MSFT")
    bad = [s[:40] for s in syms if not is_valid_symbol(s)]
    if bad:
        raise ApiError(
            422,
            "invalid_symbol",
            "symbols are 1-32 characters of A-Z, 0-9 and . _ / - (comma-separated)",
            symbols=bad[:20],
        )
    if len(syms) > limit:
        raise ApiError(422, "too_many_symbols", f"at most {limit} symbols per request")
    return syms


def _with_age(event: bytes | None, now_ns: int) -> dict[str, object] | None:
    if event is None:
        return None
    tick = orjson.loads(event)
    tick["age_ms"] = round((now_ns - tick["ts"]) / 1e6, 3)
    return tick


async def realtime(request: Request) -> Response:
    key = require_key(request, "realtime")
    syms = parse_symbols(request.query_params.get("symbols"), MAX_REALTIME_SYMBOLS)
    denied = [s for s in syms if not key.allows(s)]
    if denied:
        raise ApiError(
            403, "not_entitled", f"key {key.name!r} may not see these symbols", symbols=denied
        )
    bus = request.app.state.tp.bus
    try:
        latest = await bus.latest(syms)
        missing = [s for s in syms if latest[s].epoch is None]
        known = await bus.are_known(missing) if missing else []
    except (RedisError, OSError):
        raise ApiError(
            503, "unavailable", "live data store (Redis) unreachable; retry shortly"
        ) from None
    unknown = [s for s, k in zip(missing, known, strict=True) if not k]
    if unknown:
        raise ApiError(404, "unknown_symbol", "no feed publishes these symbols", symbols=unknown)
    now = time.time_ns()
    body = {
        "server_time": now,
        "ticks": [
            {
                "sym": s,
                "epoch": latest[s].epoch,
                "seq": latest[s].seq,
                "trade": _with_age(latest[s].trade, now),
                "quote": _with_age(latest[s].quote, now),
            }
            for s in syms
        ],
    }
    return Response(orjson.dumps(body), media_type="application/json")
