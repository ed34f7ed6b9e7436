"""REST routes for ticks: ``GET /ticks/realtime`` (the latest trade and quote per symbol).

Answered from the web process's last-value cache (``server.live.latest``) once a symbol is in it,
else from Redis.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response

from server.api.errors import ApiError, require_key
from server.api.state import AppState
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


def _with_age(event: str | bytes | None, now_ns: int) -> dict[str, object] | None:
    if event is None:
        return None
    tick: dict[str, Any] = orjson.loads(event)
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
    body = await latest_ticks(request.app.state.tp, syms)
    return Response(orjson.dumps(body), media_type="application/json")


async def latest_ticks(st: AppState, syms: list[str]) -> dict[str, Any]:
    """``{"server_time", "ticks": [{sym, epoch, seq, trade, quote}]}`` for symbols already checked
    against the caller's key (REST and MCP); a 404 for symbols no feed publishes, a 503 without
    Redis."""
    rows: dict[str, tuple[int | None, int, str | bytes | None, str | bytes | None]] = {
        sym: (e.epoch, e.seq, e.trade, e.quote) for sym, e in st.latest.get(syms).items()
    }
    missing = [s for s in syms if s not in rows]
    if missing:  # not in memory yet: ask Redis, and keep them in memory from now on
        try:
            latest = await st.bus.latest(missing)
            blank = [s for s in missing if latest[s].epoch is None]
            known = await st.bus.are_known(blank) if blank else []
        except (RedisError, OSError):
            raise ApiError(
                503, "unavailable", "live data store (Redis) unreachable; retry shortly"
            ) from None
        unknown = [s for s, k in zip(blank, known, strict=True) if not k]
        if unknown:
            raise ApiError(
                404, "unknown_symbol", "no feed publishes these symbols", symbols=unknown
            )
        rows.update((s, (v.epoch, v.seq, v.trade, v.quote)) for s, v in latest.items())
        st.latest.track([s for s in missing if latest[s].epoch is not None])
    now = time.time_ns()
    return {
        "server_time": now,
        "ticks": [
            {
                "sym": s,
                "epoch": rows[s][0],
                "seq": rows[s][1],
                "trade": _with_age(rows[s][2], now),
                "quote": _with_age(rows[s][3], now),
            }
            for s in syms
        ],
    }
