"""The MCP tools: each checks the key as REST does, calls the same functions REST answers with,
and shapes a small answer for a model (times as ISO-8601 UTC, rows bounded by ``max_rows``)."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlencode

import orjson
import polars as pl
from redis.exceptions import RedisError

from server.api.errors import ApiError
from server.api.history import (
    MAX_HISTORICAL_SYMBOLS,
    MAX_JSON_BARS,
    MEDIA,
    require_entitled,
    require_known,
    run_query,
    source_for,
)
from server.api.params import parse_time
from server.api.state import AppState
from server.api.ticks import MAX_REALTIME_SYMBOLS, latest_ticks, parse_symbols
from server.auth import ApiKey
from server.config import Settings
from server.history.query import (
    INTERVAL_NS,
    INTERVALS,
    HistoryQuery,
    HistoryReader,
    Source,
    summarize,
)
from server.history.query import find_gaps as find_history_gaps
from server.history.store import history_dir, stored_symbols
from server.mcp import contract


@dataclass(frozen=True)
class Answer:
    """What a tool returns: the structured result, the text a model reads, and the row count
    recorded in the query history."""

    data: dict[str, Any]
    text: str
    rows: int


StatusReader = Callable[[ApiKey], Awaitable[dict[str, Any]]]


class Service(Protocol):
    """What a tool reads of the MCP service that calls it (``server.mcp.server.McpService``)."""

    st: AppState
    settings: Settings
    status_for: StatusReader


Tool = Callable[[Service, ApiKey, Any], Awaitable[Answer]]


def iso(ns: int) -> str:
    """Integer ns since the epoch -> ISO-8601 UTC, to the nanosecond when it has a fraction."""
    sec, frac = divmod(ns, 10**9)
    base = dt.datetime.fromtimestamp(sec, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
    if not frac:
        return base + "Z"
    digits = f"{frac:09d}"
    while digits.endswith("000"):
        digits = digits[:-3]
    return f"{base}.{digits}Z"


def _span(ns: int) -> str:
    """A duration in words a model reads at a glance: ``2d 3h``, ``15m``, ``40s``."""
    s = ns // 10**9
    parts = []
    for unit, size in (("d", 86_400), ("h", 3600), ("m", 60), ("s", 1)):
        if s >= size:
            parts.append(f"{s // size}{unit}")
            s %= size
    return " ".join(parts[:2]) or f"{ns / 1e9:g}s"


def _json(data: dict[str, Any]) -> str:
    return orjson.dumps(data).decode()


def _range(start: str | int, end: str | int) -> tuple[int, int]:
    start_ns = parse_time("start", str(start))
    end_ns = parse_time("end", str(end))
    if start_ns >= end_ns:
        raise ApiError(
            422, "bad_parameter", "start must be before end (start is inclusive, end exclusive)"
        )
    return start_ns, end_ns


def _symbols(syms: list[str], limit: int) -> list[str]:
    return parse_symbols(",".join(syms), limit)


async def _history(svc: Service, key: ApiKey, syms: list[str], end_ns: int) -> Source:
    require_entitled(key, syms)
    await require_known(svc.st, syms)
    source, _unrecorded = await source_for(svc.st, end_ns)
    return source


# -- the tools --


async def latest(svc: Service, key: ApiKey, args: contract.LatestTicksArgs) -> Answer:
    syms = _symbols(args.symbols, MAX_REALTIME_SYMBOLS)
    require_entitled(key, syms)
    data = latest_with_times(await latest_ticks(svc.st, syms))
    return Answer(data, _json(data), len(syms))


def latest_with_times(body: dict[str, Any]) -> dict[str, Any]:
    """``latest_ticks``' answer with each event's ``time`` and the server time as ISO-8601."""
    for row in body["ticks"]:
        for kind in ("trade", "quote"):
            if row[kind] is not None:
                row[kind]["time"] = iso(row[kind]["ts"])
    return {"server_time": iso(body["server_time"]), "ticks": body["ticks"]}


def _first_rows(source: Source, q: HistoryQuery, n: int) -> pl.DataFrame:
    reader = HistoryReader(source, q)
    try:
        frames = reader.chunks(n, project=False)
        first = next(frames, None)
        frames.close()
        return first if first is not None else pl.DataFrame()
    finally:
        reader.close()


def _too_many_bars(syms: list[str], interval: str, start: int, end: int, budget: int) -> ApiError:
    per = max(1, budget // len(syms))
    coarser = [
        i
        for i in INTERVALS
        if INTERVAL_NS[i] > INTERVAL_NS[interval]
        and -(-(end - start) // INTERVAL_NS[i]) * len(syms) <= budget
    ]
    if coarser:
        advice = f"use interval {coarser[0]}, or a range of at most "
    else:
        advice = f"no interval fits this range ({per} days at 1d at most); use a range of at most "
    return ApiError(
        422,
        "range_too_large",
        f"more than {budget} bars ({len(syms)} symbol(s) x {interval} over {_span(end - start)}); "
        f"{advice}{_span(per * INTERVAL_NS[interval])} at {interval}, fewer symbols, or "
        "history_export to download them",
        suggested_interval=coarser[0] if coarser else None,
        max_range_s=per * INTERVAL_NS[interval] // 10**9,
    )


async def bars(svc: Service, key: ApiKey, args: contract.BarsArgs) -> Answer:
    syms = _symbols(args.symbols, contract.MAX_BAR_SYMBOLS)
    start, end = _range(args.start, args.end)
    budget = svc.settings.mcp_max_rows
    if -(-(end - start) // INTERVAL_NS[args.interval]) * len(syms) > MAX_JSON_BARS:
        raise _too_many_bars(syms, args.interval, start, end, budget)
    source = await _history(svc, key, syms, end)
    q = HistoryQuery(syms, start, end, interval=args.interval)
    frame = await run_query(_first_rows, source, q, budget + 1)
    if frame.height > budget:
        raise _too_many_bars(syms, args.interval, start, end, budget)
    found, _changes = await run_query(find_history_gaps, source, syms, start, end)
    columns = list(q.columns)
    rows = []
    if frame.height:
        frame = frame.select(columns).with_columns(
            pl.col("start").map_elements(iso, return_dtype=pl.Utf8)
        )
        rows = [list(r) for r in frame.rows()]
    data = {
        "interval": args.interval,
        "start": iso(start),
        "end": iso(end),
        "count": len(rows),
        "columns": columns,
        "rows": rows,
        "gaps": len(found),
    }
    return Answer(data, _json(data), len(rows))


def _num(x: object, digits: int = 6) -> str:
    return "-" if x is None else f"{x:.{digits}g}"


async def tick_summary(svc: Service, key: ApiKey, args: contract.TickSummaryArgs) -> Answer:
    [sym] = _symbols([args.symbol], 1)
    start, end = _range(args.start, args.end)
    source = await _history(svc, key, [sym], end)
    found = await run_query(summarize, source, [sym], start, end)
    gaps, changes = await run_query(find_history_gaps, source, [sym], start, end)
    s: dict[str, Any] = found.get(sym) or {"trades": 0, "quotes": 0}
    first, last = s.get("first_ts"), s.get("last_ts")
    data = {
        "sym": sym,
        "start": iso(start),
        "end": iso(end),
        "trades": s["trades"],
        "quotes": s["quotes"],
        "first_time": None if first is None else iso(first),
        "last_time": None if last is None else iso(last),
        **{k: s.get(k) for k in ("first_price", "last_price", "high", "low", "volume", "vwap")},
        "spread": {
            "mean": s.get("spread_mean"),
            "min": s.get("spread_min"),
            "max": s.get("spread_max"),
            "mean_bps": s.get("spread_bps_mean"),
        },
        "gaps": len(gaps),
        "missing": sum(g["missing"] for g in gaps),
        "epoch_changes": len(changes),
    }
    lines = [
        f"{sym} from {data['start']} to {data['end']} (UTC, end exclusive): "
        f"{data['trades']} trades, {data['quotes']} quotes.",
    ]
    if first is not None:
        lines.append(f"First tick {data['first_time']}, last tick {data['last_time']}.")
    if data["trades"]:
        lines.append(
            f"Trades: first {_num(data['first_price'])}, last {_num(data['last_price'])}, "
            f"high {_num(data['high'])}, low {_num(data['low'])}, volume {_num(data['volume'])}, "
            f"VWAP {_num(data['vwap'])}."
        )
    if data["quotes"]:
        sp = data["spread"]
        lines.append(
            f"Spread: mean {_num(sp['mean'], 4)} ({_num(sp['mean_bps'], 4)} bps of mid), "
            f"min {_num(sp['min'], 4)}, max {_num(sp['max'], 4)}."
        )
    lines.append(
        f"Gaps: {data['gaps']} ({data['missing']} seq missing); epoch changes: "
        f"{data['epoch_changes']}."
        + (" Next: bars for prices over time, history_export for every tick." if first else "")
    )
    return Answer(data, "\n".join(lines), 1)


_READ_WITH = {
    "arrow": "polars.read_ipc_stream(httpx.get(url, headers=headers, timeout=None).content)",
    "parquet": "polars.read_parquet(io.BytesIO(httpx.get(url, headers=headers, "
    "timeout=None).content))",
    "ndjson": "polars.read_ndjson(io.BytesIO(httpx.get(url, headers=headers, "
    "timeout=None).content))",
}


async def history_export(svc: Service, key: ApiKey, args: contract.HistoryExportArgs) -> Answer:
    syms = _symbols(args.symbols, MAX_HISTORICAL_SYMBOLS)
    start, end = _range(args.start, args.end)
    source = await _history(svc, key, syms, end)
    found = await run_query(summarize, source, syms, start, end)
    ticks = sum(int(s["trades"]) + int(s["quotes"]) for s in found.values())
    query = urlencode(
        {"symbols": ",".join(syms), "start": start, "end": end, "format": args.format}, safe=","
    )
    data = {
        "url": f"{svc.settings.base_url}/ticks/historical?{query}",
        "method": "GET",
        "headers": {"Authorization": "Bearer <the key this MCP session uses>"},
        "format": args.format,
        "media_type": MEDIA[args.format],
        "ticks": ticks,
        "read_with": _READ_WITH[args.format],
    }
    return Answer(data, _json(data), ticks)


async def gaps(svc: Service, key: ApiKey, args: contract.GapsArgs) -> Answer:
    syms = _symbols(args.symbols, MAX_HISTORICAL_SYMBOLS)
    start, end = _range(args.start, args.end)
    source = await _history(svc, key, syms, end)
    found, changes = await run_query(find_history_gaps, source, syms, start, end)
    budget = svc.settings.mcp_max_rows
    listed = [
        {
            "sym": g["sym"],
            "epoch": g["epoch"],
            "from_seq": g["from_seq"],
            "to_seq": g["to_seq"],
            "missing": g["missing"],
            "after": iso(g["after_ts"]),
            "before": iso(g["before_ts"]),
        }
        for g in found[:budget]
    ]
    data = {
        "count": len(found),
        "gaps": listed,
        "truncated": len(found) > budget,
        "epoch_changes": [
            {
                "sym": c["sym"],
                "from_epoch": c["from_epoch"],
                "to_epoch": c["to_epoch"],
                "at": iso(c["at_ts"]),
            }
            for c in changes[:budget]
        ],
    }
    return Answer(data, _json(data), len(listed))


async def service_status(svc: Service, key: ApiKey, _args: contract.NoArgs) -> Answer:
    data = await svc.status_for(key)
    return Answer(data, _json(data), 1)


def _last_time(*events: bytes | None) -> int | None:
    times = [orjson.loads(e)["ts"] for e in events if e]
    return max(times) if times else None


async def list_symbols(svc: Service, key: ApiKey, _args: contract.NoArgs) -> Answer:
    st = svc.st
    stored = await asyncio.to_thread(stored_symbols, history_dir(st.settings))
    try:
        live = await st.bus.known_symbols()
    except (RedisError, OSError):
        raise ApiError(
            503, "unavailable", "live data store (Redis) unreachable; retry shortly"
        ) from None
    visible = sorted(s for s in live | set(stored) if key.allows(s))
    listed = visible[: contract.MAX_SYMBOLS_LISTED]
    now = dt.datetime.now(dt.UTC).timestamp()
    try:
        latest = await st.bus.latest([s for s in listed if s in live])
    except (RedisError, OSError):
        latest = {}
    symbols = []
    for sym in listed:
        state = latest.get(sym)
        last = None if state is None else _last_time(state.trade, state.quote)
        symbols.append(
            {
                "sym": sym,
                "live": sym in live,
                "stored": sym in stored,
                "last_time": None if last is None else iso(last),
                "age_s": None if last is None else round(now - last / 1e9, 3),
                "seq": None if state is None else state.seq,
            }
        )
    data = {"count": len(visible), "symbols": symbols, "truncated": len(visible) > len(listed)}
    return Answer(data, _json(data), len(symbols))


TOOLS: dict[str, Tool] = {
    "latest_ticks": latest,
    "bars": bars,
    "tick_summary": tick_summary,
    "history_export": history_export,
    "gaps": gaps,
    "service_status": service_status,
    "list_symbols": list_symbols,
}
