"""The MCP surface: tool names, descriptions written for a model, argument and result schemas,
the ``tick://`` resource and the limits. One source for ``tools/list``, for argument validation
and for ``specs/001-tick-data-pipeline/contracts/mcp.yaml`` (``python -m server.mcp.contract``
writes it; a test checks the file matches).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema

from server.api.errors import ApiError
from server.api.history import MAX_HISTORICAL_SYMBOLS
from server.api.ticks import MAX_REALTIME_SYMBOLS
from server.config import Settings
from server.history.query import INTERVALS

SERVER_NAME = "tickpipe"
RESOURCE_TEMPLATE = "tick://{symbol}/latest"
RESOURCE_PREFIX, RESOURCE_SUFFIX = "tick://", "/latest"
MAX_BAR_SYMBOLS = 50
MAX_SYMBOLS_LISTED = 1000
EXPORT_FORMATS = ("arrow", "parquet", "ndjson")

INSTRUCTIONS = (
    "tickpipe serves live and stored market ticks (trades and quotes). Every time is UTC: "
    "arguments take ISO-8601 (2026-11-26T14:30:00Z; no zone means UTC) or integer nanoseconds "
    "since the Unix epoch; answers give ISO-8601 UTC. Ranges are [start, end): start "
    "inclusive, end exclusive. Start with list_symbols; then latest_ticks for now, tick_summary "
    "to see what a range holds, bars to read it, history_export when it is too large to read "
    "here. Subscribe to tick://SYMBOL/latest to hear when a symbol trades or quotes. Errors "
    'are {"error": {"code", "message"}}; the message says what to do next.'
)

# -- arguments --

Symbol = Annotated[
    str,
    WithJsonSchema(
        {
            "type": "string",
            "minLength": 1,
            "maxLength": 32,
            "pattern": "^[A-Za-z0-9][A-Za-z0-9._/-]{0,31}$",
            "description": "a symbol as the feed names it, e.g. AAPL, BTC-USD (case-insensitive)",
        }
    ),
]
Time = Annotated[
    str | int,
    Field(
        description="ISO-8601 UTC (e.g. 2026-11-26T14:30:00Z; no zone means UTC) or integer "
        "nanoseconds since the Unix epoch"
    ),
]


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LatestTicksArgs(_Args):
    symbols: list[Symbol] = Field(min_length=1, max_length=MAX_REALTIME_SYMBOLS)


class BarsArgs(_Args):
    symbols: list[Symbol] = Field(min_length=1, max_length=MAX_BAR_SYMBOLS)
    start: Time
    end: Time
    interval: Literal["1s", "1m", "5m", "1h", "1d"] = Field(
        description="bar length: 1s, 1m, 5m, 1h or 1d"
    )


class TickSummaryArgs(_Args):
    symbol: Symbol
    start: Time
    end: Time


class HistoryExportArgs(_Args):
    symbols: list[Symbol] = Field(min_length=1, max_length=MAX_HISTORICAL_SYMBOLS)
    start: Time
    end: Time
    format: Literal["arrow", "parquet", "ndjson"] = Field(
        "arrow",
        description="arrow: Arrow IPC stream (polars.read_ipc_stream); parquet; ndjson: one "
        "JSON tick per line",
    )


class GapsArgs(_Args):
    symbols: list[Symbol] = Field(min_length=1, max_length=MAX_HISTORICAL_SYMBOLS)
    start: Time
    end: Time


class NoArgs(_Args):
    pass


# -- results (schemas only: the tools build plain dicts, checked against these by the tests) --


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class TickEvent(_Open):
    """A trade or quote as published (see the WebSocket contract), plus its age and ISO time."""

    type: Literal["trade", "quote"]
    sym: str
    seq: int
    ts: int = Field(description="event time, integer nanoseconds since the epoch, UTC")
    time: str = Field(description="ts as ISO-8601 UTC")
    age_ms: float = Field(description="milliseconds between ts and the answer")


class LatestTick(BaseModel):
    sym: str
    epoch: int | None
    seq: int = Field(description="the symbol's last sequence number (0: nothing published)")
    trade: TickEvent | None
    quote: TickEvent | None


class LatestTicksResult(BaseModel):
    server_time: str
    ticks: list[LatestTick]


class BarsResult(BaseModel):
    interval: str
    start: str
    end: str
    count: int
    columns: list[str] = Field(description="the order of each row's values")
    rows: list[list[str | float | int | None]] = Field(
        description="one bar per row: sym, start (ISO-8601 UTC), open, high, low, close, volume, "
        "vwap, trades, first_seq, last_seq"
    )
    gaps: int = Field(description="seq gaps in the range: the bars may miss ticks there")


class Spread(BaseModel):
    mean: float | None
    min: float | None
    max: float | None
    mean_bps: float | None = Field(description="mean spread in basis points of the mid")


class TickSummaryResult(BaseModel):
    sym: str
    start: str
    end: str
    trades: int
    quotes: int
    first_time: str | None
    last_time: str | None
    first_price: float | None
    last_price: float | None
    high: float | None
    low: float | None
    volume: float | None
    vwap: float | None
    spread: Spread
    gaps: int
    missing: int = Field(description="seq numbers missing in those gaps")
    epoch_changes: int


class HistoryExportResult(BaseModel):
    url: str
    method: Literal["GET"]
    headers: dict[str, str]
    format: str
    media_type: str
    ticks: int = Field(description="trades and quotes in the range (stored and not yet stored)")
    read_with: str = Field(description="how to load it in Python")


class Gap(BaseModel):
    sym: str
    epoch: int
    from_seq: int
    to_seq: int
    missing: int
    after: str = Field(description="time of the last tick before the gap, ISO-8601 UTC")
    before: str = Field(description="time of the first tick after the gap, ISO-8601 UTC")


class EpochChange(BaseModel):
    sym: str
    from_epoch: int | None
    to_epoch: int
    at: str


class GapsResult(BaseModel):
    count: int
    gaps: list[Gap]
    truncated: bool = Field(description="true when count is more than the gaps listed")
    epoch_changes: list[EpochChange]


class ServiceStatusResult(_Open):
    status: Literal["up", "degraded", "down"]


class SymbolActivity(BaseModel):
    sym: str
    live: bool = Field(description="a feed publishes it (latest_ticks and tick:// work)")
    stored: bool = Field(description="history holds it (bars, tick_summary, export work)")
    last_time: str | None = Field(description="time of its latest tick, ISO-8601 UTC")
    age_s: float | None
    seq: int | None


class ListSymbolsResult(BaseModel):
    count: int
    symbols: list[SymbolActivity]
    truncated: bool


@dataclass(frozen=True)
class ToolSpec:
    name: str
    title: str
    description: str
    args: type[_Args]
    result: type[BaseModel]
    scope: str | None  # the scope a key needs (None: any valid key)
    read_only: bool = True


def tools(max_rows: int) -> dict[str, ToolSpec]:
    """Every tool, by name, for a server that answers at most ``max_rows`` rows inline."""
    specs = [
        ToolSpec(
            "latest_ticks",
            "Latest trade and quote",
            "The latest trade and quote of each symbol as the live feed published them, with "
            "age_ms (milliseconds since the tick). ts is integer nanoseconds since the epoch, "
            "time the same as ISO-8601 UTC; seq numbers every event of a symbol. Up to "
            f"{MAX_REALTIME_SYMBOLS} symbols; call list_symbols first if you do not know the "
            "names. To follow a symbol, subscribe to the resource tick://SYMBOL/latest instead "
            "of calling this in a loop. Needs the realtime scope.",
            LatestTicksArgs,
            LatestTicksResult,
            "realtime",
        ),
        ToolSpec(
            "bars",
            "OHLCV bars",
            "Open, high, low, close, volume, VWAP and trade count per symbol and interval, "
            "from trades in [start, end) (start inclusive, end exclusive, UTC). A bar's start "
            "is the UTC start of its interval; intervals without trades are left out. Answers "
            f"at most {max_rows} bars: past that it says so and suggests a coarser interval or "
            "a shorter range (use history_export for more). Check tick_summary first when you "
            f"do not know how busy a range is. Up to {MAX_BAR_SYMBOLS} symbols. Needs the "
            "historical scope.",
            BarsArgs,
            BarsResult,
            "historical",
        ),
        ToolSpec(
            "tick_summary",
            "What a range holds",
            "A few lines about one symbol's ticks in [start, end) instead of the ticks: trade "
            "and quote counts, first and last tick time, first/last/high/low trade price, "
            "volume, VWAP, quote spread (mean, min, max; mean in basis points of the mid) and "
            "seq gaps. Prices are in the symbol's quote currency. Use it before bars or "
            "history_export. Needs the historical scope.",
            TickSummaryArgs,
            TickSummaryResult,
            "historical",
        ),
        ToolSpec(
            "history_export",
            "Export URL for a large range",
            "For a range too large to read here: the URL of tickpipe's REST export of the "
            "ticks in [start, end), for your code (not this conversation) to download with the "
            "same key in the header 'Authorization: Bearer <key>'. format: arrow (Arrow IPC "
            "stream, polars.read_ipc_stream), parquet, or ndjson (one JSON tick per line). "
            "Says how many ticks the range holds. Needs the historical scope.",
            HistoryExportArgs,
            HistoryExportResult,
            "historical",
        ),
        ToolSpec(
            "gaps",
            "Missing ticks",
            "Holes in stored sequence numbers (ticks published but missing from history) per "
            "symbol and epoch in [start, end), and epoch changes (the feed restarted its "
            f"numbering). Lists at most {max_rows} gaps; count is the total. Needs the "
            "historical scope.",
            GapsArgs,
            GapsResult,
            "historical",
        ),
        ToolSpec(
            "service_status",
            "Service status",
            "Whether tickpipe is up, degraded or down. With an admin key, every part (Redis, "
            "each feed, the recorder, each web process) with its state, reason and figures, "
            "each symbol's staleness, tick rates and recent errors; with other keys, the "
            "overall state only.",
            NoArgs,
            ServiceStatusResult,
            None,
        ),
        ToolSpec(
            "list_symbols",
            "Symbols you may see",
            "The symbols this key may see: those a live feed publishes, with the time and age "
            "(seconds) of their latest tick and its seq, and those only in stored history. "
            f"Call it first to learn valid names. At most {MAX_SYMBOLS_LISTED}.",
            NoArgs,
            ListSymbolsResult,
            None,
        ),
    ]
    return {s.name: s for s in specs}


def input_schema(spec: ToolSpec) -> dict[str, Any]:
    return inline_refs(spec.args.model_json_schema())


def output_schema(spec: ToolSpec) -> dict[str, Any]:
    return inline_refs(spec.result.model_json_schema())


def inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema with every ``#/$defs/...`` reference replaced by its definition: MCP hosts
    and the 2025 protocol revision expect self-contained tool schemas."""
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                rest = {k: v for k, v in node.items() if k != "$ref"}
                return walk({**defs[ref.removeprefix("#/$defs/")], **rest})
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    inlined: dict[str, Any] = walk(schema)
    return inlined


def parse_args(spec: ToolSpec, arguments: dict[str, Any]) -> Any:
    """The tool's validated arguments, or a 422 ``bad_parameter`` naming each wrong one."""
    try:
        return spec.args.model_validate(arguments)
    except ValidationError as exc:
        problems = []
        for err in exc.errors()[:5]:
            where = ".".join(str(p) for p in err["loc"]) or "arguments"
            what = "unknown argument" if err["type"] == "extra_forbidden" else err["msg"]
            problems.append(f"{where}: {what}")
        raise ApiError(
            422,
            "bad_parameter",
            f"{'; '.join(problems)}; {spec.name} takes "
            f"{', '.join(spec.args.model_fields) or 'no arguments'} (see tools/list)",
        ) from None


ERROR_CODES = {
    "unauthorized": "401: no key, or a key unknown or revoked (HTTP: the request is refused)",
    "key_revoked": "the key was revoked during the session (stdio); subscriptions end",
    "forbidden": "403: the key lacks the scope the tool needs",
    "not_entitled": "403: the key may not see these symbols",
    "unknown_symbol": "404: no feed publishes and no import stored these symbols",
    "bad_parameter": "422: an argument is missing, unknown or malformed",
    "invalid_symbol": "422: not a symbol (1-32 of A-Z, 0-9 and . _ / -)",
    "too_many_symbols": "422: more symbols than the tool takes",
    "range_too_large": "422: more rows than answered inline; coarser interval, shorter range "
    "or history_export",
    "corrupt_history": "500: a stored file cannot be read; other dates still answer",
    "unavailable": "503: Redis or the web process is unreachable; retry shortly",
    "internal_error": "500: a bug; retry, and tell the operator if it persists",
}


def document() -> dict[str, Any]:
    """The MCP contract as data (``contracts/mcp.yaml``), with the default settings."""
    fields = Settings.model_fields
    max_rows, throttle_ms = fields["mcp_max_rows"].default, fields["mcp_throttle_ms"].default
    return {
        "server": SERVER_NAME,
        "transports": {
            "streamable-http": "POST/GET/DELETE /mcp on the web process; header "
            "'Authorization: Bearer <key>'; protocol 2026-07-28 and the 2025 handshake revisions",
            "stdio": "`tickpipe mcp` with the key in TICKPIPE_KEY",
        },
        "instructions": INSTRUCTIONS,
        "limits": {
            "max_rows": max_rows,
            "max_bar_symbols": MAX_BAR_SYMBOLS,
            "max_latest_symbols": MAX_REALTIME_SYMBOLS,
            "max_history_symbols": MAX_HISTORICAL_SYMBOLS,
            "max_symbols_listed": MAX_SYMBOLS_LISTED,
            "intervals": list(INTERVALS),
            "export_formats": list(EXPORT_FORMATS),
            "notification_throttle_ms": throttle_ms,
        },
        "tools": [
            {
                "name": spec.name,
                "title": spec.title,
                "scope": spec.scope,
                "description": spec.description,
                "inputSchema": input_schema(spec),
                "outputSchema": output_schema(spec),
            }
            for spec in tools(max_rows).values()
        ],
        "resources": [
            {
                "uriTemplate": RESOURCE_TEMPLATE,
                "mimeType": "application/json",
                "scope": "realtime",
                "content": "one entry of latest_ticks: sym, epoch, seq, trade, quote",
                "subscribe": "resources/subscribe (2025 revisions) or subscriptions/listen "
                "(2026-07-28); notifications/resources/updated at most every "
                f"{throttle_ms} ms per subscriber while the symbol ticks; then read it again",
            }
        ],
        "errors": {
            "tool": 'a tool result with isError true and text {"error": {"code", "message", '
            "...}}, the same codes and messages as REST",
            "request": "resources/read, subscribe and listen: a JSON-RPC error whose data.code "
            "is the tickpipe code",
            "codes": ERROR_CODES,
        },
        "query_history": "every call is in GET /queries with endpoint mcp:<tool> (or "
        "mcp:resources/read, mcp:resources/subscribe, mcp:resources/unsubscribe, "
        "mcp:subscriptions/listen)",
    }


def main() -> None:
    import yaml

    sys.stdout.write(
        "# Generated by `python -m server.mcp.contract`; tests/test_mcp.py checks it matches.\n"
    )
    yaml.safe_dump(document(), sys.stdout, sort_keys=False, width=100, allow_unicode=True)


if __name__ == "__main__":
    main()
