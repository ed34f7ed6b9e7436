"""Vendor tick files in, tickpipe tick frames out: pure parsing with Polars, no Redis, no server.

Every format goes through the same three steps, all vectorised:

1. ``_source``: the file's bytes (zip and gz read directly) split into lines, each with its 1-based
   line number and raw text. CRLF endings, a UTF-8 BOM and a last line without newline are fine.
2. A per-format parser turns the lines into the tick columns (``sym``, ``type``, ``ts``, ...) plus a
   ``reason`` for rows that are malformed in a format-specific way (wrong field count, flagged
   suspicious by the vendor, ...).
3. ``_split``: the checks every tick passes (the rules of ``server.ticks.reject_reason``) and the
   split into ``ticks`` (sorted by ``ts``, stable) and ``rejects`` (``line``, ``reason``, ``raw``).

Bad rows never raise. Non-UTF-8 bytes reject the row they are on (reason ``bad_encoding``); the
rest of the file still imports. A wrong format name, a header that is not the format's header or a
missing date/symbol that the file does not carry raise ``ValueError`` with what to do next.
"""

from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import io
import math
import re
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import orjson
import polars as pl
from pydantic import BaseModel, ConfigDict, model_validator

from server.ticks import MAX_TS_NS, MIN_TS_NS, SYMBOL_RE

# Ticks as a table (what files become; the recorder adds epoch and seq): one row per trade or quote.
TICK_SCHEMA: dict[str, pl.DataType] = {
    "sym": pl.Utf8(),
    "type": pl.Utf8(),
    "ts": pl.Datetime("ns", "UTC"),
    "price": pl.Float64(),
    "size": pl.Float64(),
    "side": pl.Utf8(),
    "bid": pl.Float64(),
    "bid_size": pl.Float64(),
    "ask": pl.Float64(),
    "ask_size": pl.Float64(),
    "venue": pl.Utf8(),
    "crossed": pl.Boolean(),
}

FORMATS = ("tardis-trades", "tardis-quotes", "histdata", "lobster", "lean", "csv")

REJECT_SCHEMA: dict[str, pl.DataType] = {"line": pl.Int64(), "reason": pl.Utf8(), "raw": pl.Utf8()}

NEW_YORK = "America/New_York"
# HistData quotes are in EST all year (no DST). POSIX zone names invert the sign: GMT+5 is UTC-5.
HISTDATA_TZ = "Etc/GMT+5"
PRICE_SCALE_1E4 = 10_000.0

# The header lines of Tardis.dev CSV downloads, exactly. Quotes list the ask before the bid.
TARDIS_TRADES_HEADER = "exchange,symbol,timestamp,local_timestamp,id,side,price,amount"
TARDIS_QUOTES_HEADER = (
    "exchange,symbol,timestamp,local_timestamp,ask_amount,ask_price,bid_price,bid_amount"
)
LOBSTER_FIELDS = ("time", "type", "order_id", "size", "price", "direction")
LOBSTER_NAME_RE = re.compile(
    r"^(?P<sym>[A-Za-z0-9.]+)_(?P<date>\d{4}-\d{2}-\d{2})_\d+_\d+_message_\d+\.csv$"
)
LOBSTER_EXECUTIONS = (4, 5)
LOBSTER_BOOK_EVENTS = (1, 2, 3, 6, 7)
LEAN_TRADE_FIELDS = ("time", "price", "size", "exchange", "condition", "suspicious")
LEAN_QUOTE_FIELDS = (
    *("time", "bid", "bid_size", "ask", "ask_size"),
    *("exchange", "condition", "suspicious"),
)
LEAN_NAME_RE = re.compile(
    r"^(?P<date>\d{8})_(?P<sym>[a-z0-9._-]+)_(?P<kind>trade|quote)_tick\.csv$", re.IGNORECASE
)
HISTDATA_FIELDS = ("time", "bid", "ask", "volume")
FILE_PREFIX = "file:"

# Sides as vendors spell them; anything else (except empty/unknown, which mean "not given") rejects.
SIDE_WORDS = {"buy": "buy", "b": "buy", "sell": "sell", "s": "sell"}
NO_SIDE_WORDS = ("", "unknown", "none", "null")

TimeUnit = Literal["s", "ms", "us", "ns"]
# Digits after the decimal point that still fit in integer ns, per unit.
UNIT_DIGITS: dict[str, int] = {"s": 9, "ms": 6, "us": 3, "ns": 0}


class Mapping(BaseModel):
    """How to read a CSV or Parquet file in a layout tickpipe has no named format for.

    Name the time column and either its epoch ``time_unit`` or a strptime ``time_format``; with
    neither, ISO-8601 text is expected (``2024-01-02T10:00:00.5Z``, ``2024-01-02 10:00:00``).
    Times without an offset are read in ``timezone``; times with one are converted to UTC.
    Prices (``price``, ``bid``, ``ask``) are divided by ``price_scale``. The symbol comes from
    ``symbol_column`` or the fixed ``symbol``. Rows with a ``price`` value are trades; rows
    without, when ``bid``/``ask`` are mapped, are quotes.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    time: str
    time_unit: TimeUnit | None = None
    time_format: str | None = None
    timezone: str = "UTC"
    price_scale: float = 1.0
    symbol_column: str | None = None
    symbol: str | None = None
    price: str | None = None
    size: str | None = None
    side: str | None = None
    bid: str | None = None
    bid_size: str | None = None
    ask: str | None = None
    ask_size: str | None = None
    venue: str | None = None
    separator: str = ","

    @model_validator(mode="after")
    def _consistent(self) -> Mapping:
        if self.time_unit is not None and self.time_format is not None:
            raise ValueError("give time_unit (epoch numbers) or time_format (text), not both")
        if self.price is None and self.bid is None and self.ask is None:
            raise ValueError("map at least one of price (trades) or bid/ask (quotes)")
        if not self.price_scale > 0:
            raise ValueError("price_scale must be positive")
        return self

    def columns(self) -> dict[str, str]:
        """Tick field -> file column, for every field this mapping names."""
        fields = ("price", "size", "side", "bid", "bid_size", "ask", "ask_size", "venue")
        named = {f: getattr(self, f) for f in fields if getattr(self, f) is not None}
        named["time"] = self.time
        if self.symbol_column is not None:
            named["sym"] = self.symbol_column
        return named


@dataclass(frozen=True, slots=True)
class ImportResult:
    """The ticks of one file and the rows that could not become ticks.

    ``read`` counts data rows (header and blank lines excluded); ``skipped`` counts rows that are
    valid but are not ticks (LOBSTER order-book events), so ``read == len(ticks) + len(rejects) +
    skipped``.
    """

    ticks: pl.DataFrame
    rejects: pl.DataFrame
    read: int
    skipped: int = 0


def read_file(
    path: Path,
    fmt: str,
    *,
    symbol: str | None = None,
    mapping: Mapping | None = None,
    date: dt.date | None = None,
) -> ImportResult:
    """Parse one vendor file (plain, ``.gz`` or ``.zip``) into ticks and rejects.

    ``symbol`` names the instrument for files that do not carry one (HistData, LOBSTER, Lean, a
    mapping without a symbol column); ``date`` gives the session date of LOBSTER files whose name
    does not carry it. ``mapping`` is required for ``fmt="csv"`` (which also reads Parquet).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown import format {fmt!r}; valid formats: {', '.join(FORMATS)}")
    data, name = _load(Path(path))
    if fmt == "csv":
        if mapping is None:
            raise ValueError("format 'csv' needs a Mapping: which column is the time, price, ...")
        if data[:4] == b"PAR1":
            frame = _parse_parquet(data, mapping, symbol)
            return _split(frame, read=frame.height)
        lines = _lines(data)
        frame = _parse_mapped_csv(lines, mapping, symbol)
        return _split(frame, read=lines.height - 1)
    lines = _lines(data)
    if fmt == "tardis-trades":
        frame = _parse_tardis(lines, TARDIS_TRADES_HEADER, quotes=False)
        return _split(frame, read=lines.height - 1)
    if fmt == "tardis-quotes":
        frame = _parse_tardis(lines, TARDIS_QUOTES_HEADER, quotes=True)
        return _split(frame, read=lines.height - 1)
    if fmt == "histdata":
        return _split(_parse_histdata(lines, _need_symbol(symbol, fmt)), read=lines.height)
    if fmt == "lobster":
        frame = _parse_lobster(lines, name, symbol, date)
        return _split(frame, read=lines.height, skipped=lines.height - frame.height)
    return _split(_parse_lean(lines, name, symbol), read=lines.height)


# ---------------------------------------------------------------------------------------------
# Bytes and lines


def _load(path: Path) -> tuple[bytes, str]:
    """The file's decompressed bytes and the name of the CSV they came from (a zip member's)."""
    with path.open("rb") as f:
        magic = f.read(4)
    if magic == b"PK\x03\x04":
        with zipfile.ZipFile(path) as z:
            members = [i for i in z.infolist() if not i.is_dir()]
            csvs = [i for i in members if i.filename.lower().endswith(".csv")] or members
            if not csvs:
                raise ValueError(f"{path.name}: the zip archive is empty")
            member = csvs[0]
            return z.read(member), Path(member.filename).name
    if magic[:2] == b"\x1f\x8b":
        with gzip.open(path, "rb") as g:
            return g.read(), path.name.removesuffix(".gz")
    return path.read_bytes(), path.name


def _lines(data: bytes) -> pl.DataFrame:
    """Non-blank lines as ``line`` (1-based number in the file) and ``raw`` (text, no line end).

    Undecodable bytes become U+FFFD so the row can be rejected with its line number.
    """
    text = data.decode("utf-8", errors="replace").removeprefix("\ufeff")
    return (
        pl.DataFrame({"raw": [text]})
        .select(pl.col("raw").str.split("\n"))
        .explode("raw")
        .with_row_index("line", offset=1)
        .with_columns(pl.col("line").cast(pl.Int64), pl.col("raw").str.strip_suffix("\r"))
        .filter(pl.col("raw").str.strip_chars() != "")
    )


def _fields(lines: pl.DataFrame, names: tuple[str, ...], separator: str = ",") -> pl.DataFrame:
    """Split each line into ``names`` (stripped text), plus a ``reason`` for rows that cannot be
    trusted at all: undecodable bytes, or a field count that is not the format's (truncated)."""
    parts = pl.col("raw").str.split(separator)
    n = len(names)
    return lines.with_columns(
        *[
            parts.list.get(i, null_on_oob=True).str.strip_chars().str.strip_chars('"').alias(name)
            for i, name in enumerate(names)
        ],
        reason=pl.when(pl.col("raw").str.contains("\ufffd", literal=True))
        .then(pl.lit("bad_encoding: invalid UTF-8 bytes"))
        .when(parts.list.len() != n)
        .then(
            pl.format(
                "bad_row: expected {} fields, got {} (truncated?)", pl.lit(n), parts.list.len()
            )
        ),
    )


def _header(lines: pl.DataFrame, fmt: str, separator: str = ",") -> tuple[list[str], pl.DataFrame]:
    """The header's column names and the data lines after it."""
    if lines.height == 0:
        raise ValueError(f"the file is empty; a {fmt} file starts with a header line")
    first = lines.row(0, named=True)["raw"]
    names = [c.strip().strip('"') for c in first.split(separator)]
    return names, lines.slice(1)


# ---------------------------------------------------------------------------------------------
# Field parsing (expressions)


def _num(col: str) -> pl.Expr:
    return pl.col(col).cast(pl.Float64, strict=False)


def _unscale(value: pl.Expr, scale: float) -> pl.Expr:
    """``value / scale``, rounded back to the decimals a power-of-ten scale implies.

    Polars divides by a constant as a multiplication by its reciprocal (5859100 / 10000 gives
    585.9100000000001); rounding restores the correctly rounded price.
    """
    if scale == 1.0:
        return value
    digits = math.log10(scale)
    if digits != int(digits):
        return value / scale
    return (value / scale).round(int(digits) + 4)


def _decimal_ns(col: str | pl.Expr, unit: str) -> pl.Expr:
    """A decimal count of ``unit`` (``"34200.004241176"`` seconds) as exact integer ns.

    Parsed as text, not float, so nanosecond digits survive.
    """
    text = pl.col(col) if isinstance(col, str) else col
    digits = UNIT_DIGITS[unit]
    parts = text.cast(pl.Utf8).str.split_exact(".", 1)
    whole = parts.struct.field("field_0").cast(pl.Int64, strict=False)
    frac = parts.struct.field("field_1")
    ns = whole * 10**digits
    if digits:
        frac_ns = frac.fill_null("").str.pad_end(digits, "0").str.slice(0, digits)
        ns = ns + frac_ns.cast(pl.Int64, strict=False)
    # Too many sub-ns digits are truncated; non-digits after the dot make the whole value null.
    valid_frac = frac.is_null() | frac.str.contains(r"^[0-9]*$")
    return pl.when(valid_frac).then(ns)


def _epoch_ts(ns: pl.Expr) -> pl.Expr:
    """Integer ns since the epoch as a UTC timestamp; null outside tickpipe's 2000-2100 window."""
    in_range = ns.is_between(MIN_TS_NS, MAX_TS_NS, closed="left")
    return pl.from_epoch(pl.when(in_range).then(ns), time_unit="ns").dt.replace_time_zone("UTC")


def _local_ts(naive: pl.Expr, tz: str) -> pl.Expr:
    """A wall-clock time in ``tz`` as UTC; times that do not exist (DST gap) become null."""
    return naive.dt.replace_time_zone(
        tz, ambiguous="earliest", non_existent="null"
    ).dt.convert_time_zone("UTC")


def _since_midnight_ts(col: str, unit: str, day: dt.date, tz: str) -> pl.Expr:
    """``unit`` after local midnight of ``day`` in ``tz`` (LOBSTER, Lean) as a UTC timestamp."""
    day_ns = (
        (dt.datetime(day.year, day.month, day.day) - dt.datetime(1970, 1, 1))
        // dt.timedelta(microseconds=1)
        * 1000
    )
    since = _decimal_ns(col, unit)
    naive = pl.from_epoch(pl.when(since >= 0).then(since + day_ns), time_unit="ns")
    return _local_ts(naive, tz)


def _side(col: str) -> pl.Expr:
    """Vendor side words as ``buy``/``sell``; "not given" as null; anything else as ``?``."""
    word = pl.col(col).str.to_lowercase()
    return (
        pl.when(word.is_null() | word.is_in(NO_SIDE_WORDS))
        .then(None)
        .otherwise(word.replace_strict(SIDE_WORDS, default="?"))
    )


def _trade_columns() -> list[pl.Expr]:
    return [
        pl.lit("trade").alias("type"),
        *[pl.lit(None, pl.Float64).alias(c) for c in ("bid", "bid_size", "ask", "ask_size")],
    ]


def _quote_columns() -> list[pl.Expr]:
    return [
        pl.lit("quote").alias("type"),
        pl.lit(None, pl.Float64).alias("price"),
        pl.lit(None, pl.Float64).alias("size"),
        pl.lit(None, pl.Utf8).alias("side"),
    ]


# ---------------------------------------------------------------------------------------------
# Formats


def _parse_tardis(lines: pl.DataFrame, expected: str, *, quotes: bool) -> pl.DataFrame:
    fmt = "tardis-quotes" if quotes else "tardis-trades"
    header, rows = _header(lines, fmt)
    if ",".join(header) != expected:
        raise ValueError(
            f"the header {','.join(header)!r} is not the Tardis.dev {fmt} header {expected!r}; "
            "check the format name"
        )
    frame = _fields(rows, tuple(header)).with_columns(
        sym=pl.col("symbol"),
        venue=pl.col("exchange"),
        ts=_epoch_ts(_decimal_ns("timestamp", "us")),
    )
    if quotes:
        return frame.with_columns(
            *_quote_columns(),
            bid=_num("bid_price"),
            bid_size=_num("bid_amount"),
            ask=_num("ask_price"),
            ask_size=_num("ask_amount"),
        )
    return frame.with_columns(
        *_trade_columns(), price=_num("price"), size=_num("amount"), side=_side("side")
    )


def _parse_histdata(lines: pl.DataFrame, symbol: str) -> pl.DataFrame:
    # Volume is 0 on every HistData tick row, and is not a per-side size: sizes stay null.
    naive = pl.col("time").str.strptime(pl.Datetime("ns"), "%Y%m%d %H%M%S%3f", strict=False)
    return _fields(lines, HISTDATA_FIELDS).with_columns(
        *_quote_columns(),
        sym=pl.lit(symbol),
        venue=pl.lit(None, pl.Utf8),
        ts=_local_ts(naive, HISTDATA_TZ),
        bid=_num("bid"),
        ask=_num("ask"),
        bid_size=pl.lit(None, pl.Float64),
        ask_size=pl.lit(None, pl.Float64),
    )


def _parse_lobster(
    lines: pl.DataFrame, name: str, symbol: str | None, date: dt.date | None
) -> pl.DataFrame:
    named = LOBSTER_NAME_RE.match(name)
    if named is not None:
        symbol = symbol or named["sym"]
        date = date or dt.date.fromisoformat(named["date"])
    if symbol is None or date is None:
        raise ValueError(
            f"{name}: a LOBSTER message file does not carry its symbol and date; pass symbol= and "
            "date=, or keep the LOBSTER name TICKER_YYYY-MM-DD_34200000_57600000_message_N.csv"
        )
    event = pl.col("type").cast(pl.Int64, strict=False)
    # direction is the side of the resting limit order that was hit; the aggressor is the other.
    side = (
        pl.when(pl.col("direction") == "1")
        .then(pl.lit("sell"))
        .when(pl.col("direction") == "-1")
        .then(pl.lit("buy"))
        .otherwise(pl.lit("?"))
    )
    return (
        _fields(lines, LOBSTER_FIELDS)
        # Order-book events (submissions, cancels, deletes, cross trades, halts) are not ticks.
        .filter(pl.col("reason").is_not_null() | ~event.is_in(LOBSTER_BOOK_EVENTS))
        .with_columns(
            *_trade_columns(),
            reason=pl.coalesce(
                "reason",
                pl.when(~event.is_in(LOBSTER_EXECUTIONS)).then(
                    pl.format("bad_row: unknown LOBSTER event type {}", pl.col("type"))
                ),
            ),
            sym=pl.lit(symbol),
            venue=pl.lit(None, pl.Utf8),
            ts=_since_midnight_ts("time", "s", date, NEW_YORK),
            price=_unscale(_num("price"), PRICE_SCALE_1E4),
            size=_num("size"),
            side=side,
        )
    )


def _parse_lean(lines: pl.DataFrame, name: str, symbol: str | None) -> pl.DataFrame:
    named = LEAN_NAME_RE.match(name)
    if named is None:
        raise ValueError(
            f"{name!r} is not a Lean tick file name; expected YYYYMMDD_symbol_Trade_Tick.csv or "
            "YYYYMMDD_symbol_Quote_Tick.csv (inside YYYYMMDD_trade.zip / YYYYMMDD_quote.zip)"
        )
    day = dt.datetime.strptime(named["date"], "%Y%m%d").date()
    symbol = symbol or named["sym"]
    quotes = named["kind"].lower() == "quote"
    fields = _fields(lines, LEAN_QUOTE_FIELDS if quotes else LEAN_TRADE_FIELDS)
    common = {
        "reason": pl.coalesce(
            "reason",
            pl.when(pl.col("suspicious").str.to_lowercase().is_in(["1", "true"])).then(
                pl.lit("suspicious: flagged by the vendor")
            ),
        ),
        "sym": pl.lit(symbol),
        "venue": pl.col("exchange"),
        "ts": _since_midnight_ts("time", "ms", day, NEW_YORK),
    }
    if not quotes:
        return fields.with_columns(
            *_trade_columns(),
            **common,
            price=_unscale(_num("price"), PRICE_SCALE_1E4),
            size=_num("size"),
            side=pl.lit(None, pl.Utf8),
        )

    # A zero price or size on one side means that side is absent from the quote.
    def side_present(price: str, size: str) -> pl.Expr:
        return (_num(price) != 0) & (_num(size) != 0)

    bid_ok, ask_ok = side_present("bid", "bid_size"), side_present("ask", "ask_size")
    return fields.with_columns(
        *_quote_columns(),
        **common,
        bid=pl.when(bid_ok).then(_unscale(_num("bid"), PRICE_SCALE_1E4)),
        bid_size=pl.when(bid_ok).then(_num("bid_size")),
        ask=pl.when(ask_ok).then(_unscale(_num("ask"), PRICE_SCALE_1E4)),
        ask_size=pl.when(ask_ok).then(_num("ask_size")),
    )


def _parse_mapped_csv(lines: pl.DataFrame, mapping: Mapping, symbol: str | None) -> pl.DataFrame:
    header, rows = _header(lines, "csv", mapping.separator)
    wanted = mapping.columns()
    missing = sorted(c for c in wanted.values() if c not in header)
    if missing:
        raise ValueError(f"the file has no column(s) {missing}; its header is {header}")
    # Prefixed so that file columns named like ours (``line``, ``price``, ...) cannot collide.
    frame = _fields(rows, tuple(FILE_PREFIX + c for c in header), mapping.separator)
    return _apply_mapping(frame, mapping, symbol)


def _parse_parquet(data: bytes, mapping: Mapping, symbol: str | None) -> pl.DataFrame:
    frame = pl.read_parquet(io.BytesIO(data))
    missing = sorted(c for c in mapping.columns().values() if c not in frame.columns)
    if missing:
        raise ValueError(f"the file has no column(s) {missing}; its columns are {frame.columns}")
    frame = frame.rename({c: FILE_PREFIX + c for c in frame.columns})
    frame = frame.with_row_index("line", offset=1).with_columns(
        pl.col("line").cast(pl.Int64),
        raw=pl.lit(None, pl.Utf8),
        reason=pl.lit(None, pl.Utf8),
    )
    return _apply_mapping(frame, mapping, symbol)


def _mapped_time(frame: pl.DataFrame, mapping: Mapping) -> pl.Expr:
    col = pl.col(FILE_PREFIX + mapping.time)
    dtype = frame.schema[FILE_PREFIX + mapping.time]
    if isinstance(dtype, pl.Datetime):
        ts = col.dt.cast_time_unit("ns")
        if dtype.time_zone is None:
            return _local_ts(ts, mapping.timezone)
        return ts.dt.convert_time_zone("UTC")
    if mapping.time_unit is not None:
        return _epoch_ts(_decimal_ns(col.cast(pl.Utf8), mapping.time_unit))
    if mapping.time_format is not None:
        fmt = mapping.time_format
        parsed = col.cast(pl.Utf8).str.strptime(pl.Datetime("ns"), fmt, strict=False)
        if any(z in fmt for z in ("%z", "%:z", "%#z")):
            return parsed.dt.convert_time_zone("UTC")
        return _local_ts(parsed, mapping.timezone)
    # ISO-8601: with an offset or Z (converted to UTC), or without (read in mapping.timezone).
    iso = (
        col.cast(pl.Utf8)
        .str.replace(r"^(\d{4}-\d{2}-\d{2}) ", "${1}T")
        .str.replace(r"Z$", "+00:00")
    )
    aware = iso.str.strptime(pl.Datetime("ns"), "%Y-%m-%dT%H:%M:%S%.f%z", strict=False)
    naive = iso.str.strptime(pl.Datetime("ns"), "%Y-%m-%dT%H:%M:%S%.f", strict=False)
    return pl.coalesce(aware.dt.convert_time_zone("UTC"), _local_ts(naive, mapping.timezone))


def _apply_mapping(frame: pl.DataFrame, mapping: Mapping, symbol: str | None) -> pl.DataFrame:
    def num(field: str, scale: float = 1.0) -> pl.Expr:
        column = getattr(mapping, field)
        if column is None:
            return pl.lit(None, pl.Float64)
        value = pl.col(FILE_PREFIX + column).cast(pl.Float64, strict=False)
        return _unscale(value, scale)

    def word(column: str | None) -> pl.Expr:
        if column is None:
            return pl.lit(None, pl.Utf8)
        value = pl.col(FILE_PREFIX + column).cast(pl.Utf8)
        return pl.when(value != "").then(value)

    if symbol is None and mapping.symbol_column is None and mapping.symbol is None:
        raise ValueError(
            "the mapping names no symbol: set symbol_column or symbol, or pass symbol="
        )
    if symbol is not None or mapping.symbol_column is None:
        sym = pl.lit(symbol or mapping.symbol, pl.Utf8)
    else:
        sym = pl.col(FILE_PREFIX + mapping.symbol_column).cast(pl.Utf8)
    scale = mapping.price_scale
    is_quote = mapping.bid is not None or mapping.ask is not None
    if mapping.price is None:
        kind = pl.lit("quote")
    elif not is_quote:
        kind = pl.lit("trade")
    else:
        kind = pl.when(num("price").is_not_null()).then(pl.lit("trade")).otherwise(pl.lit("quote"))
    trade, quote = kind == "trade", kind == "quote"
    side = pl.lit(None, pl.Utf8) if mapping.side is None else _side(FILE_PREFIX + mapping.side)
    return frame.with_columns(
        sym=sym,
        type=kind,
        ts=_mapped_time(frame, mapping),
        price=pl.when(trade).then(num("price", scale)),
        size=pl.when(trade).then(num("size")),
        side=pl.when(trade).then(side),
        bid=pl.when(quote).then(num("bid", scale)),
        bid_size=pl.when(quote).then(num("bid_size")),
        ask=pl.when(quote).then(num("ask", scale)),
        ask_size=pl.when(quote).then(num("ask_size")),
        venue=word(mapping.venue),
    )


def _need_symbol(symbol: str | None, fmt: str) -> str:
    if symbol is None:
        raise ValueError(f"a {fmt} file does not name its instrument; pass symbol=, e.g. EURUSD")
    return symbol


# ---------------------------------------------------------------------------------------------
# The checks every tick passes, and the split


def _positive(col: str) -> pl.Expr:
    value = pl.col(col)
    return value.is_not_null() & value.is_finite() & (value > 0)


def _bad_amount(col: str) -> pl.Expr:
    """Present but not a positive finite number (an absent size is allowed on quotes)."""
    return pl.col(col).is_not_null() & ~_positive(col)


def _split(frame: pl.DataFrame, *, read: int, skipped: int = 0) -> ImportResult:
    """Apply the tick rules: good rows become ticks (sorted by ts, stable), bad rows rejects."""
    frame = frame.with_columns(
        pl.col("sym").str.strip_chars().str.to_uppercase(),
        pl.col("venue").str.strip_chars().str.to_uppercase(),
    )
    is_trade = pl.col("type") == "trade"
    no_bid, no_ask = pl.col("bid").is_null(), pl.col("ask").is_null()
    check = (
        pl.when(pl.col("reason").is_not_null())
        .then(pl.col("reason"))
        .when(pl.col("ts").is_null())
        .then(pl.lit("bad_timestamp: unparseable or outside 2000-2100"))
        .when(pl.col("sym").is_null() | ~pl.col("sym").str.contains(SYMBOL_RE.pattern))
        .then(pl.lit("bad_symbol: not 1-32 of A-Z 0-9 . _ / -"))
        .when(pl.col("venue").is_not_null() & ~pl.col("venue").str.contains(SYMBOL_RE.pattern))
        .then(pl.lit("bad_venue: not 1-32 of A-Z 0-9 . _ / -"))
        .when(is_trade & ~_positive("price"))
        .then(pl.lit("bad_price: missing, non-positive or not finite"))
        .when(is_trade & ~_positive("size"))
        .then(pl.lit("bad_size: missing, non-positive or not finite"))
        .when(is_trade & (pl.col("side") == "?"))
        .then(pl.lit("bad_side: not buy or sell"))
        .when(~is_trade & no_bid & no_ask)
        .then(pl.lit("empty_quote: neither bid nor ask"))
        .when(~is_trade & ((~no_bid & ~_positive("bid")) | (~no_ask & ~_positive("ask"))))
        .then(pl.lit("bad_price: non-positive or not finite"))
        .when(~is_trade & (_bad_amount("bid_size") | _bad_amount("ask_size")))
        .then(pl.lit("bad_size: non-positive or not finite"))
    )
    frame = frame.with_columns(reason=check)
    rejects = (
        frame.filter(pl.col("reason").is_not_null())
        .select([pl.col(c).cast(t) for c, t in REJECT_SCHEMA.items()])
        .sort("line")
    )
    ticks = (
        frame.filter(pl.col("reason").is_null())
        .with_columns(
            # A one-sided quote cannot be crossed; trades have no crossed flag.
            crossed=pl.when(~is_trade).then((pl.col("bid") > pl.col("ask")).fill_null(False)),
            # The absent side of a one-sided quote carries no size.
            bid_size=pl.when(pl.col("bid").is_not_null()).then(pl.col("bid_size")),
            ask_size=pl.when(pl.col("ask").is_not_null()).then(pl.col("ask_size")),
        )
        .select([pl.col(c).cast(t) for c, t in TICK_SCHEMA.items()])
        .sort("ts", maintain_order=True)
    )
    return ImportResult(ticks=ticks, rejects=rejects, read=read, skipped=skipped)


# -- loading files into history ---------------------------------------------------------------


@dataclass
class ImportReport:
    """What ``import_file`` did with one file."""

    path: Path
    read: int
    stored: int
    rejected: int
    duplicate: int
    skipped: int
    epoch: int
    rejects_file: Path | None


def import_epoch(digest: str) -> int:
    """Imported ticks get a negative epoch derived from the file's SHA-256.

    Live epochs are positive (Redis' clock in ms), so imported history can never collide with
    live sequence numbers; seq counts the file's ticks per symbol from 1, in time order.
    """
    return -int(digest[:13], 16)


def import_file(
    history: Path,
    path: Path,
    fmt: str,
    *,
    symbol: str | None = None,
    mapping: Mapping | None = None,
    date: dt.date | None = None,
) -> ImportReport:
    """Parse ``path`` and store its ticks in ``history`` (the recorder's Parquet layout).

    Importing the same file (same bytes) again stores nothing and reports every row as a
    duplicate. Rejected rows go to ``<history>/../imports/<name>.<digest>.rejects.csv``.
    """
    from server.store import SCHEMA, write_file

    with path.open("rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
    manifest = history / "imports.jsonl"
    history.mkdir(parents=True, exist_ok=True)
    done = manifest.read_text().splitlines() if manifest.exists() else []
    epoch = import_epoch(digest)
    for line in done:
        seen = orjson.loads(line) if line.strip() else {}
        if seen.get("sha256") == digest:  # already stored: nothing to parse or write
            read, skipped = seen.get("read", 0), seen.get("skipped", 0)
            return ImportReport(path, read, 0, 0, read, skipped, epoch, None)
    result = read_file(path, fmt, symbol=symbol, mapping=mapping, date=date)
    rejects_file = None
    if result.rejects.height:
        rejects_dir = history.parent / "imports"
        rejects_dir.mkdir(parents=True, exist_ok=True)
        rejects_file = rejects_dir / f"{path.name}.{digest[:12]}.rejects.csv"
        result.rejects.write_csv(rejects_file)
    ticks = (
        result.ticks.with_row_index("_order")
        .sort(["sym", "ts", "_order"])
        .with_columns(
            pl.lit(epoch, pl.Int64).alias("epoch"),
            pl.int_range(1, pl.len() + 1, dtype=pl.Int64).over("sym").alias("seq"),
        )
        .select(list(SCHEMA))
    )
    for (day,), part in ticks.group_by(pl.col("ts").dt.date(), maintain_order=True):
        write_file(history, part, f"import-{digest[:16]}", str(day))
    with manifest.open("a") as fh:
        fh.write(
            orjson.dumps(
                {"sha256": digest, "file": path.name, "format": fmt, "epoch": epoch,
                 "read": result.read, "skipped": result.skipped, "stored": ticks.height,
                 "at_ns": time.time_ns()}
            ).decode()
            + "\n"
        )  # fmt: skip
    return ImportReport(
        path, result.read, ticks.height, result.rejects.height, 0, result.skipped, epoch,
        rejects_file,
    )  # fmt: skip
